"""The systemd notify protocol, against a real datagram socket standing in for systemd."""

from __future__ import annotations

import socket

from lmpack.agent.systemd import SystemdNotifier


def _receiver(tmp_path):
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    return sock, path


def test_ready_watchdog_and_stopping_reach_the_socket(tmp_path):
    sock, path = _receiver(tmp_path)
    with sock:
        notifier = SystemdNotifier(socket_path=path, watchdog_seconds=0.2)
        assert notifier.ping_interval == 0.1
        notifier.ready()
        notifier.watchdog()
        notifier.watchdog()  # within the half interval: not sent again
        notifier.stopping()
        received = [sock.recv(64).decode() for _ in range(3)]
    assert received == ["READY=1", "WATCHDOG=1", "STOPPING=1"]


def test_outside_systemd_nothing_is_sent(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    notifier = SystemdNotifier()
    assert notifier.socket_path is None and notifier.ping_interval is None
    notifier.ready()
    notifier.watchdog()


def test_watchdog_for_another_pid_is_ignored(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert SystemdNotifier().watchdog_seconds is None
    monkeypatch.delenv("WATCHDOG_PID")
    assert SystemdNotifier().watchdog_seconds == 30.0
