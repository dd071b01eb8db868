"""Every GPU section of every benchmark in one command, with one JSON of the figures.

Usage: python benchmarks/bench_gpu.py [--out build/bench-gpu.json] [--sections a,b]
       [--timeout 1800] [--dry-run]

(``make bench-gpu`` runs it with the defaults.) It exits with status 2 and
says why when no CUDA device is present (a CPU-only torch wheel included);
``--dry-run`` runs every section on the CPU at a tiny shape instead, to check
the script and the benchmarks it calls (``tests/test_bench_gpu.py``). Each
section runs in its own subprocess (a failure or an out-of-memory ends that
section only; the exit status is then 1) and the JSON holds, per section,
its figures, the tail of what it printed, its wall time and any error.

Sections (the benchmark functions they call; the GPU shape, then the dry run's):

- ``probe``: ``bench_probe.gpu_rows`` (bf16 Qwen2-0.5B shape, 24 layers,
  training step on 8 x 1,024 vs the probe on 4 x 1,024, 64 targets; dry run:
  a 2-layer width-64 fp32 Qwen2; every dry-run model is fp32) and
  ``bench_probe.entropy_memory`` ([8, 1024, 32000] bf16 logits; dry run:
  [2, 64, 512]).
- ``probe_counts``: ``bench_probe_counts.count_probe`` (ops, syncs, solves)
  at 64 and 256 targets, the small shape (Llama d 256, fp32, 4 x 256) and the
  0.5B shape (bf16, 4 x 1,024); dry run: width 64, 4 x 64, 8 and 16 targets.
- ``memory_goal``: ``bench_memory_goal`` (the probe's peak extra memory on one
  Llama-3-8B-shaped layer, vocab 128k, bf16, 4 x T for T 2,048-8,192; dry
  run: d 64, fp32, T 64 / 128).
- ``overhead``: ``bench_overhead``'s GPU section (HF Trainer on the 0.5B
  shape, 8 x 1,024, plain / default / every step / health only with bf16
  parameters, and plain / default / every step under ``bf16=True``, 2 rounds
  x 24 steps; dry run: width 64, 8 x 32, 2 x 2 steps).
- ``general_path``: ``bench_general_path`` (bench shape, layers [0, -1] and
  [1, -1]; dry run: width 32, 2 layers, layers [0, -1], no brute force).
- ``stats``: ``bench_stats`` (correlation, sampler, covariance timings).
- ``sharded``: ``bench_sharded`` (FSDP2 on one rank per GPU; dry run: gloo, 1 rank).
- ``scaling``: ``bench_scaling.run`` (the full grid d 256-2,048 x T 256-4,096,
  long context T 2,048-16,384 with the allocator's peak; dry run: d 64/128, T 64/128).

On a bare GPU machine with only the repository (no network needed after
the installs), from its root::

    python3 -m venv .venv
    .venv/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128
    .venv/bin/pip install -c .ci/constraints.txt -e ".[dev]"
    .venv/bin/python benchmarks/bench_gpu.py --out build/bench-gpu.json

(pick the CUDA wheel index that matches the driver, ``nvidia-smi``; the
``dev`` extra brings transformers, TRL, datasets, scipy and the gRPC server
the sections import). The whole run takes about 10-20 minutes on one H100-class
GPU; ``--sections scaling,probe`` runs a subset.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MARK = "BENCH_GPU_FIGURES:"
NO_CUDA_EXIT = 2


def _tiny_qwen(layers: int = 2) -> Any:
    from benchmarks.bench_probe_counts import tiny_qwen

    return tiny_qwen(layers)


@contextlib.contextmanager
def _patched(module: Any, name: str, value: Any, active: bool) -> Iterator[None]:
    """``module.name = value`` for the block when ``active`` (the dry run's tiny shapes)."""
    if not active:
        yield
        return
    if not hasattr(module, name):
        raise AttributeError(f"{module.__name__} has no {name}: update bench_gpu.py")
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


def _argv_main(main: Callable[[], None], argv: list[str]) -> None:
    """Run a benchmark's ``main()`` with ``argv`` as its command line."""
    saved = sys.argv
    sys.argv = ["bench", *argv]
    try:
        main()
    finally:
        sys.argv = saved


# ----------------------------------------------------------------------- sections


def section_probe(device: str, tiny: bool) -> dict[str, Any]:
    import torch

    from benchmarks import bench_probe

    with _patched(bench_probe, "qwen_half_billion", lambda layers: _tiny_qwen(2), tiny):
        rows = bench_probe.gpu_rows(torch.device(device), 1 if tiny else 3, 64 if tiny else 1024)
    bench_probe.print_steps(rows)
    child = bench_probe._MEMORY_CHILD
    if tiny:
        if "8, 1024, 32000" not in child:
            raise AssertionError("bench_probe._MEMORY_CHILD's shape changed: update bench_gpu.py")
        child = child.replace("8, 1024, 32000", "2, 64, 512")
    with _patched(bench_probe, "_MEMORY_CHILD", child, tiny):
        memory = bench_probe.entropy_memory(torch.device(device))
    return {"steps": rows, "entropy_memory": memory}


def section_probe_counts(device: str, tiny: bool) -> dict[str, Any]:
    import torch

    from benchmarks import bench_probe_counts as counts
    from inversion_monitor.toy.models import tiny_causal_lm

    out: dict[str, Any] = {}
    targets = (8, 16) if tiny else (64, 256)
    for name in ("small", "0.5b"):
        if name == "small":
            width = 64 if tiny else 256
            model = tiny_causal_lm(
                "llama", vocab_size=8192, hidden_size=width, num_layers=4, num_heads=8
            )
            length = 64 if tiny else 256
        else:
            model = _tiny_qwen(2) if tiny else counts.qwen_half_billion(24)
            length = 64 if tiny else 1024
        model.to(device)
        vocab = int(model.config.vocab_size)
        ids = torch.randint(4, vocab, (4, length), generator=torch.Generator().manual_seed(0))
        prefix, capture = counts.captured(model, ids.to(device))
        try:
            rows = {}
            for count in targets:
                row = counts.count_probe(
                    model, ids.to(device), prefix, counts.positions(4, length, count).to(device)
                )
                row["largest"] = list(map(str, row["largest"]))
                row["solve_shapes"] = {str(k): v for k, v in row["solve_shapes"].items()}
                rows[str(count)] = row
                print(name, count, {k: row[k] for k in ("ops", "syncs", "solves", "seconds")})
        finally:
            capture.remove()
        out[name] = {"length": length, "targets": rows}
    return out


def section_overhead(device: str, tiny: bool) -> dict[str, Any]:
    from benchmarks import bench_overhead

    class TinyShape(bench_overhead.GpuShape):  # type: ignore[misc,name-defined]
        def model(self, seed: int, dtype: Any = None) -> Any:
            return _tiny_qwen(1)

    shape = TinyShape(layers=1, length=32) if tiny else bench_overhead.GpuShape()
    variants = ["plain", "default", "every step", "health only"]
    # and under ``bf16=True`` (autocast over fp32 master weights)
    variants += [v + bench_overhead.BF16 for v in ("plain", "default", "every step")]
    per_round = 2 if tiny else 24
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        bench_overhead.measure(
            variants,
            2,
            per_round,
            lambda variant, steps, seed: bench_overhead.train(variant, steps, seed, gpu=shape),
        )
    text = captured.getvalue()
    print(text)
    return {"shape": {"layers": shape.layers, "length": shape.length}, "table": text}


def section_general_path(device: str, tiny: bool) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT / "benchmarks"))  # it imports bench_probe as a script does
    from benchmarks import bench_general_path
    from inversion_monitor.toy.models import tiny_causal_lm

    def small(arch: str, **shape: Any) -> Any:
        tiny = {"hidden_size": 32, "num_heads": 4, "num_layers": 2}
        return tiny_causal_lm(arch, **{**shape, **tiny})  # type: ignore[arg-type]

    argv = ["--device", device]
    argv += ["--rounds", "1", "--layers", "0,-1", "--skip-reference"] if tiny else []
    captured = io.StringIO()
    with (
        _patched(bench_general_path, "tiny_causal_lm", small, tiny),
        contextlib.redirect_stdout(captured),
    ):
        _argv_main(bench_general_path.main, argv)
    text = captured.getvalue()
    print(text)
    return {"rows": [json.loads(line) for line in text.splitlines() if line.startswith("{")]}


def section_stats(device: str, tiny: bool) -> dict[str, Any]:
    from benchmarks import bench_stats

    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        _argv_main(bench_stats.main, ["--device", device, "--repeats", "2" if tiny else "20"])
    text = captured.getvalue()
    print(text)
    return {"table": text}


def section_sharded(device: str, tiny: bool) -> dict[str, Any]:
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_sharded.py"), "--device", device]
    command += ["--world-size", "1", "--repeats", "1"] if tiny else []
    proc = subprocess.run(command, capture_output=True, text=True, check=False, cwd=ROOT)
    print(proc.stdout[-4000:], proc.stderr[-2000:])
    if proc.returncode != 0:
        raise RuntimeError(f"bench_sharded.py exited {proc.returncode}: {proc.stderr[-500:]}")
    return {"rows": [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]}


def section_scaling(device: str, tiny: bool) -> dict[str, Any]:
    import torch

    from benchmarks import bench_scaling

    if tiny:
        grid, lengths, rounds = [(64, 64), (128, 64), (64, 128)], (128, 256), 1
    else:
        grid, lengths, rounds = bench_scaling.FULL_GRID, bench_scaling.FULL_LENGTHS, 2
    figures: dict[str, Any] = bench_scaling.run(torch.device(device), grid, rounds, lengths)
    return figures


def section_memory_goal(device: str, tiny: bool) -> dict[str, Any]:
    from benchmarks import bench_memory_goal

    figures: dict[str, Any] = bench_memory_goal.main(["--tiny"] if tiny else ["--device", device])
    return figures


SECTIONS: dict[str, Callable[[str, bool], dict[str, Any]]] = {
    "probe": section_probe,
    "memory_goal": section_memory_goal,
    "probe_counts": section_probe_counts,
    "overhead": section_overhead,
    "general_path": section_general_path,
    "stats": section_stats,
    "sharded": section_sharded,
    "scaling": section_scaling,
}


# ----------------------------------------------------------------------- driver


def run_section(name: str, device: str, tiny: bool) -> None:
    """In the section's own process: run it, print its figures after ``MARK``."""
    sys.path.insert(0, str(ROOT))
    figures = SECTIONS[name](device, tiny)
    print(MARK + json.dumps(figures, default=str), flush=True)


def spawn(name: str, device: str, tiny: bool, timeout: float) -> dict[str, Any]:
    """One section in a subprocess: its figures, output tail, wall time, or its error."""
    command = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--device"]
    command += [device, *(["--tiny"] if tiny else [])]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            command,
            check=False,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
            env=env,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout if isinstance(exc.stdout, str) else ""
        return {"ok": False, "error": f"timed out after {timeout:g} s", "output": out[-4000:]}
    seconds = time.perf_counter() - start
    figures = None
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            figures = json.loads(line[len(MARK) :])
    output = "\n".join(line for line in proc.stdout.splitlines() if not line.startswith(MARK))
    result: dict[str, Any] = {
        "ok": proc.returncode == 0 and figures is not None,
        "seconds": round(seconds, 1),
        "figures": figures,
        "output": output[-4000:],
    }
    if not result["ok"]:
        result["error"] = f"exit status {proc.returncode}: {proc.stderr[-3000:]}"
    return result


def cuda_problem() -> str | None:
    """None when a CUDA device is usable, else why not (in words)."""
    import torch

    if torch.version.cuda is None:
        return (
            f"this torch ({torch.__version__}) is a CPU-only build: install a CUDA wheel "
            "(see this script's docstring)"
        )
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        return "torch sees no CUDA device (driver, CUDA_VISIBLE_DEVICES?)"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "build" / "bench-gpu.json"))
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per section")
    parser.add_argument("--dry-run", action="store_true", help="every section on CPU, tiny")
    parser.add_argument("--section", help=argparse.SUPPRESS)  # a child: run this one
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.section:
        try:
            run_section(args.section, args.device, args.tiny)
        except Exception:
            traceback.print_exc()
            return 1
        return 0
    chosen = [s for s in args.sections.split(",") if s]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        parser.error(f"--sections: unknown {unknown}; choose from {', '.join(SECTIONS)}")
    import torch

    device = "cpu"
    if not args.dry_run:
        problem = cuda_problem()
        if problem is not None:
            print(
                f"bench-gpu: no CUDA device: {problem}. It measures the GPU sections only; "
                "--dry-run checks the script on the CPU at tiny shapes.",
                file=sys.stderr,
            )
            return NO_CUDA_EXIT
        device = "cuda"
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)",
        "dry_run": args.dry_run,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "sections": {},
    }
    for name in chosen:
        print(f"bench-gpu: {name} ...", flush=True)
        result = spawn(name, device, args.dry_run, args.timeout)
        report["sections"][name] = result
        status = "ok" if result["ok"] else f"FAILED ({result['error'][:300]})"
        print(f"bench-gpu: {name}: {status} in {result.get('seconds', '?')} s", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str))
    failed = [n for n, r in report["sections"].items() if not r["ok"]]
    print(f"bench-gpu: wrote {out}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
