"""Rank agreement: every rank of a distributed job probes on the same steps, or none does.

With sharded weights (FSDP, DeepSpeed ZeRO-3) a probe is a collective: its
forward and backward gather parameters, so a rank probing alone waits forever
for the others. Even with replicated weights (DDP) the records of one step
should come from every rank. So the ranks vote, with one small all-reduce:

- the run id and name are rank 0's, broadcast once (:meth:`RankAgreement.run_identity`);
- each vote is two integers reduced with MIN: ``[yes, failed_rank]``, where
  ``yes`` is this rank's wish (probe now / ready to probe) and ``failed_rank``
  is this rank's index if the monitor failed on it since the last vote, else
  ``world_size``. The verdict says *go* only when every rank said yes and none
  failed; a failure anywhere makes every rank disable together, knowing which
  rank failed first (:class:`Verdict`).

The votes run on their own gloo group created with a timeout, on CPU tensors:
the votes never touch a GPU stream (no device synchronisation per step) and a
rank that does not show up makes the others' vote raise after ``timeout_s``
instead of hanging (the monitor then disables on that rank). Where gloo is not
available the default group and its device are used (then its timeout applies).

Starting a probe needs more than an all-reduce: a rank that arrives after the
others timed out could still complete the all-reduce against what they sent
before giving up, and probe alone. So the last vote before a probe
(:meth:`RankAgreement.commit`) is a consensus on the job's key-value store
(a connection of its own): every rank posts its ballot, rank 0 reads them all
and writes the verdict, and a rank that waits in vain writes "off" instead;
the verdict key is written once (compare-and-set), so every rank reads the
same verdict, and "off" switches the monitor off everywhere. A few store
round trips, on probe steps only.

Nothing happens outside a distributed job: :meth:`RankAgreement.join` returns
None unless ``torch.distributed`` is initialised with more than one rank.

>>> RankAgreement.join(timeout_s=30.0) is None  # a single process: no agreement needed
True
>>> Verdict.from_votes([1, 4], world_size=4)
Verdict(go=True, failed_rank=None)
>>> Verdict.from_votes([0, 1], world_size=4)     # rank 1 failed: nobody probes
Verdict(go=False, failed_rank=1)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

logger = logging.getLogger("inversion_monitor")


@dataclass(frozen=True)
class Verdict:
    """The outcome of one vote.

    Attributes:
        go: every rank voted yes and none reported a failure.
        failed_rank: the lowest rank that reported a failure, or None.
    """

    go: bool
    failed_rank: int | None

    @classmethod
    def from_votes(cls, reduced: Sequence[int], *, world_size: int) -> Verdict:
        """Read the MIN-reduced ``[yes, failed_rank]`` vector."""
        yes, failed = int(reduced[0]), int(reduced[1])
        failed_rank = failed if failed < world_size else None
        return cls(go=yes == 1 and failed_rank is None, failed_rank=failed_rank)


class RankAgreement:
    """Votes of the ranks of one initialised ``torch.distributed`` job.

    Create it with :meth:`join` on every rank at the same point (it is a
    collective: it creates the vote group), then call :meth:`vote` on every
    rank the same number of times, in the same order.

    Args:
        rank, world_size: this process's place in the default group.
        group: the process group the votes run on (None: the default group).
        device: where the vote tensors live (the group's device).
        store: makes a new connection to a key-value store shared by the
            ranks, under a prefix of this agreement (None: commits are votes).
        timeout_s: how long a vote or commit waits for the other ranks.
    """

    def __init__(
        self,
        *,
        rank: int,
        world_size: int,
        group: Any = None,
        device: torch.device | None = None,
        store: Callable[[], Any] | None = None,
        timeout_s: float = 300.0,
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self.group = group
        self.device = device if device is not None else torch.device("cpu")
        self.votes = 0
        self.commits = 0
        self.timeout = timedelta(seconds=timeout_s)
        self._new_store = store  # a fresh connection (also after a timed-out wait)
        self._store: Any = store() if store is not None else None

    @classmethod
    def join(cls, *, timeout_s: float) -> RankAgreement | None:
        """The agreement of this job (a collective), or None outside a distributed job."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return None
        group, device = _vote_group(timeout_s)
        return cls(
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            group=group,
            device=device,
            store=_job_store(group, device),
            timeout_s=timeout_s,
        )

    def close(self) -> None:
        """Let go of the vote group and the store connection (no collective)."""
        self.group = self._store = self._new_store = None

    def run_identity(self, run_id: str, run_name: str) -> tuple[str, str]:
        """Rank 0's run id and name, on every rank (one broadcast)."""
        import torch.distributed as dist

        shared: list[Any] = [run_id, run_name]
        dist.broadcast_object_list(shared, src=0, group=self.group, device=self.device)
        return str(shared[0]), str(shared[1])

    def vote(self, yes: bool, *, failed: bool = False) -> Verdict:
        """Every rank's ``yes`` and failure flag combined (one all-reduce of two integers).

        Raises what the collective raises (e.g. a timeout when a rank does not vote).
        """
        import torch.distributed as dist

        ballot = torch.tensor(
            [int(yes), self.rank if failed else self.world_size],
            dtype=torch.int64,
            device=self.device,
        )
        dist.all_reduce(ballot, op=dist.ReduceOp.MIN, group=self.group)
        self.votes += 1
        return Verdict.from_votes(ballot.tolist(), world_size=self.world_size)

    def commit(self, yes: bool, *, failed: bool = False) -> Verdict:
        """Like :meth:`vote`, but every rank surely reads the same verdict (see the module doc).

        Raises ``TimeoutError`` on every rank when some rank did not vote in time.
        """
        new_store = self._new_store
        if self._store is None or new_store is None:
            return self.vote(yes, failed=failed)
        self.commits += 1
        key = str(self.commits)
        store = self._store
        store.set(f"{key}/{self.rank}", f"{int(yes)},{self.rank if failed else self.world_size}")
        verdict_key = f"{key}/verdict"
        try:
            if self.rank == 0:
                ballots = [f"{key}/{r}" for r in range(self.world_size)]
                store.wait(ballots, self.timeout)
                votes = [b.decode().split(",") for b in store.multi_get(ballots)]
                reduced = [min(int(v[0]) for v in votes), min(int(v[1]) for v in votes)]
                text = store.compare_set(verdict_key, "", "{},{}".format(*reduced)).decode()
                if self.commits > 2:  # nobody reads those any more
                    old = str(self.commits - 2)
                    for name in [f"{old}/{r}" for r in range(self.world_size)] + [f"{old}/verdict"]:
                        store.delete_key(name)
            else:
                store.wait([verdict_key], self.timeout)
                text = store.get(verdict_key).decode()
        except Exception as exc:  # waited in vain: the verdict is "off", unless one was written
            if "timeout" not in str(exc).lower():
                raise
            self._store = store = new_store()  # the timed-out connection is not reused
            text = store.compare_set(verdict_key, "", "off").decode()
        if text == "off":
            raise TimeoutError(
                f"a rank did not vote within {self.timeout.total_seconds():g} s "
                f"(vote {self.commits} before a probe)"
            )
        return Verdict.from_votes([int(v) for v in text.split(",")], world_size=self.world_size)


def process_place(rank: int, world_size: int) -> tuple[int, int]:
    """``(rank, world_size)`` of ``torch.distributed`` when initialised, else the given ones.

    >>> process_place(0, 1)  # not distributed here
    (0, 1)
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return rank, world_size


def _job_store(group: Any, device: torch.device) -> Callable[[], Any] | None:
    """New connections to the job's store under a prefix unique to one agreement (a collective)."""
    import uuid

    import torch.distributed as dist

    shared: list[Any] = [uuid.uuid4().hex]
    dist.broadcast_object_list(shared, src=0, group=group, device=device)
    prefix = f"inversion_monitor/{shared[0]}"
    try:
        from torch.distributed.distributed_c10d import PrefixStore, _get_default_store

        default: Any = _get_default_store()
        default.clone().set(f"{prefix}/probe", "1")  # clone() works here
    except Exception as exc:  # no store to clone: commits are plain votes
        logger.debug("inversion-monitor commits by all-reduce (no store: %s)", exc)
        return None
    return lambda: PrefixStore(prefix, default.clone())


def _vote_group(timeout_s: float) -> tuple[Any, torch.device]:
    """A new gloo group with ``timeout_s``, else the default group and its device."""
    import torch.distributed as dist

    try:
        group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    except Exception as exc:  # no gloo in this build: vote on the default group
        logger.debug("inversion-monitor votes on the default group (no gloo group: %s)", exc)
        return None, _default_device()
    return group, torch.device("cpu")


def _default_device() -> torch.device:
    """The device collectives of the default group expect (nccl: this rank's GPU)."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
