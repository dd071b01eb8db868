"""``Connection.insert_new``, the records' bulk insert (PostgreSQL: COPY into a temporary
table, then one INSERT ... SELECT ... ON CONFLICT DO NOTHING), on both backends."""

from __future__ import annotations

import pytest

from inversion_monitor.server.store import RECORD_COLUMNS, Store
from inversion_monitor.server.store_errors import StoreError
from tests.postgres_support import TestDatabase


def _row(sequence: int, payload: bytes | None = b"\x00\\\n\tp") -> tuple[object, ...]:
    # NULL and bytes that text COPY must escape, next to plain values
    return (1, 0, sequence, sequence * 10, 1.5, 2.5, None, -0.5, -0.25, 1e-300, payload)


def test_insert_new_skips_stored_and_repeated_rows_and_keeps_every_value(
    database: TestDatabase,
) -> None:
    """Rows already stored and rows repeated within one call are skipped (exactly once);
    two inserts in one transaction, and one outside any, each land whole."""
    store = Store(database.target)
    try:
        conn = store.connection
        with store.transaction():
            conn.insert_new("records", RECORD_COLUMNS, [_row(1), _row(2)])
            conn.insert_new("records", RECORD_COLUMNS, [_row(2, b"other"), _row(3)])
        conn.insert_new("records", RECORD_COLUMNS, [_row(3), _row(4), _row(4), _row(5)])
        conn.insert_new("records", RECORD_COLUMNS, [])
    finally:
        store.close()
    rows = database.rows(
        "SELECT sequence, step, spearman, pearson, score_mean, payload FROM records"
        " ORDER BY sequence"
    )
    assert [r[0] for r in rows] == [1, 2, 3, 4, 5]
    assert all(r[1] == r[0] * 10 and r[2] is None and r[3] == -0.5 for r in rows)
    assert all(r[4] == 1e-300 for r in rows)
    assert [bytes(r[5]) for r in rows] == [b"\x00\\\n\tp"] * 5  # the first copy of 2 kept


def test_a_failed_insert_leaves_nothing_behind(database: TestDatabase) -> None:
    """A row the table refuses (NULL payload) rolls the whole call back."""
    store = Store(database.target)
    try:
        conn = store.connection
        with pytest.raises(StoreError), store.transaction():
            conn.insert_new("records", RECORD_COLUMNS, [_row(1), _row(2, None)])
        conn.insert_new("records", RECORD_COLUMNS, [_row(7)])
    finally:
        store.close()
    assert database.rows("SELECT sequence FROM records") == [(7,)]
