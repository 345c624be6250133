"""Records persisted before they are forwarded: SQLite (WAL, synchronous=FULL) in the node home.

Only records that passed `wire.decode_record` (or that this node signed) are written; the
exact bytes are kept, so a restarted node serves them unchanged and does not fetch them again.
"""

import sqlite3
import time

from gossip import wire

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    id BLOB PRIMARY KEY,
    type TEXT NOT NULL,
    author TEXT NOT NULL,      -- node id of the author
    ts INTEGER NOT NULL,       -- the author's timestamp (ms)
    received REAL NOT NULL,    -- our clock when we first held it
    encoded BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS records_type ON records (type, ts);
"""


class Store:
    def __init__(self, path):
        self.db = sqlite3.connect(path, isolation_level=None, timeout=30, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)

    def add(self, record):
        """Durable on return. False when the record was already held."""
        cur = self.db.execute("INSERT OR IGNORE INTO records VALUES (?, ?, ?, ?, ?, ?)",
                              (record.id, record.type, record.author_id, record.ts, time.time(), record.encoded))
        return cur.rowcount == 1

    def records(self, type_=None):
        """Every stored record, re-checked (a corrupted row is skipped, not trusted)."""
        q = "SELECT encoded FROM records" + (" WHERE type = ?" if type_ else "") + " ORDER BY ts"
        out = []
        for (blob,) in self.db.execute(q, (type_,) if type_ else ()):
            try:
                out.append(wire.decode_record(blob, now_ms=1 << 62))
            except wire.WireError:
                continue
        return out

    def since(self, rowid=0):
        """(rowid, Record) of every record stored after `rowid`, in order, without re-checking
        signatures (they were checked before the row was written); a corrupted row is skipped."""
        out = []
        for row, blob in self.db.execute("SELECT rowid, encoded FROM records WHERE rowid > ? ORDER BY rowid", (rowid,)):
            try:
                out.append((row, wire.load_stored(blob)))
            except wire.WireError:
                continue
        return out

    def get(self, rid):
        """The stored record with this id, its signature re-checked, or None."""
        row = self.db.execute("SELECT encoded FROM records WHERE id = ?", (rid,)).fetchone()
        if row is None:
            return None
        return wire.decode_record(row[0], now_ms=1 << 62)

    def count(self):
        return self.db.execute("SELECT count(*) FROM records").fetchone()[0]

    def close(self):
        self.db.close()
