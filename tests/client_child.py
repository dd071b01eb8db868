"""A training process using MonitorClient, for tests that kill it or fill its disk.

``python -m tests.client_child ENDPOINT SPOOL_DIR RUN_ID COUNT MAX_BUFFER``
logs COUNT records, prints one JSON line (the report and the warnings), then
waits for a line on stdin: ``flush`` flushes, closes and prints the final
report; end of input exits without closing. Exits 3 if ``log()`` raised.
"""

from __future__ import annotations

import json
import sys
import warnings
from dataclasses import asdict

from inversion_monitor import MonitorClient, TelemetryWarning
from tests.scripted_server import stats


def main(argv: list[str]) -> int:
    endpoint, spool_dir, run_id, count, max_buffer = argv
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TelemetryWarning)
        client = MonitorClient(
            endpoint,
            run_id,
            run_id=run_id,
            spool_dir=spool_dir,
            max_buffer=int(max_buffer),
            batch_size=min(100, int(max_buffer)),
            flush_interval_s=0.05,
            backoff_initial_s=0.02,
            backoff_max_s=0.2,
            rpc_timeout_s=2.0,
        )
        for step in range(int(count)):
            try:
                client.log(step, stats(step))
            except BaseException as exc:  # the property under test: never
                print(json.dumps({"raised": repr(exc)}), flush=True)
                return 3
        messages = [str(w.message) for w in caught if issubclass(w.category, TelemetryWarning)]
    print(json.dumps({"report": asdict(client.report()), "warnings": messages}), flush=True)
    command = sys.stdin.readline().strip()
    if command != "flush":
        return 0
    flushed = client.flush(timeout_s=60)
    report = client.close(timeout_s=10)
    print(json.dumps({"flushed": flushed, "report": asdict(report)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
