"""Planning a GPU host from another machine: `render --gpus-from` places the B200 example
host's two vLLM TP=4 replicas on disjoint GPUs, and a too-small inventory is refused by name."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
B200 = REPO / "hosts" / "inventories" / "b200-8x192gb.json"


def render(tmp_path: Path, inventory: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "reconciler.cli", "render", "--config", str(REPO / "hosts" / "b200-node.yaml"),
         "--out", str(tmp_path / "units"), "--gpus-from", str(inventory)],
        capture_output=True, text=True, env={"TF_STATE_DIR": str(tmp_path / "state"), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip


def test_b200_replicas_get_disjoint_gpus(tmp_path):
    result = render(tmp_path, B200)
    assert result.returncode == 0, result.stderr
    placed = {}
    for unit in (tmp_path / "units").glob("tensorforge-backend-*.service"):
        text = unit.read_text()
        assert "--tensor-parallel-size 4" in text and "--quantization fp8" in text
        placed[unit.name] = re.search(r"CUDA_VISIBLE_DEVICES=([\d,]+)", text).group(1).split(",")
    assert len(placed) == 2
    a, b = placed.values()
    assert len(a) == len(b) == 4 and not set(a) & set(b)


def test_two_small_cards_refuse_with_the_reason(tmp_path):
    small = tmp_path / "small.json"
    small.write_text(json.dumps([
        {"index": i, "uuid": f"GPU-{i}", "name": "small", "memory_total": 8 * 2**30,
         "memory_used": 0, "memory_free": 8 * 2**30} for i in range(2)
    ]))  # fmt: skip
    result = render(tmp_path, small)
    assert result.returncode == 1  # a unit set missing a declared backend is not written at all
    assert (
        "refused  backend-qwen3-a: gpu_ids [2, 3] do not exist (host has [0, 1])" in result.stderr
    )
    assert "nothing written" in result.stderr and not list((tmp_path / "units").glob("*"))
    planned = subprocess.run(
        [sys.executable, "-m", "reconciler.cli", "plan", "--config", str(REPO / "hosts" / "b200-node.yaml"),
         "--unit-dir", str(tmp_path / "units"), "--gpus-from", str(small)],
        capture_output=True, text=True, env={"TF_STATE_DIR": str(tmp_path / "state"), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert planned.returncode == 1, (
        planned.stdout
    )  # a refusal: apply would fail, not "nothing to do"
    assert "refuse   backend-qwen3-a" in planned.stdout and "nothing to do" not in planned.stdout


def test_a_broken_inventory_file_is_named(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"index": 0, "vram": 1}]')
    result = render(tmp_path, bad)
    assert result.returncode == 1
    assert (
        f"{bad}: not a GPU inventory" in result.stderr and "unknown keys ['vram']" in result.stderr
    )
