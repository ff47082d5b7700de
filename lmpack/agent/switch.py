"""Zero-downtime version switches, probation and rollback for the one release the agent serves.

A switch (docs/operations.md, "Version switches"):
1. start the new version's server beside the old one, on a private loopback port, pinned to that
   version; wait until it is ready (its warm-up generation answered). A start that fails or never gets
   ready abandons the switch: the old server kept serving throughout, and the failure is counted for
   the `version-switch-failed` alert;
2. point `current` at the new version (the install module's own atomic commit, under its lock), then
   the proxy: every request from then on goes to the new server;
3. in the background, wait until the old server answers no proxied request, then SIGTERM it (its own
   drain) and reap it.
The new version is then on probation: if its server has to be restarted `probation_failures` times
(crashes, failed restarts) within `probation_seconds`, the agent switches back to the version it
replaced, by itself, and counts a failure. `rollback` is a switch to the previous healthy version.

Everything here runs on the agent's loop thread; the control endpoint only queues a job and waits for
its Future, so the supervisors are never touched from two threads.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lmpack.agent.config import AgentConfig, ServerSpec
from lmpack.agent.current import point_current_at_served, release_state
from lmpack.agent.proxy import Proxy
from lmpack.agent.supervisor import Supervisor
from lmpack.bundle.install import is_installed, list_releases, set_current
from lmpack.bundle.manifest import parse_version
from lmpack.errors import LmpackError, SwitchError

log = logging.getLogger("lmpack.agent")

SWITCHING_WAKE = 0.05  # while a new server starts, look at it this often: readiness is noticed fast
BACKEND_HOST = "127.0.0.1"  # servers listen on loopback only, whatever [server] host exposes: clients use the proxy


def free_port(host: str = BACKEND_HOST) -> int:
    """A loopback port the kernel considers free now; a lost race shows up as a failed start, which backs off."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass
class Job:
    """One switch to carry out: to `version`, or (None) to the previous healthy version."""

    version: str | None
    automatic: bool = False
    reason: str = "requested"
    result: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    target: str | None = None
    started: float = 0.0


@dataclass
class Probation:
    version: str
    previous: str
    since: float
    restarts_at_start: int


class VersionSwitcher:
    """The active server, a candidate during a switch, the proxy's backend, probation and the rollback history."""

    def __init__(
        self,
        config: AgentConfig,
        proxy: Proxy,
        *,
        wake: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.spec, self.supervision, self.switch_policy = config.server, config.supervision, config.switch
        self.proxy, self._wake, self._clock = proxy, wake, clock
        self.active = Supervisor(self._backend_spec(None), self.supervision)
        self.candidate: Supervisor | None = None
        self.job: Job | None = None
        self.probation: Probation | None = None
        self.healthy: list[str] = []  # versions that served, oldest first, each once; the last is active
        self.bad: set[str] = set()  # rolled back by probation: never a rollback target
        self.failures: collections.deque[float] = collections.deque()
        self.switches_total = self.rollbacks_total = 0
        self.last: dict[str, Any] | None = None
        self._jobs: queue.Queue[Job] = queue.Queue()
        self._stoppers: list[threading.Thread] = []

    # --- from the control endpoint (any thread) -------------------------------------------------------------

    def request(self, name: str, version: str | None, prefix: str | None = None) -> concurrent.futures.Future:
        """Queue a switch (version) or a rollback (None); the Future gets the result document or a SwitchError."""
        if self.spec.prefix is None:
            raise SwitchError(
                "this agent serves a variant directory, not an installed release: nothing to switch",
                hint="configure [server] prefix and release (docs/operations.md)",
            )
        if name != self.spec.release:
            raise SwitchError(f"this agent serves release {self.spec.release!r}, not {name!r}")
        if prefix is not None and Path(prefix).resolve() != self.spec.prefix.resolve():
            raise SwitchError(f"this agent serves releases from {self.spec.prefix}, not {prefix}")
        if version is not None:
            self._check_installed(version)  # refused at once, before it waits behind another switch
        job = Job(version=version)
        self._jobs.put(job)
        self._wake()
        return job.result

    # --- the agent's loop -----------------------------------------------------------------------------------

    @property
    def wake_seconds(self) -> float:
        return SWITCHING_WAKE if self.candidate is not None else self.active.wake_seconds

    def tick(self) -> None:
        now = self._clock()
        self.active.tick()
        version = self.active.version
        if self.active.phase == "running" and version and version not in self.bad and version not in self.healthy[-1:]:
            self._served(version)
        if self.candidate is not None:
            self._tick_candidate(now)
        elif not self._jobs.empty():
            self._begin(self._jobs.get_nowait(), now)
        if self.candidate is None:
            self._check_probation(now)
        # A server that got ready once keeps its traffic until it is gone: a readiness probe that times out
        # under load must not hold every request for a probe interval. Its own 503s (draining) pass through.
        self.proxy.set_backend(self.active.url if self.active.phase == "running" else None)
        self._stoppers = [t for t in self._stoppers if t.is_alive()]

    def stop(self) -> int | None:
        """Agent shutdown: abandon a switch in progress, let old servers finish draining, drain the active one."""
        if self.candidate is not None:
            self.candidate.stop()
            self.candidate = None
            self._fail(self.job, "the agent is stopping", abandoned=True)
        while not self._jobs.empty():  # queued behind it: answer now rather than let the caller time out
            self._fail(self._jobs.get_nowait(), "the agent is stopping", abandoned=True)
        for stopper in self._stoppers:
            stopper.join(self.spec.drain_seconds + 15)
        return self.active.stop()

    def failures_recent(self) -> int:
        now = self._clock()
        while self.failures and now - self.failures[0] > self.switch_policy.alert_window_seconds:
            self.failures.popleft()
        return len(self.failures)

    def status(self) -> dict[str, Any]:
        probation = None
        if self.probation is not None:
            probation = {
                "version": self.probation.version,
                "previous": self.probation.previous,
                "seconds_left": round(
                    max(0.0, self.probation.since + self.switch_policy.probation_seconds - self._clock()), 3
                ),
                "restarts": self.active.restarts_total - self.probation.restarts_at_start,
            }
        return {
            "release": release_state(self.spec, self.active.version),
            "candidate": self.candidate.status() if self.candidate else None,
            "probation": probation,
            "healthy": list(self.healthy),
            "rolled_back": sorted(self.bad),
            "switches_total": self.switches_total,
            "rollbacks_total": self.rollbacks_total,
            "failures_recent": self.failures_recent(),
            "last": self.last,
            "proxy": self.proxy.status(),
        }

    # --- the steps ------------------------------------------------------------------------------------------

    def _begin(self, job: Job, now: float) -> None:
        job.started = now
        self.job = job
        try:
            job.target = job.version if job.version is not None else self._rollback_target()
            self._check_installed(job.target)
        except SwitchError as exc:
            self._finish(job, error=exc, count=False)
            return
        if job.target == self.active.version and self.active.phase == "running" and self.active.ready:
            self._finish(job, result=self._document(job, "unchanged", self.active.version, 0.0))
            return
        log.info(
            "switch: starting %s %s beside %s (%s)", self.spec.release, job.target, self.active.version, job.reason
        )
        self.candidate = Supervisor(self._backend_spec(job.target), self.supervision)
        self.candidate.tick()

    def _tick_candidate(self, now: float) -> None:
        candidate, job = self.candidate, self.job
        assert candidate is not None and job is not None  # tick() calls this only during a switch, which _begin set up
        candidate.tick()
        if candidate.phase == "running" and candidate.ready:
            self._commit(candidate, job, now)
        elif candidate.failed_starts:
            reason = candidate.last_reason
            candidate.stop()
            self.candidate = None
            self._fail(job, f"{self.spec.release} {job.target} did not become ready: {reason}")

    def _commit(self, candidate: Supervisor, job: Job, now: float) -> None:
        prefix, release = self._release_spec()
        target = job.target
        assert target is not None  # _begin set it before it started the candidate
        ready_seconds = now - job.started
        try:  # the same atomic pointer switch as `lmpack install`
            set_current(prefix, release, target)
        except LmpackError as exc:
            candidate.stop()
            self.candidate = None
            self._fail(job, f"could not point current at {job.target}: {exc.message}")
            return
        old, self.active, self.candidate = self.active, candidate, None
        self.proxy.set_backend(candidate.url)  # from here on, new requests go to the new server
        self._served(target)
        self._retire(old)
        self.switches_total += 1
        rollback = job.automatic or job.version is None  # by probation, or `lmpack rollback`
        # a version that served before needs no probation; a new one replaces the one of the version it leaves
        self.probation = None
        if rollback:
            self.rollbacks_total += 1
        elif old.version is not None:
            self.probation = Probation(target, old.version, now, candidate.restarts_total)
        log.info(
            "switch: %s %s serves all new requests (was %s); ready after %.2f s",
            self.spec.release,
            job.target,
            old.version,
            ready_seconds,
        )
        self._finish(
            job, result=self._document(job, "rolled-back" if rollback else "switched", old.version, ready_seconds)
        )

    def _retire(self, old: Supervisor) -> None:
        """Let the old server finish what the proxy sent it, then drain and stop it, off the loop thread."""

        def run() -> None:
            if not self.proxy.wait_idle(old.url, self.spec.drain_seconds):
                log.warning(
                    "switch: %s still answers requests after %d s; stopping it anyway (its own drain follows)",
                    old.url,
                    self.spec.drain_seconds,
                )
            code = old.stop()
            log.info("switch: the old server (%s) stopped with status %s", old.version, code)

        thread = threading.Thread(target=run, name="lmpack-agent-retire", daemon=True)
        thread.start()
        self._stoppers.append(thread)

    def _check_probation(self, now: float) -> None:
        probation = self.probation
        if probation is None:
            return
        restarts = self.active.restarts_total - probation.restarts_at_start
        if restarts >= self.switch_policy.probation_failures:
            self.probation = None
            self.bad.add(probation.version)
            self.healthy = [v for v in self.healthy if v != probation.version]
            reason = (
                f"{self.spec.release} {probation.version} was restarted {restarts} times within its "
                f"{self.switch_policy.probation_seconds:g} s probation; rolling back to {probation.previous}"
            )
            log.error("switch: %s", reason)
            self.failures.append(now)
            self._begin(Job(version=probation.previous, automatic=True, reason=reason), now)
        elif now - probation.since >= self.switch_policy.probation_seconds:
            log.info("switch: %s %s passed its probation", self.spec.release, probation.version)
            self.probation = None

    def _rollback_target(self) -> str:
        """The last healthy version before the active one; else the highest installed one below it."""
        current = self.active.version
        for version in reversed(self.healthy):
            if version != current and version not in self.bad:
                return version
        prefix, _ = self._release_spec()
        older = [
            r.version
            for r in list_releases(prefix)
            if r.name == self.spec.release
            and r.version not in self.bad
            and current is not None
            and parse_version(r.version) < parse_version(current)
        ]
        if not older:
            raise SwitchError(
                f"no previous healthy release of {self.spec.release} to roll back to",
                hint="name a version: lmpack switch NAME VERSION",
            )
        return older[-1]

    def _release_spec(self) -> tuple[Path, str]:
        """The prefix and release name a switch works on."""
        # request() refuses a switch when [server] names a variant directory (read_config: 'prefix' and
        # 'release' go together), so every switch step sees both set
        assert self.spec.prefix is not None and self.spec.release is not None
        return self.spec.prefix, self.spec.release

    def _backend_spec(self, version: str | None) -> ServerSpec:
        """A server on a private loopback port; pinned to `version` when a switch starts it."""
        return replace(self.spec, host=BACKEND_HOST, port=free_port(), version=version)

    def _check_installed(self, version: str) -> None:
        prefix, release = self._release_spec()
        try:
            installed = is_installed(prefix, release, version)
        except LmpackError as exc:  # not a version at all ("../x"): never a path to start a server from
            raise SwitchError(exc.message, hint=exc.hint) from None
        if not installed:
            raise SwitchError(
                f"{self.spec.release} {version} is not installed under {self.spec.prefix}",
                hint=f"lmpack list --prefix {self.spec.prefix}",
            )

    def _served(self, version: str) -> None:
        self.healthy = [v for v in self.healthy if v != version] + [version]

    def _fail(self, job: Job | None, reason: str, *, abandoned: bool = False) -> None:
        """The switch did not happen. One `abandoned` because the agent stops did not fail: it is not counted,
        and `current` keeps what an install set, for the next start to serve."""
        log.error("switch failed: %s; %s keeps serving", reason, self.active.version)
        if not abandoned:
            point_current_at_served(self.spec, self.active.version)
        if job is not None:
            self._finish(
                job,
                error=SwitchError(
                    reason,
                    hint="lmpack status shows the server that kept serving; "
                    "the agent's log has the new server's output",
                ),
                count=not abandoned,
            )

    def _finish(
        self, job: Job, *, result: dict[str, Any] | None = None, error: SwitchError | None = None, count: bool = True
    ) -> None:
        self.job = None
        if error is not None:
            if count:
                self.failures.append(self._clock())
            self.last = {"action": "failed", "version": job.target, "error": error.message, "automatic": job.automatic}
            if not job.result.done():
                job.result.set_exception(error)
            return
        self.last = result
        if not job.result.done():
            job.result.set_result(result)

    def _document(self, job: Job, action: str, previous: str | None, ready_seconds: float) -> dict[str, Any]:
        return {
            "action": action,
            "name": self.spec.release,
            "version": job.target,
            "previous": previous,
            "automatic": job.automatic,
            "reason": job.reason,
            "ready_seconds": round(ready_seconds, 3),
            "seconds": round(self._clock() - job.started, 3),
        }
