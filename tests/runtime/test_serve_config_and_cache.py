"""serve.toml reading and precedence, and the response cache's bounds and rules, without a server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmpack.config.serve import ServeSettings, read_serve_file, resolve_serve_settings
from lmpack.errors import ConfigError, NotFoundError
from lmpack.runtime.cache import CachedAnswer, ResponseCache, cache_key, cacheable
from lmpack.runtime.sampling import SamplingParams

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "serve.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "serve.toml"
    path.write_text("schema_version = 1\n" + text)
    return path


def test_the_documented_example_file_reads(tmp_path, monkeypatch):
    values = read_serve_file(EXAMPLE)
    assert values["port"] == 8000 and values["cache"] is True
    assert (values["max_batch"], values["batch_align"]) == (8, 4)
    assert values["api_key_file"] == EXAMPLE.parent / "api-keys.txt"  # relative to the file, not the cwd


def test_flags_override_the_environment_which_overrides_the_file(tmp_path, monkeypatch):
    path = write(
        tmp_path,
        'variant = "m-int4"\nhost = "10.0.0.1"\nport = 9000\nqueue = 3\n[cache]\nenabled = true\nmax_bytes = 4096\n',
    )
    monkeypatch.setenv("LMPACK_SERVE_PORT", "9001")
    monkeypatch.setenv("LMPACK_SERVE_QUEUE", "5")
    monkeypatch.setenv("LMPACK_SERVE_MAX_BATCH", "2")
    settings = resolve_serve_settings(path, {"queue": 7, "host": None})
    assert (settings.host, settings.port, settings.queue, settings.max_batch) == ("10.0.0.1", 9001, 7, 2)
    assert settings.variant == "m-int4"
    monkeypatch.setenv("LMPACK_SERVE_VARIANT", "m-int8")
    assert resolve_serve_settings(path, {}).variant == "m-int8"
    monkeypatch.delenv("LMPACK_SERVE_VARIANT")
    assert settings.cache and settings.cache_max_bytes == 4096 and settings.cache_max_entries == 1024
    assert resolve_serve_settings(None, {}) == ServeSettings(
        port=9001, queue=5, max_batch=2
    )  # no file: defaults, then env
    monkeypatch.setenv("LMPACK_SERVE_PORT", "eighty")
    with pytest.raises(ConfigError, match="LMPACK_SERVE_PORT='eighty' is not an integer"):
        resolve_serve_settings(None, {})


@pytest.mark.parametrize(
    "text, message",
    [
        ("prot = 1\n", "field 'prot'"),
        ("port = 70000\n", "field 'port' is 70000; must be at most 65535"),
        ("queue = true\n", "field 'queue' must be an integer"),
        ("max_batch = 0\n", "field 'max_batch' is 0; must be at least 1"),
        ("[tls]\ncert = 'a.crt'\n", "field 'tls.key' is required"),
        ("[cache]\nenabled = 'yes'\n", "field 'cache.enabled' must be true or false"),
        ("[cache]\nsize = 3\n", "unknown field 'cache.size'"),
    ],
)
def test_errors_name_the_file_and_the_field(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        read_serve_file(path)
    assert str(path) in caught.value.message and message in caught.value.message


def test_tls_needs_both_files_and_they_must_exist(tmp_path):
    with pytest.raises(ConfigError, match="both a certificate and a key"):
        resolve_serve_settings(None, {"tls_cert": tmp_path / "a.crt"})
    with pytest.raises(NotFoundError, match="tls cert file"):
        resolve_serve_settings(None, {"tls_cert": tmp_path / "a.crt", "tls_key": tmp_path / "a.key"})


def answer(text: str, finish: str = "stop") -> CachedAnswer:
    return CachedAnswer(chunks=(text,), finish_reason=finish, prompt_tokens=1, completion_tokens=1)


def test_the_cache_evicts_the_least_recently_used_by_entries_and_by_bytes():
    cache = ResponseCache(max_entries=2, max_bytes=10_000)
    cache.put("a", answer("1")), cache.put("b", answer("2"))
    assert cache.get("a") is not None  # "a" is now the most recent
    cache.put("c", answer("3"))
    assert cache.get("b") is None and cache.get("a") and cache.get("c") and cache.entries == 2
    small = ResponseCache(max_entries=100, max_bytes=answer("x" * 100).size * 2)
    for key in "pqr":
        small.put(key, answer("x" * 100))
    assert small.entries == 2 and small.get("p") is None and small.bytes <= small.max_bytes
    assert not small.put("huge", answer("x" * 10_000))  # larger than the whole cache: not stored
    assert not cache.put("cut", answer("partial", "cancelled"))


def test_only_fixed_answers_are_cacheable_and_every_parameter_is_in_the_key():
    assert cacheable(SamplingParams(temperature=0)) and cacheable(SamplingParams(temperature=0.8, seed=1))
    assert not cacheable(SamplingParams(temperature=0.8))
    base = dict(model_version="d1", chat=True, prompt=[{"role": "user", "content": "hi"}])
    key = cache_key(**base, params=SamplingParams(temperature=0))
    assert key == cache_key(**base, params=SamplingParams(temperature=0))
    assert key != cache_key(**base, params=SamplingParams(temperature=0, max_tokens=17))
    assert key != cache_key(**{**base, "model_version": "d2"}, params=SamplingParams(temperature=0))
    assert key != cache_key(**{**base, "chat": False}, params=SamplingParams(temperature=0))


def test_every_setting_is_a_flag_a_file_key_and_a_variable_with_one_bound(tmp_path, monkeypatch):
    """Settings are declared once (ServeSettings): each reaches the server the same from all three places, and
    the integers' bounds are the same in each."""
    from click.testing import CliRunner

    from lmpack.cli.serve import serve_command
    from lmpack.config.serve import serve_settings

    options = {p.name: p for p in serve_command.params}
    samples = {int: 2, bool: True, str: "x-int4", Path: tmp_path / "f", tuple: ("smollm2", "gpt-4o-mini")}
    for info in serve_settings():
        value = samples[info.kind] if info.meta.bounds is None else max(2, info.meta.bounds[0])
        text = ",".join(value) if info.kind is tuple else str(value).lower() if info.kind is bool else str(value)
        table, key = (info.meta.table, info.meta.key or info.name)
        toml_value = (
            json.dumps(list(value)) if info.kind is tuple else text if info.kind in (int, bool) else f'"{value}"'
        )
        extra = "\n".join(
            f'{(i.meta.key or i.name)} = "{tmp_path / "g"}"'
            for i in serve_settings()
            if i.meta.paired and i.meta.table == table and i.name != info.name
        )
        body = f"[{table}]\n{key} = {toml_value}\n{extra}\n" if table else f"{key} = {toml_value}\n"
        assert read_serve_file(write(tmp_path, body))[info.name] == value, info.name
        monkeypatch.setenv(info.env, "1" if info.kind is bool else text)
        from lmpack.config.serve import read_serve_env

        assert read_serve_env() == {info.name: value}, info.env
        monkeypatch.delenv(info.env)
        assert info.name in options, f"{info.flag} is not an option of lmpack serve"
        assert options[info.name].multiple == (info.kind is tuple)  # a list setting: a repeatable flag
        if info.meta.bounds is not None:
            low, high = info.meta.bounds
            assert (options[info.name].type.min, options[info.name].type.max) == (low, high)
            with pytest.raises(ConfigError, match=f"must be at most {high}"):
                read_serve_file(
                    write(tmp_path, f"[{table}]\n{key} = {high + 1}\n" if table else f"{key} = {high + 1}\n")
                )
            monkeypatch.setenv(info.env, str(low - 1))
            with pytest.raises(ConfigError, match=f"{info.env}={low - 1} is outside"):
                read_serve_env()
            monkeypatch.delenv(info.env)
            result = CliRunner().invoke(serve_command, [str(tmp_path), info.flag, str(high + 1)])
            assert result.exit_code == 2 and info.flag in result.output


def test_the_documented_settings_table_is_made_from_the_settings():
    from lmpack.config.serve import settings_table

    assert settings_table() in (EXAMPLE.parents[1] / "serving.md").read_text()
