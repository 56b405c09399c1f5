"""Fold inference-mode BatchNorm into the convolution before it (weights and bias rescaled)."""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx

_CONV = torch.ops.aten.conv2d.default
_BATCH_NORMS = {
    torch.ops.aten.batch_norm.default,
    torch.ops.aten._native_batch_norm_legit_no_training.default,
}


def fold_batchnorm(gm: fx.GraphModule) -> int:
    """Rewrite conv2d -> batch_norm (constants, eval mode) into one conv2d. Returns the count."""
    folded = 0
    for bn in list(gm.graph.nodes):
        if bn.op != "call_function" or bn.target not in _BATCH_NORMS:
            continue
        conv = bn.args[0]
        if not _foldable(gm, conv, bn):
            continue
        weight, bias = _folded_weights(gm, conv, bn)
        _replace_conv_params(gm, conv, weight, bias, tag=f"_bnfold_{folded}")
        _bypass_batchnorm(gm, bn, conv)
        folded += 1
    gm.graph.eliminate_dead_code()
    return folded


def _const(gm: fx.GraphModule, node: object) -> torch.Tensor | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        value = _getattr_path(gm, str(node.target))
        return value if isinstance(value, torch.Tensor) else None
    return None


def _getattr_path(gm: fx.GraphModule, target: str) -> object:
    obj: object = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _bn_params(gm: fx.GraphModule, bn: fx.Node) -> tuple[list[torch.Tensor | None], float, bool]:
    if bn.target is torch.ops.aten.batch_norm.default:
        args: list[Any] = list(bn.args) + [None] * 9
        training, eps = bool(args[5]), float(args[7])
    else:
        args = list(bn.args)
        training, eps = False, float(args[6])
    return [_const(gm, a) for a in args[1:5]], eps, training


def _foldable(gm: fx.GraphModule, conv: object, bn: fx.Node) -> bool:
    if not (isinstance(conv, fx.Node) and conv.op == "call_function" and conv.target is _CONV):
        return False
    if len(conv.users) != 1 or _const(gm, conv.args[1]) is None:
        return False
    if len(conv.args) > 2 and conv.args[2] is not None and _const(gm, conv.args[2]) is None:
        return False
    (gamma, beta, mean, var), _eps, training = _bn_params(gm, bn)
    return not training and mean is not None and var is not None


def _folded_weights(
    gm: fx.GraphModule, conv: fx.Node, bn: fx.Node
) -> tuple[torch.Tensor, torch.Tensor]:
    (gamma, beta, mean, var), eps, _ = _bn_params(gm, bn)
    assert mean is not None and var is not None  # checked by _foldable
    weight = _const(gm, conv.args[1])
    assert weight is not None
    bias = _const(gm, conv.args[2]) if len(conv.args) > 2 and conv.args[2] is not None else None
    scale = torch.rsqrt(var + eps) * (gamma if gamma is not None else 1.0)
    new_weight = weight * scale.reshape(-1, 1, 1, 1)
    old_bias = bias if bias is not None else torch.zeros_like(mean)
    new_bias = (old_bias - mean) * scale + (beta if beta is not None else 0.0)
    return new_weight.detach().contiguous(), new_bias.detach().contiguous()


def _replace_conv_params(gm: fx.GraphModule, conv: fx.Node, weight: torch.Tensor,
                         bias: torch.Tensor, tag: str) -> None:
    gm.register_buffer(f"{tag}_weight", weight)
    gm.register_buffer(f"{tag}_bias", bias)
    with gm.graph.inserting_before(conv):
        w = gm.graph.get_attr(f"{tag}_weight")
        b = gm.graph.get_attr(f"{tag}_bias")
    w.meta["val"] = weight
    b.meta["val"] = bias
    args = list(conv.args) + [None] * (7 - len(conv.args))
    defaults = [None, None, None, [1, 1], [0, 0], [1, 1], 1]
    args = [a if a is not None or i < 3 else defaults[i] for i, a in enumerate(args)]
    args[1], args[2] = w, b
    conv.args = tuple(args)


def _bypass_batchnorm(gm: fx.GraphModule, bn: fx.Node, conv: fx.Node) -> None:
    if bn.target is torch.ops.aten.batch_norm.default:
        bn.replace_all_uses_with(conv)
        return
    for user in list(bn.users):  # _native_batch_norm_legit_no_training returns a tuple
        if user.target is operator.getitem and user.args[1] == 0:
            user.replace_all_uses_with(conv)
