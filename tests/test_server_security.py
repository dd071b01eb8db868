"""Bearer tokens, TLS, the standard health service and server reflection."""

from __future__ import annotations

import datetime
import ipaddress

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from inversion_monitor.app.cli import main
from inversion_monitor.proto.v1 import monitor_pb2, monitor_pb2_grpc
from tests.server_support import TIMEOUT, open_run, push, record, rpc_error, running, stub_for


def _health(target: str, channel: grpc.Channel | None = None) -> int:
    with channel or grpc.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT)
        status: int = reply.status
        return status


def test_tokens_guard_the_service_but_not_health(tmp_path):
    with running(tmp_path, tokens=["alpha-token", "beta-token"]) as server:
        with stub_for(server) as stub:
            err = rpc_error(stub.ListRuns, monitor_pb2.ListRunsRequest())
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "Bearer" in err.details()
        with stub_for(server, token="wrong") as stub:
            err = rpc_error(stub.OpenRun, monitor_pb2.OpenRunRequest())
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        with grpc.insecure_channel(server.grpc_target) as ch:
            stub = monitor_pb2_grpc.MonitorServiceStub(ch)
            err = rpc_error(
                stub.ListRuns,
                monitor_pb2.ListRunsRequest(),
                metadata=[("authorization", "Basic alpha-token")],
            )
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        for token in ("alpha-token", "beta-token"):
            with stub_for(server, token=token) as stub:
                open_run(stub, "run1")
                assert push(stub, record("run1", 1)).acks[0].acked_sequence == 1
        assert _health(server.grpc_target) == health_pb2.HealthCheckResponse.SERVING


def test_health_serving_per_service_and_reflection_lists_services(tmp_path):
    with running(tmp_path) as server, grpc.insecure_channel(server.grpc_target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        name = "inversion_monitor.v1.MonitorService"
        reply = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=TIMEOUT)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (reply,) = list(refl.ServerReflectionInfo(iter([request]), timeout=TIMEOUT))
        names = {s.name for s in reply.list_services_response.service}
        assert {name, "grpc.health.v1.Health"} <= names


def _self_signed(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_tls_with_a_self_signed_certificate_and_a_token(tmp_path, capsys):
    cert, key = _self_signed(tmp_path)
    with running(tmp_path, tls_cert=cert, tls_key=key, tokens=["t0k"]) as server:
        creds = grpc.ssl_channel_credentials(cert.read_bytes())
        with grpc.secure_channel(server.grpc_target, creds) as ch:
            stub = monitor_pb2_grpc.MonitorServiceStub(ch)
            auth = [("authorization", "Bearer t0k")]
            reply = stub.OpenRun(
                monitor_pb2.OpenRunRequest(run=monitor_pb2.RunInfo(run_id="r", name="tls")),
                timeout=TIMEOUT,
                metadata=auth,
            )
            assert reply.display_name == "tls"
        with grpc.secure_channel(server.grpc_target, creds) as ch:
            assert _health(server.grpc_target, ch) == health_pb2.HealthCheckResponse.SERVING
        args = ["runs", "--endpoint", server.grpc_target, "--tls-ca", str(cert)]
        assert main([*args, "--token", "t0k"]) == 0
        assert "tls" in capsys.readouterr().out
        assert main(args) == 1
        assert "UNAUTHENTICATED" in capsys.readouterr().err
        # a plaintext client cannot talk to the TLS port
        with grpc.insecure_channel(server.grpc_target) as ch:
            stub = monitor_pb2_grpc.MonitorServiceStub(ch)
            err = rpc_error(stub.ListRuns, monitor_pb2.ListRunsRequest())
            assert err.code() == grpc.StatusCode.UNAVAILABLE


def test_tls_config_needs_both_files(tmp_path):
    from pydantic import ValidationError

    from inversion_monitor.server import ServerConfig

    cert, _ = _self_signed(tmp_path)
    with pytest.raises(ValidationError, match="tls_cert and tls_key go together"):
        ServerConfig(tls_cert=cert)
    with pytest.raises(ValidationError, match="does not exist"):
        ServerConfig(tls_cert=cert, tls_key=tmp_path / "missing.pem")
