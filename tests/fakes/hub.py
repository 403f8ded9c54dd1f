"""A local HuggingFace Hub for the pull tests: the file endpoints the real `huggingface_hub`
client uses (via HF_ENDPOINT), with resumable, corruptible and authenticated downloads.
Nothing here touches the internet."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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
