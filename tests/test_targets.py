"""Targets as data: shipped facts, user targets, and errors that name the file and field."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from lmpack.cli.main import cli
from lmpack.config.targets import list_targets, load_target
from lmpack.errors import ConfigError, NotFoundError

REQUIRED = {"cpu-x86", "cpu-x86-avx512", "cpu-arm64", "a100", "h100", "l4", "t4", "jetson-orin"}


def test_required_targets_are_shipped():
    assert REQUIRED <= {t.name for t in list_targets()}


@pytest.mark.parametrize(
    "name,absent",
    [
        ("t4", {"bf16", "fp8", "tf32"}),
        ("a100", {"fp8"}),
        ("jetson-orin", {"fp8"}),
        ("cpu-x86", {"fp16", "bf16", "fp8"}),
    ],
)
def test_precision_matrix_excludes_what_the_hardware_lacks(name, absent):
    assert not absent & set(load_target(name).precisions)


@pytest.mark.parametrize("name", ["h100", "l4"])
def test_ada_and_hopper_have_fp8(name):
    assert "fp8" in load_target(name).precisions


def test_wheel_platform_follows_the_cpu():
    assert load_target("cpu-arm64").platform_tag.endswith("aarch64")
    assert load_target("jetson-orin").cpu.arch == "aarch64"
    assert load_target("a100").platform_tag.endswith("x86_64")


VALID = """schema_version = 1
name = "edge-box"
memory_gib = 4
precisions = ["fp32", "int8"]
execution_providers = ["CPUExecutionProvider"]
platform_tag = "manylinux_2_28_x86_64"
python = "3.11"
default_profile = "int8"

[cpu]
arch = "x86_64"
isa = ["avx2"]
"""


def test_target_by_path_and_user_directory_override(tmp_path, monkeypatch):
    path = tmp_path / "edge-box.toml"
    path.write_text(VALID)
    assert load_target(str(path)).name == "edge-box"
    user_dir = tmp_path / "home" / "targets"
    user_dir.mkdir(parents=True)
    (user_dir / "cpu-x86.toml").write_text(
        VALID.replace('"edge-box"', '"cpu-x86"').replace("memory_gib = 4", "memory_gib = 3")
    )
    monkeypatch.setenv("LMPACK_HOME", str(tmp_path / "home"))
    assert load_target("cpu-x86").memory_gib == 3


@pytest.mark.parametrize(
    "edit,field",
    [
        (lambda s: s.replace('precisions = ["fp32", "int8"]', 'precisions = ["fp32", "int9"]'), "precisions"),
        (lambda s: s.replace("memory_gib = 4", 'memory_gib = "four"'), "memory_gib"),
        (lambda s: s + 'colour = "blue"\n', "colour"),
        (lambda s: s.replace('arch = "x86_64"', 'arch = "sparc"'), "cpu.arch"),
        (lambda s: s.replace('python = "3.11"\n', ""), "python"),
        (
            lambda s: s.replace('["CPUExecutionProvider"]', '["CUDAExecutionProvider", "CPUExecutionProvider"]'),
            "execution_providers",
        ),
    ],
)
def test_invalid_target_names_file_and_field(tmp_path, edit, field):
    path = tmp_path / "bad.toml"
    path.write_text(edit(VALID))
    with pytest.raises(ConfigError) as error:
        load_target(str(path))
    assert str(path) in error.value.message and field in error.value.message


def test_malformed_toml_names_file_and_line(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text(VALID.replace('name = "edge-box"', 'name = "edge-box'))
    result = CliRunner().invoke(cli, ["targets", "show", str(path)])
    assert result.exit_code == 3
    assert str(path) in result.output and "line 2" in result.output


def test_unknown_target_lists_the_known_ones():
    with pytest.raises(NotFoundError) as error:
        load_target("z80")
    assert "cpu-x86" in error.value.message and "a100" in error.value.message


def test_cli_targets_list_json_and_show():
    runner = CliRunner()
    listed = json.loads(runner.invoke(cli, ["targets", "list", "--json"]).output)
    assert {t["name"] for t in listed} >= REQUIRED
    shown = runner.invoke(cli, ["targets", "show", "t4"])
    assert shown.exit_code == 0
    assert "bf16:no" in shown.output and "fp8:no" in shown.output and "7.5" in shown.output
    table = runner.invoke(cli, ["targets", "list"]).output
    assert "jetson-orin" in table and "aarch64" in table
