"""Networks with several outputs: how outputs are named, picked, and listed.

A classifier's ``forward`` may return one tensor, or a tuple, list, dict or namedtuple of them (``(bbox,
probabilities)``, ``{"logits": …, "embedding": …}``). Every tensor in that structure is an *output*, named by
its place: dict keys, namedtuple field names, ``"0"``, ``"1"``, … for tuples and lists (joined with ``.``
when nested), and ``"0"`` for a single tensor. One output is *selected*: the one heatmaps, labels and peaks
use (the first unless the user picks another with ``--output``).

``MultiOutputNet`` gives every converted network (in memory, a loaded ``.pt2``, an ``.onnx`` run by
onnxruntime) the same interface: ``output_names``, ``geometries``, ``channels``, ``selected``, ``geometry``
(the selected output's), ``maps(x)``, ``select(output)`` and ``outputs_summary()``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from fcnify.convert.geometry import Geometry
from fcnify.errors import InputError

SINGLE = "0"  # the name of a model's only output


def is_namedtuple_type(value) -> bool:
    return isinstance(value, type) and issubclass(value, tuple) and hasattr(value, "_fields")


def _runtime_children(value) -> list[tuple[str, object]] | None:
    if isinstance(value, Mapping):
        return [(str(k), v) for k, v in value.items()]
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return list(zip(value._fields, value))
    if isinstance(value, (tuple, list)):
        return [(str(i), v) for i, v in enumerate(value)]
    return None


def named_leaves(value, children: Callable[[object], list[tuple[str, object]] | None] = _runtime_children,
                 prefix: str = "") -> list[tuple[str, object]]:
    """The leaves of an output structure with their names, in order (a bare leaf is named ``"0"``).

    Args:
        value: what ``forward`` returned (or its graph counterpart).
        children: the (name, item) pairs of a container, None for a leaf (default: tensors and Python
            containers; the conversion passes one that also opens FX nodes building namedtuples).
    """
    items = children(value)
    if items is None:
        return [(prefix or SINGLE, value)]
    leaves = []
    for key, item in items:
        leaves.extend(named_leaves(item, children, f"{prefix}.{key}" if prefix else key))
    return leaves


def flatten_outputs(value) -> dict[str, torch.Tensor]:
    """Every output of a network's result by name, in order."""
    return dict(named_leaves(value))


@dataclass(frozen=True)
class OutputInfo:
    """One output of a converted network: its name, its channels (classes) and where its cells look."""

    name: str
    channels: int
    geometry: Geometry

    def to_dict(self) -> dict:
        return {"name": self.name, "channels": self.channels, "geometry": self.geometry.to_dict()}


def describe_outputs(infos: list[OutputInfo]) -> str:
    """``0 (2 channels), 1 (4 channels)``."""
    return ", ".join(f"{o.name} ({o.channels} channel{'s' if o.channels != 1 else ''})" for o in infos)


def resolve_output(names: tuple[str, ...], channels: Mapping[str, int], output: int | str | None) -> str:
    """The name of the output ``output`` picks: an index or a name; None picks the first.

    Raises:
        InputError: an index or name the network does not have; the message lists the outputs.
    """
    if output is None:
        return names[0]
    text = str(output).strip()
    if text in names:
        return text
    if text.lstrip("-").isdigit() and 0 <= int(text) < len(names):
        return names[int(text)]
    listed = ", ".join(f"{n} ({channels.get(n, '?')} channels)" for n in names)
    raise InputError(f"the model has no output {text!r}: it has outputs {listed}",
                     hint=f"pick one with --output {'|'.join(names)}")


class MultiOutputNet:
    """The output interface every converted network shares (a mixin for ``nn.Module`` classes).

    Subclasses set ``output_names``, ``geometries``, ``channels`` and ``selected`` (``_set_outputs``).
    """

    output_names: tuple[str, ...]
    geometries: dict[str, Geometry]
    channels: dict[str, int]
    selected: str

    def _set_outputs(self, infos: list[OutputInfo], selected: str | None = None) -> None:
        object.__setattr__(self, "output_names", tuple(o.name for o in infos))
        object.__setattr__(self, "geometries", {o.name: o.geometry for o in infos})
        object.__setattr__(self, "channels", {o.name: int(o.channels) for o in infos})
        object.__setattr__(self, "selected", resolve_output(self.output_names, self.channels, selected))

    @property
    def geometry(self) -> Geometry:
        """The selected output's geometry."""
        return self.geometries[self.selected]

    @property
    def multi_output(self) -> bool:
        return len(self.output_names) > 1

    def outputs_summary(self) -> list[OutputInfo]:
        """Name, channels and geometry of every output, in order."""
        return [OutputInfo(n, self.channels[n], self.geometries[n]) for n in self.output_names]

    def outputs_note(self) -> str:
        """One line for multi-output networks: ``outputs: 0 (4 ch), 1 (2 ch); using 0 — pick another with
        --output`` (empty for a single output)."""
        if not self.multi_output:
            return ""
        listed = ", ".join(f"{n} ({self.channels[n]} ch)" for n in self.output_names)
        return f"outputs: {listed}; using {self.selected} — pick another with --output {'|'.join(self.output_names)}"

    def maps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every output's N×K×h×w map by name, in order."""
        return flatten_outputs(self(x))

    def selected_map(self, x: torch.Tensor) -> torch.Tensor:
        """The selected output's N×K×h×w map."""
        return self.maps(x)[self.selected]

    def select(self, output: int | str | None):
        """This network (same weights, shared) with another selected output; None keeps the current one.

        Raises:
            InputError: an index or name the network does not have.
        """
        if output is None:
            return self
        name = resolve_output(self.output_names, self.channels, output)
        clone = copy.copy(self)  # shallow: the same modules and parameters
        object.__setattr__(clone, "selected", name)
        return clone


__all__ = ["MultiOutputNet", "OutputInfo", "describe_outputs", "flatten_outputs", "is_namedtuple_type",
           "named_leaves", "resolve_output"]
