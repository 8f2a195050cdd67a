"""Optional dependencies: imported only by the features that need them, with one error when missing."""

from __future__ import annotations

import importlib
from types import ModuleType

from fcnify.errors import MissingDependencyError

__all__ = ["require"]


def require(module: str, extra: str | None, purpose: str) -> ModuleType:
    """Import ``module`` for ``purpose``, or raise ``MissingDependencyError`` naming the ``pip install``.

    Args:
        module: the module to import (``"ray.data"``).
        extra: fcnify's extra that installs it (``"ray"`` → ``pip install 'fcnify[ray]'``); None: the package
            itself (``pip install onnxscript``).
        purpose: what it is needed for ("run --engine ray").
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        package = module.split(".")[0]
        hint = f"pip install 'fcnify[{extra}]'" if extra else f"pip install {package}"
        missing = exc.name or package
        raise MissingDependencyError(f"{missing} is not installed: it is needed to {purpose}", hint=hint) from exc
