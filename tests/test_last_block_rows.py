"""The last-block probe in ranges of rows: past :data:`MAX_FORWARD_ROWS_BYTES` of their
hidden states, rows go through the forward over every position a range at a time."""

from __future__ import annotations

import torch

from inversion_monitor.probe import attention_replay, key_value_norms, last_block
from inversion_monitor.probe.gradients import logit_gradient_norms
from inversion_monitor.probe.op_counts import OpCounter
from inversion_monitor.toy.models import tiny_causal_lm
from tests.test_last_block import _compare, _probe_with_prefix
from tests.test_probe import batch
from tests.test_probe_counts import _captured


def _passes(monkeypatch):
    """Each call ``last_block_norms`` makes of itself (one per range of rows, each one forward
    over every position; a block's first probe also one for its cut): its plan's rows, its
    targets' rows and its prefix's storage."""
    passes, probe = [], last_block.last_block_norms

    def spy(*args, **kwargs):
        plan = kwargs["plan"]  # a range of rows: views, the prefix's own storage
        held = None if plan.prefix is None else plan.prefix.hidden.untyped_storage().data_ptr()
        rows = torch.unique(kwargs["targets"][:, 0]).tolist()
        passes.append((plan.input_ids.shape[0], rows, held))
        return probe(*args, **kwargs)

    monkeypatch.setattr(last_block, "last_block_norms", spy)
    return passes


def test_rows_past_the_forward_budget_go_through_in_ranges(monkeypatch):
    # one row per range (the budget at its least), recomputed from the embeddings with left
    # padding: each range's forward covers its rows alone, and the norms equal the reference
    passes = _passes(monkeypatch)
    monkeypatch.setattr(last_block, "MAX_FORWARD_ROWS_BYTES", 1)
    _compare(tiny_causal_lm("llama", num_layers=2, seed=1), left=True)
    rows = batch(0)[0].shape[0]
    assert passes[-rows:] == [(1, [0], None)] * rows, passes


def test_rows_in_ranges_hold_one_ranges_forward_at_a_time(monkeypatch):
    # fed from a captured prefix with the chunks at their least, so the forward over every
    # position is the peak: four rows in ranges of one give the one pass's norms and hold
    # a range's forward at a time (measured 1.9x the prefix's bytes against 6.1x)
    monkeypatch.setattr(attention_replay, "_MAX_REPLAY_ELEMENTS", 1)
    monkeypatch.setattr(key_value_norms, "_MAX_COTANGENT_ELEMENTS", 1)
    ids = torch.randint(4, 100, (4, 1024), generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([[0, 5], [0, 1000], [1, 40], [2, 600], [3, 1020], [3, 7]])
    model = tiny_causal_lm("llama", num_layers=2, seed=3)
    whole, (_, whole_peak), size = _probe_with_prefix(model, ids, positions)
    passes = _passes(monkeypatch)
    monkeypatch.setattr(last_block, "MAX_FORWARD_ROWS_BYTES", size // 4)  # one row's
    model = tiny_causal_lm("llama", num_layers=2, seed=3)
    ranged, (_, peak), _ = _probe_with_prefix(model, ids, positions)
    assert [(n, rows) for n, rows, _ in passes[-4:]] == [(1, [0])] * 4, passes
    assert len({held for *_, held in passes}) == 1  # every range a view of one prefix
    for component, value in whole.norms.items():
        torch.testing.assert_close(ranged.norms[component], value, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(ranged.entropy, whole.entropy, rtol=1e-6, atol=0.0)
    assert peak <= 0.4 * whole_peak, (peak, whole_peak, size)


def _ranged_syncs(monkeypatch, rows: int) -> int:
    """Host syncs of a later captured-prefix probe of ``rows`` rows, one row a range, with
    targets in rows 0 and 1 only (the other ranges have none)."""
    ids = torch.randint(4, 100, (rows, 256), generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([[0, 5], [0, 200], [1, 40], [1, 250]])
    model = tiny_causal_lm("llama", num_layers=2, seed=3)
    monkeypatch.setattr(last_block, "MAX_FORWARD_ROWS_BYTES", 1)
    with _captured(model, ids) as prefix:
        for _ in range(2):  # a block's first probe runs its one-time checks; count the next
            with OpCounter() as counter:
                fast = logit_gradient_norms(model, ids, positions=positions, prefix=prefix)
    assert set(fast.paths.values()) == {"last_block"}
    return counter.syncs


def test_ranges_without_targets_cost_no_sync(monkeypatch):
    # the ranges' targets are found together: eight rows in ranges of one, six of them
    # without a target, sync as often as two rows (a sync per range before: 6 more)
    assert _ranged_syncs(monkeypatch, 8) == _ranged_syncs(monkeypatch, 2)
