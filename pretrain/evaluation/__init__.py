"""Measuring models and the trainer: per-language masked-LM validation (mlm), the
cross-lingual probes, retrieval and zero-shot transfer (probes; their bundled data probe_set/,
built by build_probe_set), the `xlmr-eval` command over both (cli), and training throughput
against HF with `xlmr-bench` (bench)."""
