"""Updates that arrive on their own: signed bundles copied into an inbox directory are taken by the agent.

Each bundle is verified with the configured key and installed as a new release without moving `current`
(the same verified install as `lmpack install`), then, by the policy, switched to with the usual zero-downtime
switch and its probation (a version that keeps crashing is rolled back by the switcher). Every step is an event
for the notifiers; the bundle moves to inbox/done/ or inbox/rejected/ with a reason file beside it.

A file is taken once it is complete: named *.lmpack (a copy in progress under a temporary name, a dot name or
another suffix, is not looked at) and its size and time unchanged for `settle_seconds` (a copy still being
written in place). A bundle the agent was killed while installing stays in the inbox and is taken again: the
install is atomic, and one already installed is recognised.
"""

from __future__ import annotations

import collections
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from lmpack.agent.config import ServerSpec, UpdateSettings
from lmpack.bundle.install import InstallOptions, install
from lmpack.bundle.manifest import parse_version
from lmpack.errors import LmpackError

log = logging.getLogger("lmpack.agent")

SUFFIX = ".lmpack"
DONE, REJECTED = "done", "rejected"
REASON_SUFFIX = ".reason.txt"
_HISTORY = 20  # outcomes kept for `lmpack status`

Publish = Callable[[dict[str, Any]], None]
RequestSwitch = Callable[[str, str], Future]


class Inbox:
    """Called from its own thread every poll_seconds: takes the complete bundles, and a switch that waits for
    its window once the window opens. `status()` is safe to read from any thread."""

    def __init__(
        self,
        settings: UpdateSettings,
        server: ServerSpec,
        *,
        request_switch: RequestSwitch,
        serving: Callable[[], dict[str, Any]],
        publish: Publish,
        switch_timeout: float,
        clock: Callable[[], float] = time.monotonic,
        local_minutes: Callable[[], int] | None = None,
    ):
        assert server.prefix is not None and server.release is not None  # config.py refuses [updates] otherwise
        self.settings, self.prefix, self.release = settings, server.prefix, server.release
        self._request_switch, self._serving, self._publish = request_switch, serving, publish
        self._switch_timeout, self._clock = switch_timeout, clock
        self._local_minutes = local_minutes or _local_minutes
        # Read by status() on the agent's loop thread while the inbox thread works: `_pending` is replaced whole,
        # `history` is only touched under the lock.
        self._lock = threading.Lock()
        self._seen: dict[str, tuple[int, int, float]] = {}  # file name -> (size, mtime_ns, unchanged since)
        self._pending: tuple[str, ...] = ()
        self.waiting: str | None = None  # installed, to be switched to when the window opens
        self._switched: set[str] = set()  # versions this inbox switched to: a rollback of one is announced
        self._rolled_back: set[str] = set()
        self.history: collections.deque[dict[str, Any]] = collections.deque(maxlen=_HISTORY)

    # --- the loop -------------------------------------------------------------------------------------------

    def poll(self) -> None:
        for path in self._complete_files():
            self._take(path)
        if self.waiting is not None and self.in_window():
            version, self.waiting = self.waiting, None
            self._switch(version)
        self._announce_rollbacks()

    def in_window(self) -> bool:
        if self.settings.window is None:
            return True
        start, end = self.settings.window
        now = self._local_minutes()
        return start <= now < end if start < end else (now >= start or now < end)

    def status(self) -> dict[str, Any]:
        with self._lock:
            recent = list(self.history)
        return {
            "inbox": str(self.settings.inbox),
            "policy": self.settings.policy,
            "window": _window_text(self.settings.window),
            "in_window": self.in_window(),
            "pending": list(self._pending),
            "waiting_for_window": self.waiting,
            "recent": recent,
        }

    # --- the steps ------------------------------------------------------------------------------------------

    def _complete_files(self) -> list[Path]:
        """The inbox's *.lmpack files whose size and time have held for settle_seconds, oldest first."""
        inbox, now = self.settings.inbox, self._clock()
        try:
            entries = [e for e in os.scandir(inbox) if e.name.endswith(SUFFIX) and not e.name.startswith(".")]
        except FileNotFoundError:
            return []
        ready, present = [], set()
        for entry in entries:
            try:
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if not entry.is_file(follow_symlinks=False):
                continue
            present.add(entry.name)
            size, mtime, since = self._seen.get(entry.name, (-1, -1, now))
            if (size, mtime) != (info.st_size, info.st_mtime_ns):
                self._seen[entry.name] = (info.st_size, info.st_mtime_ns, now)  # new, or still growing
            elif now - since >= self.settings.settle_seconds:
                ready.append((info.st_mtime_ns, Path(entry.path)))
        self._seen = {name: state for name, state in self._seen.items() if name in present}
        self._pending = tuple(sorted(self._seen))
        return [path for _, path in sorted(ready)]

    def _take(self, path: Path) -> None:
        self._seen.pop(path.name, None)
        self._pending = tuple(sorted(self._seen))
        self._event("received", "info", file=path.name)
        options = InstallOptions(
            public_keys=(self.settings.public_key,),
            require_signature=True,
            allow_downgrade=self.settings.allow_downgrade,
            make_current=False,
            expect_name=self.release,
        )
        try:
            result = install(path, self.prefix, options)
        except (LmpackError, OSError) as exc:
            reason = exc.message if isinstance(exc, LmpackError) else f"{type(exc).__name__}: {exc}"
            self._file(path, REJECTED, reason)
            self._event("rejected", "warning", file=path.name, reason=reason)
            return
        version = result.version
        served = self._serving().get("version")
        already = result.action == "unchanged"
        reason = f"{'already installed' if already else 'installed'}: {self.release} {version}"
        self._file(path, DONE, reason)
        self._event("installed", "info", file=path.name, version=version, action=result.action, serving=served)
        if version == served:
            return
        if version in self._serving().get("rolled_back", []):
            self._event("not-switched", "warning", version=version, reason="this version was rolled back before")
        elif self.settings.policy == "install-only":
            self._event(
                "awaiting-switch", "info", version=version, reason=f"run: lmpack switch {self.release} {version}"
            )
        elif self.in_window():
            self._switch(version)
        else:  # the newest of the versions that arrive while the window is closed is the one switched to
            if self.waiting is None or parse_version(version) > parse_version(self.waiting):
                self.waiting = version
            self._event("waiting-for-window", "info", version=self.waiting, window=_window_text(self.settings.window))

    def _switch(self, version: str) -> None:
        self._event("switching", "info", version=version)
        try:
            document = self._request_switch(self.release, version).result(timeout=self._switch_timeout)
        except LmpackError as exc:
            self._event("switch-failed", "critical", version=version, reason=exc.message)
            return
        except TimeoutError:
            self._event("switch-failed", "critical", version=version, reason="the switch did not finish in time")
            return
        self._switched.add(version)
        self._event("switched", "info", version=version, previous=document.get("previous"))

    def _announce_rollbacks(self) -> None:
        rolled_back = set(self._serving().get("rolled_back", [])) & self._switched
        for version in sorted(rolled_back - self._rolled_back):
            self._event("rolled-back", "critical", version=version, reason="it kept failing in its probation")
        self._rolled_back |= rolled_back

    def _file(self, path: Path, where: str, reason: str) -> None:
        """Move a processed bundle to done/ or rejected/ (never over an earlier one) with its reason beside it."""
        folder = self.settings.inbox / where
        try:
            folder.mkdir(exist_ok=True)
            target = folder / path.name
            if target.exists():
                target = folder / f"{path.stem}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}{SUFFIX}"
            shutil.move(path, target)
            target.with_name(target.name + REASON_SUFFIX).write_text(reason + "\n")
        except OSError as exc:  # a full disk or a read-only inbox: say so, the next poll retries nothing
            log.error("inbox: could not move %s to %s/: %s", path.name, where, exc)

    def _event(self, step: str, severity: str, **detail: Any) -> None:
        event = {
            "alert": f"update-{step}",
            "state": "event",
            "severity": severity,
            "release": self.release,
            **detail,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        with self._lock:
            self.history.append(event)
        log.info("update: %s %s", step, " ".join(f"{k}={v}" for k, v in detail.items()))
        self._publish(event)


def _local_minutes() -> int:
    now = time.localtime()
    return now.tm_hour * 60 + now.tm_min


def _window_text(window: tuple[int, int] | None) -> str | None:
    if window is None:
        return None
    (start, end) = window
    return f"{start // 60:02d}:{start % 60:02d}-{end // 60:02d}:{end % 60:02d}"
