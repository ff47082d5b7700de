"""TensorRT engines on the server: matching, the rebuild-or-fallback decision, the rebuild cache, the memory check.

No GPU and no TensorRT here, so the edge is faked and only the edge: a host is a HostFacts value (what
host.probe_host would record: NVML's GPU and driver, onnxruntime's version and providers, TensorRT's
version), written by hand in the shapes those libraries report; the engine build (onnxruntime's
TensorRT provider) is a stand-in that writes the files the provider would. Everything between (the
decision, the cache, the selection, the CLI) is the real code.
"""

from __future__ import annotations

import json
import logging
import shutil
import types
from dataclasses import replace
from pathlib import Path

import pytest
from fake_nvml import fake_nvml

from lmpack import api
from lmpack.errors import GpuMemoryError, StepError
from lmpack.runtime.host import GpuFacts, GpuSoftware, HostFacts, decode_tensorrt_version
from lmpack.runtime.select import explain, prepare_variant
from lmpack.runtime.trt_cache import (
    CACHE_FACTS,
    apply_plan,
    cache_key,
    cache_root,
    check_gpu_memory,
    entry_dir,
    verify_entry,
)
from lmpack.runtime.trt_plan import (
    CACHED,
    CPU,
    CUDA,
    ENGINE,
    REBUILD,
    REFUSE,
    EngineFacts,
    EnginePolicy,
    decide,
    engine_mismatches,
    version_tuple,
)
from lmpack.runtime.variant import load_variant

GIB = 1 << 30
X86 = frozenset({"avx2", "fma", "sse4_2"})
TRT, CUDA_EP, CPU_EP = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"

# What the tensorrt step records on an A100 build host (lmpack-model.json, `tensorrt`).
A100_ENGINE = EngineFacts(
    gpu_name="NVIDIA A100-SXM4-40GB",
    compute_capability="8.0",
    driver_version="550.54.15",
    cuda_driver_version="12.4",
    cuda_version="12.2",
    onnxruntime_version="1.20.1",
    tensorrt_version="10.4.0",
    precision="fp16",
    profile_shapes={  # as steps/tensorrt.profile_shapes writes them (past_key_values left out)
        "trt_profile_min_shapes": "input_ids:1x1,position_ids:1x1,attention_mask:1x1",
        "trt_profile_opt_shapes": "input_ids:1x1,position_ids:1x1,attention_mask:1x128",
        "trt_profile_max_shapes": "input_ids:4x256,position_ids:4x256,attention_mask:4x256",
    },
)
GPU_STACK = GpuSoftware(
    driver_version="550.54.15",
    cuda_driver_version="12.4",
    onnxruntime_version="1.20.1",
    onnxruntime_cuda_version="12.2",
    tensorrt_version="10.4.0",
    providers=(TRT, CUDA_EP, CPU_EP),
)


def gpu_host(name="NVIDIA A100-SXM4-40GB", cc="8.0", memory=40 * GIB, free=38 * GIB, **software) -> HostFacts:
    return HostFacts(
        arch="x86_64",
        isa=X86,
        memory_bytes=64 * GIB,
        gpus=(GpuFacts(name=name, compute_capability=cc, memory_bytes=memory, free_memory_bytes=free),),
        software=replace(GPU_STACK, **software),
    )


CPU_ONLY = HostFacts(
    arch="x86_64",
    isa=X86,
    memory_bytes=16 * GIB,
    gpu_note="nvidia-ml-py is not installed",
    software=GpuSoftware(onnxruntime_version="1.20.1", providers=(CPU_EP,)),
)


# --- matching --------------------------------------------------------------------------------------------


def test_the_build_host_itself_matches():
    assert engine_mismatches(A100_ENGINE, gpu_host()) == []
    plan = decide(A100_ENGINE, gpu_host(), has_onnx=True)
    assert plan.mode == ENGINE and plan.providers == (TRT, CUDA_EP, CPU_EP) and not plan.fallback


def test_another_compute_capability_is_named():
    (line,) = engine_mismatches(A100_ENGINE, gpu_host(name="NVIDIA L4", cc="8.9"))
    assert line == (
        "the engine was built for NVIDIA A100-SXM4-40GB (compute capability 8.0), this host's GPU is "
        "NVIDIA L4 (compute capability 8.9)"
    )


def test_the_same_compute_capability_on_another_gpu_model_is_a_mismatch_unless_hardware_compatible():
    (line,) = engine_mismatches(A100_ENGINE, gpu_host(name="NVIDIA A30", cc="8.0"))
    assert "this host's GPU is NVIDIA A30: same compute capability" in line
    portable = replace(A100_ENGINE, hardware_compatibility="ampere_plus")
    assert engine_mismatches(portable, gpu_host(name="NVIDIA A30", cc="8.0")) == []
    assert engine_mismatches(portable, gpu_host(name="NVIDIA H100 80GB HBM3", cc="9.0")) == []
    (turing,) = engine_mismatches(portable, gpu_host(name="Tesla T4", cc="7.5"))
    assert "Ampere and later" in turing and "Tesla T4 (compute capability 7.5)" in turing


def test_a_hardware_compatible_engine_is_loaded_with_the_option_that_lets_the_provider_accept_it():
    from lmpack.runtime.trt_cache import engine_providers

    plan = decide(A100_ENGINE, gpu_host(), has_onnx=True)
    assert engine_providers(plan, A100_ENGINE) == [TRT, CUDA_EP, CPU_EP]
    portable = replace(A100_ENGINE, hardware_compatibility="ampere_plus")
    plan = decide(portable, gpu_host(name="NVIDIA A30", cc="8.0"), has_onnx=True)
    assert plan.mode == ENGINE
    assert engine_providers(plan, portable) == [(TRT, {"trt_engine_hw_compatible": True}), CUDA_EP, CPU_EP]


def test_sessions_take_providers_with_options_and_skip_the_unavailable(llama_variant):
    from lmpack.runtime.sessions import create_session

    onnx_path = load_variant(llama_variant).onnx_path
    session = create_session(onnx_path, providers=[(TRT, {"trt_engine_hw_compatible": True}), CUDA_EP])
    assert session.get_providers() == ["CPUExecutionProvider"]  # neither GPU provider exists here


def test_tensorrt_and_onnxruntime_versions_must_match_unless_version_compatible():
    lines = engine_mismatches(A100_ENGINE, gpu_host(tensorrt_version="10.3.0", onnxruntime_version="1.21.0"))
    assert lines == [
        "the engine was built with TensorRT 10.4.0, this host has 10.3.0 (an engine runs only on the "
        "version that built it unless it was built version-compatible)",
        "the engine was built with onnxruntime 1.20.1, this host has 1.21.0 (an engine runs only on the "
        "version that built it unless it was built version-compatible)",
    ]
    assert engine_mismatches(A100_ENGINE, gpu_host(tensorrt_version="10.4.0.26")) == []  # build numbers aside
    compatible = replace(A100_ENGINE, version_compatible=True)
    assert engine_mismatches(compatible, gpu_host(tensorrt_version="10.7.0", onnxruntime_version="1.22.0")) == []
    (older,) = engine_mismatches(compatible, gpu_host(tensorrt_version="10.3.0"))
    assert "version-compatible: runs on that version or later), this host has the older 10.3.0" in older
    before_86 = replace(compatible, tensorrt_version="8.5.3")  # TensorRT 8.5 could not build version-compatible
    assert any("TensorRT 8.5.3, this host has 10.4.0" in line for line in engine_mismatches(before_86, gpu_host()))


def test_an_unrecorded_version_and_a_missing_provider_are_mismatches():
    lines = engine_mismatches(replace(A100_ENGINE, tensorrt_version=None), gpu_host(providers=(CUDA_EP, CPU_EP)))
    assert lines[0].startswith(
        "this host's onnxruntime has no TensorRT execution provider (providers: "
        "CUDAExecutionProvider, CPUExecutionProvider)"
    )
    assert "does not record its TensorRT version" in lines[1]
    assert (
        "needs TensorRT 10.4.0, and this host has none"
        in engine_mismatches(A100_ENGINE, gpu_host(tensorrt_version=None))[0]
    )


def test_a_driver_older_than_the_engines_cuda_is_named():
    (line,) = engine_mismatches(
        replace(A100_ENGINE, cuda_version="12.2"), gpu_host(driver_version="470.82.01", cuda_driver_version="11.4")
    )
    assert line == (
        "the engine's runtime was built for CUDA 12.2; the driver 470.82.01 supports CUDA up to 11.4: "
        "too old, update the NVIDIA driver"
    )
    # CUDA's minor version compatibility: a driver for 12.0 runs code built for 12.2
    assert engine_mismatches(A100_ENGINE, gpu_host(cuda_driver_version="12.0")) == []


def test_no_gpu_is_one_line():
    assert engine_mismatches(A100_ENGINE, CPU_ONLY) == [
        "the engine needs an NVIDIA GPU; none here (nvidia-ml-py is not installed)"
    ]


def test_versions_and_tensorrt_numbers_are_read_like_the_libraries_write_them():
    assert version_tuple("1.20.1+cu124") == (1, 20, 1) and version_tuple("10.4") == (10, 4, 0)
    assert version_tuple(None) is None and version_tuple("unknown") is None
    assert decode_tensorrt_version(100400) == "10.4.0" and decode_tensorrt_version(8601) == "8.6.1"


# --- the decision ----------------------------------------------------------------------------------------

L4 = gpu_host(name="NVIDIA L4", cc="8.9", memory=24 * GIB)


def test_a_mismatch_with_tensorrt_here_rebuilds_once_then_uses_the_cache():
    plan = decide(A100_ENGINE, L4, has_onnx=True)
    assert plan.mode == REBUILD and plan.providers[0] == TRT and plan.uses_engine and not plan.fallback
    assert "compute capability 8.9" in plan.mismatches[0] and "once" in plan.notes[0]
    assert decide(A100_ENGINE, L4, has_onnx=True, cached=True).mode == CACHED


def test_without_rebuild_the_cuda_provider_then_the_cpu_take_over_with_a_warning():
    off = decide(A100_ENGINE, L4, has_onnx=True, policy=EnginePolicy(rebuild=False))
    assert off.mode == CUDA and off.providers == (CUDA_EP, CPU_EP) and off.fallback and off.uses_gpu
    assert "falling back to the CUDA execution provider" in off.notes[0] and "turned off" in off.notes[0]
    no_trt = decide(A100_ENGINE, gpu_host(providers=(CUDA_EP, CPU_EP), tensorrt_version=None), has_onnx=True)
    assert no_trt.mode == CUDA and "no TensorRT for onnxruntime to build with" in no_trt.notes[0]
    cpu_ort = decide(A100_ENGINE, gpu_host(providers=(CPU_EP,), tensorrt_version=None), has_onnx=True)
    assert cpu_ort.mode == CPU and cpu_ort.providers == (CPU_EP,) and not cpu_ort.uses_gpu
    assert "no CUDA execution provider" in cpu_ort.notes[0] and "much slower" in cpu_ort.notes[0]
    assert decide(A100_ENGINE, CPU_ONLY, has_onnx=True).mode == CPU


def test_a_driver_too_old_for_onnxruntime_gpu_means_cpu():
    host = gpu_host(name="NVIDIA L4", cc="8.9", driver_version="470.82.01", cuda_driver_version="11.4")
    plan = decide(A100_ENGINE, host, has_onnx=True)
    assert plan.mode == CPU and "onnxruntime-gpu here was built for CUDA 12.2" in plan.notes[0]


def test_strict_refuses_every_fallback_but_not_a_rebuild():
    strict = EnginePolicy(strict=True)
    assert decide(A100_ENGINE, L4, has_onnx=True, policy=strict).mode == REBUILD
    for host, policy in ((L4, EnginePolicy(strict=True, rebuild=False)), (CPU_ONLY, strict)):
        plan = decide(A100_ENGINE, host, has_onnx=True, policy=policy)
        assert plan.mode == REFUSE and plan.providers == ()
        assert plan.notes[0].startswith("strict mode: the shipped TensorRT engine does not fit this host (")
        assert "not falling back to the CUDA provider or the CPU" in plan.notes[0]


def test_without_the_onnx_there_is_nothing_to_rebuild_or_fall_back_to():
    plan = decide(A100_ENGINE, L4, has_onnx=False)
    assert plan.mode == REFUSE and "carries no ONNX model" in plan.notes[0]


def test_a_gpu_too_small_for_the_variant_is_a_mismatch_and_leaves_the_cpu():
    plan = decide(A100_ENGINE, gpu_host(memory=4 * GIB), has_onnx=True, need_bytes=6 * GIB)
    assert plan.mode == CPU
    assert (
        "the variant needs 6.0 GiB of GPU memory, NVIDIA A100-SXM4-40GB (compute capability 8.0) has 4.0 GiB"
        in plan.mismatches
    )


# --- facts from files ------------------------------------------------------------------------------------


def test_engine_facts_are_parsed_strictly():
    assert EngineFacts.from_info({"task": "text-generation"}) is None
    facts = EngineFacts.from_info({"tensorrt": {**A100_ENGINE.to_dict(), "profile_shapes": A100_ENGINE.profile_shapes}})
    assert facts == A100_ENGINE
    from lmpack.errors import VariantError

    for bad in (
        {"tensorrt": []},
        {"tensorrt": {"tensorrt_version": 10}},
        {"tensorrt": {"engine_model": "../../x.onnx"}},
        {"tensorrt": {"version_compatible": "yes"}},
    ):
        with pytest.raises(VariantError):
            EngineFacts.from_info(bad)


def make_engine_variant(
    llama_variant: Path, destination: Path, facts: EngineFacts = A100_ENGINE, *, onnx: bool = True
) -> Path:
    """The tiny Llama dressed as an a100 fp16-trt build: engine facts, model_ctx.onnx and an engine file.

    Its model.onnx is the int8 CPU export, which is what lets the CPU fallback really answer here."""
    shutil.copytree(llama_variant, destination)
    meta = json.loads((destination / "variant.json").read_text())
    meta.update(
        target=api.target("a100").to_dict(),
        profile="fp16-trt",
        precision="fp16",
        execution_providers=[TRT, CUDA_EP, CPU_EP],
    )
    (destination / "variant.json").write_text(json.dumps(meta))
    model = destination / "model"
    info = json.loads((model / "lmpack-model.json").read_text())
    info["tensorrt"] = {**facts.to_dict(), "profile_shapes": facts.profile_shapes, "sparse_weights": False}
    (model / "lmpack-model.json").write_text(json.dumps(info))
    (model / "model_ctx.onnx").write_bytes(b"EP context model")
    (model / "engines").mkdir()
    (model / "engines" / "TensorrtExecutionProvider_TRTKernel_graph_main_0_0_sm80.engine").write_bytes(b"engine")
    if not onnx:
        (model / "model.onnx").unlink()
    return destination


@pytest.fixture
def engine_variant(llama_variant, tmp_path) -> Path:
    return make_engine_variant(llama_variant, tmp_path / "dist" / "tiny-a100-fp16-trt")


def test_selection_reads_the_engine_and_ranks_a_cpu_fallback_after_cpu_builds(engine_variant, llama_variant):
    (verdict,) = explain(engine_variant, gpu_host()).verdicts
    assert verdict.ok and verdict.plan.mode == ENGINE and verdict.engine == A100_ENGINE and verdict.uses_gpu
    (verdict,) = explain(engine_variant, L4).verdicts
    assert verdict.plan.mode == REBUILD
    assert (
        verdict.cache
        == engine_variant.parent
        / ".engines"
        / engine_variant.name
        / engine_variant.name
        / "nvidia-l4-sm89-trt10.4.0-ort1.20.1"
    )
    (verdict,) = explain(engine_variant, CPU_ONLY, EnginePolicy(strict=True)).verdicts
    assert not verdict.ok and "strict mode" in verdict.reasons[0]
    # A bundle-like choice: the int8 CPU build beats the engine variant's CPU fallback on a CPU host,
    # but the engine variant (rebuilt) beats the CPU build on a GPU host.
    from lmpack.bundle.variant_dir import variant_entry
    from lmpack.runtime.select import Candidate, rank

    both = [Candidate(name=p.name, path=p, entry=variant_entry(p)) for p in (engine_variant, llama_variant)]
    assert rank("bundle", engine_variant.parent, both, CPU_ONLY).chosen.candidate.path == llama_variant
    assert rank("bundle", engine_variant.parent, both, L4).chosen.candidate.path == engine_variant


def test_a_variant_without_its_onnx_is_refused_when_the_engine_does_not_fit(llama_variant, tmp_path):
    bare = make_engine_variant(llama_variant, tmp_path / "bare", onnx=False)
    (verdict,) = explain(bare, CPU_ONLY).verdicts
    assert not verdict.ok and "no ONNX model to rebuild from or fall back to" in verdict.reasons[0]


# --- carrying the plan out -------------------------------------------------------------------------------


class FakeBuild:
    """onnxruntime's TensorRT provider as far as the files go: it writes the EP context model and an engine."""

    def __init__(self, fail: bool = False):
        self.calls: list[tuple[Path, dict]] = []
        self.fail = fail

    def __call__(self, model: Path, options: dict) -> None:
        self.calls.append((model, options))
        if self.fail:
            raise StepError("TensorRT engine build failed: [TRT] out of memory")
        context = Path(options["trt_ep_context_file_path"])
        context.write_bytes(b"rebuilt EP context")
        # the provider puts a relative cache path under the context model's folder, and refuses an absolute one
        # at load: tensorrt_execution_provider.cc, onnx_ctx_model_helper.cc
        assert not Path(options["trt_engine_cache_path"]).is_absolute()
        engines = context.parent / options["trt_engine_cache_path"]
        engines.mkdir(parents=True, exist_ok=True)
        (engines / "TensorrtExecutionProvider_TRTKernel_graph_main_0_0_sm89.engine").write_bytes(b"rebuilt engine")


def _prepare(path: Path, host: HostFacts, policy=EnginePolicy(), build=None, free=None):
    (verdict,) = explain(path, host, policy).verdicts
    return apply_plan(
        load_variant(path),
        verdict.engine,
        verdict.plan,
        host,
        need_bytes=verdict.need_gpu_bytes,
        policy=policy,
        entry=verdict.cache,
        build=build or FakeBuild(),
        free_gpu=lambda: free if free is not None else (host.gpus[0] if host.gpus else None),
    )


def test_a_matching_engine_is_served_from_model_ctx_on_tensorrt(engine_variant):
    variant = _prepare(engine_variant, gpu_host())
    assert variant.onnx_path == engine_variant / "model" / "model_ctx.onnx" and variant.providers[0] == TRT
    # the context is capped to the tokens the engine's profile takes (the tiny Llama's config allows more)
    assert load_variant(engine_variant).context_length > 256 and variant.context_length == 256


def test_serve_refuses_a_batch_wider_than_the_engines_profile(engine_variant):
    from lmpack.config.serve import ServeSettings
    from lmpack.errors import ConfigError
    from lmpack.runtime.server import check_engine_bounds
    from lmpack.runtime.trt_plan import beyond_engine, engine_bounds

    assert engine_bounds(A100_ENGINE) == (4, 256)
    variant = _prepare(engine_variant, gpu_host())
    with pytest.raises(ConfigError) as refused:
        check_engine_bounds(variant, ServeSettings(max_concurrency=16))  # serve's default max_batch is 8
    assert "takes at most 4 sequences in one run, and serve would batch 8" in refused.value.message
    assert "max_batch = 4" in refused.value.message
    check_engine_bounds(variant, ServeSettings(max_batch=4, max_concurrency=16))
    check_engine_bounds(variant, ServeSettings(max_concurrency=2))  # a batch never wider than the admitted requests
    assert beyond_engine(replace(A100_ENGINE, profile_shapes={}), batch=64) is None  # nothing recorded to hold to
    fallback = _prepare(engine_variant, CPU_ONLY)
    check_engine_bounds(fallback, ServeSettings(max_batch=64, max_concurrency=64))  # plain ONNX: no profile


def test_the_engine_is_rebuilt_once_cached_beside_the_variant_and_checked(engine_variant, caplog):
    build = FakeBuild()
    with caplog.at_level(logging.INFO, logger="lmpack.engines"):
        variant = _prepare(engine_variant, L4, build=build)
    entry = cache_root(engine_variant) / engine_variant.name / cache_key(L4)
    assert variant.onnx_path == entry / "model_ctx.onnx" and variant.providers == [TRT, CUDA_EP, CPU_EP]
    ((model, options),) = build.calls
    assert model == engine_variant / "model" / "model.onnx"
    assert options["trt_profile_max_shapes"] == A100_ENGINE.profile_shapes["trt_profile_max_shapes"]
    assert "trt_fp16_enable" not in options  # the graph's own types make the engine's precision
    assert options["trt_engine_cache_path"] == "engines"  # relative: the staging folder is renamed after the build
    assert options["trt_max_workspace_size"] == 8 * GIB and options["trt_ep_context_embed_mode"] == 0
    record = json.loads((entry / CACHE_FACTS).read_text())
    assert record["gpu_name"] == "NVIDIA L4" and record["tensorrt_version"] == "10.4.0"
    assert set(record["files"]) == {
        "model_ctx.onnx",
        "engines/TensorrtExecutionProvider_TRTKernel_graph_main_0_0_sm89.engine",
    }
    assert "compute capability 8.9" in caplog.text and "rebuilding the TensorRT engine" in caplog.text
    assert not [p for p in entry.parent.iterdir() if p.name.startswith(".")]  # no staging left
    # The next start finds it and builds nothing.
    again = FakeBuild()
    assert _prepare(engine_variant, L4, build=again).onnx_path == entry / "model_ctx.onnx" and not again.calls
    # A damaged entry is discarded and rebuilt, never loaded.
    (entry / "model_ctx.onnx").write_bytes(b"tampered")
    assert verify_entry(entry) == ["model_ctx.onnx does not match its recorded sha256"]
    third = FakeBuild()
    _prepare(engine_variant, L4, build=third)
    assert len(third.calls) == 1 and verify_entry(entry) == []


def test_a_failed_rebuild_falls_back_to_cuda_or_fails_under_strict(engine_variant, caplog):
    with caplog.at_level(logging.WARNING, logger="lmpack.engines"):
        variant = _prepare(engine_variant, L4, build=FakeBuild(fail=True))
    assert variant.onnx_path.name == "model.onnx" and variant.providers == [CUDA_EP, CPU_EP]
    assert "rebuilding the TensorRT engine failed" in caplog.text and "falling back to the CUDA" in caplog.text
    assert not entry_dir(cache_root(engine_variant), engine_variant.name, L4).exists()
    with pytest.raises(StepError, match="strict mode does not fall back"):
        _prepare(engine_variant, L4, EnginePolicy(strict=True), build=FakeBuild(fail=True))


def test_too_little_free_gpu_memory_refuses_before_any_gpu_work(engine_variant):
    build = FakeBuild()
    short = GpuFacts(name="NVIDIA L4", compute_capability="8.9", memory_bytes=24 * GIB, free_memory_bytes=GIB // 4)
    with pytest.raises(GpuMemoryError) as caught:
        _prepare(engine_variant, L4, build=build, free=short)
    message = caught.value.message
    assert (
        "needs" in message
        and "GiB of GPU memory" in message
        and "has 0.2 GiB free (268435456 bytes) of 24.0 GiB" in message
        and caught.value.exit_code == 20
    )
    assert not build.calls


def test_the_memory_check_names_the_numbers_and_skips_what_it_cannot_know(caplog):
    gpu = GpuFacts(name="NVIDIA A100", compute_capability="8.0", memory_bytes=40 * GIB, free_memory_bytes=3 * GIB)
    with pytest.raises(
        GpuMemoryError,
        match=r"needs 6.0 GiB of GPU memory \(6442450944 bytes\), and NVIDIA A100 "
        r"\(GPU 0\) has 3.0 GiB free \(3221225472 bytes\) of 40.0 GiB",
    ):
        check_gpu_memory(6 * GIB, gpu, variant="v")
    check_gpu_memory(2 * GIB, gpu, variant="v")
    with caplog.at_level(logging.WARNING, logger="lmpack.engines"):
        check_gpu_memory(6 * GIB, replace(gpu, free_memory_bytes=None), variant="v")
    assert "did not report free memory" in caplog.text


def test_the_cpu_fallback_really_answers(engine_variant, monkeypatch, caplog):
    """End to end on this machine: engine does not fit, no GPU, so model.onnx on the CPU, with the warning."""
    monkeypatch.setattr("lmpack.runtime.host.probe_host", lambda: CPU_ONLY)
    with caplog.at_level(logging.WARNING, logger="lmpack.engines"):
        result = api.generate(engine_variant, "The railway", max_tokens=4)
    assert result.completion_tokens >= 1
    assert "falling back to the CPU" in caplog.text
    variant = prepare_variant(engine_variant, host=CPU_ONLY)
    assert variant.providers == [CPU_EP] and variant.onnx_path.name == "model.onnx"


# --- the host probe --------------------------------------------------------------------------------------


def test_nvml_driver_and_free_memory_are_read(monkeypatch):
    """A stand-in pynvml answering as nvidia-ml-py does (bytes names on old versions, ints for CUDA)."""
    from lmpack.runtime.host import probe_driver, probe_gpus

    fake = fake_nvml(
        nvmlDeviceGetCudaComputeCapability=lambda h: (8, 9),
        nvmlDeviceGetName=lambda h: "NVIDIA L4",
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(total=24 * GIB, free=20 * GIB, used=4 * GIB),
    )
    monkeypatch.setitem(__import__("sys").modules, "pynvml", fake)
    (gpu,), _ = probe_gpus()
    assert gpu.free_memory_bytes == 20 * GIB and gpu.memory_bytes == 24 * GIB
    assert probe_driver() == ("550.54.15", "12.4")


def test_this_hosts_onnxruntime_is_probed_for_real():
    from lmpack.runtime.host import probe_software

    software = probe_software()
    import onnxruntime

    assert software.onnxruntime_version == onnxruntime.__version__ and CPU_EP in software.providers


# --- the CLI ---------------------------------------------------------------------------------------------


def test_doctor_shows_the_engine_its_mismatches_and_the_plan(engine_variant, lmpack_cli, monkeypatch):
    monkeypatch.setattr("lmpack.runtime.host.probe_host", lambda: L4)
    result = lmpack_cli("doctor", engine_variant)
    assert result.exit_code == 0, result.output
    assert "engine: built for NVIDIA A100-SXM4-40GB 8.0, TensorRT 10.4.0, onnxruntime 1.20.1" in result.stdout
    assert "mismatch: the engine was built for NVIDIA A100-SXM4-40GB (compute capability 8.0)" in result.stdout
    assert "plan:   rebuild the engine here once, then TensorRT (cache " in result.stdout
    assert "runtime: onnxruntime 1.20.1 (TensorrtExecutionProvider, CUDAExecutionProvider" in result.stdout
    result = lmpack_cli("doctor", engine_variant, "--no-engine-rebuild", "--json")
    engine = json.loads(result.stdout)["variants"][0]["engine"]
    assert engine["plan"]["mode"] == "cuda" and engine["tensorrt_version"] == "10.4.0"
    assert json.loads(result.stdout)["host"]["software"]["tensorrt_version"] == "10.4.0"
    monkeypatch.setattr("lmpack.runtime.host.probe_host", lambda: CPU_ONLY)
    result = lmpack_cli("doctor", engine_variant, "--strict")
    assert result.exit_code == 17 and "strict mode" in result.stdout


def test_serve_strict_refuses_a_fallback_with_exit_17(engine_variant, lmpack_cli, monkeypatch, tmp_path):
    monkeypatch.setattr("lmpack.runtime.host.probe_host", lambda: CPU_ONLY)
    result = lmpack_cli("serve", engine_variant, "--strict", "--port", "0")
    assert result.exit_code == 17, result.output
    assert "strict mode: the shipped TensorRT engine does not fit this host" in result.stderr
    config = tmp_path / "serve.toml"
    config.write_text("schema_version = 1\nstrict = true\nengine_rebuild = false\nengine_cache_dir = 'engines'\n")
    from lmpack.config.serve import resolve_serve_settings

    settings = resolve_serve_settings(config, {})
    assert settings.strict and not settings.engine_rebuild and settings.engine_cache_dir == tmp_path / "engines"
    assert not resolve_serve_settings(config, {"strict": False}).strict
    result = lmpack_cli("serve", engine_variant, "--config", config, "--port", "0")
    assert result.exit_code == 17 and "rebuilding engines on this host is turned off" in result.stderr


def test_an_override_cache_dir_holds_the_rebuilt_engine(engine_variant, tmp_path):
    (verdict,) = explain(engine_variant, L4, EnginePolicy(), tmp_path / "cache").verdicts
    assert verdict.cache == tmp_path / "cache" / engine_variant.name / engine_variant.name / cache_key(L4)


# --- on a real GPU (skipped here: never ran on the machines this was written on) --------------------------


def _real_gpu() -> GpuFacts | None:
    from lmpack.runtime.host import probe_gpus

    gpus, _ = probe_gpus()
    return gpus[0] if gpus else None


def _real_tensorrt() -> bool:
    from lmpack.runtime.host import probe_software

    software = probe_software()
    return _real_gpu() is not None and TRT in software.providers and software.tensorrt_version is not None


@pytest.mark.gpu
@pytest.mark.skipif(_real_gpu() is None, reason="needs an NVIDIA GPU and nvidia-ml-py")
def test_nvml_reads_this_gpu_its_driver_and_free_memory():
    from lmpack.runtime.host import probe_host

    host = probe_host()
    gpu = host.gpus[0]
    assert 0 < gpu.free_memory_bytes <= gpu.memory_bytes and "." in gpu.compute_capability
    assert host.software.driver_version and host.software.cuda_driver_version
    check_gpu_memory(min(gpu.free_memory_bytes, GIB // 2), gpu, variant="small")
    with pytest.raises(GpuMemoryError):
        check_gpu_memory(gpu.memory_bytes + 1, gpu, variant="too-big")


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.skipif(not _real_tensorrt(), reason="needs an NVIDIA GPU, onnxruntime's TensorRT provider and TensorRT")
def test_an_engine_from_another_gpu_is_rebuilt_here_once_and_answers(tiny_llama, session_cache, tmp_path):
    from lmpack.runtime.engine import load_engine
    from lmpack.runtime.sampling import SamplingParams

    built = api.build(
        str(tiny_llama), target="a100", profile="fp16-trt", output_dir=tmp_path / "dist", cache_dir=session_cache
    ).variant_dir
    info_path = built / "model" / "lmpack-model.json"
    info = json.loads(info_path.read_text())
    info["tensorrt"].update(gpu_name="Tesla T4", compute_capability="7.5")  # as if shipped from a T4 build host
    info_path.write_text(json.dumps(info))
    variant = prepare_variant(built)
    assert variant.onnx_path.name == "model_ctx.onnx" and ".engines" in variant.onnx_path.parts
    engine = load_engine(variant)
    ids = engine.encode_prompt("The railway")
    assert engine.generate(ids, SamplingParams(max_tokens=4)).result().completion_tokens >= 1
    assert prepare_variant(built).onnx_path == variant.onnx_path  # the second start reuses the cache


def test_cuda_libraries_are_preloaded_only_for_a_gpu_variant(engine_variant, monkeypatch):
    """onnxruntime.preload_dlls is the edge (it loads NVIDIA's libraries); count its calls."""
    import onnxruntime

    calls = []
    monkeypatch.setattr(onnxruntime, "preload_dlls", lambda: calls.append("preload"), raising=False)
    prepare_variant(engine_variant, host=CPU_ONLY)
    assert calls == []
    prepare_variant(engine_variant, host=gpu_host(), engine_cache_dir=None)
    assert calls == ["preload"]
