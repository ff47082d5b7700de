"""Supervision of one `lmpack serve` child: start it, probe it, restart it only when it is truly down.

Restart policy (docs/operations.md):
- A child that exits is replaced at once; if it exits (or never becomes ready within the startup
  timeout) while starting, that is a failed start, and the next try waits `backoff_initial`,
  doubling up to `backoff_max`. A start that reaches ready resets the back-off.
- A running child is restarted only after `liveness_failures` consecutive liveness misses. A stopped
  (SIGSTOP) or wedged process misses like a dead one: the probe has a hard timeout. Readiness and
  load (503 while draining, 429 when busy) never cause a restart: liveness is answered without the
  model, so a busy server stays live.
- A hung child gets SIGKILL, not SIGTERM: a stopped process cannot run its drain.
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmpack.agent import probes
from lmpack.agent.config import ServerSpec, Supervision
from lmpack.bundle.releases import release_variants, serving_release
from lmpack.errors import NotFoundError

log = logging.getLogger("lmpack.agent")

RESTART_WINDOW = 15 * 60
WAKE_SECONDS = 0.5  # how often the loop looks at the child: an exit or a start is noticed this fast


def resolve_variant(spec: ServerSpec) -> tuple[Path, str | None]:
    """The variant directory to serve, and the release version when it comes from PREFIX/releases/NAME/current.

    Resolved at every start, so a restart after `lmpack install` switched `current` serves the new release;
    a spec pinned to a version by a switch (`spec.version`) serves that version whatever `current` says.
    """
    if spec.prefix is None:
        assert spec.variant is not None  # read_config: a [server] without 'prefix' names a variant
        path = Path(spec.variant)
        if not path.is_dir():
            raise NotFoundError(f"variant directory {path} does not exist")
        return path, None
    assert spec.release is not None  # read_config: 'prefix' and 'release' go together
    release = serving_release(spec.prefix, spec.release, spec.version)
    found = release_variants(release)
    if spec.variant is not None:
        named = next((p for p in found if p.name == spec.variant), None)
        if named is None:
            raise NotFoundError(f"{release} has no variant {spec.variant!r}")
        return named, release.name
    if len(found) != 1:
        raise NotFoundError(f"{release} has {len(found)} variants; name one with 'variant' in [server]")
    return found[0], release.name


class Supervisor:
    """Owns the child process; the agent's loop calls `tick()` every `wake_seconds`.

    Each tick checks whether the child exited (free: waitpid) and, while it starts, whether it is
    ready; liveness is probed only every probe interval. So a crash is noticed within half a second,
    not a probe interval, while a hang still takes `liveness_failures` probe intervals.
    """

    def __init__(self, spec: ServerSpec, policy: Supervision, *, clock: Callable[[], float] = time.monotonic):
        self.spec, self.policy, self._clock = spec, policy, clock
        self.url = f"http://{spec.host}:{spec.port}"
        self.process: subprocess.Popen | None = None
        self.phase = "stopped"  # stopped | starting | running | backoff | stopping
        self.live = self.ready = False
        self.misses = 0
        self.failed_starts = 0  # in a row; resets when a start reaches ready
        self.next_start = 0.0
        self.backoff_seconds = 0.0  # the wait before the next try after a failed start
        self.started_at: float | None = None
        self.restarts: collections.deque[float] = collections.deque()
        self.restarts_total = 0
        self.last_reason: str | None = None
        self.last_start_seconds: float | None = None
        self.variant: Path | None = None
        self.version: str | None = None
        self._spawned_once = False
        self._next_probe = 0.0

    # --- the loop's entry points -------------------------------------------------------------------------

    def tick(self) -> None:
        now = self._clock()
        if self.process is not None:
            code = self.process.poll()
            if code is not None:
                self._lost(now, f"the server exited with status {code}")
            elif self.phase == "starting":
                self._check_start(now)
            elif now >= self._next_probe:
                self._next_probe = now + self.policy.probe_interval
                self._check_running(now)
        if self.process is None and self.phase != "stopping" and self._clock() >= self.next_start:
            self._spawn(self._clock())

    @property
    def wake_seconds(self) -> float:
        return min(self.policy.probe_interval, WAKE_SECONDS)

    def stop(self) -> int | None:
        """SIGTERM the child and wait for its drain (drain_seconds plus a margin), then SIGKILL."""
        self.phase = "stopping"
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return None if process is None else process.returncode
        _signal(process, signal.SIGCONT)  # a stopped child could not act on SIGTERM
        _signal(process, signal.SIGTERM)
        try:
            return process.wait(timeout=self.spec.drain_seconds + 10)
        except subprocess.TimeoutExpired:
            log.error("the server did not stop within its drain time; killing it")
            _signal(process, signal.SIGKILL)
            return process.wait()

    def status(self) -> dict[str, Any]:
        now = self._clock()
        while self.restarts and now - self.restarts[0] > RESTART_WINDOW:
            self.restarts.popleft()
        running = self.process is not None and self.process.poll() is None
        return {
            "phase": self.phase,
            "pid": self.process.pid if self.process is not None and running else None,
            "url": self.url,
            "variant": str(self.variant) if self.variant else None,
            "version": self.version,
            "live": self.live,
            "ready": self.ready,
            "liveness_misses": self.misses,
            "restarts_total": self.restarts_total,
            "restarts_15m": len(self.restarts),
            "failed_starts": self.failed_starts,
            "backoff_seconds": self.backoff_seconds,
            "last_restart_reason": self.last_reason,
            "last_start_seconds": self.last_start_seconds,
            "next_start_in_seconds": round(max(0.0, self.next_start - now), 3) if self.process is None else None,
            "uptime_seconds": round(now - self.started_at, 3) if running and self.started_at else None,
        }

    # --- states ------------------------------------------------------------------------------------------

    def _spawn(self, now: float) -> None:
        if self._spawned_once:
            self.restarts_total += 1
            self.restarts.append(now)
        self._spawned_once = True
        try:
            self.variant, self.version = resolve_variant(self.spec)
        except NotFoundError as exc:
            self._failed_start(now, exc.message)
            return
        command = [
            sys.executable,
            "-m",
            "lmpack",
            "serve",
            str(self.variant),
            "--host",
            self.spec.host,
            "--port",
            str(self.spec.port),
            "--drain-seconds",
            str(self.spec.drain_seconds),
            *self.spec.args,
        ]
        log.info("starting: %s", " ".join(command))
        # Its own session: a Ctrl-C at the agent's terminal reaches the agent, which then drains the child.
        self.process = subprocess.Popen(command, start_new_session=True, stdin=subprocess.DEVNULL)
        self.phase, self.started_at, self.live, self.ready, self.misses = "starting", now, False, False, 0

    def _check_start(self, now: float) -> None:
        # called by tick() only while starting: _spawn set both
        assert self.process is not None and self.started_at is not None
        result = probes.ready(self.url, timeout=self.policy.probe_timeout)
        if result.state == "failed":  # the warm-up failed: waiting out the startup timeout cannot help
            self._kill()
            self._failed_start(now, f"not ready: the warm-up failed ({result.error})")
        elif result.ok:
            self.phase, self.live, self.ready, self.failed_starts, self.backoff_seconds = "running", True, True, 0, 0.0
            self.last_start_seconds = round(now - self.started_at, 3)
            log.info("the server is ready (pid %d) %.2f s after its start", self.process.pid, self.last_start_seconds)
        elif now - self.started_at > self.policy.startup_timeout:
            self._kill()
            self._failed_start(now, f"not ready {self.policy.startup_timeout:g} s after its start: {result.error}")

    def _check_running(self, now: float) -> None:
        result = probes.live(self.url, timeout=self.policy.probe_timeout)
        if result.ok:
            self.misses, self.live = 0, True
            self.ready = probes.ready(self.url, timeout=self.policy.probe_timeout).ok
            return
        self.misses += 1
        self.live = self.ready = False
        log.warning("liveness probe missed (%d of %d): %s", self.misses, self.policy.liveness_failures, result.error)
        if self.misses >= self.policy.liveness_failures:
            self._kill()
            self._lost(now, f"{self.misses} liveness probes missed in a row ({result.error})")

    def _lost(self, now: float, reason: str) -> None:
        """The child is gone: a failed start backs off, a crash of a ready server restarts at once."""
        self.process = None
        if self.phase == "starting":
            self._failed_start(now, reason)
            return
        log.error("restarting the server: %s", reason)
        self.last_reason, self.phase, self.next_start = reason, "backoff", now
        self.live = self.ready = False

    def _failed_start(self, now: float, reason: str) -> None:
        self.failed_starts += 1
        delay = min(self.policy.backoff_initial * 2 ** (self.failed_starts - 1), self.policy.backoff_max)
        log.error("the server failed to start (%d in a row): %s; next try in %g s", self.failed_starts, reason, delay)
        self.process = None
        self.backoff_seconds = delay
        self.last_reason, self.phase, self.next_start = f"failed start: {reason}", "backoff", now + delay
        self.live = self.ready = False

    def _kill(self) -> None:
        if self.process is not None:
            _signal(self.process, signal.SIGKILL)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log.error("pid %d did not die after SIGKILL", self.process.pid)


def _signal(process: subprocess.Popen, sig: int) -> None:
    """Signal the child's whole process group (it leads its own session)."""
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
