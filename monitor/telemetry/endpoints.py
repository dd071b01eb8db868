"""Several monitor servers for one client: the endpoint list and the failover rotation.

``"host1:50051,host2:50051"`` names replicas that serve one store (PostgreSQL:
``inversion-monitor serve --db postgresql://...``). :func:`parse_endpoints`
checks such a list once, at the boundary (``MonitorConfig.endpoint`` and
``MonitorClient``): every entry is a gRPC target with a port, none is empty
and none is named twice; a bad entry raises ``ValueError`` naming it and the
fix. :class:`Rotation` is which endpoint the sender uses now: it stays on one
while it answers and moves to the next, round-robin, when it is unreachable.

>>> parse_endpoints(" 10.0.0.1:50051 , dns:///monitor-b:50051")
('10.0.0.1:50051', 'dns:///monitor-b:50051')
>>> parse_endpoints("a:50051,,b:50051")
Traceback (most recent call last):
...
ValueError: endpoint='a:50051,,b:50051': entry 2 is empty: separate the servers by single \
commas, e.g. 'host1:50051,host2:50051'
>>> parse_endpoints("monitor-a")
Traceback (most recent call last):
...
ValueError: endpoint='monitor-a': entry 'monitor-a' has no port: write it as 'monitor-a:PORT' \
(the port of the server's --grpc-address, 50051 by default)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Generic, TypeVar

T = TypeVar("T")

_URL_SCHEMES = ("http://", "https://", "grpc://", "grpcs://")
# gRPC targets without a TCP port
_PORTLESS_SCHEMES = ("unix:", "unix-abstract:", "vsock:")
EXAMPLE = "'host1:50051,host2:50051'"


def normalise_endpoint(endpoint: str) -> str:
    """One target stripped; ``ValueError`` for an empty one or a URL (no port check)."""
    target = endpoint.strip()
    if not target:
        raise ValueError("endpoint is empty: pass 'host:port' (e.g. '127.0.0.1:50051')")
    if target.lower().startswith(_URL_SCHEMES):
        raise ValueError(
            f"endpoint={endpoint!r} looks like a URL: pass 'host:port' or 'dns:///host:port' "
            "(and tls=True for TLS)"
        )
    return target


def parse_endpoints(endpoint: str | Sequence[str]) -> tuple[str, ...]:
    """The servers of ``endpoint`` (comma-separated, or a sequence), each checked.

    ``ValueError`` names the bad entry and the fix: an empty entry, a URL, a
    missing or bad port, an unbracketed IPv6 address, or a server named twice.
    """
    if isinstance(endpoint, str):
        given = endpoint
        entries = endpoint.split(",")
    else:
        entries = list(endpoint)
        given = ",".join(map(str, entries))
        if not all(isinstance(entry, str) for entry in entries):
            raise TypeError(f"endpoint={entries!r}: pass a string 'host:port[,host:port...]'")
    if not given.strip():
        raise ValueError("endpoint is empty: pass 'host:port' (e.g. '127.0.0.1:50051')")
    seen: dict[str, int] = {}
    targets: list[str] = []
    for number, entry in enumerate(entries, start=1):
        target = entry.strip()
        if not target:
            raise ValueError(
                f"endpoint={given!r}: entry {number} is empty: separate the servers by single "
                f"commas, e.g. {EXAMPLE}"
            )
        if target.lower().startswith(_URL_SCHEMES):
            what = f"endpoint={given!r}" + ("" if len(entries) == 1 else f": entry {target!r}")
            raise ValueError(
                f"{what} looks like a URL: pass 'host:port' or 'dns:///host:port' "
                "(and tls=True for TLS)"
            )
        try:
            _check_port(target)
        except ValueError as exc:
            raise ValueError(f"endpoint={given!r}: {exc}") from None
        key = target.lower()
        if key in seen:
            raise ValueError(
                f"endpoint={given!r}: entry {number} ({target!r}) repeats entry {seen[key]}: "
                "name each server once"
            )
        seen[key] = number
        targets.append(target)
    return tuple(targets)


def join_endpoints(endpoint: str | Sequence[str]) -> str:
    """The checked list as one comma-separated string (how ``MonitorConfig`` holds it).

    >>> join_endpoints(["a:1", " b:2"])
    'a:1,b:2'
    """
    return ",".join(parse_endpoints(endpoint))


def _check_port(target: str) -> None:
    lowered = target.lower()
    if lowered.startswith(_PORTLESS_SCHEMES):
        return
    address = target
    for scheme in ("dns:", "ipv4:", "ipv6:"):
        if lowered.startswith(scheme):
            address = target[len(scheme) :]
            if scheme == "dns:" and address.startswith("//"):  # dns://authority/host:port
                address = address[2:].partition("/")[2]
            break
    else:
        if address.count(":") > 1 and not address.startswith("["):
            raise ValueError(
                f"entry {target!r} looks like an IPv6 address without brackets: write it as "
                "'[ADDRESS]:PORT', e.g. '[::1]:50051'"
            )
    host, colon, port = address.rpartition(":")
    if not colon or not host or host.endswith(":") or address.endswith("]"):
        raise ValueError(
            f"entry {target!r} has no port: write it as '{target}:PORT' (the port of the "
            "server's --grpc-address, 50051 by default)"
        )
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"entry {target!r}: port {port!r} is not a number from 1 to 65535")


class Rotation(Generic[T]):
    """The endpoints (or their transports) and the one in use; round-robin on failure.

    The sender stays on :attr:`current` while it answers. :meth:`fail_over`
    moves to the next one and says whether every endpoint has now failed in a
    row since the last success: then the caller backs off before trying the
    next round, else it tries the next endpoint at once. Not thread-safe: only
    the sender thread moves it.

    >>> r = Rotation(["a:1", "b:2"])
    >>> r.current, r.fail_over(), r.current
    ('a:1', False, 'b:2')
    >>> r.fail_over(), r.current  # both failed in a row: back off, then a:1 again
    (True, 'a:1')
    >>> r.succeeded(); r.fail_over(), r.current
    (False, 'b:2')
    """

    def __init__(self, items: Sequence[T]) -> None:
        if not items:
            raise ValueError("a rotation needs at least one endpoint")
        self.items: tuple[T, ...] = tuple(items)
        self.index = 0
        self.failovers = 0  # how often the sender moved to another endpoint
        self._failed_in_a_row = 0

    @property
    def current(self) -> T:
        """The endpoint in use."""
        return self.items[self.index]

    def fail_over(self) -> bool:
        """Move to the next endpoint; True when every endpoint failed since the last success."""
        self._failed_in_a_row += 1
        if len(self.items) > 1:
            self.index = (self.index + 1) % len(self.items)
            self.failovers += 1
        if self._failed_in_a_row >= len(self.items):
            self._failed_in_a_row = 0
            return True
        return False

    def succeeded(self) -> None:
        """The current endpoint answered: a new round starts with the next failure."""
        self._failed_in_a_row = 0
