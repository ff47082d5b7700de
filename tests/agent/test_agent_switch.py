"""Version switches through the agent's proxy, with real processes under constant load.

Two releases of the tiny Llama are installed into a temporary prefix as versions 1.0.0 and 1.1.0 (the
same variant packed twice: what changes is the process that serves it), plus, where needed, a 1.2.0
whose model file was broken after its install. A bounded thread load generator sends completions,
a third of them streaming, through the agent's client port the whole time. The numbers (switches,
failed requests, p99 latency during switches, time per switch) are printed as `[switch timing]` lines
and recorded in docs/operations.md.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from agent_helpers import WebhookReceiver, free_port, run_agent, wait_for, write_config

from lmpack import api
from lmpack.bundle.install import install, set_current
from lmpack.bundle.pack import pack
from lmpack.bundle.releases import current_version
from lmpack.errors import SwitchError

NAME = "tiny"
WORKERS = 3


def make_prefix(
    tmp: Path, variant: Path, versions: list[str], *, broken: str | None = None, how: str = "model-file"
) -> Path:
    """Install `variant` as each version (the first ends up current), then break version `broken` after its install.

    how="model-file": the ONNX file is garbage, so the server exits while loading it.
    how="warm-up": the model's context is 1 token, so it loads and answers liveness but its warm-up
    generation fails and readiness says "failed" for good.
    """
    prefix = tmp / "prefix"
    for version in versions:
        bundle = pack([variant], tmp / f"{NAME}-{version}.lmpack", name=NAME, version=version).path
        install(bundle, prefix)
    if broken is not None:
        model_dir = next((prefix / "releases" / NAME / broken / "variants").iterdir()) / "model"
        if how == "model-file":
            (model_dir / "model.onnx").write_bytes(b"this is not an onnx model" * 100)
        else:
            info = json.loads((model_dir / "lmpack-model.json").read_text())
            (model_dir / "lmpack-model.json").write_text(json.dumps({**info, "max_position_embeddings": 1}))
    set_current(prefix, NAME, versions[0])
    return prefix


def switch_config(tmp: Path, prefix: Path, *, probation_failures: int = 2, extra: str = "") -> Path:
    return write_config(
        tmp,
        None,
        server_port=free_port(),
        agent_port=free_port(),
        serve_args=[],
        release=(prefix, NAME),
        interval=0.3,
        extra=f"""
[switch]
probation_seconds = 30
probation_failures = {probation_failures}
alert_window_seconds = 3
backend_wait_seconds = 30
{extra}""",
    )


ALERT = """
[[alerts]]
name = "version-switch-failed"
metric = "switch_failures_recent"
op = ">="
threshold = 1
severity = "critical"

[[notifiers]]
type = "webhook"
url = "{url}"
timeout_seconds = 2
retries = 1
"""


class Load:
    """WORKERS threads sending requests back to back through the proxy; every outcome is recorded."""

    def __init__(self, url: str, *, streaming: bool = True):
        self.url, self.streaming = url, streaming
        self.records: list[tuple[float, float, str]] = []  # (start, end, "ok" | what went wrong)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(WORKERS)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def _run(self, worker: int) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            n = 0
            while not self._stop.is_set():
                n += 1
                stream = self.streaming and (n + worker) % 3 == 0
                started = time.monotonic()
                outcome = self._one(client, stream)
                self.records.append((started, time.monotonic(), outcome))
                if outcome == "429":
                    time.sleep(0.05)

    @staticmethod
    def _one(client: httpx.Client, stream: bool) -> str:
        body = {"prompt": "The railway", "max_tokens": 4, "temperature": 0, "stream": stream}
        try:
            if not stream:
                response = client.post("/v1/completions", json=body)
                if response.status_code == 200 and response.json()["choices"][0]["text"] is not None:
                    return "ok"
                return str(response.status_code)
            with client.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    response.read()
                    return str(response.status_code)
                lines = [line for line in response.iter_lines() if line]
                return "ok" if lines and lines[-1] == "data: [DONE]" else f"truncated stream {lines[-1:]}"
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"

    def failures(self) -> list[str]:
        return [outcome for _, _, outcome in self.records if outcome not in ("ok", "429")]

    def latencies(self, windows: list[tuple[float, float]] | None = None) -> list[float]:
        return sorted(
            end - start
            for start, end, outcome in self.records
            if outcome == "ok" and (windows is None or any(a <= start <= b or a <= end <= b for a, b in windows))
        )


def p99(values: list[float]) -> float:
    return values[min(len(values) - 1, int(0.99 * len(values)))] if values else float("nan")


def report(capsys, line: str) -> None:
    with capsys.disabled():
        print(f"\n[switch timing] {line}")


@pytest.mark.parametrize("rounds", [20, pytest.param(100, marks=pytest.mark.slow, id="soak-100")])
def test_switches_back_and_forth_under_load_fail_no_request(rounds, llama_variant, tmp_path, capsys, lmpack_cli):
    prefix = make_prefix(tmp_path, llama_variant, ["1.0.0", "1.1.0"])
    config = switch_config(tmp_path, prefix)
    with run_agent(config, tmp=tmp_path) as agent:
        assert agent.status()["server"]["version"] == "1.0.0"
        windows, results = [], []
        with Load(agent.server_url) as load:
            time.sleep(1.0)
            for i in range(rounds):
                version = "1.1.0" if i % 2 == 0 else "1.0.0"
                started = time.monotonic()
                if i == 0:  # once through the command line, as an operator would
                    shown = lmpack_cli("switch", NAME, version, "--prefix", prefix, "--agent", agent.url, "--json")
                    assert shown.exit_code == 0, shown.output
                    result = json.loads(shown.stdout)
                else:
                    result = api.agent_switch(NAME, version, url=agent.url)
                windows.append((started, time.monotonic()))
                results.append(result)
                assert result["action"] == "switched" and result["version"] == version
                assert current_version(prefix / "releases" / NAME) == version
                time.sleep(0.3)
            rolled = lmpack_cli("rollback", NAME, "--agent", agent.url)  # back to the one before: 1.1.0
            assert rolled.exit_code == 0 and "to 1.1.0 (was 1.0.0)" in rolled.output, rolled.output
            time.sleep(0.5)
        status = agent.status()
        assert status["server"]["version"] == "1.1.0" and status["switch"]["switches_total"] == rounds + 1
        assert status["switch"]["proxy"]["unavailable_total"] == 0
        failures = load.failures()
        assert failures == [], f"{len(failures)} failed requests: {failures[:5]}"
        during, overall = load.latencies(windows), load.latencies()
        took = sorted(r["seconds"] for r in results)
        report(
            capsys,
            f"{rounds} switches + 1 rollback under load ({WORKERS} clients, 1/3 streaming): "
            f"{len(load.records)} requests, 0 failed, {sum(o == '429' for *_, o in load.records)} 429; "
            f"p99 {p99(during) * 1000:.0f} ms during switches ({len(during)} requests), "
            f"p99 {p99(overall) * 1000:.0f} ms overall, p50 {overall[len(overall) // 2] * 1000:.0f} ms; "
            f"switch (start to all traffic moved) median {took[len(took) // 2]:.2f} s, max {took[-1]:.2f} s; "
            f"proxy retries {status['switch']['proxy']['retries_total']}",
        )


@pytest.mark.parametrize("how", ["model-file", "warm-up"])
def test_a_version_that_never_gets_ready_is_not_switched_to_and_alerts(how, llama_variant, tmp_path, lmpack_cli):
    prefix = make_prefix(tmp_path, llama_variant, ["1.0.0", "1.2.0"], broken="1.2.0", how=how)
    with WebhookReceiver() as hook:
        config = switch_config(tmp_path, prefix, extra=ALERT.format(url=hook.url))
        with run_agent(config, tmp=tmp_path) as agent:
            pid = agent.ready_pid()
            with Load(agent.server_url) as load:
                time.sleep(0.5)
                refused = lmpack_cli("switch", NAME, "1.2.0", "--agent", agent.url, "--json")
                time.sleep(0.5)
            assert refused.exit_code == 19, refused.output
            message = json.loads(refused.stdout)["error"]["message"]
            assert "did not become ready" in message
            assert ("warm-up failed" if how == "warm-up" else "exited") in message
            assert agent.ready_pid() == pid and agent.status()["server"]["version"] == "1.0.0"
            assert current_version(prefix / "releases" / NAME) == "1.0.0"
            assert load.failures() == [] and len(load.records) > 0
            wait_for(
                lambda: [e["state"] for e in hook.events] == ["firing", "resolved"],
                timeout=15,
                what="the switch alert firing, then resolving",
            )
            assert hook.events[0]["alert"] == "version-switch-failed"
            with pytest.raises(SwitchError, match="serves release 'tiny', not 'other'"):
                api.agent_switch("other", "1.0.0", url=agent.url)


def test_a_version_that_crashes_in_probation_is_rolled_back(llama_variant, tmp_path, capsys):
    prefix = make_prefix(tmp_path, llama_variant, ["1.0.0", "1.1.0"])
    with WebhookReceiver() as hook:
        config = switch_config(tmp_path, prefix, probation_failures=2, extra=ALERT.format(url=hook.url))
        with run_agent(config, tmp=tmp_path) as agent:
            with Load(agent.server_url, streaming=False) as load:
                time.sleep(0.5)
                assert api.agent_switch(NAME, "1.1.0", url=agent.url)["action"] == "switched"
                crashed = time.monotonic()
                for _ in range(2):  # two crashes within the probation: the second one triggers the rollback
                    pid = wait_for(
                        lambda: agent.status()["server"]["version"] == "1.1.0" and agent.ready_pid(),
                        timeout=30,
                        what="1.1.0 running",
                    )
                    os.kill(pid, signal.SIGKILL)
                    wait_for(lambda pid=pid: agent.ready_pid() != pid, timeout=30, what="the crash noticed", every=0.05)
                wait_for(
                    lambda: agent.status()["server"]["version"] == "1.0.0" and agent.ready_pid(),
                    timeout=60,
                    what="the rollback to 1.0.0",
                )
                back = time.monotonic() - crashed
                time.sleep(0.5)
            status = agent.status()["switch"]
            assert status["rollbacks_total"] == 1 and status["rolled_back"] == ["1.1.0"]
            assert status["last"]["action"] == "rolled-back" and status["last"]["automatic"]
            assert current_version(prefix / "releases" / NAME) == "1.0.0"
            failures = load.failures()
            assert len(failures) <= 2 * WORKERS, failures  # at most the requests in flight at each kill
            wait_for(
                lambda: [e["state"] for e in hook.events] == ["firing", "resolved"],
                timeout=15,
                what="the rollback alert firing, then resolving",
            )
            report(
                capsys,
                f"2 crashes in probation -> rolled back to 1.0.0 {back:.2f} s after the switch; "
                f"{len(load.records)} requests, {len(failures)} failed ({failures[:3]})",
            )


def test_rollback_targets_and_refused_requests(llama_variant, tmp_path):
    """Without processes: which version a rollback picks, and what a switch request is refused for."""
    from lmpack.agent.config import load_agent_config
    from lmpack.agent.proxy import Proxy
    from lmpack.agent.switch import VersionSwitcher

    prefix = make_prefix(tmp_path, llama_variant, ["1.0.0", "1.1.0", "1.2.0"])
    assert set_current(prefix, NAME, "1.2.0") == "1.0.0"
    releases = VersionSwitcher(load_agent_config(switch_config(tmp_path, prefix)), Proxy("127.0.0.1", 0))
    releases.active.version = "1.2.0"
    assert releases._rollback_target() == "1.1.0"  # nothing served before: the highest installed below
    releases.bad.add("1.1.0")
    assert releases._rollback_target() == "1.0.0"  # a version rolled back by probation is skipped
    releases.healthy = ["1.1.0", "1.0.0", "1.2.0"]
    assert releases._rollback_target() == "1.0.0"  # the last healthy one before the active one
    releases.active.version, releases.healthy = "1.0.0", []
    with pytest.raises(SwitchError, match="no previous healthy release"):
        releases._rollback_target()
    with pytest.raises(SwitchError, match="serves release 'tiny', not 'other'"):
        releases.request("other", "1.1.0")
    with pytest.raises(SwitchError, match="is not a version"):
        releases.request(NAME, "../../1.1.0")
    with pytest.raises(SwitchError, match="tiny 9.9.9 is not installed"):
        releases.request(NAME, "9.9.9")
    with pytest.raises(SwitchError, match="not /elsewhere"):
        releases.request(NAME, "1.1.0", "/elsewhere")
    variant_only = write_config(tmp_path, llama_variant, server_port=free_port(), agent_port=free_port(), serve_args=[])
    with pytest.raises(SwitchError, match="serves a variant directory"):
        VersionSwitcher(load_agent_config(variant_only), Proxy("127.0.0.1", 0)).request(NAME, "1.1.0")


def test_stopping_the_agent_with_a_switch_queued_leaves_current_as_installed(llama_variant, tmp_path):
    """A switch the agent abandons because it stops has not failed: `current` keeps what `lmpack install` set, so
    the next start serves the installed version."""
    from lmpack.agent.config import load_agent_config
    from lmpack.agent.proxy import Proxy
    from lmpack.agent.switch import VersionSwitcher

    prefix = make_prefix(tmp_path, llama_variant, ["1.0.0", "1.1.0"])
    releases = VersionSwitcher(load_agent_config(switch_config(tmp_path, prefix)), Proxy("127.0.0.1", 0))
    releases.active.version = "1.0.0"
    set_current(prefix, NAME, "1.1.0")  # what the install of 1.1.0 did
    queued = releases.request(NAME, "1.1.0")
    releases.stop()
    with pytest.raises(SwitchError, match="the agent is stopping"):
        queued.result(timeout=0)
    assert current_version(prefix / "releases" / NAME) == "1.1.0"
    assert releases.failures_recent() == 0


class OpenAILoad(Load):
    """The same load through the official `openai` client, which sends `model` with every request: the bundle's
    name, which every version answers to (a version's variant id would not survive the switch)."""

    def _run(self, worker: int) -> None:
        from openai import OpenAI

        client = OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=30)
        n = 0
        while not self._stop.is_set():
            n += 1
            started = time.monotonic()
            outcome = self._ask(client, stream=(n + worker) % 3 == 0)
            self.records.append((started, time.monotonic(), outcome))

    @staticmethod
    def _ask(client, *, stream: bool) -> str:
        import openai

        messages = [{"role": "user", "content": "The railway"}]
        try:
            if not stream:
                reply = client.chat.completions.create(model=NAME, messages=messages, max_tokens=4, temperature=0)
                return "ok" if reply.model == NAME and reply.choices[0].message.content is not None else reply.model
            chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=4, stream=True))
            return "ok" if chunks and chunks[-1].choices[0].finish_reason else f"truncated stream {chunks[-1:]}"
        except openai.APIError as exc:
            return f"{type(exc).__name__}: {exc}"


def test_the_official_client_naming_the_model_survives_switches_between_different_variants(
    llama_variant, tmp_path, capsys
):
    """1.0.0 and 1.1.0 hold differently named variants (as an int4 and an int8 build would); clients name the
    model as the bundle does. 20 switches under that load: no request fails."""
    renamed = tmp_path / "variants" / "tiny-llama-cpu-x86-int4"
    shutil.copytree(llama_variant, renamed)
    prefix = tmp_path / "prefix"
    for version, variant in (("1.0.0", llama_variant), ("1.1.0", renamed)):
        install(pack([variant], tmp_path / f"{NAME}-{version}.lmpack", name=NAME, version=version).path, prefix)
    set_current(prefix, NAME, "1.0.0")
    with run_agent(switch_config(tmp_path, prefix), tmp=tmp_path) as agent:
        with httpx.Client(base_url=agent.server_url) as client:
            listed = [m["id"] for m in client.get("/v1/models").json()["data"]]
        assert listed == [NAME, llama_variant.name]  # the bundle's name first, the variant's as an alias
        with OpenAILoad(agent.server_url) as load:
            time.sleep(1.0)
            for i in range(20):
                result = api.agent_switch(NAME, "1.1.0" if i % 2 == 0 else "1.0.0", url=agent.url)
                assert result["action"] == "switched"
                time.sleep(0.3)
        failures = load.failures()
        assert len(load.records) > 100 and failures == [], f"{len(failures)} failed: {failures[:5]}"
    report(
        capsys,
        f"20 switches between different variants, official client naming the model: "
        f"{len(load.records)} requests, 0 failed",
    )


def test_list_and_status_show_current_and_served_and_a_rollback_counts_as_one(llama_variant, tmp_path, lmpack_cli):
    """After an install that no switch followed, `current` and the served version differ: status and list both
    say so. A manual rollback is counted as a rollback and leaves no probation naming the version it left."""
    prefix = make_prefix(tmp_path, llama_variant, ["1.0.0"])
    with run_agent(switch_config(tmp_path, prefix), tmp=tmp_path) as agent:
        install(pack([llama_variant], tmp_path / "tiny-1.1.0.lmpack", name=NAME, version="1.1.0").path, prefix)
        wait_for(  # the status is the agent's snapshot, taken every metrics interval
            lambda: agent.status()["switch"]["release"]["current"] == "1.1.0", timeout=10, what="the new current"
        )
        assert agent.status()["switch"]["release"]["serving"] == "1.0.0"
        shown = lmpack_cli("status", "--agent", agent.url)
        assert "serving 1.0.0, installed current 1.1.0; run `lmpack switch tiny 1.1.0`" in shown.output
        listed = json.loads(lmpack_cli("list", "--prefix", prefix, "--agent", agent.url, "--json").stdout)
        assert listed["serving"] == {"name": NAME, "version": "1.0.0"}
        table = lmpack_cli("list", "--prefix", prefix, "--agent", agent.url).output.splitlines()
        assert "SERVING" in table[0]
        rows = {line.split()[1]: line.split()[2:4] for line in table[1:]}
        assert rows["1.0.0"][0] == "*" and rows["1.1.0"][0] == "*"  # 1.0.0 served, 1.1.0 current
        api.agent_switch(NAME, "1.1.0", url=agent.url)
        wait_for(
            lambda: (agent.status()["switch"]["probation"] or {}).get("version") == "1.1.0",
            timeout=10,
            what="1.1.0 on probation",
        )
        rolled = api.agent_switch(NAME, None, url=agent.url)
        wait_for(lambda: agent.status()["switch"]["rollbacks_total"] == 1, timeout=10, what="the rollback counted")
        switch = agent.status()["switch"]
        assert rolled["action"] == "rolled-back" and rolled["version"] == "1.0.0"
        assert switch["rollbacks_total"] == 1 and switch["probation"] is None
        assert (switch["release"]["serving"], switch["release"]["current"]) == ("1.0.0", "1.0.0")


def test_after_a_failed_switch_current_names_what_serves(llama_variant, tmp_path, lmpack_cli):
    """`lmpack install 1.2.0` moved `current`, then the switch to 1.2.0 failed (its model is broken): the agent
    keeps serving 1.0.0 and points `current` back at it, so no later start serves the broken one."""
    prefix = make_prefix(tmp_path, llama_variant, ["1.0.0", "1.2.0"], broken="1.2.0")
    with run_agent(switch_config(tmp_path, prefix), tmp=tmp_path) as agent:
        set_current(prefix, NAME, "1.2.0")  # what the install of 1.2.0 did
        refused = lmpack_cli("switch", NAME, "1.2.0", "--agent", agent.url)
        assert refused.exit_code == 19, refused.output
        assert current_version(prefix / "releases" / NAME) == "1.0.0"
        wait_for(
            lambda: (
                agent.status()["switch"]["release"]
                == {"name": NAME, "prefix": str(prefix.resolve()), "serving": "1.0.0", "current": "1.0.0"}
            ),
            timeout=10,
            what="status: current and served agree",
        )
