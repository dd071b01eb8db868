"""The ``Host`` check that guards ``/api`` against DNS rebinding on a server without tokens.

A page on an attacker's domain whose name is re-pointed at 127.0.0.1 can make
a browser read a tokenless server's API as same-origin; the request then
carries the attacker's name in ``Host``. An IP address cannot be rebound, so
``Host`` must be an IP literal, ``localhost``, or a name the server was told
(its HTTP host and ``allowed_hosts``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


def host_names(http_host: str, allowed: Iterable[str] = ()) -> frozenset[str]:
    """The names a ``Host`` header may carry: loopback names, the HTTP host, ``allowed``.

    >>> sorted(host_names("monitor.lan", ["Dash.Example"]))[:2]
    ['dash.example', 'ip6-localhost']
    """
    names = {n.strip().lower().rstrip(".") for n in (http_host, *allowed)}
    return frozenset(LOOPBACK_NAMES | {n for n in names if n})


def host_allowed(header: str | None, names: frozenset[str]) -> bool:
    """True when ``Host`` (port and all) is an IP literal or one of ``names``; also when absent.

    >>> names = host_names("127.0.0.1")
    >>> [host_allowed(h, names) for h in ("127.0.0.1:9464", "[::1]:80", "localhost:9464")]
    [True, True, True]
    >>> [host_allowed(h, names) for h in ("evil.example:9464", "127.0.0.1.evil.example")]
    [False, False]
    """
    if header is None:
        return True  # not a browser: a browser always sends Host
    host = header.strip().lower()
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host.rstrip(".") in names
    return True
