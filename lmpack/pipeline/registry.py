"""Step classes by name, found from data: a map of step name to "module:Class", imported when a plan names it.

The map lives with the steps (lmpack/steps/__init__.py), the plan is given it, and nothing is imported
before a step is asked for, so `lmpack --help` and the runtime never load an exporter. The same shape as
Olive's package_config (pass name -> module path) and as a Python entry point, so a step kept in another
package is one more line of data, not a change here.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping

from lmpack.errors import ConfigError
from lmpack.pipeline.step import Step


class StepRegistry:
    def __init__(self, locations: Mapping[str, str]):
        self._locations = dict(locations)

    def names(self) -> list[str]:
        return sorted(self._locations)

    def get(self, name: str, *, where: str = "the plan") -> type[Step]:
        """The step class registered as `name`; an unknown name is a ConfigError naming `where` it came from."""
        if name not in self._locations:
            raise ConfigError(f"{where}: unknown step {name!r}; known steps: {', '.join(self.names())}")
        module_name, _, class_name = self._locations[name].partition(":")
        cls = getattr(importlib.import_module(module_name), class_name, None)
        if not (isinstance(cls, type) and issubclass(cls, Step) and cls.name == name):
            raise TypeError(f"{self._locations[name]} is not the Step subclass named {name!r}")
        return cls
