"""int4 and int8 variants for NVIDIA targets are GPU graphs: onnxruntime-genai's CUDA build, fp16 activations and
an fp16 KV cache (onnxruntime's CUDA GroupQueryAttention and its fast MatMulNBits paths are fp16-only), not the
CPU graphs with fp32 activations. onnxruntime's CPU provider runs those fp16 graphs too, which is what lets their
build, gate and greedy answers be checked here; how fast and how close they run on a GPU is for the marked
tests at the end (skipped without one).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from lmpack import api
from lmpack.runtime.engine import load_engine
from lmpack.runtime.sampling import SamplingParams
from lmpack.runtime.select import prepare_variant

FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16


@pytest.fixture(scope="module")
def a100_int4(llama_variant_gpu_graph):
    return llama_variant_gpu_graph


def _types(variant_dir):
    model = onnx.load(str(variant_dir / "model" / "model.onnx"), load_external_data=False)
    inputs = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    outputs = {o.name: o.type.tensor_type.elem_type for o in model.graph.output}
    return model, inputs, outputs


def test_an_int4_build_for_an_nvidia_target_is_an_fp16_cuda_graph(a100_int4, llama_variant):
    """The target decides: the same int4 profile makes an fp32 graph for cpu-x86."""
    model, inputs, outputs = _types(a100_int4)
    assert inputs["past_key_values.0.key"] == FLOAT16 and outputs["logits"] == FLOAT16
    assert {n.op_type for n in model.graph.node} >= {"GroupQueryAttention", "MatMulNBits"}
    scales = {i.name: i.data_type for i in model.graph.initializer if i.name.endswith("scales")}
    assert scales and set(scales.values()) == {FLOAT16}  # the 4-bit matmuls' activations are fp16
    info = json.loads((a100_int4 / "model" / "lmpack-model.json").read_text())
    assert info["graph_device"] == "cuda" and info["kv_padding"] == "right"
    report = json.loads((a100_int4 / "report.json").read_text())
    assert report["fidelity"]["export_parity"]["graph"] == "fp16" and report["quality"]["gate"] == "passed"
    # the same profile for a CPU target stays an fp32 graph
    _, cpu_inputs, _ = _types(llama_variant)
    assert cpu_inputs["past_key_values.0.key"] == FLOAT


def test_a_gpu_host_without_the_cuda_provider_serves_it_on_the_cpu_with_one_warning(a100_int4, caplog):
    """A CPU-only host refuses the variant (it needs a GPU); a GPU host whose onnxruntime lacks the CUDA provider
    (the CPU build installed) falls back to the CPU, saying why. Its batched steps are checked with the CPU
    graphs' in tests/runtime/test_batching.py."""
    import logging

    from lmpack.errors import NoCompatibleVariantError
    from lmpack.runtime.host import GpuFacts, GpuSoftware, HostFacts, probe_host

    here = probe_host()
    if not here.gpus:
        with pytest.raises(NoCompatibleVariantError, match="needs a GPU"):
            prepare_variant(a100_int4)
    gpu_host = HostFacts(
        arch=here.arch,
        isa=here.isa,
        memory_bytes=here.memory_bytes,
        gpus=(GpuFacts(name="NVIDIA A100-SXM4-40GB", compute_capability="8.0", memory_bytes=40 << 30),),
        software=GpuSoftware(onnxruntime_version="1.22.0", providers=("CPUExecutionProvider",)),
    )
    with caplog.at_level(logging.WARNING, logger="lmpack.engines"):
        variant = prepare_variant(a100_int4, host=gpu_host)
    assert variant.providers == ["CPUExecutionProvider"]
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "running on the CPU" in line and "no CUDA execution provider" in line
    engine = load_engine(variant)
    answer = engine.generate(engine.encode_prompt("The railway"), SamplingParams(max_tokens=8, temperature=0.0))
    assert answer.result().completion_tokens == 8


def _cuda_available() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    from lmpack.runtime.host import probe_gpus

    return "CUDAExecutionProvider" in ort.get_available_providers() and bool(probe_gpus()[0])


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_available(), reason="needs an NVIDIA GPU and onnxruntime-gpu's CUDA provider")
@pytest.mark.parametrize("profile", ["fp16", "int4"])
def test_on_a_gpu_the_variant_runs_on_cuda_close_to_the_cpu(profile, tiny_llama, session_cache, tmp_path):
    from lmpack.runtime.sessions import DecoderRunner

    built = api.build(
        str(tiny_llama), target="a100", profile=profile, output_dir=tmp_path, cache_dir=session_cache
    ).variant_dir
    variant = prepare_variant(built)
    assert variant.providers[0] == "CUDAExecutionProvider"
    kv_padding = json.loads((built / "model" / "lmpack-model.json").read_text())["kv_padding"]
    ids = np.arange(5, 37, dtype=np.int64)
    on_gpu = DecoderRunner(variant.onnx_path, providers=variant.providers, kv_padding=kv_padding).logits(ids)
    on_cpu = DecoderRunner(variant.onnx_path, kv_padding=kv_padding).logits(ids)
    assert np.abs(on_gpu - on_cpu).max() < 0.05 * max(1.0, float(np.abs(on_cpu).max()))
    # sequences joining and leaving a batch on the device give the tokens each gives alone
    from lmpack.runtime.sessions import KVCache

    engine = load_engine(variant)
    prompts = [engine.encode_prompt(text) for text in ("The railway", "A station clock at noon", "Steam")]
    alone = []
    for ids in prompts:
        cache, logits, tokens = KVCache(), None, []
        logits = engine.runner.step(ids, cache)
        for _ in range(16):
            tokens.append(int(np.argmax(logits)))
            logits = engine.runner.step([tokens[-1]], cache)
        alone.append(tokens)
    batch, rows, last = engine.runner.new_batch(len(prompts)), [0, 1, 2], []
    for ids in prompts:
        cache = KVCache()
        last.append(int(np.argmax(engine.runner.step(ids, cache))))
        batch.join(cache)
    for step in range(1, 16):
        if step == 8:
            rows = [0, 2]
            batch.keep([0, 2])
        logits = engine.runner.step_batch([alone[r][step - 1] for r in rows], batch)
        assert [int(np.argmax(row)) for row in logits] == [alone[r][step] for r in rows], step
    assert last == [tokens[0] for tokens in alone]


def test_the_fp32_profile_for_an_nvidia_target_keeps_the_fp32_graph(tiny_llama, session_cache, tmp_path):
    built = api.build(str(tiny_llama), target="a100", profile="fp32", output_dir=tmp_path, cache_dir=session_cache)
    _, inputs, outputs = _types(built.variant_dir)
    assert inputs["past_key_values.0.key"] == FLOAT and outputs["logits"] == FLOAT
    assert json.loads((built.variant_dir / "model" / "lmpack-model.json").read_text())["graph_device"] == "cpu"
