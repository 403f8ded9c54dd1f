"""The model registry: which model files are on disk, where, and with which checksum.

SQLite in the models directory by default; PostgreSQL when `TF_REGISTRY_URL=postgresql://…`
is set. Both run the same statements through one small `Database` seam (placeholders and
transaction start differ, nothing else). Schema changes are numbered migrations applied in
order under a lock, so an old registry upgrades in place and two processes opening a new one
at once do not both migrate it."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from reconciler.extras import require

# Column types differ where SQLite is lax and PostgreSQL is not: byte counts need 64 bits and
# epoch seconds need a double. For SQLite these render exactly as migration 1 always read.
TYPES = {
    "sqlite": {"bigint": "INTEGER", "double": "REAL"},
    "postgresql": {"bigint": "BIGINT", "double": "DOUBLE PRECISION"},
}

MIGRATIONS: list[str] = [
    # 1: models and their files.
    """
    CREATE TABLE models (
        name TEXT PRIMARY KEY,
        source TEXT NOT NULL,
        revision TEXT,
        format TEXT,
        architecture TEXT,
        parameters {bigint},
        quantization TEXT,
        context_length INTEGER,
        vram_estimate_bytes {bigint},
        aliases TEXT NOT NULL DEFAULT '',
        pulled_at {double} NOT NULL
    );
    CREATE TABLE model_files (
        model TEXT NOT NULL REFERENCES models(name) ON DELETE CASCADE,
        path TEXT NOT NULL,
        size {bigint} NOT NULL,
        sha256 TEXT NOT NULL,
        PRIMARY KEY (model, path)
    );
    """,
    # 2: aliases as rows, so a model is found by any of its names and an alias is unique.
    """
    CREATE TABLE model_aliases (
        alias TEXT PRIMARY KEY,
        model TEXT NOT NULL REFERENCES models(name) ON DELETE CASCADE
    );
    CREATE INDEX model_files_sha256 ON model_files (sha256);
    """,
    # 3: the revision the declaration asked for (a branch or tag), next to the commit it was:
    # a changed `revision: v2` must pull again, an unchanged one must not ask the hub.
    """
    ALTER TABLE models ADD COLUMN requested_revision TEXT;
    """,
]
COLUMNS = ("name, source, revision, format, architecture, parameters, quantization, "
           "context_length, vram_estimate_bytes, aliases, pulled_at, requested_revision")  # fmt: skip


@dataclass(frozen=True)
class ModelFile:
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class ModelRecord:
    name: str
    source: str
    files: list[ModelFile]
    revision: str | None = None
    format: str | None = None
    architecture: str | None = None
    parameters: int | None = None
    quantization: str | None = None
    context_length: int | None = None
    vram_estimate_bytes: int | None = None
    aliases: list[str] = field(default_factory=list)
    pulled_at: float = 0.0
    requested_revision: str | None = None  # what was declared; `revision` is what it resolved to

    @property
    def primary_path(self) -> Path:
        return Path(self.files[0].path)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


class Database(Protocol):
    """What the registry needs from a database: a transaction, `?` placeholders."""

    dialect: str

    def transaction(self) -> Any: ...  # a context manager yielding a cursor-like `execute`
    def writing(self) -> Any: ...  # the same, for writers, who run one at a time


class SQLiteDatabase:
    dialect = "sqlite"

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def describe(self) -> str:
        return str(self.path)

    @contextmanager
    def transaction(self) -> Iterator[_Cursor]:
        # Autocommit mode and an explicit BEGIN IMMEDIATE: the write lock is taken up front, so
        # DDL in migrations is transactional too and concurrent writers queue instead of failing.
        conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        try:
            try:
                conn.execute("PRAGMA foreign_keys = ON")
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.DatabaseError as exc:
                if type(exc) is not sqlite3.DatabaseError:
                    raise  # locked, read-only, …: those say what they are
                raise ValueError(
                    f"model registry {self.path}: {exc}; move it aside and pull the models "
                    "again to rebuild it"
                ) from None
            try:
                yield _Cursor(conn.execute, lambda q: q)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            conn.close()

    writing = transaction  # BEGIN IMMEDIATE already runs writers one at a time


class PostgresDatabase:
    dialect = "postgresql"
    LOCK_KEY = 0x7E2F0  # pg_advisory_xact_lock key serializing registry writes and migrations

    def __init__(self, url: str):
        require(
            "psycopg", "postgres", "TF_REGISTRY_URL=postgresql://… (the registry on PostgreSQL)"
        )
        self.url = url

    def describe(self) -> str:
        return _redact(self.url)

    @contextmanager
    def transaction(self) -> Iterator[_Cursor]:
        import psycopg

        with psycopg.connect(self.url, connect_timeout=10) as conn, conn.transaction():
            yield _Cursor(conn.execute, lambda q: q.replace("?", "%s"))

    @contextmanager
    def writing(self) -> Iterator[_Cursor]:
        # Under READ COMMITTED, two writers' DELETE-then-INSERT of one name interleave into a
        # duplicate key; one lock for all writers gives SQLite's BEGIN IMMEDIATE semantics
        # (hosts sharing a registry pull rarely; writers are short).
        with self.transaction() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(?)", (self.LOCK_KEY,))
            yield cur


class _Cursor:
    """`execute(sql, params)` with `?` placeholders on either database."""

    def __init__(self, execute, translate):
        self._execute = execute
        self._translate = translate

    def execute(self, sql: str, params: tuple = ()) -> Any:
        return self._execute(self._translate(sql), params)

    def executemany(self, sql: str, rows: list[tuple]) -> None:
        for row in rows:
            self.execute(sql, row)


def _redact(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "…@" + rest.split("@", 1)[1]
    return scheme + sep + rest


def open_database(models_dir: Path) -> SQLiteDatabase | PostgresDatabase:
    """TF_REGISTRY_URL (postgresql:// or sqlite:///path) if set, else SQLite in models_dir."""
    url = os.environ.get("TF_REGISTRY_URL", "").strip()
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresDatabase(url)
    if url.startswith("sqlite:///"):
        return SQLiteDatabase(Path(url.removeprefix("sqlite://")))
    if url:
        raise ValueError(
            f"TF_REGISTRY_URL={_redact(url)!r}: use postgresql://USER@HOST/DB or sqlite:///ABS/PATH"
        )
    return SQLiteDatabase(models_dir / "registry.sqlite3")


# Databases whose schema this process has brought up to date (see Registry._migrate).
_MIGRATED: set[tuple] = set()
_MIGRATED_LOCK = threading.Lock()


class Registry:
    """Models by name or alias. `Registry(path)` is SQLite at path; pass `database=` otherwise."""

    def __init__(self, db_path: Path | None = None, database: Database | None = None):
        if database is None:
            if db_path is None:
                raise ValueError("Registry needs a db_path or a database")
            database = SQLiteDatabase(db_path)
        self.db = database
        self.types = TYPES[database.dialect]
        self._migrate()

    def _migrate(self) -> None:
        """The write-locked check once per SQLite file per process, and on PostgreSQL (where
        a database can be dropped and created again under the same URL) only after a plain
        read found the schema behind: every open used to take the lock."""
        with _MIGRATED_LOCK:
            if (key := self._identity()) is not None and key in _MIGRATED:
                return
            if key is None and self.db.dialect != "sqlite" and self._up_to_date():
                return
            self._apply_migrations()
            if (key := self._identity()) is not None:
                _MIGRATED.add(key)

    def _up_to_date(self) -> bool:
        try:
            with self.db.transaction() as cur:
                return cur.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] == len(
                    MIGRATIONS
                )
        except Exception:  # no table yet, or any reason to take the locked path
            return False

    def _identity(self) -> tuple | None:
        """A SQLite file this process migrated; None where that cannot be known. A file
        deleted and created again is empty until a Registry migrates it (every creator is one)."""
        if not isinstance(self.db, SQLiteDatabase):
            return None
        try:
            empty = os.stat(self.db.path).st_size == 0
        except OSError:
            return None
        return None if empty else ("sqlite", str(self.db.path))

    def _apply_migrations(self) -> None:
        with self.db.writing() as cur:
            cur.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            current = cur.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] or 0
            for number, script in enumerate(MIGRATIONS[current:], start=current + 1):
                for statement in filter(str.strip, script.format(**self.types).split(";")):
                    cur.execute(statement)
                if number == 2:
                    _backfill_aliases(cur)
                cur.execute("INSERT INTO schema_version VALUES (?)", (number,))

    @property
    def schema_version(self) -> int:
        with self.db.transaction() as cur:
            return cur.execute("SELECT MAX(version) FROM schema_version").fetchone()[0]

    def put(self, record: ModelRecord) -> None:
        """Insert or replace a model, its files and aliases in one transaction."""
        with self.db.writing() as cur:
            taken = [
                (alias, owner)
                for alias in record.aliases
                for (owner,) in cur.execute(
                    "SELECT model FROM model_aliases WHERE alias = ? AND model <> ?",
                    (alias, record.name),
                ).fetchall()
            ]
            if taken:
                alias, owner = taken[0]
                raise ValueError(
                    f"alias {alias!r} of {record.name!r} already names model {owner!r}"
                )
            cur.execute("DELETE FROM models WHERE name = ?", (record.name,))
            cur.execute(
                f"INSERT INTO models ({COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    record.name,
                    record.source,
                    record.revision,
                    record.format,
                    record.architecture,
                    record.parameters,
                    record.quantization,
                    record.context_length,
                    record.vram_estimate_bytes,
                    ",".join(record.aliases),
                    record.pulled_at or time.time(),
                    record.requested_revision,
                ),
            )
            cur.executemany(
                "INSERT INTO model_files VALUES (?,?,?,?)",
                [(record.name, f.path, f.size, f.sha256) for f in record.files],
            )
            cur.executemany(
                "INSERT INTO model_aliases VALUES (?,?)",
                [(a, record.name) for a in dict.fromkeys(record.aliases) if a != record.name],
            )

    def get(self, name: str) -> ModelRecord | None:
        """The model called `name`, or whose alias `name` is."""
        with self.db.transaction() as cur:
            row = cur.execute(f"SELECT {COLUMNS} FROM models WHERE name = ?", (name,)).fetchone()
            if row is None:
                row = cur.execute(
                    f"SELECT {COLUMNS} FROM models WHERE name = "
                    "(SELECT model FROM model_aliases WHERE alias = ?)",
                    (name,),
                ).fetchone()
            if row is None:
                return None
            files = cur.execute(
                "SELECT path, size, sha256 FROM model_files WHERE model = ? ORDER BY path",
                (row[0],),
            ).fetchall()
        return _record(tuple(row), [ModelFile(*f) for f in files])

    def list(self) -> list[ModelRecord]:
        with self.db.transaction() as cur:
            names = [r[0] for r in cur.execute("SELECT name FROM models ORDER BY name").fetchall()]
        return [r for r in (self.get(n) for n in names) if r is not None]

    def remove(self, name: str) -> bool:
        with self.db.writing() as cur:
            return cur.execute("DELETE FROM models WHERE name = ?", (name,)).rowcount > 0


def _backfill_aliases(cur: _Cursor) -> None:
    rows = cur.execute("SELECT name, aliases FROM models").fetchall()
    seen: set[str] = set()
    for name, aliases in rows:
        for alias in filter(None, aliases.split(",")):
            if alias not in seen and alias != name:
                seen.add(alias)
                cur.execute("INSERT INTO model_aliases VALUES (?,?)", (alias, name))


def _record(row: tuple, files: list[ModelFile]) -> ModelRecord:
    (name, source, revision, fmt, arch, params, quant, ctx, vram, aliases, pulled_at, requested) = (
        row
    )
    return ModelRecord(
        name=name,
        source=source,
        files=files,
        revision=revision,
        format=fmt,
        architecture=arch,
        parameters=params,
        quantization=quant,
        context_length=ctx,
        vram_estimate_bytes=vram,
        aliases=[a for a in aliases.split(",") if a],
        pulled_at=pulled_at,
        requested_revision=requested,
    )
