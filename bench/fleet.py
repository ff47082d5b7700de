"""The fleet against one server, in one run: throughput and latency with 1 and 2 replicas (--replicas) behind
Ray Serve's proxy, beside `lmpack serve` alone on one host; the proxy's overhead per request; the time to roll an
upgrade; the memory of each host (Ray's processes and the replicas); then the head's loss: how long a worker's
proxy keeps answering once the head's host is cut off, and how long the documented recovery takes (the head
started again, the nodes joined again, the version deployed again).

The hosts are network namespaces on one bridge, each with its own disk at the install path
(tests/fleet/hosts.py), on this one machine: every host shares its CPUs, so more replicas cannot add
throughput here beyond what the cores give; what this shows is the overhead of the fleet, not its scaling.
Needs root; it runs itself under `unshare -n` (loopback only) so Ray's probes go nowhere.

    sudo .venv/bin/python bench/fleet.py dist/smollm2-135m-instruct-cpu-x86-int8 --clients 4 --seconds 20 \
        --json fleet.json --svg docs/img/fleet-smollm2.svg
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
from collections.abc import Callable
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


def timeline(url: str, clients: int, seconds: float, event: Callable[[], None], at: float) -> dict:
    """`clients` threads posting one-token completions to `url` for `seconds`, `event()` called `at` seconds in:
    answered and failed requests in each second after the event, and the last second anything was answered."""
    answered: list[float] = []
    failed: list[float] = []
    stop = time.monotonic() + seconds

    def client() -> None:
        with httpx.Client(timeout=10) as http:
            while time.monotonic() < stop:
                try:
                    ok = http.post(url, json={**BODY, "max_tokens": 1, "model": "bench"}).status_code == 200
                except httpx.HTTPError:
                    ok = False
                (answered if ok else failed).append(time.monotonic())
                if not ok:
                    time.sleep(0.2)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(at)
    event_at = time.monotonic()
    event()
    for thread in threads:
        thread.join()
    after = [t - event_at for t in answered if t >= event_at]
    return {
        "answered_before": len(answered) - len(after),
        "answered_after": len(after),
        "failed_after": sum(1 for t in failed if t >= event_at),
        "last_answer_s": round(max(after), 1) if after else None,
        "first_failure_s": round(min((t - event_at for t in failed if t >= event_at), default=-1), 1),
    }


def svg(result: dict) -> str:
    """Tokens/s and p50/p99 latency of `lmpack serve` alone and of the fleet by replicas: bars, no plotting library."""
    rows = [("lmpack serve, 1 host", result["serve"])]
    rows += [(f"fleet, {n} replica{'s' if int(n) > 1 else ''}", row) for n, row in result["fleet"].items()]
    bar_h, gap, left, width = 18, 8, 170, 260
    panels = [("total tokens/s", "tokens_per_s", "#2b6cb0"), ("p50 / p99 latency, ms", "p99_ms", "#c05621")]
    lines = [
        f'<text x="10" y="18" font-weight="bold">SmolLM2 over Ray Serve: {result["clients"]} clients, '
        f"{result['cpus']} cores shared by every host</text>"
    ]
    for column, (title, key, colour) in enumerate(panels):
        x0 = left + column * (width + left + 80)  # room for the values after the first panel's bars
        top = max(row[key] or 0 for _, row in rows) or 1.0
        lines.append(f'<text x="{x0 - left + 10}" y="42" font-weight="bold">{title}</text>')
        for i, (label, row) in enumerate(rows):
            y = 52 + i * (bar_h + gap)
            w = (row[key] or 0) / top * width
            text = f"{row['p50_ms']:.0f} / {row['p99_ms']:.0f}" if key == "p99_ms" else f"{row[key]:.0f}"
            lines += [
                f'<text x="{x0 - left + 10}" y="{y + 13}">{label}</text>',
                f'<rect x="{x0}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{colour}" fill-opacity="0.5"/>',
                f'<text x="{x0 + w + 4:.1f}" y="{y + 13}">{text}</text>',
            ]
            if key == "p99_ms":
                w50 = (row["p50_ms"] or 0) / top * width
                lines.append(f'<rect x="{x0}" y="{y}" width="{w50:.1f}" height="{bar_h}" fill="{colour}"/>')
    height = 52 + len(rows) * (bar_h + gap) + 10
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * (left + width) + 160}" height="{height}" '
        f'font-family="sans-serif" font-size="12">\n<rect width="100%" height="100%" fill="white"/>\n'
        + "\n".join(lines)
        + "\n</svg>\n"
    )


def stop_tree(process: subprocess.Popen) -> None:
    """SIGTERM to `process` and what it started (nsenter does not pass signals on to its child)."""
    import psutil

    for child in psutil.Process(process.pid).children(recursive=True):
        child.terminate()
    process.terminate()
    process.wait(30)


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
    parser.add_argument("--svg", type=Path, default=None, help="write the plot here")
    parser.add_argument("--head-loss-seconds", type=float, default=150, help="how long to watch after the head's loss")
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

        # one lmpack serve on host 2, the baseline, with the settings a replica gets by default
        other = hosts.hosts[1]
        served = subprocess.Popen(
            other.command([str(Path(sys.executable).parent / "lmpack"), "serve",
                           str(hosts.shared / "releases" / "bench" / "current"), "--host", other.address, "--port",
                           str(SERVE_PORT), "--served-model-name", "bench"]),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        direct = f"http://{other.address}:{SERVE_PORT}"
        try:
            wait_ready(f"{direct}/health/ready")
            result["serve"] = load(f"{direct}/v1/completions", args.clients, args.seconds)
            result["serve_one_token_ms"] = overhead(f"{direct}/v1/completions")
        finally:
            stop_tree(served)

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

        # the head's host cut off (every process, as a power cut) while clients use a worker's proxy
        worker = next(n["address"] for n in fleet("status", "--prefix", hosts.shared)["nodes"]
                      if n["replicas"] and not n["head"])  # fmt: skip
        result["head_loss"] = timeline(f"http://{worker}:{HTTP_PORT}/v1/completions", 2, args.head_loss_seconds,
                                       head.kill, at=5)  # fmt: skip
        # the recovery docs/scale-out.md gives: the head again, each node out and in again, the version again
        started = time.monotonic()
        head.start(hosts.shared)
        hosts.run(head, "fleet", "head", "--address", head.address, *node, "--temp-dir", head.temp, token=token)
        for host in hosts.hosts[1:]:
            hosts.run(host, "fleet", "leave", token=token)
            hosts.run(host, "fleet", "join", f"{head.address}:6379", "--address", host.address, *node,
                      "--temp-dir", host.temp, token=token)  # fmt: skip
        fleet("deploy", "bench", "1.0.1", "--replicas", 2, "--prefix", hosts.shared, "--served-model-name", "bench")
        result["head_recovery_s"] = round(time.monotonic() - started, 1)
        overhead(f"{proxy}/v1/completions", n=3)  # it answers again
    finally:
        hosts.close()
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.svg:
        args.svg.parent.mkdir(parents=True, exist_ok=True)
        args.svg.write_text(svg(result))


if __name__ == "__main__":
    main()
