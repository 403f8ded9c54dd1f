"""Serving benchmark on real backends: where requests go decides latency and throughput.

    .venv/bin/python bench/serving_bench.py [--conversations 16] [--prefixes 3] [--turns 4]
        [--rate 1.0] [--rounds 1] [--strategies cache-aware least-load round-robin
         vllm-router:cache_aware vllm-router:round_robin]

Two llama.cpp replicas of SmolLM2 (xllamacpp, one thread each, pinned to cores 0 and 1, 2
slots each, `--cache-reuse` as the reconciler launches them, no host prompt cache unless
`--cache-ram`) serve multi-turn conversations that share a few long
system prompts (about 1-2k tokens each): conversations arrive open-loop (Poisson, `--rate`
per second, seeded), each sends its next turn when the previous answer is complete, and
every turn streams. In front of the same replicas, one after the other (fresh replicas for
each, so no strategy inherits another's cache; order rotated between rounds): TensorForge's
gateway with each routing strategy, and the vLLM project's own router (`vllm-router`, PyPI,
installed by this script into its own venv outside the clone) with its policies.

Reported per strategy: TTFT p50/p99, end-to-end p50/p99, output tokens/s over the run,
prefix-cache hit rate (prompt tokens llama.cpp took from its cache, from each stream's
`timings`), failed requests; pooled over all rounds and, with `--rounds` > 1, the median of
the rounds' own figures. Every turn (when it was sent, which replica answered, TTFT, tokens
taken from the cache) goes to `turns.jsonl` in the logs directory, to see where a tail
comes from."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from reconciler.backends.commands import CACHE_REUSE_TOKENS  # as the reconciler launches them

REPO = Path(__file__).resolve().parent.parent
REPLICA_CORES = (0, 1)
VLLM_ROUTER_VENV = Path(
    os.environ.get("TF_VLLM_ROUTER_VENV", "/var/cache/tensorforge/vllm-router-venv")
)
VOCAB = (
    "system pump valve pressure sensor report shift operator maintenance schedule inspection "
    "record threshold alarm reading temperature flow line station quality batch order supplier "
    "invoice ledger account balance transfer audit policy customer ticket request priority "
    "escalation response window contract clause term renewal notice payment period review "
    "always never politely briefly precisely check confirm explain list summarize compare "
    "the a of to and for with on in by from that this each every when if then else"
).split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def smollm2() -> Path:
    os.environ.setdefault("TF_MODELS", str(REPO / ".cache" / "models"))
    from reconciler.config.loader import load_desired_state
    from reconciler.models.pull import pull_model

    state, _ = load_desired_state(None)
    return pull_model(
        "smollm2", state.models["smollm2"], Path(os.environ["TF_MODELS"])
    ).primary_path


@dataclass
class Conversation:
    system: str
    questions: list[str]
    arrival: float  # seconds after the run starts
    index: int = 0
    prefix: int = 0  # which system prompt


def workload(args: argparse.Namespace, salt: str) -> list[Conversation]:
    """Seeded: the same conversations for every strategy, except that each run's system
    prompts carry its own salt, so nothing cached by an earlier run can be hit."""
    rng = random.Random(args.seed)
    prefixes = [f"[{salt}-{i}] You are assistant {i}. " + " ".join(rng.choices(VOCAB, k=args.prefix_words))
                for i in range(args.prefixes)]  # fmt: skip
    arrival, conversations = 0.0, []
    for i in range(args.conversations):
        questions = [" ".join(rng.choices(VOCAB, k=12)) + "?" for _ in range(args.turns)]
        conversations.append(
            Conversation(prefixes[i % args.prefixes], questions, arrival, i, i % args.prefixes)
        )
        arrival += rng.expovariate(args.rate)
    return conversations


@dataclass
class Result:
    ttft: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    failed: int = 0
    elapsed: float = 0.0
    turns: list[dict] = field(default_factory=list)  # one record per turn, for turns.jsonl


async def one_turn(
    session: aiohttp.ClientSession,
    url: str,
    messages: list[dict],
    args,
    result: Result,
    record: dict,
) -> str:
    body = {"model": "smollm2", "messages": messages, "max_tokens": args.max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    started = time.perf_counter()
    answer: list[str] = []
    first: float | None = None
    try:
        async with session.post(url + "/v1/chat/completions", json=body) as response:
            record["backend"] = response.headers.get("x-tensorforge-backend")
            if response.status != 200:
                result.failed += 1
                return ""
            async for line in response.content:
                if not line.startswith(b"data: {"):
                    continue
                event = json.loads(line[6:])
                for choice in event.get("choices") or []:
                    if choice.get("delta", {}).get("content"):
                        first = first or time.perf_counter()
                        answer.append(choice["delta"]["content"])
                if usage := event.get("usage"):
                    result.output_tokens += usage.get("completion_tokens", 0)
                if timings := event.get("timings"):
                    result.cached_tokens += timings.get("cache_n", 0)
                    result.prompt_tokens += timings.get("cache_n", 0) + timings.get("prompt_n", 0)
                    record.update(cache_n=timings.get("cache_n", 0), prompt_n=timings.get("prompt_n", 0),
                                  prompt_ms=timings.get("prompt_ms"))  # fmt: skip
    except (TimeoutError, aiohttp.ClientError, ValueError):
        result.failed += 1
        return ""
    done = time.perf_counter()
    result.ttft.append((first or done) - started)
    result.latency.append(done - started)
    record.update(ttft=round((first or done) - started, 3), e2e=round(done - started, 3))
    return "".join(answer)


async def converse(
    session, url: str, conversation: Conversation, args, result: Result, t0: float
) -> None:
    await asyncio.sleep(max(0.0, t0 + conversation.arrival - time.perf_counter()))
    messages = [{"role": "system", "content": conversation.system}]
    for turn, question in enumerate(conversation.questions):
        messages.append({"role": "user", "content": question})
        record = {"conversation": conversation.index, "prefix": conversation.prefix, "turn": turn,
                  "sent": round(time.perf_counter() - t0, 3)}  # fmt: skip
        answer = await one_turn(session, url, messages, args, result, record)
        result.turns.append(record)
        messages.append({"role": "assistant", "content": answer or "(no answer)"})


async def run_workload(url: str, conversations: list[Conversation], args) -> Result:
    result = Result()
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(
        timeout=timeout, connector=aiohttp.TCPConnector(limit=256)
    ) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(converse(session, url, c, args, result, t0) for c in conversations))
        result.elapsed = time.perf_counter() - t0
    return result


def wait_http(url: str, timeout: float = 120.0) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not become ready")


def start(
    argv: list[str], log: Path, core: int | None = None, env: dict | None = None
) -> subprocess.Popen:
    pin = (lambda: os.sched_setaffinity(0, {core})) if core is not None else None
    return subprocess.Popen(argv, cwd=REPO, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            env=env, preexec_fn=pin)  # fmt: skip


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_replicas(model: Path, args, logs: Path) -> tuple[list[subprocess.Popen], list[str]]:
    procs, urls = [], []
    for core in REPLICA_CORES:
        port = free_port()
        argv = [sys.executable, "-m", "reconciler.backends.llamacpp_server", "--model", str(model),
                "--port", str(port), "--ctx-size", str(args.ctx_size), "--parallel", str(args.parallel),
                "--threads", "1", "--alias", "smollm2", "--cache-ram", str(args.cache_ram),
                "--cache-reuse", str(CACHE_REUSE_TOKENS)]  # fmt: skip
        procs.append(start(argv, logs / f"replica-{core}.log", core))
        urls.append(f"http://127.0.0.1:{port}")
    for url in urls:
        wait_http(url + "/health")
    return procs, urls


def ensure_vllm_router() -> Path:
    binary = VLLM_ROUTER_VENV / "bin" / "vllm-router"
    if not binary.exists():
        print(f"installing vllm-router into {VLLM_ROUTER_VENV} (once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VLLM_ROUTER_VENV)], check=True)
        constraints = (
            Path(__file__).resolve().parent / "vllm-router-constraints.txt"
        )  # the tested versions
        pip = [str(VLLM_ROUTER_VENV / "bin" / "pip"), "install", "-q", "-c", str(constraints)]
        subprocess.run([*pip, "vllm-router"], check=True)
    return binary


def start_router(strategy: str, urls: list[str], logs: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = logs / f"router-{strategy.replace(':', '-')}.log"
    if strategy.startswith("vllm-router:"):
        argv = [str(ensure_vllm_router()), "--host", "127.0.0.1", "--port", str(port), "--worker-urls", *urls,
                "--policy", strategy.split(":", 1)[1], "--log-level", "warning"]  # fmt: skip
        proc = start(argv, log)
        wait_http(f"http://127.0.0.1:{port}/readiness")
        return proc, f"http://127.0.0.1:{port}"
    config = {
        "models": {"smollm2": {"source": "pypi:bench"}},
        "backends": {
            f"r{i}": {"kind": "llamacpp", "model": "smollm2", "port": 1, "url": u}
            for i, u in enumerate(urls)
        },
        "gateway": {
            "host": "127.0.0.1",
            "port": port,
            "health_interval": 0.5,
            "routing": {"strategy": strategy},
        },
    }
    path = logs / f"gateway-{strategy}.json"
    path.write_text(json.dumps(config))
    env = {**os.environ, "TF_STATE_DIR": str(logs / f"state-{strategy}")}
    proc = start(
        [
            sys.executable,
            "-m",
            "reconciler.cli",
            "--log-level",
            "WARNING",
            "gateway",
            "--config",
            str(path),
        ],
        log,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # every replica healthy, as the gateway sees it
        try:
            import urllib.request

            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if json.loads(response.read()).get("backends_healthy", 0) == len(urls):
                    return proc, url
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"gateway with {strategy} never saw its replicas healthy")


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


TABLE_HEAD = (
    "| strategy | TTFT p50 s | TTFT p99 s | e2e p50 s | e2e p99 s | output tok/s | prefix cache hit | failed | wall s |\n"
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
)


def figures(r: Result) -> list[float]:
    hit = r.cached_tokens / r.prompt_tokens if r.prompt_tokens else float("nan")
    return [pct(r.ttft, 0.5), pct(r.ttft, 0.99), pct(r.latency, 0.5), pct(r.latency, 0.99),
            r.output_tokens / r.elapsed, hit, r.failed, r.elapsed]  # fmt: skip


def row(strategy: str, f: list[float]) -> str:
    return (f"| {strategy} | {f[0]:.2f} | {f[1]:.2f} | {f[2]:.2f} | {f[3]:.2f} | {f[4]:.1f} | {f[5]:.0%} | "
            f"{f[6]:.0f} | {f[7]:.0f} |")  # fmt: skip


def merge(results: list[Result]) -> Result:
    total = Result()
    for r in results:
        total.ttft += r.ttft
        total.latency += r.latency
        total.output_tokens += r.output_tokens
        total.prompt_tokens += r.prompt_tokens
        total.cached_tokens += r.cached_tokens
        total.failed += r.failed
        total.elapsed += r.elapsed
    return total


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--prefixes", type=int, default=3, help="distinct long system prompts")
    parser.add_argument(
        "--prefix-words", type=int, default=1200, help="words per system prompt (~1.5k tokens)"
    )
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--rate", type=float, default=1.0, help="conversations arriving per second")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument(
        "--ctx-size", type=int, default=8192, help="per replica, split over --parallel"
    )
    parser.add_argument("--parallel", type=int, default=2, help="slots per replica")
    parser.add_argument(
        "--cache-ram",
        type=int,
        default=0,
        help="llama.cpp's host prompt cache, MiB (0: off, so only the slots' caches count)",
    )
    parser.add_argument("--rounds", type=int, default=1, help="runs per strategy, order rotated")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--strategies",
        nargs="+",
        default=[
            "cache-aware",
            "least-load",
            "round-robin",
            "vllm-router:cache_aware",
            "vllm-router:round_robin",
        ],
    )
    args = parser.parse_args()
    if any(s.startswith("vllm-router:") for s in args.strategies):
        ensure_vllm_router()
    model = smollm2()
    logs = Path(tempfile.mkdtemp(prefix="serving-bench-"))
    results: dict[str, list[Result]] = {s: [] for s in args.strategies}
    for round_ in range(args.rounds):
        order = (
            args.strategies[round_ % len(args.strategies) :]
            + args.strategies[: round_ % len(args.strategies)]
        )
        for strategy in order:
            replicas, urls = start_replicas(model, args, logs)  # fresh: empty caches
            router = None
            try:
                router, url = start_router(strategy, urls, logs)
                result = asyncio.run(
                    run_workload(url, workload(args, f"{round_}-{strategy}"), args)
                )
                results[strategy].append(result)
                print(f"round {round_ + 1} {strategy}: {result.elapsed:.1f} s, {len(result.latency)} turns, "
                      f"{result.failed} failed", flush=True)  # fmt: skip
            finally:
                if router is not None:
                    stop(router)
                for proc in replicas:
                    stop(proc)
    with (logs / "turns.jsonl").open("w") as out:
        for strategy, runs in results.items():
            for round_, run in enumerate(runs):
                for record in run.turns:
                    out.write(json.dumps({"strategy": strategy, "round": round_, **record}) + "\n")
    print()
    print(TABLE_HEAD)
    for strategy, runs in results.items():
        print(row(strategy, figures(merge(runs))))
    if args.rounds > 1:
        print(f"\nMedian of the {args.rounds} rounds' own figures:\n")
        print(TABLE_HEAD)
        for strategy, runs in results.items():
            per_round = [figures(run) for run in runs]
            print(
                row(
                    strategy, [statistics.median(column) for column in zip(*per_round, strict=True)]
                )
            )
    print(f"\nlogs: {logs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
