"""Model specs: resolving what the user names into a module and its metadata, loading files safely.

Specs: ``digits`` (the embedded model), ``torchvision:NAME``, ``timm:NAME``, a state_dict file
(``.pth``/``.pt``/``.bin``/``.safetensors``) with ``arch``, a pickled module or TorchScript file (only when
trusted), and an fcnify ``.pt2`` (already converted). Pickles are read with ``weights_only=True`` passed
explicitly, and never retried unsafely unless the user trusts the file.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fcnify.errors import InputError, ModelLoadError, UnsafeModelError

_logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STATE_DICT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")


@dataclass
class LoadedModel:
    """A classifier and what fcnify needs to know about it.

    Attributes:
        module: the classifier (eval mode), or the converted network when ``converted`` is set.
        input_size: training size (height, width), or None when unknown.
        in_chans: input channels.
        mean, std: per-channel normalisation of 0–1 pixel values.
        labels: class names (``"0"``, ``"1"``, … when unknown).
        source: the spec it came from.
        converted: the network is already fully convolutional (a ``.pt2``), with ``geometry`` set.
    """

    module: nn.Module
    input_size: tuple[int, int] | None
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    labels: tuple[str, ...]
    source: str
    converted: bool = False
    geometry: object | None = None
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        base = self.source.split(":", 1)[-1]
        return Path(base).name.split(".")[0] if base else "model"


def _channels(module: nn.Module) -> int:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return 3


def _default_labels(module: nn.Module, count: int | None = None) -> tuple[str, ...]:
    if count is None:
        linears = [m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        count = linears[-1].out_features if linears and isinstance(linears[-1], nn.Linear) else (
            linears[-1].out_channels if linears else 0)
    return tuple(str(i) for i in range(count))


# ------------------------------------------------------------------------------------------- torchvision


def _torchvision(name: str, weights: str) -> LoadedModel:
    import torchvision.models as tvm

    available = tvm.list_models(module=tvm)
    if name not in available:
        close = difflib.get_close_matches(name, available, n=3)
        raise ModelLoadError(f"torchvision has no classification model '{name}'",
                             hint=f"did you mean {', '.join(close)}?" if close else
                             "see torchvision.models.list_models() for the names")
    try:
        default_weights = tvm.get_model_weights(name).DEFAULT
    except Exception:
        default_weights = None
    meta_weights = default_weights
    if weights == "default" and default_weights is None:
        raise ModelLoadError(f"torchvision:{name} has no pretrained weights", hint="pass --weights none or PATH")
    try:
        module = tvm.get_model(name, weights=default_weights if weights == "default" else None)
    except Exception as exc:
        raise ModelLoadError(
            f"cannot get the pretrained weights of torchvision:{name}: {type(exc).__name__}: "
            f"{(str(exc).splitlines() or [''])[0][:160]}",
            hint="you may be offline: pass --weights PATH with a downloaded file, or --weights none",
        ) from exc
    size, mean, std, labels = None, IMAGENET_MEAN, IMAGENET_STD, None
    if meta_weights is not None:
        transform = meta_weights.transforms()
        crop = getattr(transform, "crop_size", None)
        if crop:
            size = (crop[0], crop[-1])
        mean, std = tuple(getattr(transform, "mean", mean)), tuple(getattr(transform, "std", std))
        labels = tuple(meta_weights.meta.get("categories") or ()) or None
    if name == "inception_v3":
        size = (299, 299)
    return LoadedModel(module.eval(), size, 3, mean, std, labels or _default_labels(module), f"torchvision:{name}")


# ------------------------------------------------------------------------------------------------- timm


def _timm(name: str, weights: str) -> LoadedModel:
    try:
        import timm
    except ImportError as exc:
        raise ModelLoadError("timm is not installed", hint="pip install 'fcnify[timm]'") from exc
    if name not in timm.list_models() and name.split(".")[0] not in timm.list_models():
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        raise ModelLoadError(f"timm has no model '{name}'",
                             hint=f"did you mean {', '.join(close)}?" if close else "see timm.list_models()")
    try:
        module = timm.create_model(name, pretrained=weights == "default")
    except Exception as exc:
        raise ModelLoadError(
            f"cannot get the pretrained weights of timm:{name}: {type(exc).__name__}: "
            f"{(str(exc).splitlines() or [''])[0][:160]}",
            hint="you may be offline: pass --weights PATH with a downloaded file, or --weights none",
        ) from exc
    cfg = getattr(module, "pretrained_cfg", {}) or {}
    in_chans, h, w = cfg.get("input_size", (3, None, None))
    labels = None
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset(module)
        if subset:
            labels = tuple(ImageNetInfo(subset).label_descriptions())
    except Exception:  # label tables are a nicety, not a requirement
        labels = None
    return LoadedModel(module.eval(), (h, w) if h else None, in_chans, tuple(cfg.get("mean", IMAGENET_MEAN)),
                       tuple(cfg.get("std", IMAGENET_STD)), labels or _default_labels(module), f"timm:{name}")


# ------------------------------------------------------------------------------------------------- files


def _build_arch(arch: str) -> LoadedModel:
    """An untrained module for ``torchvision:NAME``, ``timm:NAME`` or ``package.module:factory``."""
    if arch.startswith("torchvision:"):
        return _torchvision(arch.split(":", 1)[1], "none")
    if arch.startswith("timm:"):
        return _timm(arch.split(":", 1)[1], "none")
    if arch == "digits":
        from fcnify import zoo

        return _digits_loaded(zoo.DigitsNet())
    module_name, _, factory = arch.partition(":")
    if not factory:
        raise InputError(f"--arch {arch!r} is not torchvision:NAME, timm:NAME or package.module:factory",
                         hint="e.g. --arch torchvision:resnet18 or --arch mypkg.nets:make_model")
    try:
        module = getattr(importlib.import_module(module_name), factory)()
    except Exception as exc:
        raise ModelLoadError(f"cannot build --arch {arch}: {type(exc).__name__}: {exc}",
                             hint="check that the module is importable and the factory takes no arguments") from exc
    if not isinstance(module, nn.Module):
        raise ModelLoadError(f"--arch {arch} returned {type(module).__name__}, not a torch.nn.Module",
                             hint="the factory must return the model")
    return LoadedModel(module.eval(), None, _channels(module), IMAGENET_MEAN, IMAGENET_STD,
                       _default_labels(module), arch)


def _read_state_dict(path: Path) -> tuple[dict, dict]:
    """A state_dict (and safetensors metadata) from a file, without running code from it."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except Exception as exc:
            raise ModelLoadError(f"{path} is not a readable safetensors file: {exc}",
                                 hint="check the file; it may be truncated") from exc
    obj = _safe_torch_load(path)
    for key in ("state_dict", "model_state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelLoadError(f"{path} does not hold a state_dict of tensors",
                             hint="save one with torch.save(model.state_dict(), path)")
    return {k.removeprefix("module."): v for k, v in obj.items()}, {}


def _safe_torch_load(path: Path):
    try:
        # weights_only passed explicitly: TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD would otherwise flip the default.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if _is_torchscript(path):
            raise UnsafeModelError(f"{path} is a TorchScript archive; loading it runs code from the file",
                                   hint="pass --trust-model if you trust it, or save a state_dict and use --arch") from exc
        try:
            blocked = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:
            blocked = []
        # The model's own classes say most about the file; torch's follow. Sorted, so the message is stable.
        blocked = sorted(blocked, key=lambda name: (name.startswith("torch."), name))
        if blocked or "weights_only" in str(exc) or "Unsupported global" in str(exc):
            names = ", ".join(blocked[:4]) or "unknown globals"
            raise UnsafeModelError(
                f"{path} is a pickle that needs {names}; loading it would run code from the file",
                hint="pass --trust-model if you trust it, or save model.state_dict() (or safetensors) and use --arch",
            ) from exc
        raise ModelLoadError(f"cannot read {path}: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}",
                             hint="the file may be truncated or not a PyTorch file") from exc


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _load_weights_into(loaded: LoadedModel, path: Path) -> LoadedModel:
    state, meta = _read_state_dict(path)
    result = loaded.module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        missing, unexpected = result.missing_keys, result.unexpected_keys
        raise ModelLoadError(
            f"{path.name} does not match {loaded.source}: {len(missing)} missing keys "
            f"({', '.join(missing[:3])}), {len(unexpected)} unexpected ({', '.join(unexpected[:3])})",
            hint="check --arch names the architecture the weights were trained with",
        )
    _apply_metadata(loaded, meta)
    loaded.source = f"{loaded.source} + {path.name}"
    return loaded


def _apply_metadata(loaded: LoadedModel, meta: dict) -> None:
    """safetensors metadata (strings) may carry input_size, mean, std, labels as JSON."""
    import json

    for key in ("input_size", "mean", "std", "labels", "in_chans"):
        if key in meta:
            value = json.loads(meta[key])
            setattr(loaded, key, tuple(value) if isinstance(value, list) else value)


def _trusted_file(path: Path) -> LoadedModel:
    if _is_torchscript(path):
        module = torch.jit.load(str(path), map_location="cpu")
    else:
        module = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(module, nn.Module):
        raise ModelLoadError(f"{path} holds a {type(module).__name__}, not a model",
                             hint="a state_dict needs --arch")
    return LoadedModel(module.eval(), None, _channels(module), IMAGENET_MEAN, IMAGENET_STD,
                       _default_labels(module), str(path))


def _digits_loaded(module: nn.Module) -> LoadedModel:
    from fcnify import zoo

    meta = zoo.DIGITS_META
    return LoadedModel(module.eval(), tuple(meta["input_size"]), int(meta["in_chans"]), tuple(meta["mean"]),
                       tuple(meta["std"]), tuple(meta["labels"]), "digits")


def load_model(spec: str | None = "digits", weights: str = "default", arch: str | None = None,
               input_size=None, trust_model: bool = False) -> LoadedModel:
    """Resolve a model spec into a ``LoadedModel`` (see the module docstring for the specs).

    Args:
        spec: ``digits``, ``torchvision:NAME``, ``timm:NAME`` or a file path.
        weights: ``default`` (the library's pretrained weights), ``none`` (random), or a weights file.
        arch: the architecture for a state_dict file.
        input_size: overrides the training size (int, "HxW" or (h, w)).
        trust_model: allow pickled modules, TorchScript and unchecked ``.pt2`` (they can run code).
    """
    from fcnify.convert import parse_input_size

    spec = spec or "digits"
    weights = weights or "default"
    if spec == "digits":
        from fcnify import zoo

        loaded = _digits_loaded(zoo.load_digits_model())
    elif spec.startswith("torchvision:") or spec.startswith("timm:"):
        kind, name = spec.split(":", 1)
        builder = _torchvision if kind == "torchvision" else _timm
        weights_file = weights not in ("default", "none")
        loaded = builder(name, "none" if weights_file else weights)
        if weights_file:
            loaded = _load_weights_into(loaded, _existing(Path(weights)))
    else:
        path = _existing(Path(spec))
        if path.suffix == ".pt2":
            from fcnify.export import load_pt2

            module, meta = load_pt2(path, trust_model=trust_model)
            if meta is None:
                raise ModelLoadError(f"{path} has no fcnify metadata", hint="create it with 'fcnify convert'")
            loaded = LoadedModel(module, meta.input_size, meta.in_chans, meta.mean, meta.std, meta.labels,
                                 meta.source or str(path), converted=True, geometry=meta.geometry)
        elif path.suffix == ".onnx":
            from fcnify.onnx_export import load_onnx_model

            loaded = load_onnx_model(path)
        elif arch:
            loaded = _load_weights_into(_build_arch(arch), path)
        elif path.suffix == ".safetensors":
            raise InputError(f"{path} holds weights only; fcnify needs the architecture too",
                             hint="pass --arch torchvision:NAME, timm:NAME or package.module:factory")
        elif trust_model:
            loaded = _trusted_file(path)
        else:
            obj = _safe_torch_load(path)
            if isinstance(obj, dict):
                raise InputError(f"{path} is a state_dict; fcnify needs the architecture too",
                                 hint="pass --arch torchvision:NAME, timm:NAME or package.module:factory")
            if not isinstance(obj, nn.Module):
                raise ModelLoadError(f"{path} holds a {type(obj).__name__}, not a model", hint="save the model")
            loaded = LoadedModel(obj.eval(), None, _channels(obj), IMAGENET_MEAN, IMAGENET_STD,
                                 _default_labels(obj), str(path))
    if input_size is not None:
        loaded.input_size = parse_input_size(input_size)
    return loaded


def require_input_size(loaded: LoadedModel) -> tuple[int, int]:
    if loaded.input_size is None or loaded.input_size[0] is None:
        raise InputError(f"the training size of {loaded.source} is unknown",
                         hint="pass --input-size, e.g. --input-size 224 or 224x192")
    return tuple(loaded.input_size)


def _existing(path: Path) -> Path:
    if not path.exists():
        raise InputError(f"no such file: {path}",
                         hint="give a path, 'digits', torchvision:NAME or timm:NAME")
    if path.is_dir():
        raise InputError(f"{path} is a folder, not a model file", hint="give the model file")
    return path
