"""The agent's parts without processes: config, alert states, histogram percentiles, notifiers, NVML, imports."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from agent_helpers import WebhookReceiver, free_port, write_config
from click.testing import CliRunner

from lmpack.agent.alerts import AlertEngine, Rule
from lmpack.agent.config import load_agent_config
from lmpack.agent.metrics import METRICS, gpu_sample, histogram_quantile, parse_prometheus, render_prometheus
from lmpack.agent.notifiers import LogNotifier, SyslogNotifier, WebhookNotifier, syslog_message
from lmpack.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]

BASE = """schema_version = 1
[server]
variant = "/srv/variant"
"""


def config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(BASE + text)
    return path


def test_defaults_and_shipped_rules(tmp_path):
    parsed = load_agent_config(config(tmp_path, ""))
    assert parsed.supervision.liveness_failures == 3 and parsed.supervision.probe_interval == 10
    assert parsed.supervision.backoff_initial == 10 and parsed.supervision.backoff_max == 300
    assert parsed.port == 9100 and parsed.server_url == "http://127.0.0.1:8000"
    names = {rule.name for rule in parsed.rules}
    assert {
        "latency-p95-high",
        "error-rate-high",
        "host-memory-high",
        "disk-almost-full",
        "server-restarted",
        "gpu-memory-high",
    } <= names
    assert all(rule.metric in METRICS for rule in parsed.rules)
    assert [n.type for n in parsed.notifiers] == ["log"]


def test_a_rule_with_an_unknown_metric_is_refused_naming_the_rule(tmp_path, lmpack_cli):
    path = config(tmp_path, '[[alerts]]\nname = "too-hot"\nmetric = "cpu_temp"\nop = ">"\nthreshold = 80\n')
    with pytest.raises(ConfigError, match="alert rule 'too-hot' uses unknown metric 'cpu_temp'"):
        load_agent_config(path)
    result = lmpack_cli("agent", "--config", path)
    assert result.exit_code == 3 and "too-hot" in result.output and "cpu_temp" in result.output


@pytest.mark.parametrize(
    "text, message",
    [
        ("[supervision]\nliveness_failure = 3\n", "unknown field 'supervision.liveness_failure'"),
        ("[supervision]\nliveness_failures = 0\n", "'supervision.liveness_failures' is 0; must be at least 1"),
        ('[[alerts]]\nname = "x"\nmetric = "error_rate"\nop = "~"\nthreshold = 1\n', "'alerts[0].op'"),
        ('[[notifiers]]\ntype = "webhook"\n', "'notifiers[0].url' is required"),
        ('[[notifiers]]\ntype = "pager"\n', "'notifiers[0].type'"),
    ],
)
def test_config_errors_name_the_field(tmp_path, text, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_agent_config(config(tmp_path, text))


def test_server_args_may_not_override_the_agents_own_fields(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text(BASE + 'args = ["--port", "1"]\n')
    with pytest.raises(ConfigError, match="'server.args' must not hold --port"):
        load_agent_config(path)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_alert_states_pending_firing_resolved_without_duplicates():
    clock = Clock()
    engine = AlertEngine(
        [Rule("slow", "latency_p95_seconds", ">", 1.0, for_seconds=10, severity="critical")], clock=clock
    )
    states = []
    for t, value in [
        (0, 2.0),
        (5, 2.0),
        (8, 0.5),
        (9, 3.0),
        (18, 3.0),
        (19, 3.0),
        (25, 5.0),
        (30, None),
        (31, None),
        (40, 2.0),
    ]:
        clock.now = t
        states += [(t, event["state"]) for event in engine.evaluate({"latency_p95_seconds": value})]
    # dipped below at 8 (pending reset), fired at 19 (10 s after 9), resolved when the data went away at 30
    assert states == [(19, "firing"), (30, "resolved")]
    assert engine.snapshot()[0]["state"] == "pending"


def test_histogram_quantile_interpolates_like_prometheus():
    buckets = {0.1: 50.0, 0.5: 90.0, 1.0: 100.0, float("inf"): 100.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.95, buckets) == pytest.approx(0.75)
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.05)
    assert histogram_quantile(0.99, {1.0: 1.0, float("inf"): 10.0}) == 1.0  # in +Inf: the largest finite bound
    assert histogram_quantile(0.5, {1.0: 0.0, float("inf"): 0.0}) is None


def test_prometheus_text_parses_and_renders():
    text = (
        '# HELP lmpack_requests_total x\nlmpack_requests_total{code="200",route="/v1/models"} 3.0\n'
        'lmpack_request_duration_seconds_bucket{le="+Inf",route="/v1/models"} 3.0\nlmpack_queued_requests 0.0\n'
    )
    assert parse_prometheus(text) == [
        ("lmpack_requests_total", {"code": "200", "route": "/v1/models"}, 3.0),
        ("lmpack_request_duration_seconds_bucket", {"le": "+Inf", "route": "/v1/models"}, 3.0),
        ("lmpack_queued_requests", {}, 0.0),
    ]
    rendered = render_prometheus({"host_cpu_percent": 12.5, "latency_p95_seconds": None})
    assert "lmpack_agent_host_cpu_percent 12.5" in rendered and "latency_p95" not in rendered


def test_nvml_reports_unavailable_here():
    gpu = gpu_sample()
    if gpu["available"]:
        pytest.skip("this machine has a GPU that NVML can read")
    assert gpu == {"available": False, "reason": gpu["reason"]} and gpu["reason"]


def test_webhook_retries_a_bounded_number_of_times():
    event = {"alert": "x", "state": "firing"}
    with WebhookReceiver(fail_first=2) as receiver:
        WebhookNotifier(receiver.url, timeout=2, retries=2, backoff=0.01).send(event)
        assert receiver.events == [event] and receiver.attempts == 3
    with WebhookReceiver(fail_first=10) as receiver:
        with pytest.raises(OSError, match="after 2 attempts"):
            WebhookNotifier(receiver.url, timeout=2, retries=1, backoff=0.01).send(event)
        assert receiver.attempts == 2


def test_log_and_syslog_formats():
    stream = io.StringIO()
    LogNotifier(stream).send({"alert": "x", "state": "resolved"})
    assert json.loads(stream.getvalue()) == {"event": "alert", "alert": "x", "state": "resolved"}
    assert syslog_message({"alert": "x"}) == 'lmpack-agent: {"alert": "x", "event": "alert"}'
    if not Path("/dev/log").exists():
        pytest.skip("no /dev/log here: the syslog socket is not tested")
    SyslogNotifier().send({"alert": "x", "state": "firing", "severity": "warning"})


CHECK = """
import json, sys
import lmpack.agent.daemon, lmpack.agent.config, lmpack.agent.supervisor
print(json.dumps(sorted(sys.modules)))
"""
FORBIDDEN = (
    "torch",
    "transformers",
    "optimum",
    "onnx",
    "onnxruntime",
    "huggingface_hub",
    "starlette",
    "uvicorn",
    "lmpack.steps",
    "lmpack.pipeline",
    "lmpack.cli",
    "lmpack.runtime",
    "pynvml",
)


def test_the_agent_imports_nothing_heavy():
    out = subprocess.run(
        [sys.executable, "-c", CHECK],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        cwd=REPO,
    )
    loaded = [m for m in json.loads(out.stdout) if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]
    assert loaded == [], f"the agent imported {loaded}"
    names = "|".join(re.escape(name) for name in FORBIDDEN if name.startswith("lmpack") or name == "torch")
    pattern = re.compile(rf"^\s*(?:import|from)\s+(?:{names})(?:[\s.]|$)", re.MULTILINE)
    for path in (REPO / "lmpack" / "agent").glob("*.py"):
        assert not pattern.findall(path.read_text()), path.name
        assert len(path.read_text().splitlines()) < 400, f"{path.name} is over 400 lines"


def test_an_installed_release_resolves_through_current(tmp_path):
    from lmpack.agent.supervisor import resolve_variant
    from lmpack.errors import NotFoundError

    name_dir = tmp_path / "releases" / "smollm2"
    (name_dir / "1.0.0" / "variants" / "smollm2-cpu-x86-int8").mkdir(parents=True)
    (name_dir / "1.1.0" / "variants" / "smollm2-cpu-x86-int8").mkdir(parents=True)
    (name_dir / "current").symlink_to("1.1.0")
    path = config(tmp_path, "")
    path.write_text(f'schema_version = 1\n[server]\nprefix = "{tmp_path}"\nrelease = "smollm2"\n')
    spec = load_agent_config(path).server
    variant, version = resolve_variant(spec)
    assert version == "1.1.0" and variant == (name_dir / "1.1.0" / "variants" / "smollm2-cpu-x86-int8").resolve()
    (name_dir / "1.1.0" / "variants" / "other").mkdir()
    with pytest.raises(NotFoundError, match="has 2 variants"):
        resolve_variant(spec)
    path.write_text(f'schema_version = 1\n[server]\nprefix = "{tmp_path}"\nrelease = "nope"\n')
    with pytest.raises(NotFoundError, match="no current version"):
        resolve_variant(load_agent_config(path).server)
    assert load_agent_config(path).disk_path == tmp_path  # disk use is measured where the releases live


def test_cli_errors_have_stable_exit_codes(tmp_path, lmpack_cli):

    unreachable = lmpack_cli("status", "--agent", f"http://127.0.0.1:{free_port()}", "--json")
    assert unreachable.exit_code == 18 and json.loads(unreachable.stdout)["error"]["type"] == "AgentError"
    missing = config(tmp_path, "")  # /srv/variant does not exist: refused before anything starts
    result = lmpack_cli("agent", "--config", missing)
    assert result.exit_code == 4 and "/srv/variant" in result.output
    assert lmpack_cli("agent", "--config", tmp_path / "nope.toml").exit_code == 4


def test_a_syslog_notifier_without_a_socket_is_said_at_start_and_fails_in_one_line(tmp_path, caplog, capsys):
    """A host with no syslog daemon: the agent warns when it starts (refuses with --strict, exit 3), and a failed
    delivery is one log line naming the socket, not logging's '--- Logging error ---' traceback."""
    from lmpack.agent.config import load_agent_config
    from lmpack.agent.daemon import Agent
    from lmpack.agent.notifiers import Dispatcher
    from lmpack.cli.main import cli

    missing = tmp_path / "no-syslog-here"
    notifier = SyslogNotifier(str(missing))
    assert f"syslog socket {missing} cannot be reached" in notifier.problem()
    with caplog.at_level("INFO", logger="lmpack.agent"):
        dispatcher = Dispatcher([notifier])
        dispatcher.publish({"alert": "x", "state": "firing", "severity": "critical"})
        dispatcher.close()
    failed = [r.getMessage() for r in caplog.records if "could not deliver" in r.getMessage()]
    assert len(failed) == 1 and f"syslog socket {missing}" in failed[0] and "\n" not in failed[0]
    assert "Logging error" not in capsys.readouterr().err

    variant = tmp_path / "variant"
    variant.mkdir()
    config = write_config(
        tmp_path,
        variant,
        server_port=free_port(),
        agent_port=free_port(),
        serve_args=[],
        extra=f'\n[[notifiers]]\ntype = "syslog"\naddress = "{missing}"\n',
    )
    caplog.clear()
    with caplog.at_level("WARNING", logger="lmpack.agent"):
        Agent(load_agent_config(config))._check_notifiers([notifier])
    assert any("alerts cannot be delivered through SyslogNotifier" in r.getMessage() for r in caplog.records)
    refused = CliRunner().invoke(cli, ["agent", "--config", str(config), "--strict"])
    assert refused.exit_code == 3 and f"syslog socket {missing} cannot be reached" in refused.output
