"""Pick the variant this host should serve from a variant directory, an unpacked bundle or an installed release.

The decision is a pure function of the manifest's compatibility rules and recorded host facts
(lmpack/runtime/host.py), so it can be tested on hosts we do not have and explained line by line by
`lmpack doctor`. Order: variants that run here first; among them GPU variants first (a GPU that
matches is why they were built), then by PRECISION_PREFERENCE, then by name so the choice is stable.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmpack.bundle.manifest import MANIFEST, Compatibility, VariantEntry, parse_manifest
from lmpack.errors import BundleError, NoCompatibleVariantError, NotFoundError, VariantError
from lmpack.runtime.host import HostFacts
from lmpack.runtime.variant import MODEL_INFO, VARIANT_FILE

log = logging.getLogger("lmpack.select")

# Every variant passed its quality gate, so prefer speed at the least quality cost: half precision (native
# on GPUs, no quantization error), then int8, fp8, full precision, and int4 (the largest error) last.
PRECISION_PREFERENCE = ("fp16", "bf16", "int8", "fp8", "tf32", "fp32", "int4")
CURRENT = "current"
_GIB = 1 << 30


@dataclass(frozen=True)
class Candidate:
    """One variant directory; `entry` is None for a bare model directory, which records no rule."""

    name: str
    path: Path
    entry: VariantEntry | None


@dataclass(frozen=True)
class Verdict:
    candidate: Candidate
    reasons: tuple[str, ...]    # why it cannot run here; empty when it can
    uses_gpu: bool

    @property
    def ok(self) -> bool:
        return not self.reasons

    def to_dict(self) -> dict[str, Any]:
        entry = self.candidate.entry
        return {"name": self.candidate.name, "path": str(self.candidate.path), "ok": self.ok,
                "reasons": list(self.reasons), "gpu": self.uses_gpu,
                "precision": entry.precision if entry else None, "target": entry.target if entry else None,
                "compatibility": entry.compatibility.to_dict() if entry else None}


@dataclass(frozen=True)
class Selection:
    source: Path
    kind: str                      # "variant", "bundle" or "release"
    verdicts: tuple[Verdict, ...]  # ranked: the first ok one is chosen

    @property
    def chosen(self) -> Verdict | None:
        return next((v for v in self.verdicts if v.ok), None)

    def to_dict(self) -> dict[str, Any]:
        chosen = self.chosen
        return {"source": str(self.source), "kind": self.kind, "variants": [v.to_dict() for v in self.verdicts],
                "chosen": chosen.candidate.name if chosen else None}


# --- finding the variants ---------------------------------------------------------------------------------

def find_candidates(path: Path | str) -> tuple[str, Path, list[Candidate]]:
    """(kind, resolved root, candidates) for a variant directory, a bundle directory or a release directory.

    A release is PREFIX/releases/NAME/VERSION or its `current` link (both hold manifest.json), or
    PREFIX/releases/NAME itself, which is read through `current`.
    """
    root = Path(path)
    if not root.is_dir():
        raise NotFoundError(f"{root} does not exist or is not a directory",
                            hint="give a variant directory, an unpacked bundle or an installed release")
    if (root / VARIANT_FILE).is_file() or (root / MODEL_INFO).is_file():
        return "variant", root, [Candidate(name=root.resolve().name, path=root, entry=_variant_dir_entry(root))]
    if not (root / MANIFEST).is_file() and (root / CURRENT).is_dir():
        root = root / CURRENT
    kind = "release" if _is_release(root) else "bundle"
    if not (root / MANIFEST).is_file():
        raise VariantError(f"{root} holds no {VARIANT_FILE}, {MODEL_INFO} or {MANIFEST}",
                           hint="give a variant directory (lmpack build), an unpacked bundle (lmpack pack --keep-dir) "
                                "or PREFIX/releases/NAME (lmpack install)")
    manifest = parse_manifest((root / MANIFEST).read_bytes())
    return kind, root, [Candidate(name=v.name, path=root / v.path, entry=v) for v in manifest.variants]


def _is_release(root: Path) -> bool:
    """A VERSION directory under PREFIX/releases/NAME (install's layout): only the label depends on it."""
    return root.resolve().parent.parent.name == "releases"


def _variant_dir_entry(root: Path) -> VariantEntry | None:
    """The rule `lmpack pack` would write for this directory; None for a bare model directory.

    A variant that cannot be described (an older or hand-made directory) is still served as given, as
    before bundles existed: the rule exists to choose among variants, and here there is nothing to choose.
    """
    if not ((root / VARIANT_FILE).is_file() and (root / "report.json").is_file()):
        return None
    from lmpack.bundle.pack import variant_entry

    try:
        return variant_entry(root)
    except BundleError as exc:
        log.warning("variant %s: no compatibility rule, serving it unchecked (%s)", root, exc.message)
        return None


# --- deciding ---------------------------------------------------------------------------------------------

def _gib(n: int) -> str:
    return f"{n / _GIB:.1f} GiB"


def _cc(value: str) -> tuple[int, int]:
    major, _, minor = value.partition(".")
    return int(major), int(minor or 0)


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
    wanted = (f"a GPU with compute capability {gpu.compute_capability}"
              + (" exactly (TensorRT engines)" if gpu.match == "exact" else " or later"))
    fits = [g for g in host.gpus if g.vendor == gpu.vendor
            and (_cc(g.compute_capability) == want if gpu.match == "exact" else _cc(g.compute_capability) >= want)]
    if not host.gpus:
        reasons.append(f"needs {wanted}; no GPU here ({host.gpu_note or 'none found'})")
    elif not fits:
        seen = ", ".join(f"{g.name} {g.compute_capability}" for g in host.gpus)
        reasons.append(f"needs {wanted}; this host has {seen}")
    elif not any(g.memory_bytes >= gpu.min_memory_bytes for g in fits):
        most = max(g.memory_bytes for g in fits)
        reasons.append(f"needs {_gib(gpu.min_memory_bytes)} of GPU memory, the largest matching GPU has {_gib(most)}")
    return reasons, True


def judge(candidate: Candidate, host: HostFacts) -> Verdict:
    if candidate.entry is None:  # nothing recorded to check: a bare model directory is served as given
        return Verdict(candidate, (), False)
    reasons, gpu = check_rule(candidate.entry.compatibility, host)
    return Verdict(candidate, tuple(reasons), gpu)


def _rank(verdict: Verdict) -> tuple:
    precision = verdict.candidate.entry.precision if verdict.candidate.entry else ""
    order = PRECISION_PREFERENCE.index(precision) if precision in PRECISION_PREFERENCE else len(PRECISION_PREFERENCE)
    return (not verdict.ok, not verdict.uses_gpu, order, verdict.candidate.name)


def rank(kind: str, source: Path, candidates: list[Candidate], host: HostFacts) -> Selection:
    """Every candidate judged against `host`, best first; never raises (doctor shows the rejections)."""
    return Selection(source=source, kind=kind, verdicts=tuple(sorted((judge(c, host) for c in candidates), key=_rank)))


def explain(path: Path | str, host: HostFacts) -> Selection:
    kind, root, candidates = find_candidates(path)
    return rank(kind, root, candidates, host)


def choose(path: Path | str, host: HostFacts) -> Candidate:
    """The variant to serve from `path` on `host`, logging why; NoCompatibleVariantError lists every rejection."""
    selection = explain(path, host)
    chosen = selection.chosen
    for verdict in selection.verdicts:
        if verdict is not chosen:
            log.info("variant %s: %s", verdict.candidate.name,
                     "; ".join(verdict.reasons) if verdict.reasons else "runs here, ranked lower")
    if chosen is None:
        rejected = {v.candidate.name: list(v.reasons) for v in selection.verdicts}
        lines = "; ".join(f"{name}: {', '.join(reasons)}" for name, reasons in rejected.items())
        raise NoCompatibleVariantError(f"no variant in {selection.source} can run on this host ({lines})",
                                       rejected=rejected,
                                       hint=f"`lmpack doctor {path}` shows the host facts; build a variant for a "
                                            "target this host matches")
    log.info("serving variant %s from %s %s (%s)", chosen.candidate.name, selection.kind, selection.source,
             "GPU" if chosen.uses_gpu else "CPU")
    return chosen.candidate
