"""The server's CPU per ingested record, in-process and load-independent.

A server's writer thread does, per record: validation, the push steps (verdicts,
SQL rows, acks), the store's insert and the ingest listeners (the alert
detectors, the entropy-law tracker). This drives exactly that path
(``Ingestor.push`` on a SQLite file, listeners as ``serve`` wires them) with the
ingest benchmark's records (bench_server's ``_record``: a probe record with 8
component statistics; ``--vary`` moves every value a little per record, so the
detectors' windows are not constant; ``--health --kind rl``: an RL step's health values too, which
every RL detector reads) in pushes of ``--batch``.

Seconds depend on the machine's load; instructions do not. Run under callgrind
twice, at two record counts, and take the difference over the records (start-up
and imports cancel)::

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python benchmarks/bench_ingest_cpu.py --records 2000   # prints "Collected: N"
    # ... again with --records 6000; instructions/record = (N2 - N1) / 4000

``--instructions`` does that itself (needs valgrind), ``--profile`` prints
cProfile's top functions by own time instead.
"""

from __future__ import annotations

import argparse
import cProfile
import math
import pstats
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _requests(monitor_pb2: Any, session: str, run_id: str, args: argparse.Namespace) -> list[Any]:
    """Every push of the run, built before anything is timed."""
    from benchmarks.bench_server import _record

    template = _record(monitor_pb2, run_id, args.components)
    out, seq = [], 0
    while seq < args.records:
        request = monitor_pb2.PushRequest(writer_session=session)
        for _ in range(min(args.batch, args.records - seq)):
            seq += 1
            rec = request.records.add()
            rec.CopyFrom(template)
            rec.sequence = rec.step = seq
            w, c = math.sin(seq * 0.7), math.cos(seq * 1.3)
            if args.health:  # an RL step's health values (the detectors that read them run)
                v = 1.0 if args.vary else 0.0
                rec.grad_norm = 1.2 + 0.1 * v * c
                rec.reward_mean, rec.reward_std = 0.4 + 0.03 * v * w, 0.2
                rec.policy_entropy_mean = 1.1 + 0.02 * v * c
                rec.entropy_covariance = 0.01
                rec.kl = 0.05 + 0.005 * v * w
                rec.clip_ratio = 0.01
                rec.completion_length_mean = 300.0 + 10.0 * v * c
            if args.vary:  # deterministic wobble of the fields the record has
                rec.loss = 2.5 + 0.05 * w
                rec.inversion.spearman.value = -0.4 + 0.02 * w
                rec.inversion.pearson.value = -0.3 + 0.02 * c
                rec.entropy.mean = 2.1 + 0.03 * c
                rec.score.mean = 0.5 + 0.02 * w
        out.append(request)
    return out


def ingest(args: argparse.Namespace, tmp: Path) -> float:
    """Push ``args.records`` records; returns the seconds the pushes took."""
    from inversion_monitor.proto.v1 import monitor_pb2
    from inversion_monitor.server.alerts import AlertEngine
    from inversion_monitor.server.config import ServerConfig
    from inversion_monitor.server.detectors import AlertsConfig
    from inversion_monitor.server.entropy_law import EntropyLawMonitor
    from inversion_monitor.server.ingest import Ingestor
    from inversion_monitor.server.store import Store

    store = Store(tmp / "cpu.db")
    listeners: list[Any] = []
    if "law" in args.listeners:
        listeners.append(EntropyLawMonitor())
    if "alerts" in args.listeners:
        listeners.append(AlertEngine(AlertsConfig(), store))
    ingestor = Ingestor(store, ServerConfig(), listeners)
    run_id = "cpu-run"
    info = monitor_pb2.RunInfo(run_id=run_id, name=run_id, world_size=1, kind=args.kind)
    session = ingestor.open_run(monitor_pb2.OpenRunRequest(run=info)).writer_session
    # bytes as they come off the wire: the server parses each request
    wire = [r.SerializeToString() for r in _requests(monitor_pb2, session, run_id, args)]
    profile = cProfile.Profile() if args.profile else None
    start = time.perf_counter()
    if profile is not None:
        profile.enable()
    for payload in wire:
        ingestor.push(monitor_pb2.PushRequest.FromString(payload))
    if profile is not None:
        profile.disable()
    elapsed = time.perf_counter() - start
    stored = ingestor.counters.ingested
    ingestor.close()
    if stored != args.records:  # a rejected record would cost less than a stored one
        raise RuntimeError(f"{stored} of {args.records} records were stored")
    if profile is not None:
        pstats.Stats(profile).sort_stats("tottime").print_stats(args.profile)
    return elapsed


def _callgrind(argv: list[str], records: int) -> int:
    cmd = [
        "valgrind",
        "--tool=callgrind",
        "--callgrind-out-file=/dev/null",
        sys.executable,
        __file__,
        *argv,
        "--records",
        str(records),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    match = re.search(r"Collected : (\d+)", out)
    if match is None:
        raise RuntimeError(f"no instruction count in valgrind's output:\n{out[-2000:]}")
    return int(match.group(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=500, help="records per push")
    parser.add_argument("--components", type=int, default=8)
    parser.add_argument("--kind", default="", help="RunInfo.kind ('' or 'rl')")
    parser.add_argument("--vary", action="store_true", help="values move from record to record")
    parser.add_argument(
        "--health",
        action="store_true",
        help="records carry an RL step's health values (reward, policy entropy, KL, length, "
        "grad norm); with --kind rl every RL detector reads them",
    )
    parser.add_argument(
        "--listeners",
        default="law,alerts",
        help="the ingest listeners fed ('law,alerts' as serve wires them; '' for none)",
    )
    parser.add_argument("--profile", type=int, default=0, help="print cProfile's top N")
    parser.add_argument(
        "--instructions",
        type=int,
        nargs=2,
        metavar=("N1", "N2"),
        help="instructions per record under callgrind: (count at N2 - count at N1) / (N2 - N1)",
    )
    args = parser.parse_args(argv)
    if args.instructions:
        n1, n2 = args.instructions
        rest = ["--batch", str(args.batch), "--components", str(args.components)]
        rest += ["--kind", args.kind, "--listeners", args.listeners]
        rest += ["--vary"] if args.vary else []
        rest += ["--health"] if args.health else []
        low, high = _callgrind(rest, n1), _callgrind(rest, n2)
        print(f"instructions per record: {(high - low) / (n2 - n1):,.0f} ({n1} vs {n2} records)")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        elapsed = ingest(args, Path(tmp))
    print(f"{args.records:,} records: {elapsed / args.records * 1e6:.1f} us per record")
    return 0


if __name__ == "__main__":
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    sys.exit(main())
