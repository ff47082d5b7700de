"""The public library: every CLI command is one call into this module."""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmpack.bundle.manifest import check_name, parse_version
from lmpack.bundle.variant_dir import variant_document, write_variant
from lmpack.config import paths
from lmpack.config.profiles import Profile, list_profiles, load_profile
from lmpack.config.targets import Target, list_targets, load_target
from lmpack.errors import AgentError, ConfigError, SwitchError
from lmpack.fsio import publish
from lmpack.pipeline.cache import StepCache
from lmpack.pipeline.plan import PULL, BuildPlan, make_plan
from lmpack.pipeline.report import build_report, render_report
from lmpack.pipeline.runner import EventHandler, ignore_events, run_plan, run_step
from lmpack.pipeline.step import ProgressFactory, StepContext, silent_progress
from lmpack.progress import PhaseReporter, no_progress
from lmpack.steps import STEPS
from lmpack.steps.pull import PullParams, resolve_source
from lmpack.steps.supported import check_buildable, check_memory

if TYPE_CHECKING:
    from lmpack.bundle.pack import PackResult
    from lmpack.runtime.generation import Completion

__all__ = [
    "targets",
    "target",
    "profiles",
    "profile",
    "plan",
    "pull",
    "build",
    "BuildResult",
    "PullResult",
    "serve",
    "generate",
]


def targets() -> list[Target]:
    return list_targets()


def target(name_or_path: str) -> Target:
    return load_target(name_or_path)


def profiles() -> list[Profile]:
    return list_profiles()


def profile(name_or_path: str) -> Profile:
    return load_profile(name_or_path)


def plan(*, target: str, profile: str | None = None, pull: PullParams | None = None) -> BuildPlan:
    """The build plan for a target and profile (the target's default profile when none is given); `pull` says
    what the source may contain (pickle checkpoints, remote code)."""
    chosen_target = load_target(target)
    return make_plan(chosen_target, load_profile(profile or chosen_target.default_profile), STEPS, pull_params=pull)


@dataclass(frozen=True)
class PullResult:
    path: Path
    source: dict[str, Any]
    cached: bool


def _cache(cache_dir: Path | None) -> StepCache:
    return StepCache((cache_dir or paths.cache_dir()) / "steps")


def pull(
    model: str,
    *,
    revision: str | None = None,
    output: Path | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    cache_dir: Path | None = None,
) -> PullResult:
    """Fetch a model into the step cache as a clean Hugging Face directory; copy it to `output` if given."""
    params = PullParams(allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    source = resolve_source(model, revision=revision, params=params)
    artifact, record = run_step(STEPS.get(PULL)(params), StepContext(), source, _cache(cache_dir))
    path = artifact.path
    if output is not None:
        publish(Path(output), lambda staging: shutil.copytree(artifact.path, staging))
        path = Path(output)
    return PullResult(path=path, source=record.metrics, cached=record.cached)


@dataclass(frozen=True)
class BuildResult:
    variant_dir: Path
    report: dict[str, Any]
    bundle: PackResult | None = None  # when the build was asked to pack one


@dataclass(frozen=True)
class BundleRequest:
    """`lmpack build --bundle NAME:VERSION [--wheels]`: pack the new variant into OUTPUT/NAME-VERSION.lmpack."""

    name: str
    version: str
    wheels: bool = False
    wheel_source: Path | None = None

    @classmethod
    def parse(cls, spec: str, *, wheels: bool = False, wheel_source: Path | None = None) -> BundleRequest:
        name, sep, version = spec.partition(":")
        if not sep:
            raise ConfigError(f"--bundle {spec!r} must look like NAME:VERSION, e.g. smollm2:1.0.0")
        check_name(name, what="--bundle name")
        parse_version(version, what="--bundle version")
        return cls(name=name, version=version, wheels=wheels, wheel_source=wheel_source)


def build(
    model: str,
    *,
    target: str,
    profile: str | None = None,
    output_dir: Path = Path("dist"),
    name: str | None = None,
    revision: str | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    allow_quality_loss: bool = False,
    strict: bool = False,
    memory_check: bool = True,
    cache_dir: Path | None = None,
    on_event: EventHandler | None = None,
    progress: ProgressFactory = silent_progress,
    bundle: BundleRequest | None = None,
    on_phase: PhaseReporter = no_progress,
) -> BuildResult:
    """Pull, optimize and validate `model` for `target`; write one variant directory under `output_dir`
    (and, with `bundle`, pack it into `output_dir/NAME-VERSION.lmpack`).

    Everything is checked (target, profile, their pairing, the model path) before any work starts, and
    the variant directory appears only once complete.
    """
    started = time.perf_counter()
    pull_params = PullParams(allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    build_plan = plan(target=target, profile=profile, pull=pull_params)
    ctx = StepContext(
        target=build_plan.target,
        profile=build_plan.profile,
        progress=progress,
        options={"allow_quality_loss": allow_quality_loss, "strict": strict, "trust_remote_code": trust_remote_code},
    )
    source = resolve_source(model, revision=revision, params=pull_params)
    check_buildable(source)
    if memory_check:
        check_memory(source)
    result = run_plan(build_plan, ctx, source, _cache(cache_dir), on_event=on_event or ignore_events)
    report = build_report(build_plan, result, ctx, started=started)
    variant_name = name or f"{_slug(report['source'])}-{build_plan.target.name}-{build_plan.profile.name}"
    document = variant_document(
        name=variant_name,
        target=build_plan.target.to_dict(),
        profile=build_plan.profile.name,
        precision=build_plan.profile.precision,
        execution_providers=build_plan.target.execution_providers,
        task=report["task"],
        model_digest=result.final.digest,
    )
    variant_dir = Path(output_dir) / variant_name
    publish(
        variant_dir,
        lambda staging: write_variant(
            staging, model=result.final.path, document=document, report=report, report_text=render_report(report)
        ),
    )
    packed = None
    if bundle is not None:
        from lmpack.bundle.pack import WheelOptions
        from lmpack.bundle.pack import pack as pack_bundle

        packed = pack_bundle(
            [variant_dir],
            Path(output_dir) / f"{bundle.name}-{bundle.version}.lmpack",
            name=bundle.name,
            version=bundle.version,
            wheels=WheelOptions(source=bundle.wheel_source) if bundle.wheels else None,
            on_phase=on_phase,
        )
    return BuildResult(variant_dir=variant_dir, report=report, bundle=packed)


def _slug(source: dict[str, Any]) -> str:
    """The variant name's first part: the model's name (steps.pull.model_name), in lower case letters, digits and
    dots; an older pull record without a name falls back to its file or directory name."""
    name = source.get("name") or Path(str(source.get("ref", "model"))).name
    name = re.sub(r"\.gguf$", "", str(name), flags=re.IGNORECASE)
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-.") or "model"


def serve(path: Path, *, config_file: Path | None = None, **flags: Any) -> None:
    """Answer the OpenAI-compatible HTTP API until interrupted (see docs/serving.md).

    `path` is a variant directory, an unpacked bundle or an installed release; the variant that suits
    this host is chosen (lmpack doctor shows why). Settings: defaults, then `config_file` (serve.toml),
    then LMPACK_SERVE_* variables, then `flags` (keyword arguments named as in ServeSettings; None means
    not given). API keys come from the key file and LMPACK_API_KEYS; with neither, requests need no key.
    """
    from lmpack.config.serve import resolve_serve_settings
    from lmpack.runtime.auth import load_api_keys
    from lmpack.runtime.server import serve as run_server

    settings = resolve_serve_settings(config_file, flags)
    run_server(path, settings, api_keys=load_api_keys(settings.api_key_file, paths.api_keys_env()))


def doctor(
    path: Path,
    *,
    variant: str | None = None,
    strict: bool = False,
    engine_rebuild: bool = True,
    engine_cache_dir: Path | None = None,
) -> dict[str, Any]:
    """This host's facts and, for each variant under `path`, whether it can run here and which would be served
    (with serve's --variant / --strict / --no-engine-rebuild / engine cache, what each TensorRT engine would
    become)."""
    from lmpack.runtime.host import probe_host
    from lmpack.runtime.select import explain
    from lmpack.runtime.trt_plan import EnginePolicy

    host = probe_host()
    policy = EnginePolicy(rebuild=engine_rebuild, strict=strict)
    return {"host": host.to_dict(), **explain(path, host, policy, engine_cache_dir, variant).to_dict()}


def generate(
    variant_dir: Path,
    prompt: str,
    *,
    max_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    stop: tuple[str, ...] = (),
    repetition_penalty: float = 1.0,
    chat: bool = False,
    threads: int | None = None,
    variant: str | None = None,
    on_text: Callable[[str], None] | None = None,
) -> Completion:
    """One completion without a server (greedy by default); `on_text` receives the text as it is generated.

    `variant` names which of a bundle's or release's variants to use (default: the one serve would choose).
    With `chat`, the prompt is sent as one user message through the model's chat template.
    Returns a lmpack.runtime.generation.Completion (text, finish_reason, token counts, timings).
    """
    from lmpack.runtime.engine import DecoderEngine
    from lmpack.runtime.sampling import SamplingParams
    from lmpack.runtime.select import prepare_variant

    engine = DecoderEngine(prepare_variant(variant_dir, variant=variant), threads=threads)
    ids = engine.encode_chat([{"role": "user", "content": prompt}]) if chat else engine.encode_prompt(prompt)
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stop=tuple(stop),
        repetition_penalty=repetition_penalty,
    )
    return engine.generate(ids, params, prompt_param="messages" if chat else "prompt").result(on_text)


def run_agent(config_path: Path, *, strict: bool = False) -> int:
    """Run the agent for agent.toml until SIGTERM (docs/operations.md); returns the exit status (0).

    With `strict`, a notifier that cannot deliver (a syslog socket that is not there) stops the start (exit 3)
    instead of a warning."""
    from lmpack.agent.config import load_agent_config
    from lmpack.agent.daemon import run_agent as run

    return run(load_agent_config(config_path), strict=strict)


DEFAULT_AGENT_URL = "http://127.0.0.1:9100"


def agent_status(url: str = DEFAULT_AGENT_URL, *, timeout: float = 5.0) -> dict[str, Any]:
    """The running agent's /status document: the server's state, the latest measurements, the alerts."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/status", timeout=timeout) as response:
            return json.loads(response.read())
    except (OSError, ValueError) as exc:
        raise AgentError(
            f"cannot read the agent's status at {url}: {exc}",
            hint="is `lmpack agent --config agent.toml` running? pass its address with --agent",
        ) from None


def agent_serving(prefix: Path, *, url: str = DEFAULT_AGENT_URL, timeout: float = 1.0) -> dict[str, Any] | None:
    """{"name", "version"} of the release the agent at `url` serves from `prefix`; None when no agent answers
    there or it serves something else (a variant directory, another prefix)."""
    try:
        status = agent_status(url, timeout=timeout)
    except AgentError:
        return None
    release = (status.get("switch") or {}).get("release") or {}
    if release.get("prefix") != str(Path(prefix).resolve()):
        return None
    return {"name": release.get("name"), "version": release.get("serving")}


def agent_switch(
    name: str, version: str | None, *, url: str = DEFAULT_AGENT_URL, prefix: Path | None = None, timeout: float = 600.0
) -> dict[str, Any]:
    """Ask the running agent to switch NAME to VERSION (None: roll back to the previous healthy version).

    Returns the agent's result document once the new server serves all new requests. Raises AgentError
    (exit 18) when the agent cannot be reached, SwitchError (exit 19) when it refused or the switch failed.
    """
    import urllib.error
    import urllib.request

    path = "/switch" if version is not None else "/rollback"
    body = {
        "name": name,
        **({"version": version} if version is not None else {}),
        **({"prefix": str(Path(prefix).resolve())} if prefix is not None else {}),
    }
    request = urllib.request.Request(
        f"{url.rstrip('/')}{path}",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            error = json.loads(exc.read()).get("error", {})
        except ValueError:
            error = {}
        finally:
            exc.close()
        if exc.code == 409:
            raise SwitchError(error.get("message", "the switch failed"), hint=error.get("hint")) from None
        raise AgentError(f"the agent at {url} answered {exc.code}: {error.get('message', exc.reason)}") from None
    except (OSError, ValueError) as exc:
        raise AgentError(
            f"cannot reach the agent at {url}: {exc}",
            hint="is `lmpack agent --config agent.toml` running? pass its address with --agent",
        ) from None
