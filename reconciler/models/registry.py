"""The model registry: which model files are on disk, where, and with which checksum.

SQLite in the models directory by default. Schema changes are numbered migrations applied in
order, so an old registry upgrades in place."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

MIGRATIONS: list[str] = [
    # 1: models and their files.
    """
    CREATE TABLE models (
        name TEXT PRIMARY KEY,
        source TEXT NOT NULL,
        revision TEXT,
        format TEXT,
        architecture TEXT,
        parameters INTEGER,
        quantization TEXT,
        context_length INTEGER,
        vram_estimate_bytes INTEGER,
        aliases TEXT NOT NULL DEFAULT '',
        pulled_at REAL NOT NULL
    );
    CREATE TABLE model_files (
        model TEXT NOT NULL REFERENCES models(name) ON DELETE CASCADE,
        path TEXT NOT NULL,
        size INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        PRIMARY KEY (model, path)
    );
    """,
]


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

    @property
    def primary_path(self) -> Path:
        return Path(self.files[0].path)


class Registry:
    def __init__(self, db_path: Path):
        self.db_path = db_path
        db_path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as conn:
            self._migrate(conn)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.db_path, timeout=30)
        conn.execute("PRAGMA foreign_keys = ON")
        try:
            with conn:
                yield conn
        finally:
            conn.close()

    def _migrate(self, conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
        current = row[0] or 0
        for number, script in enumerate(MIGRATIONS[current:], start=current + 1):
            for statement in filter(str.strip, script.split(";")):
                conn.execute(statement)
            conn.execute("INSERT INTO schema_version VALUES (?)", (number,))

    @property
    def schema_version(self) -> int:
        with self._connect() as conn:
            return conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0]

    def put(self, record: ModelRecord) -> None:
        """Insert or replace a model and its files in one transaction."""
        with self._connect() as conn:
            conn.execute("DELETE FROM models WHERE name = ?", (record.name,))
            conn.execute(
                "INSERT INTO models VALUES (?,?,?,?,?,?,?,?,?,?,?)",
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
                ),
            )
            conn.executemany(
                "INSERT INTO model_files VALUES (?,?,?,?)",
                [(record.name, f.path, f.size, f.sha256) for f in record.files],
            )

    def get(self, name: str) -> ModelRecord | None:
        with self._connect() as conn:
            row = conn.execute("SELECT * FROM models WHERE name = ?", (name,)).fetchone()
            if row is None:
                return None
            files = conn.execute(
                "SELECT path, size, sha256 FROM model_files WHERE model = ? ORDER BY path",
                (name,),
            ).fetchall()
        return _record(row, [ModelFile(*f) for f in files])

    def list(self) -> list[ModelRecord]:
        with self._connect() as conn:
            names = [r[0] for r in conn.execute("SELECT name FROM models ORDER BY name")]
        return [r for r in (self.get(n) for n in names) if r is not None]

    def remove(self, name: str) -> bool:
        with self._connect() as conn:
            return conn.execute("DELETE FROM models WHERE name = ?", (name,)).rowcount > 0


def _record(row: tuple, files: list[ModelFile]) -> ModelRecord:
    (name, source, revision, fmt, arch, params, quant, ctx, vram, aliases, pulled_at) = row
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
    )
