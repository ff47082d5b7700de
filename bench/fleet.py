"""The fleet against one server, in one run: throughput and latency with 1 and 2 replicas (--replicas) behind
Ray Serve's proxy, beside `lmpack serve` alone on one host; the proxy's overhead per request; the time to roll an
upgrade; the memory of each host (Ray's processes and the replicas).

The hosts are network namespaces on one bridge, each with its own disk at the install path
(tests/fleet/hosts.py), on this one machine: every host shares its CPUs, so more replicas cannot add
throughput here beyond what the cores give; what this shows is the overhead of the fleet, not its scaling.
Needs root; it runs itself under `unshare -n` (loopback only) so Ray's probes go nowhere.

    sudo .venv/bin/python bench/fleet.py dist/smollm2-135m-instruct.q4-1-cpu-x86-int8 --clients 4 --seconds 20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "fleet"))

from hosts import Hosts  # noqa: E402

HTTP_PORT = 8000
SERVE_PORT = 8100
BODY = {"prompt": "The history of the railway in England began", "max_tokens": 32, "temperature": 0}


def load(url: str, clients: int, seconds: float) -> dict:
    """`clients` threads posting completions to `url` for `seconds`: requests/s, tokens/s, p50/p99 latency."""
    latencies: list[float] = []
    tokens = [0]
    failed = [0]
    stop = time.monotonic() + seconds

    def client() -> None:
        with httpx.Client(timeout=120) as http:
            while time.monotonic() < stop:
                started = time.perf_counter()
                response = http.post(url, json={**BODY, "model": "bench"})
                if response.status_code != 200:
                    failed[0] += 1
                    continue
                latencies.append(time.perf_counter() - started)
                tokens[0] += response.json()["usage"]["completion_tokens"]

    threads = [threading.Thread(target=client) for _ in range(clients)]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - began
    latencies.sort()
    return {
        "clients": clients,
        "requests_per_s": round(len(latencies) / elapsed, 2),
        "tokens_per_s": round(tokens[0] / elapsed, 1),
        "p50_ms": round(1000 * latencies[len(latencies) // 2], 1) if latencies else None,
        "p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 1)
        if latencies
        else None,
        "failed": failed[0],
    }


def overhead(url: str, n: int = 60) -> float:
    """Median ms of a one-token completion, one at a time."""
    times = []
    with httpx.Client(timeout=60) as http:
        for _ in range(n):
            started = time.perf_counter()
            http.post(
                url, json={"prompt": "Hi", "max_tokens": 1, "temperature": 0, "model": "bench"}
            ).raise_for_status()
            times.append(time.perf_counter() - started)
    return round(1000 * statistics.median(times), 2)


def rss_mib(pids: list[int]) -> float:
    import psutil

    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.Error:
            pass
    return round(total / 2**20, 1)


def wait_ready(url: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} never answered")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variant", type=Path)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--replicas", default="1,2", help="replica counts to measure, comma-separated (at most hosts)")
    args = parser.parse_args()
    if os.environ.get("LMPACK_BENCH_ISOLATED") != "1":  # again, in a network namespace with loopback only
        script = 'ip link set lo up && exec "$@"'
        os.execvp("unshare", ["unshare", "-n", "sh", "-c", script, "sh", "env", "LMPACK_BENCH_ISOLATED=1",
                              sys.executable, *sys.argv])  # fmt: skip

    from lmpack.bundle import pack
    from lmpack.fleet.token import create_token

    root = Path(tempfile.mkdtemp(prefix="lmpack-fleet-bench-"))
    token = create_token(root / "fleet.token")
    bundles = {v: pack.pack([args.variant], root / f"bench-{v}.lmpack", name="bench", version=v).path
               for v in ("1.0.0", "1.0.1")}  # fmt: skip
    hosts = Hosts(root / "hosts", 3)
    head = hosts.hosts[0]
    result: dict = {"variant": str(args.variant), "cpus": os.cpu_count(), "clients": args.clients}
    try:
        node = ("--cpus", 1, "--memory-gib", 4)
        hosts.run(head, "fleet", "head", "--address", head.address, *node, "--temp-dir", head.temp, token=token)
        for host in hosts.hosts[1:]:
            hosts.run(host, "fleet", "join", f"{head.address}:6379", "--address", host.address, *node,
                      "--temp-dir", host.temp, token=token)  # fmt: skip
        result["idle_mib"] = {h.address: rss_mib(h.pids()) for h in hosts.hosts}

        def fleet(*command: object) -> dict:
            done = hosts.run(head, "fleet", *command, "--address", f"{head.address}:6379", "--json", token=token)
            return json.loads(done.stdout)

        fleet("push", bundles["1.0.0"], "--prefix", hosts.shared)

        # one lmpack serve on host 2, the baseline
        other = hosts.hosts[1]
        served = subprocess.Popen(
            other.command([str(Path(sys.executable).parent / "lmpack"), "serve",
                           str(hosts.shared / "releases" / "bench" / "current"), "--host", other.address, "--port",
                           str(SERVE_PORT), "--served-model-name", "bench"], hosts.shared),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        direct = f"http://{other.address}:{SERVE_PORT}"
        try:
            wait_ready(f"{direct}/health/ready")
            result["serve"] = load(f"{direct}/v1/completions", args.clients, args.seconds)
            result["serve_one_token_ms"] = overhead(f"{direct}/v1/completions")
        finally:
            served.terminate()
            served.wait(30)

        proxy = f"http://{head.address}:{HTTP_PORT}"
        result["fleet"] = {}
        for replicas in (int(n) for n in args.replicas.split(",")):
            started = time.monotonic()
            fleet("deploy", "bench", "1.0.0", "--replicas", replicas, "--prefix", hosts.shared,
                  "--served-model-name", "bench")  # fmt: skip
            row = {"deploy_s": round(time.monotonic() - started, 1)}
            row.update(load(f"{proxy}/v1/completions", args.clients, args.seconds))
            row["one_token_ms"] = overhead(f"{proxy}/v1/completions")
            row["host_mib"] = {h.address: rss_mib(h.pids()) for h in hosts.hosts}
            result["fleet"][replicas] = row
        fleet("push", bundles["1.0.1"], "--prefix", hosts.shared)
        started = time.monotonic()
        fleet("deploy", "bench", "1.0.1", "--replicas", 2, "--prefix", hosts.shared, "--served-model-name", "bench")
        result["roll_2_replicas_s"] = round(time.monotonic() - started, 1)
    finally:
        hosts.close()
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
