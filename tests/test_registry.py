"""The model registry on both databases: SQLite (default) and PostgreSQL (TF_REGISTRY_URL).
PostgreSQL runs as a private cluster on a unix socket; the tests skip when it is not installed."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
from fakes.postgres import shared_postgres

from reconciler.models.registry import (
    MIGRATIONS,
    TYPES,
    ModelFile,
    ModelRecord,
    PostgresDatabase,
    Registry,
    SQLiteDatabase,
    open_database,
)


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path: Path):
    """A fresh, empty database of each kind; returns a factory for new connections to it."""
    if request.param == "sqlite":
        path = tmp_path / "registry.sqlite3"
        return lambda: SQLiteDatabase(path)
    cluster = shared_postgres()
    if cluster.unavailable:
        pytest.skip(cluster.unavailable)
    cluster.reset()
    return lambda: PostgresDatabase(cluster.url)


def record(name: str = "qwen", **changes) -> ModelRecord:
    fields = dict(
        name=name,
        source="hf:Qwen/Qwen2.5-Coder-32B-Instruct-GGUF",
        revision="0123456789abcdef0123456789abcdef01234567",
        format="gguf",
        architecture="qwen2",
        parameters=32_763_876_352,
        quantization="Q4_K_M",
        context_length=32768,
        vram_estimate_bytes=21_500_000_000,
        aliases=["qwen2.5-coder-32b", "coder"],
        pulled_at=1_764_000_000.123456,
        files=[
            ModelFile(f"/m/{name}/part-00001-of-00002.gguf", 10_000_000_000, "a" * 64),
            ModelFile(f"/m/{name}/part-00002-of-00002.gguf", 9_850_000_000, "b" * 64),
        ],
    )
    fields.update(changes)
    return ModelRecord(**fields)


def test_round_trip_keeps_every_field(database):
    registry = Registry(database=database())
    registry.put(record())
    got = registry.get("qwen")
    assert got == record()  # 64-bit sizes, float timestamps, order of files
    assert got.size == 19_850_000_000
    assert got.primary_path == Path("/m/qwen/part-00001-of-00002.gguf")
    assert registry.schema_version == len(MIGRATIONS)


def test_found_by_alias(database):
    registry = Registry(database=database())
    registry.put(record())
    assert registry.get("coder").name == "qwen"
    assert registry.get("qwen2.5-coder-32b").name == "qwen"
    assert registry.get("nothing") is None


def test_replace_list_remove(database):
    registry = Registry(database=database())
    registry.put(record())
    registry.put(record("small", aliases=[], files=[ModelFile("/m/s.gguf", 1, "c" * 64)]))
    registry.put(record(quantization="Q8_0", aliases=["coder"]))  # replaces, drops an alias
    assert [r.name for r in registry.list()] == ["qwen", "small"]
    assert registry.get("qwen").quantization == "Q8_0"
    assert registry.get("qwen2.5-coder-32b") is None
    assert registry.remove("qwen") is True
    assert registry.remove("qwen") is False
    assert registry.get("coder") is None  # aliases go with their model


def test_an_alias_names_one_model(database):
    registry = Registry(database=database())
    registry.put(record())
    with pytest.raises(ValueError, match="alias 'coder' of 'other' already names model 'qwen'"):
        registry.put(record("other", aliases=["coder"]))
    assert registry.get("other") is None  # the failed put left nothing behind


def test_version_1_registry_upgrades_in_place(database):
    db = database()
    with db.transaction() as cur:  # what the first release created
        cur.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        for statement in filter(str.strip, MIGRATIONS[0].format(**TYPES[db.dialect]).split(";")):
            cur.execute(statement)
        cur.execute("INSERT INTO schema_version VALUES (1)")
        cur.execute(
            "INSERT INTO models VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            ("old", "pypi:x", None, "gguf", None, None, None, None, None, "o1,o2", 1.0),
        )
        cur.execute("INSERT INTO model_files VALUES (?,?,?,?)", ("old", "/m/old.gguf", 5, "d" * 64))
    registry = Registry(database=database())
    assert registry.schema_version == len(MIGRATIONS) == 3
    old = registry.get("o2")
    assert old.files == [ModelFile("/m/old.gguf", 5, "d" * 64)]
    assert old.requested_revision is None  # column added by migration 3, empty for old rows


def test_concurrent_first_opens_migrate_once(database):
    errors: list[Exception] = []

    def open_it() -> None:
        try:
            Registry(database=database())
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with database().transaction() as cur:
        versions = [r[0] for r in cur.execute("SELECT version FROM schema_version").fetchall()]
    assert sorted(versions) == list(range(1, len(MIGRATIONS) + 1))


def test_concurrent_puts_of_one_model_end_with_one_entry(database):
    """Hosts sharing a registry may write one model at the same moment. On PostgreSQL's
    READ COMMITTED, unserialized DELETE-then-INSERT pairs collided on the primary key."""
    Registry(database=database())  # migrated once, so the threads race on put alone
    errors: list[Exception] = []

    def put_many(worker: int) -> None:
        registry = Registry(database=database())
        for i in range(15):
            try:
                registry.put(record(quantization=f"Q{worker}_{i}"))
            except Exception as exc:  # collected and asserted below
                errors.append(exc)

    threads = [threading.Thread(target=put_many, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    found = Registry(database=database()).list()
    assert [r.name for r in found] == ["qwen"] and len(found[0].files) == 2


def test_a_corrupt_sqlite_registry_is_named(tmp_path):
    path = tmp_path / "registry.sqlite3"
    path.write_bytes(b"this is not sqlite, it is a text file of some length" * 40)
    with pytest.raises(
        ValueError, match=rf"^model registry {path}: file is not a database; move it aside"
    ):
        Registry(path)
    assert path.read_bytes().startswith(b"this is not sqlite")  # left as it was, for inspection


def test_sqlite_is_the_default_and_urls_are_checked(tmp_path, monkeypatch):
    monkeypatch.delenv("TF_REGISTRY_URL", raising=False)
    db = open_database(tmp_path)
    assert isinstance(db, SQLiteDatabase) and db.path == tmp_path / "registry.sqlite3"
    monkeypatch.setenv("TF_REGISTRY_URL", f"sqlite://{tmp_path}/other.db")
    assert open_database(tmp_path).path == tmp_path / "other.db"
    monkeypatch.setenv("TF_REGISTRY_URL", "postgresql://u:secret@db.example/tf")
    db = open_database(tmp_path)
    assert isinstance(db, PostgresDatabase) and "secret" not in db.describe()
    monkeypatch.setenv("TF_REGISTRY_URL", "mysql://u:secret@h/db")
    with pytest.raises(ValueError, match="use postgresql://") as caught:
        open_database(tmp_path)
    assert "secret" not in str(caught.value)


def test_registry_path_constructor_still_works(tmp_path):
    registry = Registry(tmp_path / "r.sqlite3")
    registry.put(record())
    conn = sqlite3.connect(tmp_path / "r.sqlite3")
    assert conn.execute("SELECT COUNT(*) FROM model_aliases").fetchone()[0] == 2
