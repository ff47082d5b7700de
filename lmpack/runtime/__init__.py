"""The serving half: load a variant, generate or embed with onnxruntime, answer an OpenAI-compatible HTTP API.

Everything here runs on the air-gapped server, so it imports only onnxruntime, tokenizers, numpy, jinja2,
starlette, uvicorn, llguidance (structured outputs) and (optionally) prometheus_client, and nothing from
lmpack.steps, lmpack.pipeline or lmpack.cli. tests/runtime/test_imports.py proves it. Import the submodules you
need; this package imports none.
"""
