"""`run` (many prompts, bounded by LLM_PARALLEL) and `health` (backend states and the latency
benchmark) against the real gateway in front of two fast OpenAI-compatible upstreams."""

from __future__ import annotations

import json
import time

import httpx
import pytest
import yaml
from fakes.upstreams import FastOpenAI, Recorded, RecordedUpstream, fleet_state, serve

from reconciler.cli import main
from reconciler.config.loader import load_desired_state
from reconciler.gateway.app import create_app
from reconciler.gpu.inventory import GpuInfo, StaticInventory
from reconciler.pipeline.health import collect, percentile, render
from reconciler.pipeline.run import read_prompts, run_prompts
from tests.conftest import free_port, wait_http


class PeakCounting(FastOpenAI):
    """Remembers the most streams it had open at once."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.peak = 0

    async def __call__(self, scope, receive, send) -> None:
        async def counting_send(message):
            self.peak = max(self.peak, self.open_streams)
            await send(message)

        await super().__call__(
            scope, receive, send if scope["type"] == "lifespan" else counting_send
        )


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """Two upstreams (a, b) behind a gateway; yields (gateway URL, upstreams, config path)."""
    upstreams = {
        "a": PeakCounting(chunk_delay=0.01, name="a"),
        "b": PeakCounting(chunk_delay=0.01, name="b"),
    }
    ports = {name: free_port() for name in upstreams}
    urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    gateway_port = free_port()
    state = fleet_state(urls, port=gateway_port)
    config = tmp_path_factory.mktemp("fleet") / "fleet.yaml"
    config.write_text(yaml.safe_dump(state.model_dump(mode="json", exclude_none=True)))
    with serve(upstreams["a"], ports["a"]), serve(upstreams["b"], ports["b"]):
        with serve(create_app(state), gateway_port):
            gateway = f"http://127.0.0.1:{gateway_port}"
            wait_http(gateway + "/health")
            for _ in range(50):  # until the health monitor has seen both upstreams
                if httpx.get(gateway + "/health").json()["backends_healthy"] == 2:
                    break
                time.sleep(0.1)
            yield gateway, upstreams, config


def test_run_many_prompts_in_order_with_bounded_concurrency(fleet):
    gateway, upstreams, _ = fleet
    for u in upstreams.values():
        u.peak = 0
    prompts = [f"prompt {i} — naïve café 🚀" for i in range(12)]
    results = run_prompts(gateway, "alias", prompts, max_tokens=8, parallel=3)
    assert [r["prompt"] for r in results] == prompts  # answers come back in prompt order
    assert all(r["error"] is None and r["answer"].startswith("tok0 tok1") for r in results)
    assert all(
        r["usage"]["completion_tokens"] == 8 and r["timings"]["tokens_per_s"] for r in results
    )
    assert {r["backend"] for r in results} <= {"a", "b"}
    assert sum(u.peak for u in upstreams.values()) <= 3  # never more than `parallel` at once
    assert max(u.peak for u in upstreams.values()) >= 1


def test_cli_run_reads_a_prompt_file_and_honours_llm_parallel(fleet, tmp_path, monkeypatch, capsys):
    gateway, upstreams, config = fleet
    for u in upstreams.values():
        u.peak = 0
    monkeypatch.setenv("LLM_PARALLEL", "2")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "\n".join(json.dumps({"prompt": f"q{i} «ünïcode»"}, ensure_ascii=False) for i in range(6))
        + "\n\n",
        encoding="utf-8",
    )
    out = tmp_path / "results.json"
    argv = ["run", "--config", str(config), "--prompts-file", str(prompts), "--prompt", "extra"]
    assert main([*argv, "--output", str(out), "--max-tokens", "4"]) == 0
    document = json.loads(out.read_text(encoding="utf-8"))
    assert [r["prompt"] for r in document["results"]] == ["extra"] + [
        f"q{i} «ünïcode»" for i in range(6)
    ]
    assert sum(u.peak for u in upstreams.values()) <= 2
    assert "wrote 7 result(s)" in capsys.readouterr().out


def test_prompt_files_plain_and_jsonl(tmp_path):
    plain = tmp_path / "p.txt"
    plain.write_text('first line\n\n  second, with "quotes"\nthird ✓\n', encoding="utf-8")
    assert read_prompts(plain) == ["first line", '  second, with "quotes"', "third ✓"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected a JSON object with 'prompt'"):
        read_prompts(bad)


def test_health_reports_backends_and_a_benchmark_per_backend(fleet):
    gateway, _, _ = fleet
    state, _ = load_desired_state(str(fleet[2]))
    cards = [
        GpuInfo(
            0, "GPU-0", "NVIDIA H100 80GB HBM3", 80 * 2**30, 2**30, 79 * 2**30, 5, (9, 0), 40, 70.0
        )
    ]
    report = collect(
        state, gateway, StaticInventory(cards), requests=8, concurrency=2, max_tokens=6
    )
    assert report.ok
    assert [(b.name, b.state, b.routed) for b in report.backends] == [
        ("a", "healthy", True),
        ("b", "healthy", True),
    ]
    assert (
        report.gpus[0]["compute_capability"] == "9.0"
        and report.gpus[0]["memory_total_mib"] == 81920
    )
    assert sum(b.requests for b in report.benchmarks) == 8 and {
        b.backend for b in report.benchmarks
    } <= {"a", "b"}
    for bench in report.benchmarks:
        assert (
            bench.errors == 0
            and 0 < bench.ttft_s["p50"] <= bench.ttft_s["p95"] <= bench.total_s["p95"]
        )
        assert bench.tokens_per_s["p50"] > 0
    text = render(report)
    assert "TTFT p50/p95 s" in text and "H100" in text and text.endswith("healthy")
    data = json.loads(json.dumps(report.to_dict()))
    assert data["ok"] is True and data["benchmarks"][0]["model"] == "m"


def test_health_without_gpus_or_gateway_is_an_answer_not_a_crash(tmp_path, capsys):
    dead = free_port()
    config = tmp_path / "c.yaml"
    state = fleet_state({"gone": f"http://127.0.0.1:{dead}"}, port=free_port())
    config.write_text(yaml.safe_dump(state.model_dump(mode="json", exclude_none=True)))
    assert main(["health", "--config", str(config), "--json", "-n", "2"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["gpus"] == [] and data["gpu_reason"]  # NVML's reason, e.g. no driver here
    assert data["gateway"]["reachable"] is False
    assert data["backends"][0]["state"] == "down" and data["benchmarks"] == []


def test_health_measures_a_llamacpp_url_directly(fleet, tmp_path, capsys):
    _, upstreams, _ = fleet
    empty = tmp_path / "empty.yaml"
    empty.write_text(
        yaml.safe_dump({"version": 1, "gateway": {"enable": False}})
    )  # llama.cpp alone
    url = next(iter(fleet_state_urls(fleet)))
    assert main(["health", "--config", str(empty), "--llamacpp-url", url, "-n", "3", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [b["name"] for b in data["backends"]] == ["llamacpp-url"]
    assert (
        data["benchmarks"][0]["backend"] == "llamacpp-url"
        and data["benchmarks"][0]["requests"] == 3
    )


def fleet_state_urls(fleet) -> list[str]:
    state, _ = load_desired_state(str(fleet[2]))
    return [b.base_url for b in state.backends.values()]


def test_percentiles_interpolate_like_numpy():
    values = [float(v) for v in range(1, 11)]
    assert percentile(values, 0.5) == 5.5 and percentile(values, 0.95) == pytest.approx(9.55)
    assert percentile([], 0.5) is None and percentile([2.0], 0.95) == 2.0


def test_a_llamacpp_url_that_is_declared_is_not_measured_twice(fleet):
    gateway, _, config = fleet
    state, _ = load_desired_state(str(config))
    urls = {"dup": fleet_state_urls(fleet)[0] + "/"}
    report = collect(state, gateway, StaticInventory([]), requests=0, llamacpp_urls=urls)
    assert [b.name for b in report.backends] == ["a", "b"] and report.benchmarks == []
    assert report.gpu_reason == "no GPU declared"


def test_prompt_files_bom_crlf_and_unicode_separators(tmp_path):
    """A BOM is not part of the first prompt, CRLF ends lines, and characters that
    str.splitlines() would also split on (form feed, U+0085, U+2028) stay inside a prompt."""
    jsonl = tmp_path / "p.jsonl"
    lines = [
        json.dumps({"prompt": "a\u2028b"}, ensure_ascii=False),
        json.dumps({"prompt": "second"}),
    ]
    jsonl.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    assert read_prompts(jsonl) == ["a\u2028b", "second"]
    plain = tmp_path / "p.txt"
    plain.write_text("one\x0cpage\nnext\x85line\n", encoding="utf-8")
    assert read_prompts(plain) == ["one\x0cpage", "next\x85line"]


@pytest.mark.parametrize(
    "line", ['{"prompt": null}', '{"prompt": ["a"]}', '{"prompt": "  "}', "[1]"]
)
def test_a_prompt_that_is_not_a_string_is_named(tmp_path, line):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "fine"}\n' + line + "\n")
    if line.startswith("{"):
        with pytest.raises(ValueError, match=rf"{path}:2: 'prompt' must be a non-empty string"):
            read_prompts(path)
    else:  # not a JSON object: a plain-text prompt, as written
        assert read_prompts(path) == ["fine", "[1]"]


def test_a_failing_prompt_is_its_result_not_the_end_of_the_run(tmp_path):
    """A malformed stream or a refused connection becomes that result's error; the run goes
    on and returns one result per prompt."""
    broken = RecordedUpstream({("POST", "/v1/chat/completions"): Recorded(
        content_type="text/event-stream", pieces=[b'data: {"choices": []}\n\n', b"data: {not json\n\n"])})  # fmt: skip
    port = free_port()
    with serve(broken, port):
        results = run_prompts(f"http://127.0.0.1:{port}", "m", ["a", "b"], parallel=2)
    assert [r["prompt"] for r in results] == ["a", "b"]
    assert all(r["error"].startswith("JSONDecodeError") for r in results)
    dead = run_prompts(f"http://127.0.0.1:{free_port()}", "m", ["c"], timeout=5)
    assert dead[0]["error"].startswith("ConnectError")


def test_run_checks_its_output_and_settings_before_asking(fleet, tmp_path, monkeypatch, capsys):
    gateway, upstreams, config = fleet
    before = sum(u.requests for u in upstreams.values())
    missing = tmp_path / "no-such-dir" / "out.json"
    assert main(["run", "--config", str(config), "-p", "hi", "-o", str(missing)]) == 1
    assert (
        f"--output {missing}: directory {missing.parent} does not exist" in capsys.readouterr().err
    )
    monkeypatch.setenv("LLM_PARALLEL", "abc")
    assert main(["run", "--config", str(config), "-p", "hi", "-o", str(tmp_path / "o.json")]) == 1
    assert "LLM_PARALLEL='abc': must be a whole number of at least 1" in capsys.readouterr().err
    assert sum(u.requests for u in upstreams.values()) == before  # nothing was asked


def test_health_is_not_ok_when_the_gateway_is_down(fleet, tmp_path, capsys):
    """Backends up, gateway declared but not running: not healthy, exit 1, and it says why."""
    state, _ = load_desired_state(str(fleet[2]))
    state = state.model_copy(
        update={"gateway": state.gateway.model_copy(update={"port": free_port()})}
    )
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(state.model_dump(mode="json", exclude_none=True)))
    assert main(["health", "--config", str(config), "-n", "2"]) == 1
    out = capsys.readouterr().out
    assert "\nNOT healthy: gateway http://127.0.0.1:" in out and "unreachable" in out
    assert out.count(" healthy ") >= 2  # both backends themselves answer


class Recording(FastOpenAI):
    """Keeps the body of every chat request it answers."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.bodies: list[dict] = []

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/chat/completions":
            return await super().__call__(scope, receive, send)
        message = await receive()
        body = message.get("body", b"")
        while message.get("more_body"):
            message = await receive()
            body += message.get("body", b"")
        self.bodies.append(json.loads(body))

        async def replay():
            return {"type": "http.request", "body": body, "more_body": False}

        await super().__call__(scope, replay, send)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    upstream, up, port = Recording(name="r"), free_port(), free_port()
    state = fleet_state({"r": f"http://127.0.0.1:{up}"}, port=port)
    config = tmp_path_factory.mktemp("recorded") / "one.yaml"
    config.write_text(yaml.safe_dump(state.model_dump(mode="json", exclude_none=True)))
    with serve(upstream, up), serve(create_app(state), port):
        wait_http(f"http://127.0.0.1:{port}/health")
        for _ in range(50):
            if httpx.get(f"http://127.0.0.1:{port}/health").json()["backends_healthy"] == 1:
                break
            time.sleep(0.1)
        yield upstream, config


def test_cli_run_positional_prompt_system_and_a_reproducible_temperature(recorded, tmp_path):
    upstream, config = recorded
    out = tmp_path / "r.json"
    argv = ["run", "What is the capital of France?", "--config", str(config), "--output", str(out),
            "--system", "Answer in one word.", "--seed", "7", "--top-p", "0.9", "--n-predict", "5"]  # fmt: skip
    assert main(argv) == 0
    sent = upstream.bodies[-1]
    assert (
        sent["temperature"] == 0.1
        and sent["seed"] == 7
        and sent["top_p"] == 0.9
        and sent["max_tokens"] == 5
    )
    assert sent["messages"] == [{"role": "system", "content": "Answer in one word."},
                                {"role": "user", "content": "What is the capital of France?"}]  # fmt: skip
    assert json.loads(out.read_text())["results"][0]["answer"].startswith("tok0")
    prompt = tmp_path / "question.txt"
    prompt.write_text("Line one of a prompt.\nLine two of the same prompt.\n")
    assert (
        main(
            [
                "run",
                "--file",
                str(prompt),
                "--temperature",
                "0.7",
                "--config",
                str(config),
                "-o",
                str(out),
            ]
        )
        == 0
    )
    assert upstream.bodies[-1]["messages"][-1]["content"] == prompt.read_text().strip()
    assert upstream.bodies[-1]["temperature"] == 0.7


def test_cli_run_batch_writes_one_result_per_prompt_file_with_a_progress_bar(
    recorded, tmp_path, capsys
):
    _, config = recorded
    batch = tmp_path / "prompts"
    batch.mkdir()
    for name in ("alpha", "beta", "gamma"):
        (batch / f"{name}.txt").write_text(f"Tell me about {name}.")
    (batch / "notes.md").write_text("not a prompt")
    results = tmp_path / "results"
    assert (
        main(["run", "--batch", str(batch), "--output-dir", str(results), "--config", str(config)])
        == 0
    )
    assert sorted(p.name for p in results.iterdir()) == ["alpha.json", "beta.json", "gamma.json"]
    beta = json.loads((results / "beta.json").read_text())["results"]
    assert [r["prompt"] for r in beta] == ["Tell me about beta."] and beta[0]["answer"]
    captured = capsys.readouterr()
    assert "3/3" in captured.err and "wrote 3 result(s)" in captured.out  # tqdm's bar, on stderr
    assert main(["run", "--batch", str(batch), "--config", str(config)]) == 1
    assert "--output-dir" in capsys.readouterr().err
    assert main(["run", "hello", "--config", str(config)]) == 1  # where would the answer go?
    assert "--output FILE" in capsys.readouterr().err


def test_health_watch_repeats_until_interrupted(recorded, monkeypatch, capsys):
    _, config = recorded
    naps: list[float] = []

    def nap(seconds: float) -> None:
        naps.append(seconds)
        if len(naps) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr("reconciler.cli.pipeline.time.sleep", nap)
    assert (
        main(["health", "--config", str(config), "--requests", "0", "--watch", "3", "--json"])
        == 130
    )
    assert naps == [3.0, 3.0] and capsys.readouterr().out.count('"gpu_reason"') == 2
