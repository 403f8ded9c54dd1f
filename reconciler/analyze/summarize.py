"""Module summaries and an architecture overview from a model behind the gateway (OpenAI API).

Map-reduce keeps every request inside the model's context: a module too long for one prompt
is summarised chunk by chunk and the partial summaries combined; module summaries are packed
into batches, each batch condensed, and the condensed texts combined again until one
overview remains. A gateway that cannot be reached, refuses the key or does not serve the
model is an error before anything is asked (`connect`); one that goes away mid-run turns the
remaining modules into 'skipped' with the reason."""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from reconciler.analyze import prompts
from reconciler.analyze.budget import PROMPT_WORDS_CHARS, Budget, chunk_text, pack, truncate
from reconciler.analyze.client import (
    Completer,
    GatewayClient,
    ModelInfo,
    check_gateway,
)
from reconciler.analyze.graph import Graph
from reconciler.analyze.kinds import file_kind
from reconciler.analyze.progress import Progress
from reconciler.extras import MissingExtra

try:
    import openai
except ImportError as exc:  # the `analyze` extra
    raise MissingExtra("analyze", "tensorforge analyze", "openai") from exc

DEFAULT_CONTEXT_TOKENS = 2048  # one slot of the embedded default (4096 tokens over 2 slots)
DEFAULT_KINDS = frozenset({"source", "example", "bench"})


@dataclass
class ModuleSummary:
    status: str  # summarized | skipped | failed
    text: str | None = None
    reason: str | None = None
    chunks: int = 0
    truncated: bool = False
    seconds: float = 0.0


@dataclass
class Summaries:
    status: str  # done | skipped
    reason: str | None
    gateway: str
    model: str
    context_tokens: int | None
    context_source: str
    modules: dict[str, ModuleSummary] = field(default_factory=dict)
    model_description: str | None = None  # e.g. "smollm2 (SmolLM2-135M…, 135M parameters)"
    overview: str | None = None
    overview_reason: str | None = None
    seconds: float = 0.0


def skipped_summaries(graph: Graph, gateway: str, model: str, reason: str) -> Summaries:
    result = Summaries("skipped", reason, gateway, model, None, "none")
    result.modules = {p: ModuleSummary("skipped", reason=reason) for p in graph.modules}
    result.overview_reason = reason
    return result


@dataclass
class SummaryOptions:
    gateway: str = "http://127.0.0.1:8000"
    model: str = "smollm2"
    context_tokens: int | None = None  # None: ask /v1/models, else the fallback
    fallback_context_tokens: int | None = None  # e.g. the declared backend's slot size
    timeout: float = 180.0  # per request
    max_tokens: int = 96
    overview_tokens: int = 256
    parallel: int = 2
    max_chunks: int = 3  # beyond this, the rest of a huge module is described by its outline
    chars_per_token: float = 3.0  # measured 3.4-4.0 on this repository's code with SmolLM2
    api_key: str | None = None  # --api-key or TF_API_KEY, for a gateway with keys on
    kinds: frozenset[str] = DEFAULT_KINDS  # which kinds of file get a summary (tests do not)
    model_description: str | None = None  # what the caution names: the model and its size


def budgets(context_tokens: int, options: SummaryOptions) -> tuple[Budget, Budget]:
    """The module and the overview budgets; ValueError names the options to change."""
    made, problems = [], []
    for answer, option in ((options.max_tokens, "--max-tokens"),
                           (options.overview_tokens, "--overview-tokens")):  # fmt: skip
        try:
            made.append(Budget(context_tokens, answer, options.chars_per_token, option))
        except ValueError as exc:
            problems.append(str(exc))
    if problems:
        raise ValueError("; ".join(problems))
    return made[0], made[1]


class Summarizer:
    def __init__(self, completer: Completer, graph: Graph, context_tokens: int,
                 options: SummaryOptions, progress: Progress) -> None:  # fmt: skip
        self.completer = completer
        self.graph = graph
        self.options = options
        self.progress = progress
        self.budget, self.overview_budget = budgets(context_tokens, options)
        self.down: str | None = None  # set when the gateway stops answering mid-run

    # -- modules ---------------------------------------------------------------------------
    def summarize_modules(self) -> dict[str, ModuleSummary]:
        paths = list(self.graph.modules)
        with ThreadPoolExecutor(max(1, self.options.parallel)) as pool:
            results = list(pool.map(self._summarize_one, paths))
        return dict(zip(paths, results, strict=True))

    def _summarize_one(self, path: str) -> ModuleSummary:
        started = time.monotonic()
        module = self.graph.modules[path]
        kind = file_kind(path)
        if not module.source.strip():
            result = ModuleSummary("skipped", reason="empty module")
        elif kind not in self.options.kinds:
            result = ModuleSummary(
                "skipped",
                reason=f"{kind} files are not summarized (--summarize {kind} asks for them)",
            )
        elif self.down:
            result = ModuleSummary("skipped", reason=f"gateway stopped answering: {self.down}")
        else:
            try:
                result = self._summarize_source(path, self.budget)
            except openai.BadRequestError:  # most likely the prompt outgrew the context
                try:
                    result = self._summarize_source(path, self.budget.halved())
                except openai.OpenAIError as exc:
                    result = ModuleSummary("failed", reason=_describe(exc))
            except openai.APITimeoutError as exc:  # slow, not gone: the next module may fare better
                result = ModuleSummary("failed", reason=_describe(exc))
            except openai.APIConnectionError as exc:
                self.down = _describe(exc)
                result = ModuleSummary("failed", reason=self.down)
            except openai.OpenAIError as exc:
                result = ModuleSummary("failed", reason=_describe(exc))
        result.seconds = round(time.monotonic() - started, 2)
        detail = (
            result.status if result.status == "summarized" else f"{result.status} ({result.reason})"
        )
        self.progress.step(path, detail, result.seconds)
        return result

    def _header(self, path: str, limit: int) -> str:
        g = self.graph
        module = g.modules[path]
        return prompts.module_header(
            g.names[path], path, module.language, module.lines,
            [d.name for d in module.definitions if d.kind != "method"],
            [g.names[p] for p in g.successors(path)], [g.names[p] for p in g.predecessors(path)],
            limit,
        )  # fmt: skip

    def _summarize_source(self, path: str, budget: Budget) -> ModuleSummary:
        header = self._header(path, budget.header_chars)
        room = budget.prompt_chars - len(header) - PROMPT_WORDS_CHARS  # >= budget.room > 0
        chunks = chunk_text(self.graph.modules[path].source, room)
        truncated = len(chunks) > self.options.max_chunks
        chunks = chunks[: self.options.max_chunks]
        partials = [
            self.completer.complete(
                prompts.module_prompt(header, chunk, i + 1, len(chunks)), budget.max_tokens
            )
            for i, chunk in enumerate(chunks)
        ]
        text = partials[0]
        if len(partials) > 1:
            text = self.completer.complete(
                prompts.module_reduce_prompt(
                    header, [truncate(p, room // len(partials)) for p in partials]
                ),
                budget.max_tokens,
            )
        return ModuleSummary(
            "summarized",
            text or "(the model's answer held no complete sentence)",
            None,
            len(chunks),
            truncated,
        )

    # -- overview --------------------------------------------------------------------------
    def overview(self, modules: dict[str, ModuleSummary], facts: str) -> str:
        items = [
            truncate(f"{self.graph.names[p]}: {s.text}", 400)
            for p, s in modules.items()
            if s.status == "summarized"
        ]
        if not items:
            raise ValueError("no module was summarized")
        budget = self.overview_budget
        facts = truncate(facts, budget.header_chars)
        room = budget.prompt_chars - len(facts) - PROMPT_WORDS_CHARS
        # pack() at least halves the count each round, so this many rounds always suffice;
        # the bound is there so that no estimate gone wrong can keep the loop going.
        rounds = math.ceil(math.log2(len(items))) + 1
        level = 0
        while True:
            groups = pack(items, room, separator="\n- ")  # how overview_prompt lists them
            if len(groups) == 1:
                return self.completer.complete(
                    prompts.overview_prompt(facts, groups[0], True), budget.max_tokens
                )
            if level >= rounds:
                raise ValueError(
                    f"{len(items)} summaries still do not fit one overview prompt after "
                    f"{level} rounds of condensing"
                )
            level += 1
            self.progress.note(
                f"overview: condensing {len(items)} summaries in {len(groups)} groups (round {level})"
            )
            with ThreadPoolExecutor(max(1, self.options.parallel)) as pool:
                items = list(
                    pool.map(
                        lambda g: self.completer.complete(
                            prompts.overview_prompt(facts, g, False), budget.max_tokens
                        ),
                        groups,
                    )
                )


def _describe(exc: Exception) -> str:
    if isinstance(exc, openai.APIStatusError):
        return f"HTTP {exc.status_code}: {truncate(str(exc.message), 300)}"
    return truncate(f"{type(exc).__name__}: {exc}", 300)


def connect(options: SummaryOptions) -> tuple[GatewayClient, ModelInfo]:
    """The client and what the gateway says about the model; GatewayError when it cannot give
    summaries. Called before the walk, so no work is done for a run that cannot succeed."""
    client = GatewayClient(options.gateway, options.model, options.timeout, api_key=options.api_key)
    return client, check_gateway(client, options.gateway, options.model)


def summarize(
    graph: Graph,
    facts: str,
    options: SummaryOptions,
    progress: Progress,
    connection: tuple[GatewayClient, ModelInfo] | None = None,
) -> Summaries:
    """Summaries for every module and the overview. Raises GatewayError when the gateway
    cannot be used at all (see `connect`); a gateway lost mid-run skips the rest."""
    started = time.monotonic()
    gateway, model, context_tokens = options.gateway, options.model, options.context_tokens
    client, info = connection or connect(options)
    if context_tokens:
        source = "--context-tokens"
    elif info.context_tokens:
        context_tokens, source = info.context_tokens, "/v1/models"
    elif options.fallback_context_tokens:
        context_tokens, source = (
            options.fallback_context_tokens,
            "desired state (context_size / parallel)",
        )
    else:
        context_tokens, source = DEFAULT_CONTEXT_TOKENS, "default"
    try:
        summarizer = Summarizer(client, graph, context_tokens, options, progress)
    except ValueError as exc:  # a context too small for the prompts (from /v1/models, say)
        reason = f"{exc} (context from {source})"
        progress.note(f"summaries skipped: {reason}")
        return skipped_summaries(graph, gateway, model, reason)
    result = Summaries("done", None, gateway, model, context_tokens, source)
    result.model_description = options.model_description
    progress.note(
        f"summarizing {len(graph.modules)} modules with {model} ({context_tokens} tokens of context, {options.parallel} at a time)"
    )
    result.modules = summarizer.summarize_modules()
    try:
        progress.note("writing the architecture overview")
        result.overview = summarizer.overview(result.modules, facts)
    except (openai.OpenAIError, ValueError) as exc:
        result.overview_reason = _describe(exc) if isinstance(exc, openai.OpenAIError) else str(exc)
    result.seconds = round(time.monotonic() - started, 2)
    return result
