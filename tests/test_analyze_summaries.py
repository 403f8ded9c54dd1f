"""The map-reduce around the model, with a stand-in model: every prompt fits the budget,
long modules are chunked and recombined, the overview is condensed in rounds, and a gateway
that goes away mid-run turns the remaining modules into 'skipped' instead of long waits."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import httpx
import openai

from reconciler.analyze.budget import Budget
from reconciler.analyze.progress import Progress
from reconciler.analyze.structure import analyze_structure
from reconciler.analyze.summarize import ModelInfo, Summarizer, SummaryOptions, summarize


class FakeModel:
    def __init__(self, fail_after: int | None = None) -> None:
        self.prompts: list[str] = []
        self.fail_after = fail_after
        self.lock = threading.Lock()

    def complete(self, prompt: str, max_tokens: int) -> str:
        with self.lock:
            if self.fail_after is not None and len(self.prompts) >= self.fail_after:
                raise openai.APIConnectionError(request=httpx.Request("POST", "http://gw/v1"))
            self.prompts.append(prompt)
            return f"Summary number {len(self.prompts)} " + "words " * 40


def tree(tmp_path: Path, modules: int, big_lines: int) -> Path:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    for i in range(modules):
        (tmp_path / "pkg" / f"m{i}.py").write_text(
            f"from pkg import m{(i + 1) % modules}\nX = {i}\n"
        )
    body = "".join(
        f"def f{i}(x):\n    return x + {i}  # {'pad ' * 10}\n\n" for i in range(big_lines)
    )
    (tmp_path / "pkg" / "big.py").write_text(body)
    return tmp_path


def test_every_prompt_fits_and_long_modules_are_chunked(tmp_path: Path):
    graph = analyze_structure(tree(tmp_path, 12, 200)).graph
    model = FakeModel()
    options = SummaryOptions(max_tokens=32, overview_tokens=64, parallel=2, max_chunks=3)
    summarizer = Summarizer(model, graph, 512, options, Progress(len(graph.modules), enabled=False))
    results = summarizer.summarize_modules()
    budget = Budget(512, 32, options.chars_per_token)
    assert all(len(p) <= budget.prompt_chars for p in model.prompts)
    assert results["pkg/__init__.py"].status == "skipped"  # empty
    big = results["pkg/big.py"]
    assert big.status == "summarized" and big.chunks == 3 and big.truncated
    assert all(results[f"pkg/m{i}.py"].chunks == 1 for i in range(12))
    asked = len(model.prompts)
    assert asked == 12 + 3 + 1  # one each, three chunks plus their combination
    overview = summarizer.overview(results, "Repository `x`: 14 modules.")
    overview_prompts = model.prompts[asked:]
    assert overview.startswith("Summary number")
    assert (
        len(overview_prompts) > 1
    )  # 13 summaries do not fit one 512-token prompt: condensed first
    assert all(
        len(p) <= Budget(512, 64, options.chars_per_token).prompt_chars for p in overview_prompts
    )


def test_gateway_lost_mid_run_skips_the_rest(tmp_path: Path):
    graph = analyze_structure(tree(tmp_path, 5, 1)).graph
    model = FakeModel(fail_after=2)
    options = SummaryOptions(max_tokens=32, parallel=1)
    summarizer = Summarizer(
        model, graph, 1024, options, Progress(len(graph.modules), enabled=False)
    )
    statuses = [r.status for r in summarizer.summarize_modules().values()]
    # __init__ (empty), big, m0 answered; m1 hits the dead gateway; m2.. are not even tried
    assert statuses == [
        "skipped",
        "summarized",
        "summarized",
        "failed",
        "skipped",
        "skipped",
        "skipped",
    ]


class SlowOnce(FakeModel):
    def complete(self, prompt: str, max_tokens: int) -> str:
        with self.lock:
            if not self.prompts:
                self.prompts.append("timed out")
                raise openai.APITimeoutError(request=httpx.Request("POST", "http://gw/v1"))
        return super().complete(prompt, max_tokens)


def test_a_timeout_fails_one_module_only(tmp_path: Path):
    graph = analyze_structure(tree(tmp_path, 2, 1)).graph
    summarizer = Summarizer(
        SlowOnce(), graph, 1024, SummaryOptions(parallel=1), Progress(4, enabled=False)
    )
    statuses = [r.status for r in summarizer.summarize_modules().values()]
    assert statuses == ["skipped", "failed", "summarized", "summarized"]


def test_overview_rounds_are_bounded(tmp_path: Path, monkeypatch):
    """Should packing ever stop reducing, the overview gives up after a bounded number of
    rounds (summarize() reports the reason) instead of condensing forever."""
    import reconciler.analyze.summarize as summarize_module

    graph = analyze_structure(tree(tmp_path, 6, 1)).graph
    model = FakeModel()
    summarizer = Summarizer(
        model, graph, 1024, SummaryOptions(parallel=1), Progress(8, enabled=False)
    )
    results = summarizer.summarize_modules()
    monkeypatch.setattr(
        summarize_module, "pack", lambda items, limit, separator: [[i] for i in items]
    )
    outcome: list[BaseException | str] = []

    def run() -> None:
        try:
            outcome.append(summarizer.overview(results, "Repository `x`."))
        except ValueError as exc:
            outcome.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(10)
    assert outcome, "the overview loop did not end"
    assert isinstance(outcome[0], ValueError) and "rounds" in str(outcome[0])


class TinyContextClient:
    def __init__(self, gateway: str, model: str, timeout: float, api_key=None) -> None:
        pass

    def probe(self) -> ModelInfo:
        return ModelInfo(True, ["smollm2"], 300)


def test_a_context_too_small_for_the_prompts_skips_summaries_with_the_reason(
    tmp_path: Path, monkeypatch
):
    import reconciler.analyze.summarize as summarize_module

    monkeypatch.setattr(summarize_module, "GatewayClient", TinyContextClient)
    graph = analyze_structure(tree(tmp_path, 2, 1)).graph
    result = summarize(graph, "facts", SummaryOptions(), Progress(4, enabled=False))
    assert result.status == "skipped"
    assert "--context-tokens" in result.reason and "--overview-tokens" in result.reason
    assert "/v1/models" in result.reason
    assert {m.status for m in result.modules.values()} == {"skipped"}


def test_cli_refuses_a_context_too_small_before_walking(tmp_path: Path):
    done = subprocess.run(
        [sys.executable, "-m", "reconciler.cli", "analyze", str(tmp_path), "--context-tokens", "600",
         "--gateway", "http://127.0.0.1:9", "--output", str(tmp_path / "r.md")],
        capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    # 600 tokens leave room for module summaries, not for the 256 tokens of the overview.
    assert "--context-tokens" in done.stderr and "--overview-tokens" in done.stderr
    assert "--max-tokens" not in done.stderr
    assert not (tmp_path / "r.md").exists()
