"""Model specs: resolving what the user names into a module and its metadata, loading files safely.

Specs: ``digits`` (the embedded model), ``torchvision:NAME``, ``timm:NAME``, a state_dict file
(``.pth``/``.pt``/``.bin``/``.safetensors``) with ``arch``, a pickled module or TorchScript file (only when
trusted), and an fcnify ``.pt2`` (already converted). Pickles are read with ``weights_only=True`` passed
explicitly, and never retried unsafely unless the user trusts the file.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.util
import json
import logging
import os
import socket
import sys
import threading
import warnings
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import torch
from safetensors import safe_open
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from fcnify import zoo
from fcnify.convert import parse_input_size
from fcnify.convert.from_export import exported_classes, exported_input_shape, rebuild_modules
from fcnify.convert.from_onnx import import_onnx, read_onnx
from fcnify.convert.outputs import flatten_outputs, resolve_output
from fcnify.errors import InputError, ModelLoadError, UnsafeModelError, describe, first_line
from fcnify.export import ExportedNet, load_pt2
from fcnify.introspect import input_channels, placement
from fcnify.loaded import ASSUMED, FROM_FLAG, FROM_METADATA, FROM_ZOO, LoadedModel
from fcnify.onnx_runtime import OnnxClassifier, has_fcnify_metadata, load_onnx_model
from fcnify.optional import require

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "MODEL_FORMATS", "STATE_DICT_SUFFIXES", "apply_preprocessing",
    "load_model", "output_channels", "parse_floats", "read_labels", "require_input_size", "user_code_path"
]

_logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STATE_DICT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")




def _default_labels(module: nn.Module, count: int | None = None) -> tuple[str, ...]:
    """Numbered class names: ``count`` of them, else a guess from the last layer defined (replaced by the
    output's real channel count once the training size is known, ``apply_preprocessing``)."""
    if count is None:
        linears = [m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        count = linears[-1].out_features if linears and isinstance(linears[-1], nn.Linear) else (
            linears[-1].out_channels if linears else 0)
    return _numbered(count)


def _numbered(count: int) -> tuple[str, ...]:
    return tuple(str(i) for i in range(count))


def output_channels(module: nn.Module, input_size: tuple[int, int], in_chans: int) -> dict[str, int] | None:
    """Each output's channel count (dim 1) at the training size, by output name, from a shape-only run
    (fake tensors: no memory, no arithmetic); None when the model does not run so. TorchScript is not run here:
    its interpreter logs failures on the terminal itself (its outputs are counted when it is converted)."""
    if isinstance(module, torch.jit.ScriptModule):
        return None
    device, dtype = placement(module)
    # A model that does not run at this size makes the fake-tensor dispatcher log the whole traceback at ERROR
    # level; the conversion reports the same failure on one line, so it is silenced here.
    fake_logger = logging.getLogger("torch._subclasses.fake_tensor")
    disabled, fake_logger.disabled = fake_logger.disabled, True
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
            outputs = flatten_outputs(module.eval()(torch.empty(1, in_chans, *input_size, dtype=dtype,
                                                                    device=device)))
        return {name: int(out.shape[1]) if isinstance(out, torch.Tensor) and out.dim() > 1 else 0
                for name, out in outputs.items()}
    except Exception as exc:  # an op fake tensors cannot run, or a wrong size: the conversion says why later
        _logger.info("class count from the outputs' shapes failed: %s", describe(exc, 200))
        return None
    finally:
        fake_logger.disabled = disabled


def _select_output(loaded: LoadedModel, output: str | None) -> None:
    """Pick ``output`` of a model with several and take its class count (labels numbered where not named).

    Raises:
        InputError: an output the model does not have (the message lists them).
    """
    if output is not None:
        loaded.output = str(output)
    if loaded.converted:
        module = loaded.module
        if not hasattr(module, "select"):
            return
        before = module.selected
        loaded.module = module.select(loaded.output)
        loaded.geometry = loaded.module.geometry
        if loaded.module.selected != before:  # the file's labels belong to the output it was saved with
            loaded.labels = _numbered(loaded.module.channels[loaded.module.selected])
        return
    if loaded.input_size is None or loaded.input_size[0] is None or loaded.labels != _numbered(len(loaded.labels)):
        return  # named classes (a zoo model's), or a size that is not known yet
    channels = output_channels(loaded.module, tuple(loaded.input_size), loaded.in_chans)
    if not channels:
        return
    name = resolve_output(tuple(channels), channels, loaded.output)
    loaded.labels = _numbered(channels[name])


# ------------------------------------------------------------------------------------------- torchvision


def _torchvision(name: str, weights: str) -> LoadedModel:
    import torchvision.models as tvm  # lazy: heavy (about a second), only torchvision: specs need it

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
            f"{first_line(exc, 160)}",
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
    return LoadedModel(module.eval(), size, 3, mean, std, labels or _default_labels(module), f"torchvision:{name}",
                       normalisation=FROM_ZOO)


# ------------------------------------------------------------------------------------------------- timm


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers; if not, its offline mode is switched on for this process.

    Offline, huggingface_hub retries each request with back-off for most of a minute before it reads its
    cache; in offline mode it reads the cache at once (cached weights still load) or fails at once.
    """
    try:  # lazy: the hub client comes with timm, which is optional
        import huggingface_hub.constants as hub
    except ImportError:  # timm without the hub client: nothing to switch
        return True
    if hub.HF_HUB_OFFLINE:
        return False
    host = urlparse(hub.ENDPOINT).hostname or "huggingface.co"
    answered: list[bool] = []

    def probe() -> None:  # name resolution has no timeout of its own: a daemon thread bounds it
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            answered.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    if answered:
        return True
    _logger.info("%s is not reachable: Hugging Face Hub offline mode", host)
    hub.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"
    return False


def _timm(name: str, weights: str) -> LoadedModel:
    timm = require("timm", "timm", f"load timm:{name}")  # optional, imported only for timm models
    if name not in timm.list_models() and name.split(".")[0] not in timm.list_models():
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        raise ModelLoadError(f"timm has no model '{name}'",
                             hint=f"did you mean {', '.join(close)}?" if close else "see timm.list_models()")
    offline = weights == "default" and not _hub_reachable()
    try:
        module = timm.create_model(name, pretrained=weights == "default")
    except Exception as exc:
        where = " (offline: the Hugging Face Hub is not reachable and they are not in its cache)" if offline else ""
        raise ModelLoadError(
            f"cannot get the pretrained weights of timm:{name}{where}: {type(exc).__name__}: "
            f"{' '.join(str(exc).split())}",
            hint="pass --weights PATH with a downloaded file, or --weights none",
        ) from None
    cfg = getattr(module, "pretrained_cfg", {}) or {}
    in_chans, h, w = cfg.get("input_size", (3, None, None))
    labels = None
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset  # lazy: timm is optional

        subset = infer_imagenet_subset(module)
        if subset:
            labels = tuple(ImageNetInfo(subset).label_descriptions())
    except Exception:  # label tables are a nicety, not a requirement
        labels = None
    return LoadedModel(module.eval(), (h, w) if h else None, in_chans, tuple(cfg.get("mean", IMAGENET_MEAN)),
                       tuple(cfg.get("std", IMAGENET_STD)), labels or _default_labels(module), f"timm:{name}",
                       normalisation=FROM_ZOO)


# ------------------------------------------------------------------------------------------------- files


def _assumed_normalisation(in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """ImageNet's mean and std, or for one channel their grey twin (timm's choice for grayscale ImageNet)."""
    return (IMAGENET_MEAN, IMAGENET_STD) if in_chans != 1 else ((0.449,), (0.226,))


def _user_model(module: nn.Module, source: str, path: Path | None = None, in_chans: int | None = None) -> LoadedModel:
    """A model of the user's own: nothing says how it was trained, so ImageNet normalisation is assumed."""
    in_chans = in_chans or input_channels(module)
    mean, std = _assumed_normalisation(in_chans)
    return LoadedModel(module.eval(), None, in_chans, mean, std, _default_labels(module), source,
                       extra={"path": str(path)} if path is not None else {}, normalisation=ASSUMED)


@contextlib.contextmanager
def user_code_path(folder: str | os.PathLike | None = None):
    """Put ``folder`` (default: the current folder) first on ``sys.path`` while the user's code is imported.

    ``python -m`` and ``python script.py`` do this; the ``fcnify`` console script does not, so
    ``--arch mynet:make_model`` and pickled models would not find ``mynet.py`` next to the user.
    """
    folder = str(Path(folder or os.getcwd()).resolve())
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        yield folder
    finally:
        if added and folder in sys.path:
            sys.path.remove(folder)


def _import_user_module(location: str):
    """Import ``package.module`` (from the current folder too) or a ``.py`` file path; one-line errors."""
    as_file = location.endswith(".py") or "/" in location or os.sep in location
    folder = Path(location).resolve().parent if as_file else Path.cwd().resolve()
    name = Path(location).stem if as_file else location
    if as_file and not Path(location).is_file():
        raise ModelLoadError(f"--arch: no such file {location}",
                             hint="give the path of the .py file that defines the factory")
    try:
        with user_code_path(folder):
            if not as_file:
                return importlib.import_module(name)
            file = Path(location).resolve()
            known = sys.modules.get(name)
            if known is not None and Path(getattr(known, "__file__", "") or "").resolve() != file:
                name = f"fcnify_user_{name}"  # never replace a module already imported (a file named torch.py)
            spec = importlib.util.spec_from_file_location(name, file)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # the classes it defines must be findable by name (pickle, deepcopy)
            try:
                spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(name, None)
                raise
            return module
    except ModuleNotFoundError as exc:
        if exc.name is not None and (exc.name == name or name.startswith(exc.name + ".")):
            raise ModelLoadError(f"cannot import module '{name}': no {exc.name.replace('.', '/')}.py or package "
                                 f"'{exc.name}' in {folder} or on the Python path",
                                 hint="run fcnify from the folder that holds it, or give the file: "
                                 "--arch path/to/file.py:factory") from None
        raise ModelLoadError(f"importing module '{name}' (from {folder}) failed: it imports '{exc.name}', "
                             "which is not installed",
                             hint=f"pip install the package that provides '{exc.name}'") from None
    except Exception as exc:
        raise ModelLoadError(f"importing module '{name}' (from {folder}) failed: {type(exc).__name__}: "
                             f"{first_line(exc, 200)}",
                             hint="fix the error in the module; fcnify imports it as Python would") from None


def _build_arch(arch: str) -> LoadedModel:
    """An untrained module for ``torchvision:NAME``, ``timm:NAME``, ``package.module:factory`` or
    ``file.py:factory``."""
    if arch.startswith("torchvision:"):
        return _torchvision(arch.split(":", 1)[1], "none")
    if arch.startswith("timm:"):
        return _timm(arch.split(":", 1)[1], "none")
    if arch == "digits":
        return _digits_loaded(zoo.DigitsNet())
    location, _, factory = arch.rpartition(":")
    if not location or not factory.isidentifier():
        raise InputError(f"--arch {arch!r} is not torchvision:NAME, timm:NAME, package.module:factory or "
                         "file.py:factory",
                         hint="e.g. --arch torchvision:resnet18, --arch mynet:make_model or "
                              "--arch ./mynet.py:make_model")
    user_module = _import_user_module(location)
    if not hasattr(user_module, factory):
        raise ModelLoadError(f"module '{user_module.__name__}' ({getattr(user_module, '__file__', '?')}) has no "
                             f"'{factory}'", hint="name a function or class in it that builds the model")
    try:
        module = getattr(user_module, factory)()
    except Exception as exc:
        raise ModelLoadError(f"cannot build --arch {arch}: {type(exc).__name__}: "
                             f"{first_line(exc, 200)}",
                             hint="the factory must take no arguments and return the model") from None
    if not isinstance(module, nn.Module):
        raise ModelLoadError(f"--arch {arch} returned {type(module).__name__}, not a torch.nn.Module",
                             hint="the factory must return the model")
    return _user_model(module, arch)


def _read_state_dict(path: Path) -> tuple[dict, dict]:
    """A state_dict (and safetensors metadata) from a file, without running code from it."""
    if path.suffix == ".safetensors":
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


#: What a model file can be, for the message about one that is none of them.
MODEL_FORMATS = ("a .pt2 (torch.export) or .onnx file, a state_dict in .pt/.pth/.safetensors (with --arch), "
                 "a pickled model or TorchScript (with --trust-model), or digits, torchvision:NAME, timm:NAME")


def _require_torch_file(path: Path) -> None:
    """Refuse a file that is neither a zip archive (``torch.save``, TorchScript) nor a pickle (legacy
    ``torch.save``): without this, a text file fails deep in the unpickler ("pop from empty list")."""
    try:
        with open(path, "rb") as file:
            head = file.read(4)
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path}: {exc.strerror}", hint="check the path") from exc
    if not (head.startswith(b"\x80") or zipfile.is_zipfile(path)):
        raise ModelLoadError(f"{path} is not a model format fcnify reads (not a PyTorch archive or pickle)",
                             hint=f"give {MODEL_FORMATS}")


def _safe_torch_load(path: Path):
    _require_torch_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "looks like a TorchScript archive": said below, in one line
            # weights_only passed explicitly: TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD would otherwise flip the default.
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if _is_torchscript(path):
            raise UnsafeModelError(f"{path} is a TorchScript archive; loading it runs code from the file",
                                   hint="pass --trust-model if you trust it, or save a state_dict and use "
                                        "--arch") from exc
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
        raise ModelLoadError(f"cannot read {path}: {describe(exc, 160)}",
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
    _apply_metadata(loaded, meta, path)
    loaded.source = f"{loaded.source} + {path.name}"
    loaded.extra["path"] = str(path)
    return loaded


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _metadata_value(key: str, raw: str, path: Path):
    """One safetensors metadata entry (a JSON string), checked: a wrong one is named, not a traceback later."""
    def bad(why: str) -> ModelLoadError:
        return ModelLoadError(f"{path.name} has malformed metadata: {key} is {raw[:60]!r}, {why}",
                              hint=f"fix the '{key}' entry (JSON) of the safetensors metadata, or remove it and "
                              f"pass --{key.replace('_', '-')}")
    try:
        value = json.loads(raw)
    except ValueError:
        raise bad("not JSON") from None
    if key == "input_size":
        if _is_count(value):
            return (value, value)
        if not (isinstance(value, list) and len(value) == 2 and all(_is_count(v) for v in value)):
            raise bad("not a size like 224 or [224, 192]")
        return tuple(value)
    if key == "in_chans":
        if not _is_count(value):
            raise bad("not a channel count")
        return value
    if key in ("mean", "std"):
        value = [value] if _is_number(value) else value
        if not (isinstance(value, list) and value and all(_is_number(v) for v in value)) or \
                (key == "std" and any(v == 0 for v in value)):
            raise bad("not a list of numbers" + (" without zeros" if key == "std" else ""))
        return tuple(float(v) for v in value)
    if not (isinstance(value, list) and all(isinstance(v, (str, int)) for v in value)):
        raise bad("not a list of class names")
    return tuple(str(v) for v in value)


def _apply_metadata(loaded: LoadedModel, meta: dict, path: Path) -> None:
    """safetensors metadata (strings) may carry input_size, in_chans, mean, std, labels as JSON."""
    values = {key: _metadata_value(key, meta[key], path)
              for key in ("input_size", "in_chans", "mean", "std", "labels") if key in meta}
    for key, value in values.items():
        setattr(loaded, key, value)
    if "mean" in values or "std" in values:
        loaded.normalisation = FROM_METADATA


def _trusted_file(path: Path) -> LoadedModel:
    _require_torch_file(path)
    if _is_torchscript(path):
        return _torchscript(path)
    with user_code_path():  # the pickle names the user's classes by module: find them as python would
        try:
            module = torch.load(path, map_location="cpu", weights_only=False)
        except (ModuleNotFoundError, AttributeError) as exc:
            raise ModelLoadError(f"{path} needs the model's code to be unpickled: {type(exc).__name__}: {exc} "
                                 f"(searched {Path.cwd()} and the Python path)",
                                 hint="run fcnify from the folder that holds the model's .py files, or save a "
                                 "state_dict and use --arch") from None
        except Exception as exc:
            raise ModelLoadError(f"cannot unpickle {path}: {type(exc).__name__}: "
                                 f"{first_line(exc, 200)}",
                                 hint="the file may be truncated or not a PyTorch file") from None
    if not isinstance(module, nn.Module):
        raise ModelLoadError(f"{path} holds a {type(module).__name__}, not a model",
                             hint="a state_dict needs --arch")
    return _user_model(module, str(path), path)


def _torchscript(path: Path) -> LoadedModel:
    """A trusted TorchScript file; ``convert`` turns its graph into one it can rewrite, where torch can."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notices would bury the one line that matters
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise ModelLoadError(f"cannot load TorchScript {path}: {type(exc).__name__}: "
                                 f"{first_line(exc, 200)}", hint="the file may be truncated") from None
    return _user_model(module, str(path), path)


def _digits_loaded(module: nn.Module) -> LoadedModel:
    meta = zoo.DIGITS_META
    return LoadedModel(module.eval(), tuple(meta["input_size"]), int(meta["in_chans"]), tuple(meta["mean"]),
                       tuple(meta["std"]), tuple(meta["labels"]), "digits", normalisation=FROM_ZOO)


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
    spec = spec or "digits"
    weights = weights or "default"
    if spec == "digits":
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
            module, meta = load_pt2(path, trust_model=trust_model)
            if meta is None:  # the user's own torch.export archive of a classifier: convert it like a module
                loaded = _exported_classifier(module, path)
            else:
                loaded = LoadedModel(ExportedNet(module, meta), meta.input_size, meta.in_chans, meta.mean, meta.std,
                                     meta.labels,
                                     meta.source or str(path), converted=True, geometry=meta.geometry,
                                     normalisation=meta.normalisation or FROM_METADATA)
        elif path.suffix == ".onnx":
            loaded = load_onnx_model(path) if has_fcnify_metadata(path) else _onnx_classifier(path, input_size)
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
            loaded = _user_model(obj, str(path), path)
    if input_size is not None:
        loaded.input_size = parse_input_size(input_size)
    return loaded


def _exported_classifier(graph_module: nn.Module, path: Path) -> LoadedModel:
    """A classifier saved with ``torch.export.save``: its ATen graph rebuilt with modules, sized from its input."""
    channels, height, width = exported_input_shape(graph_module) or (None, None, None)
    loaded = _user_model(rebuild_modules(graph_module), str(path), path, channels)
    classes = exported_classes(graph_module)
    if classes:
        loaded.labels = _default_labels(loaded.module, classes)
    if height and width:  # a static example size is the training size
        loaded.input_size = (height, width)
    return loaded


def _onnx_classifier(path: Path, input_size) -> LoadedModel:
    """An ONNX classifier fcnify did not make: imported into PyTorch to be converted, and run by onnxruntime on
    the original file as the reference its conversion is verified against."""
    require("onnxruntime", None, "run ONNX files")
    size = parse_input_size(input_size) if input_size is not None else None
    imported = import_onnx(read_onnx(path), size, str(path))
    loaded = _user_model(imported.module, str(path), path, imported.in_chans)
    loaded.input_size = imported.input_size
    if imported.classes[0]:
        loaded.labels = _default_labels(loaded.module, imported.classes[0])
    loaded.reference = OnnxClassifier(path, imported.input_layout)
    loaded.extra.update(format="onnx", input_layout=imported.input_layout, outputs=list(imported.output_names))
    _logger.info("%s: ONNX classifier without fcnify metadata, imported (%s input, %dx%d)", path,
                 imported.input_layout, *imported.input_size)
    return loaded


def parse_floats(text: str, option: str) -> tuple[float, ...]:
    """``0.5`` or ``0.485,0.456,0.406`` as floats."""
    try:
        values = tuple(float(v) for v in str(text).replace(" ", "").split(",") if v)
    except ValueError:
        values = ()
    if not values:
        raise InputError(f"{option} {text!r} is not a number or a comma list of numbers",
                         hint=f"e.g. {option} 0.5 or {option} 0.485,0.456,0.406")
    return values


def read_labels(value: str) -> tuple[str, ...]:
    """Class names from a comma list, or from a text file with one name a line."""
    path = Path(value)
    if path.is_file():
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read the labels file {path}: {exc}",
                             hint="one class name a line, UTF-8") from None
        labels = tuple(line.strip() for line in lines if line.strip())
    else:
        labels = tuple(v.strip() for v in value.split(","))
    if not labels or not all(labels):
        raise InputError(f"--labels {value!r} has an empty class name",
                         hint="give a comma list (cat,dog) or a text file with one name a line")
    return labels


def apply_preprocessing(loaded: LoadedModel, mean: str | None = None, std: str | None = None,
                        labels: str | None = None, in_chans: int | None = None,
                        output: str | None = None) -> LoadedModel:
    """Apply the user's ``--mean``, ``--std``, ``--labels``, ``--in-chans`` and ``--output`` to ``loaded``, checked.

    One value of mean or std stands for every channel. The class count is the selected output's channels at
    the training size (not the last layer the model defines).

    Raises:
        InputError: an unreadable value, or counts that do not match the channels or classes.
    """
    if in_chans is not None:
        if in_chans < 1:
            raise InputError(f"--in-chans {in_chans} must be positive", hint="e.g. --in-chans 1 for grayscale")
        if loaded.converted and in_chans != loaded.in_chans:
            raise InputError(f"--in-chans {in_chans}: {loaded.source} was converted for {loaded.in_chans} channels",
                             hint="leave --in-chans out for a converted model")
        if in_chans != loaded.in_chans and loaded.normalisation == ASSUMED and mean is None and std is None:
            loaded.mean, loaded.std = _assumed_normalisation(in_chans)
        loaded.in_chans = in_chans
    for option, text in (("--mean", mean), ("--std", std)):
        if text is None:
            continue
        values = parse_floats(text, option)
        if len(values) not in (1, loaded.in_chans):
            raise InputError(f"{option} has {len(values)} values for a model with {loaded.in_chans} input channels",
                             hint=f"give one value, or one per channel ({loaded.in_chans})")
        if option == "--std" and any(v == 0 for v in values):
            raise InputError("--std must not be 0", hint="--std 1 keeps pixel values as they are")
        setattr(loaded, option[2:], values)
        loaded.normalisation = FROM_FLAG
    for key in ("mean", "std"):  # one value (from a flag or a default) stands for every channel
        values = tuple(getattr(loaded, key))
        if len(values) == 1 and loaded.in_chans > 1:
            setattr(loaded, key, values * loaded.in_chans)
    _select_output(loaded, output)
    if labels is not None:
        names = read_labels(labels)
        if loaded.labels and len(names) != len(loaded.labels):
            raise InputError(f"--labels has {len(names)} names and {loaded.source} has {len(loaded.labels)} classes",
                             hint="give one name per class, in the order of the model's outputs")
        loaded.labels = names
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
