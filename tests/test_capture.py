"""BatchCapture / CapturedBatch: which forwards are captured and which positions are probed."""

from __future__ import annotations

import pytest
import torch

from inversion_monitor import logit_gradient_norms
from inversion_monitor.config import MonitorConfig
from inversion_monitor.engine.training_monitor import InversionMonitor
from inversion_monitor.probe.capture import IGNORE_INDEX, BatchCapture, CapturedBatch
from inversion_monitor.toy.models import tiny_causal_lm


def reference_mask(
    ids: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    keep: int | None = None,
    labels: torch.Tensor | None = None,
    shift_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Brute force: t is a target iff t, t+1 real, t in the kept tail, label of t not ignored."""
    batch, length = ids.shape
    out = torch.zeros(batch, length, dtype=torch.bool)
    for b in range(batch):
        for t in range(length - 1):
            ok = mask is None or (bool(mask[b, t]) and bool(mask[b, t + 1]))
            ok = ok and (keep is None or t >= length - keep)
            ok = ok and (labels is None or int(labels[b, t + 1]) != IGNORE_INDEX)
            ok = ok and (shift_labels is None or int(shift_labels[b, t]) != IGNORE_INDEX)
            out[b, t] = ok
    return out


@pytest.mark.parametrize("seed", range(6))
def test_target_mask_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    batch, length = 3, 11
    ids = torch.randint(4, 50, (batch, length), generator=g)
    lengths = torch.randint(2, length + 1, (batch,), generator=g)
    columns = torch.arange(length)
    mask = (columns < lengths[:, None]).long()
    if seed % 2:  # left padding, as GRPO's prompts
        mask = mask.flip(1)
    labels = ids.masked_fill(torch.rand(batch, length, generator=g) < 0.3, IGNORE_INDEX)
    shift = ids.masked_fill(torch.rand(batch, length, generator=g) < 0.3, IGNORE_INDEX)
    keep = int(torch.randint(1, length + 2, (1,), generator=g))
    cases = [
        ({}, {}),
        ({"labels": labels}, {"labels": labels}),
        ({"shift_labels": shift}, {"shift_labels": shift}),
        ({"logits_to_keep": keep, "labels": labels}, {"keep": keep, "labels": labels}),
    ]
    for fields, reference in cases:
        for m in (mask, None):
            got = CapturedBatch(ids, m, **fields).target_mask()  # type: ignore[arg-type]
            assert torch.equal(got, reference_mask(ids, m, **reference)), (fields, m)


def test_grpo_style_labels_select_completion_predictions():
    # TRL 1.16 GRPO: labels = ids with padding and the prompt set to -100
    prompt = torch.tensor([[0, 0, 1, 9], [1, 8, 9, 9]])
    prompt_mask = (prompt != 0).long()
    completion = torch.tensor([[5, 6, 2, 0], [7, 2, 0, 0]])
    completion_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    ids = torch.cat([prompt, completion], 1)
    mask = torch.cat([prompt_mask, completion_mask], 1)
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[:, : -completion.shape[1]] = IGNORE_INDEX
    got = CapturedBatch(ids, mask, labels=labels).target_mask().nonzero().tolist()
    # position t predicts token t + 1: the last prompt token predicts the first completion token
    assert got == [[0, 3], [0, 4], [0, 5], [1, 3], [1, 4]]


def packed_batch() -> tuple[CapturedBatch, list[list[int]]]:
    docs = [[1, 5, 6, 7, 2], [1, 8, 2], [1], [1, 9, 10, 11, 12, 2]]
    ids = torch.tensor([[token for doc in docs for token in doc]])
    position_ids = torch.cat([torch.arange(len(d)) for d in docs])[None]
    labels = ids.clone()
    labels[position_ids == 0] = IGNORE_INDEX  # as TRL's padding-free collator
    return CapturedBatch(ids, None, labels=labels, position_ids=position_ids), docs


def test_packed_documents_never_predict_across_a_boundary():
    batch, docs = packed_batch()
    assert batch.packed
    expected = []
    start = 0
    for doc in docs:
        expected += [[0, start + t] for t in range(len(doc) - 1)]
        start += len(doc)
    assert batch.target_mask().nonzero().tolist() == expected
    # an all-ones attention mask does not hide the packing: documents stay apart
    masked = CapturedBatch(
        batch.input_ids, torch.ones_like(batch.input_ids), None, None, None, batch.position_ids
    )
    assert masked.packed
    assert masked.target_mask().nonzero().tolist() == expected


def test_unpacked_gives_one_padded_row_per_document():
    batch, docs = packed_batch()
    rows = batch.unpacked()
    kept = [d for d in docs if len(d) > 1]  # a 1-token document has no target
    assert rows.input_ids.shape == (len(kept), max(map(len, kept)))
    assert rows.attention_mask is not None
    for r, doc in enumerate(kept):
        assert rows.input_ids[r, : len(doc)].tolist() == doc
        assert rows.attention_mask[r].tolist() == [1] * len(doc) + [0] * (
            rows.input_ids.shape[1] - len(doc)
        )
    assert int(rows.target_mask().sum()) == int(batch.target_mask().sum())
    plain = CapturedBatch(torch.tensor([[1, 2, 3]]), None, position_ids=torch.tensor([[0, 1, 2]]))
    assert plain.unpacked() is plain


def test_unpacked_documents_keep_their_position_ids():
    ids = torch.tensor([[1, 5, 6, 1, 7, 8]])
    batch = CapturedBatch(ids, None, position_ids=torch.tensor([[0, 1, 2, 4, 5, 6]]))
    rows = batch.unpacked()
    assert rows.position_ids is not None
    assert rows.position_ids.tolist() == [[0, 1, 2], [4, 5, 6]]


class _VisionLanguageToy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)

    def forward(self, input_ids, pixel_values=None):
        return self.embed(input_ids)


def test_multimodal_training_forward_is_not_captured():
    model = _VisionLanguageToy().train()
    capture = BatchCapture(model)
    ids = torch.ones(1, 4, dtype=torch.long)
    model(input_ids=ids)
    assert capture.latest is not None
    model(input_ids=ids, pixel_values=torch.zeros(1, 3, 4, 4))
    assert capture.latest is None  # never probe a stale or image-less view of it
    assert "pixel_values" in str(capture.skipped_reason)
    capture.remove()


def test_generation_in_training_mode_is_not_captured():
    # GRPO generates with the model in training mode under no_grad
    model = tiny_causal_lm("llama").train()
    capture = BatchCapture(model)
    ids = torch.randint(4, 90, (2, 10), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    model(input_ids=ids, labels=labels)
    with torch.no_grad():
        model.generate(input_ids=ids[:, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert capture.latest is not None
    assert capture.latest.input_ids is ids and capture.latest.labels is labels
    model.eval()
    model(input_ids=ids[:, :5])  # evaluation: not captured either
    assert capture.latest.input_ids is ids
    capture.remove()


def test_labels_of_another_shape_are_ignored():
    model = tiny_causal_lm("llama").train()
    capture = BatchCapture(model)
    ids = torch.randint(4, 90, (2, 6), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(6)[None]
    model(input_ids=ids, position_ids=pos)
    assert capture.latest is not None and capture.latest.labels is None
    assert capture.latest.position_ids is not None  # a [1, T] position_ids is broadcast
    assert capture.latest.position_ids.shape == ids.shape
    capture.remove()


@pytest.mark.parametrize("with_mask", [False, True], ids=["no-mask", "all-ones-mask"])
def test_monitor_probes_packed_documents_like_separate_sequences(with_mask):
    model = tiny_causal_lm("llama", seed=3).train()
    monitor = InversionMonitor(MonitorConfig(every_n_steps=1, tokens_per_probe=64, layers=[0, -1]))
    monitor.attach(model)
    batch, docs = packed_batch()
    assert batch.position_ids is not None
    mask = torch.ones_like(batch.input_ids) if with_mask else None
    model(
        input_ids=batch.input_ids,
        attention_mask=mask,
        position_ids=batch.position_ids,
        labels=batch.labels,
    )
    metrics = monitor.step_end(1, model)
    assert metrics is not None and metrics["inversion/n"] == sum(len(d) - 1 for d in docs)
    result, rows = monitor.last_result, monitor.last_batch
    assert result is not None and rows is not None and rows.attention_mask is not None
    for index, (row, t) in enumerate(result.positions.tolist()):
        doc = rows.input_ids[row : row + 1, : int(rows.attention_mask[row].sum())]
        alone = logit_gradient_norms(model, doc, positions=torch.tensor([[0, t]]), layers=[0, -1])
        torch.testing.assert_close(alone.entropy[0], result.entropy[index])
        torch.testing.assert_close(alone.score[0], result.score[index], rtol=1e-4, atol=1e-6)
    # the same targets probed on the packed row would attend across documents: values differ
    crossed = logit_gradient_norms(
        model, batch.input_ids, positions=batch.target_mask().nonzero(), layers=[0, -1]
    )
    assert not torch.allclose(crossed.entropy, result.entropy)
    monitor.close()


def test_monitor_with_no_scored_position_reports_an_insufficient_sample():
    model = tiny_causal_lm("llama").train()
    monitor = InversionMonitor(MonitorConfig(every_n_steps=1))
    monitor.attach(model)
    batch, _ = packed_batch()
    labels = torch.full_like(batch.input_ids, IGNORE_INDEX)
    model(input_ids=batch.input_ids, position_ids=batch.position_ids, labels=labels)
    metrics = monitor.step_end(1, model)
    assert metrics is not None
    assert metrics["inversion/n"] == 0 and metrics["inversion/insufficient"] == 1
    monitor.close()
