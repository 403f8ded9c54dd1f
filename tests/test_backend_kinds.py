"""A backend kind is one module (reconciler/backends/kinds/<kind>.py) registered in one table
(reconciler/backends/registry.py): the schema, launchers, probes, unit templates, gateway,
memory estimates, scrape jobs, dashboards and the NixOS module all read that table."""

from __future__ import annotations

import ast
import json
import re
import subprocess
from pathlib import Path

import pytest
from conftest import free_port, stop_process, wait_http

from reconciler.backends.commands import launch_for
from reconciler.backends.registry import KINDS, PROTOCOLS, nix_kinds
from reconciler.config.loader import ConfigError, validate_data
from reconciler.config.schema import BackendSpec
from reconciler.gateway.adapters import adapter_for
from reconciler.gateway.ollama.options import SAMPLING
from reconciler.gpu.vram import MIB, estimate_gguf
from reconciler.units.render import TEMPLATES_DIR

ROOT = Path(__file__).resolve().parents[1]
KINDS_DIR = ROOT / "reconciler" / "backends" / "kinds"


def state(**backend) -> dict:
    return {
        "models": {"m": {"source": "pypi:x"}},
        "backends": {"b": {"model": "m", "port": 8081, **backend}},
    }


def problems(**backend) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        validate_data(state(**backend), "host.yaml")
    return caught.value.problems


# -- the table drives every site -------------------------------------------------------------
def test_every_kind_has_its_template_its_module_and_an_adapter():
    for name, kind in KINDS.items():
        assert (TEMPLATES_DIR / f"{name}.service.j2").is_file(), f"templates/{name}.service.j2"
        assert (KINDS_DIR / f"{name}.py").is_file(), f"reconciler/backends/kinds/{name}.py"
        adapter = adapter_for(name)
        assert adapter.protocol == name
        if kind.metrics:  # the gateway scores load by the series the kind declares
            assert adapter.load_series == kind.metrics.load_series and adapter.metrics_path


def test_the_schema_enum_is_the_table():
    assert set(BackendSpec.model_json_schema()["properties"]["kind"]["enum"]) == set(KINDS)
    assert set(PROTOCOLS) == {*KINDS, "openai"}
    assert "must be one of" in problems(kind="not-a-kind")[0]


def test_the_nix_modules_kinds_json_is_generated_from_the_table():
    committed = json.loads((ROOT / "modules" / "lib" / "kinds.json").read_text())
    assert committed == nix_kinds(), (
        "modules/lib/kinds.json is stale: run `python -m reconciler.backends.registry > "
        "modules/lib/kinds.json`"
    )


def test_llamacpp_sampling_fields_are_ollamas_options():
    from reconciler.backends.kinds.base import LLAMACPP_FIELDS

    assert frozenset(SAMPLING.values()) == LLAMACPP_FIELDS


KIND_FIELDS = {"kind", "protocol", "wire_protocol"}


def _names_a_kind_field(node: ast.expr) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr in KIND_FIELDS) or (
        isinstance(node, ast.Name) and node.id in KIND_FIELDS
    )


def _kind_branches(path: Path) -> list[str]:
    """`backend.kind == "vllm"`, `protocol in ("vllm", "tgi")`, and tables keyed by two or more
    kind names (`{"vllm": ..., "tgi": ...}`): a site that branches on a kind's name instead of
    asking its Kind."""
    names = set(KINDS)
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        literals: list[ast.expr] = []
        if isinstance(node, ast.Compare) and any(
            _names_a_kind_field(n) for n in (node.left, *node.comparators)
        ):
            for n in (node.left, *node.comparators):
                literals += n.elts if isinstance(n, ast.Tuple | ast.List | ast.Set) else [n]
        elif isinstance(node, ast.Dict):
            keys = [k for k in node.keys if isinstance(k, ast.Constant) and k.value in names]
            literals = keys if len(keys) >= 2 else []
        hits = {n.value for n in literals if isinstance(n, ast.Constant) and n.value in names}
        if hits:
            found.append(f"{node.lineno}: {sorted(hits)}")
    return found


# Sites that still ask about one kind by name, for a feature of that server's own wire
# protocol: llama.cpp's slot erasing, /slots and GGUF metadata, vLLM's error shapes, Ollama's own
# API reached through its surface. This list may shrink, never grow: a new kind adds none.
KNOWN_PROTOCOL_SITES = {
    "reconciler/gateway/slots.py": 1,
    "reconciler/gateway/router.py": 2,
    "reconciler/gateway/routed.py": 1,
    "reconciler/gateway/backend_info.py": 4,
    "reconciler/gateway/ollama/metadata.py": 1,
    "reconciler/gateway/ollama/listing.py": 1,
    "reconciler/config/schema.py": 1,
}


def test_no_module_outside_the_kinds_branches_on_a_kind_name():
    found: dict[str, list[str]] = {}
    for path in sorted((ROOT / "reconciler").rglob("*.py")):
        relative = str(path.relative_to(ROOT))
        if relative.startswith(("reconciler/backends/kinds/", "reconciler/analyze/")):
            continue  # analyze/kinds.py is about source languages, not backends
        hits = _kind_branches(path)
        if hits:
            found[relative] = hits
    unexpected = {f: h for f, h in found.items() if len(h) > KNOWN_PROTOCOL_SITES.get(f, 0)}
    assert not unexpected, f"ask the Kind (registry.KINDS) instead: {unexpected}"


def _code_mentions(path: Path, word: str) -> bool:
    """`word` in the module's code (names, string literals), not in its comments or docstrings."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    for node in ast.walk(tree):
        text = None
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docstrings
        ):
            text = node.value
        elif isinstance(node, ast.Name):
            text = node.id
        elif isinstance(node, ast.Attribute):
            text = node.attr
        elif isinstance(node, ast.alias):
            text = node.name
        if text and word in text.lower():
            return True
    return False


def test_the_new_kind_is_named_only_in_its_own_module_and_the_registry():
    """The proof that a kind is one module: SGLang, the kind added last, is named in reconciler/'s
    code only by its own module and the registry's one line."""
    named = [
        str(p.relative_to(ROOT))
        for p in (ROOT / "reconciler").rglob("*.py")
        if _code_mentions(p, "sglang")
    ]
    assert sorted(named) == [
        "reconciler/backends/kinds/sglang.py",
        "reconciler/backends/registry.py",
    ]
    registry = (ROOT / "reconciler" / "backends" / "registry.py").read_text().lower()
    assert len(re.findall(r"sglang", registry)) == 1  # the table's line


def test_nix_files_do_not_list_kinds():
    """The module reads modules/lib/kinds.json; a list of kind names in a .nix file would go
    stale when a kind is added. (servers.nix maps kinds to nixpkgs packages: a kind without one
    asks for `package`.)"""
    for path in sorted((ROOT / "modules").rglob("*.nix")):
        if path.name in ("servers.nix", "b200.nix"):
            continue  # nixpkgs packages by kind; the two kinds the B200 preset tunes
        text = path.read_text()
        lists = re.findall(r'\[\s*(?:"[a-z0-9-]+"\s*)+\]', text)  # lists of strings only
        for listed in lists:
            names = set(re.findall(r'"([a-z]+)"', listed))
            assert len(names & set(KINDS)) < 2, f"{path.relative_to(ROOT)} lists kinds: {listed}"


# -- per-kind settings -----------------------------------------------------------------------
def test_a_setting_of_another_kind_is_an_error_naming_file_field_and_fix():
    (problem,) = problems(kind="llamacpp", gpu_memory_utilization=0.5)
    assert problem.startswith("backends.b.gpu_memory_utilization: only for kind vllm")
    assert "remove it" in problem
    with pytest.raises(
        ConfigError, match=r"^host\.yaml: backends\.b\.max_loaded_models: only for kind ollama"
    ):
        validate_data(state(kind="vllm", max_loaded_models=2), "host.yaml")


def test_the_reference_files_defaults_still_load_on_every_kind():
    """hosts/cpu-dev.yaml lists every key with its default: defaults are not settings."""
    for kind in KINDS:
        validate_data(
            state(kind=kind, gpu_memory_utilization=0.9, quantization=None, cache_ram_mib=None), "h"
        )


def test_llamacpp_kv_cache_dtype_is_checked_and_passed():
    (problem,) = problems(kind="llamacpp", kv_cache_dtype="fp8")
    assert "backends.b.kv_cache_dtype: 'fp8' is not a llama.cpp KV cache type" in problem
    backend = BackendSpec(
        kind="llamacpp", model="m", port=8080, kv_cache_dtype="q8_0", cache_ram_mib=0
    )
    argv = launch_for("b", backend, "m", "/m.gguf", []).argv
    assert (
        argv[argv.index("--cache-type-k") + 1] == argv[argv.index("--cache-type-v") + 1] == "q8_0"
    )


@pytest.mark.slow
def test_the_real_server_allocates_the_kv_cache_the_estimate_counts(smollm2_path, tmp_path):
    """llama.cpp (the bundled xllamacpp server) started from the launch line with kv_cache_dtype
    q8_0 logs a q8_0 KV buffer of the size estimate_gguf counts (about half of f16's)."""
    port = free_port()
    backend = BackendSpec(
        kind="llamacpp", model="m", port=port, context_size=1024, threads=1, kv_cache_dtype="q8_0",
        cache_ram_mib=0, extra_args=["--verbosity", "4"],
    )  # fmt: skip
    argv = launch_for("b", backend, "m", str(smollm2_path), []).argv
    assert argv[argv.index("--cache-type-k") + 1] == "q8_0"
    log = tmp_path / "server.log"
    proc = subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=90)
    finally:
        stop_process(proc)
    found = re.search(
        r"K \((\w+)\):\s+([0-9.]+) MiB, V \((\w+)\):\s+([0-9.]+) MiB", log.read_text()
    )
    assert found, log.read_text()[-2000:]
    assert found.group(1) == found.group(3) == "q8_0"
    logged = (float(found.group(2)) + float(found.group(4))) * MIB
    estimated = estimate_gguf(backend, smollm2_path).kv_cache
    f16 = estimate_gguf(backend.model_copy(update={"kv_cache_dtype": None}), smollm2_path).kv_cache
    assert abs(estimated - logged) / logged < 0.01 and estimated < 0.6 * f16
