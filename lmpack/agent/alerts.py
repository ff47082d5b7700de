"""Alert rules and their states: inactive -> pending -> firing -> resolved, each change announced once.

A rule compares one metric with a threshold. It turns pending when the comparison first holds and
firing once it has held for `for_seconds`, so one bad sample does not page anyone. A firing rule
resolves when the comparison stops holding. A missing value (no traffic, so no p95; no GPU) counts as
"does not hold": no data is not an incident. Events are produced only on a change, so a rule that
stays firing is announced once, and its resolution once.
"""

from __future__ import annotations

import operator
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
}
SEVERITIES = ("info", "warning", "critical")


@dataclass(frozen=True)
class Rule:
    name: str
    metric: str
    op: str
    threshold: float
    for_seconds: float = 0.0
    severity: str = "warning"

    def holds(self, value: float | None) -> bool:
        return value is not None and OPERATORS[self.op](value, self.threshold)


def default_rules() -> list[Rule]:
    """What the agent watches unless told otherwise (`default_alerts = false` turns these off).

    The GPU rule is always defined; without a GPU its metric has no value, so it never fires.
    """
    return [
        Rule("latency-p95-high", "latency_p95_seconds", ">", 10.0, for_seconds=300, severity="warning"),
        Rule("error-rate-high", "error_rate", ">", 0.05, for_seconds=300, severity="critical"),
        Rule("host-memory-high", "host_memory_percent", ">", 90.0, for_seconds=300, severity="warning"),
        Rule("disk-almost-full", "host_disk_percent", ">", 90.0, for_seconds=0, severity="warning"),
        Rule("server-restarted", "server_restarts_15m", ">=", 1, for_seconds=0, severity="warning"),
        Rule("version-switch-failed", "switch_failures_recent", ">=", 1, for_seconds=0, severity="critical"),
        Rule("gpu-memory-high", "gpu_memory_percent", ">", 95.0, for_seconds=300, severity="warning"),
    ]


@dataclass
class _State:
    state: str = "inactive"  # inactive | pending | firing
    since: float | None = None  # when it turned pending (monotonic)
    fired_at: float | None = None


class AlertEngine:
    """Evaluates every rule on each sample; returns the events (firing, resolved) to deliver."""

    def __init__(self, rules: tuple[Rule, ...] | list[Rule], *, clock: Callable[[], float] = time.monotonic):
        self.rules = list(rules)
        self._clock = clock
        self._states = {rule.name: _State() for rule in self.rules}

    def evaluate(self, values: dict[str, Any]) -> list[dict[str, Any]]:
        now = self._clock()
        events = []
        for rule in self.rules:
            state, value = self._states[rule.name], values.get(rule.metric)
            if rule.holds(value):
                if state.state == "inactive":
                    state.state, state.since = "pending", now
                if state.state == "pending":
                    assert state.since is not None  # set whenever the state turns pending
                    if now - state.since >= rule.for_seconds:
                        state.state, state.fired_at = "firing", now
                        events.append(_event(rule, "firing", value))
            elif state.state == "firing":
                events.append(_event(rule, "resolved", value))
                state.state, state.since, state.fired_at = "inactive", None, None
            elif state.state == "pending":
                state.state, state.since = "inactive", None
        return events

    def snapshot(self) -> list[dict[str, Any]]:
        return [
            {
                "name": rule.name,
                "metric": rule.metric,
                "op": rule.op,
                "threshold": rule.threshold,
                "for_seconds": rule.for_seconds,
                "severity": rule.severity,
                "state": self._states[rule.name].state,
            }
            for rule in self.rules
        ]


def _event(rule: Rule, state: str, value: float | None) -> dict[str, Any]:
    return {
        "alert": rule.name,
        "state": state,
        "severity": rule.severity,
        "metric": rule.metric,
        "value": value,
        "op": rule.op,
        "threshold": rule.threshold,
        "for_seconds": rule.for_seconds,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
