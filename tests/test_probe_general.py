"""The batched general path: its bucket plan, its VJP, and its values against brute force."""

from __future__ import annotations

import pytest
import torch

from inversion_monitor.metrics.norms import input_factor, outer_sum_norm, prefix_norms
from inversion_monitor.probe.gradients import logit_gradient_norms
from inversion_monitor.probe.reference import reference_norms
from inversion_monitor.probe.rows import _batched_backward, plan_buckets


def random_targets(seed: int, sequences: int = 5, length: int = 40, count: int = 60):
    gen = torch.Generator().manual_seed(seed)
    flat = torch.randperm(sequences * (length - 1), generator=gen)[:count]
    return torch.stack([flat // (length - 1), flat % (length - 1)], dim=1)


@pytest.mark.parametrize("chunk_tokens", [1, 30, 120, 8192])
@pytest.mark.parametrize("max_rows", [1, 3, 4096])
def test_buckets_cover_every_target_once_within_the_budget(chunk_tokens, max_rows):
    targets = random_targets(chunk_tokens + max_rows)
    batches = plan_buckets(targets, chunk_tokens, max_rows)
    seen = torch.cat([b.index for b in batches]).sort().values
    assert torch.equal(seen, torch.arange(targets.shape[0]))
    for b in batches:
        members = targets[b.index]
        assert torch.equal(b.sequences[b.rows], members[:, 0])  # each target in its own row
        assert b.edge == int(members[:, 1].max()) + 1
        pairs = {(int(r), int(s)) for r, s in zip(b.rows, b.slots, strict=True)}
        assert len(pairs) == len(b.index)  # one target per (row, slot): rows never mix
        assert b.width == int(b.slots.max()) + 1
        if len(b.index) > 1:  # a lone target may exceed the budget, nothing else
            assert b.width * len(b.sequences) * b.edge <= chunk_tokens
            assert len(b.index) <= max_rows


def test_buckets_share_forwards_and_batch_backwards():
    targets = random_targets(0, sequences=4, length=256, count=64)
    batches = plan_buckets(targets, 8192, 4096)
    assert max(b.width for b in batches) > 1
    forward_tokens = sum(len(b.sequences) * b.edge for b in batches)
    assert forward_tokens < int((targets[:, 1] + 1).sum())  # fewer than one row per target


def padded_batch(seed: int, *, left: bool):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 100, (3, 20), generator=gen)
    mask = torch.ones_like(ids)
    if left:
        mask[1, :5] = 0
    else:
        mask[1, 15:] = 0
    ids[mask == 0] = 0
    return ids, mask


@pytest.mark.parametrize("chunk_tokens", [8192, 45])
@pytest.mark.parametrize("left", [False, True], ids=["right", "left"])
@pytest.mark.parametrize("norm", ["nuclear", "frobenius", "l1"])
def test_batched_general_path_equals_brute_force(make_model, chunk_tokens, left, norm):
    model = make_model("llama", num_layers=3, seed=11)
    ids, mask = padded_batch(12, left=left)
    kwargs = {"attention_mask": mask, "layers": [0, 1, -1], "norm": norm}
    fast = logit_gradient_norms(model, ids, chunk_tokens=chunk_tokens, **kwargs)
    assert set(fast.paths.values()) == {"general"}
    assert max(b.width for b in plan_buckets(fast.positions, chunk_tokens, 4096)) > 1
    ref = reference_norms(model, ids, **kwargs)
    for component, expected in ref.norms.items():
        torch.testing.assert_close(
            fast.norms[component], expected.float(), rtol=1e-4, atol=1e-6, msg=str(component)
        )
    torch.testing.assert_close(fast.entropy, ref.entropy.float(), rtol=1e-4, atol=1e-5)


def test_batched_backward_from_the_logits_when_the_head_input_is_not_seen():
    from inversion_monitor.probe.rows import Batch

    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(6, 6, generator=gen, requires_grad=True)
    head = torch.randn(9, 6, generator=gen)
    x = torch.randn(2, 5, 6, generator=gen)
    rows, t = torch.tensor([0, 0, 1]), torch.tensor([1, 4, 2])

    def graph() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        y = (x @ weight).tanh().cumsum(1)  # the probed output: later positions see earlier
        hidden = y[rows, t].unsqueeze(0)  # [1, n, d], as the head sees it
        z = (hidden @ head.T).tanh()[0, torch.arange(3), torch.tensor([2, 5, 7])]
        return z, hidden, y

    slots = torch.tensor([0, 1, 0])
    batch = Batch(
        edge=5,
        sequences=torch.tensor([0, 1]),
        index=torch.arange(3),
        rows=rows,
        slots=slots,
        width=2,
    )
    z, hidden, y = graph()
    via_head = _batched_backward(z, [hidden], [y], slots, batch)[0]
    z, _, y = graph()
    via_logits = _batched_backward(z, [], [y], slots, batch)[0]
    assert via_head is not None and via_logits is not None
    torch.testing.assert_close(via_head, via_logits)
    z, _, y = graph()
    for k in range(3):  # each target's gradient, read from its own row and slot
        (alone,) = torch.autograd.grad(z[k], y, retain_graph=True)
        torch.testing.assert_close(via_head[slots[k], rows[k]], alone[rows[k]])


@pytest.mark.parametrize("length, width", [(7, 12), (12, 5)], ids=["short", "long"])
@pytest.mark.parametrize("norm", ["nuclear", "frobenius"])
def test_prefix_norms_equal_the_per_prefix_norms(length, width, norm):
    gen = torch.Generator().manual_seed(length)
    x = torch.randn(length, width, generator=gen)
    gamma = torch.randn(6, length, 4, generator=gen)
    support = torch.tensor([1, 3, length, 3, length - 1, 2])
    got = prefix_norms(input_factor(x), gamma, support, norm)
    for k, m in enumerate(support.tolist()):
        g = gamma[k, :m].double().T @ x[:m].double()
        expected = torch.linalg.matrix_norm(g, ord="nuc" if norm == "nuclear" else "fro")
        torch.testing.assert_close(got[k].double(), expected, rtol=1e-5, atol=1e-6)
        per_row = outer_sum_norm(gamma[k : k + 1, :m], x[None, :m], norm)
        torch.testing.assert_close(got[k : k + 1], per_row, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="nuclear and Frobenius"):
        prefix_norms(input_factor(x), gamma, support, "l1")


@pytest.mark.parametrize("norm", ["nuclear", "frobenius"])
def test_rows_of_one_sequence_share_an_input_factor_only_where_their_inputs_agree(norm):
    from inversion_monitor.probe.rows import per_row_norms

    gen = torch.Generator().manual_seed(8)
    base = torch.randn(2, 9, 6, generator=gen)
    sequences = torch.tensor([0, 0, 0, 1, 1])
    support = torch.tensor([9, 4, 6, 3, 9])
    x = base[sequences].clone()
    x[1] += 1e-7 * torch.randn(9, 6, generator=gen)  # rounding: shares the factor
    x[2, 2] += 0.5  # a row whose forward saw other inputs: gets its own factor
    gamma = torch.randn(5, 9, 3, generator=gen)
    got = per_row_norms(gamma, x, sequences, support, norm)
    for k, m in enumerate(support.tolist()):
        g = gamma[k, :m].double().T @ x[k, :m].double()
        expected = torch.linalg.matrix_norm(g, ord="nuc" if norm == "nuclear" else "fro")
        torch.testing.assert_close(got[k].double(), expected, rtol=1e-5, atol=1e-6)
