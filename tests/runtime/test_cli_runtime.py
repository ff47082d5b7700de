"""`lmpack generate` and `lmpack serve` from the command line: output, JSON, exit codes, graceful stop."""

from __future__ import annotations

import json
import signal
import time

import httpx
from click.testing import CliRunner
from runtime_servers import run_server

from lmpack.cli.main import cli


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def test_generate_prints_the_text_and_json(llama_variant):
    plain = invoke("generate", str(llama_variant), "The railway", "--max-tokens", "12", "--threads", "1")
    assert plain.exit_code == 0, plain.output
    result = invoke("generate", str(llama_variant), "The railway", "--max-tokens", "12", "--threads", "1", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert plain.stdout == out["text"] + "\n"
    assert out["usage"]["completion_tokens"] == 12 and out["finish_reason"] == "length"
    assert out["decode_tokens_per_second"] > 0


def test_generate_errors_have_stable_exit_codes(llama_variant, bert_variant, tmp_path):
    assert invoke("generate", str(tmp_path / "nope"), "x").exit_code == 4
    wrong_task = invoke("generate", str(bert_variant), "x", "--json")
    assert wrong_task.exit_code == 16 and json.loads(wrong_task.stdout)["error"]["type"] == "RequestError"
    too_long = invoke("generate", str(llama_variant), "railway " * 600)
    assert too_long.exit_code == 16 and "context" in too_long.output
    assert invoke("generate", str(llama_variant), "x", "--temperature", "5").exit_code == 16
    assert invoke("generate", str(tmp_path), "x").exit_code == 15  # a directory that is not a variant


def test_serve_refuses_a_bad_key_file_before_starting(llama_variant, tmp_path):
    assert invoke("serve", str(llama_variant), "--api-key-file", str(tmp_path / "missing")).exit_code == 4
    empty = tmp_path / "keys"
    empty.write_text("# nothing yet\n")
    result = invoke("serve", str(llama_variant), "--api-key-file", str(empty))
    assert result.exit_code == 3 and "holds no key" in result.output


def test_sigterm_lets_a_running_stream_finish(llama_variant, tmp_path):
    with run_server(llama_variant, tmp=tmp_path) as server:
        with httpx.stream(
            "POST",
            f"{server.url}/v1/completions",
            timeout=60,
            json={"prompt": "The railway", "max_tokens": 480, "temperature": 0, "stream": True},
        ) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data:"))
            server.process.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            rest = [line for line in lines if line.startswith("data:")]
        assert first and rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][5:])["choices"][0]["finish_reason"] == "length"
        assert server.process.wait(timeout=30) == 0


def test_serve_on_a_port_in_use_says_so_before_loading_the_model(llama_variant, tmp_path):
    """A taken port is one error line with its own exit code, at once: the model is not loaded first."""
    import socket
    import subprocess
    import sys

    from runtime_servers import REPO

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "lmpack", "serve", str(llama_variant), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        )
        seconds = time.monotonic() - started
    assert done.returncode == 21, done.stderr
    assert f"error: port {port} on 127.0.0.1 is already in use" in done.stderr and "hint:" in done.stderr
    assert "serving variant" not in done.stderr and "Traceback" not in done.stderr  # nothing was loaded
    assert seconds < 30
