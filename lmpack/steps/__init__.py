"""Build steps, one module each; `lmpack.pipeline.step.registered_steps` imports them (heavy imports stay inside run)."""

STEP_MODULES = ("pull", "prune", "export", "quantize", "tensorrt", "validate")
