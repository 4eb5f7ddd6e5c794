"""Imports that wait until they are needed, so that ``import hf_safe_exit`` stays light.

* :func:`require` imports an optional dependency where a calibration, evaluation, plot or training function
  uses it; when it is missing, the one-line ImportError names the extra that installs it
  (``pip install 'hf_safe_exit[plot]'``). ``OPTIONAL`` says which extra that is; pyproject.toml lists the same
  (tests/test_light_import.py checks that they agree).
* :func:`lazy_exports` gives a package a module-level ``__getattr__`` and ``__dir__`` (PEP 562) that import the
  module defining a public name on first access.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType
from typing import Callable, Iterable, Mapping

__all__ = ["OPTIONAL", "require", "lazy_exports"]

# import name of an optional dependency -> the extra of hf_safe_exit that installs it
OPTIONAL = {
    "accelerate": "calibrate",
    "datasets": "calibrate",
    "rouge_score": "calibrate",
    "tqdm": "calibrate",
    "matplotlib": "plot",
}


def require(module: str, purpose: str) -> ModuleType:
    """``importlib.import_module(module)``; if the optional dependency behind it is not installed, a
    ``ModuleNotFoundError`` (an ImportError) that says what needs it and which extra installs it."""
    top = module.partition(".")[0]
    if top not in OPTIONAL:
        raise ValueError(f"{top!r} is not an optional dependency of hf_safe_exit: add it to OPTIONAL and to the "
                         "extras in pyproject.toml.")
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if (err.name or "").partition(".")[0] != top:  # installed, but something it imports is missing
            raise
        raise ModuleNotFoundError(f"{purpose} needs {top}, an optional dependency that is not installed: "
                                  f"pip install 'hf_safe_exit[{OPTIONAL[top]}]'", name=top) from err


def lazy_exports(namespace: dict, exports: Mapping[str, Iterable[str]]) -> tuple[Callable, Callable]:
    """``(__getattr__, __dir__)`` for the package whose ``globals()`` is ``namespace``: ``exports`` maps a module
    (relative to the package) to the public names it defines; each is imported on first access and then kept in
    the namespace. Any other public name that is a submodule (``hf_safe_exit.risk``) is imported on access too."""
    package = namespace["__name__"]
    where = {name: module for module, names in exports.items() for name in names}
    same_name = {name for name, module in where.items() if module == "." + name}
    if same_name:  # e.g. training.calm_loss, the function, from training/calm_loss.py, the module
        class Package(ModuleType):
            def __setattr__(self, name, value):
                # importing the submodule binds it to the package's attribute of the same name; the exported
                # object wins, as after an eager `from .calm_loss import calm_loss`
                if name in same_name and isinstance(value, ModuleType) and value.__name__ == f"{package}.{name}":
                    value = getattr(value, name)
                super().__setattr__(name, value)

        sys.modules[package].__class__ = Package

    def __getattr__(name: str):
        if name in where:
            value = getattr(importlib.import_module(where[name], package), name)
            namespace[name] = value
            return value
        if not name.startswith("_") and importlib.util.find_spec(f"{package}.{name}") is not None:
            return importlib.import_module(f"{package}.{name}")
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(where))

    return __getattr__, __dir__
