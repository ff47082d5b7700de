"""The agent: supervises one `lmpack serve` child, measures the host and the server, raises alerts.

Runtime half: standard library, psutil, lmpack.errors and lmpack.config.toml_reader only; nvidia-ml-py
is imported lazily. Nothing from lmpack.steps, lmpack.pipeline or lmpack.cli (tests/agent checks it).
"""
