"""Where lmpack finds its data files and keeps its cache; the environment is read here and nowhere else."""

from __future__ import annotations

import os
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent.parent


def _shipped_dir(name: str) -> Path:
    """A data folder shipped with lmpack: inside the wheel (lmpack/_data/NAME) or the source checkout (NAME/)."""
    in_wheel = _PACKAGE_DIR / "_data" / name
    if in_wheel.is_dir():
        return in_wheel
    return _PACKAGE_DIR.parent / name


def shipped_targets_dir() -> Path:
    return _shipped_dir("targets")


def shipped_profiles_dir() -> Path:
    return _shipped_dir("profiles")


def config_home() -> Path:
    """User configuration: $LMPACK_HOME, else $XDG_CONFIG_HOME/lmpack, else ~/.config/lmpack."""
    if os.environ.get("LMPACK_HOME"):
        return Path(os.environ["LMPACK_HOME"])
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "lmpack"


def user_targets_dir() -> Path:
    return config_home() / "targets"


def user_profiles_dir() -> Path:
    return config_home() / "profiles"


def cache_dir() -> Path:
    """Step cache: $LMPACK_CACHE, else $XDG_CACHE_HOME/lmpack, else ~/.cache/lmpack."""
    if os.environ.get("LMPACK_CACHE"):
        return Path(os.environ["LMPACK_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lmpack"


def hub_offline() -> bool:
    """True when the user asked for no network access to the Hub (HF_HUB_OFFLINE)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def hub_endpoint() -> str | None:
    """The Hub's address (HF_ENDPOINT), or None for huggingface_hub's default.

    Read at each call: huggingface_hub reads it once, when it is first imported.
    """
    return os.environ.get("HF_ENDPOINT", "").strip().rstrip("/") or None


def api_keys_env() -> str | None:
    """LMPACK_API_KEYS: comma-separated API keys `lmpack serve` accepts (besides --api-key-file)."""
    return os.environ.get("LMPACK_API_KEYS") or None


def serve_env(names: tuple[str, ...]) -> dict[str, str]:
    """LMPACK_SERVE_<NAME> for each of `names` that is set and not empty (lmpack serve settings)."""
    found = {name: os.environ.get(f"LMPACK_SERVE_{name.upper()}", "").strip() for name in names}
    return {name: value for name, value in found.items() if value}


def systemd_notify_socket() -> str | None:
    """NOTIFY_SOCKET: set by systemd for Type=notify services; where READY=1 and WATCHDOG=1 go."""
    return os.environ.get("NOTIFY_SOCKET") or None


def systemd_watchdog_seconds() -> float | None:
    """WatchdogSec= of the unit, from WATCHDOG_USEC (ignored when WATCHDOG_PID names another process)."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1e6
