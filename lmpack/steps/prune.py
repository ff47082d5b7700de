"""Prune: drop the least useful transformer layers (really smaller and faster), or magnitude-prune for sparse kernels.

Layer dropping follows the block-influence idea (ShortGPT, Men et al. 2024): a layer whose output
hidden state is nearly the same as its input changes little, so it goes first. Influence is measured
on lmpack's shipped evaluation text; the quality gate decides whether the result is acceptable.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal

from lmpack.errors import PlanError, UnsupportedModelError
from lmpack.pipeline.step import HF_MODEL, Artifact, Step, StepContext
from lmpack.steps.model_files import copy_side_files

# Where common architectures keep their stack of layers.
_LAYER_PATHS = ("model.layers", "encoder.layer", "transformer.h", "gpt_neox.layers")


@dataclasses.dataclass(frozen=True)
class PruneParams:
    method: Literal["layers", "magnitude"] = "layers"
    drop_layers: int = 2
    calibration_tokens: int = 512
    sparsity: float = 0.5
    pattern: Literal["unstructured", "2:4"] = "2:4"

    def validate(self) -> str | None:
        if self.drop_layers < 1:
            return "drop_layers must be at least 1"
        if not 0.0 < self.sparsity < 1.0:
            return "sparsity must be between 0 and 1"
        if self.method == "magnitude" and self.pattern == "2:4" and self.sparsity != 0.5:
            return "pattern '2:4' zeroes exactly half of the weights; set sparsity = 0.5 or pattern = 'unstructured'"
        return None


class PruneStep(Step):
    name = "prune"
    consumes = HF_MODEL
    produces = HF_MODEL
    Params = PruneParams
    tools = ("torch", "transformers")

    def check(self, target, profile) -> None:
        if self.params.method == "magnitude" and self.params.pattern not in target.sparsity:
            raise PlanError(
                f"magnitude pruning with pattern {self.params.pattern} only pays off on sparse kernels, "
                f"and target {target.name!r} has none for it (sparsity: {target.sparsity or 'none'})",
                hint='use method = "layers" for a model that is really smaller on any target',
            )

    def run(self, ctx: StepContext, source: Artifact, out_dir: Path) -> dict[str, Any]:
        import torch

        model = _load(source.path, trust_remote_code=bool(ctx.options.get("trust_remote_code")))
        layers, attr_path = _layer_stack(model)
        with torch.no_grad():
            if self.params.method == "layers":
                metrics = _drop_layers(model, layers, attr_path, self.params, tokenizer_dir=source.path)
            else:
                metrics = _magnitude(layers, self.params)
        model.save_pretrained(out_dir, safe_serialization=True)
        copy_side_files(source.path, out_dir)
        return metrics


def _load(path: Path, *, trust_remote_code: bool):
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    config = json.loads((path / "config.json").read_text())
    arch = (config.get("architectures") or [""])[0]
    loader = AutoModelForCausalLM if arch.endswith("ForCausalLM") else AutoModel
    model = loader.from_pretrained(path, torch_dtype=torch.float32, trust_remote_code=trust_remote_code)
    model.eval()
    return model


def _layer_stack(model):
    for attr_path in _LAYER_PATHS:
        obj = model
        for part in attr_path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is not None:
            return obj, attr_path
    raise UnsupportedModelError(
        f"cannot find the layer stack of {type(model).__name__} for pruning (looked for {', '.join(_LAYER_PATHS)})"
    )


def _calibration_ids(model_dir: Path, tokens: int):
    """The first `tokens` tokens of lmpack's evaluation texts, encoded with the model's own tokenizer."""
    import torch
    from tokenizers import Tokenizer

    from lmpack.data import all_eval_text

    ids = Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(all_eval_text()).ids[:tokens]
    return torch.tensor([ids])


def _drop_layers(model, layers, attr_path: str, params: PruneParams, *, tokenizer_dir: Path) -> dict[str, Any]:
    import torch

    count = len(layers)
    if params.drop_layers > count - 2:
        raise UnsupportedModelError(
            f"cannot drop {params.drop_layers} of {count} layers: the first and last layers are always kept, "
            f"so at most {max(count - 2, 0)} can go",
            hint="lower drop_layers in the profile's prune step",
        )
    positions = getattr(model.config, "max_position_embeddings", None) or params.calibration_tokens
    ids = _calibration_ids(tokenizer_dir, min(params.calibration_tokens, positions))
    hidden = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True).hidden_states
    # influence of layer i = 1 - cos(input of i, output of i), averaged over tokens
    influence = [
        float(1 - torch.nn.functional.cosine_similarity(hidden[i][0], hidden[i + 1][0], dim=-1).mean())
        for i in range(count)
    ]
    # The first and last layers are never dropped: they map into and out of the embedding space.
    candidates = sorted(range(1, count - 1), key=lambda i: influence[i])[: params.drop_layers]
    keep = [i for i in range(count) if i not in candidates]
    new_layers = torch.nn.ModuleList([layers[i] for i in keep])
    for new_index, layer in enumerate(new_layers):
        for module in layer.modules():  # the KV cache is indexed by layer (self_attn in Llama, attn in GPT-2, ...)
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index  # type: ignore[assignment]  # torch stubs: Module attrs are Tensor/Module
    parent = model
    *parents, last = attr_path.split(".")
    for part in parents:
        parent = getattr(parent, part)
    setattr(parent, last, new_layers)
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    before = sum(p.numel() for p in layers.parameters())
    after = sum(p.numel() for p in new_layers.parameters())
    return {
        "method": "layers",
        "dropped": sorted(candidates),
        "kept_layers": len(keep),
        "influence": [round(x, 5) for x in influence],
        "layer_params_before": before,
        "layer_params_after": after,
    }


def _magnitude(layers, params: PruneParams) -> dict[str, Any]:
    import torch

    zeros = total = 0
    for module in layers.modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        weight = module.weight.data
        if params.pattern == "2:4":
            if weight.shape[1] % 4:
                continue
            groups = weight.abs().reshape(weight.shape[0], -1, 4)
            drop = groups.argsort(dim=-1)[..., :2]  # the two smallest of every four along the input dimension
            mask = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, drop, False).reshape(weight.shape)
        else:
            threshold = weight.abs().flatten().kthvalue(max(1, int(weight.numel() * params.sparsity))).values
            mask = weight.abs() > threshold
        weight.mul_(mask)
        zeros += int((~mask).sum())
        total += weight.numel()
    if total == 0:
        raise UnsupportedModelError("no linear layers to prune were found")
    return {"method": "magnitude", "pattern": params.pattern, "sparsity": round(zeros / total, 4)}
