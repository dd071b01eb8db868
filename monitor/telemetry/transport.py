"""The one way to reach a monitor server: endpoint, TLS, token, channel options.

Every gRPC caller (the telemetry client, the ``show`` and ``runs`` commands,
the demo) builds its channel from a :class:`Transport`, so an endpoint, a TLS
setting or a token means the same everywhere and is checked the same way.
Bad settings raise ``ValueError`` naming the setting and the fix.

>>> t = Transport.create(" 127.0.0.1:50051 ", token="s3cret")
>>> t.endpoint, t.metadata, t.credentials is None
('127.0.0.1:50051', (('authorization', 'Bearer s3cret'),), True)
>>> Transport.create("http://localhost:50051")
Traceback (most recent call last):
...
ValueError: endpoint='http://localhost:50051' looks like a URL: pass 'host:port' or \
'dns:///host:port' (and tls=True for TLS)
>>> channel = Transport.create("127.0.0.1:9").channel()
>>> channel.close()
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from inversion_monitor.proto.v1 import monitor_pb2_grpc
from inversion_monitor.telemetry.endpoints import normalise_endpoint

TlsSetting = bool | str | os.PathLike[str]
# The client retries itself (see inversion_monitor.telemetry.retry); gRPC's own retries
# would hide failures from it and resend behind its back.
DEFAULT_OPTIONS: tuple[tuple[str, Any], ...] = (("grpc.enable_retries", 0),)


def channel_credentials(tls: TlsSetting) -> grpc.ChannelCredentials | None:
    """None for plaintext (False), the system roots (True), or the roots of a PEM file."""
    if tls is False:
        return None
    if tls is True:
        return grpc.ssl_channel_credentials()
    path = Path(tls)
    try:
        roots = path.read_bytes()
    except OSError as exc:
        raise ValueError(
            f"tls={str(tls)!r}: cannot read the root certificates ({exc}); pass the path "
            "of a PEM file, True for the system roots, or False"
        ) from None
    return grpc.ssl_channel_credentials(root_certificates=roots)


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata carrying ``token`` (empty without one)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


@dataclass(frozen=True)
class Transport:
    """Endpoint, credentials, call metadata and channel options of one server.

    Build with :meth:`create`; :meth:`channel` opens a new channel and
    :meth:`stub` wraps one in the service stub.

    >>> Transport.create("localhost:50051", tls=False).endpoint
    'localhost:50051'
    """

    endpoint: str
    credentials: grpc.ChannelCredentials | None
    metadata: tuple[tuple[str, str], ...]
    options: tuple[tuple[str, Any], ...] = DEFAULT_OPTIONS

    @classmethod
    def create(
        cls,
        endpoint: str,
        *,
        tls: TlsSetting = False,
        token: str | None = None,
        options: Sequence[tuple[str, Any]] = DEFAULT_OPTIONS,
    ) -> Transport:
        """Validate the settings; ``ValueError`` names the bad one and the fix.

        One server: a list (``"host1:port,host2:port"``) is for
        :class:`~inversion_monitor.telemetry.client.MonitorClient`, which makes
        one transport per entry (:func:`~inversion_monitor.telemetry.endpoints.parse_endpoints`).
        """
        if "," in endpoint:
            raise ValueError(
                f"endpoint={endpoint!r} names several servers: pass one 'host:port' here"
            )
        return cls(
            endpoint=normalise_endpoint(endpoint),
            credentials=channel_credentials(tls),
            metadata=auth_metadata(token),
            options=tuple(options),
        )

    def channel(self) -> grpc.Channel:
        """A new channel to the server (the caller closes it)."""
        if self.credentials is None:
            return grpc.insecure_channel(self.endpoint, options=list(self.options))
        return grpc.secure_channel(self.endpoint, self.credentials, options=list(self.options))

    @staticmethod
    def stub(channel: grpc.Channel) -> monitor_pb2_grpc.MonitorServiceStub:
        """The ``MonitorService`` stub on ``channel``."""
        return monitor_pb2_grpc.MonitorServiceStub(channel)  # type: ignore[no-untyped-call]
