"""fcnify: rewrite trained image classifiers into fully-convolutional networks for dense class score maps.

    import fcnify
    loaded = fcnify.load_model("torchvision:resnet18", weights="none")
    fcn = fcnify.convert(loaded.module, input_size=(224, 224))
    report = fcnify.verify(loaded.module, fcn)
"""

from __future__ import annotations

from fcnify._version import __version__
from fcnify.convert import FullyConvolutionalNet, Geometry, convert
from fcnify.dense import score_map
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
from fcnify.export import save_pt2
from fcnify.heatmap.render import overlay as render_heatmap
from fcnify.loaded import LoadedModel
from fcnify.models import load_model
from fcnify.onnx_export import export_onnx
from fcnify.verify import EquivalenceReport, verify

__all__ = [
    "ConversionError", "EquivalenceReport", "ExportError", "FcnifyError", "FullyConvolutionalNet", "Geometry",
    "InputError", "LoadedModel", "ModelLoadError", "NotEquivalentError", "OutputError", "UnsafeModelError",
    "__version__", "convert", "export_onnx", "load_model", "render_heatmap", "save_pt2", "score_map", "verify",
]
