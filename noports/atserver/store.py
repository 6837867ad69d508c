"""SQLite persistence of the embedded atServer: hosted atSigns, keys, commit log, notifications.

Owns the database file and its schema; nothing else opens it.  Synchronous (sqlite3 runs in the
event-loop thread: each statement is tens of microseconds, far cheaper than a thread hop).

Durability contract, relied on by the server's group commit: every mutating method only *adds to
the open transaction*; :meth:`Store.commit` makes the whole batch durable, and the server writes
no acknowledgement before it returns.  The database runs in WAL mode with ``synchronous=NORMAL``
by default, which survives the process being killed (SIGKILL) at any instant; ``FULL`` (flag
``--sync full``) adds an fsync per commit and so also survives power loss.

Commit ids are per atSign, start at 0 and grow by one per change (spec atprotocol.md §4.1).  The
commit log keeps only the latest entry of each key (what Dart's compaction converges to), which
bounds its size and still preserves the highest id, so ids keep increasing across restarts.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson

__all__ = ["KeyRecord", "Store", "StoredNotification"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (name TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS atsigns (
    atsign TEXT PRIMARY KEY, port INTEGER NOT NULL, created_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS keys (
    atsign TEXT NOT NULL, key TEXT NOT NULL, value TEXT, meta TEXT NOT NULL,
    expires_at INTEGER, available_at INTEGER,
    PRIMARY KEY (atsign, key)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS keys_expiry ON keys (expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS commits (
    atsign TEXT NOT NULL, key TEXT NOT NULL, commit_id INTEGER NOT NULL, op TEXT NOT NULL,
    PRIMARY KEY (atsign, key)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS commits_by_id ON commits (atsign, commit_id);
CREATE TABLE IF NOT EXISTS notifications (
    seq INTEGER PRIMARY KEY,
    atsign TEXT NOT NULL, box TEXT NOT NULL, id TEXT NOT NULL,
    from_atsign TEXT NOT NULL, to_atsign TEXT NOT NULL, key TEXT NOT NULL, value TEXT,
    operation TEXT NOT NULL, message_type TEXT NOT NULL, is_encrypted INTEGER NOT NULL,
    metadata TEXT NOT NULL, epoch_millis INTEGER NOT NULL, expires_at INTEGER NOT NULL,
    status TEXT NOT NULL,
    UNIQUE (atsign, box, id));
CREATE INDEX IF NOT EXISTS notifications_replay ON notifications (atsign, box, epoch_millis);
CREATE INDEX IF NOT EXISTS notifications_expiry ON notifications (expires_at);
"""

SENT = "sent"
RECEIVED = "received"


@dataclass
class KeyRecord:
    value: str | None
    meta: dict
    expires_at: int | None
    available_at: int | None

    def active(self, now_ms: int) -> bool:
        """Readable now: past its ttb and not past its ttl."""
        if self.expires_at is not None and self.expires_at <= now_ms:
            return False
        return not (self.available_at is not None and self.available_at > now_ms)


@dataclass
class StoredNotification:
    id: str
    from_atsign: str
    to_atsign: str
    key: str
    value: str | None
    operation: str                 # "update" | "delete"
    message_type: str              # "key" | "text"
    is_encrypted: bool
    metadata: dict = field(default_factory=dict)   # wire metadata names (ttr, ivNonce, ...)
    epoch_millis: int = 0          # when the receiving side stored it / the sender accepted it
    expires_at: int = 0            # epoch_millis + ttln
    status: str = "queued"         # queued | delivered | errored (expired is derived)
    seq: int = 0                   # insertion order, tie-break for equal epochMillis


_NOTIFICATION_COLUMNS = ("seq, id, from_atsign, to_atsign, key, value, operation, message_type, "
                         "is_encrypted, metadata, epoch_millis, expires_at, status")


def _row_to_notification(row) -> StoredNotification:
    (seq, nid, frm, to, key, value, op, mtype, enc, meta, epoch, expires, status) = row
    return StoredNotification(id=nid, from_atsign=frm, to_atsign=to, key=key, value=value,
                              operation=op, message_type=mtype, is_encrypted=bool(enc),
                              metadata=orjson.loads(meta), epoch_millis=epoch,
                              expires_at=expires, status=status, seq=seq)


class Store:
    """The server's one SQLite database (see the module docstring for the durability rules)."""

    def __init__(self, path: str | os.PathLike, *, synchronous: str = "NORMAL") -> None:
        self.path = Path(path)
        # isolation_level=None: we issue BEGIN ourselves so a batch is exactly one transaction.
        self._db = sqlite3.connect(str(self.path), isolation_level=None,
                                   check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        if synchronous.upper() not in ("NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"synchronous must be NORMAL, FULL or EXTRA, not {synchronous!r}")
        self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
        self._db.execute("PRAGMA foreign_keys=OFF")
        self._db.executescript(SCHEMA)
        # Checkpoints (WAL -> database file, with an fsync) run in a helper thread so that a
        # commit on the event loop never pays for one; see start_checkpointer().
        self._db.execute("PRAGMA wal_autocheckpoint=0")
        self._checkpointer: threading.Thread | None = None
        self._stop_checkpoints = threading.Event()
        self._commit_ids: dict[str, int] = {}
        self._meta_json: tuple[dict, str] | None = None

    # -- transactions ---------------------------------------------------------------------

    def _begin(self) -> None:
        if not self._db.in_transaction:
            self._db.execute("BEGIN")

    @property
    def in_transaction(self) -> bool:
        return self._db.in_transaction

    def commit(self) -> None:
        if self._db.in_transaction:
            self._db.execute("COMMIT")

    def rollback(self) -> None:
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")
        # In-memory counters may be ahead of what was rolled back.
        self._commit_ids.clear()

    def start_checkpointer(self, interval: float = 0.5) -> None:
        """Run ``wal_checkpoint(PASSIVE)`` every ``interval`` s from a daemon thread with its
        own connection (passive checkpoints never block the writer)."""
        if self._checkpointer is not None:
            return

        def loop() -> None:
            db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
            try:
                while not self._stop_checkpoints.wait(interval):
                    try:
                        db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    except sqlite3.Error:
                        pass          # busy or shutting down: next round
            finally:
                db.close()

        self._checkpointer = threading.Thread(target=loop, name="sqlite-checkpoint",
                                              daemon=True)
        self._checkpointer.start()

    def close(self) -> None:
        self._stop_checkpoints.set()
        if self._checkpointer is not None:
            self._checkpointer.join(5)
            self._checkpointer = None
        try:
            self.commit()
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            self._db.close()

    def integrity_check(self) -> str:
        return self._db.execute("PRAGMA integrity_check").fetchone()[0]

    # -- settings and hosted atSigns --------------------------------------------------------

    def get_setting(self, name: str) -> str | None:
        row = self._db.execute("SELECT value FROM settings WHERE name=?", (name,)).fetchone()
        return None if row is None else row[0]

    def set_setting(self, name: str, value: str) -> None:
        self._begin()
        self._db.execute("INSERT OR REPLACE INTO settings(name, value) VALUES (?, ?)",
                         (name, value))

    def atsigns(self) -> dict[str, int]:
        """Hosted atSigns and their recorded ports, in the order they were added."""
        rows = self._db.execute("SELECT atsign, port FROM atsigns ORDER BY created_at, atsign")
        return dict(rows.fetchall())

    def set_atsign_port(self, atsign: str, port: int, now_ms: int) -> None:
        self._begin()
        self._db.execute(
            "INSERT INTO atsigns(atsign, port, created_at) VALUES (?, ?, ?) "
            "ON CONFLICT(atsign) DO UPDATE SET port=excluded.port", (atsign, port, now_ms))

    # -- keys and the commit log ----------------------------------------------------------

    def last_commit_id(self, atsign: str) -> int:
        """Highest commit id used by ``atsign`` (-1 before its first change)."""
        cid = self._commit_ids.get(atsign)
        if cid is None:
            row = self._db.execute("SELECT MAX(commit_id) FROM commits WHERE atsign=?",
                                   (atsign,)).fetchone()
            cid = -1 if row[0] is None else row[0]
            self._commit_ids[atsign] = cid
        return cid

    def _log_commit(self, atsign: str, key: str, op: str) -> int:
        cid = self.last_commit_id(atsign) + 1
        self._db.execute("INSERT OR REPLACE INTO commits(atsign, key, commit_id, op) "
                         "VALUES (?, ?, ?, ?)", (atsign, key, cid, op))
        self._commit_ids[atsign] = cid
        return cid

    def last_commit_op(self, atsign: str) -> str | None:
        row = self._db.execute("SELECT op FROM commits WHERE atsign=? ORDER BY commit_id DESC "
                               "LIMIT 1", (atsign,)).fetchone()
        return None if row is None else row[0]

    def get_key(self, atsign: str, key: str) -> KeyRecord | None:
        row = self._db.execute(
            "SELECT value, meta, expires_at, available_at FROM keys WHERE atsign=? AND key=?",
            (atsign, key)).fetchone()
        if row is None:
            return None
        return KeyRecord(value=row[0], meta=orjson.loads(row[1]), expires_at=row[2],
                         available_at=row[3])

    def put_key(self, atsign: str, key: str, rec: KeyRecord, *, commit: bool) -> int:
        """Insert or replace; returns the new commit id, or -1 when ``commit`` is False."""
        self._begin()
        self._db.execute(
            "INSERT OR REPLACE INTO keys(atsign, key, value, meta, expires_at, available_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (atsign, key, rec.value, orjson.dumps(rec.meta).decode(), rec.expires_at,
             rec.available_at))
        return self._log_commit(atsign, key, "+") if commit else -1

    def delete_key(self, atsign: str, key: str, *, commit: bool) -> int:
        self._begin()
        self._db.execute("DELETE FROM keys WHERE atsign=? AND key=?", (atsign, key))
        return self._log_commit(atsign, key, "-") if commit else -1

    def key_names(self, atsign: str, now_ms: int) -> list[str]:
        """Every active key name of ``atsign`` (visibility filtering is the caller's job)."""
        rows = self._db.execute(
            "SELECT key FROM keys WHERE atsign=? "
            "AND (expires_at IS NULL OR expires_at > ?) "
            "AND (available_at IS NULL OR available_at <= ?) ORDER BY key",
            (atsign, now_ms, now_ms))
        return [r[0] for r in rows]

    def expired_keys(self, now_ms: int, limit: int = 1000) -> list[tuple[str, str]]:
        rows = self._db.execute("SELECT atsign, key FROM keys WHERE expires_at IS NOT NULL "
                                "AND expires_at <= ? LIMIT ?", (now_ms, limit))
        return rows.fetchall()

    def count_keys(self, atsign: str) -> int:
        return self._db.execute("SELECT COUNT(*) FROM keys WHERE atsign=?",
                                (atsign,)).fetchone()[0]

    # -- notifications --------------------------------------------------------------------

    def put_notification(self, atsign: str, box: str, n: StoredNotification) -> None:
        """Store ``n`` in ``atsign``'s sent or received box (a repeated id replaces the old)."""
        self._begin()
        meta = n.metadata
        # The sent and received copies share one metadata dict: serialise it once.
        cached = self._meta_json
        if cached is not None and cached[0] is meta:
            meta_json = cached[1]
        else:
            meta_json = orjson.dumps(meta).decode()
            self._meta_json = (meta, meta_json)
        cur = self._db.execute(
            "INSERT OR REPLACE INTO notifications(atsign, box, id, from_atsign, to_atsign, key, "
            "value, operation, message_type, is_encrypted, metadata, epoch_millis, expires_at, "
            "status) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (atsign, box, n.id, n.from_atsign, n.to_atsign, n.key, n.value, n.operation,
             n.message_type, int(n.is_encrypted), meta_json,
             n.epoch_millis, n.expires_at, n.status))
        n.seq = cur.lastrowid or 0

    def get_notification(self, atsign: str, box: str, nid: str) -> StoredNotification | None:
        row = self._db.execute(
            f"SELECT {_NOTIFICATION_COLUMNS} FROM notifications WHERE atsign=? AND box=? AND id=?",
            (atsign, box, nid)).fetchone()
        return None if row is None else _row_to_notification(row)

    def set_notification_status(self, atsign: str, box: str, nid: str, status: str) -> None:
        self._begin()
        self._db.execute("UPDATE notifications SET status=? WHERE atsign=? AND box=? AND id=?",
                         (status, atsign, box, nid))

    def remove_notification(self, atsign: str, box: str, nid: str) -> bool:
        self._begin()
        cur = self._db.execute("DELETE FROM notifications WHERE atsign=? AND box=? AND id=?",
                               (atsign, box, nid))
        return cur.rowcount > 0

    def received_since(self, atsign: str, epoch_millis: int, now_ms: int,
                       page: int = 1000) -> Iterator[StoredNotification]:
        """Unexpired received notifications with epochMillis strictly greater, oldest first.

        Paged by (epoch_millis, seq) so a huge backlog never sits in memory at once.
        """
        last_epoch, last_seq = epoch_millis, -1
        first = True
        while True:
            if first:
                rows = self._db.execute(
                    f"SELECT {_NOTIFICATION_COLUMNS} FROM notifications WHERE atsign=? "
                    "AND box=? AND epoch_millis > ? AND expires_at > ? "
                    "ORDER BY epoch_millis, seq LIMIT ?",
                    (atsign, RECEIVED, last_epoch, now_ms, page)).fetchall()
                first = False
            else:
                rows = self._db.execute(
                    f"SELECT {_NOTIFICATION_COLUMNS} FROM notifications WHERE atsign=? "
                    "AND box=? AND (epoch_millis > ? OR (epoch_millis = ? AND seq > ?)) "
                    "AND expires_at > ? ORDER BY epoch_millis, seq LIMIT ?",
                    (atsign, RECEIVED, last_epoch, last_epoch, last_seq, now_ms,
                     page)).fetchall()
            for row in rows:
                n = _row_to_notification(row)
                last_epoch, last_seq = n.epoch_millis, n.seq
                yield n
            if len(rows) < page:
                return

    def list_received(self, atsign: str, since_ms: int | None, until_ms: int | None,
                      now_ms: int, limit: int = 10_000) -> list[StoredNotification]:
        q = (f"SELECT {_NOTIFICATION_COLUMNS} FROM notifications WHERE atsign=? AND box=? "
             "AND expires_at > ?")
        args: list = [atsign, RECEIVED, now_ms]
        if since_ms is not None:
            q += " AND epoch_millis >= ?"
            args.append(since_ms)
        if until_ms is not None:
            q += " AND epoch_millis < ?"
            args.append(until_ms)
        q += " ORDER BY epoch_millis, seq LIMIT ?"
        args.append(limit)
        return [_row_to_notification(r) for r in self._db.execute(q, args)]

    def count_notifications(self, atsign: str) -> int:
        return self._db.execute("SELECT COUNT(*) FROM notifications WHERE atsign=?",
                                (atsign,)).fetchone()[0]

    def purge_notifications(self, before_ms: int) -> int:
        """Forget notifications that expired before ``before_ms``."""
        self._begin()
        return self._db.execute("DELETE FROM notifications WHERE expires_at < ?",
                                (before_ms,)).rowcount
