"""Validate (the quality gate): compare the optimized model with the fp32 export on text shipped with lmpack."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import numpy as np

from lmpack.bundle.variant_dir import EMBEDDING
from lmpack.config.profiles import QualityGate
from lmpack.data import ENGLISH_PROSE, all_eval_text, eval_texts
from lmpack.errors import QualityGateError
from lmpack.pipeline.step import ONNX_MODEL, Artifact, Step, StepContext
from lmpack.runtime.trt_plan import CPU_EP, CUDA_EP
from lmpack.steps.export import onnx_model_path, read_model_info
from lmpack.steps.fp16 import FP16_MAX, largest_magnitude, range_check
from lmpack.steps.onnx_eval import DecoderRunner, EncoderRunner, log_softmax, windows

# A language model that reads plain English prose at a perplexity above this is broken (its weights or its tokenizer),
# whatever the optimized copy's agreement with it: docs/build.md, "The quality gate".
SANE_PROSE_PERPLEXITY = 100.0


@dataclasses.dataclass(frozen=True)
class ValidateParams:
    tokens_per_domain: int = 1024  # of each evaluation text (lmpack.data.DOMAINS)
    window: int = 256
    threads: int = 0  # 0: onnxruntime's default

    def validate(self) -> str | None:
        if self.tokens_per_domain < 16 or self.window < 8:
            return "tokens_per_domain must be at least 16 and window at least 8"
        return None


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
        return {"reference": ctx.reference().digest, "texts": {d: len(t) for d, t in eval_texts().items()}}

    def run(self, ctx: StepContext, source: Artifact, out_dir: Path) -> dict[str, Any]:
        reference = ctx.reference()
        info = read_model_info(source.path)
        threads = self.params.threads or None
        half = (info.get("quantization") or {}).get("method") == "fp16"
        providers = gate_providers(half)
        if info["task"] == EMBEDDING:
            metrics = _compare_encoders(
                reference.path, source.path, threads=threads, providers=providers, progress=ctx.progress
            )
        else:
            metrics = _compare_decoders(
                reference.path, source.path, self.params, threads=threads, providers=providers, progress=ctx.progress
            )
        if half:
            with ctx.progress("fp16 range of every half-precision tensor", 1) as advance:
                metrics["fp16_range"] = fp16_range(reference.path, source.path, info["task"], threads=threads)
                advance(1)
        return metrics

    def finish(self, ctx: StepContext, source: Artifact, metrics: dict[str, Any]) -> None:
        profile = ctx.profile
        assert profile is not None  # a build's steps run with its profile
        sanity = metrics.get("sanity")
        if sanity and not sanity["ok"] and ctx.options.get("strict"):
            raise QualityGateError(
                f"the source model reads plain English at perplexity {sanity['perplexity_reference']:.1f} (a working "
                f"language model stays under {sanity['limit']:.0f}): its weights or its tokenizer are broken",
                hint="check the model file; without --strict the build goes on with a warning in its report",
                measured=metrics,
            )
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


def gate_providers(half: bool) -> list[str] | None:
    """Where the gate runs the optimized model: an fp16 graph (`half`) on the CUDA provider when this onnxruntime
    has one, so its arithmetic is really fp16 (the CPU provider computes the nodes it lacks fp16 kernels for in
    fp32); None (the CPU) otherwise. Never yet run on a GPU (docs/gpu-targets.md)."""
    if not half:
        return None
    import onnxruntime as ort

    return [CUDA_EP, CPU_EP] if CUDA_EP in ort.get_available_providers() else None


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
    if "fp16_range" in metrics:
        found = metrics["fp16_range"]
        checks.append(
            (
                f"fp16 range: largest magnitude {found['max_abs']:.4g} in {found['worst']} (fp16 holds {FP16_MAX:.0f}; "
                f"{found['beyond_fp16_count']} tensors beyond)",
                found["beyond_fp16_count"] == 0,
            )
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


def _compare_decoders(
    ref_dir: Path, opt_dir: Path, params: ValidateParams, *, threads, providers, progress
) -> dict[str, Any]:
    """Both models on every domain's text, position by position: perplexity, top-1 agreement and the KL divergence
    of the optimized model's next-token distribution from the reference's, per domain and over all of them."""
    tokenizer = _tokenizer(opt_dir)
    chunks = {
        domain: windows(tokenizer.encode(text).ids[: params.tokens_per_domain], params.window)
        for domain, text in eval_texts().items()
    }
    reference = DecoderRunner(onnx_model_path(ref_dir), threads=threads)
    optimized = DecoderRunner(onnx_model_path(opt_dir), threads=threads, providers=providers)
    found: dict[str, Positions] = {}
    with progress("comparing with the reference", sum(map(len, chunks.values()))) as advance:
        for domain, domain_chunks in chunks.items():
            positions = found[domain] = Positions()
            for chunk in domain_chunks:
                positions.add(
                    log_softmax(reference.logits(chunk)[:-1]), log_softmax(optimized.logits(chunk)[:-1]), chunk
                )
                advance(1)
    everything = Positions.joined(found.values())
    sanity = found[ENGLISH_PROSE].summary()["perplexity_reference"]
    return {
        **everything.summary(),
        "domains": {domain: positions.summary() for domain, positions in found.items()},
        "sanity": {
            "text": ENGLISH_PROSE,
            "perplexity_reference": sanity,
            "limit": SANE_PROSE_PERPLEXITY,
            "ok": sanity <= SANE_PROSE_PERPLEXITY,
        },
    }


@dataclasses.dataclass
class Positions:
    """Per predicted position: the true next token's log-probability under each model, both top-1 choices, and the
    KL divergence KL(reference || optimized)."""

    nll_reference: list[np.ndarray] = dataclasses.field(default_factory=list)
    nll: list[np.ndarray] = dataclasses.field(default_factory=list)
    agree: list[np.ndarray] = dataclasses.field(default_factory=list)
    kl: list[np.ndarray] = dataclasses.field(default_factory=list)

    def add(self, logp_reference: np.ndarray, logp: np.ndarray, chunk: np.ndarray) -> None:
        rows, following = np.arange(len(chunk) - 1), chunk[1:]
        self.nll_reference.append(-logp_reference[rows, following])
        self.nll.append(-logp[rows, following])
        self.agree.append(logp_reference.argmax(axis=-1) == logp.argmax(axis=-1))
        self.kl.append((np.exp(logp_reference) * (logp_reference - logp)).sum(axis=-1))

    @classmethod
    def joined(cls, parts) -> Positions:
        whole = cls()
        for part in parts:
            for name in ("nll_reference", "nll", "agree", "kl"):
                getattr(whole, name).extend(getattr(part, name))
        return whole

    def summary(self) -> dict[str, Any]:
        nll_reference, nll = np.concatenate(self.nll_reference), np.concatenate(self.nll)
        kl = np.maximum(np.concatenate(self.kl), 0.0)  # rounding can make a near-zero divergence negative
        perplexity_reference, perplexity = float(np.exp(nll_reference.mean())), float(np.exp(nll.mean()))
        return {
            "tokens": int(len(nll)),
            "perplexity_reference": round(perplexity_reference, 4),
            "perplexity": round(perplexity, 4),
            "perplexity_increase": round(perplexity / perplexity_reference - 1.0, 5),
            "top1_agreement": round(float(np.concatenate(self.agree).mean()), 5),
            "kl_mean": round(float(kl.mean()), 6),
            "kl_p99": round(float(np.percentile(kl, 99)), 6),
        }


def _compare_encoders(ref_dir: Path, opt_dir: Path, *, threads, providers, progress) -> dict[str, Any]:
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", all_eval_text()) if len(s.split()) >= 4][:64]
    tokenizer = _tokenizer(opt_dir)
    tokenizer.enable_truncation(128)
    tokenizer.enable_padding()
    encoded = tokenizer.encode_batch(sentences)
    ids = np.array([e.ids for e in encoded])
    mask = np.array([e.attention_mask for e in encoded])
    embeddings = {}
    for label, directory in (("reference", ref_dir), ("optimized", opt_dir)):
        info = read_model_info(directory)
        runner = EncoderRunner(
            onnx_model_path(directory),
            threads=threads,
            pooling=info["pooling"],
            normalize=info["normalize"],
            providers=providers if label == "optimized" else None,
        )
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


# The first tokens of each evaluation text: enough for the activations' range, which the first positions already
# show; short, because every intermediate tensor of the window is read.
_RANGE_TOKENS = 128


def fp16_range(ref_dir: Path, opt_dir: Path, task: str, *, threads) -> dict[str, Any]:
    """steps/fp16.range_check on the evaluation text: the fp32 reference's values in every tensor the fp16 variant
    computes in half precision."""
    tokenizer = _tokenizer(opt_dir)
    feeds: list[Any]
    if task == EMBEDDING:
        tokenizer.enable_truncation(_RANGE_TOKENS)
        tokenizer.enable_padding()
        encoded = tokenizer.encode_batch(list(eval_texts().values()))
        feeds = [(np.array([e.ids]), np.array([e.attention_mask])) for e in encoded]

        def run(graph: bytes, weights: Path, names: list[str], feeds: list[Any]) -> list[dict[str, float]]:
            runner = EncoderRunner(graph, threads=threads, weights_dir=weights)
            return [_largest(names, runner.outputs(ids, mask, names)) for ids, mask in feeds]

    else:
        feeds = [np.array(tokenizer.encode(text).ids[:_RANGE_TOKENS]) for text in eval_texts().values()]

        def run(graph: bytes, weights: Path, names: list[str], feeds: list[Any]) -> list[dict[str, float]]:
            runner = DecoderRunner(graph, threads=threads, weights_dir=weights)
            return [_largest(names, runner.window_outputs(ids, names)) for ids in feeds]

    return range_check(onnx_model_path(ref_dir), onnx_model_path(opt_dir), feeds, run)


def _largest(names: list[str], values: list[np.ndarray]) -> dict[str, float]:
    return {name: largest_magnitude(value) for name, value in zip(names, values, strict=True)}
