"""fcnify: rewrite trained image classifiers into fully-convolutional networks for dense class score maps.

    import fcnify
    loaded = fcnify.load_model("torchvision:resnet18", weights="none")
    fcn = fcnify.convert(loaded.module, input_size=(224, 224))
    report = fcnify.verify(loaded.module, fcn)
"""

from __future__ import annotations

__version__ = "0.1.0"

from fcnify.convert import FullyConvolutionalNet, Geometry, convert
from fcnify.errors import (
    ConversionError,
    ExportError,
    FcnifyError,
    InputError,
    ModelLoadError,
    NotEquivalentError,
    OutputError,
    UnsafeModelError,
)
from fcnify.models import LoadedModel, load_model
from fcnify.verify import EquivalenceReport, verify

__all__ = [
    "ConversionError", "EquivalenceReport", "ExportError", "FcnifyError", "FullyConvolutionalNet", "Geometry",
    "InputError", "LoadedModel", "ModelLoadError", "NotEquivalentError", "OutputError", "UnsafeModelError",
    "__version__", "convert", "export_onnx", "load_model", "render_heatmap", "save_pt2", "score_map", "verify",
]


def __getattr__(name: str):
    # Heavier capabilities load on first use so `import fcnify` stays quick.
    if name == "save_pt2":
        from fcnify.export import save_pt2

        return save_pt2
    if name == "export_onnx":
        from fcnify.onnx_export import export_onnx

        return export_onnx
    if name == "score_map":
        from fcnify.dense import score_map

        return score_map
    if name == "render_heatmap":
        from fcnify.heatmap.render import overlay

        return overlay
    raise AttributeError(f"module 'fcnify' has no attribute {name!r}")
