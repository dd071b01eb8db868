"""Failures of a whole request, each mapped to one gRPC status code by the service."""

from __future__ import annotations


class RequestError(Exception):
    """A request the server answers with a non-OK status; ``code`` names a ``grpc.StatusCode``.

    >>> err = NotFound("run 'x' is not open")
    >>> err.code, str(err)
    ('NOT_FOUND', "run 'x' is not open")
    """

    code = "INTERNAL"

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


class InvalidArgument(RequestError):
    """The request as a whole is malformed; resending it unchanged cannot succeed."""

    code = "INVALID_ARGUMENT"


class NotFound(RequestError):
    """The run (or rank) the request names is unknown to this server."""

    code = "NOT_FOUND"


class ResourceExhausted(RequestError):
    """A server-side limit is reached; ``retry_after_s`` says when to try again, if ever."""

    code = "RESOURCE_EXHAUSTED"


class Unavailable(RequestError):
    """The server cannot serve right now (database error, shutting down); retry later."""

    code = "UNAVAILABLE"


class AlreadyExists(RequestError):
    """Another writer holds the (run, rank) stream the request wants to open."""

    code = "ALREADY_EXISTS"


class FailedPrecondition(RequestError):
    """The request needs state it does not have (a valid writer session); re-open first."""

    code = "FAILED_PRECONDITION"


class PermissionDenied(RequestError):
    """The caller's token does not allow this (read-only, or another project's run)."""

    code = "PERMISSION_DENIED"
