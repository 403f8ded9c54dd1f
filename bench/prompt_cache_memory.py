"""How the embedded llama.cpp server's resident memory grows with distinct prompts, by its
host-memory prompt cache (--cache-ram): llama.cpp's default, a bound, and off.

    .venv/bin/python bench/prompt_cache_memory.py [--prompts 12] [--model FILE]

Each server (ctx 4096, 1 slot, 1 thread) gets the same distinct ~400-token prompts with
max_tokens 1; RSS is read from /proc before and after. Figures: docs/reliability.md."""

from __future__ import annotations

import argparse
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

WORDS = (
    "alpha beta gamma delta river stone cloud paper green quiet market window orange silver".split()
)


def rss_mib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) // 1024
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(model: str, cache_ram: int | None, prompts: int, results: dict) -> None:
    port = free_port()
    argv = [sys.executable, "-m", "reconciler.backends.llamacpp_server", "--model", model, "--port", str(port),
            "--ctx-size", "4096", "--parallel", "1", "--threads", "1"]  # fmt: skip
    if cache_ram is not None:
        argv += ["--cache-ram", str(cache_ram)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        start = rss_mib(proc.pid)
        rng = random.Random(1)  # the same prompts for every server
        for i in range(prompts):
            prompt = f"{i} " + " ".join(rng.choice(WORDS) for _ in range(300))
            httpx.post(
                f"http://127.0.0.1:{port}/v1/completions",
                json={"prompt": prompt, "max_tokens": 1},
                timeout=300,
            )
        results[cache_ram] = (start, rss_mib(proc.pid))
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--model", default=os.path.join(os.environ.get("TF_MODELS", ".cache/models"),
                                                        "smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"))  # fmt: skip
    args = parser.parse_args()
    results: dict = {}
    threads = [
        threading.Thread(target=run, args=(args.model, c, args.prompts, results))
        for c in (None, 16, 0)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for cache_ram, (start, end) in results.items():
        label = "llama.cpp default (8192)" if cache_ram is None else str(cache_ram)
        print(f"--cache-ram {label}: RSS {start} MiB at start, {end} MiB after {args.prompts} distinct prompts "
              f"(+{end - start} MiB)")  # fmt: skip


if __name__ == "__main__":
    main()
