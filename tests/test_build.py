"""End-to-end builds of tiny models: real exports (onnxruntime-genai's builder, optimum), real quantization,
real quality gate."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from lmpack.cli.main import cli


def build(*args: str, cache: Path):
    return CliRunner().invoke(cli, ["build", *args, "--cache-dir", str(cache)])


def test_int8_build_writes_a_complete_variant(tiny_llama, session_cache, tmp_path):
    result = build(
        str(tiny_llama), "--target", "cpu-x86", "--profile", "int8", "-o", str(tmp_path), "--json", cache=session_cache
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    variant = Path(out["variant_dir"])
    assert variant.parent == tmp_path
    model = variant / "model"
    for name in (
        "model.onnx",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "generation_config.json",
        "lmpack-model.json",
        "lmpack-source.json",
    ):
        assert (model / name).is_file(), name
    report = json.loads((variant / "report.json").read_text())
    assert report == out["report"]
    assert report["quality"]["gate"] == "passed"
    assert report["quality"]["perplexity_increase"] <= 0.02
    assert report["sizes"]["model_bytes"] < report["sizes"]["reference_bytes"]
    assert report["sizes"]["onnx_ratio"] < 0.6
    assert [s["step"] for s in report["steps"]] == ["pull", "export", "quantize", "validate"]
    assert report["source"]["license"] == "apache-2.0"
    ops = [n.op_type for n in onnx.load(str(model / "model.onnx")).graph.node]
    # the builder's fused graph; the tied embedding was folded out of the LM head's Transpose and quantized too
    assert ops.count("GroupQueryAttention") == 4 and "MatMulNBits" in ops and "Transpose" not in ops
    graph = onnx.load(str(model / "model.onnx")).graph
    assert "num_logits_to_keep" in [i.name for i in graph.input]  # the LM head runs on the last positions only
    info = json.loads((model / "lmpack-model.json").read_text())
    assert info["task"] == "text-generation" and info["num_layers"] == 4
    assert (info["exporter"], info["kv_padding"]) == ("onnxruntime-genai", "right")
    assert not list(model.glob("genai_config.json"))  # only the graph is taken from the builder
    assert info["quantization"]["bits"] == 8
    quantize = next(s for s in report["steps"] if s["step"] == "quantize")
    assert quantize["metrics"]["fused_matmuls"] == 4  # each layer's gate and up projections are one MatMulNBits
    variant_meta = json.loads((variant / "variant.json").read_text())
    assert variant_meta["target"]["name"] == "cpu-x86" and variant_meta["precision"] == "int8"
    assert variant_meta["name"] == variant.name
    assert "perplexity" in (variant / "report.txt").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_second_target_reuses_the_export(tiny_llama, session_cache, tmp_path):
    first = build(
        str(tiny_llama), "--target", "cpu-x86", "--profile", "int4", "-o", str(tmp_path), "--json", cache=session_cache
    )
    second = build(
        str(tiny_llama),
        "--target",
        "cpu-arm64",
        "--profile",
        "int4",
        "-o",
        str(tmp_path),
        "--json",
        cache=session_cache,
    )
    assert first.exit_code == 0 and second.exit_code == 0, second.output
    steps = {s["step"]: s for s in json.loads(second.stdout)["report"]["steps"]}
    assert steps["pull"]["cached"] and steps["export"]["cached"] and steps["quantize"]["cached"]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"{tiny_llama.name}-cpu-arm64-int4", f"{tiny_llama.name}-cpu-x86-int4"]


def test_encoder_build_measures_cosine_similarity(tiny_bert, session_cache, tmp_path):
    result = build(
        str(tiny_bert), "--target", "cpu-x86", "--profile", "int8", "-o", str(tmp_path), "--json", cache=session_cache
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["report"]
    assert report["task"] == "feature-extraction"
    assert report["quality"]["cosine_similarity_mean"] >= 0.99
    assert (Path(json.loads(result.stdout)["variant_dir"]) / "model" / "modules.json").is_file()


def _strict_profile(tmp_path: Path) -> Path:
    path = tmp_path / "strict-int4.toml"
    path.write_text(
        'schema_version = 1\nname = "strict-int4"\nprecision = "int4"\n'
        '[[steps]]\nname = "export"\n[[steps]]\nname = "quantize"\nbits = 4\nhead_bits = 4\n'
        'embedding_bits = 4\n[[steps]]\nname = "validate"\n'
        "[quality]\nmax_perplexity_increase = 0.0\nmin_top1_agreement = 1.0\n"
    )
    return path


def test_quality_gate_failure_writes_nothing_and_shows_the_numbers(tiny_llama, session_cache, tmp_path):
    out = tmp_path / "dist"
    result = build(
        str(tiny_llama),
        "--target",
        "cpu-x86",
        "--profile",
        str(_strict_profile(tmp_path)),
        "-o",
        str(out),
        cache=session_cache,
    )
    assert result.exit_code == 8
    assert "quality gate" in result.output and "allowed +0.00%" in result.output
    assert "top-1 agreement" in result.output  # every check's verdict, whichever failed
    assert not out.exists() or not any(out.iterdir())
    kept = build(
        str(tiny_llama),
        "--target",
        "cpu-x86",
        "--profile",
        str(_strict_profile(tmp_path)),
        "-o",
        str(out),
        "--allow-quality-loss",
        "--json",
        cache=session_cache,
    )
    assert kept.exit_code == 0
    assert json.loads(kept.stdout)["report"]["quality"]["gate"] == "overridden"


@pytest.mark.parametrize(
    "args,code,fragment",
    [
        (["--target", "z80"], 4, "unknown target"),
        (["--target", "cpu-x86", "--profile", "fp16"], 5, "does not support"),
        (["--target", "cpu-x86", "--profile", "nope"], 4, "unknown profile"),
    ],
)
def test_bad_requests_fail_before_any_work(tiny_llama, tmp_path, args, code, fragment):
    result = build(str(tiny_llama), *args, "-o", str(tmp_path / "dist"), cache=tmp_path / "cache")
    assert result.exit_code == code
    assert fragment in result.output
    assert not (tmp_path / "dist").exists() and not (tmp_path / "cache").exists()


def test_missing_model_path(tmp_path):
    result = build("./no-such-model", "--target", "cpu-x86", cache=tmp_path / "cache")
    assert result.exit_code == 4 and "does not exist" in result.output


def _with_config(model_copy, tiny_llama, **changes) -> Path:
    config = json.loads((tiny_llama / "config.json").read_text())
    return model_copy("odd", files={"config.json": json.dumps({**config, **changes})})


def test_int4_embedding_reads_the_tied_8bit_head(tiny_llama, session_cache, tmp_path):
    """The int4 profile's tied embedding is the 8-bit head's weight, gathered and dequantized in the graph:
    no table of its own, and each row within half a quantization step of the fp32 embedding."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    result = build(
        str(tiny_llama), "--target", "cpu-x86", "--profile", "int4", "-o", str(tmp_path), "--json", cache=session_cache
    )
    assert result.exit_code == 0, result.output
    steps = {s["step"]: s for s in json.loads(result.stdout)["report"]["steps"]}
    assert steps["quantize"]["metrics"]["embedding_shares_head"] is True
    model = onnx.load(str(Path(json.loads(result.stdout)["variant_dir"]) / "model" / "model.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert "GatherBlockQuantized" not in ops
    head = next(n for n in model.graph.node if "logits" in n.output)
    assert head.op_type == "MatMulNBits" and {a.name: a.i for a in head.attribute}["bits"] == 8
    embedding = next(n for n in model.graph.node if n.op_type == "Reshape" and n.input[0].endswith("_d"))
    inits = {i.name: i for i in model.graph.initializer}
    assert (
        sum(
            1
            for i in inits.values()
            if list(i.dims)[:1] == [512] and i.data_type == TensorProto.FLOAT and len(i.dims) == 2 and i.dims[1] == 64
        )
        == 0
    )  # no fp32 [vocab, hidden] table left
    # run the graph up to the embedding and compare with the fp32 export's table
    model.graph.output.append(helper.make_tensor_value_info(embedding.output[0], TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.array([[1, 5, 7, 300, 511]], dtype=np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "num_logits_to_keep": np.array([1])}
    for i in session.get_inputs():
        if i.name.startswith("past_key_values."):
            feed[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), dtype=np.float32)
    rows = session.run([embedding.output[0]], feed)[0][0]  # [5, hidden]
    scales = numpy_helper.to_array(inits[head.input[2]])[ids[0]]  # [5, blocks]
    weight = numpy_helper.to_array(inits[head.input[1]])[ids[0]].astype(np.float32) - 128
    np.testing.assert_array_equal(rows, (weight * scales[..., None]).reshape(rows.shape))
    from safetensors.numpy import load_file

    table = load_file(str(tiny_llama / "model.safetensors"))["model.embed_tokens.weight"][ids[0]]
    step = np.repeat(scales, rows.shape[1] // scales.shape[1], axis=1)
    assert np.all(np.abs(rows - table) <= np.abs(step) / 2 + 1e-6)  # the quantizer may store negative scales


def test_int4_keeps_llama_cpps_sensitive_projections_at_8_bits(tiny_llama, session_cache, tmp_path):
    """The int4 profile's mixed recipe (llama.cpp's use_more_bits): the value (packed QKV) and down projections of
    the first and last eighth of the layers and every third between are 8-bit, the rest 4-bit. Of the tiny
    Llama's 4 layers (an eighth is none, in llama.cpp's integer arithmetic) that is 2 and 3."""
    from lmpack.steps.quantize import sensitive_matmuls

    result = build(
        str(tiny_llama), "--target", "cpu-x86", "--profile", "int4", "-o", str(tmp_path), "--json", cache=session_cache
    )
    assert result.exit_code == 0, result.output
    model = onnx.load(str(Path(json.loads(result.stdout)["variant_dir"]) / "model" / "model.onnx"))
    bits = {n.name: {a.name: a.i for a in n.attribute}["bits"] for n in model.graph.node if n.op_type == "MatMulNBits"}
    eight = sorted(name.removesuffix("/MatMul_Q8") for name, width in bits.items() if width == 8)
    layers = [f"/model/layers.{i}/{part}" for i in (2, 3) for part in ("attn/qkv_proj", "mlp/down_proj")]
    assert eight == sorted([*layers, "/lm_head"]), eight
    assert set(bits.values()) == {4, 8}
    steps = {s["step"]: s for s in json.loads(result.stdout)["report"]["steps"]}
    wider = steps["quantize"]["metrics"]["wider_matmuls"]["8"]
    assert wider["head_bits: the LM head"] == ["/lm_head/MatMul"]
    assert len(wider["sensitive_bits: llama.cpp's use_more_bits"]) == 4  # the report says which and why

    # the rule on a 32-layer model, as llama.cpp's llama-quant.cpp writes it
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("MatMul", ["a", "b"], ["c"], name=f"/model/layers.{i}/mlp/down_proj/MatMul")
            for i in range(32)
        ],
        "g",
        [],
        [],
    )
    chosen = [int(name.split(".")[1].split("/")[0]) for name in sensitive_matmuls(onnx.helper.make_model(graph))]
    assert chosen == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]


def test_optimum_exports_what_the_builder_does_not(llama_variant_optimum, tiny_bert, session_cache, tmp_path):
    info = json.loads((llama_variant_optimum / "model" / "lmpack-model.json").read_text())
    assert (info["exporter"], info["kv_padding"]) == ("optimum", "left")
    ops = {n.op_type for n in onnx.load(str(llama_variant_optimum / "model" / "model.onnx")).graph.node}
    assert "GroupQueryAttention" not in ops and "MatMulNBits" in ops
    result = build(
        str(tiny_bert), "--target", "cpu-x86", "--profile", "int8", "-o", str(tmp_path), "--json", cache=session_cache
    )
    assert result.exit_code == 0, result.output
    export = next(s for s in json.loads(result.stdout)["report"]["steps"] if s["step"] == "export")
    assert export["metrics"]["exporter"] == "optimum"


@pytest.mark.parametrize(
    "config,wanted,expected",
    [
        ({"architectures": ["LlamaForCausalLM"]}, "auto", "onnxruntime-genai"),
        ({"architectures": ["LlamaForCausalLM"]}, "optimum", "optimum"),
        ({"architectures": ["GPT2LMHeadModel"]}, "auto", "optimum"),
        ({"architectures": ["GPTNeoXForCausalLM"]}, "auto", "optimum"),
        ({"architectures": ["BertModel"]}, "auto", "optimum"),
    ],
)
def test_exporter_choice(config, wanted, expected):
    from lmpack.steps.export import choose_exporter, model_task

    task = model_task(config) if config["architectures"][0] != "GPT2LMHeadModel" else "text-generation"
    assert choose_exporter(config, task, wanted) == expected


def test_the_builder_is_refused_for_what_it_cannot_make():
    from lmpack.errors import UnsupportedModelError
    from lmpack.steps.export import choose_exporter

    with pytest.raises(UnsupportedModelError, match="BertModel.*optimum|cannot export BertModel"):
        choose_exporter({"architectures": ["BertModel"]}, "feature-extraction", "onnxruntime-genai")


@pytest.mark.parametrize(
    "architecture,model_type,fragments",
    [
        ("T5ForConditionalGeneration", "t5", ("T5ForConditionalGeneration", "ForCausalLM")),
        ("WeirdForCausalLM", "weird", ("'weird'", "llama")),  # the message lists the model types optimum exports
    ],
)
def test_unsupported_models_are_named(model_copy, tiny_llama, tmp_path, architecture, model_type, fragments):
    """Refused before any work (no step ran, nothing cached), with the tested families listed."""
    odd = _with_config(model_copy, tiny_llama, architectures=[architecture], model_type=model_type)
    result = build(str(odd), "--target", "cpu-x86", "-o", str(tmp_path / "dist"), cache=tmp_path / "cache")
    assert result.exit_code == 6
    assert all(fragment in result.output for fragment in fragments)
    assert "lmpack is tested on Llama 2, Llama 3, SmolLM, Qwen2" in result.output
    assert not (tmp_path / "dist").exists() and not (tmp_path / "cache" / "steps").exists()


def test_a_build_that_cannot_fit_in_memory_is_refused_before_it_starts(model_copy, session_cache, tmp_path):
    """The weights are counted from the safetensors headers: one that claims 10 billion weights needs far more
    memory than any test machine has; --no-memory-check starts anyway."""
    import struct

    header = json.dumps({"huge.weight": {"dtype": "F32", "shape": [100000, 100000], "data_offsets": [0, 0]}}).encode()
    big = model_copy("big", files={"extra.safetensors": struct.pack("<Q", len(header)) + header})
    args = [str(big), "--target", "cpu-x86", "--profile", "fp32", "-o", str(tmp_path / "dist")]
    refused = build(*args, cache=tmp_path / "cache")
    assert refused.exit_code == 23, refused.output
    assert "10.00 billion weights" in refused.output and "GiB are available" in refused.output
    assert not (tmp_path / "cache" / "steps").exists()
    started = build(*args, "--no-memory-check", cache=session_cache)
    assert started.exit_code != 23 and "GiB are available" not in started.output


def test_a_gguf_of_an_architecture_transformers_cannot_load_is_refused_before_the_pull(tmp_path):
    import gguf

    path = tmp_path / "rwkv.gguf"
    writer = gguf.GGUFWriter(str(path), "rwkv6")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    result = build(str(path), "--target", "cpu-x86", "-o", str(tmp_path / "dist"), cache=tmp_path / "cache")
    assert result.exit_code == 6 and "GGUF architecture 'rwkv6' cannot be loaded" in result.output
    assert not (tmp_path / "cache" / "steps").exists()


def _can_mount_tmpfs() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs root and unshare to mount a small tmpfs")
def test_disk_full_leaves_nothing_behind(tiny_llama, session_cache, tmp_path):
    """A real full disk: the variant is written to a 300 KiB tmpfs that cannot hold it."""
    out = tmp_path / "small-disk"
    out.mkdir()
    warm = build(
        str(tiny_llama), "--target", "cpu-x86", "--profile", "int8", "-o", str(tmp_path / "warm"), cache=session_cache
    )
    assert warm.exit_code == 0
    script = (
        f"mount -t tmpfs -o size=300k tmpfs {out} && "
        f"{sys.executable} -m lmpack build {tiny_llama} --target cpu-x86 --profile int8 -o {out} "
        f"--cache-dir {session_cache}; code=$?; ls -A {out}; exit $code"
    )
    result = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 9, result.stderr
    assert "disk full" in result.stderr
    assert result.stdout.strip() == ""  # nothing left on the full disk, not even a hidden partial directory


def test_fp16_path_runs_where_the_target_allows_it(tiny_llama, session_cache, cpu_fp16_target, tmp_path):
    """fp16 is planned only for targets that list it; onnxruntime's CPU provider runs fp16 graphs too."""
    result = build(
        str(tiny_llama),
        "--target",
        str(cpu_fp16_target),
        "--profile",
        "fp16",
        "-o",
        str(tmp_path),
        "--json",
        cache=session_cache,
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["report"]
    assert report["quality"]["gate"] == "passed"
    model = Path(json.loads(result.stdout)["variant_dir"]) / "model" / "model.onnx"
    initializers = onnx.load(str(model)).graph.initializer
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in initializers)


def test_an_fp16_kv_cache_halves_the_caches_and_keeps_the_answers(
    llama_variant, llama_variant_fp16_kv, tiny_llama, session_cache, tmp_path
):
    """kv_cache = "fp16": every attention's past and present are fp16 in the graph and in the runtime's caches, the
    report counts the layers, and the model still agrees with its fp32 reference as the fp32-cache variant does."""
    from lmpack import api

    model = onnx.load(str(llama_variant_fp16_kv / "model" / "model.onnx"), load_external_data=False)
    caches = [v for v in [*model.graph.input, *model.graph.output] if v.name.startswith(("past_", "present."))]
    assert caches and {v.type.tensor_type.elem_type for v in caches} == {onnx.TensorProto.FLOAT16}
    report = json.loads((llama_variant_fp16_kv / "report.json").read_text())
    steps = {s["step"]: s for s in report["steps"]}
    assert steps["quantize"]["metrics"]["fp16_kv_cache_layers"] == 4  # the tiny Llama's layers
    halved, full = report["quality"], json.loads((llama_variant / "report.json").read_text())["quality"]
    assert halved["gate"] == "passed"
    assert (
        abs(halved["kl_mean"] - full["kl_mean"]) < 0.01
        and abs(halved["top1_agreement"] - full["top1_agreement"]) < 0.05
    )
    prompt = "What is the capital of France?"
    assert (
        api.generate(llama_variant_fp16_kv, prompt, max_tokens=16).text
        == api.generate(llama_variant, prompt, max_tokens=16).text
    )

    # an optimum graph has no GroupQueryAttention to give an fp16 cache: the build says so and names the exporter
    profile = (Path(__file__).parents[1] / "profiles" / "int8.toml").read_text()
    profile = profile.replace('name = "export"\n', 'name = "export"\nexporter = "optimum"\n')
    profile = profile.replace("embedding_bits = 8\n", 'embedding_bits = 8\nkv_cache = "fp16"\n')
    (tmp_path / "optimum-fp16-kv.toml").write_text(profile)
    result = build(
        str(tiny_llama),
        "--target",
        "cpu-x86",
        "--profile",
        str(tmp_path / "optimum-fp16-kv.toml"),
        "-o",
        str(tmp_path),
        cache=session_cache,
    )
    assert result.exit_code != 0 and "GroupQueryAttention (onnxruntime-genai's exporter)" in result.output


def test_build_can_emit_a_bundle(tiny_llama, session_cache, tmp_path):
    result = build(
        str(tiny_llama),
        "--target",
        "cpu-x86",
        "--profile",
        "int8",
        "-o",
        str(tmp_path),
        "--bundle",
        "tiny:1.2.0",
        "--json",
        cache=session_cache,
    )
    assert result.exit_code == 0, result.output
    bundle = Path(json.loads(result.stdout)["bundle"]["path"])
    assert bundle == tmp_path / "tiny-1.2.0.lmpack" and bundle.is_file()
    verified = CliRunner().invoke(cli, ["verify", str(bundle)])
    assert verified.exit_code == 0, verified.output


def test_a_malformed_bundle_spec_fails_before_any_work(tiny_llama, tmp_path):
    result = build(
        str(tiny_llama),
        "--target",
        "cpu-x86",
        "--bundle",
        "tiny",
        "-o",
        str(tmp_path / "dist"),
        cache=tmp_path / "cache",
    )
    assert result.exit_code == 3 and "NAME:VERSION" in result.output
    assert not (tmp_path / "cache").exists()


def test_a_failing_builder_names_itself_and_its_last_output(model_copy, tiny_llama, tmp_path):
    """A Llama the builder cannot read (its config lies about the hidden size): exit 11, one clear line."""
    broken = _with_config(model_copy, tiny_llama, hidden_size=96)
    result = build(
        str(broken), "--target", "cpu-x86", "--profile", "int8", "-o", str(tmp_path / "dist"), cache=tmp_path / "cache"
    )
    assert result.exit_code == 11, result.output
    assert "error: onnxruntime-genai's builder failed: RuntimeError" in result.output
    assert "size mismatch" in result.output and "ONNX export of" not in result.output  # said once, not re-wrapped
    assert not (tmp_path / "dist").exists()


def test_a_failed_gate_reports_every_check_whichever_failed():
    """Top-1 agreement alone fails: the message still carries the perplexity check and its verdict."""
    from dataclasses import replace

    from lmpack.config.profiles import QualityGate, load_profile
    from lmpack.errors import QualityGateError
    from lmpack.pipeline.step import StepContext
    from lmpack.steps.validate import ValidateParams, ValidateStep

    gate = QualityGate(max_perplexity_increase=0.02, min_top1_agreement=0.9, min_cosine_similarity=0.99)
    ctx = StepContext(profile=replace(load_profile("int8"), quality=gate))
    metrics = {"perplexity_increase": -0.01, "top1_agreement": 0.5}
    with pytest.raises(QualityGateError) as caught:
        ValidateStep(ValidateParams()).finish(ctx, None, metrics)
    message = caught.value.message
    assert "perplexity -1.00% (allowed +2.00%): ok" in message
    assert "top-1 agreement 0.500 (needs 0.900): FAILED" in message
    assert metrics["gate"] == "failed"
