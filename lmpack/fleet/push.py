"""`lmpack fleet push BUNDLE`: the same verified install as `lmpack install`, on every alive node.

The bundle travels once into Ray's object store and from there to each node over the cluster's own network
(no shared disk, no internet). On each node a task writes it next to the install prefix and runs
bundle/install.py's install: the node's own trust (its install.toml, or --public-key as a path on the node),
every hash, the release venv from the bundled wheels, then the atomic switch of `current`. A node that refuses
the bundle keeps what it had; the others are not undone. Pushing a version a node has is a no-op there.
`push --sync` copies a release from a node that has it, after checking that node's copy against its manifest.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from lmpack.errors import FleetError, LmpackError
from lmpack.fleet.cluster import Node, alive_nodes, on_each_node, on_node


def install_here(data: bytes, prefix: str, public_key: str | None) -> dict[str, Any]:
    """Runs on a node: install the bundle's bytes under `prefix` (a Ray task; lmpack is the node's own)."""
    from lmpack.bundle.install import InstallOptions, install

    root = Path(prefix)
    root.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".push-", suffix=".lmpack", dir=root)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        options = InstallOptions(public_keys=(Path(public_key),) if public_key else ())
        result = install(Path(name), root, options)
    finally:
        Path(name).unlink(missing_ok=True)
    return {"name": result.name, "version": result.version, "action": result.action, "previous": result.previous}


def export_here(prefix: str, name: str, version: str) -> bytes:
    """Runs on a node: its installed NAME VERSION as a bundle tarball again (the release's own manifest and
    signature; every file re-hashed on the way, so a file that rotted on this disk fails here)."""
    from lmpack.bundle.archive import write_tarball
    from lmpack.bundle.releases import release_dir
    from lmpack.bundle.verify import DirBundle

    with tempfile.TemporaryDirectory(prefix=".export-", dir=prefix) as scratch:
        path = Path(scratch) / f"{name}-{version}.lmpack"
        with DirBundle(release_dir(Path(prefix), name, version)) as bundle:
            write_tarball(path, bundle.manifest_bytes, bundle.signature_bytes, bundle.contents())
        return path.read_bytes()


def damage_here(prefix: str, name: str, version: str) -> str | None:
    """Runs on a node: why its installed NAME VERSION no longer matches its manifest (the first file that
    differs), or None. Read before a copy is made from it, so a damaged copy is named and another taken."""
    from lmpack.bundle.releases import release_dir
    from lmpack.bundle.verify import DirBundle, check_contents

    with DirBundle(release_dir(Path(prefix), name, version)) as bundle:
        problems = check_contents(bundle, stop_at_first=True)
    return problems[0] if problems else None


def installed_here(prefix: str) -> list[dict[str, Any]]:
    """Runs on a node: the releases under `prefix`, as `lmpack list` shows them."""
    from lmpack.bundle.install import list_releases

    root = Path(prefix)
    if not root.is_dir():
        return []
    return [
        {"name": r.name, "version": r.version, "current": r.current, "problem": r.problem} for r in list_releases(root)
    ]


def push(bundle: Path, *, prefix: Path, public_key: Path | None = None) -> list[dict[str, Any]]:
    """Install `bundle` on every alive node; one report per node, failures included (never raised per node)."""
    import ray

    bundle = Path(bundle)
    if not bundle.is_file():
        raise FleetError(f"bundle {bundle} does not exist or is not a file")
    nodes = alive_nodes()
    data = ray.put(bundle.read_bytes())
    results = on_each_node(nodes, install_here, data, str(prefix), str(public_key) if public_key else None)
    return [_report(node, results[node.node_id]) for node in nodes]


def sync(pairs: list[tuple[str, str]], *, prefix: Path, public_key: Path | None = None) -> list[dict[str, Any]]:
    """Install each release of `pairs` (NAME, VERSION) on the alive nodes that lack it, copied from a node that has
    it (node to node, through Ray's object store); one report per node and release installed."""
    nodes = alive_nodes()
    installed = releases_by_node(nodes, prefix)
    reports: list[dict[str, Any]] = []
    for name, version in pairs:
        having = [n for n in nodes if has_release(installed[n.node_id], name, version)]
        lacking = [n for n in nodes if n not in having]
        if not lacking:
            continue
        if not having:
            raise FleetError(f"no alive node has {name} {version} to copy", hint="lmpack fleet push BUNDLE")
        source, damaged = _undamaged_source(having, prefix, name, version)
        reports += damaged
        if source is None:
            continue  # every copy is damaged: each is named, and the nodes that lack it are left as they are
        data = on_node(source, export_here, str(prefix), name, version)  # node to node, never here
        results = on_each_node(lacking, install_here, data, str(prefix), str(public_key) if public_key else None)
        reports += [_report(node, results[node.node_id]) for node in lacking]
    return reports


def _undamaged_source(
    having: list[Node], prefix: Path, name: str, version: str
) -> tuple[Node | None, list[dict[str, Any]]]:
    """The first node of `having` whose NAME VERSION still matches its manifest, and a failed report for each
    node before it whose copy does not (its release is left as it is: `lmpack fleet push BUNDLE` repairs it)."""
    import ray

    damaged: list[dict[str, Any]] = []
    for node in having:
        try:
            problem = ray.get(on_node(node, damage_here, str(prefix), name, version))
        except ray.exceptions.RayError as exc:
            problem = f"could not be read there: {type(exc).__name__}"
        if problem is None:
            return node, damaged
        error = FleetError(f"its {name} {version} no longer matches its manifest ({problem}); not copied from it")
        damaged.append({**_report(node, error), "action": "damaged"})
    return None, damaged


def releases_by_node(nodes: list[Node], prefix: Path) -> dict[str, Any]:
    """Node id -> the releases installed on it (`installed_here`), or the exception that node raised."""
    return on_each_node(nodes, installed_here, str(prefix))


def has_release(releases: Any, name: str, version: str) -> bool:
    """Whether a node's `releases_by_node` entry holds NAME VERSION, undamaged (a node that failed holds nothing)."""
    return not isinstance(releases, BaseException) and any(
        r["name"] == name and r["version"] == version and not r["problem"] for r in releases
    )


def _report(node: Node, result: Any) -> dict[str, Any]:
    report: dict[str, Any] = {"node": node.address, "node_id": node.node_id, "head": node.head}
    if isinstance(result, BaseException):
        message = result.message if isinstance(result, LmpackError) else f"{type(result).__name__}: {result}"
        return {**report, "ok": False, "error": message}
    return {**report, "ok": True, **result}
