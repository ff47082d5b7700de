"""`lmpack pull` from a Hub repo, against the local stand-in Hub of tests/hub_server.py (no network)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmpack import api
from lmpack.errors import SourceError

REPO = "lmpack-tests/tiny-llama"
REPO_ROOT = Path(__file__).resolve().parents[1]
# Files a repo often carries that lmpack must never fetch (other frameworks, training state).
UNWANTED = {
    "pytorch_model.bin": b"pickle bytes",
    "onnx/model.onnx": b"onnx bytes",
    "flax_model.msgpack": b"flax bytes",
    "optimizer.pt": b"optimizer state",
}


def pull_json(lmpack_cli, *args) -> dict:
    result = lmpack_cli("pull", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def lmpack_process(*args: str, **env: str) -> subprocess.CompletedProcess:
    """The real `lmpack` in a child process: huggingface_hub reads HF_HUB_OFFLINE there at import, as for a user."""
    pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-c", "from lmpack.cli.main import main; main()", *args],
        env={**os.environ, "PYTHONPATH": pythonpath, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def torch_checkpoint_of(directory: Path, shards: int = 1) -> dict[str, bytes | str]:
    """A model's weights as real torch.save pickles, the way older repos ship them: pytorch_model.bin, or shards
    with their index."""
    from safetensors.torch import load_file

    weights = load_file(directory / "model.safetensors")
    names = sorted(weights)
    if shards == 1:
        return {"pytorch_model.bin": _torch_bytes(weights)}
    files: dict[str, bytes | str] = {}
    weight_map = {}
    for index in range(shards):
        shard_name = f"pytorch_model-{index + 1:05d}-of-{shards:05d}.bin"
        shard = {name: weights[name] for name in names[index::shards]}
        files[shard_name] = _torch_bytes(shard)
        weight_map.update(dict.fromkeys(shard, shard_name))
    total = sum(t.numel() * t.element_size() for t in weights.values())
    files["pytorch_model.bin.index.json"] = json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    return files


def _torch_bytes(tensors) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    return buffer.getvalue()


def test_pull_records_the_commit_of_main(fake_hub, model_copy, lmpack_cli):
    fake_hub.add_repo(REPO, model_copy("repo"))
    out = pull_json(lmpack_cli, REPO)
    source = out["source"]
    assert source["kind"] == "hub" and source["ref"] == REPO
    assert source["revision"] == "main"
    assert source["commit"] == fake_hub.commit(REPO)
    assert source["architecture"] == "LlamaForCausalLM"
    assert source["license"] == "apache-2.0"
    assert out["cached"] is False
    assert json.loads((Path(out["path"]) / "lmpack-source.json").read_text())["commit"] == fake_hub.commit(REPO)


def test_human_output_names_repo_and_commit(fake_hub, model_copy, lmpack_cli):
    fake_hub.add_repo(REPO, model_copy("repo"))
    result = lmpack_cli("pull", REPO)
    assert result.exit_code == 0, result.output
    assert f"pulled hub {REPO} @ {fake_hub.commit(REPO)} (LlamaForCausalLM)" in result.stdout


def test_revision_tag_resolves_to_the_tags_commit(fake_hub, model_copy, lmpack_cli):
    v1 = model_copy("v1", files={"README.md": "---\nlicense: mit\n---\n# the v1 release\n"})
    commits = fake_hub.add_repo(REPO, {"main": model_copy("main"), "v1": v1})
    assert commits["v1"] != commits["main"]
    out = pull_json(lmpack_cli, REPO, "--revision", "v1")
    assert out["source"]["revision"] == "v1"
    assert out["source"]["commit"] == commits["v1"]
    assert out["source"]["license"] == "mit"
    assert "the v1 release" in (Path(out["path"]) / "README.md").read_text()


def test_only_the_needed_files_are_fetched(fake_hub, model_copy, lmpack_cli, tmp_path):
    repo_dir = model_copy("repo", files=UNWANTED)
    fake_hub.add_repo(REPO, repo_dir)
    out_dir = tmp_path / "pulled"
    pull_json(lmpack_cli, REPO, "-o", out_dir)

    assert fake_hub.files_requested(REPO).isdisjoint(UNWANTED)
    expected = {p.relative_to(repo_dir).as_posix() for p in repo_dir.rglob("*") if p.is_file()} - set(UNWANTED)
    assert fake_hub.files_downloaded(REPO) == expected
    pulled = {p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file()}
    assert pulled == expected | {"lmpack-source.json"}


def test_second_pull_of_the_same_commit_is_a_cache_hit(fake_hub, model_copy, lmpack_cli):
    fake_hub.add_repo(REPO, model_copy("repo"))
    first = pull_json(lmpack_cli, REPO)
    fake_hub.clear_requests()
    second = pull_json(lmpack_cli, REPO)
    assert (first["cached"], second["cached"]) == (False, True)
    assert second["path"] == first["path"]
    assert second["source"]["commit"] == first["source"]["commit"]
    assert fake_hub.files_downloaded() == set()  # the commit was asked for; no file was sent again


def test_offline_pull_reads_the_hub_cache(fake_hub, model_copy, tmp_path):
    fake_hub.add_repo(REPO, model_copy("repo"))
    online = api.pull(REPO)
    fake_hub.clear_requests()
    # A fresh step cache, so the pull step really runs again, from the Hugging Face cache alone.
    done = lmpack_process("pull", REPO, "--json", "--cache-dir", str(tmp_path / "fresh-cache"), HF_HUB_OFFLINE="1")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["cached"] is False
    assert out["source"]["commit"] == online.source["commit"] == fake_hub.commit(REPO)
    assert (Path(out["path"]) / "model.safetensors").read_bytes() == (online.path / "model.safetensors").read_bytes()
    assert fake_hub.requests == []


def test_offline_pull_with_an_empty_cache_fails_clearly(fake_hub, model_copy):
    fake_hub.add_repo(REPO, model_copy("repo"))
    done = lmpack_process("pull", REPO, HF_HUB_OFFLINE="1")
    assert done.returncode == 10, done.stderr
    assert f"Hub repo {REPO} is not in the local cache and HF_HUB_OFFLINE is set" in done.stderr
    assert "hint:" in done.stderr
    assert fake_hub.requests == []


def test_offline_set_after_import_is_honoured(fake_hub, model_copy, monkeypatch):
    """The library reads HF_HUB_OFFLINE at each pull, though huggingface_hub read it once at import."""
    fake_hub.add_repo(REPO, model_copy("repo"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SourceError, match="HF_HUB_OFFLINE"):
        api.pull(REPO)
    assert fake_hub.requests == []


def test_unknown_repo_is_not_found(fake_hub, lmpack_cli):
    result = lmpack_cli("pull", "lmpack-tests/no-such-model")
    assert result.exit_code == 4, result.output
    assert "Hub repo lmpack-tests/no-such-model not found" in result.stderr


def test_unknown_revision_is_not_found(fake_hub, model_copy, lmpack_cli):
    fake_hub.add_repo(REPO, model_copy("repo"))
    result = lmpack_cli("pull", REPO, "--revision", "v9")
    assert result.exit_code == 4, result.output
    assert f"revision 'v9' not found in Hub repo {REPO}" in result.stderr


@pytest.fixture(params=[1, 2], ids=["single", "sharded"])
def pickle_repo(request, fake_hub, model_copy, tiny_llama):
    """A repo with only torch pickles for weights (one file, or shards and their index), and training state."""
    files = {**torch_checkpoint_of(tiny_llama, shards=request.param), "optimizer.pt": b"optimizer state"}
    fake_hub.add_repo(REPO, model_copy("pickle-repo", drop=("model.safetensors",), files=files))
    return fake_hub


def test_pickle_only_repo_is_refused(pickle_repo, lmpack_cli):
    result = lmpack_cli("pull", REPO)
    assert result.exit_code == 7, result.output
    assert "pickle" in result.stderr and "--allow-pickle" in result.stderr
    assert not any(
        name.startswith("pytorch_model") or name.endswith(".pt") for name in pickle_repo.files_requested(REPO)
    )


def test_allow_pickle_converts_to_safetensors(pickle_repo, lmpack_cli, tiny_llama, tmp_path):
    from safetensors.torch import load_file

    out_dir = tmp_path / "pulled"
    out = pull_json(lmpack_cli, REPO, "--allow-pickle", "-o", out_dir)
    assert (out_dir / "model.safetensors").is_file()
    assert not [p for p in out_dir.iterdir() if p.name.startswith("pytorch_model") or p.suffix == ".pt"]
    assert "optimizer.pt" not in pickle_repo.files_requested(REPO)
    assert out["source"]["architecture"] == "LlamaForCausalLM"
    assert json.loads((out_dir / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    original, converted = load_file(tiny_llama / "model.safetensors"), load_file(out_dir / "model.safetensors")
    assert converted.keys() == original.keys()
    assert all(converted[name].equal(original[name]) for name in original)


@pytest.fixture
def remote_code_repo(fake_hub, model_copy, tiny_llama):
    config = json.loads((tiny_llama / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"}
    fake_hub.add_repo(
        REPO,
        model_copy(
            "remote-code-repo", files={"config.json": json.dumps(config), "modeling_tiny.py": "raise SystemExit\n"}
        ),
    )
    return fake_hub


def test_remote_code_repo_is_refused(remote_code_repo, lmpack_cli):
    result = lmpack_cli("pull", REPO)
    assert result.exit_code == 7, result.output
    assert "auto_map" in result.stderr and "--trust-remote-code" in result.stderr


def test_trust_remote_code_accepts_it(remote_code_repo, lmpack_cli):
    out = pull_json(lmpack_cli, REPO, "--trust-remote-code")
    assert out["source"]["commit"] == remote_code_repo.commit(REPO)
    assert "auto_map" in json.loads((Path(out["path"]) / "config.json").read_text())
    assert (Path(out["path"]) / "modeling_tiny.py").is_file()  # the code auto_map names comes along


def test_remote_code_files_stay_behind_without_the_flag(remote_code_repo, lmpack_cli):
    lmpack_cli("pull", REPO)
    assert "modeling_tiny.py" not in remote_code_repo.files_downloaded()
