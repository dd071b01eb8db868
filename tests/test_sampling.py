"""valid_positions and TokenSampler: padding, determinism, uniformity, strata, resume."""

from __future__ import annotations

import random
import re
from collections import Counter

import numpy as np
import pytest
import torch
from scipy import stats as sps

from inversion_monitor.probe.sampling import TokenSampler, valid_positions

# --------------------------------------------------------------------------- valid_positions


def _valid_reference(mask: list[list[int]]) -> list[list[bool]]:
    return [
        [t + 1 < len(row) and bool(row[t]) and bool(row[t + 1]) for t in range(len(row))]
        for row in mask
    ]


@pytest.mark.parametrize(
    "mask",
    [
        [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]],  # right padding
        [[0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]],  # left padding, one real token
        [[1, 0, 1, 1, 0, 1], [0, 0, 0, 0, 0, 0]],  # holes, all padding
    ],
)
def test_valid_positions_matches_the_definition(mask: list[list[int]]) -> None:
    ids = torch.arange(12).reshape(2, 6)
    got = valid_positions(ids, torch.tensor(mask))
    assert got.dtype == torch.bool
    assert got.tolist() == _valid_reference(mask)
    assert valid_positions(ids, torch.tensor(mask, dtype=torch.bool)).tolist() == got.tolist()


def test_valid_positions_without_mask_and_tiny_lengths() -> None:
    assert valid_positions(torch.zeros(2, 4, dtype=torch.long)).sum().item() == 6
    assert not valid_positions(torch.zeros(3, 1, dtype=torch.long)).any()
    assert valid_positions(torch.zeros(2, 0, dtype=torch.long)).shape == (2, 0)


@pytest.mark.parametrize(
    ("ids", "mask", "error", "message"),
    [
        ([[1, 2]], None, TypeError, "input_ids: expected a torch.Tensor, got list"),
        (torch.ones(4), None, ValueError, "input_ids: expected a 2-D tensor of shape (B, T)"),
        (
            torch.ones(2, 3),
            torch.ones(2, 4),
            ValueError,
            "input_ids and attention_mask: expected the same shape, got (2, 3) and (2, 4)",
        ),
        (
            torch.ones(2, 3),
            torch.full((2, 3), 2),
            ValueError,
            "attention_mask: expected a bool or 0/1 tensor, got 6 value(s) other than 0 and 1",
        ),
    ],
)
def test_valid_positions_validation(ids, mask, error, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=re.escape(message)):
        valid_positions(ids, mask)


# --------------------------------------------------------------------------- sampler basics


def _ragged_mask(seed: int = 0, batch: int = 6, steps: int = 20) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, steps + 1, (batch,), generator=g)
    real = (torch.arange(steps)[None, :] < lengths[:, None]).long()
    return valid_positions(torch.zeros(batch, steps, dtype=torch.long), real)


def _check_output(out: torch.Tensor, valid: torch.Tensor, expected_n: int) -> None:
    assert out.dtype == torch.int64 and out.shape == (expected_n, 2)
    rows = [tuple(r) for r in out.tolist()]
    assert rows == sorted(rows), "sorted by batch, then t"
    assert len(set(rows)) == len(rows), "without replacement"
    assert all(valid[b, t] for b, t in rows), "valid positions only"


@pytest.mark.parametrize("stratify", [False, True])
def test_sample_is_a_sorted_subset_without_replacement(stratify: bool) -> None:
    valid = _ragged_mask()
    entropy = torch.rand(valid.shape, generator=torch.Generator().manual_seed(1))
    sampler = TokenSampler(max_tokens=10, stratify_by_entropy=stratify)
    for _ in range(20):
        out = sampler.sample(valid, entropy=entropy if stratify else None)
        _check_output(out, valid, min(10, int(valid.sum())))


def test_all_positions_when_fewer_than_max_tokens() -> None:
    valid = _ragged_mask()
    out = TokenSampler(max_tokens=10_000).sample(valid)
    assert out.tolist() == valid.nonzero().tolist()
    empty = TokenSampler(max_tokens=5).sample(torch.zeros(3, 4, dtype=torch.bool))
    assert empty.shape == (0, 2) and empty.dtype == torch.int64


def test_deterministic_given_seed_and_call_count() -> None:
    valid = _ragged_mask()
    a, b, c = TokenSampler(8, seed=3), TokenSampler(8, seed=3), TokenSampler(8, seed=4)
    outs_a = [a.sample(valid) for _ in range(5)]
    outs_b = [b.sample(valid) for _ in range(5)]
    outs_c = [c.sample(valid) for _ in range(5)]
    assert all(torch.equal(x, y) for x, y in zip(outs_a, outs_b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(outs_a, outs_c, strict=True))
    assert len({tuple(map(tuple, o.tolist())) for o in outs_a}) > 1, "calls differ"


def test_call_k_does_not_depend_on_earlier_inputs() -> None:
    a, b = TokenSampler(8, seed=5), TokenSampler(8, seed=5)
    a.sample(_ragged_mask(1))
    b.sample(torch.ones(50, 50, dtype=torch.bool))  # consumes different randomness
    valid = _ragged_mask(2)
    assert torch.equal(a.sample(valid), b.sample(valid))


def test_global_rng_states_are_untouched() -> None:
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    before = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    valid = _ragged_mask(3, batch=16, steps=64)
    entropy = torch.linspace(0, 1, valid.numel()).reshape(valid.shape)
    for sampler in (
        TokenSampler(7),
        TokenSampler(7, max_sequences=3),
        TokenSampler(9, stratify_by_entropy=True, n_strata=3, max_sequences=5),
    ):
        for _ in range(3):
            sampler.sample(valid, entropy=entropy if sampler.stratify_by_entropy else None)
        sampler.load_state_dict(sampler.state_dict())
    valid_positions(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3))
    after = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    assert torch.equal(before[0], after[0])
    assert before[1][0] == after[1][0] and np.array_equal(before[1][1], after[1][1])
    assert before[1][2:] == after[1][2:]
    assert before[2] == after[2]


def test_uniform_over_valid_positions() -> None:
    valid = torch.zeros(4, 12, dtype=torch.bool)
    valid[:, 1:11] = True  # 40 valid positions
    sampler = TokenSampler(max_tokens=5, seed=11)
    calls = 2000
    counts: Counter[tuple[int, int]] = Counter()
    for _ in range(calls):
        counts.update(map(tuple, sampler.sample(valid).tolist()))
    observed = np.array([counts[(b, t)] for b, t in valid.nonzero().tolist()])
    assert observed.sum() == 5 * calls and len(counts) == 40
    expected = 5 * calls / 40
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    # seeded, so fixed; the threshold is the 0.999 quantile of chi-square(39)
    assert chi2 < sps.chi2.ppf(0.999, df=39), chi2


def test_max_sequences_limits_and_spreads_the_sequences() -> None:
    valid = _ragged_mask(4, batch=10, steps=16)
    rows_with_tokens = set(valid.any(1).nonzero().squeeze(1).tolist())
    assert len(rows_with_tokens) > 3
    # a large token budget: every valid position of exactly two chosen rows
    everything = TokenSampler(max_tokens=1000, max_sequences=2, seed=1)
    seen: set[int] = set()
    for _ in range(100):
        out = everything.sample(valid)
        rows = sorted(set(out[:, 0].tolist()))
        assert len(rows) == 2 and set(rows) <= rows_with_tokens
        expected = [[b, t] for b, t in valid.nonzero().tolist() if b in rows]
        assert out.tolist() == expected
        seen |= set(rows)
    assert seen == rows_with_tokens, "every sequence with valid positions gets chosen"
    # a small budget: at most two rows, max_tokens positions
    small = TokenSampler(max_tokens=3, max_sequences=2, seed=1)
    for _ in range(20):
        out = small.sample(valid)
        assert len(set(out[:, 0].tolist())) <= 2
        _check_output(out, valid, 3)


# --------------------------------------------------------------------------- stratification


def _quantile_stratum(entropy_values: torch.Tensor, n_strata: int) -> dict[float, int]:
    order = sorted(entropy_values.tolist())
    return {v: i * n_strata // len(order) for i, v in enumerate(order)}


@pytest.mark.parametrize(("max_tokens", "n_strata"), [(8, 4), (10, 4), (6, 3), (12, 5)])
def test_stratified_takes_an_equal_share_of_each_quantile(max_tokens: int, n_strata: int) -> None:
    g = torch.Generator().manual_seed(max_tokens)
    valid = torch.ones(5, 40, dtype=torch.bool)
    valid[:, -1] = False
    entropy = torch.rand(5, 40, generator=g)  # distinct values
    stratum_of = _quantile_stratum(entropy[valid], n_strata)
    sampler = TokenSampler(max_tokens, stratify_by_entropy=True, n_strata=n_strata, seed=2)
    for _ in range(10):
        out = sampler.sample(valid, entropy=entropy)
        per_stratum = Counter(stratum_of[entropy[b, t].item()] for b, t in out.tolist())
        share = max_tokens // n_strata
        assert sorted(per_stratum) == list(range(n_strata))
        assert all(share <= c <= share + 1 for c in per_stratum.values()), per_stratum


def test_stratified_reaches_low_and_high_entropy_tails() -> None:
    # 1 high-entropy position among 200: uniform sampling of 4 rarely sees it
    valid = torch.ones(1, 201, dtype=torch.bool)
    valid[0, -1] = False
    entropy = torch.zeros(1, 201)
    entropy[0, :200] = torch.linspace(0, 1, 200)
    sampler = TokenSampler(4, stratify_by_entropy=True, n_strata=4, seed=0)
    for _ in range(20):
        t = sampler.sample(valid, entropy=entropy)[:, 1]
        assert ((t < 50).sum(), ((t >= 50) & (t < 100)).sum()) == (1, 1)
        assert (((t >= 100) & (t < 150)).sum(), (t >= 150).sum()) == (1, 1)


def test_stratified_with_small_strata_redistributes() -> None:
    valid = torch.tensor([[True] * 5 + [False]])
    entropy = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5, 0.0]])
    sampler = TokenSampler(4, stratify_by_entropy=True, n_strata=8, seed=0)
    for _ in range(5):
        _check_output(sampler.sample(valid, entropy=entropy), valid, 4)


def test_stratified_tolerates_nan_and_bf16_entropy() -> None:
    valid = torch.ones(2, 30, dtype=torch.bool)
    entropy = torch.rand(2, 30, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    entropy[0, :5] = float("nan")
    out = TokenSampler(8, stratify_by_entropy=True).sample(valid, entropy=entropy)
    _check_output(out, valid, 8)


# --------------------------------------------------------------------------- state and validation


def test_state_dict_round_trip_resumes_the_same_draws() -> None:
    valid = _ragged_mask(6, batch=8, steps=32)
    entropy = torch.rand(valid.shape, generator=torch.Generator().manual_seed(6))
    original = TokenSampler(9, stratify_by_entropy=True, max_sequences=4, seed=21)
    for _ in range(3):
        original.sample(valid, entropy=entropy)
    state = original.state_dict()
    assert state == {"seed": 21, "calls": 3}
    resumed = TokenSampler(9, stratify_by_entropy=True, max_sequences=4, seed=0)
    resumed.load_state_dict(dict(state))
    for _ in range(3):
        assert torch.equal(
            resumed.sample(valid, entropy=entropy), original.sample(valid, entropy=entropy)
        )
    assert resumed.calls == original.calls == 6


@pytest.mark.parametrize(
    ("state", "error", "message"),
    [
        ({"seed": 1}, ValueError, "state: expected a mapping with keys ['calls', 'seed']"),
        ({"seed": 1, "calls": 0, "x": 1}, ValueError, "got ['calls', 'seed', 'x']"),
        ([1, 2], ValueError, "from TokenSampler.state_dict(), got list"),
        ({"seed": 1, "calls": -1}, ValueError, "state['calls']: expected an int >= 0, got -1"),
        ({"seed": "1", "calls": 0}, TypeError, "state['seed']: expected an int >= 0, got str '1'"),
    ],
)
def test_load_state_dict_validation(state, error, message) -> None:  # type: ignore[no-untyped-def]
    sampler = TokenSampler(4, seed=9)
    with pytest.raises(error, match=re.escape(message)):
        sampler.load_state_dict(state)
    assert sampler.state_dict() == {"seed": 9, "calls": 0}, "a rejected state changes nothing"


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"max_tokens": 0}, ValueError, "max_tokens: expected an int >= 1, got 0"),
        ({"max_tokens": -3}, ValueError, "max_tokens: expected an int >= 1, got -3"),
        ({"max_tokens": 2.5}, TypeError, "max_tokens: expected an int >= 1, got float 2.5"),
        ({"max_tokens": True}, TypeError, "max_tokens: expected an int >= 1, got bool True"),
        ({"max_sequences": 0}, ValueError, "max_sequences: expected an int >= 1, got 0"),
        ({"n_strata": 0}, ValueError, "n_strata: expected an int >= 1, got 0"),
        ({"seed": -1}, ValueError, "seed: expected an int >= 0, got -1"),
        ({"stratify_by_entropy": 1}, TypeError, "stratify_by_entropy: expected a bool, got int"),
    ],
)
def test_constructor_validation(kwargs, error, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=re.escape(message)):
        TokenSampler(**{"max_tokens": 4, **kwargs})


BOOL_2x2 = torch.ones(2, 2, dtype=torch.bool)


@pytest.mark.parametrize(
    ("stratify", "mask", "entropy", "error", "message"),
    [
        (
            False,
            torch.ones(5, dtype=torch.bool),
            None,
            ValueError,
            "valid_mask: expected a 2-D tensor of shape (B, T), got ndim=1",
        ),
        (False, torch.full((2, 2), 3), None, ValueError, "valid_mask: expected a bool or 0/1"),
        (
            True,
            BOOL_2x2,
            None,
            ValueError,
            "entropy: expected a (B, T) tensor because stratify_by_entropy=True, got None",
        ),
        (
            False,
            BOOL_2x2,
            torch.ones(2, 2),
            ValueError,
            "entropy: only used with stratify_by_entropy=True",
        ),
        (
            True,
            BOOL_2x2,
            torch.ones(2, 3),
            ValueError,
            "valid_mask and entropy: expected the same shape, got (2, 2) and (2, 3)",
        ),
        (
            True,
            BOOL_2x2,
            torch.ones(2, 2, dtype=torch.long),
            TypeError,
            "entropy: expected a floating-point tensor",
        ),
    ],
)
def test_sample_validation(stratify, mask, entropy, error, message) -> None:  # type: ignore[no-untyped-def]
    sampler = TokenSampler(4, stratify_by_entropy=stratify)
    with pytest.raises(error, match=re.escape(message)):
        sampler.sample(mask, entropy=entropy)
    assert sampler.calls == 0, "a rejected call does not advance the draws"
