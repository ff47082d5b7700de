"""The fleet on three real hosts (network namespaces with their own disks) running real Ray and Ray Serve."""

from __future__ import annotations

import json
import threading
import time

import httpx
from conftest import HTTP_PORT, METRICS_PORT, join, trust


def fleet_cli(fleet, host, *args, check=True, timeout=300):
    return fleet.run(
        host, "fleet", *args, "--address", fleet.head_address, token=fleet.token, check=check, timeout=timeout
    )


def wait_until(predicate, timeout: float, what: str) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(1)
    raise AssertionError(f"not within {timeout:.0f} s: {what}")


def status(fleet, host=None) -> dict:
    """`fleet status --json`, from the second host (a node, not the head) unless told otherwise."""
    host = host or fleet.hosts[1]
    return json.loads(fleet_cli(fleet, host, "status", "--prefix", fleet.shared, "--json").stdout)


def deploy(fleet, host, version: str) -> dict:
    """Two replicas of tiny VERSION, four generations each: what the tests roll between."""
    args = ("--replicas", 2, "--prefix", fleet.shared, "--port", HTTP_PORT, "--max-concurrency", 4, "--json")
    return json.loads(fleet_cli(fleet, host, "deploy", "tiny", version, *args).stdout)


def test_a_pushed_bundle_is_installed_on_every_node_and_served_through_each_nodes_proxy(fleet, fleet_bundles):
    from openai import OpenAI

    pushed = json.loads(
        fleet_cli(fleet, fleet.hosts[0], "push", fleet_bundles["1.0.0"], "--prefix", fleet.shared, "--json").stdout
    )
    assert sorted(n["node"] for n in pushed["nodes"]) == [h.address for h in fleet.joined]
    assert all(n["ok"] and n["action"] == "installed" and n["version"] == "1.0.0" for n in pushed["nodes"])
    for host in fleet.joined:  # each host's own disk holds the release
        assert (host.disk / "releases" / "tiny" / "1.0.0" / "manifest.json").is_file()

    deployed = deploy(fleet, fleet.hosts[1], "1.0.0")
    assert deployed["status"]["status"] == "RUNNING" and deployed["previous"] is None

    # Serve runs a proxy on the head and on each node holding a replica: the same API through two of them
    proxies = [n["address"] for n in status(fleet)["nodes"] if n["proxy"] == "HEALTHY"]
    assert fleet.hosts[0].address in proxies and len(proxies) >= 2, proxies
    for address in proxies[:2]:
        client = OpenAI(base_url=f"http://{address}:{HTTP_PORT}/v1", api_key="unused", max_retries=0)
        assert "tiny" in [m.id for m in client.models.list().data]
        answer = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=8, temperature=0
        )
        assert answer.choices[0].finish_reason in ("stop", "length") and answer.usage.completion_tokens >= 1
        stream = client.completions.create(model="tiny", prompt="The railway", max_tokens=6, temperature=0, stream=True)
        assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices)

    now = status(fleet)
    assert [n["address"] for n in now["nodes"]] == [h.address for h in fleet.joined] and now["nodes"][0]["head"]
    assert all(any(r["version"] == "1.0.0" for r in n["releases"]) for n in now["nodes"])
    model = now["models"]["tiny"]
    assert model["version"] == "1.0.0" and model["status"] == "RUNNING"
    assert model["deployments"]["tiny"]["replicas"] == {"RUNNING": 2}


def test_each_nodes_metrics_port_shows_the_lmpack_metrics_of_its_replicas(fleet):
    """Ray's Prometheus endpoint on a node with a replica carries that replica's lmpack counters, tagged."""
    holding = [n["address"] for n in status(fleet)["nodes"] if n["proxy"] == "HEALTHY" and not n["head"]]
    assert holding
    # a proxy sends to a replica on its own node first (Serve's default): these generations are that replica's
    body = {"model": "tiny", "prompt": "The railway", "max_tokens": 4, "temperature": 0}
    for _ in range(3):
        httpx.post(f"http://{holding[0]}:{HTTP_PORT}/v1/completions", json=body, timeout=60).raise_for_status()
    url = f"http://{holding[0]}:{METRICS_PORT}/metrics"
    found: list[str] = []

    def copied() -> bool:
        text = httpx.get(url, timeout=10).text
        found[:] = [line for line in text.splitlines() if "lmpack_generated_tokens_total{" in line]
        return any(float(line.rsplit(" ", 1)[1]) > 0 for line in found)

    wait_until(copied, 90, f"lmpack's generated tokens counted at {url}")
    assert all('model="tiny"' in line and f'node="{holding[0]}"' in line for line in found), found


def test_a_node_that_does_not_trust_the_bundle_refuses_it_and_keeps_its_release(fleet, fleet_bundles):
    refusing = fleet.hosts[2]
    trust(refusing, fleet_bundles["other-pub"])
    try:
        done = fleet_cli(
            fleet, fleet.hosts[0], "push", fleet_bundles["1.1.0"], "--prefix", fleet.shared, "--json", check=False
        )
        assert done.returncode == 24, done.stderr
        nodes = {n["node"]: n for n in json.loads(done.stdout)["nodes"]}
        assert not nodes[refusing.address]["ok"] and "another key" in nodes[refusing.address]["error"]
        assert all(n["ok"] and n["version"] == "1.1.0" for a, n in nodes.items() if a != refusing.address)
        assert json.loads(done.stdout)["failed"] == [refusing.address]
        assert not (refusing.disk / "releases" / "tiny" / "1.1.0").exists()
        assert (refusing.disk / "releases" / "tiny" / "current").resolve().name == "1.0.0"
    finally:
        trust(refusing, fleet_bundles["pub"])
    again = json.loads(
        fleet_cli(fleet, fleet.hosts[0], "push", fleet_bundles["1.1.0"], "--prefix", fleet.shared, "--json").stdout
    )
    actions = {n["node"]: n["action"] for n in again["nodes"]}
    assert actions[refusing.address] == "installed"
    assert {a for n, a in actions.items() if n != refusing.address} == {"unchanged"}


class Load:
    """Clients sending completions until stopped, counting what failed. They go to the head's proxy, the one
    Serve always keeps (the others come and go with the replicas; a load balancer follows them by /-/healthz)."""

    def __init__(self, fleet, threads: int = 3):
        self.urls = [f"http://{fleet.hosts[0].address}:{HTTP_PORT}/v1/completions"]
        self.ok = 0
        self.failed: list[str] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._send, args=(i,), daemon=True) for i in range(threads)]

    def _send(self, index: int) -> None:
        body = {"model": "tiny", "prompt": "The railway", "max_tokens": 4, "temperature": 0}
        with httpx.Client(timeout=60) as client:
            n = index
            while not self.stop.is_set():
                url = self.urls[n % len(self.urls)]
                n += 1
                try:
                    response = client.post(url, json=body)
                    if response.status_code == 200:
                        self.ok += 1
                    else:
                        self.failed.append(f"{url}: {response.status_code} {response.text[:200]}")
                except httpx.HTTPError as exc:
                    self.failed.append(f"{url}: {type(exc).__name__}: {exc}")

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for thread in self.threads:
            thread.join(60)


def test_a_rolling_upgrade_under_load_fails_no_request_and_rolls_back(fleet):
    with Load(fleet) as load:
        time.sleep(2)
        before = load.ok
        upgraded = deploy(fleet, fleet.hosts[0], "1.1.0")
        during = load.ok - before
        time.sleep(1)
    seconds, failed = upgraded["seconds"], len(load.failed)
    print(f"\n[fleet timing] rolled 1.0.0 -> 1.1.0 in {seconds} s; {load.ok} requests, {failed} failed")
    assert upgraded["previous"] == "1.0.0" and upgraded["status"]["status"] == "RUNNING"
    assert during > 0, "no request was answered while the upgrade rolled"
    assert load.failed == []
    assert status(fleet)["models"]["tiny"]["history"] == ["1.0.0", "1.1.0"]

    with Load(fleet) as load:
        rolled = json.loads(fleet_cli(fleet, fleet.hosts[2], "rollback", "tiny", "--json").stdout)
    assert rolled["version"] == "1.0.0" and rolled["previous"] == "1.1.0"
    assert load.failed == [] and load.ok > 0
    assert status(fleet)["models"]["tiny"]["version"] == "1.0.0"


def test_a_client_with_another_token_is_refused(fleet, tmp_path):
    from lmpack.fleet.token import create_token

    wrong = create_token(tmp_path / "wrong.token")
    done = fleet.run(
        fleet.hosts[1],
        "fleet",
        "status",
        "--address",
        fleet.head_address,
        "--prefix",
        fleet.shared,
        token=wrong,
        check=False,
        timeout=120,
    )
    assert done.returncode == 24
    assert "token" in done.stderr


class Webhook:
    """An HTTP endpoint on the bridge's address that keeps the JSON events POSTed to it."""

    def __init__(self):
        import http.server

        from hosts import BRIDGE_ADDRESS

        events = self.events = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                events.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer((BRIDGE_ADDRESS, 0), Handler)
        self.url = f"http://{BRIDGE_ADDRESS}:{self.server.server_address[1]}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


def test_a_version_that_never_becomes_healthy_is_replaced_by_the_one_before_and_alerts(fleet, tmp_path):
    """1.1.0 deployed with a variant name no node has: its replicas fail to start, so 1.0.0 serves again."""
    hook = Webhook()
    agent_config = tmp_path / "agent.toml"
    agent_config.write_text(
        f'schema_version = 1\n[server]\nvariant = "/unused"\n[[notifiers]]\ntype = "webhook"\nurl = "{hook.url}"\n'
    )
    try:
        with Load(fleet) as load:
            done = fleet_cli(
                fleet, fleet.hosts[0], "deploy", "tiny", "1.1.0", "--replicas", 2, "--prefix", fleet.shared,
                "--variant", "no-such-variant", "--timeout", 120, "--agent-config", agent_config, check=False,
            )  # fmt: skip
    finally:
        hook.close()
    assert done.returncode == 24, done.stderr
    assert "1.1.0 did not become healthy" in done.stderr and "1.0.0 serves again" in done.stderr
    assert "no-such-variant" in done.stderr  # the replicas' own error is shown
    assert [e["alert"] for e in hook.events] == ["fleet_deploy_failed"]
    assert hook.events[0]["version"] == "1.1.0" and hook.events[0]["restored"] == "1.0.0"
    model = status(fleet)["models"]["tiny"]
    assert model["version"] == "1.0.0" and model["status"] == "RUNNING"
    assert load.failed == [] and load.ok > 0


def test_a_host_that_joins_later_gets_the_served_release_with_push_sync(fleet):
    late = fleet.hosts[3]
    join(fleet, late, fleet.token)
    fleet.joined.append(late)
    nodes = {n["address"]: n for n in status(fleet)["nodes"]}
    assert nodes[late.address]["releases"] == []
    synced = json.loads(fleet_cli(fleet, fleet.hosts[1], "push", "--sync", "--prefix", fleet.shared, "--json").stdout)
    assert [(n["node"], n["action"], n["version"]) for n in synced["nodes"]] == [(late.address, "installed", "1.0.0")]
    assert (late.disk / "releases" / "tiny" / "current").resolve().name == "1.0.0"
    again = json.loads(fleet_cli(fleet, fleet.hosts[1], "push", "--sync", "--prefix", fleet.shared, "--json").stdout)
    assert again["nodes"] == []


def running_replicas(fleet, host=None) -> int:
    return status(fleet, host)["models"]["tiny"]["deployments"]["tiny"]["replicas"].get("RUNNING", 0)


def test_a_queue_adds_a_replica_and_idleness_removes_it(fleet):
    fleet_cli(
        fleet, fleet.hosts[0], "deploy", "tiny", "1.0.0", "--replicas", 1, "--max-replicas", 2, "--max-concurrency", 1,
        "--scale-up-delay", 1, "--scale-down-delay", 3, "--prefix", fleet.shared,
    )  # fmt: skip
    wait_until(lambda: running_replicas(fleet) == 1, 120, "one replica before the load")
    with Load(fleet, threads=4) as load:
        up = wait_until(lambda: running_replicas(fleet) == 2, 120, "a second replica under a queue of 4 clients")
    down = wait_until(lambda: running_replicas(fleet) == 1, 120, "back to one replica once idle")
    print(f"\n[fleet timing] autoscaling: 1 -> 2 replicas {up:.0f} s into the load, back to 1 {down:.0f} s after it")
    assert load.failed == [] and load.ok > 0


def test_a_worker_host_lost_under_load_has_its_replica_restarted_elsewhere(fleet):
    fleet_cli(fleet, fleet.hosts[0], "deploy", "tiny", "1.0.0", "--replicas", 2, "--prefix", fleet.shared)
    wait_until(lambda: running_replicas(fleet) == 2, 120, "two replicas")
    # a node other than the head holds a replica where Serve runs a proxy (the head always has one)
    holding = [n["address"] for n in status(fleet)["nodes"] if n["proxy"] == "HEALTHY" and not n["head"]]
    assert holding, "no worker node holds a replica"
    lost = next(h for h in fleet.hosts if h.address == holding[0])
    with Load(fleet) as load:
        time.sleep(2)
        lost.kill()
        killed_at, ok_at_kill = time.monotonic(), load.ok
        head = fleet.hosts[0]  # asked from the head: a command on the lost host has no node to attach to
        restored = wait_until(
            lambda: (
                running_replicas(fleet, head) == 2
                and lost.address not in [n["address"] for n in status(fleet, head)["nodes"]]
            ),
            180,
            "two replicas again on the hosts left",
        )
        failed_at_recovery = len(load.failed)
        time.sleep(3)
    after = len(load.failed) - failed_at_recovery
    print(
        f"\n[fleet timing] host {lost.address} killed under load: two replicas again after {restored:.0f} s; "
        f"{load.ok} requests answered ({load.ok - ok_at_kill} after the kill), {len(load.failed)} failed"
    )
    assert load.ok > ok_at_kill, "nothing was answered after the host was lost"
    assert after == 0, load.failed[-after:]  # once the replica is back elsewhere, nothing fails
    assert time.monotonic() - killed_at < 240
