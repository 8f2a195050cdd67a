"""Graph capture: torch.fx symbolic tracing with the fallbacks real classifiers need, plus shape propagation.

Plain ``torch.fx.symbolic_trace`` fails on modules that branch on tensor shapes (timm's ``Conv2dSame``
and "same"-padding helpers, timm VGG's ``ConvMlp``). Such modules are kept as opaque leaves: timm
registers the ones it knows, and any other submodule whose tracing fails becomes a leaf too, after
which the whole model is traced again. The conversion only needs to see through the head, so opaque
leaves in the body are harmless.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from fcnify.errors import ConversionError, describe

__all__ = ["capture", "propagate_shapes", "shape_of"]

_logger = logging.getLogger(__name__)

_MAX_FALLBACK_LEAVES = 64


def _timm_notrace() -> tuple[set[type], set[Callable]]:
    """timm's registry of modules and functions that FX must not trace through (empty without timm)."""
    try:  # lazy: timm is optional
        import timm.models._features_fx  # noqa: F401  (importing registers timm's leaf modules)
        from timm.layers import _fx
    except Exception:  # timm missing or its private layout changed: fall back to failure-driven leaves
        return set(), set()
    return set(_fx.get_notrace_modules()), set(_fx.get_notrace_functions())


class _FallbackTracer(torch.fx.Tracer):
    """A tracer that treats given modules as leaves and remembers the innermost module that failed."""

    def __init__(self, leaf_names: set[str], leaf_types: set[type], autowrap: set[Callable]):
        super().__init__(autowrap_functions=tuple(autowrap))
        self.leaf_names = leaf_names
        self.leaf_types = tuple(leaf_types)
        self.failed_module: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_names:
            return True
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            # The first handler that sees the exception belongs to the innermost failing module.
            if self.failed_module is None:
                self.failed_module = self.path_of_module(m)
            raise


def _uses_timm(model: nn.Module) -> bool:
    return any(type(m).__module__.startswith("timm.") for m in model.modules())


def capture(model: nn.Module) -> torch.fx.GraphModule:
    """Trace ``model`` (in eval mode) into a GraphModule, making untraceable submodules opaque leaves.

    Raises:
        ConversionError: when the model's own top-level forward cannot be traced.
    """
    if getattr(model, "captured", False):  # an imported graph (ONNX): already plain ops, its node names kept
        return model
    leaf_types, autowrap = _timm_notrace() if _uses_timm(model) else (set(), set())
    leaf_names: set[str] = set()
    for _ in range(_MAX_FALLBACK_LEAVES):
        tracer = _FallbackTracer(leaf_names, leaf_types, autowrap)
        try:
            graph = tracer.trace(model)
        except Exception as exc:
            failed = tracer.failed_module
            if not failed or failed in leaf_names:
                raise ConversionError(
                    f"cannot capture the graph of {type(model).__name__}: {describe(exc)}",
                    hint="the model's own forward() branches on tensor values or shapes; move that logic into a "
                    "submodule, or export a torchvision/timm architecture by name",
                ) from exc
            _logger.info("submodule %r is not traceable (%s); keeping it as an opaque leaf", failed, exc)
            leaf_names.add(failed)
            continue
        name = type(model).__name__
        return torch.fx.GraphModule(tracer.root, graph, name)
    raise ConversionError(
        f"cannot capture the graph of {type(model).__name__}: too many untraceable submodules",
        hint="the model is not FX-traceable; export a torchvision/timm architecture by name",
    )


def propagate_shapes(gm: torch.fx.GraphModule, example: torch.Tensor) -> None:
    """Record ``tensor_meta`` (shape, dtype) on every node by running ``gm`` on ``example``."""
    # ShapeProp prints a traceback itself before re-raising; the caller turns the error into one line.
    with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
        ShapeProp(gm).propagate(example)


def shape_of(node: torch.fx.Node) -> tuple[int, ...] | None:
    """The propagated shape of a node whose value is one tensor, else None."""
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None
