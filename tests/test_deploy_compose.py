"""deploy/compose.yaml (two replicas, PostgreSQL, Prometheus, Alertmanager) and the
systemd unit of one replica hold together.

No Docker here: the file is parsed and every part checked against what it names. Each
replica's command parses with the real ``serve`` options (all settings but ``--db``
validated by the server's own config); both replicas share one PostgreSQL URL without a
password; Prometheus scrapes exactly the replicas' HTTP ports and its configuration
passes ``promtool check config``; the Alertmanager configuration passes ``amtool``;
the example job names exactly the replicas' gRPC ports, as ``MonitorConfig`` reads them;
every mounted file exists; the systemd unit passes ``systemd-analyze verify`` and its
environment file is a valid ``serve`` configuration.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import yaml

from inversion_monitor.app.cli import build_parser
from inversion_monitor.config import MonitorConfig
from inversion_monitor.server.cli import serve_config

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
REPLICAS = ("monitor-a", "monitor-b")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return loaded


def _option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def _tool(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which(args[0]) or f"/usr/bin/{args[0]}"
    return subprocess.run(
        [tool, *args[1:]], cwd=DEPLOY, capture_output=True, text=True, timeout=60, check=False
    )


def test_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"postgres", *REPLICAS, "prometheus", "alertmanager", "trainer"}
    assert services["trainer"]["profiles"] == ["example"]  # `up` starts the servers only
    published = [p.split(":")[0] for s in services.values() for p in s.get("ports", [])]
    assert len(published) == len(set(published)), published


def test_replicas_share_one_database_and_parse_as_serve_commands(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    services = compose["services"]
    postgres = services["postgres"]["environment"]
    urls = set()
    for name in REPLICAS:
        replica = services[name]
        command = replica["command"]
        args = build_parser().parse_args(command)
        assert args.command == "serve"
        urls.add(_option(command, "--db"))
        # every setting but the database, through the server's own validation
        args.db = str(tmp_path / f"{name}.db")
        config = serve_config(args, {})
        assert config.alertmanager_url == "http://alertmanager:9093"
        assert "PGPASSWORD" in replica["environment"]
        assert replica["depends_on"]["postgres"]["condition"] == "service_healthy"
    (url,) = urls  # one database for both
    parsed = urllib.parse.urlsplit(url)
    assert parsed.scheme == "postgresql" and parsed.password is None  # no secret in argv
    assert (parsed.username, parsed.hostname, parsed.port) == (
        postgres["POSTGRES_USER"],
        "postgres",
        5432,
    )
    assert parsed.path == "/" + postgres["POSTGRES_DB"]


def test_prometheus_scrapes_both_replicas_and_passes_promtool(compose: dict[str, Any]) -> None:
    services = compose["services"]
    mounts = dict(v.split(":")[:2] for v in services["prometheus"]["volumes"] if v[0] == ".")
    config_file = next(m for m in services["prometheus"]["command"] if "config.file" in m)
    local = next(h for h, c in mounts.items() if c == config_file.split("=", 1)[1])
    config = yaml.safe_load((DEPLOY / local).read_text())
    (job,) = config["scrape_configs"]
    (static,) = job["static_configs"]
    http_ports = {
        _option(services[r]["command"], "--http-address").rsplit(":")[1] for r in REPLICAS
    }
    assert sorted(static["targets"]) == [f"{r}:{p}" for r in REPLICAS for p in http_ports]
    (alertmanagers,) = config["alerting"]["alertmanagers"]
    assert alertmanagers["static_configs"][0]["targets"] == ["alertmanager:9093"]
    # the two replicas' copies of an alert differ only in `instance`: dropped
    assert {"action": "labeldrop", "regex": "instance"} in config["alerting"][
        "alert_relabel_configs"
    ]
    for rule_file in config["rule_files"]:  # mounted beside the configuration
        assert any(c.endswith("/" + rule_file) for c in mounts.values())
    result = _tool("promtool", "check", "config", str(DEPLOY / local))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alertmanager_configuration_passes_amtool(compose: dict[str, Any]) -> None:
    volumes = compose["services"]["alertmanager"]["volumes"]
    (local,) = [v.split(":")[0] for v in volumes if v.startswith("./")]
    result = _tool("amtool", "check-config", local)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_example_job_names_both_replicas(compose: dict[str, Any]) -> None:
    services = compose["services"]
    environment = services["trainer"]["environment"]
    config = MonitorConfig.from_env(environment)  # as the job's client reads them
    grpc_ports = {
        _option(services[r]["command"], "--grpc-address").rsplit(":")[1] for r in REPLICAS
    }
    assert config.endpoint == ",".join(f"{r}:{p}" for r in REPLICAS for p in grpc_ports)
    assert config.spool_dir == "/spool"


def test_mounted_files_exist_and_the_image_installs_known_extras(compose: dict[str, Any]) -> None:
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            host = volume.split(":")[0]
            if host.startswith("./"):
                assert (DEPLOY / host).is_file(), host
    build = compose["x-monitor"]["build"]
    dockerfile = (DEPLOY / build["context"] / build["dockerfile"]).resolve()
    assert dockerfile.is_file()
    assert '"/src[server,postgres]"' in dockerfile.read_text()
    optional = (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]")[1]
    assert "\nserver = [" in optional and "\npostgres = [" in optional


def _env_file(path: Path) -> dict[str, str]:
    lines = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return dict(line.split("=", 1) for line in lines)


def test_systemd_unit_verifies_and_its_environment_is_a_serve_configuration(
    tmp_path: Path,
) -> None:
    unit = (DEPLOY / "systemd" / "inversion-monitor.service").read_text()
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    binary = exec_start.removeprefix("ExecStart=").split()[0]
    assert exec_start.split()[1:] == ["serve"]  # every setting from the EnvironmentFile
    # systemd-analyze verify needs the binary and the environment file to exist
    installed = Path(sys.executable).parent / "inversion-monitor"
    local = tmp_path / "inversion-monitor.service"
    env_path = unit.split("EnvironmentFile=")[1].split()[0]
    example = DEPLOY / "systemd" / "server.env.example"
    local.write_text(unit.replace(binary, str(installed)).replace(env_path, str(example)))
    result = _tool("systemd-analyze", "verify", str(local))
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr

    environ = _env_file(DEPLOY / "systemd" / "server.env.example")
    prefix = "INVERSION_MONITOR_SERVER_"
    assert {k for k in environ if not k.startswith(prefix)} == {"PGPASSWORD"}
    db = urllib.parse.urlsplit(environ[prefix + "DB"])
    assert db.scheme == "postgresql" and db.password is None
    args = build_parser().parse_args(["serve"])
    fields = set(type(serve_config(args, {prefix + "DB": str(tmp_path / "x.db")})).model_fields)
    assert {k.removeprefix(prefix).lower() for k in environ if k.startswith(prefix)} <= fields
    # every setting but the database, through the server's own validation
    config = serve_config(args, {**environ, prefix + "DB": str(tmp_path / "x.db")})
    assert config.alertmanager_url == environ[prefix + "ALERTMANAGER_URL"]
