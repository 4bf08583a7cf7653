"""Measuring models and the trainer: per-language masked-LM validation and `xlmr-eval`
(mlm), and training throughput against HF with `xlmr-bench` (bench)."""
