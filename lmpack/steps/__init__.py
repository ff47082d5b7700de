"""Build steps, one module each, and the registry that finds them by name (heavy imports stay inside `run`)."""

from lmpack.pipeline.registry import StepRegistry

STEPS = StepRegistry(
    {
        "pull": "lmpack.steps.pull:PullStep",
        "prune": "lmpack.steps.prune:PruneStep",
        "export": "lmpack.steps.export:ExportStep",
        "quantize": "lmpack.steps.quantize:QuantizeStep",
        "tensorrt": "lmpack.steps.tensorrt:TensorrtStep",
        "validate": "lmpack.steps.validate:ValidateStep",
    }
)
