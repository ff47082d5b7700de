"""The fleet on three real hosts (network namespaces with their own disks) running real Ray and Ray Serve."""

from __future__ import annotations

import json
import threading
import time

import httpx
from clients import Load, fleet_cli, placement, status, wait_until
from conftest import HTTP_PORT, METRICS_PORT, join, trust


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
    # where each replica runs: two, one per node (--replicas-per-node 1), each node with one runs a proxy
    placed = placement(now)
    assert sorted(r["version"] for rs in placed.values() for r in rs) == ["1.0.0", "1.0.0"]
    assert all(len(rs) == 1 and rs[0]["model"] == "tiny" for rs in placed.values()), placed
    assert all(n["proxy"] == "HEALTHY" for n in now["nodes"] if n["address"] in placed)
    said = fleet_cli(fleet, fleet.hosts[1], "status", "--prefix", fleet.shared).stdout
    assert sorted(
        line.split(":")[0].split()[-1] for line in said.splitlines() if "replicas: tiny 1.0.0" in line
    ) == sorted(placed)


def test_each_nodes_metrics_port_shows_the_lmpack_metrics_of_its_replicas(fleet):
    """Ray's Prometheus endpoint on each node with a replica carries that replica's lmpack counters, tagged."""
    holding = list(placement(status(fleet)))
    body = {"model": "tiny", "prompt": "The railway", "max_tokens": 4, "temperature": 0}
    for _ in range(8):  # through the head's proxy, which spreads them over the replicas (conftest.SPREAD)
        httpx.post(f"http://{fleet.hosts[0].address}:{HTTP_PORT}/v1/completions", json=body, timeout=60)
    found: dict[str, list[str]] = {}

    def copied() -> bool:
        for address in holding:
            text = httpx.get(f"http://{address}:{METRICS_PORT}/metrics", timeout=10).text
            found[address] = [line for line in text.splitlines() if "lmpack_generated_tokens_total{" in line]
        return sum(float(line.rsplit(" ", 1)[1]) for lines in found.values() for line in lines) >= 8

    wait_until(copied, 90, f"lmpack's generated tokens counted on the metrics ports of {holding}")
    for address, lines in found.items():
        assert lines and all('model="tiny"' in line and f'node="{address}"' in line for line in lines), found


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


def test_a_host_with_another_lmpack_is_refused_at_join_and_leaves_again(fleet, tmp_path):
    """The fourth host runs an lmpack that says it is another version (a sitecustomize on its PYTHONPATH): Ray
    lets the node in, lmpack's check then finds the other version and stops that host's Ray again."""
    (tmp_path / "sitecustomize.py").write_text('import lmpack\nlmpack.__version__ = "0.0.0-other"\n')
    other = fleet.hosts[3]
    done = join(fleet, other, fleet.token, check=False, env={"PYTHONPATH": str(tmp_path)})
    assert done.returncode == 24, done.stderr
    assert "this node runs lmpack 0.0.0-other" in done.stderr and "the node left again" in done.stderr
    left = set(other.pids()) - {other.init.pid, other.init_pid}  # all but the host's unshare and init
    assert not left, f"processes still running on the refused host: {left}"
    joined = [h.address for h in fleet.joined]
    wait_until(lambda: [n["address"] for n in status(fleet)["nodes"]] == joined, 30, "the refused node gone")


def test_a_host_that_joins_later_gets_the_served_release_with_push_sync_from_an_intact_copy(fleet):
    late = fleet.hosts[3]
    join(fleet, late, fleet.token)
    fleet.joined.append(late)
    nodes = {n["address"]: n for n in status(fleet)["nodes"]}
    assert nodes[late.address]["releases"] == []

    # a file altered in the head's release (the first node a copy would come from): the head is named, its
    # release left as it is, and the late host gets its copy from the next node that has an intact one
    head = fleet.hosts[0]
    release = head.disk / "releases" / "tiny" / "1.0.0"
    head_current = (head.disk / "releases" / "tiny" / "current").resolve()
    listed = [f["path"] for f in json.loads((release / "manifest.json").read_text())["files"]]
    altered = min((release / p for p in listed if p.endswith(".json")), key=lambda f: f.stat().st_size)
    original = altered.read_bytes()
    altered.write_bytes(original.replace(b"{", b"[", 1))
    try:
        done = fleet_cli(fleet, fleet.hosts[1], "push", "--sync", "--prefix", fleet.shared, "--json", check=False)
    finally:
        altered.write_bytes(original)
    assert done.returncode == 24, done.stderr
    reports = {n["node"]: n for n in json.loads(done.stdout)["nodes"]}
    assert sorted(reports) == sorted([head.address, late.address])
    assert reports[head.address]["action"] == "damaged" and not reports[head.address]["ok"]
    assert altered.relative_to(release).as_posix() in reports[head.address]["error"], reports[head.address]
    assert reports[late.address]["ok"] and reports[late.address]["action"] == "installed"
    assert (late.disk / "releases" / "tiny" / "current").resolve().name == "1.0.0"
    assert (head.disk / "releases" / "tiny" / "current").resolve() == head_current

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
    placed = placement(status(fleet))
    workers = [a for a in placed if a != fleet.hosts[0].address]
    assert workers, f"no worker node holds a replica: {placed}"
    lost = next(h for h in fleet.hosts if h.address == workers[0])
    # the head's proxy spreads the clients' requests over both replicas (conftest.SPREAD): the lost one had its
    # share, and with 16-token answers a request of it is in flight at almost any moment
    with Load(fleet, max_tokens=16) as load:
        time.sleep(3)
        ok_before = load.ok
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
    now = placement(status(fleet, fleet.hosts[0]))
    print(
        f"\n[fleet timing] host {lost.address} killed under load, replicas were on {sorted(placed)}, now on "
        f"{sorted(now)}: two replicas again after {restored:.0f} s; {load.ok} requests answered ({ok_before} in the "
        f"3 s before the kill, {load.ok - ok_at_kill} after it), {len(load.failed)} failed: {load.failed[:3]}"
    )
    assert lost.address not in now and sum(map(len, now.values())) == 2
    assert load.ok > ok_at_kill, "nothing was answered after the host was lost"
    # what is lost is what was in flight there: at most one request of each client (Serve's router checks a
    # replica before it sends, so later requests go to the replica left)
    assert len(load.failed) <= len(load.threads), load.failed
    assert after == 0, load.failed[-after:]  # once the replica is back elsewhere, nothing fails
    assert time.monotonic() - killed_at < 240
