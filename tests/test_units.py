"""Unit templates: every backend kind renders with the same flags as the process driver, values
are escaped for systemd, control characters are refused by field, every rendered unit passes
`systemd-analyze verify` silently, and none is more exposed than a nixpkgs-ollama-style unit."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from reconciler.backends.commands import launch_for
from reconciler.backends.registry import KINDS
from reconciler.config.schema import BackendSpec, GatewaySpec
from reconciler.units.render import (
    UnitRenderError,
    UnitSpec,
    backend_unit_spec,
    gateway_unit_spec,
    reconciler_unit_spec,
    render_unit,
)

PY = sys.executable  # an executable that exists, so `verify` does not complain about it

BACKENDS = {
    "llamacpp": BackendSpec(
        kind="llamacpp", model="m", port=9001, binary=PY, context_size=8192, parallel=4,
        flash_attn=True, gpus=1,
    ),
    "vllm": BackendSpec(
        kind="vllm", model="m", port=9002, binary=PY, tensor_parallel_size=4,
        quantization="fp8", kv_cache_dtype="fp8", context_size=32768,
        gpu_memory_utilization=0.92,
    ),
    "tgi": BackendSpec(kind="tgi", model="m", port=9003, binary=PY, tensor_parallel_size=2),
    "ollama": BackendSpec(kind="ollama", model="m", port=9004, binary=PY, parallel=8, max_loaded_models=2),
    "sglang": BackendSpec(kind="sglang", model="m", port=9005, binary=PY, tensor_parallel_size=2,
                          gpu_memory_utilization=0.85),
}  # fmt: skip
GPU_IDS = {"llamacpp": [3], "vllm": [0, 1, 2, 3], "tgi": [4, 5], "ollama": [], "sglang": [6, 7]}


def test_every_registered_kind_is_rendered_here() -> None:
    """Each kind's template goes through systemd-analyze below: a new kind adds its backend here."""
    assert set(BACKENDS) == set(KINDS)


def render_backend(
    kind: str, backend: BackendSpec | None = None, ref: str = "/models/m/model.gguf"
) -> str:
    backend = backend or BACKENDS[kind]
    launch = launch_for("b", backend, "m", ref, GPU_IDS[kind])
    return render_unit(
        backend_unit_spec(f"backend-{kind}", backend, "m", ref, launch, GPU_IDS[kind])
    )


def exec_start(text: str) -> str:
    return next(line for line in text.splitlines() if line.startswith("ExecStart=")).removeprefix(
        "ExecStart="
    )


def systemd_words(line: str) -> list[str]:
    """Split an ExecStart= value the way systemd does (quotes, C escapes, %% and $$)."""
    words, i = [], 0
    while i < len(line):
        while i < len(line) and line[i] == " ":
            i += 1
        if i >= len(line):
            break
        word = ""
        if line[i] == '"':
            i += 1
            while line[i] != '"':
                if line[i] == "\\":
                    i += 1
                word += line[i]
                i += 1
            i += 1
        else:
            while i < len(line) and line[i] != " ":
                word += line[i]
                i += 1
        words.append(word.replace("%%", "%").replace("$$", "$"))
    return words


@pytest.mark.parametrize("kind", sorted(BACKENDS))
def test_every_kind_renders_the_process_drivers_command_line(kind: str) -> None:
    text = render_backend(kind)
    launch = launch_for("b", BACKENDS[kind], "m", "/models/m/model.gguf", GPU_IDS[kind])
    assert systemd_words(exec_start(text)) == launch.argv
    assert "DynamicUser=yes" in text and "ProtectSystem=strict" in text
    assert "NoNewPrivileges=yes" in text and "UMask=0077" in text
    assert "Restart=on-failure" in text and "StartLimitBurst=5" in text
    visible = ",".join(map(str, GPU_IDS[kind]))
    assert f'Environment="CUDA_VISIBLE_DEVICES={visible}"' in text
    assert ("DeviceAllow=char-nvidia-uvm rw" in text) == bool(GPU_IDS[kind])
    assert "DevicePolicy=closed" in text


def test_flags_per_kind() -> None:
    llama = exec_start(render_backend("llamacpp"))
    assert "--model /models/m/model.gguf --host 127.0.0.1 --port 9001 --ctx-size 8192" in llama
    assert "--parallel 4" in llama and "--flash-attn on" in llama
    assert "--n-gpu-layers 999 --metrics" in llama
    vllm = exec_start(render_backend("vllm"))
    assert " serve /models/m/model.gguf " in vllm
    for flag in ("--tensor-parallel-size 4", "--quantization fp8", "--kv-cache-dtype fp8",
                 "--max-model-len 32768", "--gpu-memory-utilization 0.92"):  # fmt: skip
        assert flag in vllm
    tgi = exec_start(render_backend("tgi"))
    assert "--model-id /models/m/model.gguf" in tgi and "--port 9003 --num-shard 2" in tgi
    ollama = render_backend("ollama")
    assert exec_start(ollama).endswith(" serve")
    for env in ('"OLLAMA_HOST=127.0.0.1:9004"', '"OLLAMA_NUM_PARALLEL=8"', '"OLLAMA_MAX_LOADED_MODELS=2"',
                '"OLLAMA_MODELS=/var/lib/tensorforge-backend-ollama/models"'):  # fmt: skip
        assert f"Environment={env}" in ollama


def test_injection_attempts_are_escaped() -> None:
    nasty = BACKENDS["llamacpp"].model_copy(
        update={
            "extra_args": [
                "--alias",
                'a b" ; rm -rf / #',
                "%n%h",
                "$HOME",
                "${PATH}",
                "\\x41",
                "-x",
            ],
            "environment": {"EVIL": 'x" ExecStartPre=/bin/sh "%i$USER'},
        }
    )
    text = render_backend("llamacpp", nasty)
    words = systemd_words(exec_start(text))
    assert words[-7:] == ["--alias", 'a b" ; rm -rf / #', "%n%h", "$HOME", "${PATH}", "\\x41", "-x"]
    assert '"a b\\" ; rm -rf / #" "%%n%%h" "$$HOME" "$${PATH}" "\\\\x41" -x' in text
    assert 'Environment="EVIL=x\\" ExecStartPre=/bin/sh \\"%%i$USER"' in text
    assert not any(line.startswith("ExecStartPre") for line in text.splitlines())


@pytest.mark.parametrize(
    "binary", ["+/opt/llama-server", "-/opt/x", "@/opt/x", "!/opt/x", ":/opt/x", "bin/x"]
)
def test_an_executable_systemd_would_misread_is_refused(binary: str) -> None:
    """systemd reads a leading -@+!: of ExecStart= as a prefix even inside quotes ("+/opt/x"
    runs /opt/x as root, outside the sandbox), and refuses a relative path: both are refused
    here, naming the field to fix."""
    backend = BACKENDS["llamacpp"].model_copy(update={"binary": binary})  # past the schema's check
    with pytest.raises(UnitRenderError, match=re.escape(f"backends.b.binary: {binary!r}")):
        launch = launch_for("b", backend, "m", "/models/m.gguf", [])
        render_unit(backend_unit_spec("backend-b", backend, "m", "/models/m.gguf", launch, []))


@pytest.mark.parametrize(
    "field,update",
    [
        ("argv[3]", {"argv": ["/bin/x", "a", "b", "c\nExecStartPre=/bin/sh"]}),
        ("env.EVIL", {"env": {"EVIL": "x\ny"}}),
        ("description", {"description": "d\r"}),
        ("read_paths[0]", {"read_paths": ["/m\x00"]}),
    ],
)
def test_control_characters_are_refused_naming_the_field(field: str, update: dict) -> None:
    spec = UnitSpec(name="backend-x", kind="llamacpp", description="d", argv=["/bin/x"])
    with pytest.raises(UnitRenderError, match=re.escape(field) + ": contains a newline"):
        render_unit(UnitSpec(**{**spec.__dict__, **update}))


def test_bad_names_and_kinds_are_refused() -> None:
    with pytest.raises(UnitRenderError, match="name"):
        render_unit(UnitSpec(name="../x", kind="llamacpp", description="d", argv=["/bin/x"]))
    with pytest.raises(UnitRenderError, match="kind"):
        render_unit(UnitSpec(name="x", kind="docker", description="d", argv=["/bin/x"]))


def test_a_hub_model_may_download_and_a_local_one_may_not() -> None:
    assert "IPAddressDeny=any" in render_backend("vllm")
    assert "IPAddressDeny=any" not in render_backend(
        "vllm", ref="meta-llama/Llama-3.1-70B-Instruct"
    )


def test_home_and_tmp_paths_stay_reachable() -> None:
    spec = UnitSpec(
        name="backend-x", kind="llamacpp", description="d", argv=["/root/venv/bin/x"],
        read_paths=["/tmp/models/m.gguf"],
    )  # fmt: skip
    text = render_unit(spec)
    assert "ProtectHome=read-only" in text and "BindReadOnlyPaths=/tmp/models" in text


def test_a_bound_path_with_a_colon_stays_one_path() -> None:
    """BindReadOnlyPaths=/tmp/x:y binds /tmp/x to "y" (SRC:DST); quoted, it is one path."""
    spec = UnitSpec(
        name="backend-x", kind="llamacpp", description="d", argv=["/opt/x"], read_paths=["/tmp/x:y/m.gguf"],
    )  # fmt: skip
    text = render_unit(spec)
    assert 'BindReadOnlyPaths="/tmp/x:y"' in text.splitlines()
    assert exec_start(text) == "/opt/x"  # a word of ExecStart= needs no quotes for ':'


def all_units() -> dict[str, str]:
    units = {f"tensorforge-backend-{k}.service": render_backend(k) for k in BACKENDS}
    # A model under /tmp is bound into the unit: a ':' in its path must not split the bind.
    units["tensorforge-backend-colon.service"] = render_backend("llamacpp", ref="/tmp/x:y/m.gguf")
    argv = [PY, "-m", "reconciler.cli", "gateway", "--config", "/etc/tensorforge/host.yaml"]
    units["tensorforge-gateway.service"] = render_unit(
        gateway_unit_spec("gateway", argv, GatewaySpec(), "/etc/tensorforge/host.yaml")
    )
    argv = [PY, "-m", "reconciler.cli", "up", "--driver", "systemd"]
    units["tensorforge-reconciler.service"] = render_unit(reconciler_unit_spec(argv, None))
    return units


needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze not installed (Debian: systemd)",
)


@needs_analyze
@pytest.mark.parametrize("name", sorted(all_units()))
def test_systemd_analyze_verify_is_silent(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_text(all_units()[name])
    result = subprocess.run(
        ["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60
    )
    # verify exits 0 on unknown keys: any output at all is a failure.
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), (
        result.stdout + result.stderr
    )


# A unit hardened like nixpkgs' services.ollama (nixos/modules/services/misc/ollama.nix).
NIXPKGS_OLLAMA_LIKE = f"""\
[Unit]
Description=Server for local large language models
After=network.target

[Service]
Type=exec
DynamicUser=yes
ExecStart={PY} serve
WorkingDirectory=/var/lib/ollama
StateDirectory=ollama
ReadWritePaths=/var/lib/ollama
CapabilityBoundingSet=
DeviceAllow=char-nvidiactl
DeviceAllow=char-nvidia-caps
DeviceAllow=char-nvidia-frontend
DeviceAllow=char-nvidia-uvm
DeviceAllow=char-drm
DeviceAllow=char-fb
DeviceAllow=char-kfd
DeviceAllow=/dev/dxg
DevicePolicy=closed
LockPersonality=yes
MemoryDenyWriteExecute=yes
NoNewPrivileges=yes
PrivateDevices=no
PrivateTmp=yes
PrivateUsers=yes
ProcSubset=all
ProtectClock=yes
ProtectControlGroups=yes
ProtectHome=yes
ProtectHostname=yes
ProtectKernelLogs=yes
ProtectKernelModules=yes
ProtectKernelTunables=yes
ProtectProc=invisible
ProtectSystem=strict
RemoveIPC=yes
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
SupplementaryGroups=render
SystemCallArchitectures=native
SystemCallFilter=@system-service @resources
SystemCallFilter=~@privileged
UMask=0077

[Install]
WantedBy=multi-user.target
"""


def exposure(path: Path) -> float:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d)", result.stdout + result.stderr)
    assert match, result.stdout + result.stderr
    return float(match.group(1))


@needs_analyze
def test_exposure_at_or_below_nixpkgs_ollama(tmp_path: Path) -> None:
    reference = tmp_path / "nixpkgs-ollama.service"
    reference.write_text(NIXPKGS_OLLAMA_LIKE)
    limit = exposure(reference)
    scores = {}
    for name, text in all_units().items():
        if name == "tensorforge-reconciler.service":
            continue  # root by design: it writes units and talks to systemd (docs/security.md)
        (tmp_path / name).write_text(text)
        scores[name] = exposure(tmp_path / name)
    assert all(score <= limit for score in scores.values()), (limit, scores)


# -- templates from an installed package, not only from the checkout -------------------------------
REPO = Path(__file__).resolve().parent.parent
RENDER_FROM_ELSEWHERE = """
import reconciler, sys
from reconciler.backends.commands import launch_for
from reconciler.config.schema import BackendSpec
from reconciler.units.render import TEMPLATES_DIR, backend_unit_spec, render_unit
b = BackendSpec(kind="tgi", model="m", port=8003, binary="/bin/true")
launch = launch_for("b", b, "m", "/models/m", [0])
text = render_unit(backend_unit_spec("backend-b", b, "m", "/models/m", launch, [0]))
print(reconciler.__file__)
print(TEMPLATES_DIR)
print(text.splitlines()[0])
"""


def test_installed_layout_renders_from_the_packaged_templates(tmp_path: Path) -> None:
    """What setup.py's build step produces: reconciler/units/templates/ inside the package,
    and no source checkout around it."""
    site = tmp_path / "site-packages"
    shutil.copytree(
        REPO / "reconciler", site / "reconciler", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copytree(REPO / "templates", site / "reconciler" / "units" / "templates")
    result = subprocess.run(
        [sys.executable, "-c", RENDER_FROM_ELSEWHERE], cwd=tmp_path, capture_output=True, text=True,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    module, templates, first = result.stdout.splitlines()
    assert module.startswith(str(site)) and templates == str(site / "reconciler/units/templates")
    assert first == "# tensorforge-managed: backend-b"


def test_missing_templates_name_the_fix(tmp_path: Path) -> None:
    site = tmp_path / "site-packages"
    shutil.copytree(
        REPO / "reconciler", site / "reconciler", ignore=shutil.ignore_patterns("__pycache__")
    )
    result = subprocess.run(
        [sys.executable, "-c", RENDER_FROM_ELSEWHERE], cwd=tmp_path, capture_output=True, text=True,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0 and "reinstall TensorForge" in result.stderr
