"""Proof that a converted network computes what the original does.

1. At the training size: both networks on the same inputs. The strict gate runs both in float64 on the CPU,
   where a correct rewrite differs only by the rounding of re-ordered sums; float32 figures (and the device's,
   with TF32 off) are reported beside it.
2. Above the training size: the dense map against the original classifier on the crop of each sampled cell.
   Padding-free networks without global context match exactly; others approximately, and the cause is named.
   The content is the user's images when given, else a synthetic scene with the structure of a picture (smooth
   shading, hard edges, texture): on iid noise a padded network's border cells can agree where on a photo they
   do not. The report names the content.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from fcnify.convert import FullyConvolutionalNet, parse_input_size
from fcnify.convert.outputs import flatten_outputs
from fcnify.errors import NotEquivalentError
from fcnify.onnx_export import verify_onnx

__all__ = [
    "DENSE_EXACT_RTOL", "FP32_RTOL", "FP64_RTOL", "Agreement", "check_dense", "check_training_size",
    "compare_outputs", "DenseAgreement", "EquivalenceReport", "verify", "verify_converted"
]

_logger = logging.getLogger(__name__)

FP64_RTOL = 1e-7  # float64 rounding of re-ordered sums stays many orders below this
FP32_RTOL = 1e-4
DENSE_EXACT_RTOL = 1e-4
#: What the dense check runs on when no image is given (``DenseAgreement.content``).
SYNTHETIC_CONTENT = "synthetic scene (smooth gradients, hard-edged shapes, texture)"
# Normalisation of the synthetic scene when the model's is not known: 0–1 pixels to about ±2, as ImageNet's does.
_NEUTRAL_MEAN, _NEUTRAL_STD = 0.5, 0.25


@dataclass
class Agreement:
    """How two sets of logits agree. ``max_rel_error`` is relative to the largest original logit."""

    dtype: str
    device: str
    max_abs_error: float
    max_rel_error: float
    top1_agreement: float
    tolerance: float
    samples: int
    output: str = ""  # the output compared, for a model with several ("" for one)

    @property
    def passed(self) -> bool:
        return self.max_rel_error <= self.tolerance


@dataclass
class DenseAgreement:
    """Dense cells against the original classifier on their crops."""

    input_size: tuple[int, int]
    map_size: tuple[int, int]
    cells_checked: int
    max_abs_error: float
    max_rel_error: float
    top1_agreement: float
    exact: bool
    causes: list[str]
    tolerance: float
    output: str = ""  # the output compared, for a model with several ("" for one)
    content: str = ""  # what the dense map and the crops were computed on (an image's name, or synthetic)

    @property
    def label(self) -> str:
        return "exact" if self.exact else "approximate"

    @property
    def passed(self) -> bool:
        return not self.exact or self.max_rel_error <= self.tolerance


@dataclass
class EquivalenceReport:
    """Everything ``verify`` measured."""

    strict: Agreement
    others: list[Agreement] = field(default_factory=list)
    dense: DenseAgreement | None = None
    geometry: dict = field(default_factory=dict)
    runtime: list = field(default_factory=list)  # onnxruntime vs PyTorch agreements, for an .onnx
    outputs: list[Agreement] = field(default_factory=list)  # the float64 gate per output (several outputs)

    @property
    def passed(self) -> bool:
        return (self.strict.passed and (self.dense is None or self.dense.passed)
                and all(a.passed for a in self.runtime) and all(a.passed for a in self.outputs))

    def to_dict(self) -> dict:
        data = {
            "passed": self.passed, "strict": asdict(self.strict) | {"passed": self.strict.passed},
            "others": [asdict(a) | {"passed": a.passed} for a in self.others], "geometry": self.geometry,
        }
        if self.dense is not None:
            data["dense"] = asdict(self.dense) | {"label": self.dense.label, "passed": self.dense.passed}
        if self.outputs:
            data["outputs"] = [asdict(a) | {"passed": a.passed} for a in self.outputs]
        if self.runtime:
            data["onnx_vs_pytorch"] = [a.to_dict() for a in self.runtime]
        return data


def _evaluating(module: nn.Module) -> nn.Module:
    """Eval mode, for modules that have one (a loaded torch.export program refuses ``eval()``)."""
    try:
        return module.eval()
    except NotImplementedError:
        return module


def _logits(module: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every output of ``module`` on ``x`` by name, each N×K (a converted network's 1×1 maps flattened)."""
    return {name: out.flatten(1) if out.dim() == 4 else out for name, out in flatten_outputs(module(x)).items()}


def _compare_one(reference: torch.Tensor, candidate: torch.Tensor, dtype: str, device: str, tol: float,
                 output: str = "") -> Agreement:
    reference, candidate = reference.double().cpu(), candidate.double().cpu()
    if reference.shape != candidate.shape:
        return Agreement(dtype, device, float("inf"), float("inf"), 0.0, tol, reference.shape[0], output)
    diff = (reference - candidate).abs()
    scale = reference.abs().max().clamp_min(1e-12)
    top1 = (reference.argmax(1) == candidate.argmax(1)).double().mean().item() if reference.dim() > 1 else 1.0
    return Agreement(dtype, device, diff.max().item(), (diff.max() / scale).item(), top1, tol, reference.shape[0],
                     output)


def compare_outputs(reference: dict[str, torch.Tensor], candidate: dict[str, torch.Tensor], dtype: str, device: str,
                    tol: float) -> list[Agreement]:
    """One agreement per output of the reference; a missing or differently named output is a failure."""
    if list(reference) != list(candidate):
        raise NotEquivalentError(
            f"the converted network returns outputs {', '.join(candidate)}, the original {', '.join(reference)}",
            hint="convert the same model the file came from")
    named = len(reference) > 1
    return [_compare_one(reference[n], candidate[n], dtype, device, tol, n if named else "") for n in reference]


def _compare(reference: dict[str, torch.Tensor], candidate: dict[str, torch.Tensor], dtype: str, device: str,
             tol: float) -> Agreement:
    """The worst agreement over every output (relative to each output's own largest value)."""
    return max(compare_outputs(reference, candidate, dtype, device, tol), key=lambda a: a.max_rel_error)


def _inputs(count: int, in_chans: int, size: tuple[int, int], images: list[torch.Tensor] | None, seed: int):
    generator = torch.Generator().manual_seed(seed)
    batch = torch.randn(count, in_chans, *size, generator=generator)
    if images:
        batch = torch.cat([batch] + [img.unsqueeze(0) if img.dim() == 3 else img for img in images])
    return batch


@torch.no_grad()
def check_training_size(model: nn.Module, fcn: nn.Module, input_size: tuple[int, int], in_chans: int,
                        samples: int = 4, images: list[torch.Tensor] | None = None, device: str | None = None,
                        seed: int = 0) -> tuple[Agreement, list[Agreement], list[Agreement]]:
    """The strict float64 gate and the float32 (and device) figures at the training size.

    A reference that runs outside PyTorch (onnxruntime on an original ``.onnx``) computes in float32 whatever it
    is given: there the float32 figures are the gate.

    Returns:
        The float64 gate and the float32 figures (each the worst over the outputs), and, for a model with
        several outputs, the float64 and float32 agreement of each output.
    """
    x = _inputs(samples, in_chans, input_size, images, seed)
    if getattr(model, "runs_outside_torch", False):
        fcn32 = _evaluating(copy.deepcopy(fcn).float())
        per_output = compare_outputs(_logits(model, x), _logits(fcn32, x), "float32", "cpu (onnxruntime)", FP32_RTOL)
        return max(per_output, key=lambda a: a.max_rel_error), [], (per_output if len(per_output) > 1 else [])
    ref64 = _evaluating(copy.deepcopy(model).double())
    fcn64 = _evaluating(copy.deepcopy(fcn).double())
    per_output = compare_outputs(_logits(ref64, x.double()), _logits(fcn64, x.double()), "float64", "cpu",
                                 FP64_RTOL)
    del ref64, fcn64
    # Copies: the caller's model keeps its dtype and mode (verify never changes what it is given).
    ref32, fcn32 = _evaluating(copy.deepcopy(model).float()), _evaluating(copy.deepcopy(fcn).float())
    per_output32 = compare_outputs(_logits(ref32, x), _logits(fcn32, x), "float32", "cpu", FP32_RTOL)
    del ref32, fcn32
    strict = max(per_output, key=lambda a: a.max_rel_error)
    others = [max(per_output32, key=lambda a: a.max_rel_error)]
    if device and device != "cpu":
        # cuDNN may use TF32 for convolutions by default while the Linear would not: switch it off to compare.
        tf32 = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            on_device = x.to(device)
            ref = _evaluating(copy.deepcopy(model).float().to(device))
            conv = _evaluating(copy.deepcopy(fcn).float().to(device))
            others.append(_compare(_logits(ref, on_device), _logits(conv, on_device), "float32", device, FP32_RTOL))
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    return strict, others, (per_output + per_output32 if len(per_output) > 1 else [])


def _sample_cells(h: int, w: int, count: int, generator: torch.Generator) -> list[tuple[int, int]]:
    corners = [(0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1), (h // 2, w // 2)]
    cells = list(dict.fromkeys(corners))
    while len(cells) < min(count, h * w):
        cell = (int(torch.randint(h, (1,), generator=generator)), int(torch.randint(w, (1,), generator=generator)))
        if cell not in cells:
            cells.append(cell)
    return cells[:count]


def dense_input_size(geometry, grow: int = 3) -> tuple[int, int]:
    """The dense check's input: ``grow`` strides (+ a remainder, so that sizes off the stride grid are covered)
    larger than the window."""
    return (geometry.window[0] + grow * geometry.stride[0] + geometry.stride[0] // 2,
            geometry.window[1] + (grow + 1) * geometry.stride[1] + 1)


def synthetic_scene(in_chans: int, size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """Picture-like test content: C×H×W float64 pixel values in 0–1, deterministic for a seed.

    Pictures are spatially correlated: smooth shading, objects with hard edges, textured surfaces. iid noise has
    none of that, so how a network's dense cells agree with its crops on noise says little about pictures.
    """
    generator = torch.Generator().manual_seed(seed)
    height, width = size

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator, dtype=torch.float64)

    yy, xx = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                            indexing="ij")
    # Shading: a vertical and a horizontal colour gradient.
    image = (uniform(in_chans, 1, 1) * (1 - yy / height) + uniform(in_chans, 1, 1) * yy / height) * 0.7 \
        + uniform(in_chans, 1, 1) * (xx / width) * 0.3
    for index in range(8):  # objects: discs and rectangles, some textured with stripes
        cy, cx = uniform(1).item() * height, uniform(1).item() * width
        radius = (0.08 + 0.25 * uniform(1).item()) * min(height, width)
        if index % 2:
            inside = (yy - cy) ** 2 + (xx - cx) ** 2 < radius ** 2
        else:
            inside = ((yy - cy).abs() < radius) & ((xx - cx).abs() < radius * (0.5 + uniform(1).item()))
        fill = uniform(in_chans, 1, 1).expand(in_chans, height, width)
        if index % 3 == 0:
            angle, period = uniform(1).item() * torch.pi, 3 + 9 * uniform(1).item()
            stripes = torch.sin(2 * torch.pi * (yy * torch.sin(torch.tensor(angle)) + xx * torch.cos(
                torch.tensor(angle))) / period)
            fill = fill + 0.15 * stripes
        image = torch.where(inside, fill, image)
    image = image + 0.02 * torch.randn(image.shape, generator=generator, dtype=torch.float64)  # sensor noise
    return image.clamp(0, 1)


def _normalised_synthetic_scene(in_chans: int, size: tuple[int, int], mean, std, seed: int) -> torch.Tensor:
    mean_t, std_t = _per_channel(mean, in_chans, _NEUTRAL_MEAN), _per_channel(std, in_chans, _NEUTRAL_STD)
    return (synthetic_scene(in_chans, size, seed) - mean_t[:, None, None]) / std_t[:, None, None]


def _per_channel(values, in_chans: int, neutral: float) -> torch.Tensor:
    """One value per input channel: the model's (one value repeated), or a neutral one where the model's does not
    fit its channels (a hidden-layer input that ``--in-chans`` names, say)."""
    values = tuple(values) if values is not None else ()
    if len(values) == 1:
        values = values * in_chans
    if len(values) != in_chans:
        values = (neutral,) * in_chans
    return torch.as_tensor(values, dtype=torch.float64)


@torch.no_grad()
def check_dense(model: nn.Module, fcn: FullyConvolutionalNet, cells: int = 8, grow: int = 3,
                seed: int = 0, images: list[torch.Tensor] | None = None, content: str | None = None,
                mean=None, std=None) -> DenseAgreement:
    """Dense cells against the original on their crops, on content larger than the window.

    Args:
        model: the original classifier.
        fcn: its conversion.
        cells: cells to check per image (corners, centre, then random ones).
        grow: without ``images``, the synthetic scene is ``grow`` strides (+ a remainder) larger than the window.
        seed: for the synthetic scene and the cells chosen.
        images: normalised C×H×W images, each at least the window, prepared as a heatmap prepares them (e.g. the
            user's pictures); without them, a synthetic picture-like scene (``synthetic_scene``).
        content: what ``images`` are, for the report (e.g. "image photo.jpg").
        mean, std: the model's normalisation, applied to the synthetic scene (default: a neutral one).
    """
    g, selected = fcn.geometry, getattr(fcn, "selected", "0")
    if not images:
        images = [_normalised_synthetic_scene(fcn.in_chans, dense_input_size(g, grow), mean, std, seed)]
        content = SYNTHETIC_CONTENT
    generator = torch.Generator().manual_seed(seed)
    ref, dense_net = copy.deepcopy(model).double().eval(), copy.deepcopy(fcn).double().eval()
    references, candidates = [], []
    for image in images:
        image = image.double().unsqueeze(0)
        size = tuple(image.shape[-2:])
        dense = flatten_outputs(dense_net(image))[selected][0]
        h, w = dense.shape[-2:]
        crops, kept = [], []
        for i, j in _sample_cells(h, w, cells, generator):
            y, x = g.window_origin(i, j)
            if y < 0 or x < 0 or y + g.window[0] > size[0] or x + g.window[1] > size[1]:
                continue  # a padded network's border cell whose window leaves the image has no crop
            crops.append(image[0, :, y:y + g.window[0], x:x + g.window[1]])
            kept.append((i, j))
        if kept:
            references.append(_logits(ref, torch.stack(crops))[selected])
            candidates.append(torch.stack([dense[:, i, j] for i, j in kept]))
    reference, candidate = torch.cat(references), torch.cat(candidates)
    agreement = _compare_one(reference, candidate, "float64", "cpu", DENSE_EXACT_RTOL)
    _logger.info("dense check on %s: %d cells, top-1 agreement %.0f%%", content, len(reference),
                 100 * agreement.top1_agreement)
    causes = []
    if g.padded:
        causes.append("zero padding: near a crop's border the crop sees zeros where the dense pass sees image")
    if g.global_context:
        causes.append("global context in the body (e.g. squeeze-excitation): dense cells pool the whole image")
    if g.size_dependent_padding:
        causes.append("'same' padding computed from the input size")
    causes.extend(g.notes)
    causes.extend(g.partial_windows)
    return DenseAgreement(size, (h, w), len(reference), agreement.max_abs_error, agreement.max_rel_error,
                          agreement.top1_agreement, g.exact, causes, DENSE_EXACT_RTOL,
                          selected if len(getattr(fcn, "output_names", ())) > 1 else "", content or "images")


def verify(model: nn.Module, fcn: FullyConvolutionalNet, input_size=None, samples: int = 4,
           images: list[torch.Tensor] | None = None, device: str | None = None, dense_cells: int = 8,
           seed: int = 0, dense_images: list[torch.Tensor] | None = None, dense_content: str | None = None,
           mean=None, std=None) -> EquivalenceReport:
    """Measure how ``fcn`` agrees with ``model``: at the training size, and dense against crops.

    Args:
        model: the original classifier.
        fcn: its conversion.
        input_size: the training size (default: the one ``fcn`` was converted at).
        samples: random inputs at the training size.
        images: extra normalised image tensors at the training size.
        device: also report figures on this device (e.g. "cuda").
        dense_cells: cells to check against crops (0 skips the dense check).
        dense_images, dense_content: what the dense check runs on, and its name for the report (see
            ``check_dense``; default: a synthetic picture-like scene).
        mean, std: the model's normalisation, for the synthetic scene.
    """

    size = parse_input_size(input_size) if input_size is not None else fcn.input_size
    strict, others, outputs = check_training_size(model, fcn, size, fcn.in_chans, samples, images, device, seed)
    dense = check_dense(model, fcn, dense_cells, seed=seed, images=dense_images, content=dense_content, mean=mean,
                        std=std) if dense_cells else None
    outputs = [a for a in outputs if a.dtype == strict.dtype]  # the gate's figures (float32 for onnxruntime)
    return EquivalenceReport(strict, others, dense, fcn.geometry.to_dict(), outputs=outputs)


def verify_converted(original: nn.Module, converted: nn.Module, input_size, in_chans: int, geometry,
                     samples: int = 4, onnx_path=None, seed: int = 0,
                     convertible: nn.Module | None = None) -> EquivalenceReport:
    """Check an already converted network (a loaded ``.pt2`` or ``.onnx``) against the original classifier.

    Args:
        original: the classifier it was converted from.
        converted: the loaded network (N×C×H×W → N×K×h×w).
        input_size, in_chans, geometry: from the file's metadata.
        onnx_path: for an ``.onnx``, also compare onnxruntime with a fresh PyTorch conversion at several sizes.
        convertible: the PyTorch classifier that conversion starts from, when ``original`` runs outside PyTorch
            (an ONNX original: its import).
    """
    strict, others, outputs = check_training_size(original, converted, tuple(input_size), in_chans, samples,
                                                  seed=seed)
    runtime = []
    if onnx_path is not None:

        # onnxruntime computes in float32 whatever it is given: the float32 figures are the gate.
        strict, others = (others[0] if others else strict), []
        strict.device = "cpu (onnxruntime)"
        outputs = [a for a in outputs if a.dtype == "float32"]
        for agreement in outputs:
            agreement.device = "cpu (onnxruntime)"
        runtime = verify_onnx(onnx_path, convertible if convertible is not None else original)
    elif not getattr(original, "runs_outside_torch", False):
        outputs = [a for a in outputs if a.dtype == "float64"]
    return EquivalenceReport(strict, others, None, geometry.to_dict(), runtime, outputs)
