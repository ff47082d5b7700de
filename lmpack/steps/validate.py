"""Validate (the quality gate): compare the optimized model with the fp32 export on text shipped with lmpack."""

from __future__ import annotations

import dataclasses
import re
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from lmpack.bundle.variant_dir import EMBEDDING
from lmpack.config.profiles import QualityGate
from lmpack.errors import QualityGateError
from lmpack.pipeline.step import ONNX_MODEL, Artifact, Step, StepContext
from lmpack.steps.export import onnx_model_path, read_model_info
from lmpack.steps.onnx_eval import DecoderRunner, EncoderRunner, log_softmax, windows


@dataclasses.dataclass(frozen=True)
class ValidateParams:
    max_tokens: int = 2048
    window: int = 256
    threads: int = 0  # 0: onnxruntime's default

    def validate(self) -> str | None:
        if self.max_tokens < 16 or self.window < 8:
            return "max_tokens must be at least 16 and window at least 8"
        return None


def eval_text() -> str:
    return resources.files("lmpack.data").joinpath("eval_text.txt").read_text(encoding="utf-8")


def _tokenizer(model_dir: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model_dir / "tokenizer.json"))


class ValidateStep(Step):
    name = "validate"
    consumes = ONNX_MODEL
    produces = ONNX_MODEL
    Params = ValidateParams
    writes_output = False
    tools = ("onnxruntime", "tokenizers")

    def cache_extra(self, ctx: StepContext) -> dict[str, Any]:
        return {"reference": ctx.reference().digest, "text": len(eval_text())}

    def run(self, ctx: StepContext, source: Artifact, out_dir: Path) -> dict[str, Any]:
        reference = ctx.reference()
        info = read_model_info(source.path)
        threads = self.params.threads or None
        if info["task"] == EMBEDDING:
            return _compare_encoders(reference.path, source.path, threads=threads, progress=ctx.progress)
        return _compare_decoders(reference.path, source.path, self.params, threads=threads, progress=ctx.progress)

    def finish(self, ctx: StepContext, source: Artifact, metrics: dict[str, Any]) -> None:
        profile = ctx.profile
        assert profile is not None  # a build's steps run with its profile
        checks = gate_checks(profile.quality, metrics)
        failed = not all(ok for _, ok in checks)
        metrics["gate"] = "failed" if failed else "passed"
        if failed and not ctx.options.get("allow_quality_loss"):
            # every check with its verdict, not only the failed ones: which fails first depends on the numbers
            results = "; ".join(f"{text}: {'ok' if ok else 'FAILED'}" for text, ok in checks)
            raise QualityGateError(
                f"quality gate of profile {profile.name!r} failed: {results}",
                hint="choose a gentler profile, or pass --allow-quality-loss to keep it anyway",
                measured=metrics,
            )
        if failed:
            metrics["gate"] = "overridden"


def gate_checks(gate: QualityGate, metrics: dict[str, Any]) -> list[tuple[str, bool]]:
    """Each of the gate's checks that the measurements allow, as (what was measured against what, passed)."""
    checks = []
    if "perplexity_increase" in metrics:
        increase, top1 = metrics["perplexity_increase"], metrics["top1_agreement"]
        checks.append(
            (
                f"perplexity {increase:+.2%} (allowed +{gate.max_perplexity_increase:.2%})",
                increase <= gate.max_perplexity_increase,
            )
        )
        checks.append(
            (f"top-1 agreement {top1:.3f} (needs {gate.min_top1_agreement:.3f})", top1 >= gate.min_top1_agreement)
        )
    if "cosine_similarity_mean" in metrics:
        cosine = metrics["cosine_similarity_mean"]
        checks.append(
            (
                f"cosine similarity {cosine:.4f} (needs {gate.min_cosine_similarity:.4f})",
                cosine >= gate.min_cosine_similarity,
            )
        )
    return checks


def _compare_decoders(ref_dir: Path, opt_dir: Path, params: ValidateParams, *, threads, progress) -> dict[str, Any]:
    ids = _tokenizer(opt_dir).encode(eval_text()).ids[: params.max_tokens]
    chunks = windows(ids, params.window)
    totals = {}
    predictions = {}
    for label, directory in (("reference", ref_dir), ("optimized", opt_dir)):
        runner = DecoderRunner(onnx_model_path(directory), threads=threads)
        nll, count, preds = 0.0, 0, []
        with progress(f"perplexity ({label})", len(chunks)) as advance:
            for chunk in chunks:
                logits = runner.logits(chunk)
                logp = log_softmax(logits[:-1])
                nll -= float(logp[np.arange(len(chunk) - 1), chunk[1:]].sum())
                count += len(chunk) - 1
                preds.append(logits.argmax(axis=-1))
                advance(1)
        totals[label] = float(np.exp(nll / count))
        predictions[label] = np.concatenate(preds)
    agreement = float(np.mean(predictions["reference"] == predictions["optimized"]))
    return {
        "tokens": sum(len(c) for c in chunks),
        "perplexity_reference": round(totals["reference"], 4),
        "perplexity": round(totals["optimized"], 4),
        "perplexity_increase": round(totals["optimized"] / totals["reference"] - 1.0, 5),
        "top1_agreement": round(agreement, 5),
    }


def _compare_encoders(ref_dir: Path, opt_dir: Path, *, threads, progress) -> dict[str, Any]:
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", eval_text()) if len(s.split()) >= 4][:64]
    tokenizer = _tokenizer(opt_dir)
    tokenizer.enable_truncation(128)
    tokenizer.enable_padding()
    encoded = tokenizer.encode_batch(sentences)
    ids = np.array([e.ids for e in encoded])
    mask = np.array([e.attention_mask for e in encoded])
    embeddings = {}
    for label, directory in (("reference", ref_dir), ("optimized", opt_dir)):
        runner = EncoderRunner(onnx_model_path(directory), threads=threads)
        with progress(f"embeddings ({label})", 1) as advance:
            embeddings[label] = np.concatenate(
                [runner.embed(ids[i : i + 16], mask[i : i + 16]) for i in range(0, len(ids), 16)]
            )
            advance(1)
    cosine = (embeddings["reference"] * embeddings["optimized"]).sum(axis=1)
    return {
        "sentences": len(sentences),
        "cosine_similarity_mean": round(float(cosine.mean()), 6),
        "cosine_similarity_min": round(float(cosine.min()), 6),
    }
