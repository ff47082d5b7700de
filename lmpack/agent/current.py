"""`current` (what the next start serves) against the version the agent serves.

They differ after an `lmpack install` that no switch followed, until `lmpack switch`; `lmpack status` and
`lmpack list` show both. After a failed switch they agree again: `current` is pointed back at what serves.
"""

from __future__ import annotations

import logging
from typing import Any

from lmpack.agent.config import ServerSpec
from lmpack.bundle.install import set_current
from lmpack.bundle.releases import current_version, name_dir
from lmpack.errors import LmpackError

log = logging.getLogger("lmpack.agent")


def release_state(spec: ServerSpec, serving: str | None) -> dict[str, Any] | None:
    """The release's name and prefix, the version served and the one `current` names; None for a variant."""
    if spec.prefix is None or spec.release is None:
        return None
    return {
        "name": spec.release,
        "prefix": str(spec.prefix.resolve()),
        "serving": serving,
        "current": current_version(name_dir(spec.prefix, spec.release)),
    }


def point_current_at_served(spec: ServerSpec, serving: str | None) -> None:
    """After a failed switch: an install may have moved `current` to the version that just failed, and the
    next start of the agent (or of a host's unit) would serve it; point it at what serves."""
    if spec.prefix is None or spec.release is None or serving is None:
        return
    try:
        previous = set_current(spec.prefix, spec.release, serving)
    except LmpackError as exc:
        log.error("switch: could not point current back at %s: %s", serving, exc.message)
        return
    if previous != serving:
        log.warning("switch: current pointed at %s, which failed; it points at %s again", previous, serving)
