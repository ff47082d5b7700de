"""`lmpack pull` of a local directory or file: what is copied, and what is refused with which exit code."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

EXTRAS = {
    "pytorch_model.bin": b"pickle bytes",
    "optimizer.pt": b"optimizer state",
    "onnx/model.onnx": b"onnx",
    "flax_model.msgpack": b"flax",
    "notes.txt": "scratch notes",
    ".git/config": "[core]\n",
}


def files_under(directory: Path) -> set[str]:
    return {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()}


def test_pull_copies_only_the_wanted_files(tiny_llama, model_copy, lmpack_cli, tmp_path):
    model_dir = model_copy("model", files=EXTRAS)
    out_dir = tmp_path / "pulled"
    result = lmpack_cli("pull", model_dir, "-o", out_dir, "--json")
    assert result.exit_code == 0, result.output
    source = json.loads(result.stdout)["source"]
    assert source["kind"] == "directory" and source["ref"] == str(model_dir.resolve())
    assert source["architecture"] == "LlamaForCausalLM"
    assert files_under(out_dir) == files_under(tiny_llama) | {"lmpack-source.json"}
    assert (out_dir / "model.safetensors").read_bytes() == (tiny_llama / "model.safetensors").read_bytes()


def test_pulling_again_is_a_cache_hit_until_a_file_changes(model_copy, lmpack_cli):
    model_dir = model_copy("model")
    first, second = (json.loads(lmpack_cli("pull", model_dir, "--json").stdout) for _ in range(2))
    assert (first["cached"], second["cached"]) == (False, True)
    (model_dir / "README.md").write_text("---\nlicense: mit\n---\n")
    third = json.loads(lmpack_cli("pull", model_dir, "--json").stdout)
    assert third["cached"] is False and third["source"]["license"] == "mit"


def test_a_directory_of_links_is_pulled_by_content(tiny_llama, model_copy, lmpack_cli, tmp_path):
    """A Hub cache snapshot is all links into a blob store: two such directories must not share a cache entry."""
    other = model_copy("other", files={"README.md": "---\nlicense: mit\n---\n"})
    licenses = []
    for name, target in (("links-a", tiny_llama), ("links-b", other)):
        links = tmp_path / name
        links.mkdir()
        for file in target.iterdir():
            os.symlink(file, links / file.name)
        result = lmpack_cli("pull", links, "--json")
        assert result.exit_code == 0, result.output
        out = json.loads(result.stdout)
        assert out["cached"] is False
        assert (Path(out["path"]) / "model.safetensors").is_file()
        licenses.append(out["source"]["license"])
    assert licenses == ["apache-2.0", "mit"]


def test_directory_without_config_is_unsupported(model_copy, lmpack_cli):
    model_dir = model_copy("no-config", drop=("config.json",))
    result = lmpack_cli("pull", model_dir)
    assert result.exit_code == 6, result.output
    assert f"{model_dir.resolve()}: no config.json" in result.stderr


def test_missing_path_is_not_found(lmpack_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = lmpack_cli("pull", "./nope")
    assert result.exit_code == 4, result.output
    assert "model path ./nope does not exist" in result.stderr


def test_file_that_is_not_gguf_is_unsupported(lmpack_cli, tmp_path):
    text = tmp_path / "model.gguf"
    text.write_text("just some text, not a model\n")
    result = lmpack_cli("pull", text)
    assert result.exit_code == 6, result.output
    assert f"{text}: not a GGUF file" in result.stderr


def test_fake_safetensors_is_refused(model_copy, lmpack_cli):
    fake = struct.pack("<Q", 1 << 40) + b'{"weight": {}}'  # a header length far past the end of the file
    model_dir = model_copy("fake-weights", files={"model.safetensors": fake})
    result = lmpack_cli("pull", model_dir)
    assert result.exit_code == 7, result.output
    assert f"{model_dir.resolve()}/model.safetensors: not a safetensors file" in result.stderr
    assert f"header length {1 << 40} out of bounds" in result.stderr


def test_pickle_only_directory_is_refused(model_copy, lmpack_cli):
    model_dir = model_copy("pickle-only", drop=("model.safetensors",), files={"pytorch_model.bin": b"not loaded"})
    result = lmpack_cli("pull", model_dir)
    assert result.exit_code == 7, result.output
    assert "only pickle checkpoints (found pytorch_model.bin)" in result.stderr
    assert "--allow-pickle" in result.stderr


def test_a_model_is_named_for_what_it_is_not_where_it_is_kept(tmp_path):
    """Variant names start with the model's name: a Hub repo's, the repo a checkpoint was saved from, or the
    directory's own name, skipping names that only say where it is kept."""
    from lmpack.steps.pull import model_name

    def local(path: str, config: dict | None = None) -> str:
        return model_name({"kind": "directory", "ref": str(tmp_path / path)}, config or {})

    assert model_name({"kind": "hub", "ref": "HuggingFaceTB/SmolLM2-135M-Instruct"}, {}) == "SmolLM2-135M-Instruct"
    assert local("my-llama") == "my-llama"
    assert local("my-llama/model") == "my-llama"  # a local ./model is not a model's name
    assert local("hub/models--Qwen--Qwen2.5-0.5B/snapshots/" + "a" * 40) == "Qwen2.5-0.5B"
    assert local("model", {"_name_or_path": "sentence-transformers/all-MiniLM-L6-v2"}) == "all-MiniLM-L6-v2"
    assert local("export", {"_name_or_path": "/home/me/checkpoints/run-3"}) == "export"  # a path, not a repo id


def test_a_ggufs_own_sampling_settings_become_the_generation_configs(tmp_path):
    """general.sampling.* in a GGUF's header (written here with the gguf package's writer) are what the server
    takes as the model's sampling defaults."""
    import gguf

    from lmpack.steps.gguf_file import gguf_metadata, gguf_sampling

    path = tmp_path / "meta.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("Tiny Chat 1B")
    writer.add_float32(gguf.Keys.General.SAMPLING_TEMP, 0.6)
    writer.add_float32(gguf.Keys.General.SAMPLING_TOP_P, 0.9)
    writer.add_int32(gguf.Keys.General.SAMPLING_TOP_K, 20)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    metadata = gguf_metadata(path)
    assert metadata["general.name"] == "Tiny Chat 1B"
    assert gguf_sampling(metadata) == {"temperature": 0.6, "top_p": 0.9, "top_k": 20}
    assert gguf_sampling({"general.name": "x"}) == {}
