"""Where a target and a profile meet: a build plan, or a refusal that says why."""

from __future__ import annotations

from dataclasses import dataclass

from lmpack.config.profiles import Profile
from lmpack.config.targets import Target
from lmpack.errors import PlanError
from lmpack.pipeline.params import params_from_dict
from lmpack.pipeline.step import HF_MODEL, ONNX_MODEL, Step, step_class


@dataclass(frozen=True)
class BuildPlan:
    target: Target
    profile: Profile
    steps: list[Step]

    def describe(self) -> list[dict]:
        return [{"step": s.name, "params": vars(s.params)} for s in self.steps]


def make_plan(target: Target, profile: Profile) -> BuildPlan:
    """Validate every step's parameters and check the pair; raise PlanError naming the reason."""
    if profile.precision not in target.precisions:
        raise PlanError(
            f"profile {profile.name!r} builds {profile.precision} but target {target.name!r} does not support it "
            f"(supported: {', '.join(target.precisions)})",
            hint=f"lmpack targets show {target.name}; its default profile is {target.default_profile!r}",
        )
    steps: list[Step] = []
    for spec in profile.steps:
        cls = step_class(spec.name, where=spec.where)
        step = cls(params_from_dict(cls.Params, spec.params, where=spec.where))
        step.check(target, profile)
        steps.append(step)
    _check_chain(profile, steps)
    return BuildPlan(target=target, profile=profile, steps=steps)


def _check_chain(profile: Profile, steps: list[Step]) -> None:
    """Each step must consume what the one before produced, starting from a pulled HF model."""
    kind = HF_MODEL
    names = [s.name for s in steps]
    if names.count("export") != 1:
        raise PlanError(f"{profile.source}: a profile needs exactly one 'export' step, found {names.count('export')}")
    for step in steps:
        if step.consumes != kind:
            raise PlanError(f"{profile.source}: step {step.name!r} needs a {step.consumes} but comes after a step "
                            f"that produces a {kind}; put it {'before' if step.consumes == HF_MODEL else 'after'} 'export'")
        kind = step.produces
    if kind != ONNX_MODEL:
        raise PlanError(f"{profile.source}: the last step must leave an ONNX model")
