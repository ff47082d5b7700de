"""Export parity: the fp32 ONNX export computes what the source model computes in PyTorch.

The quality gate compares each optimized variant with the fp32 export; this check ties that export to the source
(transformers at fp32, the model's own reference runtime), so the gate's numbers are measured against the source
model and not against a copy that already drifted (an exporter that mishandles a family's soft-capping, norm or
rotary layout). The two run one after the other, never side by side: the peak is one copy of the model.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import numpy as np

from lmpack.bundle.variant_dir import EMBEDDING
from lmpack.data import ENGLISH_PROSE, eval_texts
from lmpack.errors import FidelityError
from lmpack.steps.onnx_eval import DecoderRunner, EncoderRunner, log_softmax


def check_export(
    source_dir: Path, onnx_path: Path, info: dict[str, Any], *, tokens: int, tolerance: float, trust_remote_code: bool
) -> dict[str, Any]:
    """Compare the export at `onnx_path` (described by its lmpack-model.json `info`) with the model in `source_dir`
    on the first `tokens` tokens of English prose; outside `tolerance` (the largest difference of a log-probability,
    or of an embedding component) raise FidelityError naming the worst position."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(source_dir / "tokenizer.json"))
    ids = np.array(tokenizer.encode(eval_texts()[ENGLISH_PROSE]).ids[:tokens], dtype=np.int64)
    if info["task"] == EMBEDDING:
        pooling, normalize = info["pooling"], info["normalize"]
        expected = _torch_embeddings(source_dir, ids, pooling, normalize, trust_remote_code=trust_remote_code)
        runner = EncoderRunner(onnx_path, pooling=pooling, normalize=normalize)
        got = runner.embed(ids[None, :], np.ones((1, len(ids)), dtype=np.int64))[0]
        difference = np.abs(got - expected)
        worst = int(difference.argmax())
        measured = {"max_abs_diff": float(difference.max()), "worst_component": worst}
        where = f"embedding component {worst}"
    else:
        expected = log_softmax(_torch_logits(source_dir, ids, trust_remote_code=trust_remote_code))
        got = log_softmax(DecoderRunner(onnx_path).logits(ids))
        difference = np.abs(got - expected).max(axis=-1)
        worst = int(difference.argmax())
        measured = {
            "max_abs_diff": float(difference[worst]),
            "mean_abs_diff": float(np.abs(got - expected).mean()),
            "worst_position": worst,
            "top1_agreement": float((got.argmax(axis=-1) == expected.argmax(axis=-1)).mean()),
        }
        where = f"position {worst} (after {tokenizer.decode(ids[max(0, worst - 8) : worst + 1].tolist())!r})"
    result = {
        "reference": "transformers (PyTorch, fp32)",
        "tokens": len(ids),
        "tolerance": tolerance,
        **{k: float(f"{v:.3g}") if isinstance(v, float) else v for k, v in measured.items()},
    }
    if measured["max_abs_diff"] > tolerance:
        raise FidelityError(
            f"the fp32 ONNX export does not compute what the source model computes in PyTorch: the largest "
            f"difference is {measured['max_abs_diff']:.4g} (tolerance {tolerance:g}), at {where}",
            hint="the exporter mishandles this model; try the other exporter (export step's exporter = "
            '"optimum" or "onnxruntime-genai") and report the model',
        )
    return result


def _torch_logits(source_dir: Path, ids: np.ndarray, *, trust_remote_code: bool) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        source_dir, torch_dtype=torch.float32, trust_remote_code=trust_remote_code
    ).eval()
    try:
        with torch.no_grad():
            return model(input_ids=torch.from_numpy(ids)[None, :]).logits[0].float().numpy()
    finally:
        del model
        gc.collect()


def _torch_embeddings(
    source_dir: Path, ids: np.ndarray, pooling: str, normalize: bool, *, trust_remote_code: bool
) -> np.ndarray:
    """One unpadded text's vector, pooled as sentence-transformers pools it for this model."""
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(source_dir, torch_dtype=torch.float32, trust_remote_code=trust_remote_code).eval()
    try:
        with torch.no_grad():
            hidden = model(input_ids=torch.from_numpy(ids)[None, :]).last_hidden_state[0].float().numpy()
    finally:
        del model
        gc.collect()
    pooled = {"cls": hidden[0], "last": hidden[-1]}.get(pooling, hidden.mean(axis=0))
    return pooled / max(float(np.linalg.norm(pooled)), 1e-12) if normalize else pooled
