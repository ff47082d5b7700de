"""Pick the variant this host should serve from a variant directory, an unpacked bundle or an installed release.

The decision is a pure function of the manifest's compatibility rules and recorded host facts
(lmpack/runtime/host.py), so it can be tested on hosts we do not have and explained line by line by
`lmpack doctor`. Order: variants that run here first; among them GPU variants first (a GPU that
matches is why they were built), then by PRECISION_PREFERENCE, then by name so the choice is stable.
An operator may name the variant instead (serve --variant); it is still checked against the host.

A variant carrying a TensorRT engine is judged by its engine's recorded facts instead of the rule's
exact-GPU line (lmpack/runtime/trt_plan.py): a mismatched engine may still run, rebuilt on this host or
on a fallback provider. A variant served on a fallback ranks after those that run as built: a CUDA
fallback after GPU variants that run as built, a CPU fallback after every variant built for the CPU.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lmpack.bundle.manifest import MANIFEST, VARIANTS_DIR, Compatibility, VariantEntry, parse_manifest
from lmpack.bundle.releases import is_release_dir, through_current
from lmpack.bundle.variant_dir import (
    MODEL_INFO,
    REPORT_JSON,
    VARIANT_FILE,
    is_model_dir,
    is_variant_dir,
    model_dir,
    recorded_model_digest,
    variant_entry,
)
from lmpack.errors import BundleError, NoCompatibleVariantError, NotFoundError, VariantError
from lmpack.runtime import host as host_probe
from lmpack.runtime.host import HostFacts
from lmpack.runtime.host import parse_compute_capability as _cc
from lmpack.runtime.trt_cache import apply_plan, cache_root, cached, entry_dir, load_cuda_libraries
from lmpack.runtime.trt_plan import CPU, EngineFacts, EnginePlan, EnginePolicy, decide, read_engine_facts
from lmpack.runtime.variant import Variant, load_variant

log = logging.getLogger("lmpack.select")

# Every variant passed its quality gate, so prefer speed at the least quality cost: half precision (native
# on GPUs, no quantization error), then int8, fp8, full precision, and int4 (the largest error) last.
PRECISION_PREFERENCE = ("fp16", "bf16", "int8", "fp8", "tf32", "fp32", "int4")
_GIB = 1 << 30


@dataclass(frozen=True)
class Candidate:
    """One variant directory; `entry` is None for a bare model directory, which records no rule."""

    name: str
    path: Path
    entry: VariantEntry | None
    bundle: str | None = None  # the name of the bundle or release it is part of (manifest.json's `name`)


@dataclass(frozen=True)
class Verdict:
    candidate: Candidate
    reasons: tuple[str, ...]  # why it cannot run here; empty when it can
    uses_gpu: bool
    engine: EngineFacts | None = None  # the shipped TensorRT engine's facts, when it carries one
    plan: EnginePlan | None = None  # what is served instead of / with that engine
    cache: Path | None = None  # where this host's rebuilt engine is (or would be) kept

    @property
    def ok(self) -> bool:
        return not self.reasons

    @property
    def need_gpu_bytes(self) -> int:
        entry = self.candidate.entry
        return entry.compatibility.gpu.min_memory_bytes if entry and entry.compatibility.gpu else 0

    def to_dict(self) -> dict[str, Any]:
        entry = self.candidate.entry
        engine = (
            None
            if self.engine is None
            else {
                **self.engine.to_dict(),
                "plan": self.plan.to_dict() if self.plan else None,
                "cache": str(self.cache) if self.cache else None,
            }
        )
        return {
            "name": self.candidate.name,
            "path": str(self.candidate.path),
            "ok": self.ok,
            "reasons": list(self.reasons),
            "gpu": self.uses_gpu,
            "precision": entry.precision if entry else None,
            "target": entry.target if entry else None,
            "compatibility": entry.compatibility.to_dict() if entry else None,
            "engine": engine,
        }


@dataclass(frozen=True)
class Selection:
    source: Path
    kind: str  # "variant", "bundle" or "release"
    verdicts: tuple[Verdict, ...]  # ranked: the first ok one is chosen
    wanted: str | None = None  # a variant named by the operator (--variant): that one or none

    @property
    def chosen(self) -> Verdict | None:
        return next((v for v in self.verdicts if v.ok and self.wanted in (None, v.candidate.name)), None)

    def to_dict(self) -> dict[str, Any]:
        chosen = self.chosen
        return {
            "source": str(self.source),
            "kind": self.kind,
            "variants": [v.to_dict() for v in self.verdicts],
            "wanted": self.wanted,
            "chosen": chosen.candidate.name if chosen else None,
        }


# --- finding the variants ---------------------------------------------------------------------------------


def find_candidates(path: Path | str) -> tuple[str, Path, list[Candidate]]:
    """(kind, resolved root, candidates) for a variant directory, a bundle directory or a release directory.

    A release is PREFIX/releases/NAME/VERSION or its `current` link (both hold manifest.json), or
    PREFIX/releases/NAME itself, which is read through `current`.
    """
    root = Path(path)
    if not root.is_dir():
        raise NotFoundError(
            f"{root} does not exist or is not a directory",
            hint="give a variant directory, an unpacked bundle or an installed release",
        )
    if is_variant_dir(root) or is_model_dir(root):
        candidate = Candidate(
            name=root.resolve().name, path=root, entry=_variant_dir_entry(root), bundle=_enclosing_bundle(root)
        )
        return "variant", root, [candidate]
    root = through_current(root)
    kind = "release" if is_release_dir(root) else "bundle"
    if not (root / MANIFEST).is_file():
        raise VariantError(
            f"{root} holds no {VARIANT_FILE}, {MODEL_INFO} or {MANIFEST}",
            hint="give a variant directory (lmpack build), an unpacked bundle (lmpack pack --keep-dir) "
            "or PREFIX/releases/NAME (lmpack install)",
        )
    manifest = parse_manifest((root / MANIFEST).read_bytes())
    return (
        kind,
        root,
        [Candidate(name=v.name, path=root / v.path, entry=v, bundle=manifest.name) for v in manifest.variants],
    )


def _enclosing_bundle(root: Path) -> str | None:
    """The name of the bundle or release a variant directory sits in (BUNDLE/variants/NAME, as the agent serves
    an installed release's variant), so it answers to the same name as when the release itself is served."""
    bundle = root.resolve().parent.parent
    if root.resolve().parent.name != VARIANTS_DIR or not (bundle / MANIFEST).is_file():
        return None
    try:
        return parse_manifest((bundle / MANIFEST).read_bytes()).name
    except (OSError, BundleError):
        return None


def _variant_dir_entry(root: Path) -> VariantEntry | None:
    """The rule `lmpack pack` would write for this directory; None for a bare model directory.

    A variant that cannot be described (an older or hand-made directory) is still served as given, as
    before bundles existed: the rule exists to choose among variants, and here there is nothing to choose.
    """
    if not (is_variant_dir(root) and (root / REPORT_JSON).is_file()):
        return None
    try:
        return variant_entry(root)
    except BundleError as exc:
        log.warning("variant %s: no compatibility rule, serving it unchecked (%s)", root, exc.message)
        return None


# --- deciding ---------------------------------------------------------------------------------------------


def _gib(n: int) -> str:
    return f"{n / _GIB:.1f} GiB"


def check_rule(rule: Compatibility, host: HostFacts) -> tuple[list[str], bool]:
    """Why `rule` cannot run on `host` (empty when it can), and whether it runs on a GPU."""
    reasons = []
    if rule.cpu_arch != host.arch:
        reasons.append(f"needs a {rule.cpu_arch} CPU, this host is {host.arch}")
    elif missing := [i for i in rule.cpu_isa if i.lower() not in host.isa]:
        reasons.append(f"the CPU lacks {', '.join(missing)}")
    if host.memory_bytes < rule.min_memory_bytes:
        reasons.append(f"needs {_gib(rule.min_memory_bytes)} of memory, this host has {_gib(host.memory_bytes)}")
    gpu = rule.gpu
    if gpu is None:
        return reasons, False
    want = _cc(gpu.compute_capability)
    wanted = f"a GPU with compute capability {gpu.compute_capability}" + (
        " exactly (TensorRT engines)" if gpu.match == "exact" else " or later"
    )
    fits = [
        g
        for g in host.gpus
        if g.vendor == gpu.vendor
        and (_cc(g.compute_capability) == want if gpu.match == "exact" else _cc(g.compute_capability) >= want)
    ]
    if not host.gpus:
        reasons.append(f"needs {wanted}; no GPU here ({host.gpu_note or 'none found'})")
    elif not fits:
        seen = ", ".join(f"{g.name} {g.compute_capability}" for g in host.gpus)
        reasons.append(f"needs {wanted}; this host has {seen}")
    elif not any(g.memory_bytes >= gpu.min_memory_bytes for g in fits):
        most = max(g.memory_bytes for g in fits)
        reasons.append(f"needs {_gib(gpu.min_memory_bytes)} of GPU memory, the largest matching GPU has {_gib(most)}")
    return reasons, True


def judge(
    candidate: Candidate, host: HostFacts, policy: EnginePolicy = EnginePolicy(), cache: Path | None = None
) -> Verdict:
    """`cache` is the engine cache root for the source (trt_cache.cache_root); None: beside the variant."""
    if candidate.entry is None:  # nothing recorded to check: a bare model directory is served as given
        return Verdict(candidate, (), False)
    try:
        engine = read_engine_facts(model_dir(candidate.path))
    except VariantError as exc:
        return Verdict(candidate, (exc.message,), False)
    rule = candidate.entry.compatibility
    if engine is None:
        reasons, gpu = check_rule(rule, host)
        return Verdict(candidate, tuple(reasons), gpu)
    reasons, _ = check_rule(replace(rule, gpu=None), host)  # the engine's own facts replace the GPU line
    entry = entry_dir(cache or cache_root(candidate.path, None), candidate.name, host)
    plan = decide(
        engine,
        host,
        has_onnx=_has_onnx(candidate),
        cached=cached(entry, recorded_model_digest(candidate.path)),
        need_bytes=rule.gpu.min_memory_bytes if rule.gpu else 0,
        policy=policy,
    )
    if plan.mode == "refuse":
        reasons += list(plan.notes)
    return Verdict(candidate, tuple(reasons), plan.uses_gpu, engine=engine, plan=plan, cache=entry)


def _has_onnx(candidate: Candidate) -> bool:
    """Whether the variant carries the ONNX its engine was built from (what the server rebuilds or falls back to)."""
    directory = model_dir(candidate.path)
    try:
        info = json.loads((directory / MODEL_INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    name = info.get("onnx", "model.onnx") if isinstance(info, dict) else "model.onnx"
    return isinstance(name, str) and (directory / name).is_file()


def _rank(verdict: Verdict) -> tuple:
    precision = verdict.candidate.entry.precision if verdict.candidate.entry else ""
    order = PRECISION_PREFERENCE.index(precision) if precision in PRECISION_PREFERENCE else len(PRECISION_PREFERENCE)
    plan = verdict.plan
    return (
        not verdict.ok,
        bool(plan and plan.mode == CPU),
        not verdict.uses_gpu,
        bool(plan and plan.fallback),
        order,
        verdict.candidate.name,
    )


def rank(
    kind: str,
    source: Path,
    candidates: list[Candidate],
    host: HostFacts,
    policy: EnginePolicy = EnginePolicy(),
    cache: Path | None = None,
    wanted: str | None = None,
) -> Selection:
    """Every candidate judged against `host`, best first; rejections are reasons, not errors (doctor shows them).

    `cache` overrides where rebuilt engines are kept (the serve setting engine_cache_dir). `wanted` names
    the one variant the operator allows (serve --variant); a name the source does not hold is a NotFoundError."""
    names = [c.name for c in candidates]
    if wanted is not None and wanted not in names:
        raise NotFoundError(
            f"{source} holds no variant named {wanted!r}; it holds {', '.join(names)}",
            hint="leave out --variant to let lmpack choose, or name one of those",
        )
    root = cache_root(source, cache)
    verdicts = (judge(c, host, policy, root) for c in candidates)
    return Selection(source=source, kind=kind, verdicts=tuple(sorted(verdicts, key=_rank)), wanted=wanted)


def explain(
    path: Path | str,
    host: HostFacts,
    policy: EnginePolicy = EnginePolicy(),
    cache: Path | None = None,
    wanted: str | None = None,
) -> Selection:
    kind, root, candidates = find_candidates(path)
    return rank(kind, root, candidates, host, policy, cache, wanted)


def choose(
    path: Path | str,
    host: HostFacts,
    policy: EnginePolicy = EnginePolicy(),
    cache: Path | None = None,
    wanted: str | None = None,
) -> Verdict:
    """The variant to serve from `path` on `host` (only `wanted`, when named), logging why, with its engine
    facts and plan (what trt_cache.apply_plan carries out); NoCompatibleVariantError lists every rejection."""
    selection = explain(path, host, policy, cache, wanted)
    chosen = selection.chosen
    for verdict in selection.verdicts:
        if verdict is not chosen:
            log.info(
                "variant %s: %s",
                verdict.candidate.name,
                "; ".join(verdict.reasons)
                if verdict.reasons
                else "runs here, not the one named"
                if wanted
                else "runs here, ranked lower",
            )
    if chosen is None and wanted is not None:
        reasons = next(list(v.reasons) for v in selection.verdicts if v.candidate.name == wanted)
        raise NoCompatibleVariantError(
            f"variant {wanted} of {selection.source} cannot run on this host ({', '.join(reasons)})",
            rejected={wanted: reasons},
            hint=f"`lmpack doctor {path}` shows the host facts and which variants can "
            "run; leave out --variant to let lmpack choose",
        )
    if chosen is None:
        rejected = {v.candidate.name: list(v.reasons) for v in selection.verdicts}
        lines = "; ".join(f"{name}: {', '.join(reasons)}" for name, reasons in rejected.items())
        raise NoCompatibleVariantError(
            f"no variant in {selection.source} can run on this host ({lines})",
            rejected=rejected,
            hint=f"`lmpack doctor {path}` shows the host facts; build a variant for a target this host matches",
        )
    log.info(
        "serving variant %s from %s %s (%s%s)",
        chosen.candidate.name,
        selection.kind,
        selection.source,
        "GPU" if chosen.uses_gpu else "CPU",
        ", named by --variant" if wanted else "",
    )
    return chosen


def prepare_variant(
    path: Path | str,
    *,
    variant: str | None = None,
    strict: bool = False,
    engine_rebuild: bool = True,
    engine_cache_dir: Path | None = None,
    host: HostFacts | None = None,
) -> Variant:
    """The variant at `path` this host should serve (`variant`: only the one of that name), ready to load:
    chosen, its TensorRT engine matched, rebuilt or replaced by a fallback provider, and the GPU's free
    memory checked (trt_cache.py)."""
    host = host or host_probe.probe_host()
    policy = EnginePolicy(rebuild=engine_rebuild, strict=strict)
    verdict = choose(path, host, policy, engine_cache_dir, variant)
    if verdict.uses_gpu:  # before the rebuild's session as much as the server's
        load_cuda_libraries()
    return apply_plan(
        replace(load_variant(verdict.candidate.path), bundle=verdict.candidate.bundle),
        verdict.engine,
        verdict.plan,
        host,
        need_bytes=verdict.need_gpu_bytes if verdict.uses_gpu else 0,
        policy=policy,
        entry=verdict.cache,
    )
