"""The fp16 step keeps each normalization's squares in fp32, and the gate's range check sees the overflow that a
GPU would hit and onnxruntime's CPU provider hides.

The tiny Llama's random weights give it a residual stream in the hundreds, so the squares in its RMSNorms pass
fp16's 65504, as a real model with large activations does: the tests check that premise first.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest

from lmpack import api
from lmpack.steps.fp16 import FP16_MAX
from lmpack.steps.validate import fp16_range

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def fp16_build(tiny_llama, session_cache, cpu_fp16_target, tmp_path_factory):
    return api.build(
        str(tiny_llama),
        target=str(cpu_fp16_target),
        profile="fp16",
        output_dir=tmp_path_factory.mktemp("fp16"),
        cache_dir=session_cache,
    )


def test_each_norms_squares_stay_fp32_and_the_range_check_passes(fp16_build):
    report = json.loads((fp16_build.variant_dir / "report.json").read_text())
    found = report["quality"]["fp16_range"]
    assert found["max_abs"] > 256  # the premise: squares of the residual stream are beyond fp16
    assert found["beyond_fp16_count"] == 0 and found["tensors"] > 0
    assert report["quality"]["gate"] == "passed"

    model = onnx.load(str(fp16_build.variant_dir / "model" / "model.onnx"), load_external_data=False)
    consumers: dict[str, list[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    pows = [n for n in model.graph.node if n.op_type == "Pow"]
    assert len(pows) == 2 * 4 + 1  # two norms per layer and the final one
    for node in pows:  # no cast to fp16 and back between the square and its mean
        assert consumers[node.output[0]] == ["ReduceMean"], node.name
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    assert {types[n.output[0]] for n in pows} == {onnx.TensorProto.FLOAT}
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)


def test_the_range_check_names_the_overflow_of_a_conversion_without_the_fp32_nodes(
    tiny_llama, session_cache, cpu_fp16_target, tmp_path
):
    """The same export converted by onnxruntime's converter with no nodes kept fp32: the gate fails it, naming a
    square, where the CPU provider alone would have passed it."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from lmpack.steps.onnx_graph import load_model, save_model

    profile = tmp_path / "fp32-optimum.toml"
    fp16_profile = (ROOT / "profiles" / "fp16.toml").read_text()
    profile.write_text(
        fp16_profile.replace('name = "fp16"', 'name = "fp32-optimum"')
        .replace('precision = "fp16"', 'precision = "fp32"')
        .replace('[[steps]]\nname = "quantize"\nmethod = "fp16"\n\n', "")
    )
    built = api.build(
        str(tiny_llama), target=str(cpu_fp16_target), profile=str(profile), output_dir=tmp_path, cache_dir=session_cache
    )
    reference = built.variant_dir / "model"
    plain = tmp_path / "plain"
    shutil.copytree(reference, plain)
    save_model(convert_float_to_float16(load_model(reference / "model.onnx"), keep_io_types=True), plain / "model.onnx")

    found = fp16_range(reference, plain, "text-generation", threads=None)
    assert found["beyond_fp16_count"] > 0 and found["max_abs"] > FP16_MAX
    assert all("Pow" in t["tensor"] or "ReduceMean" in t["tensor"] for t in found["beyond_fp16"][:2])


def test_an_engines_precision_is_read_from_its_graph(fp16_build, tiny_llama, session_cache, cpu_fp16_target, tmp_path):
    """What the tensorrt step records: the float type of the graph's weights, whatever the profile says."""
    from lmpack.steps.tensorrt import graph_precision

    assert graph_precision(fp16_build.variant_dir / "model" / "model.onnx") == "fp16"
    built = api.build(
        str(tiny_llama), target=str(cpu_fp16_target), profile="fp32", output_dir=tmp_path, cache_dir=session_cache
    )
    assert graph_precision(built.variant_dir / "model" / "model.onnx") == "fp32"
