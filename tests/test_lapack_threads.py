"""The probe's small dense solves run on one CPU thread, and torch's thread count is restored.

Why: on a busy machine LAPACK's threads wait for each other inside every small solve
(``monitor/metrics/lapack.py``; ``benchmarks/bench_lapack_threads.py`` measures it).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from inversion_monitor.metrics.lapack import eigenvalues, one_thread, qr_factor, split_batch
from inversion_monitor.probe.gradients import logit_gradient_norms
from inversion_monitor.probe.op_counts import OpCounter
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


def _grams(count: int) -> torch.Tensor:
    a = torch.randn(count, 48, 12, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    return a @ a.mT  # rank 12 of 48, as the probe's Gram matrices are rank-deficient


def test_a_split_batch_gives_the_bits_of_one_call(two_threads: None) -> None:
    grams = _grams(37)  # parts of unequal size
    with one_thread(grams):
        one = torch.linalg.eigvalsh(grams)
    for threads in (2, 3, 8):
        assert torch.equal(split_batch(torch.linalg.eigvalsh, grams, threads), one)
    assert torch.equal(eigenvalues(grams), one)
    assert torch.get_num_threads() == 2


def test_a_split_batch_is_one_call_when_counted_or_small(two_threads: None) -> None:
    calls: list[int] = []
    threads: list[int] = []

    def solve(batch: torch.Tensor) -> torch.Tensor:
        calls.append(batch.shape[0])
        threads.append(torch.get_num_threads())
        return torch.linalg.eigvalsh(batch)

    with one_thread(torch.zeros(1)):
        split_batch(solve, _grams(40), 2)
    assert sorted(calls) == [20, 20] and threads == [1, 1]  # each part on one thread
    calls.clear()
    split_batch(solve, _grams(5), 2)  # too few matrices to split
    assert calls == [5]
    calls.clear()
    with OpCounter() as counts:  # a dispatch mode is per thread: one call it sees
        eigenvalues(_grams(40))
        split_batch(solve, _grams(40), 2)
    assert calls == [40] and counts.solves == 2


def test_an_error_in_a_part_is_raised_by_the_caller(two_threads: None) -> None:
    before = threading.active_count()

    def solve(batch: torch.Tensor) -> torch.Tensor:
        if bool((batch[:, 0, 0] < 0).any()):
            raise ValueError("bad part")
        return torch.linalg.eigvalsh(batch)

    grams = _grams(40)
    for bad in (0, 39):  # the caller's own part, and a thread's
        broken = grams.clone()
        broken[bad, 0, 0] = -1.0
        with pytest.raises(ValueError, match="bad part"):
            split_batch(solve, broken, 2)
    assert threading.active_count() == before  # every thread joined
