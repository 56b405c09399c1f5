"""Latency prediction: how fast a model will run once hwaware compiles it, before compiling it.

The third way to use hwaware (after `torch.compile` and tuning sessions), for architecture
search loops. Modules in pipeline order:
- `spaces`: the architecture families profiled and checked on (and the held-out zoo models);
- `profile`: compile and measure architectures -> samples in `cost_models/data/*.jsonl` and
  the tuning database (`hwaware profile`);
- `features`: kernels and models -> feature vectors (TVM-free);
- `cache`: decompositions' kernel records kept on disk (the NAS table's blocks, pretraining);
- `pretrain`: free statistics of thousands of unmeasured architectures' kernels (the
  `pretrained` kernel prior's pretraining set);
- `predictor`: `LatencyPredictor` (XGBoost per kernel, plus a learned whole-model term):
  train, save/load under `cost_models/<device key>/`, predict, adapt to a new device;
- `metrics`: the accuracy figures (±10%, MAPE, Spearman, ...);
- `commands`: `hwaware predictor train|eval|adapt`.

`device_dir` is where each device's models live (`cost_models/<device key>/`).
"""

from pathlib import Path

COST_MODELS_DIR = Path(__file__).resolve().parent.parent.parent / "cost_models"
DATA_DIR = COST_MODELS_DIR / "data"
# What the kernel regressor learns times relative to (`predictor.py`): a physical baseline,
# nothing, or a regressor pretrained on free statistics (`pretrain.py`)
PRIORS = ("physical", "none", "pretrained")


def device_dir(key: str, root: Path | None = None) -> Path:
    """The folder of a device's (or target's) learned models: `cost_models/<key>/`, or `<key>/`
    under `root`. The latency predictor lives there; MetaSchedule's search cost model in its
    `metaschedule/` folder (`hwaware.tvm.cost_model`)."""
    return (root or COST_MODELS_DIR) / key
