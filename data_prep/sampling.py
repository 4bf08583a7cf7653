"""Language temperature sampling (XLM, Lample & Conneau 2019; XLM-R, Conneau et al. 2020).

With n_i the size of language i and p_i = n_i / Σ_j n_j its share, languages are sampled with
q_i = p_i^α / Σ_j p_j^α. α = 1 keeps the natural distribution, α → 0 tends to uniform; XLM-R
used α = 0.3, which up-samples low-resource languages.
"""
from __future__ import annotations

from typing import Dict, Mapping


def temperature_probs(counts: Mapping[str, float], alpha: float) -> Dict[str, float]:
    if not counts:
        raise ValueError("temperature_probs needs at least one language")
    if alpha < 0:
        raise ValueError(f"sampling alpha must be >= 0, got {alpha}")
    if any(n < 0 for n in counts.values()):
        raise ValueError("language counts must be >= 0")
    total = float(sum(counts.values()))
    if total <= 0:
        raise ValueError("all language counts are zero")
    weights = {lang: (n / total) ** alpha if n > 0 else 0.0 for lang, n in counts.items()}
    norm = sum(weights.values())
    return {lang: w / norm for lang, w in weights.items()}
