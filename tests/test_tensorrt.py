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


def _profile(tmp_path: Path, precision: str, tensorrt_params: str = "", *, convert: bool = True) -> str:
    """A TensorRT profile; an fp16 one converts the graph first (`convert`), as the engine takes its graph's types."""
    quantize = '[[steps]]\nname = "quantize"\nmethod = "fp16"\n' if precision == "fp16" and convert else ""
    path = tmp_path / "trt.toml"
    path.write_text(
        f'schema_version = 1\nname = "trt"\nprecision = "{precision}"\n'
        f'[[steps]]\nname = "export"\n{quantize}[[steps]]\nname = "tensorrt"\n{tensorrt_params}'
    )
    return str(path)


# The TensorRT provider options onnxruntime's Python binding accepts (onnxruntime_pybind_state.cc, the branch for
# TensorrtExecutionProvider, read at onnxruntime 1.25.0 main, commit 735e69a): any other name makes it raise
# "Invalid TensorRT EP option", which onnxruntime turns into an "EP Error" and a silent fall back to CUDA.
DOCUMENTED_TENSORRT_OPTIONS = frozenset(
    """device_id user_compute_stream trt_max_partition_iterations trt_min_subgraph_size trt_max_workspace_size
    trt_fp16_enable trt_bf16_enable trt_int8_enable trt_int8_calibration_table_name
    trt_int8_use_native_calibration_table trt_dla_enable trt_dla_core trt_dump_subgraphs trt_engine_cache_enable
    trt_engine_cache_path trt_weight_stripped_engine_enable trt_onnx_model_folder_path trt_engine_cache_prefix
    trt_engine_decryption_enable trt_engine_decryption_lib_path trt_force_sequential_engine_build
    trt_context_memory_sharing_enable trt_layer_norm_fp32_fallback trt_timing_cache_enable trt_timing_cache_path
    trt_force_timing_cache trt_detailed_build_log trt_build_heuristics_enable trt_sparsity_enable
    trt_builder_optimization_level trt_auxiliary_streams trt_tactic_sources trt_extra_plugin_lib_paths
    trt_profile_min_shapes trt_profile_max_shapes trt_profile_opt_shapes trt_cuda_graph_enable
    trt_ep_context_embed_mode trt_ep_context_file_path trt_dump_ep_context_model trt_engine_hw_compatible
    trt_op_types_to_exclude trt_preview_features""".split()
)


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


def _shapes(option: str) -> dict[str, list[int]]:
    return {name: [int(d) for d in dims.split("x")] for name, dims in (e.split(":") for e in option.split(","))}


def test_one_decoder_profile_takes_a_whole_prompt_and_a_step_with_a_full_cache():
    """onnxruntime's TensorRT provider runs its engines on their first profile only, so that one profile must
    admit what serve sends: a prompt of many tokens with an empty cache and one token after a full one."""
    shapes = profile_shapes(DECODER, TensorrtParams(max_batch=8, opt_sequence=128, max_sequence=2048))
    low, opt, high = (_shapes(shapes[f"trt_profile_{level}_shapes"]) for level in ("min", "opt", "max"))
    assert set(low) == set(opt) == set(high) and len(low) == 3 + 2 * 2  # and key/value per layer
    for name in low:  # TensorRT refuses a profile where any axis has min > opt or opt > max
        assert all(a <= b <= c for a, b, c in zip(low[name], opt[name], high[name], strict=True)), name
    assert low["input_ids"] == [1, 1] and low["past_key_values.0.key"] == [1, 3, 0, 64]  # first token, empty cache
    assert high["input_ids"] == [8, 2048]  # a whole prompt, for each of serve's 8 rows
    assert high["past_key_values.1.value"] == [8, 3, 2047, 64] and high["attention_mask"] == [8, 2048]
    assert opt["input_ids"] == [1, 1] and opt["attention_mask"] == [1, 128]  # tuned for a decode step


def test_the_default_profile_takes_serves_default_batch():
    from lmpack.config.serve import ServeSettings

    assert TensorrtParams().max_batch == ServeSettings().max_batch


def test_encoder_profile_shapes():
    shapes = profile_shapes({"task": "feature-extraction"}, TensorrtParams(max_batch=8, max_sequence=256))
    assert shapes["trt_profile_max_shapes"] == "input_ids:8x256,attention_mask:8x256,token_type_ids:8x256"
    assert shapes["trt_profile_min_shapes"] == "input_ids:1x1,attention_mask:1x1,token_type_ids:1x1"


def test_every_provider_option_sent_is_one_onnxruntime_takes(tmp_path):
    from lmpack.runtime.trt_build import BUILD_OPTIONS

    target = api.target("a100")
    options = provider_options(target, DECODER, TensorrtParams(), tmp_path)
    assert set(options) == set(BUILD_OPTIONS) and set(BUILD_OPTIONS) <= DOCUMENTED_TENSORRT_OPTIONS
    assert {"trt_engine_hw_compatible"} <= DOCUMENTED_TENSORRT_OPTIONS  # the load-time option (trt_cache.py)
    # values the binding parses: its booleans are "True"/"False", which is what str() of a Python bool gives
    assert all(isinstance(v, (bool, int, str)) for v in options.values())
    assert options["trt_max_workspace_size"] == 8 * (1 << 30) and options["trt_builder_optimization_level"] == 3
    assert options["trt_engine_hw_compatible"] is False
    assert not {"trt_fp16_enable", "trt_bf16_enable", "trt_int8_enable"} & set(options)  # the graph's own types


def test_the_engine_cache_path_is_relative_so_the_ep_context_model_loads_anywhere(tmp_path):
    """onnxruntime writes trt_engine_cache_path into the EP context model as given (under the context model's
    folder) and refuses to load an absolute path or one with "..": the variant must be movable."""
    options = provider_options(api.target("a100"), DECODER, TensorrtParams(), tmp_path / "out")
    cache = Path(options["trt_engine_cache_path"])
    assert not cache.is_absolute() and ".." not in cache.parts
    assert Path(options["trt_ep_context_file_path"]).parent == tmp_path / "out"


@pytest.mark.parametrize(
    "precision,convert,message",
    [("fp16", False, "an fp16 engine needs an fp16 graph"), ("bf16", True, "not 'bf16'"), ("int8", True, "not 'int8'")],
)
def test_an_engine_precision_without_a_graph_of_that_type_is_refused(tmp_path, precision, convert, message):
    with pytest.raises(PlanError, match=message):
        api.plan(target="a100", profile=_profile(tmp_path, precision, convert=convert))
    assert api.plan(target="a100", profile=_profile(tmp_path, "fp16")).step("tensorrt")
    assert api.plan(target="a100", profile="fp16-trt").step("tensorrt")


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
def test_an_engine_builds_records_its_facts_and_answers_after_its_variant_moves(tiny_llama, session_cache, tmp_path):
    """On a GPU with TensorRT: the engine is fp16 as its graph is, and the variant still loads after a move (the
    engine path in model_ctx.onnx is relative), takes an 8-token prompt and 32 decode steps in one profile."""
    import shutil

    import numpy as np

    from lmpack.runtime.select import prepare_variant
    from lmpack.runtime.sessions import DecoderRunner, KVCache

    result = api.build(str(tiny_llama), target="a100", profile="fp16-trt", output_dir=tmp_path, cache_dir=session_cache)
    info = json.loads((result.variant_dir / "model" / "lmpack-model.json").read_text())
    assert info["tensorrt"]["compute_capability"] and info["tensorrt"]["precision"] == "fp16"
    moved = tmp_path / "elsewhere" / result.variant_dir.name
    shutil.move(str(result.variant_dir), moved)
    variant = prepare_variant(moved)
    assert variant.onnx_path == moved / "model" / "model_ctx.onnx"
    runner = DecoderRunner(variant.onnx_path, providers=variant.providers, kv_padding=info["kv_padding"])
    assert runner.session.get_providers()[0] == "TensorrtExecutionProvider"
    cache = KVCache()
    logits = runner.step(list(range(5, 13)), cache)
    for _ in range(32):
        logits = runner.step([int(np.argmax(logits))], cache)
    assert cache.length == 8 + 32 and np.isfinite(logits).all()
