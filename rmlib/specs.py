"""Registries of small frozen specs: the things a contributor adds one of.

Transform objectives (`rmlib.engine.transforms.OBJECTIVES`), data sets
(`rmlib.methods.setups.DATASETS`), backfill order policies
(`rmlib.evaluation.orders.ORDER_POLICIES`) and serving backends
(`rmlib.serving.parts.BACKENDS`) are each a `Registry` in the module that owns the idea:
a name maps to a spec (a frozen dataclass with a `name`), callers read the spec instead
of comparing names, and an unknown name is one line that lists the known ones.

Explained in the book: book/beyond.
"""

from __future__ import annotations

from typing import Any

from rmlib import RmlibError


class Registry(dict):
    """Name -> spec. `kind` names what it holds in messages; `hint` ends the message for
    an unknown name (what else may be given)."""

    def __init__(self, kind: str, hint: str = ""):
        super().__init__()
        self.kind, self.hint = kind, hint

    def register(self, spec: Any) -> Any:
        """Add `spec` under `spec.name` (a name is registered once); returns it."""
        if spec.name in self:
            raise RmlibError(f"the {self.kind} {spec.name!r} is already registered")
        self[spec.name] = spec
        return spec

    def spec(self, name: str) -> Any:
        """The spec registered as `name`, or one line that lists the known names."""
        if name not in self:
            raise RmlibError(f"unknown {self.kind} {name!r}; use one of "
                             f"{', '.join(self)}{self.hint}")
        return self[name]

    def copy(self) -> Registry:
        """A registry of the same entries (a test adds to it without touching this one)."""
        other = Registry(self.kind, self.hint)
        other.update(self)
        return other
