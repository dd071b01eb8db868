"""The commit before a probe: every rank reads one verdict, late ranks included.

Two ranks as two threads, each with its own connections to a real TCPStore
(as the ranks of a job have to the job's store).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import torch.distributed as dist

from inversion_monitor.engine.rank_agreement import RankAgreement, Verdict


@pytest.fixture
def store_factory() -> Callable[[], Any]:
    server = dist.TCPStore("127.0.0.1", 0, 1, True, timedelta(seconds=30), wait_for_workers=False)
    port = server.port

    def connect() -> Any:
        client = dist.TCPStore("127.0.0.1", port, 1, False, timedelta(seconds=30))
        return dist.PrefixStore("agreement", client)

    connect.server = server  # type: ignore[attr-defined]  # keep it alive
    return connect


def commit_on_two_ranks(
    store: Callable[[], Any], ballots: dict[int, tuple[bool, bool]], *, late: dict[int, float]
) -> dict[int, Any]:
    """Each rank commits ``(yes, failed)`` after ``late[rank]`` seconds; verdict or exception."""
    outcomes: dict[int, Any] = {}

    def rank_main(rank: int) -> None:
        agreement = RankAgreement(rank=rank, world_size=2, store=store, timeout_s=0.5)
        time.sleep(late.get(rank, 0.0))  # the injected delay of a late rank
        yes, failed = ballots[rank]
        try:
            outcomes[rank] = agreement.commit(yes, failed=failed)
        except TimeoutError as exc:
            outcomes[rank] = exc

    threads = [threading.Thread(target=rank_main, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
        assert not thread.is_alive()
    return outcomes


def test_ranks_that_all_say_yes_go_together(store_factory) -> None:
    outcomes = commit_on_two_ranks(store_factory, {0: (True, False), 1: (True, False)}, late={})
    assert outcomes == {0: Verdict(go=True, failed_rank=None), 1: Verdict(True, None)}


def test_a_failure_on_one_rank_reaches_every_rank(store_factory) -> None:
    outcomes = commit_on_two_ranks(store_factory, {0: (True, False), 1: (False, True)}, late={})
    assert outcomes == {0: Verdict(go=False, failed_rank=1), 1: Verdict(False, 1)}


@pytest.mark.parametrize("late_rank", [0, 1])
def test_a_rank_later_than_the_timeout_reads_off_like_the_others(store_factory, late_rank) -> None:
    outcomes = commit_on_two_ranks(
        store_factory, {0: (True, False), 1: (True, False)}, late={late_rank: 1.5}
    )
    # nobody goes: the late rank does not probe alone against a verdict nobody waits for
    assert all(isinstance(o, TimeoutError) for o in outcomes.values()), outcomes


def test_without_a_distributed_job_there_is_nothing_to_agree_on() -> None:
    assert RankAgreement.join(timeout_s=1.0) is None
