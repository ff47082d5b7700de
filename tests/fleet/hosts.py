"""Several "hosts" on this machine for the fleet tests: each a network namespace on a private bridge, with its
own address, its own view of one install path (a bind mount in a mount namespace of its own) and its own
processes (a PID namespace), so every node has its own network, disk and process table as separate servers
do: `ray stop` on one host (`fleet leave`) stops that host's Ray only, and a host's loss ends its processes.

The bridge and namespaces live inside the test run's own network namespace (scripts/test runs pytest under
`unshare -n`): nothing here can reach beyond this machine, which Ray's cloud probes would otherwise try.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

SUBNET = "10.77.0"
BRIDGE_ADDRESS = f"{SUBNET}.1"
LMPACK = str(Path(sys.executable).parent / "lmpack")


def isolation_problem() -> str | None:
    """Why this process cannot host the fleet tests, or None (root, iproute2, no route off this machine)."""
    if os.geteuid() != 0:
        return "the fleet tests make network namespaces, which needs root"
    if not all(shutil.which(tool) for tool in ("ip", "unshare", "nsenter")):
        return "the fleet tests need iproute2's `ip` and util-linux's `unshare` and `nsenter`"
    routes = subprocess.run(["ip", "route", "show", "default"], capture_output=True, text=True).stdout.strip()
    if routes:
        return (
            "the fleet tests run Ray, which probes cloud metadata addresses: run them in a network namespace with "
            "only loopback, as scripts/test does (unshare -n)"
        )
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


# The first process of a host's PID namespace: it mounts the host's disk and then reaps what is orphaned
# there (Ray's daemons outlive the `ray start` that spawned them), as init does on a server.
_INIT = """
import os, subprocess, sys, time
subprocess.run(["mount", "--bind", sys.argv[1], sys.argv[2]], check=True)
print("up", flush=True)
while True:
    try:
        os.wait()
    except ChildProcessError:
        time.sleep(0.5)
"""


@dataclass
class Host:
    index: int
    netns: str
    address: str
    disk: Path  # what this host sees at the shared install path
    home: Path  # its LMPACK_HOME (install.toml)
    temp: Path  # Ray's session directory
    init: subprocess.Popen | None = None  # `unshare`, whose child is the host's first process

    def start(self, shared: Path) -> None:
        self.init = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, "unshare", "--pid", "--fork", "--mount", "--mount-proc",
             "--kill-child", sys.executable, "-c", _INIT, str(self.disk), str(shared)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        assert self.init.stdout is not None and self.init.stdout.readline().strip() == "up", "host did not start"

    @property
    def init_pid(self) -> int:
        """The host's first process, as this machine numbers it (unshare's only child)."""
        assert self.init is not None
        return int(Path(f"/proc/{self.init.pid}/task/{self.init.pid}/children").read_text().split()[0])

    def command(self, args: list[str]) -> list[str]:
        """`args` run on this host: in its network, mount (its disk) and PID namespaces."""
        return ["nsenter", "--target", str(self.init_pid), "--net", "--mount", "--pid", "--", *args]

    def pids(self) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def kill(self) -> None:
        """Every process of this host, at once (a power cut, as far as the others can tell): the end of a PID
        namespace's first process ends all of them."""
        if self.init is None or self.init.poll() is not None:
            return
        try:
            os.kill(self.init_pid, 9)
        except (ProcessLookupError, IndexError, FileNotFoundError):
            pass
        self.init.wait(30)


class Hosts:
    def __init__(self, root: Path, count: int):
        self.root = root
        self.shared = root / "prefix"  # the install path every host uses; each sees its own disk there
        self.shared.mkdir(parents=True)
        self.tag = f"lf{os.getpid() % 100000}"
        self.bridge = f"{self.tag}br"
        _ip("link", "set", "lo", "up")
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{BRIDGE_ADDRESS}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        self.hosts = [self._add(i) for i in range(1, count + 1)]

    def _add(self, i: int) -> Host:
        netns, veth, peer = f"{self.tag}n{i}", f"{self.tag}v{i}", f"{self.tag}p{i}"
        _ip("netns", "add", netns)
        _ip("link", "add", veth, "type", "veth", "peer", "name", peer)
        _ip("link", "set", peer, "netns", netns)
        _ip("link", "set", veth, "master", self.bridge, "up")
        address = f"{SUBNET}.{10 + i}"
        _ip("netns", "exec", netns, "ip", "link", "set", "lo", "up")
        _ip("netns", "exec", netns, "ip", "addr", "add", f"{address}/24", "dev", peer)
        _ip("netns", "exec", netns, "ip", "link", "set", peer, "up")
        # Ray's sockets live in its session directory, and a Unix socket path holds at most 107 bytes
        temp = Path(tempfile.mkdtemp(prefix=f"{self.tag}r{i}", dir="/tmp"))
        host = Host(i, netns, address, self.root / f"disk{i}", self.root / f"home{i}", temp)
        for path in (host.disk, host.home):
            path.mkdir(parents=True)
        host.start(self.shared)
        return host

    def run(
        self,
        host: Host,
        *args: str,
        token: Path,
        timeout: float = 300,
        check: bool = True,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess:
        """`lmpack ARGS` on `host`, as an operator there would run it (with `env` added to this environment)."""
        env = {**os.environ, "LMPACK_HOME": str(host.home), "LMPACK_FLEET_TOKEN_FILE": str(token), **(env or {})}
        done = subprocess.run(
            host.command([LMPACK, *map(str, args)]),
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"lmpack {' '.join(map(str, args))} on host {host.index}: exit {done.returncode}\n{done.stderr}"
            )
        return done

    def close(self) -> None:
        for host in self.hosts:
            host.kill()
        for host in self.hosts:
            subprocess.run(["ip", "netns", "delete", host.netns], capture_output=True)
            shutil.rmtree(host.temp, ignore_errors=True)
        subprocess.run(["ip", "link", "delete", self.bridge], capture_output=True)
