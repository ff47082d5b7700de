"""Carry out an engine plan (lmpack/runtime/trt_plan.py) before loading: the host's rebuilt-engine cache, the
rebuild itself, and the free-GPU-memory check.

Rebuilt engines live beside the release, never inside it (a file the manifest does not list would fail
`lmpack verify`): PREFIX/releases/NAME/.engines/VERSION/VARIANT/KEY for an installed release, and
DIR/.engines/BUNDLE/VARIANT/KEY beside an unpacked bundle or variant directory. KEY names the host's GPU
model, compute capability, TensorRT and onnxruntime versions, so a GPU or library change makes a new
entry instead of loading a stale one. An entry appears complete or not at all (built in a hidden
sibling, renamed last); its engine.json lists every file's sha256, checked before each use, because an
engine is code and this one is not in the signed manifest.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from lmpack.bundle.variant_dir import recorded_model_digest
from lmpack.errors import GpuMemoryError, LmpackError, NoCompatibleVariantError, StepError
from lmpack.fsio import file_sha256, publish_new, remove_path
from lmpack.runtime.host import GpuFacts, HostFacts, probe_gpus
from lmpack.runtime.trt_plan import (
    CACHED,
    CPU,
    CUDA,
    CUDA_EP,
    ENGINE,
    ENGINE_MODEL,
    REBUILD,
    REFUSE,
    TENSORRT_EP,
    EngineFacts,
    EnginePlan,
    EnginePolicy,
    decide,
    device,
    engine_bounds,
    plain_providers,
)
from lmpack.runtime.variant import Variant

log = logging.getLogger("lmpack.engines")

ENGINE_CACHE = ".engines"
CACHE_FACTS = "engine.json"
_GIB = 1 << 30


# --- where --------------------------------------------------------------------------------------------------


def cache_root(source: Path, override: Path | None = None) -> Path:
    """The cache directory for everything served from `source` (a release, bundle or variant directory)."""
    if override is not None:
        return Path(override) / Path(source).resolve().name
    root = Path(source).resolve()  # `current` resolves to its VERSION: engines are kept per release
    return root.parent / ENGINE_CACHE / root.name


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-.") or "gpu"


def cache_key(host: HostFacts) -> str:
    """GPU model, compute capability, TensorRT and onnxruntime versions: what an engine is tied to."""
    gpu = device(host)
    software = host.software
    name = _slug(gpu.name) if gpu else "no-gpu"
    cc = gpu.compute_capability.replace(".", "") if gpu else "0"
    return f"{name}-sm{cc}-trt{software.tensorrt_version or 'none'}-ort{software.onnxruntime_version or 'none'}"


def entry_dir(root: Path, variant_name: str, host: HostFacts) -> Path:
    return root / variant_name / cache_key(host)


def cached(entry: Path, digest: str | None) -> bool:
    """Cheap look (doctor, selection): a complete entry built from this model; `verify_entry` checks the bytes."""
    try:
        facts = json.loads((entry / CACHE_FACTS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(facts, dict) and facts.get("model_digest") == digest and (entry / ENGINE_MODEL).is_file()


def verify_entry(entry: Path) -> list[str]:
    """Every file engine.json lists, hashed; the problems found (empty: safe to load)."""
    try:
        files = json.loads((entry / CACHE_FACTS).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [f"{entry / CACHE_FACTS} is unreadable: {exc}"]
    problems = []
    for relative, digest in sorted(files.items()):
        path = (entry / relative).resolve()
        if entry.resolve() not in path.parents:
            problems.append(f"{relative} points outside {entry}")
        elif not path.is_file():
            problems.append(f"{relative} is missing")
        elif file_sha256(path) != digest:
            problems.append(f"{relative} does not match its recorded sha256")
    return problems


# --- rebuilding ------------------------------------------------------------------------------------------


def rebuild_options(variant: Variant, facts: EngineFacts, out_dir: Path) -> dict[str, Any]:
    """The provider options the build host used, from what the variant recorded: its target's [tensorrt]
    table (variant.json) and the engine's profile shapes (lmpack-model.json). The precision is the graph's."""
    from lmpack.runtime.trt_build import engine_options

    target = variant.meta.get("target")
    if not isinstance(target, dict):
        target = {}
    trt = target.get("tensorrt")
    if not isinstance(trt, dict):
        trt = {}
    return engine_options(
        workspace_gib=float(trt.get("workspace_gib", 4)),
        builder_optimization_level=int(trt.get("builder_optimization_level", 3)),
        hardware_compatible=facts.hardware_compatibility == "ampere_plus",
        shapes=dict(facts.profile_shapes),
        timing_cache=True,
        sparse_weights=facts.sparse_weights,
        out_dir=out_dir,
    )


def rebuild(
    variant: Variant,
    facts: EngineFacts,
    host: HostFacts,
    entry: Path,
    *,
    build: Callable[[Path, dict[str, Any]], None] | None = None,
) -> bool:
    """Build the engine from the variant's ONNX into cache entry `entry`, atomically; False when another
    process published the same entry first (its engine is then used). `build` is trt_build.build_engine."""
    if build is None:
        from lmpack.runtime.trt_build import build_engine

        build = build_engine

    def write(staging: Path) -> None:
        staging.mkdir(parents=True)
        build(variant.onnx_path, rebuild_options(variant, facts, staging))
        if not (staging / ENGINE_MODEL).is_file():
            raise StepError(f"the TensorRT provider did not write {ENGINE_MODEL} while rebuilding the engine")
        gpu = device(host)
        files = {p.relative_to(staging).as_posix(): file_sha256(p) for p in sorted(staging.rglob("*")) if p.is_file()}
        record = {
            "schema_version": 1,
            "model_digest": recorded_model_digest(variant.path),
            "variant": variant.name,
            "gpu_name": gpu.name if gpu else None,
            "compute_capability": gpu.compute_capability if gpu else None,
            **host.software.to_dict(),
            "precision": facts.precision,
            "files": files,
        }
        (staging / CACHE_FACTS).write_text(json.dumps(record, indent=2, sort_keys=True))

    return publish_new(entry, write)


# --- the memory check ---------------------------------------------------------------------------------------


def check_gpu_memory(need_bytes: int, gpu: GpuFacts | None, *, variant: str) -> None:
    """Refuse to load when GPU 0 has less free memory than the variant needs (the numbers in the message)."""
    if gpu is None or not need_bytes:
        return
    if gpu.free_memory_bytes is None:
        log.warning(
            "variant %s: NVML did not report free memory on %s; loading without the memory check", variant, gpu.name
        )
        return
    if gpu.free_memory_bytes < need_bytes:
        raise GpuMemoryError(
            f"variant {variant} needs {need_bytes / _GIB:.1f} GiB of GPU memory ({need_bytes} bytes), and "
            f"{gpu.name} (GPU 0) has {gpu.free_memory_bytes / _GIB:.1f} GiB free ({gpu.free_memory_bytes} bytes) "
            f"of {gpu.memory_bytes / _GIB:.1f} GiB",
            hint="free GPU memory (nvidia-smi shows which processes hold it) or serve a smaller variant",
        )


def _free_gpu0() -> GpuFacts | None:
    gpus, _ = probe_gpus()
    return gpus[0] if gpus else None


def load_cuda_libraries() -> None:
    """Let onnxruntime-gpu find the CUDA runtime the wheelhouse carries (NVIDIA's nvidia-* wheels).

    onnxruntime-gpu looks for cuBLAS, cuDNN and cudart on the system's library path only, unless
    `onnxruntime.preload_dlls()` (1.21 and later) loads them from those packages first; with no such
    packages (JetPack's system CUDA) it falls through to the library path. The CPU onnxruntime has no
    CUDA version and returns at once.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        return
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    try:
        preload()
    except Exception as exc:  # a missing library shows up again, with the provider's own message, at session creation
        log.warning("onnxruntime.preload_dlls() failed (%s); relying on the system's library path for CUDA", exc)


# --- carrying out the plan ----------------------------------------------------------------------------------


def apply_plan(
    variant: Variant,
    facts: EngineFacts | None,
    plan: EnginePlan | None,
    host: HostFacts,
    *,
    need_bytes: int = 0,
    policy: EnginePolicy = EnginePolicy(),
    entry: Path | None = None,
    free_gpu: Callable[[], GpuFacts | None] = _free_gpu0,
    build: Callable[[Path, dict[str, Any]], None] | None = None,
) -> Variant:
    """The variant as it will be loaded: which ONNX file (engine, rebuilt engine, plain ONNX) and providers.

    Logs every mismatch and warns on every fallback; a rebuild that fails falls back like a missing
    TensorRT would (or raises under --strict). Checks free GPU memory before any GPU work. `entry` is
    the cache entry for this host (select.Verdict.cache); None: beside the variant.
    """
    if plan is None:  # no engine: the ONNX as built, on the providers this host really has
        providers, note = plain_providers(variant.providers, host)
        if note is not None:
            log.warning("variant %s: %s", variant.name, note)
        if need_bytes and CUDA_EP in providers:
            check_gpu_memory(need_bytes, free_gpu(), variant=variant.name)
        return replace(variant, providers=providers)
    assert facts is not None  # a plan is only made from an engine's recorded facts (select.judge)
    for line in plan.mismatches:
        log.info("variant %s: shipped TensorRT engine: %s", variant.name, line)
    if plan.mode == REFUSE:
        raise NoCompatibleVariantError(
            plan.notes[0] if plan.notes else f"variant {variant.name} cannot run here",
            rejected={variant.name: list(plan.notes)},
        )
    for note in plan.notes:
        (log.warning if plan.fallback else log.info)("variant %s: %s", variant.name, note)
    if plan.uses_gpu:
        check_gpu_memory(need_bytes, free_gpu(), variant=variant.name)
    if plan.mode == ENGINE:
        return _within_profile(
            replace(variant, onnx_path=variant.model_dir / facts.engine_model, providers=engine_providers(plan, facts)),
            facts,
        )
    if plan.mode in (CACHED, REBUILD):
        entry = entry or entry_dir(cache_root(variant.path), variant.name, host)
        try:
            return _use_entry(variant, facts, host, entry, plan, build=build)
        except (LmpackError, OSError) as exc:
            if policy.strict:
                raise StepError(
                    f"variant {variant.name}: rebuilding the TensorRT engine on this host failed "
                    f"({getattr(exc, 'message', exc)}); strict mode does not fall back",
                    hint="run without --strict to fall back to the CUDA provider, or fix TensorRT here",
                ) from exc
            log.warning(
                "variant %s: rebuilding the TensorRT engine failed (%s); falling back",
                variant.name,
                getattr(exc, "message", exc),
            )
            fallback = decide(facts, host, has_onnx=True, need_bytes=need_bytes, policy=replace(policy, rebuild=False))
            return apply_plan(variant, facts, fallback, host, need_bytes=0, policy=policy, free_gpu=free_gpu)
    assert plan.mode in (CUDA, CPU)
    return replace(variant, providers=list(plan.providers))  # model.onnx, as exported


def _use_entry(
    variant: Variant,
    facts: EngineFacts,
    host: HostFacts,
    entry: Path,
    plan: EnginePlan,
    *,
    build: Callable[[Path, dict[str, Any]], None] | None,
) -> Variant:
    digest = recorded_model_digest(variant.path)
    if cached(entry, digest) and not (problems := verify_entry(entry)):
        log.info("variant %s: using the engine rebuilt for this host in %s", variant.name, entry)
    else:
        if cached(entry, digest) or entry.exists():
            log.warning(
                "variant %s: discarding the cached engine in %s (%s)",
                variant.name,
                entry,
                "; ".join(verify_entry(entry)) or "built from another model",
            )
            remove_path(entry)
        log.warning(
            "variant %s: rebuilding the TensorRT engine for this host into %s (once; this takes minutes)",
            variant.name,
            entry,
        )
        if not rebuild(variant, facts, host, entry, build=build):
            log.info("variant %s: another process rebuilt the engine first; using its", variant.name)
        if problems := verify_entry(entry):
            raise StepError(f"the rebuilt engine in {entry} does not check out: {'; '.join(problems)}")
    return _within_profile(
        replace(variant, onnx_path=entry / ENGINE_MODEL, providers=engine_providers(plan, facts)), facts
    )


def _within_profile(variant: Variant, facts: EngineFacts) -> Variant:
    """The variant served from its engine, its context capped to the tokens the engine's profile takes: a longer
    prompt is then refused as too long for the context, instead of failing inside TensorRT."""
    bounds = engine_bounds(facts)
    if bounds is None or (variant.context_length is not None and variant.context_length <= bounds[1]):
        return variant
    log.info(
        "variant %s: context capped to %d tokens, the most the TensorRT engine's profile takes (the model has %s)",
        variant.name,
        bounds[1],
        variant.context_length or "no recorded context",
    )
    return replace(variant, context_length=bounds[1])


def engine_providers(plan: EnginePlan, facts: EngineFacts) -> list[Any]:
    """The plan's providers, with the TensorRT one carrying the load-time option a hardware-compatible engine
    needs (the provider refuses such an engine without it)."""
    if facts.hardware_compatibility == "none":
        return list(plan.providers)
    return [(p, {"trt_engine_hw_compatible": True}) if p == TENSORRT_EP else p for p in plan.providers]
