"""Meta-classifier confidence (CALM, Schuster et al. 2022, Eq. 7).

A small head maps the (final-layer-normed) state of layer i to
P(layer i's top token equals the last layer's top token). It is trained with the
backbone frozen (see ``hf_safe_exit.training``) and saved next to the model as
``meta_head.safetensors`` + ``meta_head_config.json``.
"""

from __future__ import annotations

import json
import numbers
import os
from dataclasses import asdict, dataclass

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import CorruptFileError, HubFileError, MissingMetaHeadError, read_json_object
from ..hub_files import hub_file, hub_path, loaded_revision
from .base import ConfidenceMeasure, LayerView

META_WEIGHTS_NAME = "meta_head.safetensors"
META_CONFIG_NAME = "meta_head_config.json"


def _whole(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass
class MetaHeadConfig:
    """The shape of a meta head. Validated on construction (``ValueError`` naming the field): ``d_model`` a whole
    number >= 1, ``hidden_size`` a whole number >= 0, ``dropout`` a number in [0, 1); a bool is not a number here."""

    d_model: int
    hidden_size: int = 0  # 0: a single Linear(d_model, 2); > 0: Linear -> GELU -> Linear
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if not _whole(self.d_model) or self.d_model < 1:
            raise ValueError(f"d_model={self.d_model!r} must be a whole number >= 1 (the model's width)")
        if not _whole(self.hidden_size) or self.hidden_size < 0:
            raise ValueError(f"hidden_size={self.hidden_size!r} must be a whole number >= 0 (0: one linear layer)")
        dropout = self.dropout
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout!r} must be a number in [0, 1)")


class MetaClassifierHead(nn.Module):
    """``Linear(d_model, 2)`` or a one-hidden-layer MLP; class 1 = "already agrees with the last layer"."""

    def __init__(self, config: MetaHeadConfig):
        super().__init__()
        self.config = config
        if config.hidden_size > 0:
            self.net = nn.Sequential(
                nn.Linear(config.d_model, config.hidden_size),
                nn.GELU(),
                nn.Dropout(config.dropout),
                nn.Linear(config.hidden_size, 2),
            )
        else:
            self.net = nn.Linear(config.d_model, 2)

    def forward(self, normed_hidden: torch.Tensor) -> torch.Tensor:
        """Logits of shape ``(..., 2)``."""
        return self.net(normed_hidden)

    def prob_agree(self, normed_hidden: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(normed_hidden.dtype, torch.float32)
        return torch.softmax(self.forward(normed_hidden).to(dtype), dim=-1)[..., 1]

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()},
                  os.path.join(directory, META_WEIGHTS_NAME))
        with open(os.path.join(directory, META_CONFIG_NAME), "w") as f:
            json.dump(asdict(self.config), f, indent=2)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "MetaClassifierHead":
        """The head saved in ``directory`` by :meth:`save_pretrained`.

        Neither file there: :class:`~hf_safe_exit.errors.MissingMetaHeadError`. One of them missing, or either
        unreadable, empty, truncated or of another head or model: :class:`~hf_safe_exit.errors.CorruptFileError`
        naming the file (never a silent fall-back to another measure).
        """
        files = _local_head_files(directory)
        if files is None:
            raise MissingMetaHeadError(
                f"No meta-classifier head in {directory!s} (expected {META_WEIGHTS_NAME} and {META_CONFIG_NAME}). "
                "Train one with hf_safe_exit.training.train_meta_classifier(model, ...) and save it next to the model."
            )
        return cls.from_files(*files)

    @classmethod
    def from_files(cls, weights: str | os.PathLike, config_path: str | os.PathLike) -> "MetaClassifierHead":
        """The head whose weights and config are these two files (e.g. both downloaded from a Hub repo).

        Either unreadable, empty, truncated or of another head: :class:`~hf_safe_exit.errors.CorruptFileError`.
        """
        raw = read_json_object(config_path, what="a meta-head config", fix=_HEAD_FIX)
        try:
            head = cls(MetaHeadConfig(**raw))
        except (TypeError, ValueError, RuntimeError) as err:
            raise CorruptFileError.about(config_path, f"not a meta-head config ({type(err).__name__}: {err})",
                                         _HEAD_FIX) from None
        try:
            state = load_file(weights)
        except Exception as err:  # safetensors raises its own error type for empty, truncated or foreign files
            raise CorruptFileError.about(weights, f"not readable as safetensors weights ({err})", _HEAD_FIX) from None
        _check_dtypes(state, weights)
        try:
            head.load_state_dict(state)
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0]
            raise CorruptFileError.about(weights, f"these weights are not those of the head {raw} describes ({first})",
                                         _HEAD_FIX) from None
        bad = sorted(name for name, value in state.items() if not torch.isfinite(value).all())
        if bad:  # a head that outputs NaN exits nowhere or everywhere, never as calibrated
            raise CorruptFileError.about(weights, f"{bad} hold NaN or infinite values", _HEAD_FIX)
        head.source = os.fspath(weights)
        return head.eval()


def _check_dtypes(state: dict, weights) -> None:
    """Refuse weights that are not floating point (an int head is not a trained one), or of several dtypes (one head
    has one; :meth:`MetaClassifierHead.save_pretrained` writes them so, in the dtype the head had: float32, or the
    model's when it was saved with a model cast to half precision). Weights of one floating dtype are cast to the
    head's float32 on load (and by :func:`find_meta_head` to the model's dtype); a calibration records the head's
    fingerprint (:func:`hf_safe_exit.meta_head_fingerprint`), so a half-precision copy of a float32 head, whose
    values differ, is refused by the calibrations made with the original."""
    dtypes = {name: value.dtype for name, value in state.items()}
    ints = sorted(name for name, dtype in dtypes.items() if not dtype.is_floating_point)
    if ints:
        raise CorruptFileError.about(weights, f"{ints} are not floating-point weights "
                                     f"({', '.join(str(dtypes[n]).removeprefix('torch.') for n in ints)})", _HEAD_FIX)
    if len(set(dtypes.values())) > 1:
        found = ", ".join(f"{n}: {str(d).removeprefix('torch.')}" for n, d in sorted(dtypes.items()))
        raise CorruptFileError.about(weights, f"its weights are of several dtypes ({found}), while one head's are of "
                                     "one: the file was edited or put together from two heads", _HEAD_FIX)


_HEAD_FIX = ("Save the head again with MetaClassifierHead.save_pretrained(dir) (train one with "
             "hf_safe_exit.training.train_meta_classifier), or remove both meta_head files and use another measure")


def _half_head(missing: str, present: str) -> CorruptFileError:
    return CorruptFileError.about(missing, f"missing, while {os.path.basename(present)} is there: half a "
                                  "meta-classifier head", _HEAD_FIX)


def _local_head_files(directory) -> tuple[str, str] | None:
    """(weights, config) of the head saved in ``directory``; None when neither file is there; half a head raises."""
    files = os.path.join(directory, META_WEIGHTS_NAME), os.path.join(directory, META_CONFIG_NAME)
    present = [f for f in files if os.path.isfile(f)]
    if len(present) == 1:
        raise _half_head(files[1] if present[0] == files[0] else files[0], present[0])
    return files if present else None


def _saved_head_files(path: str, revision: str | None = None) -> tuple[str, str] | None:
    """(weights, config) of the head saved with the model loaded from ``path``, a local folder or a Hub repo id
    (looked up at ``revision``, e.g. :func:`~hf_safe_exit.hub_files.loaded_revision` of the model; None: the repo's
    default branch); None when it has neither file. Half a head raises ``CorruptFileError``; a Hub repo that could
    not be asked, ``HubFileError`` (both, rather than "no head": ``measure="auto"`` must not fall back silently)."""
    if not path:
        return None  # built in memory: nothing saved with it
    if os.path.isdir(path):
        return _local_head_files(path)
    try:
        found = [hub_file(path, name, revision=revision) for name in (META_WEIGHTS_NAME, META_CONFIG_NAME)]
    except HubFileError as err:  # say how to decode without asking the Hub
        from . import HEAD_FREE_DEFAULT  # the package, initialised by now (it imports this module first)

        raise err.with_fix(f"Or name the measure (e.g. measure='{HEAD_FREE_DEFAULT}'): measure='auto' and 'meta' look "
                           "for the model's meta head") from None
    if not any(found):
        return None
    if not all(found):
        names = (META_WEIGHTS_NAME, META_CONFIG_NAME)
        missing, present = (names[0], names[1]) if found[0] is None else (names[1], names[0])
        raise _half_head(hub_path(path, missing, revision), present)
    return found[0], found[1]


def find_meta_head(model) -> MetaClassifierHead:
    """The meta head attached to ``model`` (``model.meta_head``), else the one saved with its weights: in the folder
    it was loaded from, or in its Hub repo (``from_pretrained("user/repo")``: both files downloaded, see
    :mod:`hf_safe_exit.hub_files`). The head found is attached as ``model.meta_head``.

    Raises :class:`~hf_safe_exit.errors.MissingMetaHeadError` only when the model has no head at all; half a head
    or unreadable files raise ``CorruptFileError``, a Hub repo that could not be asked ``HubFileError``.
    """
    head = getattr(model, "meta_head", None)
    if isinstance(head, MetaClassifierHead):
        return head
    path = os.fspath(getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "") or "")
    files = _saved_head_files(path, loaded_revision(model))  # the head of the commit the weights came from
    if files is not None:
        head = MetaClassifierHead.from_files(*files)
        param = next(model.parameters())
        head.to(device=param.device, dtype=param.dtype)
        model.meta_head = head
        return head
    raise MissingMetaHeadError(
        f"measure='meta' needs a trained meta-classifier head, but {type(model).__name__} "
        f"({f'loaded from {path}' if path else 'built in memory'}) has none: set model.meta_head = "
        "MetaClassifierHead.from_pretrained(dir), or train one with hf_safe_exit.training.train_meta_classifier, "
        "or use measure='softmax'."
    )


class MetaConfidence(ConfidenceMeasure):
    """Confidence = the meta-classifier's probability that the current layer agrees with the last."""

    name = "meta"
    needs_logits = False

    def __init__(self, head: MetaClassifierHead | None = None):
        self.head = head

    def bind(self, model) -> "MetaConfidence":
        head = self.head if self.head is not None else find_meta_head(model)
        where = getattr(head, "source", None)
        if head.config.d_model != model.config.d_model:
            problem = (f"a meta head of width d_model={head.config.d_model}, while {type(model).__name__} has "
                       f"d_model={model.config.d_model}: it was trained for another model")
            fix = "Train one for this model with hf_safe_exit.training.train_meta_classifier, or use measure='softmax'"
            raise MissingMetaHeadError.about(where, problem, fix) if where else MissingMetaHeadError(
                f"The attached model.meta_head is {problem}. {fix}.")
        if where is None and not all(bool(torch.isfinite(p).all()) for p in head.parameters()):
            raise MissingMetaHeadError("The attached model.meta_head has NaN or infinite weights: its confidences "
                                       "would not be probabilities. Attach a trained head, or use measure='softmax'.")
        return MetaConfidence(head)

    def __call__(self, view: LayerView) -> torch.Tensor:
        if self.head is None:
            raise MissingMetaHeadError("MetaConfidence used before bind(model): no head attached.")
        return self.head.prob_agree(view.normed)
