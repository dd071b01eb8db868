"""A tiny run of benchmarks/bench_ingest_cpu.py, so the instruction count's harness (the
server's writer path with the listeners ``serve`` wires) cannot rot."""

from __future__ import annotations

import pytest

from benchmarks import bench_ingest_cpu


@pytest.mark.parametrize("extra", [[], ["--vary", "--kind", "rl"], ["--listeners", ""]])
def test_every_record_is_stored_and_timed(
    extra: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert bench_ingest_cpu.main(["--records", "120", "--batch", "50", *extra]) == 0
    out = capsys.readouterr().out
    assert out.startswith("120 records: ") and "us per record" in out
