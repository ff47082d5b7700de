"""Load a variant directory (what `lmpack build` writes) into what the engines need, checking it first.

The directory's layout is lmpack/bundle/variant_dir.py's; a bare model directory (the `model/` folder
alone) loads too, so a step-cache output can be tried without a full build.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmpack.bundle.variant_dir import EMBEDDING, MODEL_INFO, POOLINGS, TASKS, VARIANT_FILE, is_model_dir, is_variant_dir
from lmpack.bundle.variant_dir import model_dir as model_dir_of
from lmpack.errors import NotFoundError, VariantError


@dataclass(frozen=True)
class Variant:
    path: Path
    name: str  # the directory's name (a served model's id is its bundle's name: served_names)
    task: str  # TEXT_GENERATION or EMBEDDING
    model_dir: Path
    onnx_path: Path
    info: dict[str, Any]  # lmpack-model.json
    meta: dict[str, Any]  # variant.json (empty for a bare model directory)
    config: dict[str, Any]  # config.json
    generation: dict[str, Any]  # generation_config.json (empty when absent)
    tokenizer_config: dict[str, Any]
    chat_template: str | None
    eos_token_ids: tuple[int, ...]
    context_length: int | None  # max_position_embeddings: prompt plus completion must fit
    providers: list[str] = field(default_factory=list)
    bundle: str | None = None  # the bundle or release it was chosen from (select.prepare_variant), if any

    def served_names(self, configured: tuple[str, ...] = ()) -> tuple[str, ...]:
        """The names a server answers to, first the one it reports: the configured ones, else the bundle's name
        (stable across versions), else the directory's; the directory's own name is always accepted too."""
        names = configured or ((self.bundle,) if self.bundle else ())
        return tuple(dict.fromkeys((*names, self.name)))

    @property
    def digest(self) -> str:
        """The model version for cache keys: build's `model_digest`, else a cheap stand-in from the ONNX file.

        The stand-in (name, size, modification time) avoids hashing gigabytes at start-up; a bare model
        directory has no recorded digest, and the cache lives only as long as the process anyway.
        """
        recorded = self.meta.get("model_digest")
        if isinstance(recorded, str) and recorded:
            return recorded
        stat = self.onnx_path.stat()
        return f"unrecorded:{self.onnx_path.name}:{stat.st_size}:{stat.st_mtime_ns}"

    def tokenizer(self):
        """A fresh `tokenizers.Tokenizer`: each engine configures its own (padding, truncation) without sharing."""
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))

    def special_token(self, name: str) -> str | None:
        """bos_token, eos_token, ... from tokenizer_config.json, which writes them as strings or AddedToken dicts."""
        value = self.tokenizer_config.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        return value if isinstance(value, str) else None


def _read_json(path: Path, *, required: bool) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise VariantError(f"{path} is missing", hint="point at a directory written by `lmpack build`")
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VariantError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise VariantError(f"{path} must hold a JSON object")
    return value


def _ids(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _chat_template(model_dir: Path, tokenizer_config: dict[str, Any]) -> str | None:
    """chat_template.jinja (what transformers writes now), else tokenizer_config's (a string or named list)."""
    file = model_dir / "chat_template.jinja"
    if file.is_file():
        return file.read_text(encoding="utf-8")
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template.strip() else None


def load_variant(path: Path | str) -> Variant:
    """Read and check a variant directory; raise NotFoundError or VariantError naming the file at fault."""
    root = Path(path)
    if not root.is_dir():
        raise NotFoundError(
            f"variant directory {root} does not exist", hint="build one with `lmpack build MODEL --target T -o dist/`"
        )
    meta: dict[str, Any] = {}
    if is_variant_dir(root):
        meta = _read_json(root / VARIANT_FILE, required=True)
    elif not is_model_dir(root):
        raise VariantError(
            f"{root} is not a variant: neither {VARIANT_FILE} nor {MODEL_INFO} is there",
            hint="point at a directory written by `lmpack build`",
        )
    model_dir = model_dir_of(root)
    info = _read_json(model_dir / MODEL_INFO, required=True)
    task = info.get("task")
    if task not in TASKS:
        raise VariantError(f"{model_dir / MODEL_INFO}: task {task!r} is not one of {', '.join(TASKS)}")
    if task == EMBEDDING and info.get("pooling", "mean") not in POOLINGS:
        raise VariantError(f"{model_dir / MODEL_INFO}: pooling {info['pooling']!r} is not one of {', '.join(POOLINGS)}")
    onnx_path = model_dir / str(info.get("onnx", "model.onnx"))
    if not onnx_path.is_file():
        raise VariantError(f"{onnx_path} is missing")
    if not (model_dir / "tokenizer.json").is_file():
        raise VariantError(f"{model_dir / 'tokenizer.json'} is missing: the runtime needs a fast tokenizer file")
    config = _read_json(model_dir / "config.json", required=False)
    generation = _read_json(model_dir / "generation_config.json", required=False)
    tokenizer_config = _read_json(model_dir / "tokenizer_config.json", required=False)
    eos = _ids(generation.get("eos_token_id")) + _ids(config.get("eos_token_id"))
    context = info.get("max_position_embeddings") or config.get("max_position_embeddings")
    return Variant(
        path=root,
        name=root.resolve().name,
        task=task,
        model_dir=model_dir,
        onnx_path=onnx_path,
        info=info,
        meta=meta,
        config=config,
        generation=generation,
        tokenizer_config=tokenizer_config,
        chat_template=_chat_template(model_dir, tokenizer_config),
        eos_token_ids=tuple(dict.fromkeys(eos)),
        context_length=int(context) if isinstance(context, int) and context > 0 else None,
        providers=list(meta.get("execution_providers") or []),
    )
