"""Content-addressed cache of step outputs: same step, parameters, input, target and tools give the same key."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmpack.fsio import guard_disk_full
from lmpack.pipeline.digest import json_sha256

__all__ = ["CacheEntry", "StepCache", "cache_key", "guard_disk_full"]

META = "meta.json"
OUTPUT = "out"


@dataclass(frozen=True)
class CacheEntry:
    key: str
    path: Path
    meta: dict[str, Any]

    @property
    def output(self) -> Path:
        return self.path / OUTPUT


def cache_key(
    *,
    step: str,
    params: dict,
    input_digest: str,
    target_digest: str | None,
    tool_versions: dict[str, str],
    extra: dict | None = None,
) -> str:
    return json_sha256(
        {
            "step": step,
            "params": params,
            "input": input_digest,
            "target": target_digest,
            "tools": tool_versions,
            "extra": extra or {},
        }
    )


class StepCache:
    def __init__(self, root: Path):
        self.root = root

    def get(self, key: str) -> CacheEntry | None:
        path = self.root / key
        try:
            meta = json.loads((path / META).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return CacheEntry(key=key, path=path, meta=meta)

    def staging(self, key: str) -> Path:
        """A fresh directory to build into; `commit` moves it into place, `discard` removes it."""
        path = self.root / f".tmp-{key[:16]}-{uuid.uuid4().hex[:8]}"
        (path / OUTPUT).mkdir(parents=True)
        return path

    def commit(self, key: str, staging: Path, meta: dict[str, Any]) -> CacheEntry:
        with guard_disk_full(staging):
            (staging / META).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
            final = self.root / key
            if final.exists():  # another build finished the same work first: keep theirs
                shutil.rmtree(staging, ignore_errors=True)
            else:
                os.rename(staging, final)
        entry = self.get(key)
        assert entry is not None  # final now holds a complete entry (meta written before the rename): ours or theirs
        return entry

    @staticmethod
    def discard(staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)
