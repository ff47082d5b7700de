"""Runtime fixtures: int8 variants of the tiny models, and real `lmpack serve` processes on loopback ports."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
from runtime_servers import Server, run_server

from lmpack import api


@pytest.fixture(scope="session")
def bert_variant(tiny_bert, session_cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("variants")
    return api.build(str(tiny_bert), target="cpu-x86", profile="int8", output_dir=out,
                     cache_dir=session_cache).variant_dir


@pytest.fixture(scope="module")
def llama_server(llama_variant, tmp_path_factory) -> Iterator[Server]:
    with run_server(llama_variant, "--max-concurrency", "2", "--queue", "4",
                    tmp=tmp_path_factory.mktemp("serve")) as server:
        yield server
