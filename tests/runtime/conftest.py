"""Runtime fixtures: int8 variants of the tiny models, and real `lmpack serve` processes on loopback ports."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from runtime_servers import Server, run_server


@pytest.fixture(scope="session")
def bundle_dir(llama_variant, tmp_path_factory) -> Path:
    """An unpacked two-variant bundle of the tiny Llama (the same files under two names)."""
    from lmpack.bundle.pack import pack

    root = tmp_path_factory.mktemp("select-bundle")
    second = root / "src" / "tiny-copy-cpu-x86-fp32"
    shutil.copytree(llama_variant, second)
    meta = json.loads((second / "variant.json").read_text())
    (second / "variant.json").write_text(json.dumps({**meta, "precision": "fp32"}))
    pack([llama_variant, second], root / "b.lmpack", name="tiny", version="1.0.0", keep_dir=root / "bundle")
    return root / "bundle"


@pytest.fixture(scope="module")
def llama_server(llama_variant, tmp_path_factory) -> Iterator[Server]:
    with run_server(
        llama_variant, "--max-concurrency", "2", "--queue", "4", tmp=tmp_path_factory.mktemp("serve")
    ) as server:
        yield server


@pytest.fixture(scope="module")
def tool_variant(llama_variant, tmp_path_factory) -> Path:
    """The tiny model with a chat template in Qwen2.5's tool syntax (families.SHORT_TOOLS_TEMPLATE)."""
    from families import SHORT_TOOLS_TEMPLATE

    variant = tmp_path_factory.mktemp("tools") / llama_variant.name
    shutil.copytree(llama_variant, variant)
    (variant / "model" / "chat_template.jinja").write_text(SHORT_TOOLS_TEMPLATE)
    return variant


@pytest.fixture(scope="module")
def tool_server(tool_variant, tmp_path_factory) -> Iterator[Server]:
    with run_server(
        tool_variant, "--max-concurrency", "2", "--max-batch", "2", tmp=tmp_path_factory.mktemp("tool-serve")
    ) as server:
        yield server
