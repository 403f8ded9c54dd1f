"""`nix flake check --no-build` and `nix flake show` under a modern Nix.

Debian 12's Nix 2.8 cannot evaluate everything a current flake uses; Debian trixie's nix-bin
(2.26) can. This runs it from a trixie chroot made once with `debootstrap` (about 75 s plus
nix-bin) and cached outside the repository (TF_TRIXIE_ROOT, default
/var/cache/tensorforge-trixie/root), with the nixpkgs input replaced by
tests/nix/nixpkgs-standin: nixpkgs' real lib (NIXPKGS_LIB), `nixosSystem` over the typed NixOS
stand-in, and derivations that are instantiated, never built. So every nixosConfiguration (its
assertions and warnings), every check (the VM tests' nodes too), package, app, dev shell and
formatter is evaluated and instantiated by Nix 2.26 itself. Skips with a reason when the chroot
cannot be made (not root, no debootstrap, no network to Debian)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NIXPKGS_LIB = os.environ.get("NIXPKGS_LIB", "")
ROOT = Path(os.environ.get("TF_TRIXIE_ROOT", "/var/cache/tensorforge-trixie/root"))
WORK = "/tmp/tf-flake-check"  # inside the chroot
STANDIN_FILES = ["nixpkgs-standin/flake.nix", "nixpkgs-standin/default.nix", "fake-pkgs.nix",
                 "fake-utils.nix", "nixos-standin.nix"]  # fmt: skip
KNOWN_WARNINGS = (
    # An output Nix does not know; colmena reads it (docs/deployment.md, "Deploying the fleet").
    "warning: unknown flake output 'colmena'",
    # --override-input changes the lock, which --no-write-lock-file keeps off the disk.
    "warning: not writing modified lock file",
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not NIXPKGS_LIB or not Path(NIXPKGS_LIB).is_dir(),
        reason="NIXPKGS_LIB unset: point it at an unpacked nix-community/nixpkgs.lib",
    ),
]


def chroot_nix() -> Path:
    """The cached trixie chroot with nix-bin, made on first use."""
    if (ROOT / "usr" / "bin" / "nix").exists() and (ROOT / "var" / "lib" / "dpkg").is_dir():
        return ROOT
    if os.geteuid() != 0 or shutil.which("debootstrap") is None:
        pytest.skip(f"no trixie chroot at {ROOT}, and making one needs root and debootstrap")
    ROOT.parent.mkdir(parents=True, exist_ok=True)
    # nix-bin is installed afterwards: in debootstrap's own --include its perl dependencies
    # are configured in the wrong order.
    steps = [
        ["debootstrap", "--variant=minbase", "trixie", str(ROOT), "http://deb.debian.org/debian"],
        in_chroot(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "nix-bin"]),
    ]
    for step in steps:
        result = subprocess.run(step, capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            shutil.rmtree(ROOT, ignore_errors=True)
            pytest.skip(
                f"could not make the trixie chroot ({' '.join(step[:3])}…): {result.stderr[-300:]}"
            )
    return ROOT


def in_chroot(argv: list[str]) -> list[str]:
    """argv run inside the chroot with /proc and /dev, in a private mount namespace."""
    inner = " ".join(f"'{a}'" for a in argv)
    return [
        "unshare", "-m", "--propagation", "private", "sh", "-c",
        f"mount -t proc proc {ROOT}/proc && mount --rbind /dev {ROOT}/dev && "
        f"exec chroot {ROOT} /usr/bin/env -i PATH=/usr/bin:/bin HOME=/root "
        f"DEBIAN_FRONTEND=noninteractive {inner}",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def flake_dirs():
    """The repository and the nixpkgs stand-in, copied into the chroot (not the .git, venv or
    caches); the stand-in gets nixpkgs' lib next to it, outside the repository."""
    root = chroot_nix()
    work = root / WORK.lstrip("/")
    shutil.rmtree(work, ignore_errors=True)
    ignore = shutil.ignore_patterns(".git", ".venv", ".cache", "__pycache__", "result*", "*.pyc")
    shutil.copytree(REPO, work / "src", ignore=ignore)
    standin = work / "standin"
    standin.mkdir(parents=True)
    for name in STANDIN_FILES:
        shutil.copy(REPO / "tests" / "nix" / name, standin / Path(name).name)
    lib = (
        Path(NIXPKGS_LIB) / "lib"
        if (Path(NIXPKGS_LIB) / "lib" / "default.nix").exists()
        else Path(NIXPKGS_LIB)
    )
    shutil.copytree(lib, standin / "lib")
    yield f"path:{WORK}/src", f"path:{WORK}/standin"
    shutil.rmtree(work, ignore_errors=True)


def nix(*args: str) -> subprocess.CompletedProcess:
    # Single-user root in the chroot: no nixbld group to build as (and nothing is built).
    argv = [
        "nix",
        "--extra-experimental-features",
        "nix-command flakes",
        "--option",
        "build-users-group",
        "",
        *args,
    ]
    return subprocess.run(in_chroot(argv), capture_output=True, text=True, timeout=600)


def test_flake_check_passes_with_no_warning_but_colmenas(flake_dirs):
    src, standin = flake_dirs
    result = nix("flake", "check", "--all-systems", "--no-build", "--no-write-lock-file",
                 "--override-input", "nixpkgs", standin, src)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [
        line for line in result.stderr.splitlines() if "warning" in line.lower() or "trace:" in line
    ]
    assert [w for w in warnings if not w.startswith(KNOWN_WARNINGS)] == [], result.stderr[-3000:]
    for host in ("b200-node", "cpu-dev", "gateway-only"):
        assert f"checking NixOS configuration 'nixosConfigurations.{host}'" in result.stderr
    for check in (
        "package",
        "contract",
        "vm-single-node",
        "vm-recovery",
        "vm-two-node",
        "host-cpu-dev",
    ):
        assert f"checks.x86_64-linux.{check}" in result.stderr


def test_flake_show_lists_every_output(flake_dirs):
    src, standin = flake_dirs
    result = nix("flake", "show", "--all-systems", "--json", "--no-write-lock-file",
                 "--override-input", "nixpkgs", standin, src)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    shown = json.loads(result.stdout)
    assert sorted(shown["nixosConfigurations"]) == ["b200-node", "cpu-dev", "gateway-only"]
    for system in ("x86_64-linux", "aarch64-linux"):
        assert shown["packages"][system]["default"]["name"].startswith("tensorforge-")
        assert shown["formatter"][system]["name"] == "nixfmt"
        assert shown["devShells"][system]["default"]["type"] == "derivation"
    assert sorted(shown["nixosModules"]) == ["default", "tensorforge"]
    assert {"vm-single-node", "vm-recovery", "vm-two-node"} <= set(shown["checks"]["x86_64-linux"])


def test_a_failed_assertion_fails_flake_check(flake_dirs, tmp_path):
    """The stand-in's system.build.toplevel fails on a failed assertion, as NixOS' does: a
    host the module refuses must fail `nix flake check`, not pass it silently."""
    src, standin = flake_dirs
    host = ROOT / WORK.lstrip("/") / "src" / "hosts" / "cpu-dev" / "default.nix"
    original = host.read_text()
    host.write_text(original.replace("enable = true;", 'enable = true;\n    group = "nobody";', 1))
    try:
        result = nix(
            "flake",
            "check",
            "--no-build",
            "--no-write-lock-file",
            "--override-input",
            "nixpkgs",
            standin,
            src,
        )
    finally:
        host.write_text(original)
    assert result.returncode != 0
    assert "services.tensorforge.group is only used with services.tensorforge.user" in result.stderr
