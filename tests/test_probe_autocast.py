"""The probe under autocast (CPU bf16): the model's forward under the training forward's
autocast, the factor math in fp32/fp64, equal to the brute force under the same autocast.

Tolerance (bf16 unit roundoff u = 2**-8). The brute force
(:func:`~inversion_monitor.probe.reference.reference_norms`) takes each weight
gradient from autograd, which under autocast multiplies the bf16 output gradients
by the bf16 inputs and rounds every entry of ``G`` (``a x b``) to bf16: ``G + E``
with ``|E_ij| <= u |G_ij|``. Its nuclear norm moves by at most
``||E||_* <= sqrt(min(a, b)) ||E||_F <= sqrt(min(a, b)) u ||G||_F <= sqrt(min(a, b)) u
||G||_*`` (the condition measure is ``sqrt(min(a, b)) ||G||_F / ||G||_*``, at most
``sqrt(min(a, b))``). The probe forms no ``G``: its factors are the same autocast
activations and output gradients, which differ from the brute force's by the
rounding of ops that ran on other shapes (a few u relative to the component's
largest value over the targets). So, per target and component,
``|probe - reference| <= (sqrt(min(a, b)) + 2) u reference + u max(reference)``.
Measured on the four families below (3 layers, d 64): at most 0.23 of that bound,
relative error at most 1.3e-2 (targets above a tenth of the component's largest);
against the fp32 probe at most 1e-2 (median 2e-3): bf16 rounds to 2**-8 relative.
fp16 autocast: the same bound with u = 2**-11 (measured relative error at most 1.5e-3).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from inversion_monitor.probe.architectures import resolve_model
from inversion_monitor.probe.gradients import ProbeResult, logit_gradient_norms
from inversion_monitor.probe.precision import ProbePrecision
from inversion_monitor.probe.prefix_capture import PrefixCapture
from inversion_monitor.probe.reference import reference_norms
from inversion_monitor.toy.models import tiny_causal_lm

U = 2.0**-8  # bf16 unit roundoff
IDS = torch.randint(4, 100, (2, 16), generator=torch.Generator().manual_seed(0))


def _width(module: torch.nn.Module, columns: torch.Tensor | None) -> tuple[int, int]:
    """(out, in) of a projection's own block of its weight."""
    weight = module.weight
    out, inp = weight.shape if type(module).__name__ != "Conv1D" else weight.shape[::-1]
    return (out if columns is None else int(columns.numel())), int(inp)


def assert_within_bf16_bound(
    model: torch.nn.Module, got: ProbeResult, ref: ProbeResult, unit: float = U
) -> float:
    """The module docstring's bound (``unit``: the autocast dtype's unit roundoff), per
    target and component; returns the worst fraction."""
    resolved = resolve_model(model)
    worst = 0.0
    for component, expected in ref.norms.items():
        site = resolved.site(*component)
        a, b = _width(site.module, site.columns)
        bound = (math.sqrt(min(a, b)) + 2) * unit * expected + unit * expected.max()
        fraction = float(((got.norms[component] - expected).abs() / bound).max())
        assert fraction <= 1.0, (component, fraction)
        worst = max(worst, fraction)
    # entropy sums in fp32 from the same bf16 logits: a few fp32 roundings apart
    assert torch.allclose(got.entropy, ref.entropy, rtol=0, atol=1e-3)
    return worst


def _relative(got: ProbeResult, expected: ProbeResult) -> float:
    """Largest relative difference on targets above a tenth of the component's largest."""
    worst = 0.0
    for component, values in expected.norms.items():
        big = values > 0.1 * values.max()
        diff = (got.norms[component] - values).abs() / values
        worst = max(worst, float(diff[big].max()))
    return worst


class _DtypeLog(TorchDispatchMode):
    """Counts (op, dtype of its first tensor argument) of matmuls and dense solves."""

    _WATCHED = ("mm", "bmm", "addmm", "baddbmm", "linalg_qr", "linalg_eigh", "_linalg_eigh")

    def __init__(self) -> None:
        super().__init__()
        self.seen: Counter[tuple[str, torch.dtype]] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        if name in self._WATCHED and args and isinstance(args[0], torch.Tensor):
            self.seen[(name, args[0].dtype)] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gpt_neox"])
@pytest.mark.parametrize(
    ("layers", "path"), [([-1], "last_block"), ([0, -1], "general")], ids=["last", "deep"]
)
def test_autocast_probe_equals_the_autocast_brute_force(
    arch: str, layers: list[int], path: str
) -> None:
    model = tiny_causal_lm(arch, num_layers=3)  # type: ignore[arg-type]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as a custom loop calls it
        got = logit_gradient_norms(model, IDS, layers=layers)
        ref = reference_norms(model, IDS, layers=layers)
    assert got.precision == "bf16-autocast"
    assert set(got.paths.values()) == {path}
    assert_within_bf16_bound(model, got, ref)
    fp32 = logit_gradient_norms(model, IDS, layers=layers)
    assert fp32.precision == "fp32"
    assert _relative(got, fp32) <= 2e-2  # bf16 rounding, not another quantity


def test_rank_one_path_under_autocast_and_the_factor_math_stays_fp32() -> None:
    model = tiny_causal_lm("llama", num_layers=3)
    log = _DtypeLog()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with log:
            got = logit_gradient_norms(model, IDS, layers=[-1], projections=("q", "o"))
        ref = reference_norms(model, IDS, layers=[-1], projections=("q", "o"))
    assert set(got.paths.values()) == {"rank_one"}
    assert_within_bf16_bound(model, got, ref)
    assert log.seen[("mm", torch.bfloat16)] > 0  # the model's projections ran in bf16
    solves = {(op, dtype) for op, dtype in log.seen if op.startswith(("linalg", "_linalg"))}
    assert all(dtype in (torch.float32, torch.float64) for _, dtype in solves)


def test_factor_math_stays_fp32_on_the_gram_route() -> None:
    model = tiny_causal_lm("llama", num_layers=3)
    log = _DtypeLog()
    with torch.autocast("cpu", dtype=torch.bfloat16), log:
        logit_gradient_norms(model, IDS, layers=[0, -1], projections=("k", "v"))
    assert log.seen[("mm", torch.bfloat16)] > 0
    dense = {(op, dtype) for op, dtype in log.seen if dtype not in (torch.float32, torch.float64)}
    # bf16 only where the model's forward and its backward multiply (mm/bmm/addmm)
    assert {op for op, _ in dense} <= {"mm", "bmm", "addmm"}
    assert any(op.startswith(("linalg", "_linalg")) for op, _ in log.seen)


def test_captured_prefix_under_autocast_is_used_and_runs_under_its_autocast() -> None:
    model = tiny_causal_lm("qwen2", num_layers=3)
    capture = PrefixCapture(model, 0)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=IDS, labels=IDS).loss.backward()
    prefix = capture.latest
    assert prefix is not None
    assert prefix.precision == ProbePrecision("cpu", torch.bfloat16, True)
    # the probe runs after the autocast block (HF: before the optimizer step)
    got = logit_gradient_norms(model, IDS, layers=[0, -1], prefix=prefix)
    assert (got.prefix, got.precision) == ("captured", "bf16-autocast")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = reference_norms(model, IDS, layers=[0, -1])
    assert_within_bf16_bound(model, got, ref)
    recomputed = logit_gradient_norms(model, IDS, layers=[0, -1], precision=prefix.precision)
    assert recomputed.prefix == "recomputed"
    assert _relative(got, recomputed) <= 2e-2
    model.zero_grad(set_to_none=True)
    capture.remove()


def test_fp16_autocast_with_the_fp16_unit_roundoff() -> None:
    model = tiny_causal_lm("llama", num_layers=3)
    with torch.autocast("cpu", dtype=torch.float16):
        got = logit_gradient_norms(model, IDS, layers=[0, -1])
        ref = reference_norms(model, IDS, layers=[0, -1])
    assert got.precision == "fp16-autocast"
    assert_within_bf16_bound(model, got, ref, unit=2.0**-11)  # fp16: 10 fraction bits


def test_bf16_parameters_without_autocast_say_bf16() -> None:
    model = tiny_causal_lm("llama", num_layers=2).to(torch.bfloat16)
    got = logit_gradient_norms(model, IDS, layers=[-1])
    assert got.precision == "bf16"
    assert bool(torch.isfinite(got.score).all())


@pytest.mark.parametrize("autocast", [True, False], ids=["bf16-autocast", "fp32"])
def test_the_tail_check_allows_the_rounding_of_the_compute_precision(
    autocast: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first probe of a block checks the targets' rows alone against the whole forward.
    Under autocast the logits come out fp32 but were computed in bf16, and on a GPU one
    row's and every row's matmuls round differently (on the CPU they agree bit for bit):
    a difference of that size (3e-3 here) keeps the block under autocast and refuses it
    in fp32, where it would mean something besides the attention mixes positions."""
    import contextlib
    import dataclasses

    from inversion_monitor.probe import last_block

    forward_rows = last_block.forward_rows

    @contextlib.contextmanager
    def rounded(*args: Any, **kwargs: Any) -> Any:
        with forward_rows(*args, **kwargs) as out:
            yield dataclasses.replace(out, target_logits=out.target_logits * (1 + 3e-3))

    monkeypatch.setattr(last_block, "forward_rows", rounded)
    model = tiny_causal_lm("qwen2", num_layers=2, seed=7)
    ids = torch.randint(4, 100, (2, 24), generator=torch.Generator().manual_seed(7))
    positions = torch.tensor([[0, 5], [0, 17], [1, 3], [1, 20]])
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with context:
        result = logit_gradient_norms(model, ids, positions=positions)
    last = resolve_model(model).num_layers - 1
    paths = {p for (layer, _), p in result.paths.items() if layer == last}
    assert paths == ({"last_block"} if autocast else {"general"}), paths
