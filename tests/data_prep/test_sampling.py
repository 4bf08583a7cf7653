import pytest

from data_prep.sampling import temperature_probs
from data_prep.vocab import sample_quotas



def test_temperature_half_by_hand():
    # p = (0.9, 0.1); p^0.5 = (3, 1) * sqrt(0.1); q = (3/4, 1/4)
    q = temperature_probs({"a": 90, "b": 10}, 0.5)
    assert q == pytest.approx({"a": 0.75, "b": 0.25})


def test_temperature_third_by_hand():
    # n^(1/3) = (1, 2, 3): q = (1/6, 2/6, 3/6)
    q = temperature_probs({"a": 1, "b": 8, "c": 27}, 1 / 3)
    assert q == pytest.approx({"a": 1 / 6, "b": 2 / 6, "c": 3 / 6})


def test_temperature_limits():
    counts = {"en": 700, "de": 200, "sl": 100}
    assert temperature_probs(counts, 1.0) == pytest.approx({"en": 0.7, "de": 0.2, "sl": 0.1})
    assert temperature_probs(counts, 0.0) == pytest.approx({k: 1 / 3 for k in counts})


def test_xlmr_alpha_upsamples_rare_languages():
    counts = {"en": 10_000, "sw": 10}
    q = temperature_probs(counts, 0.3)
    # by hand: (1000)^0.3 = 7.943...; q_sw = 1 / (1 + 7.943) = 0.1118
    assert q["sw"] == pytest.approx(1 / (1 + 1000**0.3))


def test_temperature_rejects_bad_input():
    with pytest.raises(ValueError):
        temperature_probs({}, 0.3)
    with pytest.raises(ValueError):
        temperature_probs({"a": 0}, 0.3)
    with pytest.raises(ValueError):
        temperature_probs({"a": 1}, -1)


def test_sample_quotas_follow_q_and_cap():
    quotas = sample_quotas({"a": 90_000, "b": 10_000}, 0.5, sample_lines=1000)
    assert quotas == {"a": 750, "b": 250}
    # never more lines than the corpus has in total
    assert sum(sample_quotas({"a": 30, "b": 10}, 0.5, sample_lines=1000).values()) == 40
