"""A three-host fleet for the fleet tests: a real Ray head and two real nodes, each host a network namespace with
its own disk at the install path (hosts.py), the tiny Llama packed as signed bundles 1.0.0 and 1.1.0."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("ray.serve", reason="the fleet extra (Ray Serve) is not installed: pip install -e '.[fleet]'")

from hosts import Hosts, isolation_problem  # noqa: E402

PORT = 6379
HTTP_PORT = 8000
METRICS_PORT = 9400


@pytest.fixture(scope="session")
def fleet_bundles(llama_variant, tmp_path_factory) -> dict[str, Path]:
    from lmpack.bundle import pack, signing

    root = tmp_path_factory.mktemp("fleet-bundles")
    made = {}
    made["key"], made["pub"], _ = signing.keygen(root / "release")
    made["other-key"], made["other-pub"], _ = signing.keygen(root / "other")
    for version in ("1.0.0", "1.1.0"):
        path = pack.pack([llama_variant], root / f"tiny-{version}.lmpack", name="tiny", version=version).path
        pack.sign_bundle(path, made["key"])
        made[version] = path
    return made


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, fleet_bundles):
    """Four hosts: a head and two nodes that joined it, and a fourth that has not joined yet; every host trusts
    the release key (install.toml)."""
    if (why := isolation_problem()) is not None:
        pytest.skip(why)
    from lmpack.fleet.token import create_token

    root = tmp_path_factory.mktemp("fleet")
    token = create_token(root / "fleet.token")
    hosts = Hosts(root / "hosts", 4)
    try:
        for host in hosts.hosts:
            trust(host, fleet_bundles["pub"])
        head = hosts.hosts[0]
        hosts.run(head, "fleet", "head", "--address", head.address, "--port", PORT, "--cpus", 1, "--memory-gib", 2,
                  "--metrics-port", METRICS_PORT, "--temp-dir", head.temp, token=token)  # fmt: skip
        for host in hosts.hosts[1:3]:
            join(hosts, host, token)
        hosts.token = token
        hosts.head_address = f"{head.address}:{PORT}"
        hosts.joined = hosts.hosts[:3]
        yield hosts
    finally:
        hosts.close()


def join(hosts, host, token: Path) -> None:
    hosts.run(host, "fleet", "join", f"{hosts.hosts[0].address}:{PORT}", "--address", host.address, "--cpus", 1,
              "--memory-gib", 2, "--metrics-port", METRICS_PORT, "--temp-dir", host.temp, token=token)  # fmt: skip


def trust(host, public_key: Path) -> None:
    """The host's install.toml: bundles must be signed by `public_key`."""
    shutil.copy(public_key, host.home / "release.pub")
    (host.home / "install.toml").write_text(
        'schema_version = 1\nrequire_signature = true\npublic_keys = ["release.pub"]\n'
    )
