"""Run exported ONNX models on evaluation text: full-sequence logits for decoders, pooled embeddings for encoders."""

from __future__ import annotations

from pathlib import Path

import numpy as np

_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
             "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def _session(model_path: Path, threads: int | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


class DecoderRunner:
    """Logits for a whole token window in one pass, with an empty KV cache where the model has one."""

    def __init__(self, model_path: Path, *, threads: int | None = None):
        self.session = _session(model_path, threads)
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_index = [o.name for o in self.session.get_outputs()].index("logits")

    def logits(self, token_ids: np.ndarray) -> np.ndarray:
        ids = token_ids.reshape(1, -1).astype(np.int64)
        length = ids.shape[1]
        feed = {"input_ids": ids}
        for name, spec in self.inputs.items():
            if name == "input_ids":
                continue
            if name == "attention_mask":
                feed[name] = np.ones((1, length), dtype=_NP_TYPES[spec.type])
            elif name == "position_ids":
                feed[name] = np.arange(length, dtype=_NP_TYPES[spec.type]).reshape(1, -1)
            elif name.startswith("past_key_values"):
                # [batch, kv_heads, past_len=0, head_dim]: the cache starts empty.
                shape = [1 if i == 0 else (0 if i == 2 else dim) for i, dim in enumerate(spec.shape)]
                feed[name] = np.zeros(shape, dtype=_NP_TYPES[spec.type])
            else:
                raise ValueError(f"unexpected decoder input {name!r}")
        return self.session.run(None, feed)[self.output_index][0].astype(np.float32)


class EncoderRunner:
    """Mean-pooled, L2-normalised sentence embeddings (the sentence-transformers recipe)."""

    def __init__(self, model_path: Path, *, threads: int | None = None):
        self.session = _session(model_path, threads)
        self.input_names = [i.name for i in self.session.get_inputs()]

    def embed(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        feed = {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64)}
        if "token_type_ids" in self.input_names:
            feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
        hidden = self.session.run(None, feed)[0].astype(np.float32)
        weights = mask[..., None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
        return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def windows(token_ids: list[int], size: int) -> list[np.ndarray]:
    """Non-overlapping windows of at most `size` tokens (each at least 2, so it predicts something)."""
    chunks = [np.array(token_ids[i:i + size]) for i in range(0, len(token_ids), size)]
    return [c for c in chunks if len(c) >= 2]
