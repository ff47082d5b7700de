"""TensorRT step: plan checks, optimization-profile shapes and provider options, and the honest failure without a GPU.

Building a real engine needs an NVIDIA GPU and onnxruntime's TensorRT provider: that test is marked and
skipped where they are absent (every CI machine of this project).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from lmpack import api
from lmpack.cli.main import cli
from lmpack.errors import PlanError
from lmpack.steps.tensorrt import TensorrtParams, gpu_facts, profile_shapes, provider_options

DECODER = {"task": "text-generation", "num_layers": 2, "num_kv_heads": 3, "head_dim": 64}


def _profile(tmp_path: Path, precision: str, tensorrt_params: str = "") -> str:
    path = tmp_path / "trt.toml"
    path.write_text(
        f'schema_version = 1\nname = "trt"\nprecision = "{precision}"\n'
        f'[[steps]]\nname = "export"\n[[steps]]\nname = "tensorrt"\n{tensorrt_params}'
    )
    return str(path)


def test_tensorrt_on_a_cpu_target_is_refused(tmp_path):
    with pytest.raises(PlanError) as error:
        api.plan(target="cpu-x86", profile=_profile(tmp_path, "fp32"))
    assert "tensorrt" in error.value.message and "no GPU" in error.value.message


def test_sparse_weights_need_sparse_kernels(tmp_path):
    profile = _profile(tmp_path, "fp16", "sparse_weights = true\n")
    assert api.plan(target="a100", profile=profile).step("tensorrt").params.sparse_weights
    with pytest.raises(PlanError, match="2:4"):
        api.plan(target="t4", profile=profile)


def test_bad_shape_ranges_are_config_errors(tmp_path):
    result = CliRunner().invoke(
        cli, ["profiles", "show", _profile(tmp_path, "fp16", "min_batch = 4\nmax_batch = 2\n"), "--target", "a100"]
    )
    assert result.exit_code == 3 and "max_batch" in result.output


def test_decoder_profile_shapes_cover_prefill_and_decode():
    shapes = profile_shapes(DECODER, TensorrtParams(max_batch=4, opt_sequence=128, max_sequence=2048))
    minimum = dict(entry.split(":") for entry in shapes["trt_profile_min_shapes"].split(","))
    maximum = dict(entry.split(":") for entry in shapes["trt_profile_max_shapes"].split(","))
    assert len(minimum) == 3 + 2 * 2  # input_ids, position_ids, attention_mask, and key/value per layer
    assert minimum["past_key_values.0.key"] == "1x3x0x64"  # prefill starts with an empty cache
    assert maximum["past_key_values.1.value"] == "4x3x2047x64"
    assert maximum["attention_mask"] == "4x2048" and maximum["input_ids"] == "4x1"


def test_encoder_profile_shapes():
    shapes = profile_shapes({"task": "feature-extraction"}, TensorrtParams(max_batch=8, max_sequence=256))
    assert shapes["trt_profile_max_shapes"] == "input_ids:8x256,attention_mask:8x256,token_type_ids:8x256"


@pytest.mark.parametrize("precision,flag", [("fp16", "trt_fp16_enable"), ("bf16", "trt_bf16_enable")])
def test_provider_options_follow_target_and_precision(tmp_path, precision, flag):
    target = api.target("a100")
    options = provider_options(target, precision, DECODER, TensorrtParams(), tmp_path)
    assert options[flag] is True
    assert options["trt_max_workspace_size"] == 8 * (1 << 30)
    assert options["trt_builder_optimization_level"] == 3
    assert options["trt_dump_ep_context_model"] and options["trt_ep_context_compute_capability_enable"]
    assert options["trt_engine_hw_compatible"] is False


@pytest.mark.skipif(gpu_facts() is not None, reason="this machine has an NVIDIA GPU")
def test_without_a_gpu_the_build_fails_clearly_and_writes_nothing(tiny_llama, session_cache, tmp_path):
    out = tmp_path / "dist"
    result = CliRunner().invoke(
        cli,
        [
            "build",
            str(tiny_llama),
            "--target",
            "a100",
            "--profile",
            "fp16-trt",
            "-o",
            str(out),
            "--cache-dir",
            str(session_cache),
            "--json",
        ],
    )
    assert result.exit_code == 11
    assert "needs an NVIDIA GPU" in json.loads(result.stdout)["error"]["message"]
    assert not out.exists()


def _has_tensorrt_provider() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "TensorrtExecutionProvider" in ort.get_available_providers() and gpu_facts() is not None


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.skipif(not _has_tensorrt_provider(), reason="needs an NVIDIA GPU and onnxruntime's TensorRT provider")
def test_engine_build_records_its_facts(tiny_llama, session_cache, tmp_path):
    result = api.build(str(tiny_llama), target="a100", profile="fp16-trt", output_dir=tmp_path, cache_dir=session_cache)
    info = json.loads((result.variant_dir / "model" / "lmpack-model.json").read_text())
    assert info["tensorrt"]["compute_capability"] and (result.variant_dir / "model" / "model_ctx.onnx").is_file()
