"""Old import paths kept for users: `value_models.modeling`, `.vllm_model` and `.vllm_plugin`
moved into `vgs` (the core loads the value-model class, so it cannot live in the training
package: imports point `benchmarks` → `value_models` → `vgs`). Each old module is a thin alias
that warns once and *is* the new module, so classes and functions are the same objects."""

from __future__ import annotations

import importlib
import sys
import warnings


def alias(old: str, new: str) -> None:
    """Make module `old` the module `new`, with a DeprecationWarning naming the new path."""
    warnings.warn(f"{old} is deprecated and will be removed; import {new} instead",
                  DeprecationWarning, stacklevel=3)
    sys.modules[old] = importlib.import_module(new)
