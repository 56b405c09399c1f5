"""Loading (public): a saved model directory -> a `CompiledModel` or a `DynamicModel`.

Goes in: a directory written by `CompiledModel.save` or `DynamicModel.save`. Comes out: the
model, ready to call. First every file is checked against the folder's `manifest.json`
(`hwaware.manifest`: nothing else is read, no native library loaded, before that passes); then
this module hands off to the static loader (`runtime`) or the dynamic one (`dynamic.model`), so
neither of those imports the other. Those loaders accept only what hwaware writes: programs
naming allowed ops (`program.py`), a host program in its declarative form
(`dynamic/host.py`), weights through `torch.load(weights_only=True)`; no pickle, and no Python
text from the folder is executed.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from hwaware import manifest, outputs
from hwaware.dynamic.model import DynamicModel
from hwaware.runtime import CompiledModel, load_compiled


def load(directory: str | os.PathLike[str], model: torch.nn.Module | None = None
         ) -> CompiledModel | DynamicModel:
    """Load a model saved by `CompiledModel.save` or `DynamicModel.save` (no user class or
    pickle needed). An output container type that cannot be imported here comes back as a dict
    with the same keys, with one `outputs.OutputTypeWarning` naming it. `model`: the module a
    dynamic model was compiled from, needed (and checked) where some of its regions run in
    eager PyTorch; load names those regions when it is missing.

    Raises `manifest.ManifestError` naming the file when the folder does not match the
    manifest its save wrote (a file changed, missing or added; no manifest: an older save,
    to compile and save again), and `program.DisallowedOpError` naming the op and the file
    when a program names an op hwaware does not write. A saved model holds native code:
    load only folders you trust as you would a program."""
    src = Path(directory)
    if manifest.verify(src).kind == "dynamic":
        return DynamicModel.load(src, model)
    missing: dict[str, str] = {}
    compiled = load_compiled(src, missing)
    outputs.warn_dict_fallback(missing)
    return compiled
