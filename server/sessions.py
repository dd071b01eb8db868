"""Writer sessions: one owner per (run, rank) stream.

``OpenRun`` grants an opaque random session (192 bits, URL-safe text) that
every ``Push`` and the ``CloseRun`` of that stream carry. The server keeps
only its SHA-256 digest (in memory and in the ``ranks`` table), so the
database holds nothing a reader could write with.

A second ``OpenRun`` for the same (run, rank) while the current session is
active (an OpenRun or Push within ``writer_idle_timeout_s``) and not closed is
refused with ALREADY_EXISTS; with ``takeover`` it always succeeds and the
previous session stops working (FAILED_PRECONDITION "taken over").
"""

from __future__ import annotations

import hashlib
import secrets

from inversion_monitor.server.errors import AlreadyExists, FailedPrecondition

SESSION_BYTES = 24  # 192 bits of randomness


def new_session() -> tuple[str, str]:
    """``(session, digest)``: the text for the client and what the server keeps.

    >>> session, digest = new_session()
    >>> len(session) >= 32, session_digest(session) == digest
    (True, True)
    """
    session = secrets.token_urlsafe(SESSION_BYTES)
    return session, session_digest(session)


def session_digest(session: str) -> str:
    """The SHA-256 hex digest of a session as the server stores it."""
    return hashlib.sha256(session.encode("utf-8", "replace")).hexdigest()


def stream_taken(run_id: str, rank: int, idle_s: float, timeout_s: float) -> AlreadyExists:
    """The error for an OpenRun of a stream another writer holds."""
    return AlreadyExists(
        f"run {run_id!r} rank {rank} already has a writer (active {idle_s:.0f} s ago; a "
        f"stream is free after {timeout_s:.0f} s idle or its CloseRun): use another run_id "
        "or rank; a resumed client with the same spool_dir takes the stream over"
    )


def missing_session(run_id: str, rank: int, call: str) -> FailedPrecondition:
    """The error for a Push or CloseRun without a writer session."""
    return FailedPrecondition(
        f"{call} for run {run_id[:80]!r} rank {rank} carries no writer_session: the stream "
        "must be re-opened with OpenRun, which grants one"
    )


def unknown_session(run_id: str, rank: int, call: str) -> FailedPrecondition:
    """The error for a session the server does not know for that stream."""
    return FailedPrecondition(
        f"{call}: the writer_session is not valid for run {run_id[:80]!r} rank {rank}: the "
        "stream must be re-opened with OpenRun"
    )


def rank_closed(run_id: str, rank: int, status: str, call: str) -> FailedPrecondition:
    """The error for a Push or CloseRun after the stream's CloseRun."""
    return FailedPrecondition(
        f"{call}: run {run_id!r} rank {rank} was closed ({status}); OpenRun re-opens it"
    )


def taken_over(run_id: str, rank: int) -> FailedPrecondition:
    """The error for a session another writer replaced with ``takeover``."""
    return FailedPrecondition(f"run {run_id} rank {rank} was taken over by another writer")


def check_session(  # noqa: PLR0917
    session: str,
    run_id: str,
    rank: int,
    current: str | None,
    previous: str | None,
    call: str,
) -> None:
    """Raise FAILED_PRECONDITION unless ``session`` is the stream's current one.

    ``current`` and ``previous`` are the digests of the stream's session and
    of the one it replaced.
    """
    if not session:
        raise missing_session(run_id, rank, call)
    digest = session_digest(session)
    if digest == current:
        return
    if digest == previous:
        raise taken_over(run_id, rank)
    raise unknown_session(run_id, rank, call)
