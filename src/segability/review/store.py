"""Review decisions in SQLite: ``review.sqlite`` in the run folder, the only file the review writes.

Every decision is a new row (accept, reject or needs-label, a note, who, when); the current decision
of an image is its latest row, and the earlier ones stay as its history. The database runs in WAL
mode with ``synchronous=FULL``, and every write is one ``BEGIN IMMEDIATE`` ... ``COMMIT``
transaction on its own connection: a decision that the server has answered is on disk, whether the
server is then stopped, the page reloaded, or another tab writes at the same moment (SQLite
serialises the writers; a busy database is waited for, up to ``timeout`` seconds).
"""

from __future__ import annotations

import os
import secrets
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal, get_args

import pandas as pd

from segability.errors import UsageError

__all__ = ["DB_FILE", "DECISIONS", "Decision", "DecisionKind", "ReviewStore", "export_decisions"]

DB_FILE = "review.sqlite"
DecisionKind = Literal["accept", "reject", "needs_label"]
DECISIONS: tuple[str, ...] = get_args(DecisionKind)
NOTE_MAX = 4000  # characters of a note
REVIEWER_MAX = 200

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    image TEXT NOT NULL,
    decision TEXT NOT NULL CHECK (decision IN ({", ".join(repr(d) for d in DECISIONS)})),
    note TEXT NOT NULL DEFAULT '',
    reviewer TEXT NOT NULL DEFAULT '',
    decided_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS decisions_image ON decisions (image, id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True)
class Decision:
    """One decision on one image, as stored.

    Attributes:
        id: the row number (increases with every decision).
        image: the image id.
        decision: ``accept``, ``reject`` or ``needs_label``.
        note: free text (may be empty).
        reviewer: who decided (may be empty).
        decided_at: when, ISO 8601 in UTC.
    """

    id: int
    image: str
    decision: str
    note: str
    reviewer: str
    decided_at: str


def _check_text(value: object, name: str, limit: int) -> str:
    if not isinstance(value, str):
        raise UsageError(f"{name} must be a string, got {type(value).__name__}", argument=name)
    if len(value) > limit:
        raise UsageError(f"{name} must hold at most {limit} characters, got {len(value)}", argument=name)
    return value


class ReviewStore:
    """The decisions of one run folder, in ``RUN_DIR/review.sqlite``.

    Args:
        run_dir: the run folder (must exist).
        timeout: seconds a write waits for another writer before failing.

    Example:
        >>> import tempfile
        >>> store = ReviewStore(tempfile.mkdtemp())
        >>> store.decide("case_1", "accept", note="fine", reviewer="ana").decision
        'accept'
        >>> store.current()["case_1"].note
        'fine'
    """

    def __init__(self, run_dir: str | os.PathLike, *, timeout: float = 30.0):
        self.path = Path(run_dir) / DB_FILE
        if not self.path.parent.is_dir():
            raise UsageError(f"run_dir {self.path.parent} is not a folder", argument="run_dir")
        self.timeout = timeout
        with self._connect() as con:
            con.execute("PRAGMA journal_mode=WAL")
            with self._write(con):
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    con.execute(statement)
                con.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('token', ?)", (secrets.token_urlsafe(32),))

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # autocommit mode: transactions are opened and closed here, explicitly
        con = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        try:
            con.execute("PRAGMA synchronous=FULL")
            con.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
            yield con
        finally:
            con.close()

    @staticmethod
    @contextmanager
    def _write(con: sqlite3.Connection) -> Iterator[None]:
        con.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")

    @property
    def token(self) -> str:
        """A random secret made once per run folder: the page sends it back with every POST."""
        with self._connect() as con:
            return con.execute("SELECT value FROM meta WHERE key = 'token'").fetchone()[0]

    def decide(self, image: str, decision: str, *, note: str = "", reviewer: str = "") -> Decision:
        """Record a decision on ``image`` (one transaction) and return it as stored.

        Raises:
            UsageError: an unknown ``decision``, or a note or reviewer that is not a string or is too long.
        """
        _check_text(image, "image", 10_000)
        if decision not in DECISIONS:
            raise UsageError(f"decision must be one of {list(DECISIONS)}, got {decision!r}", argument="decision")
        _check_text(note, "note", NOTE_MAX)
        _check_text(reviewer, "reviewer", REVIEWER_MAX)
        when = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        with self._connect() as con, self._write(con):
            cur = con.execute(
                "INSERT INTO decisions (image, decision, note, reviewer, decided_at) VALUES (?, ?, ?, ?, ?)",
                (image, decision, note, reviewer, when),
            )
            row_id = cur.lastrowid
        return Decision(int(row_id), image, decision, note, reviewer, when)

    def history(self, image: str | None = None) -> list[Decision]:
        """Every decision (of one image, or of all), oldest first."""
        query = "SELECT id, image, decision, note, reviewer, decided_at FROM decisions"
        args: tuple = ()
        if image is not None:
            query, args = query + " WHERE image = ?", (image,)
        with self._connect() as con:
            return [Decision(*row) for row in con.execute(query + " ORDER BY id", args)]

    def current(self) -> dict[str, Decision]:
        """The latest decision of every image that has one."""
        with self._connect() as con:
            rows = con.execute(
                "SELECT id, image, decision, note, reviewer, decided_at FROM decisions "
                "WHERE id IN (SELECT MAX(id) FROM decisions GROUP BY image)"
            )
            return {row[1]: Decision(*row) for row in rows}

    def table(self) -> pd.DataFrame:
        """Every decision as a table (``id, image, decision, note, reviewer, decided_at, latest``)."""
        rows = self.history()
        latest = {d.id for d in self.current().values()}
        df = pd.DataFrame([asdict(d) for d in rows], columns=[f for f in Decision.__dataclass_fields__])
        df["latest"] = df["id"].isin(latest)
        return df


def export_decisions(run_dir: str | os.PathLike, out: str | os.PathLike, *, force: bool = False) -> Path:
    """Write every decision of a run folder to a CSV file (see :meth:`ReviewStore.table`).

    Args:
        run_dir: the run folder.
        out: the CSV file to write.
        force: replace ``out`` when it exists.

    Raises:
        UsageError: ``out`` exists and ``force`` is False, or the run folder has no ``review.sqlite``.
    """
    out = Path(out)
    if out.exists() and not force:
        raise UsageError(f"out {out} exists; pass force=True to replace it", argument="out")
    if not (Path(run_dir) / DB_FILE).is_file():
        raise UsageError(f"run_dir {run_dir} holds no {DB_FILE}: nothing was reviewed there", argument="run_dir")
    from segability.analysis.results import write_atomic

    df = ReviewStore(run_dir).table()
    return write_atomic(out, df.to_csv(index=False).encode("utf-8"))
