"""The probe's small dense solves run on one CPU thread, and torch's thread count is restored.

Why: on a busy machine LAPACK's threads wait for each other inside every small solve
(``monitor/metrics/lapack.py``; ``benchmarks/bench_lapack_threads.py`` measures it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from inversion_monitor.metrics.lapack import eigenvalues, one_thread, qr_factor
from inversion_monitor.probe.gradients import logit_gradient_norms
from inversion_monitor.toy.models import tiny_causal_lm


@pytest.fixture
def two_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _recording(calls: list[tuple[str, int]], fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        calls.append((fn.__name__, torch.get_num_threads()))
        return fn(*args, **kwargs)

    return wrapped


def test_the_probe_solves_on_one_thread_and_restores_the_count(
    two_threads: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    solves: list[tuple[str, int]] = []
    monkeypatch.setattr(torch.linalg, "eigvalsh", _recording(solves, torch.linalg.eigvalsh))
    monkeypatch.setattr(torch.linalg, "qr", _recording(solves, torch.linalg.qr))
    model = tiny_causal_lm("llama", num_layers=2, vocab_size=128).eval()
    ids = torch.randint(4, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    result = logit_gradient_norms(model, ids, positions=torch.tensor([[0, 5], [1, 9]]))
    assert torch.isfinite(result.score).all() and set(result.paths.values()) == {"last_block"}
    assert {name for name, _ in solves} == {"linalg_eigvalsh", "linalg_qr"}, solves
    assert {threads for _, threads in solves} == {1}, solves  # every one on one thread
    assert torch.get_num_threads() == 2


def test_one_thread_restores_the_count_after_an_error(two_threads: None) -> None:
    with pytest.raises(RuntimeError, match="inside"), one_thread(torch.zeros(1)):
        assert torch.get_num_threads() == 1
        raise RuntimeError("inside")
    assert torch.get_num_threads() == 2


def test_one_thread_leaves_other_devices_alone(two_threads: None) -> None:
    with one_thread(torch.zeros(1, device="meta")):
        assert torch.get_num_threads() == 2


def test_results_equal_torch_linalg_on_all_threads(two_threads: None) -> None:
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(6, 40, 24, generator=gen, dtype=torch.float64)
    a[:, 10:] = 0  # rank-deficient, as the probe's Gram matrices are
    gram = a.mT @ a
    torch.testing.assert_close(
        eigenvalues(gram), torch.linalg.eigvalsh(gram), rtol=1e-12, atol=1e-9
    )
    x = torch.randn(3, 30, 20, generator=gen)
    torch.testing.assert_close(qr_factor(x), torch.linalg.qr(x, mode="r").R, rtol=1e-5, atol=1e-5)
