"""Where a target and a profile meet: a build plan, or a refusal that says why.

The plan is every step the build runs, in order: pull, the reference export when steps before export
change the model (prune), then the profile's steps. The runner (runner.py) only walks it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmpack.config.profiles import Profile
from lmpack.config.targets import Target
from lmpack.errors import PlanError
from lmpack.pipeline.params import params_from_dict
from lmpack.pipeline.registry import StepRegistry
from lmpack.pipeline.step import HF_MODEL, ONNX_MODEL, REFERENCE, SOURCE, Step

PULL = "pull"


@dataclass(frozen=True)
class PlannedStep:
    """One step of a plan; `label` names it in events, the report and StepContext.artifacts."""

    step: Step
    label: str
    reads: str | None = None  # the label of the artifact it reads; None: what the step before it produced
    aside: bool = False  # its output is kept for later steps (the reference), not handed to the next step


@dataclass(frozen=True)
class BuildPlan:
    target: Target
    profile: Profile
    steps: list[PlannedStep]

    def describe(self) -> list[dict[str, Any]]:
        return [{"step": s.label, "params": vars(s.step.params)} for s in self.steps]

    def step(self, label: str) -> Step:
        return next(s.step for s in self.steps if s.label == label)


def make_plan(target: Target, profile: Profile, registry: StepRegistry, *, pull_params: Any = None) -> BuildPlan:
    """Validate every step's parameters and check the pair; raise PlanError naming the reason.

    `pull_params` are the pull step's (PullParams: what the source may contain); default: its defaults.
    """
    if profile.precision not in target.precisions:
        raise PlanError(
            f"profile {profile.name!r} builds {profile.precision} but target {target.name!r} does not support it "
            f"(supported: {', '.join(target.precisions)})",
            hint=f"lmpack targets show {target.name}; its default profile is {target.default_profile!r}",
        )
    pull_class = registry.get(PULL)
    planned = [PlannedStep(pull_class(pull_params if pull_params is not None else pull_class.Params()), PULL)]
    profile_steps: list[Step] = []
    for spec in profile.steps:
        cls = registry.get(spec.name, where=spec.where)
        step = cls(params_from_dict(cls.Params, spec.params, where=spec.where))
        step.check(target, profile)
        profile_steps.append(step)
    _check_chain(profile, [planned[0].step, *profile_steps])
    if profile_steps[0].name != "export":
        # Steps before export change the model: the pulled model is exported as it is too, so quality and size
        # are judged against the model the user gave, not against the already changed one.
        export = next(step for step in profile_steps if step.name == "export")
        planned.append(PlannedStep(export, REFERENCE, reads=PULL, aside=True))
    planned += [PlannedStep(step, step.name) for step in profile_steps]
    return BuildPlan(target=target, profile=profile, steps=planned)


def _check_chain(profile: Profile, steps: list[Step]) -> None:
    """Each step must consume what the one before produced, from a model source to an ONNX model."""
    kind = SOURCE
    names = [s.name for s in steps]
    if names.count("export") != 1:
        raise PlanError(f"{profile.source}: a profile needs exactly one 'export' step, found {names.count('export')}")
    for step in steps:
        if step.consumes != kind:
            raise PlanError(
                f"{profile.source}: step {step.name!r} needs a {step.consumes} but comes after a step "
                f"that produces a {kind}; put it {'before' if step.consumes == HF_MODEL else 'after'} 'export'"
            )
        kind = step.produces
    if kind != ONNX_MODEL:
        raise PlanError(f"{profile.source}: the last step must leave an ONNX model")
