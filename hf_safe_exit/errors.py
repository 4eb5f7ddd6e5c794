"""The exceptions raised for files hf_safe_exit reads, and the helpers that raise them.

Every file the library reads (loss tables ``*.npz``, ``risk_control.json``, ``evaluation.json``,
``calibration/config.json``, collect's state folder, meta heads, policy specs stored on a generation
config, model cards) is refused with a :class:`CalibrationFileError` when it cannot be used. Its message
names the file, says what is wrong and how to fix it, in one line (the CLI prints it and exits with
status 2). Subclasses say why:

* :class:`CorruptFileError`: unreadable, empty, truncated, not the kind of file expected, or missing
  fields / with fields of the wrong shape or type;
* :class:`InconsistentCalibrationError`: readable, but it contradicts itself (λ̂ ≠ its certificate's, or
  refitting the loss table stored beside it gives another λ̂): it was edited or mixed up;
* :class:`MissingFingerprintError`: it does not say which model it was made for;
* :class:`ModelMismatchError`: it was made for another model;
* :class:`MissingCalibrationError`: there is no calibration where one was looked for (also a
  ``FileNotFoundError``);
* :class:`StateMismatchError`: collect's partial results were written with other settings;
* :class:`InvalidStoredPolicyError`: ``generation_config.early_exit`` is no valid policy spec;
* :class:`MissingMetaHeadError`: the meta measure has no usable meta-classifier head;
* :class:`HubFileError`: a file a model's Hub repo may hold could not be looked up (offline with nothing
  cached, no access, no such repo), so whether the model has it is unknown.

All are ``ValueError`` subclasses (``MissingCalibrationError`` is also a ``FileNotFoundError``), as the
earlier exceptions of the same names were. This module imports nothing heavy.
"""

from __future__ import annotations

import json
import os

__all__ = ["CalibrationFileError", "CorruptFileError", "InconsistentCalibrationError", "MissingFingerprintError",
           "ModelMismatchError", "MissingCalibrationError", "StateMismatchError", "InvalidStoredPolicyError",
           "MissingMetaHeadError", "HubFileError", "WouldOverwriteError", "RunInProgressError", "file_message", "read_json_object"]


class CalibrationFileError(ValueError):
    """A file hf_safe_exit reads cannot be used; the message names the file, the problem and the fix.

    ``path`` is the file (or folder) concerned, when there is one.
    """

    path: str | None = None

    @classmethod
    def about(cls, path, problem: str, fix: str) -> "CalibrationFileError":
        """An error of this class whose message is ``'<path>': <problem>. <fix>`` (see :func:`file_message`)."""
        err = cls(file_message(path, problem, fix))
        err.path = None if path is None else os.fspath(path)
        return err

    def with_fix(self, more: str) -> "CalibrationFileError":
        """The same error (class, file) with ``more`` (another way out) added to its message."""
        err = type(self)(f"{str(self).rstrip('. ')}. {more.rstrip('.')}.")
        err.path = self.path
        return err


class CorruptFileError(CalibrationFileError):
    """The file is unreadable, empty, truncated, of another kind, or lacks or mistypes a field."""


class InconsistentCalibrationError(CalibrationFileError):
    """The calibration contradicts itself (edited or mixed up): its λ̂, certificate and loss table disagree."""


class MissingFingerprintError(CalibrationFileError):
    """The calibration or loss table does not record the model it was made for, and no opt-out was given."""


class ModelMismatchError(CalibrationFileError):
    """A results file or calibration belongs to another model than the one given."""


class MissingCalibrationError(FileNotFoundError, CalibrationFileError):
    """No stored calibration was found for the model (or for the task asked for)."""


class StateMismatchError(CalibrationFileError):
    """The partial state directory was written with other settings than this run's."""


class InvalidStoredPolicyError(CalibrationFileError):
    """``generation_config.early_exit`` holds something that is not an early-exit policy or a spec of one."""


class MissingMetaHeadError(CalibrationFileError):
    """The meta measure was requested for a model without a (usable) trained meta-classifier head."""


class HubFileError(CalibrationFileError):
    """A file of a model's Hub repo could not be looked up, so whether the model has it is unknown."""


def file_message(path, problem: str, fix: str) -> str:
    """``'<path>': <problem>. <fix>`` in one line: the form every message of this family takes."""
    text = f"{problem.rstrip('. ')}. {fix.strip()}"
    return " ".join((text if path is None else f"'{os.fspath(path)}': {text}").split())


def read_json_object(path, *, what: str, fix: str, cls: type[CalibrationFileError] = CorruptFileError) -> dict:
    """The JSON object stored at ``path``; raises ``cls`` naming the file when it is missing, not JSON or no object.

    ``what`` names the kind of file (e.g. ``"a risk_control.json"``), ``fix`` says how to get a good one.
    A missing file raises :class:`MissingCalibrationError`.
    """
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise MissingCalibrationError.about(path, f"no such file (expected {what})", fix) from None
    except (OSError, UnicodeDecodeError) as err:
        raise cls.about(path, f"cannot be read as {what} ({type(err).__name__}: {err})", fix) from None
    if not text.strip():
        raise cls.about(path, f"the file is empty, not {what}", fix)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise cls.about(path, f"not {what}: invalid or truncated JSON ({err.msg} at line {err.lineno}, "
                        f"column {err.colno})", fix) from None
    if not isinstance(data, dict):
        raise cls.about(path, f"not {what}: it holds a JSON {type(data).__name__}, not an object", fix)
    return data


class WouldOverwriteError(FileExistsError):
    """A command or a card would replace an existing file or calibration without ``--overwrite`` (``overwrite=True``)."""


class RunInProgressError(RuntimeError):
    """Another ``collect`` run is writing the same state folder (the message names it)."""

