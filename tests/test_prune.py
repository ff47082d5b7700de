"""Pruning: layer dropping through a real build, magnitude pruning patterns, and what plan time refuses."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from lmpack import api
from lmpack.cli.main import cli
from lmpack.config.profiles import load_profile
from lmpack.config.targets import load_target
from lmpack.errors import PlanError
from lmpack.pipeline.step import HF_MODEL, Artifact, StepContext
from lmpack.steps.prune import PruneParams, PruneStep

# The tiny models are toys trained for seconds: dropping one of four layers costs far more than on a real model.
LOOSE_GATE = "[quality]\nmax_perplexity_increase = 2.0\nmin_top1_agreement = 0.3\n"


def write_profile(
    tmp_path: Path, prune: str, *, name: str = "test-pruned", precision: str = "int8", quality: str = LOOSE_GATE
) -> Path:
    """A profile: prune (with the given parameter lines) > export > [int8 quantize] > validate."""
    quantize = '[[steps]]\nname = "quantize"\nmethod = "matmul_nbits"\nbits = 8\n' if precision == "int8" else ""
    path = tmp_path / f"{name}.toml"
    path.write_text(
        f'schema_version = 1\nname = "{name}"\nprecision = "{precision}"\n'
        f'[[steps]]\nname = "prune"\n{prune}\n[[steps]]\nname = "export"\n{quantize}'
        f'[[steps]]\nname = "validate"\n{quality}'
    )
    return path


def run_prune(model_dir: Path, out_dir: Path, **params) -> dict:
    """PruneStep.run on its own, as the runner would call it."""
    ctx = StepContext(target=load_target("cpu-x86"), profile=load_profile("pruned-int8"))
    out_dir.mkdir(parents=True)
    return PruneStep(PruneParams(**params)).run(ctx, Artifact(kind=HF_MODEL, path=model_dir, digest="test"), out_dir)


def cli_build(*args: str):
    return CliRunner().invoke(cli, ["build", *args])


def layer_linear_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """The 2-D weights inside the transformer layers (Linear modules; norms are 1-D, embeddings live outside)."""
    weights = load_file(str(model_dir / "model.safetensors"))
    return {k: v for k, v in weights.items() if (".layers." in k or ".layer." in k) and v.dim() == 2}


def test_layer_drop_build_is_smaller_and_judged_against_the_unpruned_model(tiny_llama, tmp_path):
    profile = write_profile(tmp_path, 'method = "layers"\ndrop_layers = 1')
    result = api.build(str(tiny_llama), target="cpu-x86", profile=str(profile), output_dir=tmp_path / "dist")
    report = result.report
    model_dir = result.variant_dir / "model"

    info = json.loads((model_dir / "lmpack-model.json").read_text())
    assert info["num_layers"] == 3
    graph = onnx.load(str(model_dir / "model.onnx"), load_external_data=False).graph
    past_inputs = [i.name for i in graph.input if i.name.startswith("past_key_values")]
    assert len(past_inputs) == 2 * 3  # a key and a value per remaining layer

    steps = {s["step"]: s for s in report["steps"]}
    assert [s["step"] for s in report["steps"]] == ["pull", "reference", "prune", "export", "quantize", "validate"]
    prune = steps["prune"]["metrics"]
    assert len(prune["dropped"]) == 1 and prune["kept_layers"] == 3 and len(prune["influence"]) == 4
    assert prune["dropped"][0] in (1, 2)  # the first and last layers are never candidates
    assert prune["dropped"][0] == min((1, 2), key=lambda i: prune["influence"][i])
    assert prune["layer_params_after"] * 4 == prune["layer_params_before"] * 3

    # The reference is the fp32 export of the model as given, not of the pruned one.
    assert report["sizes"]["reference_bytes"] == steps["reference"]["output_bytes"]
    assert steps["export"]["output_bytes"] < steps["reference"]["output_bytes"]
    assert report["sizes"]["model_bytes"] < report["sizes"]["reference_bytes"]
    assert report["sizes"]["ratio"] < 0.5
    assert report["quality"]["gate"] == "passed"
    # a layer fewer changes the perplexity (either way on this tiny random model): it was not compared with itself
    assert abs(report["quality"]["perplexity_increase"]) > 1e-4

    plain = api.build(str(tiny_llama), target="cpu-x86", profile="fp32", output_dir=tmp_path / "dist")
    assert report["quality"]["perplexity_reference"] == plain.report["quality"]["perplexity_reference"]
    assert "reference" not in [s["step"] for s in plain.report["steps"]]


def test_pruned_model_loads_and_generates_with_a_kv_cache(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "pruned"
    metrics = run_prune(tiny_llama, out, method="layers", drop_layers=2)
    assert metrics["dropped"] == [1, 2]  # of four layers only the middle two may go

    original = load_file(str(tiny_llama / "model.safetensors"))
    pruned = load_file(str(out / "model.safetensors"))
    for new, old in ((0, 0), (1, 3)):
        key = "model.layers.{}.self_attn.q_proj.weight"
        assert torch.equal(pruned[key.format(new)], original[key.format(old)])
    assert not any(k.startswith("model.layers.2.") for k in pruned)
    assert (out / "tokenizer.json").is_file() and (out / "README.md").is_file()

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer("The model", return_tensors="pt", return_token_type_ids=False)
    with torch.no_grad():
        cached = model.generate(**prompt, max_new_tokens=6, do_sample=False, use_cache=True)
        uncached = model.generate(**prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.shape[1] == prompt["input_ids"].shape[1] + 6
    assert torch.equal(cached, uncached)


def test_magnitude_2_4_keeps_two_of_every_four(tiny_llama, tmp_path):
    out = tmp_path / "sparse"
    metrics = run_prune(tiny_llama, out, method="magnitude", pattern="2:4", sparsity=0.5)
    assert metrics == {"method": "magnitude", "pattern": "2:4", "sparsity": 0.5}
    weights = layer_linear_weights(out)
    assert len(weights) == 4 * 7  # q, k, v, o, gate, up, down in each of the four layers
    for name, weight in weights.items():
        groups = weight.reshape(weight.shape[0], -1, 4)
        assert int((groups != 0).sum(dim=-1).max()) <= 2, name
    original = load_file(str(tiny_llama / "model.safetensors"))
    pruned = load_file(str(out / "model.safetensors"))
    assert torch.equal(pruned["model.embed_tokens.weight"], original["model.embed_tokens.weight"])
    kept = next(iter(weights))  # surviving weights keep their values
    assert torch.equal(pruned[kept][pruned[kept] != 0], original[kept][pruned[kept] != 0])


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_bert"])
def test_unstructured_magnitude_reaches_the_requested_sparsity(model, tmp_path, request):
    out = tmp_path / "sparse"
    metrics = run_prune(request.getfixturevalue(model), out, method="magnitude", pattern="unstructured", sparsity=0.7)
    assert metrics["sparsity"] == pytest.approx(0.7, abs=0.01)
    weights = layer_linear_weights(out)
    assert weights
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    assert zeros / sum(w.numel() for w in weights.values()) == pytest.approx(0.7, abs=0.01)


@pytest.mark.parametrize("target,reason", [("cpu-x86", "does not support"), ("t4", "sparse kernels")])
def test_sparse_fp16_is_refused_where_it_cannot_pay_off(tiny_llama, tmp_path, target, reason):
    result = cli_build(str(tiny_llama), "--target", target, "--profile", "sparse-fp16", "-o", str(tmp_path / "d"))
    assert result.exit_code == 5
    assert reason in result.output and target in result.output
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("target", ["a100", "h100", "l4", "jetson-orin"])
def test_sparse_fp16_plans_on_gpus_with_2_4_kernels(target):
    plan = api.plan(target=target, profile="sparse-fp16")
    # pull and the reference export (of the unpruned model, for the quality gate) are planned before the profile's steps
    assert [s.label for s in plan.steps] == ["pull", "reference", "prune", "export", "quantize", "validate"]
    assert plan.step("prune").params.pattern == "2:4"


def test_unstructured_profile_plans_only_where_the_target_lists_it(tmp_path):
    target = tmp_path / "sparse-cpu.toml"
    target.write_text(
        'schema_version = 1\nname = "sparse-cpu"\nmemory_gib = 8\nprecisions = ["fp32", "int8"]\n'
        'execution_providers = ["CPUExecutionProvider"]\nplatform_tag = "manylinux_2_28_x86_64"\n'
        'python = "3.11"\ndefault_profile = "fp32"\nsparsity = ["unstructured"]\n'
        '[cpu]\narch = "x86_64"\nisa = ["avx2", "fma"]\n'
    )
    profile = write_profile(
        tmp_path, 'method = "magnitude"\npattern = "unstructured"\nsparsity = 0.6', name="sparse-fp32", precision="fp32"
    )
    plan = api.plan(target=str(target), profile=str(profile))
    assert plan.target.sparsity == ["unstructured"] and "fp32" in plan.target.precisions
    assert [s.label for s in plan.steps] == ["pull", "reference", "prune", "export", "validate"]
    with pytest.raises(PlanError) as refused:
        api.plan(target="cpu-x86", profile=str(profile))
    assert "unstructured" in refused.value.message and "cpu-x86" in refused.value.message


@pytest.mark.parametrize("model,drop,fragment", [("tiny_llama", 3, "at most 2"), ("tiny_bert", 1, "at most 0")])
def test_dropping_too_many_layers_is_refused(model, drop, fragment, tmp_path, request):
    profile = write_profile(tmp_path, f'method = "layers"\ndrop_layers = {drop}')
    result = cli_build(
        str(request.getfixturevalue(model)), "--target", "cpu-x86", "--profile", str(profile), "-o", str(tmp_path / "d")
    )
    assert result.exit_code == 6
    assert f"cannot drop {drop} of" in result.output and fragment in result.output
    assert "drop_layers" in result.output  # the hint names the parameter to change
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize(
    "prune,fragment",
    [
        ('method = "layers"\ndrop_layers = 0', "drop_layers must be at least 1"),
        ('method = "magnitude"\npattern = "2:4"\nsparsity = 0.6', "'2:4'"),
    ],
)
def test_bad_prune_parameters_are_config_errors(tiny_llama, tmp_path, prune, fragment):
    profile = write_profile(tmp_path, prune)
    result = cli_build(str(tiny_llama), "--target", "a100", "--profile", str(profile), "-o", str(tmp_path / "d"))
    assert result.exit_code == 3
    assert str(profile) in result.output and fragment in result.output
    assert not (tmp_path / "d").exists()
