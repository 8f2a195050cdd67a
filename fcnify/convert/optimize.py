"""Exact speed-ups on a converted graph.

A windowed average pool and a 1×1 convolution are both linear and commute exactly (the pool has no
padding, so the bias averages to itself). Running the convolution first is cheaper when it has fewer
output than input channels: the pool then sums over fewer maps.
"""

from __future__ import annotations

import logging

import torch.fx
from torch import nn

__all__ = ["commute_pool_and_classifier"]

_logger = logging.getLogger(__name__)


def _is_pointwise_conv(module: nn.Module) -> bool:
    return (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.stride == (1, 1)
            and module.padding == (0, 0) and module.groups == 1 and module.padding_mode == "zeros")


def commute_pool_and_classifier(gm: torch.fx.GraphModule) -> int:
    """Swap ``AvgPool2d(stride 1) → Conv2d 1×1`` into ``Conv2d 1×1 → AvgPool2d`` where that shrinks channels.

    Returns:
        The number of swaps made.
    """
    modules = dict(gm.named_modules())
    swaps = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not _is_pointwise_conv(modules[node.target]):
            continue
        pool_node = node.args[0]
        if not (isinstance(pool_node, torch.fx.Node) and pool_node.op == "call_module"
                and isinstance(modules[pool_node.target], nn.AvgPool2d) and len(pool_node.users) == 1):
            continue
        pool, conv = modules[pool_node.target], modules[node.target]
        if pool.padding not in (0, (0, 0)) or conv.out_channels >= conv.in_channels:
            continue
        # conv(pool(x)) == pool(conv(x)): rewire x → conv → pool.
        with gm.graph.inserting_after(node):
            new_pool = gm.graph.call_module(pool_node.target, (node,))
        node.replace_all_uses_with(new_pool)
        new_pool.args = (node,)
        node.args = (pool_node.args[0],) + tuple(node.args[1:])
        gm.graph.erase_node(pool_node)
        swaps += 1
        _logger.info("running %s before its average pool (%d → %d channels)", node.target, conv.in_channels,
                     conv.out_channels)
    if swaps:
        gm.graph.lint()
        gm.recompile()
    return swaps
