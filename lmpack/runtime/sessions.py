"""onnxruntime sessions for exported models: one decoder step with a KV cache, full-window logits, pooled embeddings.

The build's validate step and the server feed the same ONNX graphs, so the feeding code lives here once
(the build half may import the runtime, never the reverse).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
             "tensor(int32)": np.int32, "tensor(bool)": np.bool_}
_PAST_PREFIX = "past_key_values."
_PRESENT_PREFIX = "present."


def create_session(model_path: Path, *, threads: int | None = None, providers: Sequence[str] | None = None):
    """An InferenceSession on the first available of `providers` (CPU when none is available or given).

    A variant lists its target's providers in preference order; a server without the GPU package still
    answers on the CPU rather than failing to start.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    available = set(ort.get_available_providers())
    chosen = [p for p in (providers or []) if p in available] or ["CPUExecutionProvider"]
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return ort.InferenceSession(str(model_path), options, providers=chosen)


@dataclass
class KVCache:
    """The past keys and values of one sequence, kept as OrtValues so they go from one step to the next
    without a round trip through numpy (which copied the whole cache twice per token)."""

    length: int = 0
    values: dict[str, Any] = field(default_factory=dict)


class DecoderRunner:
    """A decoder exported with past/present KV-cache inputs and outputs (optimum's text-generation-with-past).

    Inputs: input_ids, attention_mask, position_ids and past_key_values.N.key/value shaped
    [batch, kv_heads, past_len, head_dim]; outputs: logits and present.N.key/value.
    """

    def __init__(self, model_path: Path, *, threads: int | None = None, providers: Sequence[str] | None = None):
        self.session = create_session(model_path, threads=threads, providers=providers)
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.output_index = self.output_names.index("logits")
        self.past_names = [name for name in self.inputs if name.startswith(_PAST_PREFIX)]
        unexpected = set(self.inputs) - {"input_ids", "attention_mask", "position_ids", *self.past_names}
        if unexpected:
            raise ValueError(f"unexpected decoder inputs {sorted(unexpected)}")

    def _type(self, name: str):
        return NP_TYPES[self.inputs[name].type]

    def _empty_past(self, name: str) -> np.ndarray:
        # [batch, kv_heads, past_len=0, head_dim]: the cache starts empty.
        shape = [1 if i == 0 else (0 if i == 2 else dim) for i, dim in enumerate(self.inputs[name].shape)]
        return np.zeros(shape, dtype=self._type(name))

    def _feed(self, ids: np.ndarray, past_length: int) -> dict[str, np.ndarray]:
        length = ids.shape[1]
        feed = {"input_ids": ids.astype(np.int64)}
        if "attention_mask" in self.inputs:
            feed["attention_mask"] = np.ones((1, past_length + length), dtype=self._type("attention_mask"))
        if "position_ids" in self.inputs:
            feed["position_ids"] = np.arange(past_length, past_length + length,
                                             dtype=self._type("position_ids")).reshape(1, -1)
        return feed

    def logits(self, token_ids: np.ndarray) -> np.ndarray:
        """Logits for every position of one window, from an empty cache: [length, vocab]."""
        feed = self._feed(token_ids.reshape(1, -1), 0)
        feed.update({name: self._empty_past(name) for name in self.past_names})
        return self.session.run(None, feed)[self.output_index][0].astype(np.float32)

    def step(self, token_ids: Sequence[int], cache: KVCache) -> np.ndarray:
        """Run `token_ids` after what `cache` holds; return the last position's logits and advance the cache."""
        import onnxruntime as ort

        ids = np.asarray(token_ids, dtype=np.int64).reshape(1, -1)
        feed = {name: ort.OrtValue.ortvalue_from_numpy(value) for name, value in self._feed(ids, cache.length).items()}
        for name in self.past_names:
            past = cache.values.get(name)
            feed[name] = past if past is not None else ort.OrtValue.ortvalue_from_numpy(self._empty_past(name))
        outputs = self.session.run_with_ort_values(self.output_names, feed)
        for name, value in zip(self.output_names, outputs):
            if name.startswith(_PRESENT_PREFIX):
                cache.values[_PAST_PREFIX + name[len(_PRESENT_PREFIX):]] = value
        cache.length += ids.shape[1]
        return outputs[self.output_index].numpy()[0, -1].astype(np.float32)


class EncoderRunner:
    """Mean-pooled, L2-normalised sentence embeddings (the sentence-transformers recipe)."""

    def __init__(self, model_path: Path, *, threads: int | None = None, providers: Sequence[str] | None = None):
        self.session = create_session(model_path, threads=threads, providers=providers)
        self.input_names = [i.name for i in self.session.get_inputs()]

    def embed(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        feed = {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64)}
        if "token_type_ids" in self.input_names:
            feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
        hidden = self.session.run(None, feed)[0].astype(np.float32)
        weights = mask[..., None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
        return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
