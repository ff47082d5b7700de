"""The variant directory: what `lmpack build` writes, and what `pack`, `serve`, `doctor` and the agent read.

    NAME/variant.json   what it was built for: target facts, profile, precision, task, providers, model digest
    NAME/report.json    the build report (report.txt says the same for people)
    NAME/model/         ONNX graph and weights, tokenizer, chat template, generation config, lmpack-model.json

A bare model directory (the `model/` folder alone, e.g. a step-cache output) is read as a variant too. This
module is the one place these names are spelled and variant.json is composed; it also derives the manifest
entry (the compatibility rule) that packing a variant directory writes, so the runtime can judge an unpacked
variant by the same rule without importing the packer (docs/bundle-format.md, docs/architecture.md).

Runtime-side: standard library, lmpack.errors and lmpack.bundle.manifest only.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmpack.bundle.manifest import Compatibility, GpuRequirement, VariantEntry, check_name
from lmpack.errors import BundleError, NotFoundError

VARIANT_FILE = "variant.json"
REPORT_JSON = "report.json"
REPORT_TEXT = "report.txt"
MODEL_DIR = "model"
MODEL_INFO = "lmpack-model.json"  # in model/: task, ONNX file name, KV layout, TensorRT engine facts
VARIANT_SCHEMA_VERSION = 1

TEXT_GENERATION = "text-generation"
EMBEDDING = "feature-extraction"
TASKS = (TEXT_GENERATION, EMBEDDING)
# lmpack-model.json `pooling` of an encoder: how its sentence-transformers pipeline makes one vector of a text
POOLINGS = ("mean", "cls", "last")

ENGINE_SUFFIXES = (".engine", ".plan", ".trt")  # TensorRT engines: tied to the GPU they were built on
_MIB = 1 << 20


def is_variant_dir(root: Path) -> bool:
    """A directory `lmpack build` wrote (variant.json beside model/)."""
    return (Path(root) / VARIANT_FILE).is_file()


def is_model_dir(root: Path) -> bool:
    """A bare model directory (lmpack-model.json beside the ONNX files)."""
    return (Path(root) / MODEL_INFO).is_file()


def model_dir(root: Path) -> Path:
    """Where the model files of the variant (or bare model directory) at `root` are."""
    root = Path(root)
    return root / MODEL_DIR if is_variant_dir(root) else root


# --- writing --------------------------------------------------------------------------------------------------


def variant_document(
    *,
    name: str,
    target: dict[str, Any],
    profile: str,
    precision: str,
    execution_providers: list[str],
    task: str | None,
    model_digest: str,
) -> dict[str, Any]:
    """variant.json's content; `target` is the target's facts (Target.to_dict), kept whole for the runtime."""
    return {
        "schema_version": VARIANT_SCHEMA_VERSION,
        "name": name,
        "target": target,
        "profile": profile,
        "precision": precision,
        "execution_providers": execution_providers,
        "task": task,
        "model_digest": model_digest,
    }


def write_variant(
    staging: Path, *, model: Path, document: dict[str, Any], report: dict[str, Any], report_text: str
) -> None:
    """Fill `staging` (a fresh directory that fsio.publish renames into place) with a complete variant."""
    shutil.copytree(model, staging / MODEL_DIR)
    (staging / VARIANT_FILE).write_text(json.dumps(document, indent=2, sort_keys=True))
    (staging / REPORT_JSON).write_text(json.dumps(report, indent=2, sort_keys=True))
    (staging / REPORT_TEXT).write_text(report_text)


# --- reading, for packing and for judging ----------------------------------------------------------------------


@dataclass(frozen=True)
class VariantFiles:
    """A variant directory as pack copies it: its name, its two JSON documents and every regular file."""

    name: str
    root: Path
    meta: dict[str, Any]
    report: dict[str, Any]
    files: list[Path]


def read_variant_files(root: Path) -> VariantFiles:
    """A variant directory as lmpack build writes it; links and special files are refused, not followed."""
    root = Path(root)
    if not root.is_dir():
        raise NotFoundError(f"variant directory {root} does not exist")
    name = check_name(root.resolve().name, what=f"variant directory {root}")
    for required in (VARIANT_FILE, REPORT_JSON, MODEL_DIR):
        if not (root / required).exists():
            raise BundleError(
                f"{root} is not a variant directory: {required} is missing",
                hint="pack the directories that lmpack build writes (dist/MODEL-TARGET-PROFILE)",
            )
    files: list[Path] = []
    for path in sorted(root.rglob("*")):
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            raise BundleError(f"{path} is a link or a special file; a bundle holds regular files only")
        if path.is_file():
            files.append(path)
    return VariantFiles(
        name=name, root=root, meta=_load_json(root / VARIANT_FILE), report=_load_json(root / REPORT_JSON), files=files
    )


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path} cannot be read as JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BundleError(f"{path} must hold a JSON object")
    return data


def required_field(data: dict[str, Any], key: str, where: Path) -> Any:
    if data.get(key) is None:
        raise BundleError(f"{where} lacks the field {key!r}; was it written by lmpack build?")
    return data[key]


def memory_floor(model_bytes: int) -> int:
    """Weights plus half again for activations and the KV cache, plus 256 MiB for the runtime, in whole MiB.

    A floor for refusing hopeless hosts, not a sizing guide.
    """
    need = model_bytes * 3 // 2 + 256 * _MIB
    return -(-need // _MIB) * _MIB


def variant_entry(root: Path) -> VariantEntry:
    """The manifest entry (compatibility rule included) that packing the variant directory `root` writes."""
    return entry_of(read_variant_files(Path(root)))


def entry_of(variant: VariantFiles) -> VariantEntry:
    where = variant.root / VARIANT_FILE
    target = required_field(variant.meta, "target", where)
    cpu = required_field(target, "cpu", where)
    model_files = [p for p in variant.files if p.relative_to(variant.root).parts[0] == MODEL_DIR]
    floor = memory_floor(sum(p.stat().st_size for p in model_files))
    gpu = None
    if target.get("gpu"):
        facts, tensorrt = target["gpu"], target.get("tensorrt") or {}
        engines = any(p.name.endswith(ENGINE_SUFFIXES) for p in model_files)
        portable = tensorrt.get("hardware_compatibility") == "ampere_plus"
        gpu = GpuRequirement(
            vendor=required_field(facts, "vendor", where),
            compute_capability="8.0" if engines and portable else required_field(facts, "compute_capability", where),
            match="exact" if engines and not portable else "minimum",
            min_memory_bytes=floor,
        )
    source = required_field(variant.report, "source", variant.root / REPORT_JSON)
    provenance = {
        key: (None if source.get(key) is None else str(source[key]))
        for key in ("kind", "ref", "commit", "license", "sha256")
    }
    provenance["kind"] = str(required_field(source, "kind", variant.root / REPORT_JSON))
    return VariantEntry(
        name=variant.name,
        target=required_field(target, "name", where),
        profile=required_field(variant.meta, "profile", where),
        precision=required_field(variant.meta, "precision", where),
        task=variant.meta.get("task"),
        execution_providers=tuple(required_field(variant.meta, "execution_providers", where)),
        compatibility=Compatibility(
            cpu_arch=required_field(cpu, "arch", where),
            cpu_isa=tuple(cpu.get("isa", [])),
            min_memory_bytes=floor,
            gpu=gpu,
        ),
        provenance=provenance,
    )


def recorded_model_digest(root: Path) -> str | None:
    """variant.json's `model_digest` (what a cached TensorRT engine must have been built from), or None."""
    try:
        meta = json.loads((Path(root) / VARIANT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    digest = meta.get("model_digest") if isinstance(meta, dict) else None
    return digest if isinstance(digest, str) else None
