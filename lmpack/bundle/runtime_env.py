"""A release's own Python environment (RELEASE/venv) made offline from its wheels, and systemd units for it.

The venv is created at the release's final path, because a venv bakes its absolute path into its
scripts, but before `current` switches: until then the release is an uncommitted leftover that the next
install removes, so a kill or a failing pip leaves the old state. pip runs with `--no-index`,
`--require-hashes`, binary wheels only, and with the host's pip configuration ignored (`--isolated`,
PIP_CONFIG_FILE=/dev/null and no PIP_* variables): an air-gapped host's pip.conf that points at a
mirror, adds find-links or constraints must not change what gets installed.

Runtime-side: standard library, lmpack.errors and lmpack.bundle.manifest only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from lmpack.bundle.manifest import Manifest
from lmpack.errors import InstallError

VENV_DIR = "venv"
SERVE_UNIT = "lmpack-serve@.service"
AGENT_UNIT = "lmpack-agent@.service"
_TIMEOUT_S = 1800


def check_python(manifest: Manifest, python: str) -> None:
    """Refuse early, before extracting anything, when the interpreter cannot take the bundled wheels."""
    if manifest.wheelhouse is None:
        return
    try:
        done = subprocess.run(
            [python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except OSError as exc:
        raise InstallError(
            f"cannot run the Python {python} to create the release venv: {exc.strerror}",
            hint="pass --python PATH to a Python " + manifest.wheelhouse.python,
        ) from exc
    have = done.stdout.strip()
    if have != manifest.wheelhouse.python:
        raise InstallError(
            f"{manifest.name} {manifest.version} ships wheels for Python {manifest.wheelhouse.python} "
            f"({manifest.wheelhouse.platform_tag}), but {python} is Python {have or '?'}",
            hint=f"pass --python PATH to a Python {manifest.wheelhouse.python}, or pack for this host's target",
        )


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k != "PYTHONPATH"}
    env["PIP_CONFIG_FILE"] = os.devnull
    return env


def _die_with_parent() -> None:
    """PR_SET_PDEATHSIG: if the installer is killed, its venv or pip child dies too instead of writing on
    into a release directory that the next install is removing."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the next install's cleanup still removes the leftover
        pass


def _run(args: list[str], what: str, children: Path | None = None) -> None:
    """Run one step of making the venv in a process group of its own, whose number goes into `children` first:
    the direct child dies with the installer (PR_SET_PDEATHSIG), but what it starts (ensurepip's pip) would
    not, so a killed install leaves the group for the next install to end (reap_children)."""
    try:
        process = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_clean_env(),
            preexec_fn=_die_with_parent,
            start_new_session=True,
        )
        if children is not None:
            with open(children, "a") as record:
                record.write(f"{process.pid}\n")
                record.flush()
                os.fsync(record.fileno())
        try:
            stdout, stderr = process.communicate(timeout=_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise
        done = subprocess.CompletedProcess(args, process.returncode, stdout, stderr)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise InstallError(
            f"{what} failed: {exc}", hint="nothing was switched; the previous release is current"
        ) from exc
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-8:])
        raise InstallError(f"{what} failed:\n{tail}", hint="nothing was switched; the previous release is current")


def create_venv(release: Path, manifest: Manifest, python: str, *, children: Path | None = None) -> Path:
    """RELEASE/venv with exactly the locked wheels installed, offline; returns the venv directory. The process
    groups of the steps are recorded in `children` (see reap_children)."""
    assert manifest.wheelhouse is not None
    venv = release / VENV_DIR
    _run([python, "-m", "venv", str(venv)], f"creating {venv}", children)
    wheels_dir = release / Path(manifest.wheelhouse.lock).parent
    _run(
        [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--isolated",
            "--no-index",
            "--find-links",
            str(wheels_dir),
            "--require-hashes",
            "--only-binary=:all:",
            "--no-cache-dir",
            "--disable-pip-version-check",
            "--no-warn-script-location",
            "-r",
            str(release / manifest.wheelhouse.lock),
        ],
        f"installing the bundled wheels into {venv}",
        children,
    )
    return venv


def reap_children(children: Path, *, timeout: float = 30.0) -> None:
    """End what a killed install left running (the process groups recorded in `children`), and wait until it
    is gone, so nothing writes on into the release directory the caller is about to remove; then forget them.

    A group is ended only while its leader's number still names a group: a number the system gave to another
    program since is a group of other processes, which killpg would reach, so only members whose command line
    names the file's directory (the install prefix) are killed."""
    try:
        groups = [int(line) for line in children.read_text().split() if line.isdigit()]
    except OSError:
        return
    prefix = str(children.parent.resolve())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        members = [pid for pid, group in _processes() if group in groups and prefix in _cmdline(pid)]
        if not members:
            break
        for pid in members:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    children.unlink(missing_ok=True)


def _processes() -> list[tuple[int, int]]:
    """(pid, process group) of every process, from /proc (empty where there is none)."""
    found = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        found.append((int(entry.name), int(fields[2])))  # after "pid (comm)": state, ppid, pgrp
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def write_systemd_units(directory: Path, prefix: Path, manifest: Manifest) -> list[Path]:
    """The templates lmpack-serve@.service and lmpack-agent@.service, plus a drop-in naming the variant to serve.

    The instance name is the bundle name, so `systemctl enable --now lmpack-serve@smollm2` follows
    upgrades: the unit goes through PREFIX/releases/NAME/current, which install switches atomically.
    The drop-in sets LMPACK_VARIANT (the bundle's first variant) and LMPACK_PORT; edit it to choose.
    Enable one or the other for a bundle: the agent starts and supervises `lmpack serve` itself, reading
    /etc/lmpack/agent-NAME.toml (docs/operations.md).
    """
    release = f"{prefix.resolve()}/releases/%i/current"
    unit = "\n".join(
        [
            "[Unit]",
            "Description=lmpack serve for the current release of %i",
            "After=network.target",
            "",
            "[Service]",
            "Type=simple",
            f"Environment=LMPACK_RELEASE={release}",
            "Environment=LMPACK_PORT=8000",
            f"ExecStart={release}/venv/bin/lmpack serve {release}/variants/${{LMPACK_VARIANT}} --host 127.0.0.1 "
            "--port ${LMPACK_PORT}",
            "Restart=on-failure",
            "RestartSec=2",
            "DynamicUser=yes",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "ProtectHome=yes",
            "PrivateTmp=yes",
            "",
            "[Install]",
            "WantedBy=multi-user.target",
            "",
        ]
    )
    agent = "\n".join(
        [
            "[Unit]",
            "Description=lmpack agent supervising the current release of %i",
            "After=network.target",
            "",
            "[Service]",
            "Type=notify",  # the agent sends READY=1 once it supervises, then WATCHDOG=1 from its loop
            "NotifyAccess=main",
            "WatchdogSec=60",
            f"ExecStart={release}/venv/bin/lmpack agent --config /etc/lmpack/agent-%i.toml",
            "KillMode=control-group",  # the agent's server child goes with it
            "Restart=on-failure",
            "RestartSec=5",
            "NoNewPrivileges=yes",
            "PrivateTmp=yes",
            "",
            "[Install]",
            "WantedBy=multi-user.target",
            "",
        ]
    )
    drop_in = f"[Service]\nEnvironment=LMPACK_VARIANT={manifest.variants[0].name}\n"
    return [
        _write_atomic(directory / SERVE_UNIT, unit),
        _write_atomic(directory / AGENT_UNIT, agent),
        _write_atomic(directory / f"lmpack-serve@{manifest.name}.service.d" / "variant.conf", drop_in),
    ]


def _write_atomic(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.partial")
    temp.write_text(text)
    os.replace(temp, path)
    return path


def default_python() -> str:
    """The interpreter that runs this installer: install.py's python3, or the running lmpack's."""
    return sys.executable
