"""hf_safe_exit's own calls raise no deprecation notices on the installed transformers.

Representative calls (BiLD, early exit through ``generate``, the demo on the shipped model, the
training loss, greedy evaluation, a BiLD calibration run) are run while every FutureWarning,
DeprecationWarning and PendingDeprecationWarning, and every deprecation line on the
``transformers`` logger (``ModelOutput``'s ``past_key_values`` alias logs instead of warning), is
recorded with its call stack.

A notice counts as ours when its *culprit* lies in the hf_safe_exit package. The culprit is found by
walking outward from where the notice is issued: frames of installed libraries (transformers, torch,
...) and of the standard library are skipped; the first other frame is the culprit. So
``transformers``' ``@deprecate_kwarg`` on a T5 forward, which attributes its FutureWarning to a
transformers wrapper (``utils/generic.py``) rather than to us, is still blamed on the hf_safe_exit
line that passed ``past_key_values``. A notice a library raises about its own internals would be
blamed on the hf_safe_exit call that entered the library too: if that happens, add it to
``LIBRARY_INTERNAL`` with the reason, it is not ours to fix.
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
import sysconfig
import warnings

import pytest
import torch
import transformers
from transformers import T5Config, T5ForConditionalGeneration

import hf_safe_exit
from hf_safe_exit.compat import cache_kwarg

PACKAGE = os.path.dirname(os.path.abspath(hf_safe_exit.__file__)) + os.sep
STDLIB = tuple({os.path.abspath(sysconfig.get_paths()[k]) + os.sep for k in ("stdlib", "platstdlib")})
CATEGORIES = (FutureWarning, DeprecationWarning, PendingDeprecationWarning)
# (category name, message regex) of notices that transformers/torch raise about their own code.
LIBRARY_INTERNAL: list[tuple[str, str]] = []


def _is_library(filename: str) -> bool:
    path = os.path.abspath(filename)
    if "site-packages" in path or "dist-packages" in path:
        return True
    return path.startswith(STDLIB) or filename.startswith("<")  # "<frozen importlib._bootstrap>" etc.


def _culprit(frame) -> str | None:
    """``file:line`` of the first frame outward from ``frame`` that is not library code; None if none."""
    while frame is not None:
        filename = frame.f_code.co_filename
        if os.path.abspath(filename).startswith(PACKAGE):
            return f"{filename}:{frame.f_lineno}"
        if not _is_library(filename):
            return f"{filename}:{frame.f_lineno}"
        frame = frame.f_back
    return None


class DeprecationRecorder:
    """Context manager: records deprecation notices as (kind, category, reported location, culprit, message)."""

    def __init__(self):
        self.notices: list[tuple[str, str, str, str | None, str]] = []

    def _warning(self, message, category, filename, lineno, file=None, line=None):
        if issubclass(category, CATEGORIES):
            self.notices.append(("warning", category.__name__, f"{filename}:{lineno}", _culprit(sys._getframe(1)),
                                 str(message)))

    def __enter__(self):
        recorder = self

        class Handler(logging.Handler):
            def emit(self, record):
                if "deprecat" in record.getMessage().lower():
                    recorder.notices.append(("log", record.levelname, f"{record.pathname}:{record.lineno}",
                                             _culprit(sys._getframe(1)), record.getMessage()))

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("always")  # every occurrence, not once per location
        warnings.showwarning = self._warning
        self._logger = transformers.utils.logging.get_logger("transformers")
        self._handler = Handler(level=logging.WARNING)
        self._level = self._logger.level
        self._logger.addHandler(self._handler)
        self._logger.setLevel(logging.WARNING)
        transformers.utils.logging.warning_once.cache_clear()  # notices already logged once must show again
        return self

    def __exit__(self, *exc):
        self._logger.removeHandler(self._handler)
        self._logger.setLevel(self._level)
        self._catch.__exit__(*exc)
        return False

    def ours(self) -> list[tuple]:
        def internal(notice):
            return any(notice[1] == cat and re.search(rx, notice[4]) for cat, rx in LIBRARY_INTERNAL)

        return [n for n in self.notices
                if n[3] is not None and os.path.abspath(n[3].rsplit(":", 1)[0]).startswith(PACKAGE)
                and not internal(n)]


def assert_no_deprecations(fn, *args, **kwargs):
    with DeprecationRecorder() as rec:
        result = fn(*args, **kwargs)
    ours = rec.ours()
    assert not ours, "deprecation notices caused by hf_safe_exit:\n" + "\n".join(
        f"  {culprit}: {cat} {msg} (reported at {where})" for _, cat, where, culprit, msg in ours)
    return result


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_t5(num_decoder_layers: int, seed: int = 0) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=40, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=num_decoder_layers,
                   num_heads=2, decoder_start_token_id=0, eos_token_id=1, pad_token_id=0, initializer_factor=4.0)
    return T5ForConditionalGeneration(cfg).eval()


def tiny_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 40, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    return ids, mask


# ---------------------------------------------------------------------------------------------
# the recorder itself


def test_recorder_blames_hf_safe_exit_for_a_deprecated_forward_argument():
    """Negative control: code compiled as if it lived in the package, passing the deprecated name."""
    model = tiny_t5(2)
    if cache_kwarg(model) == "past_key_values":
        pytest.skip(f"transformers {transformers.__version__} has not renamed past_key_values: nothing is deprecated")
    from hf_safe_exit.decoding import new_decoder_cache

    ids, mask = tiny_batch()
    code = compile("model(input_ids=ids, decoder_input_ids=ids[:, :1], past_key_values=new_decoder_cache(model))\n",
                   os.path.join(PACKAGE, "_deprecation_probe.py"), "exec")
    with DeprecationRecorder() as rec:
        exec(code, {"model": model, "ids": ids, "new_decoder_cache": new_decoder_cache})
    ours = rec.ours()
    assert ours and all(n[3].startswith(os.path.join(PACKAGE, "_deprecation_probe.py")) for n in ours)
    assert any("past_key_values" in n[4] for n in ours)


# ---------------------------------------------------------------------------------------------
# representative hf_safe_exit calls


def test_bild_decode():
    from hf_safe_exit.decoding.bild import BiLD

    large, small = tiny_t5(4), tiny_t5(2, seed=1)
    ids, mask = tiny_batch()

    def run():
        out = BiLD(small, fallback=0.5, rollback=1.0).decode(large, input_ids=ids, attention_mask=mask,
                                                            max_new_tokens=8, return_dict_in_generate=True)
        seqs = hf_safe_exit.enable(large).generate(input_ids=ids, attention_mask=mask, max_new_tokens=8,
                                                   early_exit=BiLD(small, rollback=0.0))
        return out, seqs

    out, seqs = assert_no_deprecations(run)
    assert out.sequences.shape[0] == 2 and seqs.shape[0] == 2


def test_early_exit_generate():
    model = hf_safe_exit.enable(tiny_t5(4))
    ids, mask = tiny_batch()
    out = assert_no_deprecations(model.generate, input_ids=ids, attention_mask=mask, max_new_tokens=8,
                                 early_exit=hf_safe_exit.EarlyExit(threshold=0.5), return_dict_in_generate=True)
    assert out.exit_layers.shape == (2, out.sequences.shape[1] - 1)


def test_demo_on_the_default_model():
    from hf_safe_exit.models import default_model_available

    if not default_model_available():
        pytest.skip("the shipped default model is absent")
    results = assert_no_deprecations(hf_safe_exit.run_demo, max_new_tokens=3, repeats=1, color=False,
                                     out=io.StringIO())
    assert [r.task for r in results] == ["cnndm", "squad"]


def test_training_loss_and_meta_examples():
    from hf_safe_exit.training import calm_loss, collect_meta_examples

    model = tiny_t5(3)
    ids, mask = tiny_batch()
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(3, 40, (2, 5))}

    def run():
        calm_loss(model, batch).loss.backward()
        return collect_meta_examples(model, [batch])

    assert_no_deprecations(run)


def test_greedy_evaluation():
    from hf_safe_exit.training.evaluation import greedy_generate
    from tiny_calibration import build_tiny_t5, build_word_tokenizer

    texts = ["the council voted on tuesday to build a library .", "who voted ?"]
    tokenizer = build_word_tokenizer(texts)
    model = build_tiny_t5(len(tokenizer))  # 2 encoder / 3 decoder layers: needs the decoder-sized cache
    preds = assert_no_deprecations(greedy_generate, model, tokenizer, texts, max_source_length=16, max_new_tokens=4)
    assert len(preds) == 2


def test_bild_calibration_collect(tmp_path):
    from hf_safe_exit.calibration import collect
    from hf_safe_exit.decoding.bild import bild_policy_factory
    from hf_safe_exit.tasks import shared_data_dir
    from tiny_calibration import build_tiny_t5, tiny_cnndm

    data = shared_data_dir()
    if data is None:
        pytest.skip("offline data folder ../shared/data (or $HF_SAFE_EXIT_DATA) is absent")
    task, rows, tokenizer, large = tiny_cnndm(2, data, seed=0)
    small = build_tiny_t5(len(tokenizer), seed=1, num_decoder_layers=2)
    table = assert_no_deprecations(collect, large, tokenizer, task, rows, lambdas=[0.5, 1.0], batch_size=2,
                                   max_new_tokens=4, max_input_length=32, progress=False,
                                   policy_factory=bild_policy_factory(small))
    assert table.losses["performance_gap"].shape == (2, 2)
