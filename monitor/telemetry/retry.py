"""How the telemetry client reacts to a failed call: classify, wait, retry.

``classify`` maps a gRPC status code to an action; :func:`backoff_s` is the
exponential backoff with jitter; :func:`retry_delay_s` reads the delay of a
``google.rpc.RetryInfo`` that the server attached to its answer.

>>> classify(grpc.StatusCode.RESOURCE_EXHAUSTED)
'retry'
>>> 0.8 <= backoff_s(0, initial_s=1.0, max_s=30.0) <= 1.2
True
>>> 0.8 * 30 <= backoff_s(10, initial_s=1.0, max_s=30.0) <= 1.2 * 30
True
"""

from __future__ import annotations

import random
from typing import Any, Literal

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

RETRYABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.CANCELLED,
    }
)
Action = Literal["retry", "reopen", "stop"]


def classify(code: grpc.StatusCode) -> Action:
    """What the client does after a call failed with ``code``.

    >>> classify(grpc.StatusCode.UNAVAILABLE), classify(grpc.StatusCode.NOT_FOUND)
    ('retry', 'reopen')
    >>> classify(grpc.StatusCode.UNAUTHENTICATED)
    'stop'
    """
    if code in RETRYABLE_CODES:
        return "retry"
    if code == grpc.StatusCode.NOT_FOUND:
        return "reopen"
    return "stop"


MAX_RETRY_DELAY_S = 300.0
# the library's own generator (seeded from the OS): the jitter never draws from, nor
# moves, the process-global ``random`` state a user seeded for reproducibility
_JITTER = random.Random()


def backoff_s(attempt: int, *, initial_s: float, max_s: float) -> float:
    """``min(max_s, initial_s * 2**attempt)`` times a jitter of 0.8-1.2 (from a private RNG)."""
    base = min(max_s, initial_s * 2.0 ** min(attempt, 62))
    return base * _JITTER.uniform(0.8, 1.2)


class CallFailure:
    """A failed call: its status code, details and the server's RetryInfo delay.

    >>> f = CallFailure(grpc.StatusCode.UNAVAILABLE, "connection refused", None)
    >>> classify(f.code), f.retry_delay_s
    ('retry', None)
    """

    __slots__ = ("code", "details", "retry_delay_s")

    def __init__(self, code: grpc.StatusCode, details: str, retry_delay_s: float | None) -> None:
        self.code = code
        self.details = details
        self.retry_delay_s = retry_delay_s


def retry_delay_s(call: Any) -> float | None:
    """The delay of a ``google.rpc.RetryInfo`` in the call's trailing metadata."""
    try:
        metadata = call.trailing_metadata() or ()
    except Exception:  # pragma: no cover - defensive: a broken call object
        return None
    for key, value in metadata:
        if key != "grpc-status-details-bin":
            continue
        try:
            status = status_pb2.Status.FromString(value)
        except DecodeError:
            return None
        for detail in status.details:
            if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                info = error_details_pb2.RetryInfo()
                detail.Unpack(info)
                delay = float(info.retry_delay.seconds + info.retry_delay.nanos / 1e9)
                return min(max(delay, 0.0), MAX_RETRY_DELAY_S)
    return None
