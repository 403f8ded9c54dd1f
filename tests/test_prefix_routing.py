"""Cache-aware routing: the prompt-prefix record per backend (matching, eviction by count and
age, its memory bound), the choice it drives (longest cached prefix unless too busy, new
conversations spread, sessions yield to load), and, through a real gateway on fake upstreams,
conversations sticking to their replica and moving when it drains; the record corrected by
what backends report they took from their cache. No timing assertions."""

from __future__ import annotations

import time

import httpx
from conftest import free_port, wait_http
from fakes.upstreams import FastOpenAI, fleet_state, serve

from reconciler.drain import Drainer, drain_dir
from reconciler.gateway.app import create_app
from reconciler.gateway.prefix_cache import BLOCK_CHARS, PrefixSet, cached_tokens, prompt_blocks
from reconciler.gateway.router import Router, RoutingTable, Upstream

SYSTEM_A = "You are a careful assistant for the accounting team. " * 40  # ~2k characters
SYSTEM_B = "You answer questions about the plant's maintenance logs. " * 40


def chat(system: str, *turns: str) -> dict:
    messages = [{"role": "system", "content": system}]
    messages += [{"role": "user", "content": t} for t in turns]
    return {"model": "m", "messages": messages}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_blocks_of_a_shared_prefix_are_shared_and_diverge_where_the_text_does():
    first, later = (
        prompt_blocks(chat(SYSTEM_A, "hi")),
        prompt_blocks(chat(SYSTEM_A, "hi", "more " * 100)),
    )
    assert len(first) >= len(SYSTEM_A) // BLOCK_CHARS
    assert later[: len(first)] == first  # the next turn extends the same prefix
    other = prompt_blocks(chat(SYSTEM_B, "hi"))
    assert other[0] != first[0]  # another system prompt shares nothing
    assert prompt_blocks({"model": "m", "prompt": "x" * (BLOCK_CHARS - 1)}) == []  # no whole block
    # Content parts and plain strings are the same text to a prefix cache.
    parts = {
        "model": "m",
        "messages": [{"role": "system", "content": [{"type": "text", "text": SYSTEM_A}]}],
    }
    assert prompt_blocks(parts)[:5] == prompt_blocks(chat(SYSTEM_A))[:5]
    assert prompt_blocks({"model": "m", "messages": "not a list"}) == []


def test_prefix_set_matches_leading_blocks_only_and_stays_within_its_capacity():
    blocks = prompt_blocks(chat(SYSTEM_A, "hi"))
    prefixes = PrefixSet(capacity=len(blocks) + 4)
    assert prefixes.match(blocks) == 0
    prefixes.record(blocks[:5])
    assert prefixes.match(blocks) == 5
    assert prefixes.match(prompt_blocks(chat(SYSTEM_B))) == 0
    prefixes.record(blocks)
    other = prompt_blocks(chat(SYSTEM_B))
    prefixes.record(other)  # the oldest entries (A's first blocks) make room
    assert len(prefixes) == prefixes.capacity
    assert prefixes.match(other) == len(other)
    assert prefixes.match(blocks) == 0  # its first block was evicted: the chain is broken there


def test_prefix_set_forgets_what_it_has_not_seen_for_its_ttl():
    clock = Clock()
    prefixes = PrefixSet(ttl=60, clock=clock)
    a, b = prompt_blocks(chat(SYSTEM_A)), prompt_blocks(chat(SYSTEM_B))
    prefixes.record(a)
    clock.now = 50
    prefixes.record(b)
    clock.now = 100  # A last seen 100 s ago, B 50 s ago
    assert prefixes.match(a) == 0
    assert prefixes.match(b) == len(b)
    assert len(prefixes) == len(b)


def test_a_prefix_the_backend_no_longer_held_takes_everything_sent_there_before_with_it():
    """Caches evict the least recently used first: when a backend reports taking much less of
    a prompt from its cache than the record expected, the expected prefix is gone, and so is
    everything sent there before it; what was sent after, and the prompt itself, stay."""
    clock = Clock()
    prefixes = PrefixSet(clock=clock)
    older, expected, newer = (prompt_blocks(chat(s)) for s in (SYSTEM_B, SYSTEM_A, "z" * 2000))
    for now, blocks in ((1, older), (2, expected), (3, newer)):
        clock.now = now
        prefixes.record(blocks)
    asked = prompt_blocks(chat(SYSTEM_A, "next"))
    note = prefixes.note("a", asked)
    assert note is not None and note.matched == len(expected) and note.last_sent == 2
    clock.now = 4
    prefixes.record(asked)  # routed there: recorded before the answer comes
    assert prefixes.reported(note, prompt_tokens=600, cached=400) == 0  # about as expected
    assert prefixes.match(older) == len(older)
    assert prefixes.reported(note, prompt_tokens=600, cached=3) == len(older)  # a miss
    assert prefixes.match(older) == 0
    assert prefixes.match(newer) == len(newer) and prefixes.match(asked) == len(asked)
    assert PrefixSet().note("a", asked) is None  # nothing expected: nothing to check


def test_cached_tokens_are_read_where_backends_report_them():
    # llama.cpp's usage (recorded from the real server, xllamacpp 2026.10), then OpenAI's.
    llama = {"completion_tokens": 4, "prompt_tokens": 136, "total_tokens": 140,
             "prompt_tokens_details": {"cached_tokens": 135}}  # fmt: skip
    assert cached_tokens(llama) == (136, 135)
    assert cached_tokens({"prompt_tokens": 9, "completion_tokens": 1}) is None  # not reported
    assert cached_tokens({"prompt_tokens": 9, "prompt_tokens_details": None}) is None
    assert (
        cached_tokens({"prompt_tokens": 9, "prompt_tokens_details": {"cached_tokens": 10}}) is None
    )
    assert (
        cached_tokens({"prompt_tokens": 9, "prompt_tokens_details": {"cached_tokens": True}})
        is None
    )


def router(*names: str, threshold: float = 2.0, strategy: str = "cache-aware") -> Router:
    ups = {
        n: Upstream(name=n, model="m", base_url=f"http://{n}", protocol="openai", healthy=True)
        for n in names
    }
    return Router(RoutingTable(names={"m": "m"}, upstreams=ups), strategy, threshold)


def first(r: Router, body: dict, session: str | None = None) -> str:
    return r.candidates("m", session, body)[0].name


def test_conversations_with_different_prefixes_go_to_different_replicas_and_stay():
    r = router("a", "b")
    where = {"A": first(r, chat(SYSTEM_A, "q1")), "B": first(r, chat(SYSTEM_B, "q1"))}
    assert set(where.values()) == {"a", "b"}  # the second conversation took the empty cache
    for turn in range(2, 6):
        assert first(r, chat(SYSTEM_A, "q1", f"q{turn}")) == where["A"]
        assert first(r, chat(SYSTEM_B, "q1", f"q{turn}")) == where["B"]


def test_a_cached_prefix_yields_to_load_past_the_threshold():
    r = router("a", "b", threshold=2)
    home = first(r, chat(SYSTEM_A, "q1"))
    other = "b" if home == "a" else "a"
    r.table.upstreams[home].in_flight = 2  # exactly the threshold: the cache still wins
    assert first(r, chat(SYSTEM_A, "q2")) == home
    r.table.upstreams[home].in_flight = 3  # past it: a queue costs more than a prefill
    assert first(r, chat(SYSTEM_A, "q3")) == other
    # The other replica was sent the prefix too, so it is now a home for it as well.
    r.table.upstreams[home].in_flight = 0
    r.table.upstreams[other].in_flight = 1
    assert first(r, chat(SYSTEM_A, "q4")) in {home, other}


def test_unavailable_replica_loses_its_conversations_to_the_others():
    r = router("a", "b")
    home = first(r, chat(SYSTEM_A, "q1"))
    other = "b" if home == "a" else "a"
    r.table.upstreams[home].healthy = False
    assert first(r, chat(SYSTEM_A, "q2")) == other
    r.table.upstreams[home].healthy = True
    # Both have it now; the one that served it last is as good as the first.
    assert first(r, chat(SYSTEM_A, "q3")) in {home, other}


def test_session_affinity_yields_to_load():
    r = router("a", "b", strategy="session-affinity", threshold=1)
    home = first(r, {"model": "m"}, "alice")
    assert all(first(r, {"model": "m"}, "alice") == home for _ in range(5))
    r.table.upstreams[home].in_flight = 5
    assert first(r, {"model": "m"}, "alice") != home
    r.table.upstreams[home].in_flight = 0
    assert first(r, {"model": "m"}, "alice") == home  # back once it has room


def ready_gateway(app, port: int) -> str:
    """The gateway's URL once it answers and sees every upstream healthy."""
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health")
    deadline = time.monotonic() + 30
    while not all(u.healthy for u in app.upstreams()):
        assert time.monotonic() < deadline, "upstreams never healthy"
        time.sleep(0.05)
    return url


def test_gateway_keeps_conversations_on_their_replica_and_moves_them_off_a_drained_one(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("TF_STATE_DIR", str(tmp_path))
    ports = free_port(), free_port()
    urls = {n: f"http://127.0.0.1:{p}" for n, p in zip("ab", ports, strict=True)}
    gateway_port = free_port()
    app = create_app(fleet_state(urls, health_interval=0.2))
    assert app.router.strategy == "cache-aware"  # the default
    with (
        serve(FastOpenAI(name="a"), ports[0]),
        serve(FastOpenAI(name="b"), ports[1]),
        serve(app, gateway_port),
    ):
        url = ready_gateway(app, gateway_port)

        def backend(body: dict) -> str:
            return httpx.post(url + "/v1/chat/completions", json=body).headers[
                "x-tensorforge-backend"
            ]

        history = {"A": ["q1"], "B": ["q1"]}
        where = {
            conv: backend(chat(system, "q1")) for conv, system in (("A", SYSTEM_A), ("B", SYSTEM_B))
        }
        assert set(where.values()) == {"a", "b"}, where
        for turn in range(2, 5):
            for conv, system in (("A", SYSTEM_A), ("B", SYSTEM_B)):
                history[conv].append(f"q{turn}")
                assert backend(chat(system, *history[conv])) == where[conv]

        drained = where["A"]
        survivor = where["B"]
        drainer = Drainer(drain_dir(tmp_path))
        deadline = time.monotonic() + 30
        while not drainer.ready(drained, url, [survivor], timeout=5):
            assert time.monotonic() < deadline, f"{drained} never drained"
            time.sleep(0.1)
        assert backend(chat(SYSTEM_A, *history["A"], "after the drain")) == survivor
        assert backend(chat(SYSTEM_B, *history["B"], "after the drain")) == survivor


def test_what_a_backend_reports_from_its_cache_corrects_the_record_through_the_gateway(
    tmp_path, monkeypatch
):
    """Through a real gateway, answers and streams alike: a replica that reports taking
    nothing from its cache for a prompt the record said it held loses what was sent to it
    before that prompt, so an older conversation is no longer routed there for a cache it
    does not have; a replica whose report matches the record keeps it."""
    monkeypatch.setenv("TF_STATE_DIR", str(tmp_path))
    ports = free_port(), free_port()
    urls = {n: f"http://127.0.0.1:{p}" for n, p in zip("ab", ports, strict=True)}
    gateway_port = free_port()
    app = create_app(fleet_state(urls, health_interval=0.2))
    upstreams = {"a": FastOpenAI(name="a"), "b": FastOpenAI(name="b")}
    # Equal lengths, so that the spreading of new conversations is predictable.
    older, other, recent = (f"Topic {c}. " * 220 for c in "DEA")
    with (
        serve(upstreams["a"], ports[0]),
        serve(upstreams["b"], ports[1]),
        serve(app, gateway_port),
    ):
        url = ready_gateway(app, gateway_port)
        record = {n: app.table.upstreams[n].prefixes for n in "ab"}

        def send(body: dict, stream: bool) -> str:
            with httpx.stream(
                "POST", url + "/v1/chat/completions", json={**body, "stream": stream}
            ) as r:
                r.read()
                return r.headers["x-tensorforge-backend"]

        for stream in (False, True):
            for prefixes in record.values():
                prefixes.clear()
            home = send(chat(older, "q1"), stream)
            away = send(chat(other, "q1"), stream)
            assert {home, away} == {"a", "b"}  # spread over the empty caches
            assert send(chat(recent, "q1"), stream) == home  # the tie goes to the same one
            upstreams[home].cached_tokens = 95  # as the record expects: nothing changes
            assert send(chat(recent, "q1", "q2"), stream) == home
            assert record[home].match(prompt_blocks(chat(older))) > 0
            upstreams[home].cached_tokens = 0  # `recent` was evicted there, so `older` too
            assert send(chat(recent, "q1", "q2", "q3"), stream) == home
            assert record[home].match(prompt_blocks(chat(older))) == 0, stream
            assert record[home].match(prompt_blocks(chat(recent))) > 0  # just sent again
            upstreams[home].cached_tokens = None
