"""Test doubles with real protocols: a local HuggingFace Hub (the file endpoints the real
`huggingface_hub` client uses, via HF_ENDPOINT) and a throwaway PostgreSQL cluster.

Used by the test suite; nothing here touches the internet."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


@dataclass
class HubRequest:
    method: str
    path: str
    range: str | None
    authorization: str | None


@dataclass
class FakeHub:
    """One repository at one commit. `truncate_first_get` cuts the first GET of a file after
    that many bytes (the client must resume); `corrupt` serves different bytes than the
    advertised LFS sha256; `delay` slows each 64 KiB chunk (to make pulls overlap);
    `token` makes every request without `Authorization: Bearer <token>` a 401."""

    repo: str
    files: dict[str, bytes]
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    truncate_first_get: dict[str, int] = field(default_factory=dict)
    corrupt: set[str] = field(default_factory=set)
    delay: float = 0.0
    token: str | None = None
    requests: list[HubRequest] = field(default_factory=list)

    def sha256(self, name: str) -> str:
        return hashlib.sha256(self.files[name]).hexdigest()

    def body(self, name: str) -> bytes:
        data = self.files[name]
        return bytes(reversed(data)) if name in self.corrupt else data

    def tree(self) -> dict:
        siblings = []
        for name, data in sorted(self.files.items()):
            entry: dict = {"rfilename": name, "size": len(data), "blobId": "b" * 40}
            if name.endswith((".gguf", ".safetensors", ".bin")):
                entry["lfs"] = {"sha256": self.sha256(name), "size": len(data), "pointerSize": 134}
            siblings.append(entry)
        return {"id": self.repo, "modelId": self.repo, "sha": self.commit, "siblings": siblings}

    def serve(self) -> HubServer:
        return HubServer(self)


def point_hub_client_at(url: str, monkeypatch) -> None:
    """Make an already imported huggingface_hub use `url` for everything, as if HF_ENDPOINT
    had been set before its import: it derives its URL template and the endpoint of its own
    side requests (the agent-harness registry) from HF_ENDPOINT at import time only."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setattr(constants, "ENDPOINT", url)
    template = url + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)


class HubServer:
    """`with FakeHub(...).serve() as url:` — the hub on 127.0.0.1 at a free port."""

    def __init__(self, hub: FakeHub):
        self.hub = hub
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> str:
        self._thread.start()
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    truncated: set[str] = set()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet test output
            pass

        def do_HEAD(self) -> None:
            self._dispatch(head=True)

        def do_GET(self) -> None:
            self._dispatch(head=False)

        def _dispatch(self, head: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            with lock:
                hub.requests.append(
                    HubRequest(
                        self.command,
                        path,
                        self.headers.get("Range"),
                        self.headers.get("Authorization"),
                    )
                )
            if hub.token and self.headers.get("Authorization") != f"Bearer {hub.token}":
                return self._error(401, "RepoNotFound", "Invalid credentials")
            api = f"/api/models/{hub.repo}/revision/"
            resolve = f"/{hub.repo}/resolve/"
            if path.startswith(api):
                if not self._revision_ok(path.removeprefix(api)):
                    return self._error(404, "RevisionNotFound", "Invalid rev id")
                return self._json(hub.tree(), head)
            if path.startswith(resolve):
                revision, _, name = path.removeprefix(resolve).partition("/")
                if not self._revision_ok(revision):
                    return self._error(404, "RevisionNotFound", "Invalid rev id")
                if name not in hub.files:
                    return self._error(404, "EntryNotFound", "Entry not found")
                return self._file(name, head)
            return self._error(404, "RepoNotFound", "Repository not found")

        def _revision_ok(self, revision: str) -> bool:
            return revision in ("main", hub.commit)

        def _error(self, status: int, code: str, message: str) -> None:
            body = json.dumps({"error": message}).encode()
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, data: dict, head: bool) -> None:
            body = json.dumps(data).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _file(self, name: str, head: bool) -> None:
            data = hub.body(name)
            start = 0
            if (wanted := self.headers.get("Range")) and wanted.startswith("bytes="):
                start = int(wanted.removeprefix("bytes=").split("-")[0] or 0)
            self.send_response(206 if start else 200)
            self.send_header("ETag", f'"{hub.sha256(name)}"')
            self.send_header("X-Repo-Commit", hub.commit)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(len(data) - start))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if head:
                return
            cut = None
            with lock:
                if name in hub.truncate_first_get and name not in truncated:
                    truncated.add(name)
                    cut = hub.truncate_first_get[name]
            end = len(data) if cut is None else max(start, min(cut, len(data)))
            for offset in range(start, end, 1 << 16):
                if hub.delay:
                    time.sleep(hub.delay)
                self.wfile.write(data[offset : min(offset + (1 << 16), end)])
            if cut is not None:
                self.wfile.flush()
                self.close_connection = True  # the client sees a short body and must resume

    return Handler


# -- PostgreSQL -------------------------------------------------------------------------------
PG_BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)


class PostgresCluster:
    """A private cluster on a unix socket in a temporary directory (as the `postgres` user when
    running as root, since initdb refuses root). `url` is a libpq URL for database `tf`."""

    def __init__(self) -> None:
        self.bin = next((d for d in PG_BIN_DIRS if (d / "initdb").exists()), None)
        self.root: Path | None = None
        self.url = ""
        self.failure: str | None = None

    @property
    def unavailable(self) -> str | None:
        if self.failure:
            return self.failure
        if self.bin is None:
            return "PostgreSQL is not installed (apt-get install postgresql)"
        if os.geteuid() == 0 and shutil.which("runuser") is None:
            return "running as root without runuser: cannot start PostgreSQL as another user"
        return None

    def _run(self, *argv: str) -> subprocess.CompletedProcess:
        assert self.bin is not None
        cmd = [str(self.bin / argv[0]), *argv[1:]]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)

    def start(self) -> str:
        if reason := self.unavailable:
            raise RuntimeError(reason)
        self.root = Path(tempfile.mkdtemp(prefix="tf-pg-"))
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        data, sock = self.root / "data", self.root
        steps = [
            ("initdb", "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"),
            (
                "pg_ctl", "-D", str(data), "-l", str(self.root / "log"), "-w", "-t", "30",
                "-o", f"-k {sock} -c listen_addresses='' -c fsync=off", "start",
            ),
            ("createdb", "-h", str(sock), "-U", "postgres", "tf"),
        ]  # fmt: skip
        for step in steps:
            result = self._run(*step)
            if result.returncode != 0:
                self.stop()
                raise RuntimeError(f"{step[0]} failed: {result.stderr.strip()[-400:]}")
        self.url = f"postgresql://postgres@/tf?host={sock}"
        return self.url

    def stop(self) -> None:
        if self.root is None:
            return
        if (self.root / "data" / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "immediate", "stop")
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    def reset(self) -> None:
        """An empty database: drop every table the registry created."""
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute("DROP SCHEMA public CASCADE")
            conn.execute("CREATE SCHEMA public")


_shared: PostgresCluster | None = None


def shared_postgres() -> PostgresCluster:
    """One cluster per test process, started on first use and stopped at exit."""
    global _shared
    if _shared is None:
        import atexit

        cluster = PostgresCluster()
        if cluster.unavailable is None:
            try:
                cluster.start()
                atexit.register(cluster.stop)
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                cluster.failure = f"PostgreSQL did not start: {exc}"
        _shared = cluster
    return _shared


def tiny_gguf(path: Path, rows: int = 128, file_type: int = 15) -> bytes:
    """A small but valid llama-architecture GGUF (one f32 tensor of rows x 256), as bytes."""
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_context_length(2048)
    writer.add_embedding_length(256)
    writer.add_feed_forward_length(512)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_file_type(file_type)
    writer.add_tensor(
        "token_embd.weight", np.arange(rows * 256, dtype=np.float32).reshape(rows, 256)
    )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()
