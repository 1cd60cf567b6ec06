"""Old names kept working for one version, each with a DeprecationWarning.

A package lists its removed or renamed names and serves them from its module
``__getattr__``:

    __getattr__ = moved_names(__name__, {"OLD": ("fisherfast.x.y", "NEW", "use fisherfast.x.y.NEW")})

Looking up ``OLD`` imports ``fisherfast.x.y`` (only then: no import cost up
front), warns "<package>.OLD is deprecated and goes in the next version; <hint>"
and returns its attribute ``NEW`` (the module itself when ``NEW`` is None: a
submodule that moved). Every entry has a line in README's
"Changes in this version" table.
"""
from __future__ import annotations

import importlib
import warnings

__all__ = ["moved_names"]


def moved_names(package: str, table: dict[str, tuple[str, str | None, str]]):
    """A module ``__getattr__`` serving ``table``'s old names (old → (module, attribute or None, hint))."""

    def __getattr__(name: str):
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, attribute, hint = table[name]
        warnings.warn(f"{package}.{name} is deprecated and goes in the next version; {hint}", DeprecationWarning,
                      stacklevel=2)
        target = importlib.import_module(module)
        return target if attribute is None else getattr(target, attribute)

    return __getattr__
