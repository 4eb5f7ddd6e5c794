"""Saving an early-exit model: HF's ``save_pretrained`` plus ``custom_generate/``, installed per instance.

``switch_on_saving(model)`` sets the instance attribute ``model.save_pretrained`` to
``functools.partial(save_early_exit_model, model)``; HF's ``push_to_hub`` calls ``self.save_pretrained``, so it
uploads the folder too. The class's ``save_pretrained`` is never replaced (see :mod:`.enable`).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from .stored_policy import POLICY_ATTRIBUTE, policy_to_dict

__all__ = ["CUSTOM_GENERATE_DIR", "save_add_ons", "save_early_exit_model", "switch_on_saving", "write_custom_generate"]

CUSTOM_GENERATE_DIR = "custom_generate"
_GENERATE_PY = '''"""Early-exit decoding (CALM with risk control) for this checkpoint: https://pypi.org/project/hf_safe_exit

transformers runs this file when the model is loaded with `from_pretrained(..., trust_remote_code=True)`,
or called with `generate(..., custom_generate=<this repo>, trust_remote_code=True)`. It adds one keyword
to `generate`: `early_exit=hf_safe_exit.RiskControlled(eps=0.05)` (a threshold with a statistical
guarantee, fitted on the calibration stored under calibration/<task>/) or `hf_safe_exit.EarlyExit(...)`.
Without it (or with `early_exit=False`) `generate` is transformers' own.
"""

from hf_safe_exit.decoding.generate import model_generate as generate  # noqa: F401
'''


def write_custom_generate(save_directory) -> Path:
    """Write ``custom_generate/generate.py`` and ``requirements.txt`` (``hf_safe_exit>=<this version>``)."""
    from .. import __version__

    folder = Path(save_directory) / CUSTOM_GENERATE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "generate.py").write_text(_GENERATE_PY, encoding="utf-8")
    (folder / "requirements.txt").write_text(f"hf_safe_exit>={__version__}\n", encoding="utf-8")
    return folder


def save_early_exit_model(model, save_directory, *args, **kwargs):
    """HF's ``save_pretrained`` (the class's own) plus ``custom_generate/``, with a stored policy written as its
    JSON spec (:mod:`.stored_policy`).

    ``custom_generate/`` is written first, so that ``save_pretrained(..., push_to_hub=True)`` uploads it too.
    """
    config = model.generation_config
    stored = getattr(config, POLICY_ATTRIBUTE, None)
    from_model_config = getattr(config, "_from_model_config", None)
    spec = None if stored is None else policy_to_dict(stored)  # raises before anything is written
    if kwargs.get("is_main_process", True):
        write_custom_generate(save_directory)
    if stored is not None:
        setattr(config, POLICY_ATTRIBUTE, spec)
        # HF drops every non-standard key of a generation config marked as derived from the model config
        config._from_model_config = False
    try:
        result = type(model).save_pretrained(model, save_directory, *args, **kwargs)
    finally:
        if stored is not None:
            setattr(config, POLICY_ATTRIBUTE, stored)
            config._from_model_config = from_model_config
    if kwargs.get("is_main_process", True):
        save_add_ons(model, save_directory)
    return result


def save_add_ons(model, save_directory) -> None:
    """Save what decoding ``model`` reads besides its weights, so that the saved folder decodes the same: the
    attached meta head (``measure="auto"`` would otherwise resolve to another measure after a reload), and the
    calibrations of the local folder it was loaded from (``calibration/``, copied as they are, unless the target
    has its own; they stay tied to the weights they were made for: changed weights are refused when used)."""
    import shutil

    from ..confidence import MetaClassifierHead
    from ..confidence.meta import META_CONFIG_NAME, META_WEIGHTS_NAME
    from ..risk.store import CALIBRATION_SUBDIR

    origin = os.fspath(getattr(model, "name_or_path", "") or "")
    source = Path(origin) if origin and os.path.isdir(origin) else None
    if source is not None and source.resolve() == Path(save_directory).resolve():
        source = None  # saved over the folder it came from: its files are there already
    head = getattr(model, "meta_head", None)
    if isinstance(head, MetaClassifierHead):
        head.save_pretrained(save_directory)
    elif source is not None and (source / META_WEIGHTS_NAME).is_file() and (source / META_CONFIG_NAME).is_file():
        for name in (META_WEIGHTS_NAME, META_CONFIG_NAME):  # a head not loaded yet (find_meta_head loads on use)
            shutil.copyfile(source / name, Path(save_directory) / name)
    target = Path(save_directory) / CALIBRATION_SUBDIR
    if source is not None and (source / CALIBRATION_SUBDIR).is_dir() and not target.exists():
        shutil.copytree(source / CALIBRATION_SUBDIR, target)


def switch_on_saving(model) -> None:
    """Give ``model`` (an early-exit model) its own ``save_pretrained``: :func:`save_early_exit_model`. Idempotent."""
    current = model.__dict__.get("save_pretrained")
    if not (isinstance(current, functools.partial) and current.func is save_early_exit_model):
        model.save_pretrained = functools.partial(save_early_exit_model, model)
