"""Monitor server throughput, latency and scrape-time benchmark (loopback only).

Each phase starts a fresh ``inversion-monitor serve`` subprocess on a
temporary database and drives it with client processes that use the raw
generated stubs:

1. ingest: ``--clients`` processes push batches of ``--batch`` records as fast
   as the server acknowledges them; records/s committed (the server's own
   ``records_ingested_total`` over wall time), and the cores the servers and the
   clients used (the clients send prebuilt bytes, :class:`PushPayloads`, so they
   leave the shared cores to the server).
2. latency: ``--runs`` runs each send ``--rate`` records/s (spread over
   ``--latency-procs`` processes, grpc.aio), first one record per push, then
   ``--per-push`` records per push (a client that flushes once a second);
   p50/p99 Push round trip, client side and server side.
3. runs: the server grows to each of ``--scrape-runs`` (10,000 and 40,000)
   runs with one record each; at each size, the time of a full ``GET /metrics``
   and the OpenRun rate for 1,000 more runs (side by side with the rate at the
   first 1,000 runs: OpenRun is O(1) in the number of runs).
4. render: the same /metrics text rendered in-process by the server's
   :class:`Exposition` and by prometheus_client's ``generate_latest`` over the
   same runs (the path before), side by side.
5. health: the cost of ingesting one record in-process (``Ingestor.push``:
   validation, the SQLite commit, the run's view and gauges) for the per-step
   health-only record (with and without a NaN loss) side by side with a probe
   record, at 1 record per push (a client flushing every step) and ``--batch``.
6. backends (``--backends sqlite,postgresql,postgresql-2``): the stores one
   after another in one run, each with the ingest phase (two replicas of one
   PostgreSQL database: the clients split across both, records/s in total)
   and the /metrics time at ``--backend-runs`` (10,000) runs opened across the
   replicas (each replica scraped once it shows every run); server, PostgreSQL
   and load-generator CPU (cores) next to records/s, one table. PostgreSQL is the
   tests' throwaway cluster (tests/postgres_support.py: initdb in a temporary
   directory, fsync off). 3 to 6 minutes at the defaults.

Usage: ``python benchmarks/bench_server.py [--duration 15]``. Goals (2 cores):
>= 20,000 records/s (PostgreSQL: two replicas in total), p99 <= 50 ms, scrape
<= 200 ms at 10,000 runs and <= 1 s at 40,000. Client processes share the
machine with the server, so the figures are a lower bound for a server with
its cores to itself.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from functools import partial
from pathlib import Path
from typing import Any

GOALS = {"ingest": 20_000.0, "p99_ms": 50.0}
# runs -> median /metrics time goal (ms)
SCRAPE_GOALS_MS = {10_000: 200.0, 40_000: 1000.0}


# ---------------------------------------------------------------- server


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Server:
    """``inversion-monitor serve`` in a subprocess on free ports."""

    def __init__(self, db: Path | str, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "inversion_monitor.app.cli",
                "serve",
                "--grpc-address",
                "127.0.0.1:0",
                "--http-address",
                "127.0.0.1:0",
                "--db",
                str(db),
                "--log-level",
                "WARNING",
                *extra,
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        grpc_line = self.proc.stdout.readline().split()
        http_line = self.proc.stdout.readline().split()
        if not grpc_line or not http_line:
            raise RuntimeError("the server did not start")
        self.target, self.http = grpc_line[-1], http_line[-1]

    def metric(self, name: str) -> float:
        for line in self.scrape().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        raise KeyError(name)

    def scrape(self) -> str:
        with urllib.request.urlopen(self.http + "/metrics", timeout=30) as resp:
            text: str = resp.read().decode()
        return text

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far."""
        return _cpu_seconds(self.proc.pid)

    def push_quantiles(self, *qs: float) -> list[float]:
        """Server-side Push duration quantiles (s), interpolated in the histogram buckets."""
        buckets = []
        for line in self.scrape().splitlines():
            if line.startswith("inversion_monitor_push_duration_seconds_bucket{"):
                le = line.split('le="')[1].split('"')[0]
                buckets.append((float(le), float(line.split()[-1])))
        total = buckets[-1][1]
        out = []
        for q in qs:
            target, lo, below = q * total, 0.0, 0.0
            for le, count in buckets:
                if count >= target:
                    if le == float("inf"):
                        out.append(lo)
                    else:
                        share = (target - below) / max(count - below, 1e-9)
                        out.append(lo + (le - lo) * share)
                    break
                lo, below = le, count
        return out

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def _record(monitor_pb2: Any, run_id: str, components: int) -> Any:
    rec = monitor_pb2.StepRecord(run_id=run_id, wall_time=time.time(), loss=2.5)
    rec.learning_rate = 3e-4
    rec.probe_seconds = 0.01
    inv = rec.inversion
    inv.spearman.value, inv.spearman.ci_low, inv.spearman.ci_high = -0.4, -0.45, -0.35
    inv.pearson.value, inv.pearson.ci_low, inv.pearson.ci_high = -0.3, -0.35, -0.25
    inv.n, inv.confidence = 2048, 0.95
    rec.entropy.mean, rec.entropy.p10, rec.entropy.p50, rec.entropy.p90 = 2.1, 0.3, 1.9, 4.0
    rec.score.mean, rec.score.p10, rec.score.p50, rec.score.p90 = 0.5, 0.1, 0.4, 1.2
    for layer in range(components):
        rec.components.add(layer=layer // 4, projection="qkvo"[layer % 4], spearman=-0.3)
    return rec


def _open(stub: Any, monitor_pb2: Any, run_id: str) -> str:
    """OpenRun; returns the writer session every Push of the stream carries."""
    info = monitor_pb2.RunInfo(run_id=run_id, name=run_id, project="bench", world_size=1)
    session: str = stub.OpenRun(monitor_pb2.OpenRunRequest(run=info), timeout=30).writer_session
    return session


# ---------------------------------------------------------------- phase 1: ingest


def _varint(value: int) -> bytes:
    """``value`` (>= 0) as a protobuf varint."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


class PushPayloads:
    """The serialized PushRequests of one stream, built without a message per record.

    A push of ``batch`` copies of ``template`` (sequence and step unset) numbered
    from ``first``: each record is the template's bytes with its sequence and
    step fields appended (protobuf takes fields in any order), so the server
    parses exactly the request that ``CopyFrom`` and two field sets per record
    would send, of the same size (tests/test_bench_server.py), at a fraction of
    the client's CPU.
    """

    def __init__(self, monitor_pb2: Any, template: Any, session: str) -> None:
        record_fields = monitor_pb2.StepRecord.DESCRIPTOR.fields_by_name
        push_fields = monitor_pb2.PushRequest.DESCRIPTOR.fields_by_name
        self._body = template.SerializeToString()
        self._sequence_tag = _varint(record_fields["sequence"].number << 3)  # varint: wire type 0
        self._step_tag = _varint(record_fields["step"].number << 3)
        self._records_tag = _varint(push_fields["records"].number << 3 | 2)  # length-delimited
        session_bytes = session.encode()
        self._session = (  # proto3: an empty string is not sent
            _varint(push_fields["writer_session"].number << 3 | 2)
            + _varint(len(session_bytes))
            + session_bytes
            if session_bytes
            else b""
        )

    def push(self, first: int, batch: int) -> bytes:
        """The request of records ``first`` .. ``first + batch - 1`` (sequence = step)."""
        body, seq_tag, step_tag = self._body, self._sequence_tag, self._step_tag
        heads: dict[int, bytes] = {}  # varint length of the number -> the record's tag and length
        parts: list[bytes] = []
        for seq in range(first, first + batch):
            number = _varint(seq)
            head = heads.get(len(number))
            if head is None:
                size = len(body) + len(seq_tag) + len(step_tag) + 2 * len(number)
                head = heads[len(number)] = self._records_tag + _varint(size)
            parts += (head, body, seq_tag, number, step_tag, number)
        parts.append(self._session)
        return b"".join(parts)


def ingest_worker(target: str, run_id: str, args: dict[str, Any], start_at: float, q: Any) -> None:
    import grpc

    from inversion_monitor.proto.v1 import monitor_pb2, monitor_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        stub = monitor_pb2_grpc.MonitorServiceStub(channel)
        session = _open(stub, monitor_pb2, run_id)
        payloads = PushPayloads(
            monitor_pb2, _record(monitor_pb2, run_id, args["components"]), session
        )
        service = monitor_pb2.DESCRIPTOR.services_by_name["MonitorService"].full_name
        # the request goes as the bytes PushPayloads built (no serializer), the answer is parsed
        push = channel.unary_unary(
            f"/{service}/Push", response_deserializer=monitor_pb2.PushResponse.FromString
        )
        seq = accepted = 0
        batch = args["batch"]
        time.sleep(max(0.0, start_at - time.time()))
        end = start_at + args["duration"]
        while time.time() < end:
            accepted += push(payloads.push(seq + 1, batch), timeout=30).accepted
            seq += batch
        q.put(accepted)


def _drive_ingest(
    servers: list[Server], args: argparse.Namespace, tag: str, database_cpu: Any = None
) -> tuple[float, float, float, float]:
    """``--clients`` processes push to ``servers`` (split round-robin) for ``--duration``.

    Returns (committed records/s over every server, server cores used, database
    cores used: ``database_cpu()`` seconds over the wall time, 0 without it, client
    cores used: the load generators' CPU seconds over the wall time, all on this machine).
    """
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    start_at = time.time() + 3.0  # let every worker import and open its run
    params = {"duration": args.duration, "batch": args.batch, "components": args.components}
    procs = [
        ctx.Process(
            target=ingest_worker,
            args=(servers[i % len(servers)].target, f"{tag}-{i}", params, start_at, q),
        )
        for i in range(args.clients)
    ]
    for p in procs:
        p.start()
    time.sleep(max(0.0, start_at - time.time()))

    def committed() -> float:
        return sum(s.metric("inversion_monitor_records_ingested_total") for s in servers)

    def clients_cpu() -> float:
        return sum(_cpu_seconds(p.pid) for p in procs if p.pid is not None)

    before, t0 = committed(), time.time()
    cpu0 = sum(s.cpu_seconds() for s in servers)
    db0 = database_cpu() if database_cpu is not None else 0.0
    client0 = clients_cpu()
    time.sleep(args.duration)
    after, t1 = committed(), time.time()
    cpu = sum(s.cpu_seconds() for s in servers) - cpu0
    db = (database_cpu() - db0) if database_cpu is not None else 0.0
    client = clients_cpu() - client0  # read before they exit (the last push may be in flight)
    accepted = sum(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(60)
    wall = t1 - t0
    rate = (after - before) / wall
    print(
        f"  ingest ({tag}): {args.clients} clients x batches of {args.batch} over "
        f"{len(servers)} server(s): {accepted:,} records accepted in ~{args.duration:.0f} s; "
        f"committed rate {rate:,.0f} records/s; servers used {cpu / wall:.2f} cores "
        f"({(after - before) / max(cpu, 1e-9):,.0f} records per server CPU-second)"
        + (f"; database used {db / wall:.2f} cores" if database_cpu is not None else "")
        + f"; clients used {client / wall:.2f} cores"
    )
    return rate, cpu / wall, db / wall, client / wall


def phase_ingest(args: argparse.Namespace, tmp: Path) -> float:
    server = Server(tmp / "ingest.db")
    try:
        return _drive_ingest([server], args, "ingest")[0]
    finally:
        server.stop()


# ---------------------------------------------------------------- phase 2: latency


async def _latency_main(
    target: str, run_ids: list[str], params: dict[str, Any], start_at: float
) -> list[float]:
    import grpc

    from inversion_monitor.proto.v1 import monitor_pb2, monitor_pb2_grpc

    rate, duration, components = params["rate"], params["duration"], params["components"]
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = monitor_pb2_grpc.MonitorServiceStub(channel)
        sessions = {}
        for run_id in run_ids:
            info = monitor_pb2.RunInfo(run_id=run_id, name=run_id, world_size=1)
            opened = await stub.OpenRun(monitor_pb2.OpenRunRequest(run=info), timeout=30)
            sessions[run_id] = opened.writer_session
        per_push = params["per_push"]
        pushes = int(duration * rate / per_push) + 1
        # built before the clock starts, so the loop only sends
        prepared: dict[str, list[Any]] = {}
        for run_id in run_ids:
            template = _record(monitor_pb2, run_id, components)
            requests = []
            for n in range(pushes):
                request = monitor_pb2.PushRequest(writer_session=sessions[run_id])
                for k in range(per_push):
                    rec = request.records.add()
                    rec.CopyFrom(template)
                    rec.sequence = rec.step = n * per_push + k + 1
                requests.append(request)
            prepared[run_id] = requests

        async def one_run(index: int, run_id: str) -> None:
            period = per_push / rate
            next_t = start_at + period * index / len(run_ids)
            for request in prepared[run_id]:
                if next_t >= start_at + duration:
                    break
                await asyncio.sleep(max(0.0, next_t - time.time()))
                t0 = time.perf_counter()
                await stub.Push(request, timeout=30)
                latencies.append(time.perf_counter() - t0)
                next_t += period

        await asyncio.gather(*(one_run(i, r) for i, r in enumerate(run_ids)))
    return latencies


def latency_worker(
    target: str, run_ids: list[str], params: dict[str, Any], start_at: float, q: Any
) -> None:
    q.put(asyncio.run(_latency_main(target, run_ids, params, start_at)))


def phase_latency(args: argparse.Namespace, tmp: Path, per_push: int) -> float:
    server = Server(tmp / f"latency-{per_push}.db")
    try:
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        start_at = time.time() + 5.0
        params = {
            "rate": args.rate,
            "duration": args.duration,
            "components": args.components,
            "per_push": per_push,
        }
        runs = [f"lat-{i}" for i in range(args.runs)]
        chunks = [runs[i :: args.latency_procs] for i in range(args.latency_procs)]
        procs = [
            ctx.Process(target=latency_worker, args=(server.target, chunk, params, start_at, q))
            for chunk in chunks
        ]
        for p in procs:
            p.start()
        time.sleep(max(0.0, start_at - time.time()))
        cpu0 = server.cpu_seconds()
        latencies = sorted(x for _ in procs for x in q.get(timeout=args.duration + 120))
        cpu = server.cpu_seconds() - cpu0
        server_p50, server_p99 = server.push_quantiles(0.5, 0.99)
        commits = server.metric("inversion_monitor_push_commits_total")
        for p in procs:
            p.join(60)
        p50 = latencies[len(latencies) // 2] * 1e3
        p99 = latencies[int(len(latencies) * 0.99)] * 1e3
        print(
            f"  latency: {args.runs} runs x {args.rate:g} records/s, {per_push} per push, "
            f"for {args.duration:.0f} s: "
            f"{len(latencies):,} pushes, p50 {p50:.1f} ms, p99 {p99:.1f} ms, "
            f"max {latencies[-1] * 1e3:.1f} ms (client side); server side p50 "
            f"{server_p50 * 1e3:.1f} ms, p99 {server_p99 * 1e3:.1f} ms; server used "
            f"{cpu / args.duration:.2f} cores; {len(latencies) / max(commits, 1):.1f} pushes "
            "per commit"
        )
        return p99
    finally:
        server.stop()


# ---------------------------------------------------------------- phase 3: runs


def _grow(stub: Any, monitor_pb2: Any, run_ids: list[str], components: int) -> None:
    """Open ``run_ids`` and push one record each, 128 calls in flight at a time (below the
    server's max_concurrent_rpcs of 256: a call the client has seen end may hold its slot on
    a loaded server a moment longer, and the next chunk would be refused)."""
    for i in range(0, len(run_ids), 128):
        chunk = run_ids[i : i + 128]
        opened = [
            stub.OpenRun.future(
                monitor_pb2.OpenRunRequest(
                    run=monitor_pb2.RunInfo(run_id=r, name=r, project="bench", world_size=1)
                ),
                timeout=60,
            )
            for r in chunk
        ]
        pushes = []
        for run_id, future in zip(chunk, opened, strict=True):
            request = monitor_pb2.PushRequest(writer_session=future.result().writer_session)
            rec = request.records.add()
            rec.CopyFrom(_record(monitor_pb2, run_id, components))
            rec.sequence, rec.step = 1, 100
            pushes.append(stub.Push.future(request, timeout=60))
        for future in pushes:
            future.result()


def _open_rate(stub: Any, monitor_pb2: Any, run_ids: list[str]) -> float:
    """OpenRun calls per second, one at a time (the latency a client sees)."""
    t0 = time.perf_counter()
    for run_id in run_ids:
        _open(stub, monitor_pb2, run_id)
    return len(run_ids) / (time.perf_counter() - t0)


def _side_by_side_rates(
    small: Any, big: Any, monitor_pb2: Any, tag: str, *, rounds: int = 5, per_round: int = 200
) -> tuple[float, float]:
    """Median OpenRun/s of two servers, measured in alternating rounds (load drift cancels)."""
    rates: dict[str, list[float]] = {"small": [], "big": []}
    for r in range(rounds):
        for name, stub in (("small", small), ("big", big)):
            ids = [f"{tag}-{name}-{r}-{i}" for i in range(per_round)]
            rates[name].append(_open_rate(stub, monitor_pb2, ids))
    return statistics.median(rates["small"]), statistics.median(rates["big"])


def phase_runs(args: argparse.Namespace, tmp: Path) -> dict[int, tuple[float, float, float]]:
    """``{runs: (median scrape ms, OpenRun/s there, OpenRun/s at ~1,000 runs)}``.

    Two servers side by side: a small one that stays near 1,000 runs and a big
    one that grows to each size; OpenRun is timed on both in alternating rounds.
    """
    import grpc

    from inversion_monitor.proto.v1 import monitor_pb2, monitor_pb2_grpc

    sizes = sorted(args.scrape_runs)
    extra = ("--max-active-runs", str(sizes[-1] + 10_000))
    small_server = Server(tmp / "small.db", *extra)
    server = Server(tmp / "runs.db", *extra)
    out: dict[int, tuple[float, float, float]] = {}
    try:
        with (
            grpc.insecure_channel(small_server.target) as small_channel,
            grpc.insecure_channel(server.target) as channel,
        ):
            small = monitor_pb2_grpc.MonitorServiceStub(small_channel)
            stub = monitor_pb2_grpc.MonitorServiceStub(channel)
            _grow(small, monitor_pb2, [f"small-{i}" for i in range(1000)], args.components)
            have = 0
            for size in sizes:
                _grow(stub, monitor_pb2, [f"run-{i}" for i in range(have, size)], args.components)
                have = size
                times, length = [], 0
                for _ in range(args.scrapes):
                    t0 = time.perf_counter()
                    with urllib.request.urlopen(server.http + "/metrics", timeout=60) as resp:
                        length = len(resp.read())
                    times.append(time.perf_counter() - t0)
                small_rate, rate = _side_by_side_rates(small, stub, monitor_pb2, f"at{size}")
                have += 1000
                median, worst = statistics.median(times) * 1e3, max(times) * 1e3
                print(
                    f"  runs: {size:,} runs, /metrics {length / 1024:,.0f} KiB: median "
                    f"{median:.1f} ms, max {worst:.1f} ms over {args.scrapes} scrapes; "
                    f"OpenRun {rate:,.0f}/s vs {small_rate:,.0f}/s on a server with ~1,000 "
                    f"runs, side by side (ratio {rate / small_rate:.2f})"
                )
                out[size] = (median, rate, small_rate)
    finally:
        server.stop()
        small_server.stop()
    return out


# ---------------------------------------------------------------- phase 4: render


def phase_render(args: argparse.Namespace) -> None:
    """The server's Exposition vs prometheus_client's generate_latest, in-process, same runs."""
    from prometheus_client import CollectorRegistry, generate_latest

    from inversion_monitor.proto.v1 import monitor_pb2
    from inversion_monitor.server.config import Limits, ServerConfig
    from inversion_monitor.server.ingest import Ingestor
    from inversion_monitor.server.metrics import Exposition, MonitorCollector
    from inversion_monitor.server.store import Store

    for size in sorted(args.scrape_runs):
        cfg = ServerConfig(db=":memory:", limits=Limits(max_active_runs=size + 1))
        ingestor = Ingestor(Store(":memory:"), cfg)
        for i in range(size):
            run_id = f"run-{i}"
            info = monitor_pb2.RunInfo(run_id=run_id, name=run_id, project="bench", world_size=1)
            session = ingestor.open_run(monitor_pb2.OpenRunRequest(run=info)).writer_session
            rec = _record(monitor_pb2, run_id, args.components)
            rec.sequence, rec.step = 1, 100
            ingestor.push(monitor_pb2.PushRequest(records=[rec], writer_session=session))
        collector = MonitorCollector(
            partial(getattr, ingestor, "views"), partial(getattr, ingestor, "counters"), 3600.0
        )
        exposition = Exposition(collector, CollectorRegistry())
        reference = CollectorRegistry()
        reference.register(collector)
        t0 = time.perf_counter()
        exposition.render()  # cold: every run's lines formatted
        cold = time.perf_counter() - t0
        fast = min(_timed(exposition.render) for _ in range(5))
        slow = min(_timed(partial(generate_latest, reference)) for _ in range(3))
        print(
            f"  render: {size:,} runs: Exposition {fast * 1e3:.1f} ms (cold {cold * 1e3:.1f} ms) "
            f"vs prometheus_client generate_latest {slow * 1e3:.1f} ms: {slow / fast:.1f}x faster"
        )
        ingestor.close()


# ---------------------------------------------------------------- phase 5: health records


def _health_record(monitor_pb2: Any, run_id: str, nonfinite: bool) -> Any:
    """A per-step health-only record (RL keys included); ``nonfinite``: a NaN loss."""
    rec = monitor_pb2.StepRecord(run_id=run_id, wall_time=time.time())
    rec.loss = float("nan") if nonfinite else 2.31
    rec.grad_norm, rec.learning_rate, rec.kl, rec.clip_ratio = 0.84, 3e-4, 0.02, 0.01
    rec.reward_mean, rec.reward_std, rec.policy_entropy_mean = 0.42, 0.2, 1.1
    rec.entropy_covariance, rec.completion_length_mean = 0.003, 96.0
    if nonfinite:
        rec.nonfinite_fields.append("loss")
    return rec


def phase_health(args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    """Ingest cost per record, in-process (Ingestor.push: validation, SQLite commit, the
    run's view and gauges), health-only records side by side with probe records."""
    from inversion_monitor.proto.v1 import monitor_pb2
    from inversion_monitor.server.config import ServerConfig
    from inversion_monitor.server.ingest import Ingestor
    from inversion_monitor.server.store import Store

    kinds = {
        "probe record": lambda run_id: _record(monitor_pb2, run_id, args.components),
        "health only": lambda run_id: _health_record(monitor_pb2, run_id, False),
        "health only, NaN loss": lambda run_id: _health_record(monitor_pb2, run_id, True),
    }
    out: dict[str, dict[int, float]] = {name: {} for name in kinds}
    for per_push in (1, args.batch):
        pushes = max(20, 20_000 // per_push)
        for round_ in range(3):  # interleaved rounds: drift hits every kind alike
            for name, make in kinds.items():
                run_id = f"health-{per_push}-{round_}-{abs(hash(name))}"
                ingestor = Ingestor(Store(tmp / f"{run_id}.db"), ServerConfig())
                info = monitor_pb2.RunInfo(run_id=run_id, name=run_id, world_size=1)
                session = ingestor.open_run(monitor_pb2.OpenRunRequest(run=info)).writer_session
                template = make(run_id)
                requests = []
                seq = 0
                for _ in range(pushes):
                    request = monitor_pb2.PushRequest(writer_session=session)
                    for _ in range(per_push):
                        seq += 1
                        rec = request.records.add()
                        rec.CopyFrom(template)
                        rec.sequence = rec.step = seq
                    requests.append(request)
                start = time.perf_counter()
                for request in requests:
                    ingestor.push(request)
                elapsed = time.perf_counter() - start
                ingestor.close()
                us = elapsed / seq * 1e6
                out[name][per_push] = min(out[name].get(per_push, math.inf), us)
    print("  ingest in-process (Ingestor.push), best of 3 rounds, microseconds per record:")
    print(f"  {'record':<24} " + " ".join(f"{f'{n}/push':>12}" for n in (1, args.batch)))
    for name, by_size in out.items():
        cells = " ".join(f"{by_size[n]:>12.1f}" for n in (1, args.batch))
        print(f"  {name:<24} {cells}")
    return {name: by_size[args.batch] for name, by_size in out.items()}


# ---------------------------------------------------------------- backends side by side

BACKENDS = ("sqlite", "postgresql", "postgresql-2")


def _postgres_cluster() -> Any:
    """The tests' throwaway PostgreSQL 15 cluster (tests/postgres_support.py), fsync off."""
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    from tests.postgres_support import PostgresCluster

    return PostgresCluster()


def _process_tree_cpu(pid: int) -> float:
    """CPU seconds of process ``pid`` and its children (PostgreSQL: the postmaster and its
    backends), reaped children included."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process has gone
            continue
        if stat.parent.name == str(pid) or fields[1] == str(pid):
            total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return total / os.sysconf("SC_CLK_TCK")


def _grow_and_scrape(servers: list[Server], args: argparse.Namespace, tag: str) -> float:
    """Grow to ``--backend-runs`` runs (opened across ``servers``), wait until every server
    shows them all, return the worst server's median /metrics time (ms)."""
    import grpc

    from inversion_monitor.proto.v1 import monitor_pb2, monitor_pb2_grpc

    size = args.backend_runs
    for index, server in enumerate(servers):
        with grpc.insecure_channel(server.target) as channel:
            stub = monitor_pb2_grpc.MonitorServiceStub(channel)
            ids = [f"{tag}-run-{i}" for i in range(index, size, len(servers))]
            _grow(stub, monitor_pb2, ids, args.components)
    medians = []
    for server in servers:
        deadline = time.monotonic() + 300
        while server.metric("inversion_monitor_active_runs") < size + args.clients:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{server.http} never showed {size:,} runs")
            time.sleep(0.5)  # another replica's runs arrive in the next read-back round
        times, length = [], 0
        for _ in range(args.scrapes):
            t0 = time.perf_counter()
            with urllib.request.urlopen(server.http + "/metrics", timeout=60) as resp:
                length = len(resp.read())
            times.append(time.perf_counter() - t0)
        medians.append(statistics.median(times) * 1e3)
        print(
            f"  scrape ({tag}): {size + args.clients:,} runs, /metrics {length / 1024:,.0f} KiB: "
            f"median {medians[-1]:.1f} ms, max {max(times) * 1e3:.1f} ms over {args.scrapes}"
        )
    return max(medians)


def phase_backends(args: argparse.Namespace, tmp: Path) -> dict[str, tuple[float, ...]]:
    """``{backend: (records/s, server cores, database cores, scrape ms, client cores)}``, one
    after another in this run: the same clients, batches and run count for each store."""
    cluster: Any = None
    out: dict[str, tuple[float, ...]] = {}
    try:
        for backend in args.backends:
            database_cpu = None
            if backend == "sqlite":
                target: Path | str = tmp / "backend.db"
            else:
                if cluster is None:
                    cluster = _postgres_cluster()
                target = cluster.url(cluster.create_database())
                postmaster = int((cluster.data / "postmaster.pid").read_text().split()[0])
                database_cpu = partial(_process_tree_cpu, postmaster)
            replicas = 2 if backend == "postgresql-2" else 1
            extra = ("--max-active-runs", str(args.backend_runs + args.clients + 1000))
            servers = [Server(target, *extra) for _ in range(replicas)]
            try:
                rate, cores, db_cores, client_cores = _drive_ingest(
                    servers, args, backend, database_cpu
                )
                scrape_ms = _grow_and_scrape(servers, args, backend)
            finally:
                for server in servers:
                    server.stop()
            out[backend] = (rate, cores, db_cores, scrape_ms, client_cores)
    finally:
        if cluster is not None:
            cluster.close()
    print(
        f"\n{'backend':<14} {'records/s':>10} {'server cores':>13} {'per server CPU-s':>17} "
        f"{'db cores':>9} {'client cores':>13} {f'scrape ms @{args.backend_runs:,}':>18}"
    )
    for backend, (rate, cores, db_cores, scrape_ms, client_cores) in out.items():
        db_text = f"{db_cores:.2f}" if backend != "sqlite" else "-"
        print(
            f"{backend:<14} {rate:>10,.0f} {cores:>13.2f} {rate / max(cores, 1e-9):>17,.0f} "
            f"{db_text:>9} {client_cores:>13.2f} {scrape_ms:>18.1f}"
        )
    return out


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's options (``argv``: the command line without the program name)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per timed phase")
    parser.add_argument("--clients", type=int, default=4, help="ingest client processes")
    parser.add_argument("--batch", type=int, default=500, help="records per ingest push")
    parser.add_argument("--components", type=int, default=8, help="component stats per record")
    parser.add_argument("--runs", type=int, default=100, help="runs in the latency phase")
    parser.add_argument("--rate", type=float, default=10.0, help="records/s per run (latency)")
    parser.add_argument("--latency-procs", type=int, default=4, help="latency client processes")
    parser.add_argument(
        "--per-push",
        type=int,
        default=10,
        help="records per push in the second latency run (a client flushing once a second)",
    )
    parser.add_argument(
        "--scrape-runs",
        type=lambda text: [int(x) for x in text.split(",")],
        default=[10_000, 40_000],
        help="run counts to scrape /metrics at, comma-separated (10000,40000)",
    )
    parser.add_argument("--scrapes", type=int, default=10)
    parser.add_argument(
        "--backends",
        type=lambda text: [x for x in text.split(",") if x],
        default=[],
        help="compare stores side by side (ingest and scrape phases): any of "
        + ",".join(BACKENDS)
        + " (postgresql-2: two replicas of one database, clients split across both); "
        "alone, runs only this comparison",
    )
    parser.add_argument(
        "--backend-runs", type=int, default=10_000, help="runs to scrape at per backend"
    )
    parser.add_argument(
        "--phases",
        default=None,
        help="which phases to run (default ingest,latency,runs,render,health; "
        "'backends' with --backends alone)",
    )
    args = parser.parse_args(argv)
    unknown = set(args.backends) - set(BACKENDS)
    if unknown:
        parser.error(f"--backends: unknown {sorted(unknown)}; choose from {','.join(BACKENDS)}")
    if args.phases is None:
        args.phases = "backends" if args.backends else "ingest,latency,runs,render,health"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    python = sys.version.split()[0]
    print(f"bench_server: {os.cpu_count()} CPUs (load average {load}), Python {python}")
    phases = set(args.phases.split(","))
    rows: list[tuple[str, str, str, bool]] = []
    with tempfile.TemporaryDirectory() as tmp:
        if "ingest" in phases:
            ingest = phase_ingest(args, Path(tmp))
            goal = GOALS["ingest"]
            rows.append(
                (
                    "ingest (records/s committed)",
                    f"{ingest:,.0f}",
                    f">= {goal:,.0f}",
                    ingest >= goal,
                )
            )
        if "latency" in phases:
            for per_push in (1, args.per_push):
                p99 = phase_latency(args, Path(tmp), per_push=per_push)
                rows.append(
                    (
                        f"Push p99, {per_push} records/push (ms)",
                        f"{p99:.1f}",
                        f"<= {GOALS['p99_ms']:.0f}",
                        p99 <= GOALS["p99_ms"],
                    )
                )
        if "runs" in phases:
            runs = phase_runs(args, Path(tmp))
            for size, (median, rate, small_rate) in sorted(runs.items()):
                goal_ms = SCRAPE_GOALS_MS.get(size, SCRAPE_GOALS_MS[10_000])
                rows.append(
                    (
                        f"/metrics at {size:,} runs, median (ms)",
                        f"{median:.1f}",
                        f"<= {goal_ms:.0f}",
                        median <= goal_ms,
                    )
                )
                rows.append(
                    (
                        f"OpenRun/s at {size:,} vs ~1,000 runs",
                        f"{rate / small_rate:.2f}",
                        ">= 0.8",
                        rate / small_rate >= 0.8,
                    )
                )
        if "backends" in phases and args.backends:
            for backend, (rate, _, _, scrape_ms, _) in phase_backends(args, Path(tmp)).items():
                goal = GOALS["ingest"]
                rows.append(
                    (
                        f"{backend} ingest (records/s)",
                        f"{rate:,.0f}",
                        f">= {goal:,.0f}",
                        rate >= goal,
                    )
                )
                goal_ms = SCRAPE_GOALS_MS[10_000]
                rows.append(
                    (
                        f"{backend} /metrics at {args.backend_runs:,} runs (ms)",
                        f"{scrape_ms:.1f}",
                        f"<= {goal_ms:.0f}",
                        scrape_ms <= goal_ms,
                    )
                )
        if "render" in phases:
            phase_render(args)
        if "health" in phases:
            health = phase_health(args, Path(tmp))
            for name, us in health.items():
                rows.append((f"ingest {name} (us/record)", f"{us:.1f}", "", True))
    print(f"\n{'figure':<44} {'measured':>10} {'goal':>10}  met")
    for name, value, goal_text, ok in rows:
        print(f"{name:<44} {value:>10} {goal_text:>10}  {'yes' if ok else 'NO'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
