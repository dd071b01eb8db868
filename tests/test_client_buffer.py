"""Bounded memory: drop-oldest without a spool, spill and replay with one."""

from __future__ import annotations

import os
import struct
import warnings
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from inversion_monitor import MonitorClient, TelemetryWarning
from inversion_monitor.proto.v1 import monitor_pb2
from inversion_monitor.telemetry.spool import Spool, SpoolBusy
from tests.scripted_server import FAST, Failure, ScriptedServicer, ServerHandle, stats, wait_for

DOWN = Failure(grpc.StatusCode.UNAVAILABLE, "down")


@pytest.fixture
def server() -> Iterator[ServerHandle]:
    handle = ServerHandle().start()
    yield handle
    handle.stop()


def test_overflow_drops_oldest_with_counter_and_one_warning(server: ServerHandle) -> None:
    servicer = server.servicer
    servicer.always = DOWN
    client = MonitorClient(
        server.endpoint, "ovf", run_id="ovf", max_buffer=100, batch_size=10, **FAST
    )
    with pytest.warns(TelemetryWarning) as caught:
        for step in range(250):
            client.log(step, stats(step))
    assert sum("dropping the oldest" in str(w.message) for w in caught) == 1
    assert client.report().dropped == 150
    servicer.always = None
    assert not client.flush(timeout_s=20)  # delivered, but 150 were lost: not all acknowledged
    report = client.close(timeout_s=5)
    assert servicer.steps("ovf") == list(range(150, 250))  # the newest survive
    assert servicer.sequences("ovf") == list(range(1, 101))  # no gap where records were dropped
    assert (report.logged, report.delivered, report.dropped) == (250, 100, 150)


def test_overflow_never_drops_records_in_flight(server: ServerHandle) -> None:
    servicer = server.servicer
    client = MonitorClient(
        server.endpoint, "ovf2", run_id="ovf2", max_buffer=20, batch_size=10, **FAST
    )
    client.log(0, stats(0))
    assert client.flush(timeout_s=10)
    servicer.always = DOWN
    with pytest.warns(TelemetryWarning):
        for step in range(1, 11):
            client.log(step, stats(step))
        assert not client.flush(timeout_s=0.01)  # send now: the batch becomes the window
        assert wait_for(lambda: len(servicer.call_log()) >= 4)
        for step in range(11, 100):
            client.log(step, stats(step))
    servicer.always = None
    assert not client.flush(timeout_s=20)
    client.close(timeout_s=5)
    steps = servicer.steps("ovf2")
    assert steps[:11] == list(range(11))  # the window was kept
    assert steps[11:] == list(range(90, 100))  # then the newest
    assert servicer.sequences("ovf2") == list(range(1, 22))


def test_spool_spills_and_replays_in_order_nothing_lost(
    server: ServerHandle, tmp_path: Path
) -> None:
    servicer = server.servicer
    servicer.always = DOWN
    client = MonitorClient(
        server.endpoint,
        "spill",
        run_id="spill",
        max_buffer=50,
        batch_size=10,
        spool_dir=tmp_path,
        **FAST,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TelemetryWarning)
        for step in range(500):
            client.log(step, stats(step))
        spool_file = tmp_path / "spill.rank0.spool"
        assert wait_for(lambda: spool_file.stat().st_size > 0)
        assert client.report().dropped == 0
        servicer.always = None
        for step in range(500, 600):  # logging goes on while the backlog drains
            client.log(step, stats(step))
        assert client.flush(timeout_s=30)
    report = client.close(timeout_s=5)
    assert servicer.steps("spill") == list(range(600))
    assert servicer.sequences("spill") == list(range(1, 601))
    assert (report.delivered, report.dropped, report.spooled) == (600, 0, 0)
    assert not spool_file.exists()


def test_close_leaves_spool_and_a_new_client_replays_it(tmp_path: Path) -> None:
    handle = ServerHandle(ScriptedServicer(always=DOWN)).start()
    try:
        first = MonitorClient(
            handle.endpoint,
            "resume",
            run_id="resume",
            max_buffer=50,
            batch_size=10,
            spool_dir=tmp_path,
            **FAST,
        )
        with pytest.warns(TelemetryWarning, match="kept in"):
            for step in range(300):
                first.log(step, stats(step))
            report = first.close(timeout_s=0.3)
        assert (report.logged, report.spooled, report.dropped) == (300, 300, 0)
        assert len(Spool(tmp_path / "resume.rank0.spool")) == 300

        handle.servicer.always = None
        second = MonitorClient(
            handle.endpoint, "resume", run_id="resume", spool_dir=tmp_path, **FAST
        )
        for step in range(300, 400):
            second.log(step, stats(step))
        assert second.flush(timeout_s=30)
        report = second.close(timeout_s=5)
        assert (report.replayed, report.logged, report.delivered) == (300, 100, 400)
        assert handle.servicer.steps("resume") == list(range(400))
        assert handle.servicer.sequences("resume") == list(range(1, 401))
        assert not (tmp_path / "resume.rank0.spool").exists()
    finally:
        handle.stop()


def test_replay_skips_what_the_server_already_stored(tmp_path: Path) -> None:
    """Records sent, stored, but never acknowledged to the closing client."""
    handle = ServerHandle(ScriptedServicer(delay_s=0.8, delay_method="Push")).start()
    try:
        first = MonitorClient(
            handle.endpoint,
            "lost-ack",
            run_id="lost-ack",
            spool_dir=tmp_path,
            **{**FAST, "rpc_timeout_s": 5.0},
        )
        for step in range(10):
            first.log(step, stats(step))
        assert wait_for(lambda: len(handle.servicer.call_log("Push")) == 1)
        with pytest.warns(TelemetryWarning, match="kept in"):
            report = first.close(timeout_s=0.2)  # cancels the call; the server stores anyway
        assert report.spooled == 10
        assert wait_for(lambda: handle.servicer.sequences("lost-ack") == list(range(1, 11)))
        handle.servicer.delay_s = 0.0
        second = MonitorClient(
            handle.endpoint, "lost-ack", run_id="lost-ack", spool_dir=tmp_path, **FAST
        )
        second.log(10, stats(10))
        assert second.flush(timeout_s=10)
        report = second.close(timeout_s=5)
        assert (report.replayed, report.delivered) == (10, 11)
        assert handle.servicer.steps("lost-ack") == list(range(11))
        assert max(handle.servicer.received.values()) == 1  # the replay did not resend them
    finally:
        handle.stop()


def test_resumed_run_without_spool_continues_numbering(server: ServerHandle) -> None:
    first = MonitorClient(server.endpoint, "again", run_id="again", **FAST)
    for step in range(5):
        first.log(step, stats(step))
    first.close(timeout_s=5)
    second = MonitorClient(server.endpoint, "again", run_id="again", **FAST)
    for step in range(5, 8):
        second.log(step, stats(step))
    second.close(timeout_s=5)
    assert server.servicer.steps("again") == list(range(8))
    assert server.servicer.sequences("again") == list(range(1, 9))


def test_refused_client_spools_everything_for_a_later_replay(tmp_path: Path) -> None:
    handle = ServerHandle(ScriptedServicer(token="right")).start()
    try:
        wrong = MonitorClient(
            handle.endpoint,
            "tok",
            run_id="tok",
            token="wrong",
            spool_dir=tmp_path,
            max_buffer=20,
            batch_size=5,
            **FAST,
        )
        with pytest.warns(TelemetryWarning, match="UNAUTHENTICATED.*check the token"):
            for step in range(100):
                wrong.log(step, stats(step))
            report = wrong.close(timeout_s=1)
        assert (report.spooled, report.dropped) == (100, 0)
        right = MonitorClient(
            handle.endpoint, "tok", run_id="tok", token="right", spool_dir=tmp_path, **FAST
        )
        assert right.flush(timeout_s=10)
        assert right.close(timeout_s=5).delivered == 100
        assert handle.servicer.steps("tok") == list(range(100))
    finally:
        handle.stop()


# ---------------------------------------------------------------- the spool file


def _entries(n: int) -> list[bytes]:
    return [monitor_pb2.StepRecord(step=i).SerializeToString() for i in range(n)]


def _data(loaded: list[tuple[bytes, int, int]]) -> list[bytes]:
    return [data for data, _, _ in loaded]


def test_spool_fifo_across_reopen_and_large_backlog(tmp_path: Path) -> None:
    path = tmp_path / "x.spool"
    spool = Spool(path)
    data = _entries(5000)
    ends = [spool.append(d) for d in data]
    assert _data(spool.load(3)) == data[:3]
    spool.consume(ends[2], 3)  # the first three were acknowledged
    spool.set_seq(ends[3], 7, length=len(data[3]))  # the fourth was sent as 7
    del spool  # a crash: no close, no fsync (the kernel has every append)
    again = Spool(path)
    assert len(again) == 4997  # what was acknowledged before the crash is not replayed
    loaded = again.load(10_000)
    assert _data(loaded) == data[3:]
    assert [seq for _, seq, _ in loaded[:2]] == [7, 0]
    again.consume(loaded[-1][2], len(loaded))
    assert len(again) == 0 and path.stat().st_size == 16  # truncated to the header
    again.close()
    assert not path.exists()


def test_spool_is_held_by_one_client(tmp_path: Path) -> None:
    first = Spool(tmp_path / "one.spool")
    with pytest.raises(SpoolBusy, match="in use by another telemetry client"):
        Spool(tmp_path / "one.spool")
    first.close()
    Spool(tmp_path / "one.spool").close()


def test_spool_cuts_a_torn_last_entry(tmp_path: Path) -> None:
    path = tmp_path / "torn.spool"
    spool = Spool(path)
    for d in _entries(3):
        spool.append(d)
    spool.close()
    with open(path, "ab") as f:
        f.write(b"\x40\x00\x00\x00" + bytes(8) + b"abc")  # a length of 64 but only 3 bytes
    reopened = Spool(path)
    assert _data(reopened.load(10)) == _entries(3)


def test_spool_moves_a_foreign_file_aside(tmp_path: Path) -> None:
    path = tmp_path / "foreign.spool"
    path.write_bytes(b"not a spool at all")
    spool = Spool(path)
    assert len(spool) == 0
    assert (tmp_path / "foreign.spool.corrupt").read_bytes() == b"not a spool at all"
    spool.append(b"x")
    assert _data(spool.load(1)) == [b"x"]


def test_spool_of_the_previous_format_is_converted(tmp_path: Path) -> None:
    path = tmp_path / "v1.spool"
    entries = _entries(4)
    body = b"".join(struct.pack("<I", len(d)) + d for d in entries)
    first = 16 + 4 + len(entries[0])  # the first entry was read already
    path.write_bytes(b"IMSPOOL1" + struct.pack("<Q", first) + body)
    spool = Spool(path)
    assert len(spool) == 3 and _data(spool.load(10)) == entries[1:]


def test_spool_rewrite_puts_records_in_order(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "r.spool")
    for d in (b"c", b"d", b"e"):
        spool.append(d)
    spool.rewrite([(b"a", 3), (b"b", 0)])
    assert len(spool) == 2
    spool.close()
    loaded = Spool(tmp_path / "r.spool").load(10)
    assert [(d, seq) for d, seq, _ in loaded] == [(b"a", 3), (b"b", 0)]
    assert not os.path.exists(tmp_path / "r.spool.tmp")
