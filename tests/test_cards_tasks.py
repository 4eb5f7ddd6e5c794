"""One guarantee section and one set of model-index results per calibration task, each task's calibration in
its own folder (where the demo finds it), old single-section cards migrated, and model-index metadata that names
only real dataset splits."""

from __future__ import annotations

from huggingface_hub import ModelCard

from hf_safe_exit import RiskControlled, model_fingerprint
from hf_safe_exit.calibration.evaluate import evaluate_table
from hf_safe_exit.cards import SECTION_END, SECTION_START, calibration_directory, write_guarantee_card

from card_helpers import calibrated, squad_table  # noqa: F401, F811 (fixtures)
from card_helpers import (CNNDM_END, CNNDM_START, SQUAD_END, SQUAD_START, USER_CARD, check_numbers, results_by_dataset,
                          section, synthetic_table, yaml_header)


def test_one_guarantee_section_per_task(calibrated, squad_table, tmp_path):
    _, _, table = calibrated
    (tmp_path / "README.md").write_text(USER_CARD, encoding="utf-8")
    cnndm = RiskControlled(eps=0.1, delta=0.1, method="ucb").fit_table(table)
    squad = RiskControlled(eps=0.15, delta=0.1, method="ucb").fit_table(squad_table)
    assert cnndm.certificate.threshold != squad.certificate.threshold
    assert cnndm.certificate.n != squad.certificate.n
    write_guarantee_card(tmp_path, cnndm, test_results={"test_risk": 0.071, "n_test": 100},
                         efficiency={"mean_exit_layer": 3.5, "speedup": 1.4}, calibration_split="pool")
    path = write_guarantee_card(tmp_path, squad, test_results={"test_risk": 0.093, "n_test": 80},
                                efficiency={"mean_exit_layer": 2.5, "speedup": 1.9}, calibration_split="pool")

    # --- YAML: valid; both tasks' results and the user's own
    meta = yaml_header(path.read_text(encoding="utf-8"))
    assert meta["license"] == "apache-2.0" and len(meta["model-index"]) == 1
    card = ModelCard.load(path)
    ours = results_by_dataset(card)
    cnn, sq = "abisee/cnn_dailymail", "rajpurkar/squad"
    assert ours[(cnn, "early_exit_threshold")] == cnndm.certificate.threshold
    assert ours[(cnn, "early_exit_risk_bound")] == cnndm.certificate.risk_bound
    assert ours[(cnn, "early_exit_test_risk")] == 0.071 and ours[(cnn, "early_exit_speedup")] == 1.4
    assert ours[(sq, "early_exit_threshold")] == squad.certificate.threshold
    assert ours[(sq, "early_exit_calibration_risk")] == squad.certificate.empirical_risk
    assert ours[(sq, "early_exit_test_risk")] == 0.093 and ours[(sq, "early_exit_speedup")] == 1.9
    assert len(ours) == 2 * 6  # six metric types per task (no layer fraction given), nothing duplicated
    assert {r.task_type for r in card.data.eval_results if r.dataset_type == sq} == {"question-answering"}
    assert [r.metric_value for r in card.data.eval_results if r.metric_type == "rougeL"] == [0.25]

    # --- text: both sections, each with its own heading and numbers, cnndm's first; the user's text kept
    text = card.text
    cnndm_section, squad_section = section(text, CNNDM_START, CNNDM_END), section(text, SQUAD_START, SQUAD_END)
    assert text.index(CNNDM_END) < text.index(SQUAD_START)
    assert "## Early exit with a risk guarantee: CNN/DailyMail summarisation (ROUGE-L)" in cnndm_section
    assert "## Early exit with a risk guarantee: SQuAD v1.1 question answering (F1)" in squad_section
    check_numbers(cnndm_section, cnndm)
    check_numbers(squad_section, squad)
    assert "**1.40×**" in cnndm_section and "**1.90×**" in squad_section
    assert "Some words the user wrote about the model." in text and "## Limitations" in text

    # --- re-writing cnndm with another ε replaces only cnndm's section and results
    cnndm2 = RiskControlled(eps=0.2, delta=0.1, method="ucb").fit_table(table)
    assert cnndm2.certificate.threshold != cnndm.certificate.threshold
    write_guarantee_card(tmp_path, cnndm2, overwrite=True)
    card2 = ModelCard.load(path)
    text2 = card2.text
    assert text2.count("<!-- hf_safe_exit:guarantee:") == 4  # two sections, start and end markers each
    check_numbers(section(text2, CNNDM_START, CNNDM_END), cnndm2)
    assert "ε = 0.1 " not in section(text2, CNNDM_START, CNNDM_END)
    assert section(text2, SQUAD_START, SQUAD_END) == squad_section  # untouched, byte for byte
    assert text2.index(CNNDM_END) < text2.index(SQUAD_START)  # replaced in place
    ours2 = results_by_dataset(card2)
    assert ours2[(cnn, "early_exit_threshold")] == cnndm2.certificate.threshold
    assert (cnn, "early_exit_test_risk") not in ours2  # the old λ̂'s test risk is not kept with the new λ̂
    assert {k: v for k, v in ours2.items() if k[0] == sq} == {k: v for k, v in ours.items() if k[0] == sq}
    assert [r.metric_value for r in card2.data.eval_results if r.metric_type == "rougeL"] == [0.25]
    yaml_header(path.read_text(encoding="utf-8"))


def _old_format(text: str) -> str:
    """A card as written before sections carried a task: generic markers and heading."""
    return (text.replace(CNNDM_START, SECTION_START).replace(CNNDM_END, SECTION_END)
            .replace("## Early exit with a risk guarantee: CNN/DailyMail summarisation (ROUGE-L)",
                     "## Early exit with a risk guarantee"))


def test_old_card_with_a_generic_section_migrates(calibrated, squad_table, tmp_path):
    _, _, table = calibrated
    cnndm = RiskControlled(eps=0.1, delta=0.1, method="ucb").fit_table(table)
    path = write_guarantee_card(tmp_path, cnndm, model_name="m")
    path.write_text(_old_format(path.read_text(encoding="utf-8")) + "\n## Citation\n\nsomething\n", encoding="utf-8")
    assert SECTION_START in path.read_text(encoding="utf-8") and CNNDM_START not in path.read_text(encoding="utf-8")

    cnndm2 = RiskControlled(eps=0.2, delta=0.1, method="ucb").fit_table(table)
    write_guarantee_card(tmp_path, cnndm2, overwrite=True)  # the generic section becomes cnndm's, in place
    text = ModelCard.load(path).text
    assert SECTION_START not in text and SECTION_END not in text
    check_numbers(section(text, CNNDM_START, CNNDM_END), cnndm2)
    assert text.index(CNNDM_END) < text.index("## Citation")

    squad = RiskControlled(eps=0.15, delta=0.1, method="ucb").fit_table(squad_table)
    write_guarantee_card(tmp_path, squad)  # a new section right after the other guarantee sections
    card = ModelCard.load(path)
    assert card.text.index(CNNDM_END) < card.text.index(SQUAD_START) < card.text.index("## Citation")
    check_numbers(section(card.text, SQUAD_START, SQUAD_END), squad)
    assert {r.dataset_type for r in card.data.eval_results} == {"abisee/cnn_dailymail", "rajpurkar/squad"}

    # an old card is replaced by whichever task writes first (its task is not in its markers)
    path.write_text(_old_format(path.read_text(encoding="utf-8").split(SQUAD_START)[0]), encoding="utf-8")
    write_guarantee_card(tmp_path, squad)
    text = ModelCard.load(path).text
    assert SECTION_START not in text and CNNDM_START not in text and text.count(SQUAD_START) == 1


def test_certificate_without_a_task_keeps_the_generic_markers(calibrated, tmp_path):
    model, _, _ = calibrated
    rc = RiskControlled(eps=0.1, method="crc").fit_table(synthetic_table(model_fingerprint(model), None))
    assert rc.certificate.task is None
    path = write_guarantee_card(tmp_path, rc, model_name="m")
    text = ModelCard.load(path).text
    assert text.count(SECTION_START) == 1 and text.count(SECTION_END) == 1
    assert "## Early exit with a risk guarantee\n" in text
    assert (tmp_path / "risk_control.json").is_file()


def test_calibration_is_saved_where_the_demo_finds_it(calibrated, squad_table, tmp_path):
    from hf_safe_exit.demo import find_task_calibration

    _, _, table = calibrated
    cnndm = RiskControlled(eps=0.1, delta=0.1, method="ucb").fit_table(table)
    squad = RiskControlled(eps=0.15, delta=0.1, method="ucb").fit_table(squad_table)

    # a model with per-task calibration directories: each task's file goes there, none into the root
    model_dir = tmp_path / "per_task"
    for task in ("cnndm", "squad"):
        (model_dir / "calibration" / task).mkdir(parents=True)
    assert calibration_directory(model_dir, "cnndm") == model_dir / "calibration" / "cnndm"
    write_guarantee_card(model_dir, cnndm)
    path = write_guarantee_card(model_dir, squad)
    assert not (model_dir / "risk_control.json").exists()
    for task, rc in (("cnndm", cnndm), ("squad", squad)):
        loaded = RiskControlled.from_pretrained(model_dir / "calibration" / task)
        assert loaded.certificate == rc.certificate
        found, source = find_task_calibration(model_dir, task)
        assert found.certificate == rc.certificate and source.endswith(f"calibration/{task}/risk_control.json")
    text = ModelCard.load(path).text
    assert "task='cnndm'" in section(text, CNNDM_START, CNNDM_END)
    assert "task='squad'" in section(text, SQUAD_START, SQUAD_END)

    # a model folder without calibration/ yet: every task still goes to calibration/<task>/ (the one layout),
    # and a bare RiskControlled.from_pretrained(model folder) reads the primary (first stored) task's
    flat = tmp_path / "flat"
    write_guarantee_card(flat, cnndm)
    assert not (flat / "risk_control.json").exists()
    assert RiskControlled.from_pretrained(flat / "calibration" / "cnndm").certificate == cnndm.certificate
    write_guarantee_card(flat, squad)
    for task, rc in (("cnndm", cnndm), ("squad", squad)):
        assert RiskControlled.from_pretrained(flat, task=task).certificate == rc.certificate
        assert find_task_calibration(flat, task)[0].certificate == rc.certificate
    cnndm2 = RiskControlled(eps=0.2, delta=0.1, method="ucb").fit_table(table)
    write_guarantee_card(flat, cnndm2, overwrite=True)  # the same task again: replaced when asked
    assert find_task_calibration(flat, "cnndm")[0].certificate == cnndm2.certificate

    # a model with calibration/ for one task: a new task joins it there rather than the root
    mixed = tmp_path / "mixed"
    (mixed / "calibration" / "cnndm").mkdir(parents=True)
    write_guarantee_card(mixed, squad)
    assert not (mixed / "risk_control.json").exists()
    assert find_task_calibration(mixed, "squad")[0].certificate == squad.certificate

    # save_calibration=False writes nothing but the card (and names where the calibration belongs)
    bare = tmp_path / "bare"
    (bare / "calibration" / "squad").mkdir(parents=True)
    write_guarantee_card(bare, squad, save_calibration=False)
    assert sorted(p.name for p in bare.rglob("*") if p.is_file()) == ["README.md"]
    assert "task='squad'" in (bare / "README.md").read_text(encoding="utf-8")  # read from calibration/squad/


def test_plots_of_two_tasks_do_not_overwrite_each_other(calibrated, squad_table, tmp_path):
    _, _, table = calibrated
    plots = {}
    for task, colour in (("cnndm", b"cnndm"), ("squad", b"squad")):
        plots[task] = tmp_path / f"plots-{task}" / "risk_vs_eps.png"
        plots[task].parent.mkdir()
        plots[task].write_bytes(colour)  # same file name, different content
    model_dir = tmp_path / "model"
    write_guarantee_card(model_dir, RiskControlled(eps=0.1, method="crc").fit_table(table), plots=[plots["cnndm"]])
    write_guarantee_card(model_dir, RiskControlled(eps=0.1, method="crc").fit_table(squad_table),
                         plots=[plots["squad"]])
    for task in ("cnndm", "squad"):
        assert (model_dir / "hf_safe_exit_plots" / task / "risk_vs_eps.png").read_bytes() == task.encode()
    text = (model_dir / "README.md").read_text(encoding="utf-8")
    assert "(hf_safe_exit_plots/squad/risk_vs_eps.png)" in section(text, SQUAD_START, SQUAD_END)


def test_card_command_line_one_section_per_task(calibrated, squad_table, tmp_path, capsys):
    from hf_safe_exit.cli import main

    _, _, table = calibrated
    model_dir = tmp_path / "model"
    certs = {}
    for task, tab, eps in (("cnndm", table, 0.1), ("squad", squad_table, 0.15)):
        rc = RiskControlled(eps=eps, delta=0.1, method="ucb").fit_table(tab)
        rc.save_pretrained(model_dir / "calibration" / task)
        certs[task] = rc.certificate
    for task in ("cnndm", "squad"):
        assert main(["card", "--model", str(model_dir), "--calibration", str(model_dir / "calibration" / task),
                     "--split", "pool"]) == 0
        out = capsys.readouterr().out
        assert f"calibration/{task}/risk_control.json" in out and f"task '{task}'" in out
    card = ModelCard.load(model_dir / "README.md")
    check_numbers(section(card.text, CNNDM_START, CNNDM_END), RiskControlled.from_pretrained(
        model_dir / "calibration" / "cnndm"))
    check_numbers(section(card.text, SQUAD_START, SQUAD_END), RiskControlled.from_pretrained(
        model_dir / "calibration" / "squad"))
    ours = results_by_dataset(card)
    assert ours[("abisee/cnn_dailymail", "early_exit_threshold")] == certs["cnndm"].threshold
    assert ours[("rajpurkar/squad", "early_exit_threshold")] == certs["squad"].threshold
    assert not (model_dir / "risk_control.json").exists()
    for task in ("cnndm", "squad"):  # saved back where they were, unchanged
        assert RiskControlled.from_pretrained(model_dir / "calibration" / task).certificate == certs[task]


def test_model_index_names_real_splits_and_no_removed_pipeline(calibrated, squad_table, tmp_path):
    """The card's metadata as the Hub reads it: real dataset splits, and no pipeline transformers 5 removed."""
    _, _, table = calibrated
    (tmp_path / "README.md").write_text("---\npipeline_tag: text2text-generation\nlicense: mit\n---\n\n# m\n",
                                        encoding="utf-8")
    for tab in (table, squad_table):
        rc = RiskControlled(eps=0.15, delta=0.1, method="ucb").fit_table(tab)
        evaluation = evaluate_table(tab, eps=(0.15,), methods=("ucb",), delta=0.1, repeats=2)
        write_guarantee_card(tmp_path, rc, test_results=evaluation, table=tab, model_name="m")
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.pipeline_tag is None and card.data.license == "mit"
    meta = yaml_header((tmp_path / "README.md").read_text(encoding="utf-8"))
    assert "pipeline_tag" not in meta
    datasets = {(r["dataset"]["type"], r["dataset"].get("config"), r["dataset"]["split"])
                for r in meta["model-index"][0]["results"]}
    # the splits those Hub datasets really have (abisee/cnn_dailymail 3.0.0: train/validation/test;
    # rajpurkar/squad plain_text: train/validation), and the pools are cut from validation
    assert datasets == {("abisee/cnn_dailymail", "3.0.0", "validation"), ("rajpurkar/squad", "plain_text", "validation")}
    names = {r["dataset"]["name"] for r in meta["model-index"][0]["results"]}
    assert any("validation rows 500–899" in n for n in names)
    assert any("articles 36–47" in n for n in names)
