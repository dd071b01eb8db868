"""Correlations, ranks, Fisher intervals, inversion_stats and the accumulator vs scipy."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from inversion_monitor.metrics.correlation import fisher_ci, pearson, rank_average, spearman
from inversion_monitor.metrics.stats import (
    DegenerateInputWarning,
    InversionAccumulator,
    InversionStats,
    inversion_stats,
)

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# exact binary fractions in [-64, 64]: ties are common, arithmetic is exact
tied_values = st.integers(-1024, 1024).map(lambda i: i / 16)
finite_values = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)


@st.composite
def pairs(draw: st.DrawFn, values: st.SearchStrategy[float] = tied_values, min_n: int = 2):
    n = draw(st.integers(min_n, 40))
    x = draw(st.lists(values, min_size=n, max_size=n))
    y = draw(st.lists(values, min_size=n, max_size=n))
    return torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)


def _constant(t: torch.Tensor) -> bool:
    return bool(t.max() == t.min())


def _quiet(fn, *args):  # type: ignore[no-untyped-def]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegenerateInputWarning)
        return fn(*args)


# --------------------------------------------------------------------------- rank_average


@SETTINGS
@given(st.lists(tied_values, max_size=60))
def test_rank_average_matches_scipy_rankdata(values: list[float]) -> None:
    x = torch.tensor(values, dtype=torch.float64)
    expected = sps.rankdata(np.array(values), method="average")
    np.testing.assert_array_equal(rank_average(x).numpy(), expected)


@SETTINGS
@given(st.lists(st.integers(-3, 3), min_size=1, max_size=60))
def test_rank_average_integer_input(values: list[int]) -> None:
    ranks = rank_average(torch.tensor(values))
    assert ranks.dtype == torch.float64
    np.testing.assert_array_equal(ranks.numpy(), sps.rankdata(values))


def test_rank_average_special_values() -> None:
    x = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1.0])
    np.testing.assert_array_equal(rank_average(x).numpy(), [2.5, 2.5, 5.0, 1.0, 4.0])
    assert torch.isnan(rank_average(torch.tensor([1.0, float("nan")]))).all()
    assert rank_average(torch.empty(0)).shape == (0,)


def test_rank_average_is_vectorised_on_a_large_input() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 1000, (200_000,), generator=g)
    np.testing.assert_array_equal(rank_average(x).numpy(), sps.rankdata(x.numpy()))


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        ([1.0, 2.0], TypeError, "x: expected a torch.Tensor, got list"),
        (torch.tensor([True, False]), TypeError, "expected a real (integer or floating)"),
        (torch.zeros(2, 2), ValueError, "x: expected a 1-D tensor of shape (n,), got ndim=2"),
        (torch.tensor(1.0), ValueError, "got ndim=0 with shape ()"),
    ],
)
def test_rank_average_rejects(value: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=_re(message)):
        rank_average(value)  # type: ignore[arg-type]


def _re(text: str) -> str:
    import re

    return re.escape(text)


# --------------------------------------------------------------------------- correlations


@SETTINGS
@given(pairs())
def test_spearman_and_pearson_match_scipy_with_ties(xy: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = xy
    if _constant(x) or _constant(y):
        assert torch.isnan(_quiet(spearman, x, y))
        assert torch.isnan(_quiet(pearson, x, y))
        return
    assert spearman(x, y).item() == pytest.approx(sps.spearmanr(x, y).statistic, abs=1e-6)
    assert pearson(x, y).item() == pytest.approx(sps.pearsonr(x, y).statistic, abs=1e-6)


@SETTINGS
@given(pairs(finite_values, min_n=3))
def test_match_scipy_on_arbitrary_floats(xy: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = xy
    if _constant(x) or _constant(y):
        return
    assert spearman(x, y).item() == pytest.approx(sps.spearmanr(x, y).statistic, abs=1e-6)
    # Pearson of near-constant data is ill-conditioned in any implementation
    if min(float(x.std()), float(y.std())) > 1e-6 * max(float(x.abs().max()), 1.0):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy's own near-constant warning
            expected = sps.pearsonr(x, y).statistic
        assert pearson(x, y).item() == pytest.approx(expected, abs=1e-6)


@SETTINGS
@given(pairs(), st.randoms(use_true_random=False))
def test_permutation_invariance_and_symmetry(xy: tuple[torch.Tensor, torch.Tensor], rnd) -> None:  # type: ignore[no-untyped-def]
    x, y = xy
    perm = list(range(x.numel()))
    rnd.shuffle(perm)
    p = torch.tensor(perm)
    for fn in (spearman, pearson):
        r = _quiet(fn, x, y)
        torch.testing.assert_close(_quiet(fn, x[p], y[p]), r, equal_nan=True, rtol=0, atol=1e-12)
        torch.testing.assert_close(_quiet(fn, y, x), r, equal_nan=True, rtol=0, atol=1e-12)
        if not torch.isnan(r):
            assert -1.0 <= r.item() <= 1.0


@SETTINGS
@given(pairs())
def test_spearman_invariant_under_strictly_monotone_transforms(
    xy: tuple[torch.Tensor, torch.Tensor],
) -> None:
    x, y = xy
    r = _quiet(spearman, x, y)
    torch.testing.assert_close(_quiet(spearman, torch.exp(x / 8), y**3 + y), r, equal_nan=True)
    torch.testing.assert_close(_quiet(spearman, 2.5 * x - 7, -torch.exp(-y / 8)), r, equal_nan=True)
    # a decreasing transform of one side flips the sign
    torch.testing.assert_close(_quiet(spearman, x, -y), -r, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_low_precision_inputs_are_computed_in_float64(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, generator=g).to(dtype)
    y = (x.double() * -0.7 + torch.randn(300, generator=g, dtype=torch.float64)).to(dtype)
    xs, ys = x.double().numpy(), y.double().numpy()  # the values actually passed
    rho, r = spearman(x, y), pearson(x, y)
    assert rho.dtype == r.dtype == torch.float64
    assert rho.item() == pytest.approx(sps.spearmanr(xs, ys).statistic, abs=1e-6)
    assert r.item() == pytest.approx(sps.pearsonr(xs, ys).statistic, abs=1e-6)


def test_extreme_magnitudes_neither_overflow_nor_underflow() -> None:
    x = torch.tensor([1e300, -1e300, 2e300, 0.0], dtype=torch.float64)
    y = torch.tensor([1.0, -1.0, 2.0, 0.0], dtype=torch.float64)
    assert pearson(x, y).item() == pytest.approx(1.0, abs=1e-12)
    tiny = torch.tensor([1e-310, 3e-310, 2e-310, 4e-310], dtype=torch.float64)
    assert pearson(tiny, torch.tensor([1.0, 3.0, 2.0, 4.0])).item() == pytest.approx(1.0)


def test_requires_grad_input_is_detached() -> None:
    x = torch.tensor([1.0, 2.0, 4.0], requires_grad=True)
    assert not pearson(x, torch.tensor([1.0, 0.0, 2.0])).requires_grad


@pytest.mark.parametrize("fn", [spearman, pearson])
@pytest.mark.parametrize(
    ("x", "y", "reason"),
    [
        ([], [], "n=0 value pair(s), fewer than 2"),
        ([1.0], [2.0], "n=1 value pair(s), fewer than 2"),
        ([3.0, 3.0, 3.0], [1.0, 2.0, 3.0], "x is constant over the 3 values"),
        ([1.0, 2.0, 3.0], [0.5, 0.5, 0.5], "y is constant over the 3 values"),
        ([1.0, float("nan"), 3.0], [1.0, 2.0, 3.0], "x has 1 non-finite value(s)"),
        ([1.0, 2.0, 3.0], [1.0, float("inf"), -float("inf")], "y has 2 non-finite value(s)"),
    ],
)
def test_degenerate_input_is_nan_with_a_warning(fn, x, y, reason) -> None:  # type: ignore[no-untyped-def]
    with pytest.warns(DegenerateInputWarning, match=_re(f"{fn.__name__} is NaN: {reason}")):
        value = fn(torch.tensor(x), torch.tensor(y))
    assert value.dtype == torch.float64 and value.ndim == 0 and torch.isnan(value)


def test_the_warning_points_at_the_caller() -> None:
    with pytest.warns(DegenerateInputWarning) as record:
        spearman(torch.ones(3), torch.arange(3.0))
    assert record[0].filename == __file__


@pytest.mark.parametrize("fn", [spearman, pearson])
@pytest.mark.parametrize(
    ("x", "y", "error", "message"),
    [
        ([1.0, 2.0], torch.ones(2), TypeError, "x: expected a torch.Tensor, got list"),
        (
            torch.tensor([1, 2]),
            torch.ones(2),
            TypeError,
            "x: expected a floating-point tensor (float16, bfloat16, float32 or float64), "
            "got torch.int64",
        ),
        (torch.ones(2), torch.tensor([True, False]), TypeError, "y: expected a floating-point"),
        (torch.ones(2), torch.ones(2, dtype=torch.complex64), TypeError, "got torch.complex64"),
        (torch.ones(2, 3), torch.ones(2, 3), ValueError, "x: expected a 1-D tensor of shape (n,)"),
        (torch.tensor(1.0), torch.tensor(1.0), ValueError, "got ndim=0 with shape ()"),
        (
            torch.ones(3),
            torch.ones(4),
            ValueError,
            "x and y: expected the same shape, got (3,) and (4,)",
        ),
        (torch.ones(0), torch.ones(1), ValueError, "got (0,) and (1,)"),
    ],
)
def test_validation_says_expected_vs_got(fn, x, y, error, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=_re(message)):
        fn(x, y)


# --------------------------------------------------------------------------- Fisher interval


@SETTINGS
@given(st.floats(-1.0, 1.0), st.integers(4, 100_000), st.sampled_from(["spearman", "pearson"]))
def test_ci_contains_r_and_shrinks_with_n(r: float, n: int, method: str) -> None:
    low, high = fisher_ci(r, n, method=method)  # type: ignore[arg-type]
    assert -1.0 <= low <= r <= high <= 1.0
    low2, high2 = fisher_ci(r, 2 * n, method=method)  # type: ignore[arg-type]
    assert high2 - low2 <= high - low


def test_ci_matches_scipy_pearson_interval() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(57, generator=g, dtype=torch.float64)
    y = 0.4 * x + torch.randn(57, generator=g, dtype=torch.float64)
    result = sps.pearsonr(x.numpy(), y.numpy())
    expected = result.confidence_interval(0.9)
    low, high = fisher_ci(pearson(x, y), 57, method="pearson", confidence=0.9)
    assert (low, high) == pytest.approx((expected.low, expected.high), abs=1e-12)


def test_ci_spearman_is_wider_by_the_1_06_factor() -> None:
    r, n = 0.3, 103
    sp, pe = fisher_ci(r, n, method="spearman"), fisher_ci(r, n, method="pearson")
    z = math.atanh(r)
    assert math.atanh(sp[1]) - z == pytest.approx((math.atanh(pe[1]) - z) * math.sqrt(1.06))
    assert math.atanh(pe[1]) - z == pytest.approx(1.959963984540054 / 10)


def test_ci_edge_cases() -> None:
    for n in (0, 1, 2, 3):
        assert all(math.isnan(v) for v in fisher_ci(0.5, n, method="pearson"))
    assert all(math.isnan(v) for v in fisher_ci(float("nan"), 50, method="spearman"))
    low, high = fisher_ci(1.0, 10, method="spearman")
    assert math.isfinite(low) and low < 1.0 == high
    low, high = fisher_ci(-1.0, 10, method="pearson")
    assert low == -1.0 < high and math.isfinite(high)
    assert fisher_ci(torch.tensor(0.2, dtype=torch.float64), 30, method="pearson") == fisher_ci(
        0.2, 30, method="pearson"
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"n": -1}, ValueError, "n: expected an int >= 0, got -1"),
        ({"n": 10.0}, TypeError, "n: expected an int >= 0, got float 10.0"),
        ({"n": True}, TypeError, "n: expected an int >= 0, got bool True"),
        ({"confidence": 0}, ValueError, "confidence: expected a float in (0, 1), e.g. 0.95, got 0"),
        ({"confidence": 1.0}, ValueError, "got 1.0"),
        ({"confidence": -0.5}, ValueError, "got -0.5"),
        ({"confidence": float("nan")}, ValueError, "got nan"),
        ({"confidence": "0.9"}, TypeError, "confidence: expected a float in (0, 1), e.g. 0.95"),
        (
            {"method": "kendall"},
            ValueError,
            "method: expected 'spearman' or 'pearson', got 'kendall'",
        ),
        ({"r": 1.5}, ValueError, "r: expected a correlation in [-1, 1] (or NaN), got 1.5"),
        ({"r": "0.5"}, TypeError, "r: expected a float in [-1, 1], got str '0.5'"),
        ({"r": torch.ones(2)}, ValueError, "r: expected a scalar, got a tensor of shape (2,)"),
    ],
)
def test_fisher_ci_validation(kwargs, error, message) -> None:  # type: ignore[no-untyped-def]
    args = {"r": 0.5, "n": 10, "method": "pearson", "confidence": 0.95, **kwargs}
    r, n = args.pop("r"), args.pop("n")
    with pytest.raises(error, match=_re(message)):
        fisher_ci(r, n, **args)


def _bivariate_normal(
    rho: float, n: int, reps: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(reps, n, generator=g, dtype=torch.float64)
    b = torch.randn(reps, n, generator=g, dtype=torch.float64)
    return a, rho * a + math.sqrt(1 - rho**2) * b


@pytest.mark.parametrize(("rho", "n"), [(0.0, 30), (-0.6, 64), (0.8, 20)])
def test_ci_coverage_is_near_nominal(rho: float, n: int) -> None:
    reps = 1000
    x, y = _bivariate_normal(rho, n, reps, seed=int(100 * rho) + n)
    true = {"pearson": rho, "spearman": 6 / math.pi * math.asin(rho / 2)}
    for method, fn in (("pearson", pearson), ("spearman", spearman)):
        hits = 0
        for i in range(reps):
            low, high = fisher_ci(fn(x[i], y[i]), n, method=method)  # type: ignore[arg-type]
            hits += low <= true[method] <= high
        # binomial SE at 1000 reps is 0.0069; seeded, so the outcome is fixed
        assert abs(hits / reps - 0.95) < 0.025, (method, hits / reps)


# --------------------------------------------------------------------------- inversion_stats


def _numpy_summaries(e: np.ndarray, s: np.ndarray) -> dict[str, float]:
    e, s = e[np.isfinite(e)], s[np.isfinite(s)]
    nan = float("nan")
    return {
        "entropy_mean": float(e.mean()) if e.size else nan,
        "entropy_p10": float(np.quantile(e, 0.1)) if e.size else nan,
        "entropy_p50": float(np.quantile(e, 0.5)) if e.size else nan,
        "entropy_p90": float(np.quantile(e, 0.9)) if e.size else nan,
        "score_mean": float(s.mean()) if s.size else nan,
        "score_p50": float(np.quantile(s, 0.5)) if s.size else nan,
        "score_p90": float(np.quantile(s, 0.9)) if s.size else nan,
    }


def _assert_summaries(result: InversionStats, e: torch.Tensor, s: torch.Tensor) -> None:
    for key, value in _numpy_summaries(e.double().numpy(), s.double().numpy()).items():
        got = getattr(result, key)
        assert got == pytest.approx(value, rel=1e-12, abs=1e-12, nan_ok=True), key


special = st.one_of(tied_values, st.sampled_from([float("nan"), float("inf"), -float("inf")]))


@SETTINGS
@given(pairs(special, min_n=0), st.sampled_from(["spearman", "pearson"]))
def test_inversion_stats_agrees_with_the_parts(xy, method: str) -> None:  # type: ignore[no-untyped-def]
    e, s = xy
    result = inversion_stats(e, s, method=method)  # type: ignore[arg-type]
    keep = torch.isfinite(e) & torch.isfinite(s)
    ek, sk = e[keep], s[keep]
    assert result.n == int(keep.sum())
    assert result.extra["n_nonfinite_dropped"] == e.numel() - result.n
    assert result.method == method and result.confidence == 0.95
    _assert_summaries(result, e, s)
    if result.n < 4 or _constant(ek) or _constant(sk):
        assert result.insufficient and result.reason
        assert math.isnan(result.spearman) and math.isnan(result.pearson)
        assert all(math.isnan(v) for v in (*result.spearman_ci, *result.pearson_ci))
        return
    assert not result.insufficient and result.reason is None
    assert result.spearman == pytest.approx(sps.spearmanr(ek, sk).statistic, abs=1e-6)
    assert result.pearson == pytest.approx(sps.pearsonr(ek, sk).statistic, abs=1e-6)
    assert result.spearman_ci == fisher_ci(result.spearman, result.n, method="spearman")
    assert result.pearson_ci == fisher_ci(result.pearson, result.n, method="pearson")
    assert result.rho == (result.spearman if method == "spearman" else result.pearson)
    assert result.ci == (result.spearman_ci if method == "spearman" else result.pearson_ci)
    assert result.spearman_per_token_type is None and result.n_token_types is None


@pytest.mark.parametrize(
    ("entropy", "score", "reason"),
    [
        ([0.1, 0.2, 0.3], [3.0, 2.0, 1.0], "n=3 value pair(s), fewer than 4"),
        ([0.5] * 5, [1.0, 2.0, 3.0, 4.0, 5.0], "entropy is constant over the 5 values"),
        ([0.1, 0.2, 0.3, 0.4], [7.0] * 4, "score is constant over the 4 values"),
        ([float("nan")] * 4, [1.0, 2.0, 3.0, 4.0], "n=0 value pair(s), fewer than 4"),
        ([], [], "n=0 value pair(s), fewer than 4"),
    ],
)
def test_insufficient_samples_say_why_and_keep_summaries(entropy, score, reason) -> None:  # type: ignore[no-untyped-def]
    e, s = torch.tensor(entropy), torch.tensor(score)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: the result itself reports it
        result = inversion_stats(e, s)
    assert result.insufficient and result.reason == reason
    assert math.isnan(result.rho) and all(math.isnan(v) for v in result.ci)
    _assert_summaries(result, e, s)


def test_min_tokens_is_respected() -> None:
    e, s = torch.arange(8.0), -torch.arange(8.0)
    assert inversion_stats(e, s, min_tokens=8).spearman == -1.0
    result = inversion_stats(e, s, min_tokens=9)
    assert result.insufficient and result.reason == "n=8 value pair(s), fewer than 9"


def _per_type_reference(e: torch.Tensor, s: torch.Tensor, tok: torch.Tensor) -> tuple[float, int]:
    groups: dict[int, list[tuple[float, float]]] = {}
    for a, b, t in zip(e.tolist(), s.tolist(), tok.tolist(), strict=True):
        if math.isfinite(a) and math.isfinite(b):
            groups.setdefault(t, []).append((a, b))
    ids = sorted(groups)
    me = [sum(a for a, _ in groups[i]) / len(groups[i]) for i in ids]
    ms = [sum(b for _, b in groups[i]) / len(groups[i]) for i in ids]
    if len(ids) < 4 or len(set(me)) == 1 or len(set(ms)) == 1:
        return float("nan"), len(ids)
    return float(sps.spearmanr(me, ms).statistic), len(ids)


@SETTINGS
@given(pairs(special, min_n=0), st.data())
def test_per_token_type_matches_a_dictionary_reference(xy, data) -> None:  # type: ignore[no-untyped-def]
    e, s = xy
    tok = torch.tensor(
        data.draw(st.lists(st.integers(0, 9), min_size=e.numel(), max_size=e.numel())),
        dtype=torch.int64,
    )
    result = inversion_stats(e, s, per_token_type=True, tokens=tok)
    expected, n_types = _per_type_reference(e, s, tok)
    assert result.n_token_types == n_types
    assert result.spearman_per_token_type == pytest.approx(expected, abs=1e-6, nan_ok=True)
    plain = inversion_stats(e, s)  # the primary statistic stays over positions
    assert (result.spearman, result.n) == pytest.approx((plain.spearman, plain.n), nan_ok=True)


def test_per_token_type_averages_repeated_tokens() -> None:
    # token 5 appears three times; its averages are (1.0, 2.0)
    e = torch.tensor([0.0, 2.0, 1.0, 3.0, 4.0, 5.0])
    s = torch.tensor([3.0, 1.0, 2.0, 9.0, 8.0, 7.0])
    tok = torch.tensor([5, 5, 5, 6, 7, 8])
    result = inversion_stats(e, s, per_token_type=True, tokens=tok)
    assert result.n_token_types == 4
    # per-type means: e = (1, 3, 4, 5), s = (2, 9, 8, 7)
    expected = sps.spearmanr([1, 3, 4, 5], [2, 9, 8, 7]).statistic
    assert result.spearman_per_token_type == pytest.approx(expected)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"per_token_type": True},
            ValueError,
            "tokens: expected the token ids (shape (n,)) because per_token_type=True, got None",
        ),
        (
            {"tokens": torch.arange(4)},
            ValueError,
            "tokens: only used with per_token_type=True, got tokens with per_token_type=False",
        ),
        (
            {"per_token_type": True, "tokens": torch.arange(4.0)},
            TypeError,
            "tokens: expected an integer tensor (e.g. torch.int64), got torch.float32",
        ),
        (
            {"per_token_type": True, "tokens": torch.arange(5)},
            ValueError,
            "entropy and tokens: expected the same shape, got (4,) and (5,)",
        ),
        ({"per_token_type": 1}, TypeError, "per_token_type: expected a bool, got int 1"),
        ({"min_tokens": 0}, ValueError, "min_tokens: expected an int >= 4, got 0"),
        ({"min_tokens": -2}, ValueError, "min_tokens: expected an int >= 4, got -2"),
        ({"min_tokens": 3}, ValueError, "min_tokens: expected an int >= 4, got 3"),
        ({"confidence": 0.0}, ValueError, "confidence: expected a float in (0, 1)"),
        ({"method": "Spearman"}, ValueError, "method: expected 'spearman' or 'pearson'"),
        ({"entropy": torch.arange(4)}, TypeError, "entropy: expected a floating-point tensor"),
        ({"score": torch.ones(2, 2)}, ValueError, "score: expected a 1-D tensor of shape (n,)"),
        ({"score": torch.ones(3)}, ValueError, "entropy and score: expected the same shape"),
    ],
)
def test_inversion_stats_validation(kwargs, error, message) -> None:  # type: ignore[no-untyped-def]
    args = {"entropy": torch.rand(4), "score": torch.rand(4), **kwargs}
    e, s = args.pop("entropy"), args.pop("score")
    with pytest.raises(error, match=_re(message)):
        inversion_stats(e, s, **args)


def test_inversion_stats_accepts_bf16_and_is_json_ready() -> None:
    g = torch.Generator().manual_seed(5)
    e = torch.rand(64, generator=g).to(torch.bfloat16)
    s = (2.0 - e.float() + 0.1 * torch.rand(64, generator=g)).to(torch.bfloat16)
    result = inversion_stats(e, s)
    assert result.rho < -0.8 and not result.insufficient
    json.dumps(result.to_dict())


# --------------------------------------------------------------------------- accumulator


def _random_batches(seed: int, sizes: list[int]) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for size in sizes:
        e = torch.rand(size, generator=g)
        s = -e + 0.5 * torch.rand(size, generator=g)
        e[torch.rand(size, generator=g) < 0.05] = float("nan")
        tok = torch.randint(0, 12, (size,), generator=g)
        out.append((e, s, tok))
    return out


def _same(a: InversionStats, b: InversionStats) -> None:
    da, db = a.to_dict(), b.to_dict()
    da["extra"].pop("n_evicted", None)
    assert json.dumps(da, sort_keys=True) == json.dumps(db, sort_keys=True)


@pytest.mark.parametrize("per_token_type", [False, True])
def test_accumulator_equals_the_function_on_the_concatenation(per_token_type: bool) -> None:
    batches = _random_batches(0, [7, 1, 0, 30, 12])
    acc = InversionAccumulator("pearson", per_token_type=per_token_type, confidence=0.9)
    for e, s, tok in batches:
        acc.update(e, s, tok if per_token_type else None)
    e, s, tok = (torch.cat(parts) for parts in zip(*batches, strict=True))
    expected = inversion_stats(
        e,
        s,
        method="pearson",
        per_token_type=per_token_type,
        tokens=tok if per_token_type else None,
        confidence=0.9,
    )
    result = acc.compute()
    _same(result, expected)
    assert result.extra["n_evicted"] == 0.0 and acc.n_buffered == 50


def test_accumulator_drops_the_oldest_when_full_and_warns_once() -> None:
    batches = _random_batches(1, [10, 10, 10, 25])
    acc = InversionAccumulator(max_tokens=16, per_token_type=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for e, s, tok in batches:
            acc.update(e, s, tok)
            assert acc.n_buffered <= 16
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "max_tokens=16" in messages[0]
    e, s, tok = (torch.cat(parts)[-16:] for parts in zip(*batches, strict=True))
    result = acc.compute()
    _same(result, inversion_stats(e, s, per_token_type=True, tokens=tok))
    assert acc.n_evicted == 55 - 16 and result.extra["n_evicted"] == 39.0


def test_accumulator_copies_its_input_and_resets() -> None:
    e, s = torch.tensor([0.1, 0.5, 0.3, 0.9]), torch.tensor([4.0, 2.0, 3.0, 1.0])
    acc = InversionAccumulator()
    acc.update(e, s)
    e.fill_(0.0)  # the caller reuses its buffer
    assert acc.compute().spearman == -1.0
    acc.reset()
    assert acc.n_buffered == 0 and acc.n_evicted == 0
    empty = acc.compute()
    assert empty.insufficient and empty.n == 0 and empty.reason == "n=0 value pair(s), fewer than 4"


def test_accumulator_with_per_token_type_and_no_data() -> None:
    result = InversionAccumulator(per_token_type=True).compute()
    assert result.insufficient and result.n_token_types == 0


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"max_tokens": 0}, ValueError, "max_tokens: expected an int >= 4, got 0"),
        ({"max_tokens": -1}, ValueError, "max_tokens: expected an int >= 4, got -1"),
        ({"max_tokens": 9, "min_tokens": 10}, ValueError, "max_tokens: expected an int >= 10"),
        ({"max_tokens": 1e4}, TypeError, "max_tokens: expected an int >= 4, got float 10000.0"),
        ({"min_tokens": 0}, ValueError, "min_tokens: expected an int >= 4, got 0"),
        ({"method": "kendall"}, ValueError, "method: expected 'spearman' or 'pearson'"),
        (
            {"confidence": 95},
            ValueError,
            "confidence: expected a float in (0, 1), e.g. 0.95, got 95",
        ),
    ],
)
def test_accumulator_validates_its_options(kwargs, error, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=_re(message)):
        InversionAccumulator(**kwargs)


def test_accumulator_validates_each_update() -> None:
    acc = InversionAccumulator(per_token_type=True)
    with pytest.raises(ValueError, match=_re("because per_token_type=True, got None")):
        acc.update(torch.rand(3), torch.rand(3))
    with pytest.raises(TypeError, match=_re("score: expected a floating-point tensor")):
        acc.update(torch.rand(3), torch.arange(3), torch.arange(3))
    assert acc.n_buffered == 0  # a rejected batch adds nothing


def test_inputs_on_different_devices_are_rejected() -> None:
    with pytest.raises(
        ValueError, match=_re("x and y: expected the same device, got cpu and meta")
    ):
        spearman(torch.ones(3), torch.ones(3, device="meta"))


def test_numpy_scalars_are_accepted_by_fisher_ci() -> None:
    assert fisher_ci(
        np.float32(0.5), np.int64(20), method="pearson", confidence=np.float32(0.9)
    ) == (
        fisher_ci(float(np.float32(0.5)), 20, method="pearson", confidence=float(np.float32(0.9)))
    )
