"""The results store: every run, its per-epoch metrics and its final numbers, in SQL.

An embedded SQLite file by default (WAL journal, a busy timeout, one short transaction per
write, so several worker processes can write at once); the same schema on PostgreSQL when
given a ``postgresql://`` URL (needs ``psycopg``: ``pip install polytask[postgres]``).

A run is identified by its ``key``: a hash of what defines it (benchmark, architecture,
method, hyper-parameters, seed, recipe). A finished run is never recomputed: a sweep asks
:meth:`ResultsStore.finished` first. A run that dies leaves status ``running`` behind; the
next :meth:`ResultsStore.claim` of its key (or :meth:`ResultsStore.mark_stale`) marks it
``interrupted``, so it is visible, not lost, and rerun.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import socket
import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ResultsStore", "RunRecord", "RunSpec", "run_key"]

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS runs (
        id INTEGER PRIMARY KEY {autoincrement},
        key TEXT NOT NULL,
        benchmark TEXT NOT NULL,
        arch TEXT NOT NULL,
        method TEXT NOT NULL,
        hparams TEXT NOT NULL,
        seed INTEGER NOT NULL,
        recipe TEXT NOT NULL,
        status TEXT NOT NULL,
        polytask_version TEXT,
        torch_version TEXT,
        git_commit TEXT,
        host TEXT,
        pid INTEGER,
        proc_start TEXT,
        started_at TEXT,
        ended_at TEXT,
        wall_time REAL,
        peak_memory_mb REAL,
        best_epoch INTEGER,
        val TEXT,
        test TEXT,
        error TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS runs_key ON runs (key)",
    "CREATE INDEX IF NOT EXISTS runs_benchmark ON runs (benchmark, status)",
    """CREATE TABLE IF NOT EXISTS epochs (
        run_id INTEGER NOT NULL,
        epoch INTEGER NOT NULL,
        split TEXT NOT NULL,
        metrics TEXT NOT NULL,
        losses TEXT,
        extra TEXT,
        PRIMARY KEY (run_id, epoch, split)
    )""",
]

STATUSES = ("running", "finished", "interrupted", "failed")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _dumps(value: Any) -> str:
    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return {_NONFINITE: str(v)}
        if isinstance(v, Mapping):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(value), sort_keys=True)


_NONFINITE = "__nonfinite__"


def _loads(text: str | None) -> Any:
    """Inverse of :func:`_dumps` (non-finite floats are tagged, so strings stay strings)."""
    if text is None:
        return None

    def decode(v: Any) -> Any:
        if isinstance(v, dict):
            if set(v) == {_NONFINITE}:
                return float(v[_NONFINITE])
            return {k: decode(x) for k, x in v.items()}
        if isinstance(v, list):
            return [decode(x) for x in v]
        return v

    return decode(json.loads(text))


@dataclass(frozen=True)
class RunSpec:
    """What defines a run (and so its key)."""

    benchmark: str
    arch: str
    method: str
    seed: int
    hparams: Mapping[str, Any]
    recipe: Mapping[str, Any]

    @property
    def key(self) -> str:
        return run_key(self)


def run_key(spec: RunSpec) -> str:
    """A stable hash of the run's definition (JSON with sorted keys)."""
    payload = _dumps(
        {
            "benchmark": spec.benchmark,
            "arch": spec.arch,
            "method": spec.method,
            "seed": spec.seed,
            "hparams": dict(spec.hparams),
            "recipe": dict(spec.recipe),
        }
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


@dataclass
class RunRecord:
    """One row of ``runs``, decoded."""

    id: int
    key: str
    benchmark: str
    arch: str
    method: str
    hparams: dict[str, Any]
    seed: int
    recipe: dict[str, Any]
    status: str
    polytask_version: str | None
    torch_version: str | None
    git_commit: str | None
    host: str | None
    pid: int | None
    started_at: str | None
    ended_at: str | None
    wall_time: float | None
    peak_memory_mb: float | None
    best_epoch: int | None
    val: dict[str, float] | None
    test: dict[str, float] | None
    error: str | None


class ResultsStore:
    """A results database at ``location``: a file path (SQLite) or a ``postgresql://`` URL."""

    def __init__(self, location: str | Path) -> None:
        self.location = str(location)
        self.postgres = self.location.startswith(("postgresql://", "postgres://"))
        if not self.postgres:
            Path(self.location).parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as conn:
            for statement in _SCHEMA:
                sql = statement.format(
                    autoincrement="GENERATED ALWAYS AS IDENTITY" if self.postgres else ""
                )
                conn.execute(sql)
            self._migrate(conn)

    def _migrate(self, conn: Any) -> None:
        # Columns added after the first release of the schema.
        if self.postgres:
            conn.execute("ALTER TABLE runs ADD COLUMN IF NOT EXISTS proc_start TEXT")
            return
        columns = {row[1] for row in conn.execute("PRAGMA table_info(runs)").fetchall()}
        if "proc_start" not in columns:
            conn.execute("ALTER TABLE runs ADD COLUMN proc_start TEXT")

    # -- connections ---------------------------------------------------------------------
    @contextmanager
    def _connect(self, *, write: bool = True) -> Iterator[Any]:
        if self.postgres:
            try:
                import psycopg
            except ImportError as exc:
                raise ImportError(
                    f"the results store {self.location!r} is PostgreSQL, which needs psycopg: "
                    "pip install 'polytask[postgres]'"
                ) from exc
            conn = psycopg.connect(self.location)
            try:
                with conn.transaction():
                    yield _PgAdapter(conn)
            finally:
                conn.close()
            return
        conn = sqlite3.connect(self.location, timeout=60.0, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA busy_timeout=60000")
            # Writers take the lock up front (no upgrade deadlocks); readers never block them.
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            conn.close()

    # -- writing -------------------------------------------------------------------------
    def claim(self, spec: RunSpec, *, provenance: Mapping[str, Any] | None = None) -> int | None:
        """Start a run of ``spec`` unless a finished one exists (then return ``None``).

        A ``running`` row of the same key whose process is gone (same host; its pid dead or
        reused by a process started later) is marked ``interrupted`` first; a live one makes
        this return ``None`` too (another worker is on it). A run on another host is taken
        for alive: ``mark_stale`` there, or ``fail(run_id, ..., status="interrupted")``,
        releases it. An interrupted run is continued under its own row (a resumed run keeps
        one record); a failed one keeps its row and error, and the rerun gets a new row.
        """
        key = spec.key
        prov = dict(provenance or {})
        with self._connect() as conn:
            if self.postgres:
                # READ COMMITTED would let two claimers both insert: serialise on the key.
                conn.execute("SELECT pg_advisory_xact_lock(hashtext(?))", (key,))
            rows = conn.execute(
                "SELECT id, status, host, pid, proc_start FROM runs WHERE key = ? ORDER BY id",
                (key,),
            ).fetchall()
            resumable = None
            for run_id, status, host, pid, start in rows:
                if status == "finished":
                    return None
                if status == "running":
                    if _alive(host, pid, start):
                        return None
                    conn.execute(
                        "UPDATE runs SET status = 'interrupted', ended_at = ? WHERE id = ?",
                        (_now(), run_id),
                    )
                    status = "interrupted"
                if status == "interrupted":
                    resumable = run_id
            if resumable is not None:
                conn.execute(
                    "UPDATE runs SET status = 'running', host = ?, pid = ?, proc_start = ?, "
                    "ended_at = NULL, error = NULL WHERE id = ?",
                    (socket.gethostname(), os.getpid(), _proc_start(os.getpid()), resumable),
                )
                return int(resumable)
            cur = conn.execute(
                "INSERT INTO runs (key, benchmark, arch, method, hparams, seed, recipe, status, "
                "polytask_version, torch_version, git_commit, host, pid, proc_start, started_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, 'running', ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                (
                    key,
                    spec.benchmark,
                    spec.arch,
                    spec.method,
                    _dumps(dict(spec.hparams)),
                    spec.seed,
                    _dumps(dict(spec.recipe)),
                    prov.get("polytask_version"),
                    prov.get("torch_version"),
                    prov.get("git_commit"),
                    socket.gethostname(),
                    os.getpid(),
                    _proc_start(os.getpid()),
                    _now(),
                ),
            )
            return int(cur.fetchone()[0])

    def log_epoch(
        self,
        run_id: int,
        epoch: int,
        split: str,
        metrics: Mapping[str, float],
        losses: list[float] | None = None,
        *,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        """Record one split's metrics after ``epoch`` (replacing a row a resumed run redoes);
        ``extra`` holds anything else per epoch (training losses, mean task weights)."""
        with self._connect() as conn:
            conn.execute(
                "INSERT INTO epochs (run_id, epoch, split, metrics, losses, extra) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (run_id, epoch, split) DO UPDATE SET "
                "metrics = excluded.metrics, losses = excluded.losses, extra = excluded.extra",
                (
                    run_id,
                    epoch,
                    split,
                    _dumps(dict(metrics)),
                    _dumps(losses),
                    None if extra is None else _dumps(dict(extra)),
                ),
            )

    def finish(
        self,
        run_id: int,
        *,
        best_epoch: int,
        val: Mapping[str, float],
        test: Mapping[str, float],
        wall_time: float,
        peak_memory_mb: float | None = None,
    ) -> None:
        with self._connect() as conn:
            conn.execute(
                "UPDATE runs SET status = 'finished', ended_at = ?, best_epoch = ?, val = ?, "
                "test = ?, wall_time = ?, peak_memory_mb = ? WHERE id = ?",
                (
                    _now(),
                    best_epoch,
                    _dumps(dict(val)),
                    _dumps(dict(test)),
                    wall_time,
                    peak_memory_mb,
                    run_id,
                ),
            )

    def fail(self, run_id: int, error: str, *, status: str = "failed") -> None:
        """Mark a run ``failed`` (an exception) or ``interrupted`` (Ctrl-C, a signal)."""
        if status not in ("failed", "interrupted"):
            raise ValueError(f"status={status!r} must be 'failed' or 'interrupted'")
        with self._connect() as conn:
            conn.execute(
                "UPDATE runs SET status = ?, ended_at = ?, error = ? WHERE id = ?",
                (status, _now(), error[-4000:], run_id),
            )

    def mark_stale(self) -> int:
        """Mark ``running`` rows of this host whose process is gone as ``interrupted``."""
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT id, host, pid, proc_start FROM runs WHERE status = 'running'"
            ).fetchall()
            stale = [run_id for run_id, host, pid, start in rows if not _alive(host, pid, start)]
            for run_id in stale:
                conn.execute(
                    "UPDATE runs SET status = 'interrupted', ended_at = ? WHERE id = ?",
                    (_now(), run_id),
                )
        return len(stale)

    # -- reading -------------------------------------------------------------------------
    def finished(self, spec: RunSpec) -> bool:
        with self._connect(write=False) as conn:
            row = conn.execute(
                "SELECT 1 FROM runs WHERE key = ? AND status = 'finished'", (spec.key,)
            ).fetchone()
        return row is not None

    def runs(self, **where: Any) -> list[RunRecord]:
        """Runs matching equality filters on columns (``benchmark=``, ``status=``, ...)."""
        columns = {f.name for f in RunRecord.__dataclass_fields__.values()}
        unknown = sorted(set(where) - columns)
        if unknown:
            raise ValueError(f"unknown run column(s) {unknown}; columns: {sorted(columns)}")
        sql = "SELECT " + ", ".join(RunRecord.__dataclass_fields__) + " FROM runs"
        if where:
            sql += " WHERE " + " AND ".join(f"{k} = ?" for k in where)
        sql += " ORDER BY id"
        with self._connect(write=False) as conn:
            rows = conn.execute(sql, tuple(where.values())).fetchall()
        out = []
        for row in rows:
            rec = dict(zip(RunRecord.__dataclass_fields__, row))
            for name in ("hparams", "recipe", "val", "test"):
                rec[name] = _loads(rec[name])
            out.append(RunRecord(**rec))
        return out

    def epochs(self, run_id: int, split: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT epoch, split, metrics, losses, extra FROM epochs WHERE run_id = ?"
        args: tuple[Any, ...] = (run_id,)
        if split is not None:
            sql += " AND split = ?"
            args += (split,)
        with self._connect(write=False) as conn:
            rows = conn.execute(sql + " ORDER BY epoch, split", args).fetchall()
        return [
            {
                "epoch": e,
                "split": s,
                "metrics": _loads(m),
                "losses": _loads(loss),
                "extra": _loads(x),
            }
            for e, s, m, loss, x in rows
        ]


def _proc_start(pid: int) -> str | None:
    """The start time of process ``pid`` (Linux: field 22 of /proc/PID/stat), which tells a
    process from a later one that reused its pid; ``None`` where /proc is not available."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces: split after its closing parenthesis.
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else None


def _alive(host: str | None, pid: int | None, start: str | None = None) -> bool:
    """Whether the process that claimed a run still runs (unknowable on another host: yes)."""
    if host is None or pid is None:
        return False
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now = _proc_start(pid)
    return start is None or now is None or now == start


class _PgAdapter:
    """Gives a psycopg connection sqlite3's ``execute`` with ``?`` placeholders."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def execute(self, sql: str, args: tuple[Any, ...] = ()) -> Any:
        return self.conn.execute(sql.replace("?", "%s"), args)
