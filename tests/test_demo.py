"""The demo: end to end on a tiny model with its own calibration, clear failures, and the shipped default model.

What a newcomer must see: the input before the output, the ε the demo runs at and why, and any infeasibility
warning of the fit (never swallowed).
"""

from __future__ import annotations

import io
import re
import time

import numpy as np
import pytest
import torch

from hf_safe_exit import EarlyExit, LossTable, RiskControlled, enable, model_fingerprint
from hf_safe_exit.compat import cache_kwargs
from hf_safe_exit.decoding import new_decoder_cache
from hf_safe_exit.demo import (DEMO_ARTICLE, DEMO_QUESTION, DemoError, demo_eps, find_task_calibration,
                               full_model_score, main, run_demo)
from hf_safe_exit.risk import store_calibration
from hf_safe_exit.models import default_model_available, default_model_path

from tiny_calibration import save_tiny_t5


def _calibrate(model, task: str, directory) -> RiskControlled:
    """A RiskControlled fitted on synthetic losses (a tiny random model has no meaningful ones) for ``model``."""
    rng = np.random.default_rng(1)
    lambdas = np.round(np.linspace(0.0, 1.0, 11), 10)
    gaps = np.clip((1 - lambdas)[:, None] * rng.normal(0.25, 0.1, (11, 400)), -1, 1)
    gaps[-1] = 0.0
    table = LossTable(lambdas, {"performance_gap": gaps},
                      metadata={"model_fingerprint": model_fingerprint(model), "task": task, "measure": "softmax"})
    rc = RiskControlled(eps=0.1, delta=0.1, method="ucb").fit_table(table)
    rc.save_pretrained(directory / "calibration" / task)
    return rc


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from transformers import T5ForConditionalGeneration

    d = tmp_path_factory.mktemp("tiny_demo_model")
    save_tiny_t5(d, [DEMO_ARTICLE, DEMO_QUESTION], seed=0, num_decoder_layers=4)
    model = T5ForConditionalGeneration.from_pretrained(d)
    rcs = {task: _calibrate(model, task, d) for task in ("cnndm", "squad")}
    return d, rcs


def test_demo_end_to_end_on_a_tiny_model(tiny_dir, monkeypatch):
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    d, rcs = tiny_dir
    buf = io.StringIO()
    hf_calls = []  # the demo's full-model runs: HF's own generate, spied on at the class
    hf_generate = T5ForConditionalGeneration.generate

    def spy(self, *args, **kwargs):
        start = time.perf_counter()
        out = hf_generate(self, *args, **kwargs)
        hf_calls.append((kwargs.get("min_new_tokens"), out.shape[1] - 1, time.perf_counter() - start))
        return out

    monkeypatch.setattr(T5ForConditionalGeneration, "generate", spy)
    results = run_demo(model_dir=d, max_new_tokens=12, repeats=1, color=False, out=buf)
    monkeypatch.undo()
    printed = buf.getvalue()
    assert [r.task for r in results] == ["cnndm", "squad"]
    # the input comes before its output: the article (shortened), then the question
    article_at = printed.index("Article: " + " ".join(DEMO_ARTICLE.split()[:20]))
    assert "more words; " in printed and DEMO_ARTICLE not in printed  # shortened, saying so
    question_at = printed.index(f"Question: {DEMO_QUESTION}")
    assert article_at < printed.index("Summary (cnndm)") < question_at < printed.index("Answer (squad)")
    # this folder stores only risk_control.json: the demo runs at its ε and says so
    assert printed.count("Target: ε = 0.1: the ε this calibration was stored with (no loss table") == 2
    assert [r.eps_reason.split(":")[0] for r in results] == ["ε = 0.1", "ε = 0.1"]
    model = enable(T5ForConditionalGeneration.from_pretrained(d).eval())
    tok = AutoTokenizer.from_pretrained(d)
    for r in results:
        rc = rcs[r.task]
        assert r.threshold == rc.threshold and 0.3 <= rc.threshold < 1
        assert r.guarantee in printed and "With probability at least 1 − δ = 0.9" in r.guarantee
        # independent re-run of the same early-exit decode: the demo's tokens and layers are what generate gives
        enc = tok(r.prompt, return_tensors="pt", truncation=True, max_length=512)
        ref = model.generate(**enc, max_new_tokens=12, early_exit=EarlyExit(threshold=rc.threshold, measure="softmax"),
                             return_dict_in_generate=True)
        real = ref.exit_layers[0] > 0
        assert r.exit_layers == ref.exit_layers[0][real].tolist()
        assert r.text == tok.decode(ref.sequences[0, 1:][real], skip_special_tokens=True)
        assert "".join(r.pieces) == r.text
        assert len(set(r.exit_layers)) > 1, "the threshold must make tokens exit at different layers"
        full = model.generate(**enc, max_new_tokens=12, **cache_kwargs(new_decoder_cache(model)))  # 2+4 layers
        assert r.full_text == tok.decode(full[0], skip_special_tokens=True)
        assert r.new_tokens_early == int(real.sum()) and r.new_tokens_full == int((full[0, 1:] != 0).sum())
        # like for like: the full model was timed making exactly as many tokens as early exit made
        forced = [c for c in hf_calls if c[0] == r.new_tokens_early and c[1] == r.new_tokens_early]
        assert any(c[2] <= r.time_full <= c[2] + 0.05 for c in forced)  # that run is the one it reports
        assert r.speedup == pytest.approx(r.time_full / r.time_early)
        # the plain rendering writes each token's exit layer after it
        marked = "".join(f"{p}⟨{l}⟩" if p.strip() else p for p, l in zip(r.pieces, r.exit_layers))
        assert marked in printed
    assert len(re.findall(r"Time for the same \d+ generated tokens .* speed-up \d+\.\d\d× on this input",
                          printed)) == 2


def test_demo_colours_with_rich_or_ansi(tiny_dir):
    d, _ = tiny_dir
    buf = io.StringIO()
    run_demo(text="the council voted on tuesday to build a library .", model_dir=d, max_new_tokens=6, repeats=1,
             color=True, out=buf)
    printed = buf.getvalue()
    assert "\x1b[" in printed and "38;5;" in printed  # 256-colour foreground escapes
    assert "pass --question" in printed  # own article without a question: summary only


def test_demo_missing_calibration_and_bad_input_fail_clearly(tmp_path, tiny_dir, capsys):
    save_tiny_t5(tmp_path, [DEMO_ARTICLE], seed=0)
    with pytest.raises(DemoError, match=r"no calibration for task 'cnndm'.*hf-safe-exit collect"):
        run_demo(model_dir=tmp_path, repeats=1, out=io.StringIO())
    d, _ = tiny_dir
    with pytest.raises(DemoError, match="either text or file"):
        run_demo(text="a", file="b", model_dir=d)
    with pytest.raises(DemoError, match="no file"):
        run_demo(file=tmp_path / "missing.txt", model_dir=d)
    assert main(["--model", str(tmp_path), "--no-color"]) == 2
    assert "no calibration for task 'cnndm'" in capsys.readouterr().err
    # a calibration made for another model is refused (fingerprint), not silently used
    other = tmp_path / "calibration" / "cnndm"
    import shutil
    shutil.copytree(d / "calibration" / "cnndm", other)
    shutil.copytree(d / "calibration" / "squad", tmp_path / "calibration" / "squad")
    rc, source = find_task_calibration(tmp_path, "cnndm")
    assert source.endswith("calibration/cnndm/risk_control.json")
    with pytest.raises(ValueError, match="another model"):
        run_demo(model_dir=tmp_path, repeats=1, out=io.StringIO(), max_new_tokens=4)


@pytest.mark.skipif(not default_model_available(),
                    reason=f"the default model is not installed in {default_model_path()} (trained separately)")
def test_demo_on_the_default_model_within_a_minute():
    try:
        find_task_calibration(default_model_path(), "cnndm")
        find_task_calibration(default_model_path(), "squad")
    except DemoError as exc:
        pytest.skip(f"the default model ships without a calibration: {exc}")
    torch.set_num_threads(2)
    start = time.perf_counter()
    buf = io.StringIO()
    results = run_demo(color=False, out=buf)
    elapsed = time.perf_counter() - start
    assert elapsed < 60, f"the demo took {elapsed:.1f} s"
    assert [r.task for r in results] == ["cnndm", "squad"]
    printed = buf.getvalue()
    for r in results:
        assert r.text.strip() and r.exit_layers and r.guarantee in printed
    # ε small next to what this weak model scores (README states these): CNN/DM ROUGE-L 0.076 -> ε = 0.02 (UCB:
    # λ̂ = 0.6), SQuAD F1 0.017 -> ε = 0.004 (λ̂ = 0.5), each printed with its reason before the output
    assert [(r.eps_reason.split(":")[0], r.threshold) for r in results] == [("ε = 0.02", 0.6), ("ε = 0.004", 0.5)]
    assert "Target: ε = 0.02: about a quarter of the full model's ROUGE-L of 0.076 on its 200 calibration" in printed
    assert "Target: ε = 0.004: about a quarter of the full model's F1 of 0.017 on its 600 calibration" in printed
    assert printed.index("Article: The city council of Northfield") < printed.index("Summary (cnndm)")
    assert printed.index(f"Question: {DEMO_QUESTION}") < printed.index("Answer (squad)")
    assert "trained from scratch" in printed and "weak" in printed  # the model described honestly


def test_demo_command_line(tiny_dir, capsys):
    from hf_safe_exit.cli import main as cli_main

    d, _ = tiny_dir
    assert cli_main(["demo", "--model", str(d), "--no-color", "--repeats", "1", "--max-new-tokens", "4",
                     "--text", "the council voted to build a library .", "--question", "what did the council do ?"]) == 0
    out = capsys.readouterr().out
    assert "Summary (cnndm)" in out and "Answer (squad)" in out and "Guarantee:" in out
    assert cli_main(["demo", "--text", "a", "--file", "b"]) == 2  # mutually exclusive


def _scored_table(model, task: str, full_score: float, n: int = 400, gap: float = 0.1) -> LossTable:
    """A loss table with task losses (so it records the full model's score), early exit losing ``gap``·(1 − λ)."""
    rng = np.random.default_rng(2)
    lambdas = np.round(np.linspace(0.0, 1.0, 11), 10)
    full = np.clip(rng.normal(full_score, 0.05, n), 0, 1)
    scores = np.clip(full[None, :] - gap * (1 - lambdas)[:, None] * rng.uniform(0, 2, (11, n)), 0, 1)
    scores[-1] = full
    return LossTable.from_task_losses(lambdas, 1 - scores, metadata={
        "model_fingerprint": model_fingerprint(model), "task": task, "measure": "softmax"})


@pytest.fixture(scope="module")
def scored_dir(tmp_path_factory):
    """A tiny model whose folder stores, per task, a loss table that records the full model's score."""
    from transformers import T5ForConditionalGeneration

    d = tmp_path_factory.mktemp("tiny_demo_scored")
    save_tiny_t5(d, [DEMO_ARTICLE, DEMO_QUESTION], seed=0, num_decoder_layers=4)
    model = T5ForConditionalGeneration.from_pretrained(d)
    tables = {task: _scored_table(model, task, score) for task, score in (("cnndm", 0.4), ("squad", 0.6))}
    for table in tables.values():
        store_calibration(d, table=table)
    return d, tables


def test_demo_picks_eps_from_the_full_models_score_and_says_why(scored_dir, recwarn):
    d, tables = scored_dir
    buf = io.StringIO()
    results = run_demo(model_dir=d, max_new_tokens=6, repeats=1, color=False, out=buf)
    printed = buf.getvalue()
    for r in results:
        table = tables[r.task]
        score = full_model_score(table)
        eps = float(f"{score / 4:.1g}")  # a quarter of the full model's score, one significant digit
        assert demo_eps(table, r.task)[0] == eps
        rc = RiskControlled(eps, delta=0.1, method="ucb").fit_table(table)
        assert r.threshold == rc.threshold and f"at most ε = {eps:g}" in r.guarantee
        metric = {"cnndm": "ROUGE-L", "squad": "F1"}[r.task]
        line = f"Target: ε = {eps:g}: about a quarter of the full model's {metric} of {score:.2g} on its 400"
        assert line in printed
    assert [w for w in recwarn.list if issubclass(w.category, UserWarning)] == []  # feasible: nothing to warn


def test_demo_never_swallows_the_infeasibility_warning(scored_dir, tmp_path):
    d, tables = scored_dir
    buf = io.StringIO()
    with pytest.warns(UserWarning, match=r"eps=0\.0001.*λ̂ = 1"):
        results = run_demo(model_dir=d, eps=1e-4, max_new_tokens=4, repeats=1, color=False, out=buf)
    assert all(r.threshold == 1.0 for r in results)
    assert "Target: ε = 0.0001, as asked." in buf.getvalue()
    assert "No threshold below 1 passed the test" in buf.getvalue()  # and the guarantee printed says so
    with pytest.warns(UserWarning, match="λ̂ = 1"):
        rc, _ = find_task_calibration(d, "cnndm", eps=1e-4)
    assert rc.threshold == 1.0 and not rc.certificate.feasible
    # the command line takes the same ε
    from hf_safe_exit.cli import main as cli_main

    with pytest.warns(UserWarning, match="λ̂ = 1"):
        assert cli_main(["demo", "--model", str(d), "--no-color", "--eps", "0.0001", "--max-new-tokens", "2",
                         "--text", "the council voted .", "--question", "who voted ?"]) == 0


def test_demo_eps_without_a_loss_table_is_refused(tiny_dir):
    d, _ = tiny_dir  # stores only risk_control.json (ε = 0.1): another ε needs the table
    with pytest.raises(DemoError, match=r"no loss table.*ε = 0\.02|but no loss table"):
        run_demo(model_dir=d, eps=0.02, repeats=1, out=io.StringIO())
