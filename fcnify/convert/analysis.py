"""Which nodes of a traced classifier are spatial maps, which form the classifier head, which are global context.

Every node gets a kind:
- SPATIAL: a map whose height and width follow the input's (the body; copied unchanged, except for adaptive
  pools that are the identity or a plain pool at the training size);
- FIXED: a value whose size no longer follows the input's, made by a size-fixing op (flatten, global pool,
  mean over H and W, an adaptive pool) or computed from such values. A FIXED node that flows back into a
  spatial map is *global context* (squeeze-excitation); the others form the *head*, which is rewritten;
- STATIC: parameters, constants, and shape queries.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch.fx

from fcnify.convert.ops import RESHAPE_NAMES, keepdim, op_name, reduction_dims
from fcnify.convert.trace import shape_of

__all__ = ["analyse", "Analysis", "input_nodes", "Kind", "NodeInfo"]


class Kind(enum.Enum):
    SPATIAL = "spatial"
    FIXED = "fixed"
    STATIC = "static"


@dataclass
class NodeInfo:
    """What the analysis found about one node."""

    kind: Kind
    name: str = ""
    spatial_dims: tuple[int, int] | None = None  # where H and W sit, for SPATIAL nodes
    body_rewrite: str | None = None  # 'identity' or 'pool' for adaptive pools in the body
    context: bool = False  # FIXED node that feeds back into the body (global context)


@dataclass
class Analysis:
    info: dict[torch.fx.Node, NodeInfo]

    def kind(self, node) -> Kind:
        if not isinstance(node, torch.fx.Node):
            return Kind.STATIC
        return self.info[node].kind

    def is_head(self, node) -> bool:
        return isinstance(node, torch.fx.Node) and self.info[node].kind is Kind.FIXED and not self.info[node].context

    @property
    def has_global_context(self) -> bool:
        return any(i.context for i in self.info.values())


def input_nodes(node: torch.fx.Node) -> list[torch.fx.Node]:
    return list(node.all_input_nodes)


def _is_tensor_valued(node: torch.fx.Node) -> bool:
    return "tensor_meta" in node.meta and not isinstance(node.meta["tensor_meta"], (int, float))


def _adaptive_body_rewrite(in_hw, out_hw) -> str:
    """How an adaptive pool stays spatial: 'identity', 'pool' (a whole-number downscale), or '' (size-fixing)."""
    if out_hw == in_hw:
        return "identity"
    if out_hw != (1, 1) and all(o > 0 and i % o == 0 for i, o in zip(in_hw, out_hw)):
        return "pool"
    return ""


def _spatial_op(node: torch.fx.Node, name: str, src: NodeInfo, in_shape, out_shape, modules) -> NodeInfo:
    """Classify an op that has a spatial input: does it keep the map spatial, or fix its size?"""
    fixed = NodeInfo(Kind.FIXED, name)
    if out_shape is None:
        if _is_tensor_valued(node):  # tuple of tensors (chunk, split): its items stay spatial
            return NodeInfo(Kind.SPATIAL, name, src.spatial_dims)
        return NodeInfo(Kind.STATIC, name)
    if in_shape is None:  # getitem of a tuple of spatial maps
        return NodeInfo(Kind.SPATIAL, name, (len(out_shape) - 2, len(out_shape) - 1))
    dims = src.spatial_dims or (len(in_shape) - 2, len(in_shape) - 1)
    in_hw = (in_shape[dims[0]], in_shape[dims[1]])
    if name in ("adaptive_avg_pool2d", "adaptive_max_pool2d"):
        rewrite = _adaptive_body_rewrite(in_hw, tuple(out_shape[-2:]))
        if rewrite:
            return NodeInfo(Kind.SPATIAL, name, dims, body_rewrite=rewrite)
        return fixed
    if name in ("avg_pool2d", "max_pool2d"):
        dynamic = any(isinstance(a, torch.fx.Node) for a in list(node.args[1:]) + list(node.kwargs.values()))
        if dynamic and tuple(out_shape[-2:]) == (1, 1):
            return fixed  # a pool whose kernel is read from the input's shape: a global pool
        return NodeInfo(Kind.SPATIAL, name, dims)
    reduced = reduction_dims(node, name, len(in_shape), modules)
    if reduced is not None:
        if set(reduced) & set(dims):
            return fixed
        if keepdim(node):
            return NodeInfo(Kind.SPATIAL, name, dims)
        shift = lambda d: d - sum(1 for r in reduced if r < d)  # noqa: E731
        return NodeInfo(Kind.SPATIAL, name, (shift(dims[0]), shift(dims[1])))
    if name in ("permute", "transpose"):
        order = _permutation(node, len(in_shape))
        if order is None:
            return fixed
        return NodeInfo(Kind.SPATIAL, name, (order.index(dims[0]), order.index(dims[1])))
    if name in RESHAPE_NAMES or name == "getitem":
        rank = len(out_shape)
        if tuple(in_shape) == tuple(out_shape):
            return NodeInfo(Kind.SPATIAL, name, dims)
        if rank >= 3 and dims == (len(in_shape) - 2, len(in_shape) - 1) and tuple(out_shape[-2:]) == in_hw:
            return NodeInfo(Kind.SPATIAL, name, (rank - 2, rank - 1))
        return fixed
    if len(out_shape) == len(in_shape):
        return NodeInfo(Kind.SPATIAL, name, dims)
    return fixed


def _permutation(node: torch.fx.Node, rank: int) -> list[int] | None:
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    args = list(node.args[1:])
    if "transpose" in str(name):
        if len(args) != 2 or not all(isinstance(a, int) for a in args):
            return None
        a, b = (d % rank for d in args)
        order = list(range(rank))
        order[a], order[b] = order[b], order[a]
        return order
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        args = list(args[0])
    if not args:
        args = list(node.kwargs.get("dims", ()))
    if len(args) != rank or not all(isinstance(a, int) for a in args):
        return None
    return [a % rank for a in args]


def analyse(gm: torch.fx.GraphModule) -> Analysis:
    """Classify every node of a shape-propagated GraphModule (see the module docstring)."""
    modules = dict(gm.named_modules())
    info: dict[torch.fx.Node, NodeInfo] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            info[node] = NodeInfo(Kind.SPATIAL, "input", (2, 3))
            continue
        if node.op in ("get_attr", "output"):
            info[node] = NodeInfo(Kind.STATIC, node.op)
            continue
        name = op_name(node, modules)
        inputs = input_nodes(node)
        spatial = [n for n in inputs if info[n].kind is Kind.SPATIAL]
        if spatial:
            src = spatial[0]
            info[node] = _spatial_op(node, name, info[src], shape_of(src), shape_of(node), modules)
        elif any(info[n].kind is Kind.FIXED for n in inputs):
            info[node] = NodeInfo(Kind.FIXED, name)
        else:
            info[node] = NodeInfo(Kind.STATIC, name)
    # A FIXED value that flows into a spatial map again is global context, not part of the head.
    for node in reversed(list(gm.graph.nodes)):
        node_info = info[node]
        if node_info.kind is not Kind.FIXED:
            continue
        node_info.context = any(
            info[user].kind is Kind.SPATIAL or (info[user].kind is Kind.FIXED and info[user].context)
            for user in node.users
        )
    return Analysis(info)
