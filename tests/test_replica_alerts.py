"""Shared alert state of several ``serve`` replicas on one PostgreSQL database, as
Alertmanager sees it (issue 28): every replica re-posts every active alert it holds, a
resolve is the last word, an adopted alert ends by the new owner's detectors, and a
restarted replica catches up with the runs, steps and alerts it missed.

Every test posts to real HTTP receivers; the replicas are real ``serve`` processes.
"""

from __future__ import annotations

import json
import math
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc

from inversion_monitor.proto.v1 import monitor_pb2, monitor_pb2_grpc
from inversion_monitor.server.alert_share import RESOLVED_RESEND_S, ActiveCheck, end_once
from inversion_monitor.server.alertmanager import AlertmanagerSink
from inversion_monitor.server.replicas import SYNC_PERIOD_S
from inversion_monitor.server.store import Store
from tests.postgres_support import PostgresCluster, TestDatabase
from tests.server_support import TIMEOUT, run_info, run_sample, wait_until
from tests.test_alertmanager import Receiver
from tests.test_server_postgres import (
    _alert_gauge,
    _alerting_replica,
    _posted,
    _push_loss,
    _rules,
)


def _same_alert(posts: list[tuple[str, str, dict[str, Any]]]) -> dict[str, Any]:
    """The labels and startsAt every post of one alert carries (the same in each)."""
    found = {
        (json.dumps(alert["labels"], sort_keys=True), alert["startsAt"]) for *_, alert in posts
    }
    assert len(found) == 1, found
    labels, starts = found.pop()
    return {"labels": json.loads(labels), "startsAt": starts}


def _count(posts: list[tuple[str, str, dict[str, Any]]], sender: str, status: str) -> int:
    return sum(1 for who, state, _ in posts if (who, state) == (sender, status))


def test_every_replica_reposts_a_shared_alert_and_a_resolve_is_the_last_word(
    tmp_path: Path, postgres_cluster: PostgresCluster
) -> None:
    """Both replicas post to one receiver every second. A fires; B re-posts the alert it
    holds (same labels and startsAt). The stream moves to B, whose own detectors never saw
    the non-finite loss: the adoption put its detector in the firing state, so 3 finite
    records end it there. A stays alive and posting (another run's alert), yet the last
    word on the ended alert is B's resolve, which B repeats."""
    name = postgres_cluster.create_database()
    url = postgres_cluster.url(name)
    database = TestDatabase("postgresql", url, postgres_cluster, name)
    rules = _rules(tmp_path, resend_s=1)
    receiver = Receiver()
    try:
        with (
            _alerting_replica(url, rules, receiver, "a") as (_, target_a, _http_a),
            _alerting_replica(url, rules, receiver, "b") as (_, target_b, http_b),
            grpc.insecure_channel(target_a) as channel_a,
            grpc.insecure_channel(target_b) as channel_b,
        ):
            a = monitor_pb2_grpc.MonitorServiceStub(channel_a)
            b = monitor_pb2_grpc.MonitorServiceStub(channel_b)
            info = run_info("diverged", world_size=1)
            on_a = a.OpenRun(monitor_pb2.OpenRunRequest(run=info), timeout=TIMEOUT)
            run = on_a.display_name
            _push_loss(a, on_a.writer_session, "diverged", 1, 2.0)
            _push_loss(a, on_a.writer_session, "diverged", 2, math.nan)  # fires on A
            # A keeps a second run's alert firing: A goes on posting all along
            other = a.OpenRun(
                monitor_pb2.OpenRunRequest(run=run_info("other", world_size=1)), timeout=TIMEOUT
            )
            _push_loss(a, other.writer_session, "other", 1, math.inf)

            def repeated_by_b() -> bool:
                return _count(_posted(receiver, run), "b", "firing") >= 2

            wait_until("B to re-post the alert A fired", repeated_by_b, 30)
            shared = _same_alert(_posted(receiver, run))
            assert shared["labels"]["alertname"] == "NonFiniteTraining"

            on_b = b.OpenRun(monitor_pb2.OpenRunRequest(run=info, takeover=True), timeout=TIMEOUT)
            for seq in (3, 4, 5):  # finite only: B's detectors never saw the NaN
                _push_loss(b, on_b.writer_session, "diverged", seq, 1.5)
            wait_until("B to end it", lambda: _alert_gauge(http_b, run) == 0.0, 20)
            assert database.rows(
                "SELECT count(*), min(active), min(end_step), min(end_reason) FROM alerts"
                " WHERE display_name = ?",
                (run,),
            ) == [(1, 0, 50, "recovered")]
            resolved_at = len(receiver.posts)
            other_before = _count(_posted(receiver, other.display_name), "a", "firing")

            def settled() -> bool:  # B repeated its resolve; A posted on meanwhile
                after = receiver.posts[resolved_at:]
                senders = [path for _, path, _ in after]
                return (
                    senders.count("/b/api/v2/alerts") >= 3
                    and senders.count("/a/api/v2/alerts") >= 3
                )

            wait_until("three more rounds of each replica", settled, 30)
            posts = _posted(receiver, run)
            assert posts[-1][:2] == ("b", "resolved"), posts[-3:]
            a_other = _count(_posted(receiver, other.display_name), "a", "firing")
            assert a_other - other_before >= 3  # A went on posting all along
            counts = {
                f"{who}_{state}": _count(posts, who, state)
                for who in ("a", "b")
                for state in ("firing", "resolved")
            }
            first_resolve = posts.index(next(p for p in posts if p[:2] == ("b", "resolved")))
            late = _count(posts[first_resolve:], "a", "firing")
            print(f"posts of {run}: {counts}, A firing after B's resolve: {late}")
            assert counts["a_resolved"] == 0 and counts["b_resolved"] >= 3
            assert late <= 1  # at most a post A had checked before B's end
            _same_alert(posts)  # every post of it, firing or resolved, is the same alert
    finally:
        receiver.close()


def _api(http_url: str, path: str) -> Any:
    with urllib.request.urlopen(http_url + path, timeout=TIMEOUT) as resp:
        return json.loads(resp.read())


def _caught_up(http_url: str, expected: dict[str, tuple[int, bool]]) -> bool:
    """Whether the replica's JSON API and /metrics show each run ``display name: (latest
    step, NonFiniteTraining active)``, and its alert view (GetRun's alerts) the alert."""
    listed = {r["display_name"]: r for r in _api(http_url, "/api/runs")["runs"]}
    with urllib.request.urlopen(http_url + "/metrics", timeout=TIMEOUT) as resp:
        text = resp.read().decode()
    for run, (step, alerting) in expected.items():
        summary = listed.get(run)
        if summary is None or int(summary["latest"]["step"]) != step:
            return False
        if run_sample(text, "inversion_monitor_step", run) != step:
            return False
        if bool(summary.get("active_alerts")) != alerting:
            return False
        if alerting:
            alerts = _api(http_url, f"/api/runs/{run}?history=1&samples=0").get("alerts", [])
            if not [x for x in alerts if x["name"] == "NonFiniteTraining" and x["active"]]:
                return False
            if _alert_gauge(http_url, run) != 1.0:
                return False
    return True


def test_a_restarted_replica_catches_up_and_reposts_the_alerts_it_did_not_see(
    tmp_path: Path, postgres_cluster: PostgresCluster
) -> None:
    """A fires an alert and is SIGKILLed: B goes on re-posting it. Through B the stream
    goes on (steps A never saw), a new run opens and raises an alert on B. A restarted
    shows every run, step and alert in its JSON API, /metrics and alert view, follows
    what B writes next within a sync round, and re-posts both alerts as B posts them."""
    name = postgres_cluster.create_database()
    url = postgres_cluster.url(name)
    rules = _rules(tmp_path, resend_s=1)
    receiver = Receiver()
    try:
        with (
            _alerting_replica(url, rules, receiver, "b") as (_, target_b, http_b),
            grpc.insecure_channel(target_b) as channel_b,
        ):
            b = monitor_pb2_grpc.MonitorServiceStub(channel_b)
            first = run_info("first", world_size=1)
            with (
                _alerting_replica(url, rules, receiver, "a") as (proc_a, target_a, http_a),
                grpc.insecure_channel(target_a) as channel_a,
            ):
                a = monitor_pb2_grpc.MonitorServiceStub(channel_a)
                on_a = a.OpenRun(monitor_pb2.OpenRunRequest(run=first), timeout=TIMEOUT)
                run_1 = on_a.display_name
                for seq in range(1, 6):
                    _push_loss(a, on_a.writer_session, "first", seq, 2.0)
                _push_loss(a, on_a.writer_session, "first", 6, math.nan)  # fires on A
                wait_until("B to hold A's alert", lambda: _alert_gauge(http_b, run_1) == 1.0, 20)
                assert _caught_up(http_a, {run_1: (60, True)})
                proc_a.kill()  # SIGKILL
                proc_a.wait(timeout=30)
                killed_at = len(_posted(receiver, run_1))

            def kept_alive_by_b() -> bool:
                after = _posted(receiver, run_1)[killed_at:]
                return _count(after, "b", "firing") >= 2 and _count(after, "a", "firing") == 0

            wait_until("B to go on re-posting the alert after A died", kept_alive_by_b, 30)

            on_b = b.OpenRun(monitor_pb2.OpenRunRequest(run=first, takeover=True), timeout=TIMEOUT)
            assert on_b.acked_sequence == 6
            for seq in range(7, 13):  # steps A never saw; still diverged
                _push_loss(b, on_b.writer_session, "first", seq, math.nan)
            second = b.OpenRun(
                monitor_pb2.OpenRunRequest(run=run_info("second", world_size=1)), timeout=TIMEOUT
            )
            run_2 = second.display_name
            for seq in range(1, 4):
                _push_loss(b, second.writer_session, "second", seq, 2.0)
            _push_loss(b, second.writer_session, "second", 4, math.nan)  # fires on B
            expected = {run_1: (120, True), run_2: (40, True)}
            assert wait_until("B to show it all", lambda: _caught_up(http_b, expected), 20)

            with (
                _alerting_replica(url, rules, receiver, "a") as (_, target_a, http_a),
                grpc.insecure_channel(target_a) as channel_a,
            ):
                started = time.monotonic()
                wait_until("A to catch up", lambda: _caught_up(http_a, expected), 2 * SYNC_PERIOD_S)
                caught_up_s = time.monotonic() - started
                # B writes on: A follows within a sync round or two
                _push_loss(b, on_b.writer_session, "first", 13, 1.0)
                third = b.OpenRun(
                    monitor_pb2.OpenRunRequest(run=run_info("third", world_size=1)),
                    timeout=TIMEOUT,
                )
                _push_loss(b, third.writer_session, "third", 1, 1.0)
                expected = {**expected, run_1: (130, True), third.display_name: (10, False)}
                started = time.monotonic()
                wait_until("A to follow B", lambda: _caught_up(http_a, expected), 4 * SYNC_PERIOD_S)
                followed_s = time.monotonic() - started
                restarted_at = len(receiver.posts)

                def reposted_by_a() -> bool:
                    return all(
                        _count(_posted(receiver, run)[restarted_at:], "a", "firing") >= 1
                        for run in (run_1, run_2)
                    )

                wait_until("the restarted A to re-post both alerts", reposted_by_a, 30)
            for run in (run_1, run_2):  # one alert each, whoever posted it
                _same_alert(_posted(receiver, run))
            counts = {
                run: {who: _count(_posted(receiver, run), who, "firing") for who in ("a", "b")}
                for run in (run_1, run_2)
            }
            print(
                f"firing posts {counts}; POSTs in all {len(receiver.posts)}; "
                f"caught up {caught_up_s:.2f} s after ready, followed B in {followed_s:.2f} s"
            )
    finally:
        receiver.close()


def test_a_replica_posts_nothing_another_ended_and_repeats_its_own_resolves(
    postgres_cluster: PostgresCluster,
) -> None:
    """Two replicas' Alertmanager senders on one database, one round at a time (the race
    of the test above, made deterministic): once B ended the row, A's next round reads the
    active rows first and leaves the alert out, before A's AlertSync has told it anything;
    B re-posts the resolve each round for RESOLVED_RESEND_S, and drops it at once when the
    alert fires again (a newer row)."""
    url = postgres_cluster.url(postgres_cluster.create_database())
    stores = {"a": Store(url), "b": Store(url)}
    receiver = Receiver()
    now = [time.time()]  # a clock the test moves on
    sinks = {
        key: AlertmanagerSink(
            receiver.url.removesuffix("/alerts") + f"/{key}", start=False, clock=lambda: now[0]
        )
        for key in stores
    }
    try:
        for key, sink in sinks.items():
            sink.share(ActiveCheck(stores[key].database.reader), RESOLVED_RESEND_S)

        def fire() -> tuple[int, monitor_pb2.Alert]:
            row = stores["a"].insert_alert(
                "r", "run-x", "NonFiniteTraining", "critical", 20, 1.0, "non_finite", "s", "d", {}
            )
            alert = monitor_pb2.Alert(
                name="NonFiniteTraining", severity="critical", active=True, start_time=1.0
            )
            return row, alert

        def round_of(key: str) -> list[str]:
            """One round of ``key``'s sender: the status of each alert it posted."""
            before = len(receiver.posts)
            assert sinks[key].send_once()
            return [state for _, state, _ in _posted(receiver)[before:]]

        row, alert = fire()
        sinks["a"].hold("run-x", alert, row)  # A fired it
        sinks["b"].hold("run-x", alert, row, post=False)  # B adopted it (AlertSync)
        assert (round_of("a"), round_of("b")) == (["firing"], ["firing"])
        assert end_once(stores["b"].connection, row, 50, 2.0, "recovered", {})
        ended = monitor_pb2.Alert()
        ended.CopyFrom(alert)
        ended.active, ended.end_time = False, 2.0
        sinks["b"].hold("run-x", ended, row)  # B ended it
        assert round_of("a") == [] and sinks["a"].pending() == []  # A: nothing, and forgot it
        assert [round_of("b") for _ in range(3)] == [["resolved"]] * 3
        now[0] += RESOLVED_RESEND_S
        assert (round_of("b"), round_of("b")) == (["resolved"], [])  # the last one, then none
        sinks["b"].hold("run-x", ended, row)  # resolved again by B; then A fires a new one
        new_row, new_alert = fire()
        sinks["a"].hold("run-x", new_alert, new_row)
        assert (round_of("b"), round_of("a")) == ([], ["firing"])
    finally:
        receiver.close()
        for store in stores.values():
            store.close()
