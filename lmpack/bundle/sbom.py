"""A CycloneDX 1.5 SBOM for a bundle (`sbom.cdx.json`): every wheel and every model file, with sha256.

Written by hand from data pack already has, so it needs no SBOM library on the build host, and it is
deterministic (the serial number derives from the contents, the timestamp is the bundle's built_at),
so two packs of the same input still give the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterable
from typing import Any

from lmpack import __version__
from lmpack.bundle.manifest import FileEntry
from lmpack.bundle.wheels import Wheel

SBOM_NAME = "sbom.cdx.json"


def _hashes(sha256: str) -> list[dict[str, str]]:
    return [{"alg": "SHA-256", "content": sha256}]


def make_sbom(
    *, name: str, version: str, built_at: str, wheels: Iterable[Wheel], model_files: Iterable[FileEntry]
) -> bytes:
    """The SBOM document as canonical JSON bytes."""
    components: list[dict[str, Any]] = []
    for wheel in wheels:
        purl = f"pkg:pypi/{wheel.name}@{wheel.version}"
        components.append(
            {
                "type": "library",
                "bom-ref": purl,
                "name": wheel.name,
                "version": wheel.version,
                "purl": purl,
                "hashes": _hashes(wheel.sha256),
                "properties": [{"name": "lmpack:wheel", "value": wheel.filename}],
            }
        )
    for entry in model_files:
        components.append(
            {"type": "file", "bom-ref": f"file:{entry.path}", "name": entry.path, "hashes": _hashes(entry.sha256)}
        )
    seed = hashlib.sha256(json.dumps(components, sort_keys=True).encode()).hexdigest()
    document = {
        "bomFormat": "CycloneDX",
        "specVersion": "1.5",
        "version": 1,
        "serialNumber": f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, f'lmpack:{name}:{version}:{seed}')}",
        "metadata": {
            "timestamp": built_at,
            "tools": {"components": [{"type": "application", "name": "lmpack", "version": __version__}]},
            "component": {
                "type": "application",
                "bom-ref": f"bundle:{name}@{version}",
                "name": name,
                "version": version,
            },
        },
        "components": components,
    }
    return (json.dumps(document, indent=2, sort_keys=True, ensure_ascii=True) + "\n").encode("ascii")
