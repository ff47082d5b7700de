"""Total tokens/s of `lmpack serve` with 1, 4 and 8 concurrent clients, with and without batching.

    python bench/concurrency.py dist/VARIANT [--tokens 48] [--threads 2] [--clients 1 4 8] [--repeat 2]

For each server setting (--max-batch 1: every generation alone in its own thread, sharing the cores;
batched with the default --batch-align 4: answers identical to unbatched ones, a newcomer may wait up
to 3 steps to join; batched with --batch-align 1: joins at once, int8 answers may differ) it starts a
real server on a loopback port. Then, for each client count, it sends that many greedy
/v1/completions requests at once (distinct prompts, --tokens new tokens each) and divides the
completion tokens by the wall time from the first send to the last answer, prompt processing
included; the best of --repeat rounds is kept. All servers start first and the settings take turns
within each round, so a change in the machine's load hits them alike. It also reports the mean batch
size from lmpack_batch_size. Numbers on a shared machine are noisy: compare within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

PROMPTS = [
    "The history of the railway in England began",
    "Once upon a time, in a small village by the sea,",
    "The three most important inventions of the twentieth century are",
    "Water is made of",
    "A good breakfast for a long hike",
    "The capital of France is Paris, and the capital of Spain",
    "def fibonacci(n):",
    "In 1969, astronauts landed on the moon and",
]
# One pool of kept-alive connections for every request the benches send, as a real client (the OpenAI SDK)
# keeps one. A new httpx client per request builds a TLS context (30-60 ms of CPU here, even for http://)
# on the cores the server under test runs on. A one-client stream's time to first token was 82-91 ms that
# way against 27-36 ms with this pool; eight clients' 454-563 against 142-178 ms (SmolLM2 int8, 2 cores).
CLIENT = httpx.Client(timeout=600)
SETTINGS = {
    "unbatched": ["--max-batch", "1"],
    "batched-exact": ["--batch-align", "4"],
    "batched-all": ["--batch-align", "1"],
}


@dataclass
class Server:
    url: str
    pid: int
    ready_seconds: float  # cold start: process start to /health/ready (which waits for a warm-up generation)


@contextlib.contextmanager
def server(variant: str, flags: list[str], threads: int, concurrency: int):
    """A real `lmpack serve` on a free loopback port, ready (warmed up) when this yields."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    repo = Path(__file__).resolve().parents[1]  # this checkout's lmpack: `-m` imports from the working directory first
    env = {**os.environ, "PYTHONPATH": str(repo)}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lmpack",
            "serve",
            str(Path(variant).resolve()),
            "--port",
            str(port),
            "--threads",
            str(threads),
            "--max-concurrency",
            str(concurrency),
            "--queue",
            "16",
            *flags,
        ],
        cwd=repo,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    started = time.perf_counter()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if CLIENT.get(f"{url}/health/ready", timeout=2).status_code == 200:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server with {flags} did not start")
            time.sleep(0.05)
        yield Server(url, process.pid, time.perf_counter() - started)
    finally:
        process.terminate()
        process.wait(timeout=60)


def _metric(url: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", CLIENT.get(f"{url}/metrics").text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def at_once(jobs: list) -> tuple[float, list]:
    """Run the callables in threads released at the same moment; (seconds until the last ends, their results)."""
    barrier, results = threading.Barrier(len(jobs) + 1), [None] * len(jobs)

    def run(i: int) -> None:
        barrier.wait()
        results[i] = jobs[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started, results


def round_trip(url: str, clients: int, tokens: int) -> tuple[float, int]:
    """(seconds, completion tokens) for `clients` requests sent at the same moment."""

    def client(i: int) -> int:
        body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": tokens, "temperature": 0}
        return CLIENT.post(f"{url}/v1/completions", json=body).json()["usage"]["completion_tokens"]

    seconds, counts = at_once([lambda i=i: client(i) for i in range(clients)])
    return seconds, sum(counts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variant")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    args = parser.parse_args()
    best: dict[tuple[str, int], dict] = {}
    with contextlib.ExitStack() as stack:  # all servers up at once (idle ones use no CPU), measured in turns
        urls = {
            name: stack.enter_context(server(args.variant, SETTINGS[name], args.threads, max(args.clients))).url
            for name in args.settings
        }
        for _ in range(args.repeat):
            for clients in args.clients:
                for name, url in urls.items():
                    steps, rows = _metric(url, "lmpack_batch_size_count"), _metric(url, "lmpack_batch_size_sum")
                    seconds, count = round_trip(url, clients, args.tokens)
                    steps = _metric(url, "lmpack_batch_size_count") - steps
                    mean = (_metric(url, "lmpack_batch_size_sum") - rows) / steps if steps else None
                    row = {
                        "setting": name,
                        "clients": clients,
                        "tokens": count,
                        "seconds": round(seconds, 2),
                        "tokens_per_s": round(count / seconds, 1),
                        "mean_batch": round(mean, 2) if mean else None,
                    }
                    print(json.dumps(row), flush=True)
                    if (name, clients) not in best or row["tokens_per_s"] > best[name, clients]["tokens_per_s"]:
                        best[name, clients] = row
    results = [best[name, clients] for name in args.settings for clients in args.clients]
    print(f"\n{'setting':16} {'clients':>7} {'tokens':>6} {'seconds':>8} {'tokens/s':>9} {'mean batch':>10}")
    for r in results:
        print(
            f"{r['setting']:16} {r['clients']:7} {r['tokens']:6} {r['seconds']:8} {r['tokens_per_s']:9} "
            f"{r['mean_batch'] if r['mean_batch'] is not None else '-':>10}"
        )


if __name__ == "__main__":
    main()
