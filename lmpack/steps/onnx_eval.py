"""Evaluation helpers for the validate step; the ONNX runners themselves live in the runtime, shared with serving."""

from __future__ import annotations

import numpy as np

from lmpack.runtime.sessions import DecoderRunner, EncoderRunner

__all__ = ["DecoderRunner", "EncoderRunner", "log_softmax", "windows"]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def windows(token_ids: list[int], size: int) -> list[np.ndarray]:
    """Non-overlapping windows of at most `size` tokens (each at least 2, so it predicts something)."""
    chunks = [np.array(token_ids[i : i + size]) for i in range(0, len(token_ids), size)]
    return [c for c in chunks if len(c) >= 2]
