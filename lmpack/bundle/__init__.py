"""Bundles: pack variants into one deterministic, optionally signed tarball; verify and install it offline.

Format: docs/bundle-format.md. The runtime side (manifest, archive, signing, verify, install) imports only
the standard library, lmpack.errors and lmpack.fsio (plus `cryptography` when a key is used), so it runs
on an air-gapped server without the build stack. This package imports nothing on its own.
"""
