"""Risk control of BiLD's rollback threshold through the calibration runner, RiskControlled and the CLI.

Tiny random T5 pairs over a word-level tokenizer and real CNN/DM examples from ../shared/data.
References are independent of the runner: HF's stock greedy ``generate`` of each model alone,
the task's own metric, a hand-written CRC scan, and counting (one verification pass per example
when the small model drafts the whole output).
"""

import copy
import json
import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, T5ForConditionalGeneration

import hf_safe_exit
from collect_helpers import interrupted_after
from hf_safe_exit.calibration import StateMismatchError, collect, default_bild_lambdas
from hf_safe_exit.cli import main
from hf_safe_exit.compat import cache_kwargs
from hf_safe_exit.decoding.bild import BiLD, bild_policy_factory, lambda_to_rollback
from hf_safe_exit.decoding.early_exit_loop import new_decoder_cache
from hf_safe_exit.fingerprint import model_fingerprint
from hf_safe_exit.risk import LossTable, RiskControlled
from hf_safe_exit.tasks import get_task, load_split, shared_data_dir

from cli_lines import one_error_line
from tiny_calibration import build_tiny_t5, save_tiny_t5, tiny_cnndm

DATA = shared_data_dir()
pytestmark = [pytest.mark.skipif(DATA is None, reason="offline data folder ../shared/data (or $HF_SAFE_EXIT_DATA) "
                                                     "is absent"),
              pytest.mark.usefixtures("one_thread")]

LAMBDAS = [0.0, math.exp(-3.0), math.exp(-1.0), 0.9, 1.0]
MAX_NEW, MAX_IN = 8, 40
COMMON = dict(lambdas=LAMBDAS, batch_size=3, max_new_tokens=MAX_NEW, max_input_length=MAX_IN, progress=False)



def small_from(large, noise: float = 0.0, seed: int = 1):
    """A 2-decoder-layer drafter: the large model's encoder and first decoder layers (+ noise)."""
    cfg = copy.deepcopy(large.config)
    cfg.num_decoder_layers = 2
    small = T5ForConditionalGeneration(cfg).eval()
    small.load_state_dict(large.state_dict(), strict=False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in small.parameters():
            p.add_(noise * p.std() * torch.randn(p.shape, generator=gen))
    return small


@pytest.fixture(scope="module")
def setup():
    task, rows, tokenizer, large = tiny_cnndm(6, DATA, seed=0, num_decoder_layers=3)
    return task, rows, tokenizer, large, small_from(large)


@pytest.fixture(scope="module")
def table_run(setup, tmp_path_factory):
    """One BiLD collect (fallback 0: the small model drafts until rolled back) with its state directory."""
    task, rows, tokenizer, large, small = setup
    path = tmp_path_factory.mktemp("bild") / "bild.npz"
    table = collect(large, tokenizer, task, rows, output=path, state_dir=_state_dir(path), metadata={"note": "test"},
                    policy_factory=bild_policy_factory(small, fallback=0.0), **COMMON)
    return table, path


def _state_dir(path):
    """A state directory named by the caller, which collect keeps (its default one goes once the file is written)."""
    return path.parent / (path.name + ".cells")


def stock_greedy(model, tokenizer, prompt):
    """HF's own greedy generate of one model alone: (text, number of generated tokens)."""
    enc = tokenizer([prompt], return_tensors="pt", truncation=True, max_length=MAX_IN)
    cache = new_decoder_cache(model)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=MAX_NEW, do_sample=False, num_beams=1, **cache_kwargs(cache))
    return tokenizer.decode(out[0], skip_special_tokens=True).strip(), out.shape[1] - 1


def cell_predictions(path, k):
    """The runner's decoded texts at lambdas[k], by example id, from its state directory."""
    preds = {}
    for file in _state_dir(path).glob("cells-*.jsonl"):
        for line in file.read_text().splitlines():
            cell = json.loads(line)
            if cell["k"] == k:
                preds.update(zip(cell["ids"], cell["predictions"]))
    return preds


def crc_by_hand(lambdas, losses, eps, upper):
    """The CRC rule written out: scan λ from 1 down, keep the last λ with n/(n+1)·R̂ + B/(n+1) ≤ ε."""
    n = losses.shape[1]
    best = 1.0
    for k in np.argsort(lambdas)[::-1]:
        if n / (n + 1) * losses[k].mean() + upper / (n + 1) > eps:
            break
        best = float(lambdas[k])
    return best


def test_default_bild_grid_maps_rollbacks():
    grid = default_bild_lambdas()
    assert grid[0] == 0.0 and grid[-1] == 1.0 and np.all(np.diff(grid) > 0)
    assert lambda_to_rollback(grid[0]) == math.inf and lambda_to_rollback(grid[-1]) == 0.0
    assert any(abs(lambda_to_rollback(x) - 3.0) < 1e-12 for x in grid)  # the paper's default range is covered


def test_results_file_shapes_and_the_large_model_row(setup, table_run):
    task, rows, tokenizer, large, small = setup
    table, path = table_run
    loaded = LossTable.load(path)
    K, n = len(LAMBDAS), len(rows)
    np.testing.assert_array_equal(loaded.lambdas, LAMBDAS)
    assert set(loaded.losses) == {"performance_gap", "performance_gap_bounded", "consistency"}
    for name, arr in loaded.losses.items():
        assert arr.shape == (K, n), name
        np.testing.assert_array_equal(arr, table.losses[name])
    assert set(loaded.extras) == {"task_loss", "large_calls_per_token", "num_tokens", "example_time", "wall_time"}
    for name in ("task_loss", "large_calls_per_token", "num_tokens", "example_time"):
        assert loaded.extras[name].shape == (K, n), name
    assert loaded.extras["num_tokens"].dtype == np.int64
    assert loaded.extras["wall_time"].shape == (K,) and np.all(loaded.extras["wall_time"] > 0)
    meta = loaded.metadata
    assert meta["strategy"] == "bild" and meta["task"] == "cnndm" and meta["note"] == "test"
    assert meta["model_fingerprint"] == model_fingerprint(large)
    assert meta["policy"]["small_model"] == model_fingerprint(small)
    assert meta["policy"]["fallback"] == 0.0 and meta["policy"]["max_draft_len"] == 10
    assert meta["policy"]["lambda"] == 1.0 and meta["policy"]["rollback"] == 0.0
    assert meta["rollbacks"][0] == "inf" and meta["rollbacks"][1:] == pytest.approx([3.0, 1.0, -math.log(0.9), 0.0])
    assert "measure" not in meta and "mean_exit_layer" not in loaded.extras
    assert meta["lambdas"] == LAMBDAS and meta["example_ids"] == rows["id"]

    full, none = LAMBDAS.index(1.0), LAMBDAS.index(0.0)
    # λ = 1 (rollback 0): every performance-gap and consistency loss is exactly 0 ...
    for name in loaded.losses:
        assert np.all(loaded.losses[name][full] == 0.0), name
    np.testing.assert_allclose(loaded.losses["performance_gap"],
                               loaded.extras["task_loss"] - loaded.extras["task_loss"][full])
    # ... because the predictions are the large model's greedy output (HF's stock generate)
    at_full, at_none = cell_predictions(path, full), cell_predictions(path, none)
    for j, row in enumerate(rows):
        large_text, large_len = stock_greedy(large, tokenizer, task.prompt(row))
        small_text, small_len = stock_greedy(small, tokenizer, task.prompt(row))
        assert at_full[row["id"]] == large_text
        assert loaded.extras["task_loss"][full, j] == pytest.approx(task.loss(large_text, task.reference(row)),
                                                                    abs=1e-12)
        assert loaded.extras["num_tokens"][full, j] == large_len
        # λ = 0 (rollback ∞) with fallback 0 is the small model's greedy output, verified in one large pass
        assert at_none[row["id"]] == small_text
        assert loaded.extras["num_tokens"][none, j] == small_len
        assert loaded.extras["large_calls_per_token"][none, j] == pytest.approx(1.0 / small_len)
        assert loaded.losses["consistency"][none, j] == pytest.approx(task.consistency_loss(small_text, large_text))
    assert np.any(loaded.losses["consistency"][none] > 0)  # this pair disagrees somewhere: the grid matters
    assert np.all(loaded.extras["large_calls_per_token"] <= 1.0 + 1e-12)


def test_risk_controlled_gives_the_calibrated_bild_policy(setup, table_run, tmp_path):
    task, rows, tokenizer, large, small = setup
    table, path = table_run
    risk = table.losses["consistency"]
    n = table.n
    # an ε between the CRC-adjusted risks of the grid, so that λ̂ is neither 0 nor 1
    adjusted = sorted({n / (n + 1) * risk[k].mean() + 1 / (n + 1) for k in range(len(LAMBDAS))})
    eps = float(np.mean(adjusted[-2:])) if len(adjusted) > 2 else float(adjusted[-1]) + 1e-6
    rc = RiskControlled(eps, risk="consistency", small_model=small).fit_table(table)
    assert rc.threshold == crc_by_hand(table.lambdas, risk, eps, upper=1.0)
    assert 0.0 < rc.threshold < 1.0  # a finite, positive rollback threshold
    assert rc.is_bild and rc.certificate.model_fingerprint == model_fingerprint(large)

    policy = rc.bild()
    assert isinstance(policy, BiLD) and policy.small_model is small
    assert policy.rollback == lambda_to_rollback(rc.threshold)
    assert policy.fallback == 0.0 and policy.max_draft_len == 10
    assert rc.resolve(large) == policy

    # generate(early_exit=rc) decodes with that policy: the same texts as the table's λ̂ row
    k_hat = LAMBDAS.index(rc.threshold)
    expected = cell_predictions(path, k_hat)
    model = hf_safe_exit.enable(large)
    for start in range(0, n, 3):  # the runner's batches
        batch = rows.select(range(start, min(start + 3, n)))
        enc = tokenizer([task.prompt(r) for r in batch], return_tensors="pt", padding=True, truncation=True,
                        max_length=MAX_IN)
        with torch.no_grad():
            out = model.generate(**enc, early_exit=rc, max_new_tokens=MAX_NEW, do_sample=False)
            again = model.generate(**enc, early_exit=policy, max_new_tokens=MAX_NEW, do_sample=False)
        torch.testing.assert_close(out, again, rtol=0, atol=0)
        texts = [t.strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True)]
        assert texts == [expected[i] for i in batch["id"]]

    # saved and reloaded, the calibration still gives the same policy
    rc.save_pretrained(tmp_path)
    reloaded = RiskControlled.from_pretrained(tmp_path)
    assert reloaded.threshold == rc.threshold and reloaded.bild(small).rollback == policy.rollback

    # the risk at λ = 1 is 0, so a loose ε allows everything the grid has: rollback ∞ (accept all drafts)
    loose = RiskControlled(0.999, risk="consistency", small_model=small).fit_table(table)
    assert loose.threshold == 0.0 and loose.bild().rollback == math.inf


def test_held_out_evaluation_of_a_bild_table(table_run):
    from hf_safe_exit.calibration.evaluate import evaluate_table, format_table

    table, _ = table_run
    n, n_cal, repeats, eps = table.n, 3, 4, 0.6
    result = evaluate_table(table, eps=[eps], methods=["crc"], risk="consistency", n_cal=n_cal, repeats=repeats)
    (row,) = result["results"]
    # the same splits by hand: λ̂ by the CRC scan on the calibration part, risk and cost on the rest
    rng = np.random.default_rng(0)
    risks, calls = [], []
    for perm in [rng.permutation(n) for _ in range(repeats)]:
        cal, test = perm[:n_cal], perm[n_cal:]
        k = LAMBDAS.index(crc_by_hand(table.lambdas, table.losses["consistency"][:, cal], eps, upper=1.0))
        risks.append(table.losses["consistency"][k, test].mean())
        calls.append(table.extras["large_calls_per_token"][k, test].mean())
    assert row["test_risk_mean"] == pytest.approx(np.mean(risks))
    assert row["large_calls_per_token"] == pytest.approx(np.mean(calls))
    assert "mean_exit_layer" not in row and result["metadata"]["strategy"] == "bild"
    assert "large/tok" in format_table(result)


def test_bild_calibration_errors(setup, table_run):
    task, rows, tokenizer, large, small = setup
    table, _ = table_run
    rc = RiskControlled(0.5, risk="consistency").fit_table(table)
    with pytest.raises(ValueError, match="small \\(draft\\) model"):
        rc.bild()
    with pytest.raises(ValueError, match="small \\(draft\\) model"):
        rc.resolve(large)
    other_small = small_from(large, noise=0.3, seed=7)
    with pytest.raises(ValueError, match="another small model"):
        rc.bild(other_small)
    other_large = build_tiny_t5(large.config.vocab_size, seed=5, num_decoder_layers=3)
    with pytest.raises(ValueError, match="another model"):
        RiskControlled(0.5, risk="consistency", small_model=small).fit_table(table).resolve(other_large)
    with pytest.raises(ValueError, match="BiLD's rollback threshold, but an early-exit config= was given"):
        RiskControlled(0.5, config=hf_safe_exit.EarlyExitConfig(measure="softmax")).fit_table(table)
    # an early-exit calibration is not a BiLD one, and keeps binding to EarlyExit
    ee = collect(large, tokenizer, task, rows.select(range(2)), lambdas=[0.5, 1.0], batch_size=2, max_new_tokens=3,
                 max_input_length=MAX_IN, progress=False)
    ee_rc = RiskControlled(0.5).fit_table(ee)
    assert not ee_rc.is_bild and not hasattr(ee_rc, "decode")
    assert isinstance(ee_rc.resolve(large), hf_safe_exit.EarlyExit)
    with pytest.raises(ValueError, match="not for BiLD"):
        ee_rc.bild(small)


def test_resume_checks_the_bild_settings(setup, tmp_path):
    task, rows, tokenizer, large, small = setup
    rows = rows.select(range(4))
    kwargs = dict(lambdas=[0.0, 0.5, 1.0], batch_size=2, max_new_tokens=4, max_input_length=MAX_IN, progress=False)
    out = tmp_path / "r.npz"
    with pytest.raises(KeyboardInterrupt), interrupted_after(2):
        collect(large, tokenizer, task, rows, output=out, state_dir=_state_dir(out), 
                policy_factory=bild_policy_factory(small, fallback=0.3), **kwargs)
    resumed = collect(large, tokenizer, task, rows, output=out, state_dir=_state_dir(out),
                      policy_factory=bild_policy_factory(small, fallback=0.3), **kwargs)
    fresh = collect(large, tokenizer, task, rows, policy_factory=bild_policy_factory(small, fallback=0.3), **kwargs)
    for name in resumed.losses:
        np.testing.assert_array_equal(resumed.losses[name], fresh.losses[name])
    for name in ("large_calls_per_token", "num_tokens", "task_loss"):
        np.testing.assert_array_equal(resumed.extras[name], fresh.extras[name])
    with pytest.raises(StateMismatchError, match="policy"):
        collect(large, tokenizer, task, rows, output=out, state_dir=_state_dir(out),
                policy_factory=bild_policy_factory(small, fallback=0.6), **kwargs)
    with pytest.raises(ValueError, match="policy_description"):
        collect(large, tokenizer, task, rows, policy_factory=lambda lam: hf_safe_exit.EarlyExit(threshold=lam),
                **kwargs)


# ------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A large tiny model directory and a small one built from it (same tokenizer)."""
    root = tmp_path_factory.mktemp("cli_bild")
    task = get_task("cnndm")
    texts = [task.prompt(r) + " " + r["highlights"] for r in load_split(task, "pool", path=DATA).select(range(30))]
    large_dir = save_tiny_t5(root / "large", texts, seed=0)
    large = AutoModelForSeq2SeqLM.from_pretrained(large_dir)
    small_dir = root / "small"
    small_from(large).save_pretrained(small_dir)
    AutoTokenizer.from_pretrained(large_dir).save_pretrained(small_dir)
    other_dir = save_tiny_t5(root / "other", texts[:3], seed=1)  # another (smaller) vocabulary
    return root, large_dir, str(small_dir), other_dir


CLI = ["--task", "cnndm", "--n", "3", "--lambdas", "0,0.5,1", "--batch-size", "3", "--max-new-tokens", "5",
       "--max-input-length", "40", "--no-progress"]


def test_cli_collect_strategy_bild_then_calibrate(model_dirs, capsys, tmp_path):
    root, large_dir, small_dir, _ = model_dirs
    results = tmp_path / "bild.npz"
    assert main(["collect", "--strategy", "bild", "--model", large_dir, "--small-model", small_dir,
                 "--fallback", "0.2", "--max-draft-len", "4", "--data", str(DATA), "--output", str(results), *CLI]) == 0
    out = capsys.readouterr().out
    assert "large/tok" in out and "rollback" in out and "3 examples × 3 thresholds" in out
    table = LossTable.load(results)
    small = AutoModelForSeq2SeqLM.from_pretrained(small_dir)
    large = AutoModelForSeq2SeqLM.from_pretrained(large_dir)
    assert table.metadata["strategy"] == "bild" and table.metadata["small_model_path"] == small_dir
    assert table.metadata["policy"]["small_model"] == model_fingerprint(small)
    assert table.metadata["model_fingerprint"] == model_fingerprint(large)
    assert table.metadata["policy"]["fallback"] == 0.2 and table.metadata["policy"]["max_draft_len"] == 4
    assert table.losses["performance_gap"].shape == (3, 3) and table.extras["large_calls_per_token"].shape == (3, 3)
    assert np.all(table.losses["consistency"][2] == 0.0)

    rc_dir = tmp_path / "rc"
    assert main(["calibrate", "--results", str(results), "--eps", "0.5", "--risk", "consistency",
                 "--model", large_dir, "--output", str(rc_dir)]) == 0
    policy = RiskControlled.from_pretrained(rc_dir).bild(small)
    assert policy.fallback == 0.2 and policy.max_draft_len == 4
    assert policy.rollback == lambda_to_rollback(RiskControlled.from_pretrained(rc_dir).threshold)

    evaluation = tmp_path / "eval.json"
    assert main(["evaluate", "--results", str(results), "--eps", "0.5", "--methods", "crc", "--repeats", "3",
                 "--risk", "consistency", "--output", str(evaluation)]) == 0
    assert "large/tok" in capsys.readouterr().out
    assert json.loads(evaluation.read_text())["results"][0]["large_calls_per_token"] > 0
    # plot draws BiLD's cost (large-model calls per token) instead of exit layers
    assert main(["plot", "--evaluation", str(evaluation), "--output-dir", str(tmp_path / "figs")]) == 0
    assert sorted(p.name for p in (tmp_path / "figs").glob("*.png")) == [
        "large_calls_vs_eps.png", "risk_vs_eps.png", "speedup_vs_eps.png"]


def test_cli_collect_bild_bad_input(model_dirs, capsys, tmp_path):
    root, large_dir, small_dir, other_dir = model_dirs
    base = ["collect", "--model", large_dir, "--data", str(DATA), "--output", str(tmp_path / "x.npz"), *CLI]
    line = one_error_line(capsys, base + ["--strategy", "bild"])
    assert "--small-model" in line
    line = one_error_line(capsys, base + ["--small-model", small_dir])
    assert "--strategy bild" in line
    line = one_error_line(capsys, base + ["--strategy", "bild", "--small-model", other_dir])
    assert "mismatched" in line  # other vocabulary: the tokenizers (or vocabulary sizes) differ
    line = one_error_line(capsys, base + ["--strategy", "bild", "--small-model", small_dir, "--fallback", "1.5"])
    assert "fallback" in line
    assert not (tmp_path / "x.npz").exists()
