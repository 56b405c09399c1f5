"""Loading (public): a saved model directory -> a `CompiledModel` or a `DynamicModel`.

Goes in: a directory written by `CompiledModel.save` or `DynamicModel.save`. Comes out: the
model, ready to call; this module only hands off to the static loader (`runtime`) or the
dynamic one (`dynamic.model`), so neither of those imports the other.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from hwaware import outputs
from hwaware.dynamic.model import DynamicModel
from hwaware.runtime import CompiledModel, load_compiled


def load(directory: str | os.PathLike[str], model: torch.nn.Module | None = None
         ) -> CompiledModel | DynamicModel:
    """Load a model saved by `CompiledModel.save` or `DynamicModel.save` (no user class or
    pickle needed). An output container type that cannot be imported here comes back as a dict
    with the same keys, with one `outputs.OutputTypeWarning` naming it. `model`: the module a
    dynamic model was compiled from, needed (and checked) where some of its regions run in
    eager PyTorch; load names those regions when it is missing."""
    src = Path(directory)
    if (src / "dynamic.json").exists():
        return DynamicModel.load(src, model)
    missing: dict[str, str] = {}
    compiled = load_compiled(src, missing)
    outputs.warn_dict_fallback(missing)
    return compiled
