"""Profiles meet targets in one place: a plan, or a refusal with the reason."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from lmpack import api
from lmpack.cli.main import cli
from lmpack.config.profiles import list_profiles
from lmpack.errors import ConfigError, PlanError


def test_required_profiles_are_shipped():
    assert {"fp32", "fp16", "int8", "int4"} <= {p.name for p in list_profiles()}


def test_every_shipped_profile_plans_on_a_target_that_supports_it():
    for profile in list_profiles():
        target = "a100" if profile.precision in ("fp16", "bf16") else "cpu-x86"
        plan = api.plan(target=target, profile=profile.name)
        assert [s.label for s in plan.steps].count("export") == 1


@pytest.mark.parametrize(
    "target,profile,reason", [("cpu-x86", "fp16", "does not support"), ("cpu-arm64", "fp16", "fp16")]
)
def test_impossible_pairs_are_refused_with_the_reason(target, profile, reason):
    with pytest.raises(PlanError) as error:
        api.plan(target=target, profile=profile)
    assert reason in error.value.message and target in error.value.message


def test_target_default_profile_is_used():
    assert api.plan(target="t4").profile.name == "fp16"
    assert api.plan(target="cpu-x86").profile.name == "int8"


def _profile(tmp_path, body: str):
    path = tmp_path / "custom.toml"
    path.write_text('schema_version = 1\nname = "custom"\nprecision = "int8"\n' + body)
    return str(path)


@pytest.mark.parametrize(
    "body,error,fragment",
    [
        ('[[steps]]\nname = "export"\n[[steps]]\nname = "compress"\n', ConfigError, "unknown step 'compress'"),
        (
            '[[steps]]\nname = "export"\n[[steps]]\nname = "quantize"\nbitz = 8\n',
            ConfigError,
            "unknown parameter 'bitz'",
        ),
        ('[[steps]]\nname = "export"\n[[steps]]\nname = "quantize"\nbits = 3\n', ConfigError, "parameter 'bits'"),
        ('[[steps]]\nname = "export"\n[[steps]]\nname = "quantize"\nsymmetric = "yes"\n', ConfigError, "symmetric"),
        ('[[steps]]\nname = "quantize"\n', PlanError, "exactly one 'export'"),
        ('[[steps]]\nname = "export"\n[[steps]]\nname = "prune"\n', PlanError, "before"),
        (
            '[[steps]]\nname = "export"\n[quality]\nmax_perplexity_increase = -1\n',
            ConfigError,
            "max_perplexity_increase",
        ),
    ],
)
def test_bad_profiles_are_rejected_naming_the_problem(tmp_path, body, error, fragment):
    path = _profile(tmp_path, body)
    with pytest.raises(error) as raised:
        api.plan(target="cpu-x86", profile=path)
    assert fragment in raised.value.message
    if error is ConfigError:
        assert path in raised.value.message


def test_cli_refusal_exit_code_and_hint():
    result = CliRunner().invoke(cli, ["profiles", "show", "fp16", "--target", "cpu-x86"])
    assert result.exit_code == 5
    assert "hint:" in result.output and "int8" in result.output


def test_cli_profiles_list_json():
    result = CliRunner().invoke(cli, ["profiles", "list", "--json"])
    assert result.exit_code == 0
    assert '"name": "int4"' in result.output


def test_a_steps_cache_key_follows_the_helpers_it_uses(tmp_path, monkeypatch):
    """Editing a graph-rewrite helper must invalidate the cached outputs of the steps that call it."""
    import importlib.util
    import sys

    from lmpack.pipeline.step import _code_digest

    def load(name: str, path):
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, module)
        spec.loader.exec_module(module)
        return module

    helper, step = tmp_path / "helper.py", tmp_path / "step.py"
    helper.write_text("def rewrite(model):\n    return 1\n")
    step.write_text("from lmpack.steps._t_helper import rewrite\n\nclass FakeStep:\n    pass\n")
    load("lmpack.steps._t_helper", helper)
    fake = load("lmpack.steps._t_step", step).FakeStep
    before = _code_digest(fake)
    helper.write_text("def rewrite(model):\n    return 2\n")
    after_helper = _code_digest(fake)
    assert after_helper != before
    step.write_text(step.read_text() + "# the step's own code counts too\n")
    assert _code_digest(fake) not in (before, after_helper)
