"""Cluster operations: the SLURM edge of a training job (slurm: rank env, signal relay,
requeue), `xlmr-submit` (submit: the pipeline as chained jobs) and `xlmr-status` (status:
where a run stands, from its files)."""
