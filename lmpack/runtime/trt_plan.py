"""Does a shipped TensorRT engine fit this host, and if not, what to serve instead: a pure decision.

An engine is tied to the GPU model, the compute capability, the TensorRT version (and, through the EP
context model, the onnxruntime version) it was built with; loading it elsewhere fails at best
("Version tag does not match") and is refused by policy at worst (docs/hardening.md: engines are
code). The facts the build recorded (lmpack-model.json, `tensorrt`) are compared with the host's
(lmpack/runtime/host.py), one reason line per mismatch, and the plan follows from them:

    engine    the shipped engine fits: model_ctx.onnx on the TensorRT provider
    cached    it does not, and an engine this host rebuilt earlier is in the cache: use that
    rebuild   it does not, the variant carries its ONNX and the host has TensorRT: build once, cache, use
    cuda      no rebuild possible (or turned off): model.onnx on the CUDA provider, with a warning
    cpu       no usable GPU runtime either: model.onnx on the CPU, with a warning
    refuse    strict mode instead of cuda or cpu, or no ONNX to fall back to

Everything here is a function of recorded facts, so every branch is tested on machines without a GPU;
the impure half (cache, rebuild, free-memory check) is lmpack/runtime/trt_cache.py.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmpack.bundle.variant_dir import MODEL_INFO
from lmpack.errors import VariantError
from lmpack.runtime.host import GpuFacts, HostFacts, onnxruntime_conflict
from lmpack.runtime.host import parse_compute_capability as _cc

ENGINE_MODEL = "model_ctx.onnx"
TENSORRT_EP, CUDA_EP, CPU_EP = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
ENGINE, CACHED, REBUILD, CUDA, CPU, REFUSE = "engine", "cached", "rebuild", "cuda", "cpu", "refuse"
_GPU_MODES = (ENGINE, CACHED, REBUILD, CUDA)
# TensorRT's version compatibility starts with engines built by 8.6, run by 8.6 or later.
_VERSION_COMPATIBLE_SINCE = (8, 6)
# Hardware compatibility ("ampere_plus") engines run on compute capability 8.0 and later.
_AMPERE = (8, 0)
_GIB = 1 << 30


@dataclass(frozen=True)
class EngineFacts:
    """What the tensorrt step recorded about the engine it built (lmpack-model.json, `tensorrt`)."""

    engine_model: str = ENGINE_MODEL
    gpu_name: str | None = None
    compute_capability: str | None = None
    driver_version: str | None = None
    cuda_driver_version: str | None = None
    cuda_version: str | None = None  # the CUDA the building onnxruntime-gpu was made for
    onnxruntime_version: str | None = None
    tensorrt_version: str | None = None
    precision: str | None = None
    hardware_compatibility: str = "none"
    version_compatible: bool = False
    sparse_weights: bool = False
    profile_shapes: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_info(cls, info: dict[str, Any], *, where: str = MODEL_INFO) -> EngineFacts | None:
        """The engine facts in a parsed lmpack-model.json; None when the variant carries no engine."""
        raw = info.get("tensorrt")
        if raw is None:
            return None
        if not isinstance(raw, dict):
            raise VariantError(f"{where}: field 'tensorrt' must be an object")
        values: dict[str, Any] = {}
        for name in (
            "engine_model",
            "gpu_name",
            "compute_capability",
            "driver_version",
            "cuda_driver_version",
            "cuda_version",
            "onnxruntime_version",
            "tensorrt_version",
            "precision",
            "hardware_compatibility",
        ):
            value = raw.get(name)
            if value is not None and not isinstance(value, str):
                raise VariantError(f"{where}: field 'tensorrt.{name}' must be a string")
            if value is not None:
                values[name] = value
        for name in ("version_compatible", "sparse_weights"):
            if not isinstance(raw.get(name, False), bool):
                raise VariantError(f"{where}: field 'tensorrt.{name}' must be true or false")
            values[name] = raw.get(name, False)
        shapes = raw.get("profile_shapes", {})
        if not isinstance(shapes, dict) or not all(isinstance(v, str) for v in shapes.values()):
            raise VariantError(f"{where}: field 'tensorrt.profile_shapes' must map option names to strings")
        engine_model = values.get("engine_model", ENGINE_MODEL)
        if "/" in engine_model or "\\" in engine_model or engine_model in ("", ".", ".."):
            raise VariantError(f"{where}: field 'tensorrt.engine_model' must be a file name in the model directory")
        return cls(**values, profile_shapes=dict(shapes))

    def to_dict(self) -> dict[str, Any]:
        return {
            "engine_model": self.engine_model,
            "gpu_name": self.gpu_name,
            "compute_capability": self.compute_capability,
            "driver_version": self.driver_version,
            "cuda_driver_version": self.cuda_driver_version,
            "cuda_version": self.cuda_version,
            "onnxruntime_version": self.onnxruntime_version,
            "tensorrt_version": self.tensorrt_version,
            "precision": self.precision,
            "hardware_compatibility": self.hardware_compatibility,
            "version_compatible": self.version_compatible,
        }


def engine_bounds(facts: EngineFacts) -> tuple[int, int] | None:
    """(sequences, tokens) the engine's profile takes at most: its max shapes' batch and attention length (an
    encoder's text length); None when the engine records no profile."""
    shapes: dict[str, list[int]] = {}
    for entry in facts.profile_shapes.get("trt_profile_max_shapes", "").split(","):
        name, _, dims = entry.rpartition(":")
        if name and all(d.isdigit() for d in dims.split("x")):
            shapes.setdefault(name, [int(d) for d in dims.split("x")])
    length = shapes.get("attention_mask") or shapes.get("input_ids")
    if "input_ids" not in shapes or not length or len(length) < 2:
        return None
    return shapes["input_ids"][0], length[1]


def beyond_engine(facts: EngineFacts, *, batch: int) -> str | None:
    """Why serve's batch width cannot run on the engine (TensorRT refuses any input outside its profile)."""
    bounds = engine_bounds(facts)
    if bounds is None or batch <= bounds[0]:
        return None
    return (
        f"the TensorRT engine's profile takes at most {bounds[0]} sequences in one run, and serve would batch "
        f"{batch} (max_batch, or max_concurrency when smaller): set max_batch = {bounds[0]} (serve --max-batch), "
        f"or build the engine with max_batch = {batch} in the profile's tensorrt step"
    )


def read_engine_facts(model_dir: Path) -> EngineFacts | None:
    """The engine facts of a variant's model directory; None when it has no lmpack-model.json or no engine."""
    path = Path(model_dir) / MODEL_INFO
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VariantError(f"{path} is not valid JSON: {exc}") from exc
    return EngineFacts.from_info(info, where=str(path)) if isinstance(info, dict) else None


# --- comparing ---------------------------------------------------------------------------------------------


def version_tuple(version: str | None, parts: int = 3) -> tuple[int, ...] | None:
    """ "10.3.0.26" -> (10, 3, 0); "1.20.1+cu124" -> (1, 20, 1); None when there is no leading number."""
    if not version:
        return None
    numbers = re.findall(r"\d+", version.split("+")[0])
    if not numbers:
        return None
    values = [int(n) for n in numbers[:parts]]
    return tuple(values + [0] * (parts - len(values)))


def device(host: HostFacts) -> GpuFacts | None:
    """The GPU onnxruntime's providers use by default (device_id 0): NVML's first, in PCI bus order."""
    return host.gpus[0] if host.gpus else None


def _gpu_label(gpu: GpuFacts) -> str:
    return f"{gpu.name} (compute capability {gpu.compute_capability})"


def _versions(what: str, built: str | None, here: str | None, *, compatible: bool) -> list[str]:
    """A reason when the host's `what` version cannot run an engine built with `built`."""
    if built is None:
        return [f"the engine does not record its {what} version, so a match cannot be shown"]
    if here is None:
        return [f"the engine needs {what} {built}, and this host has none"]
    b, h = version_tuple(built), version_tuple(here)
    if b is None or h is None:
        return [f"cannot compare {what} versions {built!r} and {here!r}"]
    if compatible:
        if h < b:
            return [
                f"the engine was built with {what} {built} (version-compatible: runs on that version or "
                f"later), this host has the older {here}"
            ]
        return []
    if h != b:
        return [
            f"the engine was built with {what} {built}, this host has {here} (an engine runs only on the "
            "version that built it unless it was built version-compatible)"
        ]
    return []


def engine_mismatches(facts: EngineFacts, host: HostFacts) -> list[str]:
    """Every reason the shipped engine cannot run on `host`, one line each; empty when it can."""
    gpu = device(host)
    software = host.software
    if gpu is None:
        return [f"the engine needs an NVIDIA GPU; none here ({host.gpu_note or 'none found'})"]
    reasons = []
    built_on = f"{facts.gpu_name or 'an unrecorded GPU'} (compute capability {facts.compute_capability or '?'})"
    if facts.hardware_compatibility == "ampere_plus":
        if _cc(gpu.compute_capability) < _AMPERE:
            reasons.append(
                f"the engine is hardware-compatible with Ampere and later (compute capability 8.0+), "
                f"this host's GPU is {_gpu_label(gpu)}"
            )
    elif facts.compute_capability is None or _cc(facts.compute_capability) != _cc(gpu.compute_capability):
        reasons.append(f"the engine was built for {built_on}, this host's GPU is {_gpu_label(gpu)}")
    elif facts.gpu_name != gpu.name:
        reasons.append(
            f"the engine was built on {built_on}, this host's GPU is {gpu.name}: same compute capability, "
            "but an engine is tied to the GPU model unless built hardware-compatible"
        )
    if TENSORRT_EP not in software.providers:
        reasons.append(
            "this host's onnxruntime has no TensorRT execution provider "
            f"(providers: {', '.join(software.providers) or 'none found'})"
        )
    compatible = facts.version_compatible
    if compatible and (version_tuple(facts.tensorrt_version) or (0,)) < _VERSION_COMPATIBLE_SINCE:
        compatible = False  # TensorRT before 8.6 could not build version-compatible engines
    reasons += _versions("TensorRT", facts.tensorrt_version, software.tensorrt_version, compatible=compatible)
    reasons += _versions(
        "onnxruntime", facts.onnxruntime_version, software.onnxruntime_version, compatible=facts.version_compatible
    )
    if (old := _driver_too_old(facts.cuda_version, host)) is not None:
        reasons.append(f"the engine's runtime was built for CUDA {facts.cuda_version}; {old}")
    return reasons


def _driver_too_old(cuda: str | None, host: HostFacts) -> str | None:
    """Why the driver cannot run code built for CUDA `cuda` (major versions: CUDA's minor version
    compatibility lets a driver for 12.0 run 12.x), or None when it can or nothing is known."""
    driver = host.software.cuda_driver_version
    want, have = version_tuple(cuda, 1), version_tuple(driver, 1)
    if want is None or have is None or have >= want:
        return None
    return (
        f"the driver {host.software.driver_version or '?'} supports CUDA up to {driver}: too old, "
        "update the NVIDIA driver"
    )


def gpu_too_small(host: HostFacts, need_bytes: int) -> list[str]:
    """The GPU-memory line, when GPU 0 is smaller than the variant's floor (its free memory is checked at load)."""
    gpu = device(host)
    if gpu is None or not need_bytes or gpu.memory_bytes >= need_bytes:
        return []
    return [
        f"the variant needs {need_bytes / _GIB:.1f} GiB of GPU memory, {_gpu_label(gpu)} has "
        f"{gpu.memory_bytes / _GIB:.1f} GiB"
    ]


def gpu_runtime_problems(host: HostFacts, *, need_bytes: int = 0) -> list[str]:
    """Why onnxruntime's CUDA provider cannot run a model on this host's GPU; empty when it can."""
    gpu = device(host)
    if gpu is None:
        return [f"no NVIDIA GPU here ({host.gpu_note or 'none found'})"]
    problems = []
    if (conflict := onnxruntime_conflict(host.software.onnxruntime_packages)) is not None:
        problems.append(conflict)
    if CUDA_EP not in host.software.providers:
        problems.append(
            "this host's onnxruntime has no CUDA execution provider (install onnxruntime-gpu, not onnxruntime)"
        )
    if (old := _driver_too_old(host.software.onnxruntime_cuda_version, host)) is not None:
        problems.append(f"onnxruntime-gpu here was built for CUDA {host.software.onnxruntime_cuda_version}; {old}")
    return problems + gpu_too_small(host, need_bytes)


def plain_providers(listed: list[str] | tuple[str, ...], host: HostFacts) -> tuple[list[str], str | None]:
    """The providers for a variant without a TensorRT engine, by what this host really has; and the one
    warning line a fallback logs (None when it runs as built).

    Never TensorRT: onnxruntime-gpu lists its TensorRT provider even where TensorRT's libraries are absent
    (an "EP Error" and a retry at every start), and with them present a graph without optimization profiles
    gets a new engine built whenever the KV cache outgrows the last one. CUDA when the variant was built for
    a GPU and this host can run it; else the CPU."""
    if not {TENSORRT_EP, CUDA_EP} & set(listed):
        return [CPU_EP], None
    problems = gpu_runtime_problems(host)
    if not problems:
        return [CUDA_EP, CPU_EP], None
    return [CPU_EP], f"running on the CPU (much slower): the CUDA provider cannot run here ({'; '.join(problems)})"


# --- deciding ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EnginePolicy:
    """The operator's say: rebuild a mismatched engine on the host (default), and refuse rather than fall back."""

    rebuild: bool = True
    strict: bool = False


@dataclass(frozen=True)
class EnginePlan:
    mode: str  # ENGINE, CACHED, REBUILD, CUDA, CPU or REFUSE
    providers: tuple[str, ...]  # onnxruntime providers, in preference order
    mismatches: tuple[str, ...]  # why the shipped engine does not fit (empty for ENGINE)
    notes: tuple[str, ...] = ()  # the warnings a fallback logs, why no rebuild, why refused

    @property
    def uses_gpu(self) -> bool:
        return self.mode in _GPU_MODES

    @property
    def fallback(self) -> bool:
        return self.mode in (CUDA, CPU)

    @property
    def uses_engine(self) -> bool:
        return self.mode in (ENGINE, CACHED, REBUILD)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "providers": list(self.providers),
            "mismatches": list(self.mismatches),
            "notes": list(self.notes),
        }


def decide(
    facts: EngineFacts,
    host: HostFacts,
    *,
    has_onnx: bool,
    cached: bool = False,
    need_bytes: int = 0,
    policy: EnginePolicy = EnginePolicy(),
) -> EnginePlan:
    """What to serve for a variant carrying a TensorRT engine on `host` (see the module docstring)."""
    gpu_problems = gpu_runtime_problems(host, need_bytes=need_bytes)
    mismatches = tuple(engine_mismatches(facts, host)) + tuple(gpu_too_small(host, need_bytes))
    if not mismatches:
        return EnginePlan(ENGINE, (TENSORRT_EP, CUDA_EP, CPU_EP), ())
    blockers = []
    if not policy.rebuild:
        blockers.append("rebuilding engines on this host is turned off (--no-engine-rebuild / engine_rebuild = false)")
    if not has_onnx:
        blockers.append("the variant carries no ONNX model to rebuild from")
    if TENSORRT_EP not in host.software.providers or host.software.tensorrt_version is None:
        blockers.append(
            "this host has no TensorRT for onnxruntime to build with "
            f"(TensorRT provider {'present' if TENSORRT_EP in host.software.providers else 'absent'}, "
            f"TensorRT {host.software.tensorrt_version or 'not found'})"
        )
    blockers += gpu_problems
    if not blockers:
        note = (
            "using the engine this host rebuilt earlier from the variant's ONNX"
            if cached
            else "rebuilding the engine from the variant's ONNX on this host, once (minutes); later starts reuse it"
        )
        return EnginePlan(CACHED if cached else REBUILD, (TENSORRT_EP, CUDA_EP, CPU_EP), mismatches, (note,))
    why = "; ".join(mismatches)
    no_rebuild = "; ".join(blockers)
    if not has_onnx:
        return EnginePlan(
            REFUSE,
            (),
            mismatches,
            (
                f"the shipped TensorRT engine does not fit this host ({why}) and "
                "the variant carries no ONNX model to rebuild from or fall back to",
            ),
        )
    if policy.strict:
        return EnginePlan(
            REFUSE,
            (),
            mismatches,
            (
                f"strict mode: the shipped TensorRT engine does not fit this host ({why}) and cannot be "
                f"rebuilt here ({no_rebuild}); not falling back to the CUDA provider or the CPU",
            ),
        )
    if not gpu_problems:
        return EnginePlan(
            CUDA,
            (CUDA_EP, CPU_EP),
            mismatches,
            (
                f"falling back to the CUDA execution provider without TensorRT (slower): the shipped engine "
                f"does not fit ({why}) and cannot be rebuilt ({no_rebuild})",
            ),
        )
    return EnginePlan(
        CPU,
        (CPU_EP,),
        mismatches,
        (
            f"falling back to the CPU (much slower, and {facts.precision or 'this precision'} may lack CPU "
            f"kernels): the shipped engine does not fit ({why}) and no GPU runtime is usable "
            f"({'; '.join(gpu_problems)})",
        ),
    )
