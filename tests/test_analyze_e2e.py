"""`tensorforge analyze` end to end: the real SmolLM2 on llama.cpp behind the gateway,
on a small tree with one module too long for the (deliberately small) context, so the
map-reduce path runs for real. Checks the report's shape, not the model's prose."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import REPO, free_port, smollm2_config

pytestmark = pytest.mark.slow
NO_SENTENCE = "(the model's answer held no complete sentence)"


def write_tree(root: Path) -> None:
    (root / "shop").mkdir(parents=True)
    (root / "shop" / "__init__.py").write_text('"""A small shop."""\n')
    (root / "shop" / "prices.py").write_text(
        "def net(gross: float, vat: float = 0.2) -> float:\n    return gross / (1 + vat)\n"
    )
    functions = "".join(
        f"def total_{i}(items: list[float]) -> float:\n"
        f'    """Sum of the net prices of basket {i}."""\n'
        f"    return sum(net(x) for x in items) + {i}\n\n\n"
        for i in range(30)
    )  # about 3,000 characters: more than one prompt holds with 512 tokens of context
    (root / "shop" / "basket.py").write_text(f"from shop.prices import net\n\n\n{functions}")


def wait_backend_healthy(gateway: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = httpx.get(f"{gateway}/health", timeout=2).json()
        if health.get("backends_healthy"):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{gateway}: no healthy backend")


def test_analyze_with_smollm2_through_the_gateway(llama_server, run_gateway, tmp_path: Path):
    gateway = run_gateway(smollm2_config(llama_server, free_port()))
    wait_backend_healthy(gateway)
    tree = tmp_path / "tree"
    write_tree(tree)
    out, data = tmp_path / "r.md", tmp_path / "r.json"
    done = subprocess.run(
        [sys.executable, "-m", "reconciler.cli", "analyze", str(tree), "--gateway", gateway,
         "--output", str(out), "--json", str(data), "--context-tokens", "512",
         "--max-tokens", "32", "--overview-tokens", "48"],
        capture_output=True, text=True, timeout=900, cwd=REPO,  # a hang guard, not a speed check
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(data.read_text())
    assert report["summaries"]["status"] == "done"
    assert report["summaries"]["context_tokens"] == 512
    summaries = {m["path"]: m["summary"] for m in report["modules"]}
    assert set(summaries) == {"shop/__init__.py", "shop/basket.py", "shop/prices.py"}
    for path, summary in summaries.items():
        assert summary["status"] == "summarized", (path, summary)
        assert summary["model"] == "smollm2"
        # 32 answer tokens cut the model mid-sentence: only whole sentences are kept.
        text = summary["text"]
        assert re.search(r"[.!?][\"')\]]*$", text) or text == NO_SENTENCE, text
    assert summaries["shop/basket.py"]["chunks"] > 1  # map-reduce over chunks of one module
    assert report["summaries"]["overview"].strip()
    assert [(e["from"], e["to"]) for e in report["edges"]] == [("shop/basket.py", "shop/prices.py")]
    markdown = out.read_text()
    assert "```mermaid\nflowchart LR" in markdown and "## Architecture overview" in markdown
    assert (
        "> **Caution:** The overview and the module summaries were written by the language "
        "model smollm2 (SmolLM2-135M-Instruct.Q4_1.gguf, about 135M parameters)"
    ) in markdown
    assert "[3/3]" in done.stderr  # progress on stderr
