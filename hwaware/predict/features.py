"""Features of kernels and whole models for the latency predictor (TVM-free, numpy only).

Goes in: `hwaware.decompose.KernelRecord`s (a kernel as hwaware builds it: family, ops, shapes,
attributes, FLOPs, bytes) and a `Device` (the target's hardware facts and the thread count).
Comes out: fixed-length float vectors, one per kernel (`kernel_features`) and one per model
(`model_features`), whose meaning is fixed by `FEATURE_SCHEMA_VERSION` and the name lists
below. A predictor saved with another schema version is refused (`LatencyPredictor.load`).

The kernel vector: the family (one-hot), op counts by category, log2 sizes (FLOPs, bytes,
weights, input and output elements, the contraction's reduction length), convolution strides
and groups, a roofline time on the device, and the device itself. The model vector: kernel and
host-op counts per family, log2 totals, and the sum of the kernel predictions (the
whole-model term learns what that sum leaves out: host ops, calls, thread wake-ups).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

# 2: the kernel regressor predicts log(time / baseline_us); 3: host op records ("host"); 4: the
# one-call feature is "no host op" (the chained plan takes fused kernels too); 5: how the
# kernel's channels, last dim and reduction fill the device's vectors, its conv window and
# output pixels
FEATURE_SCHEMA_VERSION = 5

# Families the features name; any other family is "other" (and its kernels `unknown`). "host":
# one op the host program runs in PyTorch (`hwaware.decompose.host_record`).
FAMILIES = ("conv1d", "conv2d", "conv3d", "matmul", "sdpa", "reduction", "elementwise",
            "conv_block", "res_block", "convnext_block", "attention", "gnn", "rgcn", "host")
# Op categories, matched as substrings of the ATen op name in this order (first match wins).
OP_CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("conv", ("conv",)),
    ("matmul", ("linear", "addmm", ".mm.", "bmm", "matmul", "einsum", "baddbmm")),
    ("attention", ("scaled_dot_product",)),
    ("softmax", ("softmax",)),
    ("norm", ("layer_norm", "batch_norm", "group_norm", "rsqrt", ".var", "rms_norm")),
    ("pool", ("pool",)),
    ("reduce", (".mean", ".sum", "amax", "amin", ".max.", ".min.", "cumsum", "argmax")),
    ("gather", ("index", "gather", "scatter", "embedding", "take")),
    ("activation", ("relu", "hardtanh", "gelu", "sigmoid", "silu", "hardswish", "tanh", "erf",
                    "exp", "log", "pow", "sqrt", "clamp")),
    ("arith", ("add", "sub", "mul", "div", "neg", "where", "masked_fill")),
    ("copy", ("cat", "stack", "pad", "clone", "copy", "contiguous", "to_copy", "repeat")),
    ("create", ("arange", "zeros", "ones", "full", "empty", "rand", "lift_fresh")),
    ("view", ("view", "reshape", "permute", "transpose", "flatten", "squeeze", "select",
              "slice", "expand", "t.default", "alias", "split", "chunk", "getitem")),
)
CATEGORY_NAMES = tuple(name for name, _ in OP_CATEGORIES) + ("other_op",)
SHAPE_SLOTS = 4  # the first input's and output's last dims (N, C, H, W; or B, S, D)


@dataclass(frozen=True)
class Device:
    """What the predictor knows of the hardware a latency is for."""

    key: str  # the target's database key, with the thread count when it is not all cores
    threads: int
    vector_bits: int
    peak_gflops: float  # of all `threads`
    bandwidth_gbs: float
    l2_kib: int
    l3_kib: int

    @staticmethod
    def of(target: Any, threads: int | None = None) -> Device:
        """The device of a `hwaware.Target` run with `threads` threads (default: all cores)."""
        n = threads or target.cores
        key = target.key if n == target.cores else f"{target.key}-{n}t"
        return Device(key, n, target.vector_bits, target.peak_fp32_gflops * n / target.cores,
                      target.mem_bandwidth_gbs, target.l2_kib, target.l3_kib)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


KERNEL_FEATURE_NAMES = (
    *(f"family_{f}" for f in FAMILIES), "family_other",
    *(f"ops_{c}" for c in CATEGORY_NAMES), "ops_total",
    "log_flops", "log_bytes", "log_weight_bytes", "log_in_elems", "log_out_elems",
    "log_reduction", "log_out_last_dim", "intensity", "inputs", "outputs",
    "conv_stride", "log_conv_groups", "depthwise_convs", "log_roofline_us",
    *(f"log_in_dim{i}" for i in range(SHAPE_SLOTS)),
    *(f"log_out_dim{i}" for i in range(SHAPE_SLOTS)),
    "out_channel_lanes", "in_channel_lanes", "out_last_dim_lanes", "reduction_lanes",
    "conv_window", "log_out_pixels",
    "threads", "vector_bits", "log_peak_gflops", "log_bandwidth", "log_l2", "log_l3",
)
MODEL_FEATURE_NAMES = (
    "kernels", "host_steps", *(f"kernels_{f}" for f in FAMILIES), "kernels_other",
    "log_flops", "log_bytes", "log_weight_bytes", "log_kernel_sum_us", "log_host_us",
    "log_largest_kernel_us", "host_share", "without_host_ops",
    "threads", "log_peak_gflops",
)


def _log2(x: float) -> float:
    return math.log2(1.0 + max(0.0, x))


def op_category(op: str) -> str:
    """The category an ATen op name counts under ("other_op" when none matches)."""
    for name, needles in OP_CATEGORIES:
        if any(n in op for n in needles):
            return name
    return "other_op"


def is_known_family(family: str) -> bool:
    return family in FAMILIES


def _numel(shape: Sequence[int]) -> int:
    return math.prod(max(d, 1) for d in shape) if shape else 1


def _convs(attributes: str) -> list[tuple[int, int]]:
    """(largest stride, groups) of each convolution of a kernel's attributes."""
    convs = []
    for op, args, _ in json.loads(attributes):
        if "conv" not in op or not isinstance(args, list):
            continue
        s = args[3] if len(args) > 3 and isinstance(args[3], list) else [1]
        g = args[-1] if isinstance(args[-1], int) else 1
        convs.append((max([1, *(int(v) for v in s if isinstance(v, int))]), g))
    return convs


def _conv_attributes(convs: list[tuple[int, int]]) -> tuple[float, float, float]:
    """Largest stride, log2 of the largest groups and how many depthwise-style (grouped)
    convolutions, of a kernel's `_convs`."""
    stride = max((s for s, _ in convs), default=1)
    return float(stride), _log2(_largest_groups(convs)), float(sum(g > 1 for _, g in convs))


def _largest_groups(convs: list[tuple[int, int]]) -> int:
    """The largest groups of a kernel's convolutions (1 where none)."""
    return max((g for _, g in convs), default=1)


def roofline_us(flops: int, bytes_moved: int, device: Device) -> float:
    """The time a kernel would take at the device's peak compute or memory bandwidth."""
    return max(flops / (device.peak_gflops * 1e3), bytes_moved / (device.bandwidth_gbs * 1e3))


BASELINE_FLOOR_US = 1.0  # a kernel call's least cost: keeps tiny kernels' ratios sane


def baseline_us(flops: int, bytes_moved: int, device: Device) -> float:
    """What the kernel regressor's answer is relative to: the kernel's FLOPs at the device's
    peak plus its bytes at its memory bandwidth plus a call's floor. The regressor predicts
    the log ratio of the measured time to this (an efficiency), not the time itself:
    regression trees answer within the range of their training labels, so a regressor of
    times could not price a kernel larger than any it was trained on (it priced ResNet-50
    sized layers at the largest small-model kernel's time, 4-7x too fast); a ratio to a
    physical baseline carries over to larger kernels."""
    return (flops / (device.peak_gflops * 1e3) + bytes_moved / (device.bandwidth_gbs * 1e3)
            + BASELINE_FLOOR_US)


def log_baseline_us(record: Any, device: Device) -> float:
    """log of a kernel's `baseline_us` on the device (free: its FLOPs and bytes only)."""
    return math.log(baseline_us(record.flops, record.bytes_moved, device))


def kernel_features(record: Any, device: Device) -> list[float]:
    """The feature vector of one kernel on one device (names: `KERNEL_FEATURE_NAMES`)."""
    family = [float(record.family == f) for f in FAMILIES]
    family.append(float(not is_known_family(record.family)))
    counts = dict.fromkeys(CATEGORY_NAMES, 0.0)
    for op in record.ops:
        counts[op_category(op)] += 1
    in_elems = sum(_numel(s) for s in record.input_shapes)
    out_elems = sum(_numel(s) for s in record.output_shapes)
    largest_out = max((_numel(s) for s in record.output_shapes), default=1)
    last_dim = record.output_shapes[0][-1] if record.output_shapes and \
        record.output_shapes[0] else 1
    convs = _convs(record.attributes)
    return [
        *family, *counts.values(), float(len(record.ops)),
        _log2(record.flops), _log2(record.bytes_moved), _log2(record.weight_bytes),
        _log2(in_elems), _log2(out_elems), _log2(record.flops / (2 * largest_out)),
        _log2(last_dim), record.arithmetic_intensity,
        float(len(record.input_shapes)), float(len(record.output_shapes)),
        *_conv_attributes(convs),
        _log2(roofline_us(record.flops, record.bytes_moved, device)),
        *_dims(record.input_shapes), *_dims(record.output_shapes),
        *_vector_fit(record, device, largest_out, convs), *_device_features(device),
    ]


def _lanes_filled(n: float, lanes: int) -> float:
    """log2 of the largest power-of-two share of a vector that `n` elements fill evenly (of
    `lanes`): 16 channels fill a 16-lane vector (4), 24 fill 8 lanes at a time (3), 7 one (0).
    Untuned schedules vectorize and tile by the vector: a misfit dim leaves lanes idle."""
    return math.log2(math.gcd(max(int(round(n)), 1), lanes))


def _vector_fit(record: Any, device: Device, largest_out: int,
                convs: list[tuple[int, int]]) -> list[float]:
    """How the kernel's output and input channels (dim 1 of a 4-D shape, else the last dim),
    its output's last dim and its reduction length fill the device's FP32 vectors
    (`_lanes_filled`), its conv window (the reduction over input channels per group: 3 for a
    3x3 conv; 0 when not a conv) and log2 of its output pixels (rows of other shapes)."""
    lanes = max(device.vector_bits // 32, 1)
    first_in = list(record.input_shapes[0]) if record.input_shapes else [1]
    first_out = list(record.output_shapes[0]) if record.output_shapes else [1]
    in_channels, out_channels = (shape[1] if len(shape) == 4 else shape[-1]
                                 for shape in (first_in, first_out))
    reduction = record.flops / (2 * largest_out)
    window = 0.0
    if "conv" in record.family and len(first_in) == 4:
        groups = _largest_groups(convs)
        window = math.sqrt(max(reduction * groups / max(in_channels, 1), 0.0))
    pixels = math.prod(first_out[-2:]) if len(first_out) == 4 else (
        first_out[-2] if len(first_out) >= 2 else 1)
    return [_lanes_filled(out_channels, lanes), _lanes_filled(in_channels, lanes),
            _lanes_filled(first_out[-1], lanes), _lanes_filled(reduction, lanes), window,
            _log2(pixels)]


def _dims(shapes: Sequence[Sequence[int]]) -> list[float]:
    """log2 of the first shape's last `SHAPE_SLOTS` dims, right-aligned (0 where absent)."""
    dims = list(shapes[0])[-SHAPE_SLOTS:] if shapes else []
    return [0.0] * (SHAPE_SLOTS - len(dims)) + [_log2(d) for d in dims]


def _device_features(device: Device) -> list[float]:
    return [float(device.threads), float(device.vector_bits), _log2(device.peak_gflops),
            _log2(device.bandwidth_gbs), _log2(device.l2_kib), _log2(device.l3_kib)]


def kernel_matrix(records: Sequence[Any], device: Device) -> np.ndarray:
    """Features of many kernels as one float32 matrix (one row per kernel)."""
    if not records:
        return np.zeros((0, len(KERNEL_FEATURE_NAMES)), dtype=np.float32)
    return np.asarray([kernel_features(r, device) for r in records], dtype=np.float32)


# Additive totals of a model's kernels: a model's (or a chain of blocks') totals are the sums
# of its parts' (the largest kernel's time: their maximum). `model_rows` turns them into features.
MODEL_TOTAL_NAMES = (
    "kernels", "host_steps", *(f"kernels_{f}" for f in FAMILIES), "kernels_other",
    "flops", "bytes", "weight_bytes", "kernel_sum_us", "host_us", "largest_kernel_us",
)
LARGEST_KERNEL = MODEL_TOTAL_NAMES.index("largest_kernel_us")
_LOGGED = slice(MODEL_TOTAL_NAMES.index("flops"), len(MODEL_TOTAL_NAMES))


def model_totals(records: Sequence[Any], host_steps: int, kernel_us: Sequence[float]
                 ) -> np.ndarray:
    """The additive totals (`MODEL_TOTAL_NAMES`) of kernels with their (predicted or measured)
    times and `host_steps` host op calls."""
    per_family = [float(sum(r.family == f for r in records)) for f in FAMILIES]
    other = float(sum(not is_known_family(r.family) for r in records))
    return np.asarray([
        float(len(records)), float(host_steps), *per_family, other,
        float(sum(r.flops for r in records)), float(sum(r.bytes_moved for r in records)),
        float(sum(r.weight_bytes for r in records)), float(sum(kernel_us)),
        float(sum(us for r, us in zip(records, kernel_us, strict=True) if r.family == "host")),
        float(max(kernel_us, default=0.0)),
    ], dtype=np.float64)


def model_rows(totals: np.ndarray, device: Device) -> np.ndarray:
    """Model feature rows (`MODEL_FEATURE_NAMES`, float32) of a matrix of totals, one row
    per model."""
    totals = np.atleast_2d(np.asarray(totals, dtype=np.float64))
    logged = np.log2(1.0 + np.maximum(totals[:, _LOGGED], 0.0))
    column = MODEL_TOTAL_NAMES.index
    host_share = totals[:, column("host_us")] / np.maximum(totals[:, column("kernel_sum_us")],
                                                          1e-9)
    # a model of kernels only may be built as one TVM call (`hwaware.build.ONE_CALL`, the
    # chained plan), which runs faster than its kernels' sum
    one_call = totals[:, column("host_steps")] == 0
    device_columns = np.broadcast_to([float(device.threads), _log2(device.peak_gflops)],
                                     (len(totals), 2))
    return np.concatenate([totals[:, :_LOGGED.start], logged, host_share[:, None],
                           one_call[:, None].astype(np.float64), device_columns],
                          axis=1).astype(np.float32)


def model_features(records: Sequence[Any], host_steps: int, kernel_us: Sequence[float],
                   device: Device) -> list[float]:
    """The feature vector of a whole model from its kernels, its host ops and its kernels'
    (predicted or measured) times (names: `MODEL_FEATURE_NAMES`)."""
    return [float(v) for v in model_rows(model_totals(records, host_steps, kernel_us),
                                         device)[0]]
