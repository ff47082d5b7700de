"""A three-host fleet for the fleet tests: a real Ray head and two real nodes, each host a network namespace with
its own disk at the install path (hosts.py), the tiny Llama packed as signed bundles 1.0.0 and 1.1.0."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("ray.serve", reason="the fleet extra (Ray Serve) is not installed: pip install -e '.[fleet]'")

from hosts import Hosts, isolation_problem  # noqa: E402

PORT = 6379
HTTP_PORT = 8000
METRICS_PORT = 9400
# Serve's proxies send to a replica on their own node when there is one. The tests' clients all go through
# the head's proxy, so with that preference a replica on the head would take every request and a lost
# worker's replica none: spread, each proxy's requests reach every replica, and what a host's loss costs
# is counted. The setting is Ray's, read by each node's processes from `ray start`'s environment.
SPREAD = {"RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0"}


def signed_bundles(variant: Path, root: Path, name: str, versions: tuple[str, ...]) -> dict[str, Path]:
    """`variant` packed as bundle NAME in each of `versions`, signed by `key`; `other-key` is a key nobody trusts."""
    from lmpack.bundle import pack, signing

    made = {}
    made["key"], made["pub"], _ = signing.keygen(root / "release")
    made["other-key"], made["other-pub"], _ = signing.keygen(root / "other")
    for version in versions:
        path = pack.pack([variant], root / f"{name}-{version}.lmpack", name=name, version=version).path
        pack.sign_bundle(path, made["key"])
        made[version] = path
    return made


@pytest.fixture(scope="session")
def fleet_bundles(llama_variant, tmp_path_factory) -> dict[str, Path]:
    return signed_bundles(llama_variant, tmp_path_factory.mktemp("fleet-bundles"), "tiny", ("1.0.0", "1.1.0"))


@contextmanager
def running_fleet(root: Path, public_key: Path, *, hosts: int, joined: int) -> Iterator[Hosts]:
    """`hosts` hosts, the first a head and the next `joined - 1` joined to it; every host trusts `public_key`."""
    if (why := isolation_problem()) is not None:
        pytest.skip(why)
    from lmpack.fleet.token import create_token

    token = create_token(root / "fleet.token")
    made = Hosts(root / "hosts", hosts)
    try:
        for host in made.hosts:
            trust(host, public_key)
        head = made.hosts[0]
        made.run(head, "fleet", "head", "--address", head.address, "--port", PORT, "--cpus", 1, "--memory-gib", 2,
                 "--metrics-port", METRICS_PORT, "--temp-dir", head.temp, token=token, env=SPREAD)  # fmt: skip
        for host in made.hosts[1:joined]:
            join(made, host, token)
        made.token = token
        made.head_address = f"{head.address}:{PORT}"
        made.joined = made.hosts[:joined]
        yield made
    finally:
        made.close()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, fleet_bundles):
    """Four hosts: a head and two nodes that joined it, and a fourth that has not joined yet; every host trusts
    the release key (install.toml)."""
    with running_fleet(tmp_path_factory.mktemp("fleet"), fleet_bundles["pub"], hosts=4, joined=3) as hosts:
        yield hosts


def join(hosts, host, token: Path, *, check: bool = True, env: dict[str, str] | None = None):
    return hosts.run(host, "fleet", "join", f"{hosts.hosts[0].address}:{PORT}", "--address", host.address, "--cpus",
                     1, "--memory-gib", 2, "--metrics-port", METRICS_PORT, "--temp-dir", host.temp, token=token,
                     check=check, env={**SPREAD, **(env or {})})  # fmt: skip


def trust(host, public_key: Path) -> None:
    """The host's install.toml: bundles must be signed by `public_key`."""
    shutil.copy(public_key, host.home / "release.pub")
    (host.home / "install.toml").write_text(
        'schema_version = 1\nrequire_signature = true\npublic_keys = ["release.pub"]\n'
    )
