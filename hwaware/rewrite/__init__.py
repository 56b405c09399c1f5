"""Stage 2, rewrite: graph-to-graph passes on the captured ATen graph, listed in the order they run.

Goes in: a `Captured` graph. Comes out: the same graph, rewritten in place so that the partitioner
sees fewer, larger kernels. Dynamic-to-static passes (issue 3) are added to `PASSES` here.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

from torch import fx

from hwaware.capture import Captured
from hwaware.rewrite.canonical_ops import canonical_ops
from hwaware.rewrite.common_subexpressions import merge_common_subexpressions
from hwaware.rewrite.constants import fold_constants
from hwaware.rewrite.conversions import simplify_conversions
from hwaware.rewrite.explicit_dtypes import explicit_dtypes, explicit_promotions
from hwaware.rewrite.explicit_padding import explicit_padding
from hwaware.rewrite.fold_batchnorm import fold_batchnorm
from hwaware.rewrite.fold_padding import fold_padding
from hwaware.rewrite.functionalize import functionalize
from hwaware.rewrite.metadata_asserts import drop_metadata_asserts
from hwaware.rewrite.negative_indices import indices_from_start

log = logging.getLogger(__name__)

PASSES: list[tuple[str, Callable[[fx.GraphModule], int]]] = [
    # In-place ops become out-of-place, so no host op can write into a buffer TVM returned.
    ("functionalize", functionalize),
    # Conversions on one device (Hugging Face's masks moved "to the input's device") are dropped
    # where they change nothing and become plain casts where they change the dtype, so they no
    # longer split graphs between PyTorch and TVM.
    ("simplify_conversions", simplify_conversions),
    # Metadata assertions torch.export leaves next to tensors (dtype, device) that the traced
    # graph satisfies are removed: the input specs fix every tensor's metadata, and each one
    # was a host op that kept the model from running as one TVM call.
    ("drop_metadata_asserts", drop_metadata_asserts),
    # padding="same"/"valid" convolutions get explicit padding, which the conv kernels cover.
    ("explicit_padding", explicit_padding),
    # A zero pad written before a convolution (F.pad, TF-style "same") becomes the
    # convolution's padding where it is symmetric; an asymmetric rest stays a smaller pad,
    # which the conv families take as (top, left, bottom, right) padding.
    ("fold_padding", fold_padding),
    # BatchNorm after a convolution becomes the convolution's weight and bias (the TVM importer
    # would otherwise make batch_norm+relu its own kernel).
    ("fold_batchnorm", fold_batchnorm),
    # Ops TVM's importer lacks become the equivalent ops it has: ATen's aliases (`multiply`)
    # the ops they alias, `where` with a scalar branch a `where` of 0-d constants.
    ("canonical_ops", canonical_ops),
    # Ops that promote their input's dtype (a bool mask's cumsum is int64) say so, as TVM's
    # importer keeps the input's dtype otherwise.
    ("explicit_dtypes", explicit_dtypes),
    # An integer or bool input of an element-wise op with a floating result (`positions / mid`)
    # is cast to that result's dtype first, as PyTorch's type promotion computes it.
    ("explicit_promotions", explicit_promotions),
    # Anything computed from weights alone (a linear layer's weight transpose, ...) is computed
    # once now, so no kernel recomputes it per call.
    ("fold_constants", fold_constants),
    # Negative `select` indices and negative entries of constant `index` tensors count from the
    # start: TVM's gather reads them out of bounds (Falcon's `qkv[..., [-2]]`).
    ("indices_from_start", indices_from_start),
    # A subexpression computed again (PyG's GCN normalises the same edges in every layer,
    # much of it data-dependent and so on the host) is computed once.
    ("merge_common_subexpressions", merge_common_subexpressions),
]


class RewriteSkippedWarning(UserWarning):
    """A rewrite pass failed on a model; the model is compiled without that pass."""


def rewrite(captured: Captured) -> dict[str, int]:
    """Run every pass in order; returns how many places each pass changed. A pass that raises
    on a model nobody tested it on is undone (the graph as it was before it) with one warning
    naming it: the model compiles without that rewrite, never fails to compile because of it."""
    gm = captured.graph_module
    changed = {}
    for name, rewrite_pass in PASSES:
        before = _copy(gm.graph)
        try:
            changed[name] = rewrite_pass(gm)
        except Exception as err:  # a bug in a pass, on a graph it did not expect
            gm.graph, changed[name] = before, 0
            log.debug("rewrite pass %s failed", name, exc_info=True)
            first_line = next(iter(str(err).splitlines()), "")[:200]
            warnings.warn(f"hwaware: rewrite pass {name} failed on this model "
                          f"({type(err).__name__}: {first_line}); it compiles without that "
                          "rewrite", RewriteSkippedWarning, stacklevel=4)
    gm.graph.lint()
    gm.recompile()
    return changed


def _copy(graph: fx.Graph) -> fx.Graph:
    """A copy of `graph`'s nodes (with their meta); the module's weights are shared, not copied."""
    copy = fx.Graph(owning_module=graph.owning_module)
    output = copy.graph_copy(graph, {})
    copy.output(output)
    return copy
