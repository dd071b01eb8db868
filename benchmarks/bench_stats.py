"""Cost of the per-step statistics: run it, read the figures (no pass/fail).

    .venv/bin/python benchmarks/bench_stats.py [--device cuda] [--threads 1]

Times spearman, pearson, inversion_stats (with and without per-token-type),
entropy_covariance and TokenSampler.sample at sizes a monitor sees per step,
with torch.cuda.synchronize() around GPU timings.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from inversion_monitor.metrics.correlation import pearson, spearman
from inversion_monitor.metrics.covariance import entropy_covariance
from inversion_monitor.metrics.stats import inversion_stats
from inversion_monitor.probe.sampling import TokenSampler, valid_positions


def _time(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, float]:
    """Median and best wall time of ``fn`` in milliseconds."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()}")
    print(f"{'what':<44}{'n':>9}{'median ms':>12}{'best ms':>10}")
    for n in (64, 1024, 16_384, 262_144):
        e = torch.rand(n, generator=g).to(device)
        s = (-e + torch.rand(n, generator=g).to(device)).to(device)
        tok = torch.randint(0, 5000, (n,), generator=g).to(device)
        cases: list[tuple[str, Callable[[], object]]] = [
            ("spearman", lambda e=e, s=s: spearman(e, s)),
            ("pearson", lambda e=e, s=s: pearson(e, s)),
            ("inversion_stats", lambda e=e, s=s: inversion_stats(e, s)),
            (
                "inversion_stats(per_token_type=True)",
                lambda e=e, s=s, tok=tok: inversion_stats(e, s, per_token_type=True, tokens=tok),
            ),
        ]
        for name, fn in cases:
            median, best = _time(fn, device, args.repeats)
            print(f"{name:<44}{n:>9}{median:>12.3f}{best:>10.3f}")
    for batch, steps in ((8, 512), (64, 2048)):
        lp = -torch.rand(batch, steps, generator=g).to(device)
        adv = torch.randn(batch, generator=g).to(device)
        mask = torch.ones(batch, steps, dtype=torch.bool, device=device)
        ids = torch.zeros(batch, steps, dtype=torch.long, device=device)
        valid = valid_positions(ids, mask)
        ent = torch.rand(batch, steps, generator=g).to(device)
        uniform = TokenSampler(256, max_sequences=8)
        strat = TokenSampler(256, max_sequences=8, stratify_by_entropy=True)
        size = f"{batch}x{steps}"
        for name, fn in (
            ("entropy_covariance", lambda lp=lp, adv=adv, m=mask: entropy_covariance(lp, adv, m)),
            ("TokenSampler(256, max_sequences=8).sample", lambda v=valid, u=uniform: u.sample(v)),
            (
                "  ... stratify_by_entropy=True",
                lambda v=valid, ent=ent, st=strat: st.sample(v, entropy=ent),
            ),
        ):
            median, best = _time(fn, device, args.repeats)
            print(f"{name:<44}{size:>9}{median:>12.3f}{best:>10.3f}")


if __name__ == "__main__":
    main()
