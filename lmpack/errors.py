"""One exception tree for everything a user can cause; the CLI maps each to a message and exit code.

Exit codes are stable and documented in docs/cli.md.
"""

from __future__ import annotations


class LmpackError(Exception):
    """Base of every expected failure: one line of what went wrong, and a hint for what to do next."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


class ConfigError(LmpackError):
    """A target, profile or other TOML file is malformed or names an unknown field or value."""

    exit_code = 3


class NotFoundError(LmpackError):
    """A named target, profile, model path or repository does not exist."""

    exit_code = 4


class PlanError(LmpackError):
    """A target and a profile cannot be combined (fp8 on t4, TensorRT on a CPU target)."""

    exit_code = 5


class UnsupportedModelError(LmpackError):
    """The model's architecture or format is not one lmpack can export."""

    exit_code = 6


class UnsafeModelError(LmpackError):
    """The model needs pickle loading or remote code, and the user did not allow it by flag."""

    exit_code = 7


class QualityGateError(LmpackError):
    """The optimized model differs from the reference by more than the profile allows."""

    exit_code = 8

    def __init__(self, message: str, *, hint: str | None = None, measured: dict | None = None):
        super().__init__(message, hint=hint)
        self.measured = measured or {}


class DiskFullError(LmpackError):
    """The disk filled up while writing; nothing partial was left behind."""

    exit_code = 9


class SourceError(LmpackError):
    """The model source (the Hub, a file server) could not be reached or answered with an error."""

    exit_code = 10


class FidelityError(LmpackError):
    """The build does not reproduce the source model: its tokenizer splits text differently from the source's own,
    or the fp32 export's logits are further from the source's than the tolerance."""

    exit_code = 22


class InsufficientMemoryError(LmpackError):
    """A build would need more memory than the machine has available; refused before it starts."""

    exit_code = 23


class StepError(LmpackError):
    """A build step failed for a reason that is not the user's input (a tool crashed)."""

    exit_code = 11


class BundleError(LmpackError):
    """A bundle is malformed or unsafe: a bad manifest, a hostile archive member, a bomb, a bad variant."""

    exit_code = 12


class VerificationError(LmpackError):
    """A bundle's contents or signature do not match its manifest; `problems` names every file found wrong."""

    exit_code = 13

    def __init__(self, message: str, *, hint: str | None = None, problems: list[str] | None = None):
        super().__init__(message, hint=hint)
        self.problems = problems or [message]


class InstallError(LmpackError):
    """An install or uninstall was refused: a downgrade without its flag, the current release, a busy prefix."""

    exit_code = 14


class VariantError(LmpackError):
    """A variant directory is incomplete or malformed: a missing model or tokenizer file, bad JSON, an unknown task."""

    exit_code = 15


class RequestError(LmpackError):
    """A generation or embedding request asks for something the model cannot do (a prompt longer than its
    context, a sampling parameter out of bounds). The server answers 400 naming `param`."""

    exit_code = 16

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.param = param
        self.code = code


class NoCompatibleVariantError(LmpackError):
    """No variant of a bundle or release can run on this host; `rejected` maps each variant to its reasons."""

    exit_code = 17

    def __init__(self, message: str, *, hint: str | None = None, rejected: dict[str, list[str]] | None = None):
        super().__init__(message, hint=hint)
        self.rejected = rejected or {}


class AgentError(LmpackError):
    """The agent could not be reached or answered an error, or the server it supervises could not be found."""

    exit_code = 18


class SwitchError(LmpackError):
    """A version switch or rollback was refused or failed (the new version never got ready, nothing to roll
    back to); the version that was serving keeps serving."""

    exit_code = 19


class AddressInUseError(LmpackError):
    """`lmpack serve` cannot listen on its address: the port is taken, or the host is not this machine's."""

    exit_code = 21


class GpuMemoryError(LmpackError):
    """The GPU has too little free memory to load the chosen variant; the message names both numbers."""

    exit_code = 20


class FleetError(LmpackError):
    """A `lmpack fleet` command failed: the Ray cluster is unreachable or refused this node's token, the
    versions of Ray or lmpack differ between nodes, a port is taken, or a deployment did not become healthy."""

    exit_code = 24
