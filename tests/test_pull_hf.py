"""`hf:` sources through the real huggingface_hub client, against a local hub on a free port
(HF_ENDPOINT): patterns, revision pinning, HF_TOKEN, resume after a cut connection, checksum
failures, the disk-space check, and two processes pulling the same model at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
from fakes.gguf_files import tiny_gguf
from fakes.hub import FakeHub, point_hub_client_at
from fakes.postgres import shared_postgres

from reconciler.config.schema import ModelSpec
from reconciler.models.pull import PullError, pull_model, registry_for

REPO_ID = "tf-test/Tiny-GGUF"
Q4 = "Tiny-Q4_K_M.gguf"
Q8 = "Tiny-Q8_0.gguf"


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("weights")
    return {
        Q4: tiny_gguf(d / "q4.gguf", rows=512, file_type=15),  # 512 KiB: several chunks
        Q8: tiny_gguf(d / "q8.gguf", rows=64, file_type=7),
        "README.md": b"# tiny\n",
    }


@pytest.fixture
def hf_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Isolated HF_HOME and models directory; returns the models directory."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("TF_REGISTRY_URL", raising=False)
    return tmp_path / "models"


def spec(**fields) -> ModelSpec:
    return ModelSpec(**{"source": f"hf:{REPO_ID}", "pattern": "*Q4_K_M.gguf", **fields})


def resolves(hub: FakeHub, method: str = "GET") -> list:
    return [r for r in hub.requests if r.method == method and "/resolve/" in r.path]


def test_pattern_pull_records_the_model(weights, hf_env, monkeypatch):
    hub = FakeHub(REPO_ID, weights, token="hf_secret")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    with hub.serve() as url:
        point_hub_client_at(url, monkeypatch)
        record = pull_model("tiny", spec(aliases=["tiny-q4"]), hf_env)
        again = pull_model("tiny", spec(aliases=["tiny-q4"]), hf_env)
    final = hf_env / "tiny" / Q4
    assert final.read_bytes() == weights[Q4]
    assert not (hf_env / "tiny" / Q8).exists()  # the pattern chose one file
    assert record.revision == hub.commit  # "main" resolved and recorded as the commit
    assert [(f.path, f.size, f.sha256) for f in record.files] == [
        (str(final), len(weights[Q4]), hub.sha256(Q4))
    ]
    assert (record.format, record.architecture, record.quantization) == ("gguf", "llama", "Q4_K_M")
    assert record.parameters == 512 * 256 and record.context_length == 2048
    assert record.vram_estimate_bytes and record.vram_estimate_bytes > len(weights[Q4])
    assert registry_for(hf_env).get("tiny-q4") == record
    assert again == record and len(resolves(hub)) == 1  # the second pull downloaded nothing
    repo_requests = [r for r in hub.requests if REPO_ID in r.path]
    assert {r.authorization for r in repo_requests} == {"Bearer hf_secret"}
    assert not (hf_env / ".hf-staging" / "tiny").exists()


def test_cut_download_resumes_with_a_range_request(weights, hf_env, monkeypatch):
    # The client writes in 10 MiB chunks; smaller ones let a 512 KiB file show a resume.
    monkeypatch.setattr("huggingface_hub.constants.DOWNLOAD_CHUNK_SIZE", 1 << 16)
    hub = FakeHub(REPO_ID, weights, truncate_first_get={Q4: 200_000})
    with hub.serve() as url:
        point_hub_client_at(url, monkeypatch)
        record = pull_model("tiny", spec(), hf_env)
    assert [r.range for r in resolves(hub)] == [None, f"bytes={200_000 - 200_000 % (1 << 16)}-"]
    assert Path(record.files[0].path).read_bytes() == weights[Q4]
    assert record.files[0].sha256 == hub.sha256(Q4)


def test_wrong_checksum_leaves_nothing_behind(weights, hf_env, monkeypatch):
    hub = FakeHub(REPO_ID, weights, corrupt={Q4})
    with hub.serve() as url:
        point_hub_client_at(url, monkeypatch)
        with pytest.raises(PullError, match=r"sha256 is [0-9a-f]{64}, expected " + hub.sha256(Q4)):
            pull_model("tiny", spec(), hf_env)
    assert not (hf_env / "tiny" / Q4).exists()
    assert registry_for(hf_env).get("tiny") is None


def test_declared_sha256_must_match(weights, hf_env, monkeypatch):
    hub = FakeHub(REPO_ID, weights)
    with hub.serve() as url:
        point_hub_client_at(url, monkeypatch)
        with pytest.raises(PullError, match="declared " + "0" * 64):
            pull_model("tiny", spec(sha256="0" * 64), hf_env)
        record = pull_model("tiny", spec(sha256=hub.sha256(Q4)), hf_env)
    assert record.files[0].sha256 == hub.sha256(Q4)


def test_revision_pinning(weights, hf_env, monkeypatch):
    hub = FakeHub(REPO_ID, weights)
    with hub.serve() as url:
        point_hub_client_at(url, monkeypatch)
        with pytest.raises(PullError, match="revision 'v9' does not exist"):
            pull_model("tiny", spec(revision="v9"), hf_env)
        record = pull_model("tiny", spec(revision=hub.commit, file=Q8, pattern=None), hf_env)
    assert record.revision == hub.commit and record.primary_path.name == Q8
    # every file request used the full commit, never a moving branch
    assert {r.path.split("/resolve/")[1].split("/")[0] for r in resolves(hub, "HEAD")} == {
        hub.commit
    }


def test_a_changed_branch_or_tag_asks_the_hub_again(weights, hf_env, monkeypatch):
    """A registered model is reused without the network only while the declared revision is
    the one it was pulled at; a branch or tag that changed (or does not exist) is resolved."""
    hub = FakeHub(REPO_ID, weights)
    with hub.serve() as url:
        point_hub_client_at(url, monkeypatch)
        first = pull_model("tiny", spec(), hf_env)
        asked = len(hub.requests)
        assert pull_model("tiny", spec(), hf_env) == first and len(hub.requests) == asked
        with pytest.raises(PullError, match="revision 'no-such-branch' does not exist"):
            pull_model("tiny", spec(revision="no-such-branch"), hf_env)
        pinned = pull_model("tiny", spec(revision="main"), hf_env)
    assert pinned.requested_revision == "main" and pinned.revision == hub.commit
    assert registry_for(hf_env).get("tiny").requested_revision == "main"


def test_a_new_revision_with_a_same_size_file_is_downloaded(weights, hf_env, monkeypatch):
    """A file already on disk with the new listing's size was taken as present, its digest
    taken from the hub's listing rather than the file: after a revision changed the weights
    (same shape, same size) the old bytes stayed, recorded under the new checksum, and a
    declared sha256 passed on them. Size is only enough when the registry holds that file
    with the same LFS checksum; otherwise the file is hashed, and fetched again if it differs."""
    old = weights[Q4]
    new = old[:-4] + bytes(4 - i for i in range(4))  # same size, other weights
    assert len(new) == len(old) and new != old
    first = FakeHub(REPO_ID, {Q4: old}, commit="1" * 40)
    with first.serve() as url:
        point_hub_client_at(url, monkeypatch)
        pull_model("tiny", spec(revision=first.commit), hf_env)
    second = FakeHub(REPO_ID, {Q4: new}, commit="2" * 40)
    with second.serve() as url:
        point_hub_client_at(url, monkeypatch)
        record = pull_model("tiny", spec(revision=second.commit, sha256=second.sha256(Q4)), hf_env)
    assert (hf_env / "tiny" / Q4).read_bytes() == new
    assert record.files[0].sha256 == second.sha256(Q4) and record.revision == second.commit
    assert len(resolves(second)) == 1  # fetched again
    # A later commit that leaves the file as it is (same LFS checksum) downloads nothing.
    third = FakeHub(REPO_ID, {Q4: new}, commit="3" * 40)
    with third.serve() as url:
        point_hub_client_at(url, monkeypatch)
        again = pull_model("tiny", spec(revision=third.commit), hf_env)
    assert again.revision == third.commit and resolves(third) == []


def test_a_stale_unregistered_file_of_the_right_size_is_replaced(weights, hf_env, monkeypatch):
    """A same-size file the registry does not know (left by hand, or by another revision) is
    hashed against the listing, not trusted for its size."""
    (hf_env / "tiny").mkdir(parents=True)
    (hf_env / "tiny" / Q4).write_bytes(bytes(len(weights[Q4])))
    hub = FakeHub(REPO_ID, weights)
    with hub.serve() as url:
        point_hub_client_at(url, monkeypatch)
        record = pull_model("tiny", spec(), hf_env)
    assert (hf_env / "tiny" / Q4).read_bytes() == weights[Q4]
    assert record.files[0].sha256 == hub.sha256(Q4) and len(resolves(hub)) == 1


def test_a_replaced_quantization_does_not_stay_on_disk(weights, hf_env, monkeypatch):
    hub = FakeHub(REPO_ID, weights)
    with hub.serve() as url:
        point_hub_client_at(url, monkeypatch)
        pull_model("tiny", spec(), hf_env)
        record = pull_model("tiny", spec(pattern="*Q8_0.gguf"), hf_env)
    assert record.primary_path.name == Q8
    assert sorted(p.name for p in (hf_env / "tiny").iterdir()) == [Q8]


def test_choices_that_match_nothing_or_too_much_are_explained(weights, hf_env, monkeypatch):
    hub = FakeHub(REPO_ID, weights)
    with hub.serve() as url:
        point_hub_client_at(url, monkeypatch)
        with pytest.raises(PullError, match=r"pattern '\*IQ2.gguf' matches nothing; .*Tiny-Q8_0"):
            pull_model("tiny", spec(pattern="*IQ2.gguf"), hf_env)
        with pytest.raises(PullError, match="has 2 GGUF files; choose with file: or pattern:"):
            pull_model("tiny", spec(pattern=None), hf_env)
    assert resolves(hub) == []


def test_not_enough_disk_space_refuses_before_downloading(weights, hf_env, monkeypatch):
    hub = FakeHub(REPO_ID, weights)
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr("shutil.disk_usage", lambda _: Usage(10**9, 10**9 - 1000, 1000))
    with hub.serve() as url:
        point_hub_client_at(url, monkeypatch)
        with pytest.raises(PullError, match="not enough disk space .* need 1 MiB, 0 MiB free"):
            pull_model("tiny", spec(), hf_env)
    assert resolves(hub) == [] and resolves(hub, "HEAD") == []


PULL_SCRIPT = """
import json, sys
from pathlib import Path
from reconciler.config.schema import ModelSpec
from reconciler.models.pull import pull_model
spec = ModelSpec(source=sys.argv[1], pattern="*Q4_K_M.gguf")
record = pull_model("tiny", spec, Path(sys.argv[2]))
print(json.dumps([f.sha256 for f in record.files]))
"""


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_processes_pulling_at_once_end_with_one_complete_entry(
    backend, weights, hf_env, monkeypatch, tmp_path
):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    env.pop("TF_REGISTRY_URL", None)
    if backend == "postgresql":
        cluster = shared_postgres()
        if cluster.unavailable:
            pytest.skip(cluster.unavailable)
        cluster.reset()
        env["TF_REGISTRY_URL"] = cluster.url
        monkeypatch.setenv("TF_REGISTRY_URL", cluster.url)
    hub = FakeHub(REPO_ID, weights, delay=0.1)  # 8 chunks: about a second per download
    with hub.serve() as url:
        env["HF_ENDPOINT"] = url
        argv = [sys.executable, "-c", PULL_SCRIPT, f"hf:{REPO_ID}", str(hf_env)]
        procs = [
            subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)
        ]
        outputs = [p.communicate(timeout=60)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert [json.loads(o) for o in outputs] == [[hub.sha256(Q4)]] * 2
    assert len(resolves(hub)) == 1  # the second waited for the first, then found it done
    records = registry_for(hf_env).list()
    assert [(r.name, len(r.files)) for r in records] == [("tiny", 1)]
    visible = sorted(p.name for p in (hf_env / "tiny").iterdir())
    assert visible == [Q4]  # no .incomplete or .partial where a backend looks
    assert (hf_env / "tiny" / Q4).read_bytes() == weights[Q4]


def test_nothing_goes_to_the_public_hub(weights, hf_env, monkeypatch):
    """The client's own side requests (its agent registry) reach the local hub too."""
    hub = FakeHub(REPO_ID, weights)
    with hub.serve() as url:
        point_hub_client_at(url, monkeypatch)
        pull_model("tiny", spec(), hf_env)
        from huggingface_hub.utils import _detect_agent

        if hasattr(_detect_agent, "_fetch_registry"):  # newer clients fetch it once a day
            _detect_agent._fetch_registry()
            assert hub.requests[-1].path == "/api/agent-harnesses"
    assert all(r.path.startswith(("/api/", f"/{REPO_ID}/")) for r in hub.requests)
