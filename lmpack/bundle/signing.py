"""Ed25519 signatures over the exact bytes of manifest.json, kept in manifest.sig beside it.

The manifest lists every file's sha256, so signing its bytes signs the whole bundle. The public key
that checks a signature always comes from the installer's side (`--public-key`), never from the
bundle: a key shipped inside the thing it vouches for proves nothing. Validity never depends on the
clock; there are no expiry times to trip over on an air-gapped host with a wrong date.

`cryptography` is imported only when a key is used, so verifying an unsigned bundle needs nothing
beyond the standard library.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from pathlib import Path

from lmpack.bundle import ed25519 as ed25519_fallback
from lmpack.bundle.manifest import SIGNATURE
from lmpack.errors import ConfigError, NotFoundError, VerificationError

ALGORITHM = "ed25519"
SIGNATURE_SCHEMA = 1
PRIVATE_SUFFIX = ".key"
PUBLIC_SUFFIX = ".pub"


def _crypto():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as exc:  # pragma: no cover - depends on the host
        raise ConfigError(
            "signing needs the 'cryptography' package, which is not installed",
            hint="pip install cryptography (it ships in the bundle's runtime wheels)",
        ) from exc
    return serialization, ed25519, InvalidSignature


def key_id(public_raw: bytes) -> str:
    """A short, stable name for a public key: the first 16 hex digits of the sha256 of its 32 raw bytes."""
    return hashlib.sha256(public_raw).hexdigest()[:16]


def keygen(base: Path) -> tuple[Path, Path, str]:
    """Write BASE.key (PKCS#8 PEM, mode 0600) and BASE.pub (SubjectPublicKeyInfo PEM); never overwrite."""
    serialization, ed25519, _ = _crypto()
    private_path = base.with_name(base.name + PRIVATE_SUFFIX)
    public_path = base.with_name(base.name + PUBLIC_SUFFIX)
    for path in (private_path, public_path):
        if path.exists():
            raise ConfigError(f"{path} already exists; refusing to overwrite a key", hint="choose another KEYBASE")
    key = ed25519.Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key()
    public_pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    base.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with open(fd, "wb") as handle:
        handle.write(private_pem)
    public_path.write_bytes(public_pem)
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return private_path, public_path, key_id(raw)


def _read_key(path: Path, *, private: bool):
    serialization, ed25519, _ = _crypto()
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise NotFoundError(f"key file {path} does not exist") from None
    try:
        key = (
            serialization.load_pem_private_key(data, password=None)
            if private
            else serialization.load_pem_public_key(data)
        )
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path} is not an unencrypted PEM {'private' if private else 'public'} key: {exc}") from exc
    wanted = ed25519.Ed25519PrivateKey if private else ed25519.Ed25519PublicKey
    if not isinstance(key, wanted):
        raise ConfigError(f"{path} is not an Ed25519 key", hint="make one with lmpack keygen -o KEYBASE")
    return key


def sign_manifest(manifest_bytes: bytes, private_key: Path) -> bytes:
    """The manifest.sig document for these manifest bytes."""
    serialization, _, _ = _crypto()
    key = _read_key(private_key, private=True)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    document = {
        "schema_version": SIGNATURE_SCHEMA,
        "algorithm": ALGORITHM,
        "key_id": key_id(raw),
        "signature": base64.b64encode(key.sign(manifest_bytes)).decode("ascii"),
    }
    return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode("ascii")


def _parse_signature(data: bytes) -> tuple[str, bytes]:
    try:
        document = json.loads(data.decode("utf-8"))
        if not isinstance(document, dict) or set(document) != {"schema_version", "algorithm", "key_id", "signature"}:
            raise ValueError("unexpected fields")
        if document["schema_version"] != SIGNATURE_SCHEMA or document["algorithm"] != ALGORITHM:
            raise ValueError(
                f"unsupported schema {document['schema_version']!r} or algorithm {document['algorithm']!r}"
            )
        signature = base64.b64decode(document["signature"], validate=True)
        if len(signature) != 64 or not isinstance(document["key_id"], str):
            raise ValueError("an Ed25519 signature is 64 bytes")
    except (UnicodeDecodeError, json.JSONDecodeError, binascii.Error, ValueError, TypeError) as exc:
        raise VerificationError(f"{SIGNATURE} is malformed: {exc}") from exc
    return document["key_id"], signature


def _verifier(public_key: Path):
    """(raw public key, verify(signature, message) -> bool): `cryptography`'s, or the pure-Python fallback."""
    try:
        _, _, invalid_signature = _crypto()
    except ConfigError:  # first install from install.py: only the standard library is there
        try:
            raw = ed25519_fallback.public_key_from_pem(Path(public_key).read_bytes())
        except FileNotFoundError:
            raise NotFoundError(f"key file {public_key} does not exist") from None
        if raw is None:
            raise ConfigError(
                f"{public_key} is not an Ed25519 public key in PEM", hint="use BASE.pub from lmpack keygen"
            ) from None
        return raw, lambda signature, message: ed25519_fallback.verify(raw, message, signature)
    serialization = _crypto()[0]
    key = _read_key(public_key, private=False)

    def verify(signature: bytes, message: bytes) -> bool:
        try:
            key.verify(signature, message)
        except invalid_signature:
            return False
        return True

    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw), verify


def check_trusted(manifest_bytes: bytes, signature_bytes: bytes | None, keys: list[Path], *, required: bool) -> str:
    """check_signature against any one of several trusted keys (a host policy may list more than one)."""
    if required and not keys:
        raise ConfigError(
            "this host requires signed bundles, but no public key is configured",
            hint="pass --public-key or list public_keys in install.toml",
        )
    if required and signature_bytes is None:
        raise VerificationError(
            f"this host requires signed bundles, and this one has no {SIGNATURE}",
            hint="sign it on the build host: lmpack sign BUNDLE --key KEY.key",
        )
    if len(keys) <= 1:
        return check_signature(manifest_bytes, signature_bytes, keys[0] if keys else None)
    failures = []
    for key in keys:
        try:
            return check_signature(manifest_bytes, signature_bytes, key)
        except VerificationError as exc:
            failures.append(str(exc))
    raise VerificationError(f"{SIGNATURE} verifies with none of the {len(keys)} trusted keys: {failures[-1]}")


def check_signature(manifest_bytes: bytes, signature_bytes: bytes | None, public_key: Path | None) -> str:
    """'valid', 'unsigned' or 'not checked' (signed, but no key given); raises when a given key does not verify."""
    if public_key is None:
        return "unsigned" if signature_bytes is None else "not checked"
    raw, verify = _verifier(public_key)
    if signature_bytes is None:
        raise VerificationError(
            f"the bundle has no {SIGNATURE} but --public-key was given",
            hint="sign it on the build host: lmpack sign BUNDLE --key KEY.key",
        )
    signed_by, signature = _parse_signature(signature_bytes)
    expected = key_id(raw)
    if not verify(signature, manifest_bytes):
        reason = (
            f"it was made with another key (key id {signed_by}, expected {expected})"
            if signed_by != expected
            else "manifest.json or the signature was altered, or it belongs to another bundle"
        )
        raise VerificationError(f"{SIGNATURE} does not verify manifest.json: {reason}") from None
    return "valid"
