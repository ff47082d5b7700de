"""Which files of a Hugging Face model directory lmpack takes, and the safety checks on them."""

from __future__ import annotations

import fnmatch
import json
import shutil
import struct
from pathlib import Path

from lmpack.errors import UnsafeModelError, UnsupportedModelError

# Weights come only as safetensors; everything else is configuration, tokenizer or documentation.
WANTED_PATTERNS = (
    "*.safetensors",
    "model.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "*/config.json",
    "README.md",
    "LICENSE",
    "LICENSE.*",
    "LICENSE*",
)
PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt")
# What --allow-pickle fetches and converts: transformers' PyTorch checkpoint, whole or sharded with its index.
# Other pickles (optimizer.pt, training_args.bin) are never fetched.
CONVERTIBLE_PATTERNS = ("pytorch_model*.bin", "pytorch_model.bin.index.json")
# With --trust-remote-code, the model's own Python modules come along (auto_map points at them).
REMOTE_CODE_PATTERNS = ("*.py",)
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


def is_pickle_checkpoint(relpath: str) -> bool:
    return any(fnmatch.fnmatch(Path(relpath).name, pattern) for pattern in PICKLE_PATTERNS)


def is_convertible(relpath: str) -> bool:
    return any(fnmatch.fnmatch(relpath, pattern) for pattern in CONVERTIBLE_PATTERNS)


def check_safetensors(path: Path, *, shown: str | None = None) -> dict:
    """Check by content that a .safetensors file really is one: bounded header length, JSON header; return the
    header (tensor name -> dtype, shape, offsets).

    Messages name the file as `shown` when given (where the user knows it from).
    """
    name = shown or str(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise UnsafeModelError(f"{name}: not a safetensors file (shorter than its 8-byte header)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > MAX_SAFETENSORS_HEADER or header_len > size - 8:
            raise UnsafeModelError(f"{name}: not a safetensors file (header length {header_len} out of bounds)")
        try:
            header = json.loads(handle.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise UnsafeModelError(f"{name}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise UnsafeModelError(f"{name}: not a safetensors file (header is not a JSON object)")
    return header


def parameter_count(directory: Path) -> int:
    """How many weights the directory's safetensors files hold, from their headers (nothing else is read)."""
    total = 0
    for weights in sorted(directory.rglob("*.safetensors")):
        for key, tensor in check_safetensors(weights).items():
            if key != "__metadata__" and isinstance(tensor, dict):
                count = 1
                for dimension in tensor.get("shape", []):
                    count *= int(dimension)
                total += count
    return total


def read_config(directory: Path, *, trust_remote_code: bool, shown: str | None = None) -> dict:
    """A model directory's config.json, checked: present, JSON, and no remote code unless trusted.

    Messages name files under `shown` when given (the model the user passed) rather than `directory`,
    which may be a step's scratch directory that is gone by the time the message is read.
    """
    where = shown or str(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise UnsupportedModelError(f"{where}: no config.json; lmpack needs a Hugging Face model directory")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise UnsupportedModelError(f"{where}/config.json: not valid JSON ({exc})") from None
    if config.get("auto_map") and not trust_remote_code:
        raise UnsafeModelError(
            f"{where}/config.json: the model needs its own Python code (auto_map) to load",
            hint="pass --trust-remote-code only if you trust this repository",
        )
    return config


def check_model_dir(directory: Path, *, trust_remote_code: bool, shown: str | None = None) -> dict:
    """Safety and sanity checks on a pulled directory (config, then safetensors weights); returns its config.json."""
    config = read_config(directory, trust_remote_code=trust_remote_code, shown=shown)
    where = shown or str(directory)
    weights = sorted(directory.rglob("*.safetensors"))
    if not weights:
        raise UnsafeModelError(
            f"{where}: no safetensors weights found",
            hint="lmpack never loads pickle checkpoints; pass --allow-pickle to convert them once",
        )
    for weight in weights:
        check_safetensors(weight, shown=f"{where}/{weight.relative_to(directory).as_posix()}")
    return config


def copy_side_files(src: Path, dst: Path) -> None:
    """Copy what a step that rewrites the weights does not write itself: tokenizer, chat template, pooling config,
    provenance. Weights and shard indexes stay behind (a stale index would point at shards that do not exist)."""
    for file in sorted(src.rglob("*")):
        if not file.is_file() or file.suffix == ".safetensors" or file.name.endswith(".index.json"):
            continue
        target = dst / file.relative_to(src)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, target)


def read_license(directory: Path) -> str | None:
    """The `license:` field of the model card's front matter, if any."""
    readme = directory / "README.md"
    if not readme.is_file():
        return None
    lines = readme.read_text(errors="replace").splitlines()
    if not lines or lines[0].strip() != "---":
        return None
    for line in lines[1:]:
        if line.strip() == "---":
            break
        if line.startswith("license:"):
            return line.split(":", 1)[1].strip().strip("'\"") or None
    return None


# sentence-transformers' Pooling config keys and lmpack-model.json's names for the modes the runtime computes
_POOLING_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_lasttoken": "last"}


def sentence_pooling(directory: Path) -> tuple[str, bool]:
    """How the model's own sentence-transformers pipeline (modules.json) makes one vector of a text: the pooling
    ("mean", "cls" or "last") and whether it L2-normalises. Without modules.json: mean pooling, normalised."""
    modules_file = directory / "modules.json"
    if not modules_file.is_file():
        return "mean", True
    modules = json.loads(modules_file.read_text())
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    pooling = next((m for m, kind in zip(modules, kinds, strict=True) if kind == "Pooling"), None)
    mode = "mean"
    if pooling is not None:
        settings = json.loads((directory / pooling.get("path", "") / "config.json").read_text())
        chosen = [key for key, value in settings.items() if key.startswith("pooling_mode_") and value is True]
        if len(chosen) != 1 or chosen[0] not in _POOLING_MODES:
            raise UnsupportedModelError(
                f"the model's sentence-transformers pooling ({', '.join(chosen) or 'none'}) is not one lmpack "
                f"computes: it pools with one of {', '.join(sorted(_POOLING_MODES))}"
            )
        mode = _POOLING_MODES[chosen[0]]
    return mode, "Normalize" in kinds
