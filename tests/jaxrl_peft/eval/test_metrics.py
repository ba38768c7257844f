"""pass@k against the closed form, avg@k, and the aggregation helpers."""

import math
from fractions import Fraction

import pytest

from jaxrl_peft.eval import metrics


def closed_form(n: int, c: int, k: int) -> float:
    return float(1 - Fraction(math.comb(n - c, k), math.comb(n, k)))


def test_pass_at_k_matches_closed_form_on_small_cases():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert metrics.pass_at_k(n, c, k) == pytest.approx(closed_form(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_edge_cases():
    for n in (1, 4, 32):
        for k in range(1, n + 1):
            assert metrics.pass_at_k(n, 0, k) == 0.0  # c = 0: never
            assert metrics.pass_at_k(n, n, k) == 1.0  # c = n: always
        for c in range(n + 1):
            assert metrics.pass_at_k(n, c, n) == float(c > 0)  # k = n: any correct
            assert metrics.pass_at_k(n, c, 1) == pytest.approx(c / n)  # k = 1: the fraction correct


def test_pass_at_k_large_n_is_stable():
    # math.comb(2000, 300) has hundreds of digits; the product form must stay accurate.
    for n, c, k in ((2000, 7, 300), (1024, 1, 512), (512, 500, 10)):
        assert metrics.pass_at_k(n, c, k) == pytest.approx(closed_form(n, c, k), rel=1e-9)


@pytest.mark.parametrize("n,c,k", [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_pass_at_k_rejects_bad_arguments(n, c, k):
    with pytest.raises(ValueError, match="pass_at_k"):
        metrics.pass_at_k(n, c, k)


def test_avg_at_k_and_report_ks():
    assert metrics.avg_at_k([True, False, False, True]) == 0.5
    assert metrics.avg_at_k([0.0, 1.0, 1.0]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        metrics.avg_at_k([])
    assert metrics.report_ks(1) == [1]
    assert metrics.report_ks(4) == [1, 2, 4]
    assert metrics.report_ks(6) == [1, 2, 4, 6]
    assert metrics.report_ks(32) == [1, 2, 4, 8, 16, 32]


def test_benchmark_metrics_average_over_problems():
    correct = [[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]
    m = metrics.benchmark_metrics(correct)
    assert set(m) == {"avg@4", "pass@1", "pass@2", "pass@4"}
    assert m["avg@4"] == pytest.approx((0.25 + 1 + 0) / 3)
    assert m["pass@1"] == pytest.approx(m["avg@4"])  # unbiased pass@1 is avg@n
    assert m["pass@2"] == pytest.approx((closed_form(4, 1, 2) + 1 + 0) / 3)
    assert m["pass@4"] == pytest.approx(2 / 3)  # k = n: the study's "max"
    assert metrics.benchmark_metrics(correct, ks=[3]) == {"avg@4": m["avg@4"],
                                                           "pass@3": pytest.approx((0.75 + 1) / 3)}
    with pytest.raises(ValueError, match="different sample counts"):
        metrics.benchmark_metrics([[1, 0], [1]])
    with pytest.raises(ValueError, match="no problems"):
        metrics.benchmark_metrics([])


def test_unweighted_mean_counts_each_benchmark_once():
    rows = {"small": {"acc": 1.0, "len": 10.0}, "large": {"acc": 0.0, "len": 30.0}}
    assert metrics.unweighted_mean(rows, ["acc", "len"]) == {"acc": 0.5, "len": 20.0}
    with pytest.raises(ValueError):
        metrics.unweighted_mean({}, ["acc"])
