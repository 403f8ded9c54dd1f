"""The map-reduce around the model, with a stand-in model: every prompt fits the budget,
long modules are chunked and recombined, the overview is condensed in rounds, and a gateway
that goes away mid-run turns the remaining modules into 'skipped' instead of long waits."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import openai

from reconciler.analyze.budget import Budget
from reconciler.analyze.progress import Progress
from reconciler.analyze.structure import analyze_structure
from reconciler.analyze.summarize import Summarizer, SummaryOptions


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
