"""The probe on sharded models (2 CPU processes, gloo) equals the unsharded model's.

FSDP2 (``fully_shard`` on every block and the root) and DeepSpeed ZeRO-3: each
rank probes the same batch; entropies and norms must equal the unsharded
model's on the same weights, parameters must be sharded again afterwards, and
no ``.grad`` may be created or changed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from inversion_monitor.probe.gradients import logit_gradient_norms
from inversion_monitor.rl.corrpo import sequence_inversion
from inversion_monitor.toy.models import tiny_causal_lm
from tests.dist_runs import spawn_ranks
from tests.server_support import free_port

RTOL = 1e-4
WORLD = 2
CASES: dict[str, dict[str, Any]] = {
    "general": {"layers": [0, -1]},
    "rank_one": {"projections": ("q", "o")},
}


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(4, 100, (2, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    return ids, mask


def _measure(model: torch.nn.Module) -> dict[str, Any]:
    ids, mask = _batch()
    out: dict[str, Any] = {}
    for name, kwargs in CASES.items():
        result = logit_gradient_norms(model, ids, attention_mask=mask, **kwargs)
        out[name] = {"entropy": result.entropy, "norms": result.norms}
    completion = torch.zeros_like(ids)
    completion[:, 3:] = 1
    out["rho"] = sequence_inversion(
        model, ids, attention_mask=mask, completion_mask=completion, min_tokens=4
    ).rho
    return out


def _compare(got: dict[str, Any], expected: dict[str, Any]) -> None:
    for name in CASES:
        torch.testing.assert_close(
            got[name]["entropy"], expected[name]["entropy"], rtol=RTOL, atol=1e-6
        )
        assert sorted(got[name]["norms"]) == sorted(expected[name]["norms"])
        for component, values in expected[name]["norms"].items():
            torch.testing.assert_close(got[name]["norms"][component], values, rtol=RTOL, atol=1e-6)
    torch.testing.assert_close(got["rho"], expected["rho"], rtol=RTOL, atol=1e-6)


def _fsdp2_rank(rank: int, store: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        model = tiny_causal_lm("llama", num_layers=2)
        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model)
        # a training backward first, so there are sharded .grad to leave untouched
        ids, mask = _batch()
        model.train()
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        grads = {n: p.grad.to_local().clone() for n, p in model.named_parameters()}
        result = _measure(model)
        assert model.training, "the probe must restore the training mode"
        assert all(isinstance(p, DTensor) for p in model.parameters()), "left unsharded"
        for name, param in model.named_parameters():
            assert param.grad is not None and torch.equal(param.grad.to_local(), grads[name])
        # training goes on after the probe
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _zero3_rank(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(
        DS_ACCELERATOR="cpu",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
    )
    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo")
    from deepspeed.utils import safe_get_local_grad

    try:
        model = tiny_causal_lm("llama", num_layers=2)
        config = {
            "train_micro_batch_size_per_gpu": 2,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            # lr 0: the weights stay those of the unsharded model the results are compared with
            "optimizer": {
                "type": "AdamW",
                "params": {"lr": 0.0, "weight_decay": 0.0, "torch_adam": True},
            },
        }
        engine, *_ = deepspeed.initialize(
            model=model, model_parameters=model.parameters(), config=config
        )
        assert all(p.numel() == 0 for p in engine.module.parameters())
        ids, mask = _batch()
        for _ in range(2):  # a full step first, so ZeRO-3 has recorded its fetch order
            engine.backward(engine(input_ids=ids, attention_mask=mask, labels=ids).loss)
            if _ == 0:
                engine.step()
        # probe between backward and optimizer step: the gradient partitions stay as they were
        params = list(engine.module.parameters())
        grads = [safe_get_local_grad(p).clone() for p in params]
        result = _measure(engine)
        gathered = [n for n, p in engine.module.named_parameters() if p.numel()]
        assert not gathered, f"parameters left gathered after the probe: {gathered}"
        assert all(p.grad is None for p in params)
        for param, grad in zip(params, grads, strict=True):
            assert torch.equal(safe_get_local_grad(param), grad)
        engine.step()
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def unsharded() -> dict[str, Any]:
    return _measure(tiny_causal_lm("llama", num_layers=2))


def _results(out_dir: Path) -> list[dict[str, Any]]:
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


def test_fsdp2_probe_equals_unsharded(unsharded, tmp_path):
    spawn_ranks(_fsdp2_rank, (str(tmp_path / "store"), str(tmp_path)))
    for got in _results(tmp_path):
        _compare(got, unsharded)


@pytest.mark.usefixtures("deepspeed_ops")
def test_deepspeed_zero3_probe_equals_unsharded(unsharded, tmp_path):
    spawn_ranks(_zero3_rank, (free_port(), str(tmp_path)))
    for got in _results(tmp_path):
        _compare(got, unsharded)
