"""What the fleet tests use to talk to a fleet: lmpack's fleet commands on a host, their status, and clients
sending requests through the head's proxy."""

from __future__ import annotations

import json
import threading
import time

import httpx
from conftest import HTTP_PORT


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


def placement(now: dict) -> dict[str, list[dict]]:
    """`fleet status`'s replicas, by the address of the node that holds them (nodes without any left out)."""
    return {n["address"]: n["replicas"] for n in now["nodes"] if n["replicas"]}


class Load:
    """Clients sending completions until stopped, counting what failed. They go to the head's proxy, the one
    Serve always keeps (the others come and go with the replicas; a load balancer follows them by /-/healthz)."""

    def __init__(self, fleet, threads: int = 3, *, model: str = "tiny", max_tokens: int = 4):
        self.url = f"http://{fleet.hosts[0].address}:{HTTP_PORT}/v1/completions"
        self.body = {"model": model, "prompt": "The railway", "max_tokens": max_tokens, "temperature": 0}
        self.ok = 0
        self.failed: list[str] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._send, daemon=True) for _ in range(threads)]

    def _send(self) -> None:
        url = self.url
        with httpx.Client(timeout=60) as client:
            while not self.stop.is_set():
                try:
                    response = client.post(url, json=self.body)
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
