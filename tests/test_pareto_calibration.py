"""method="pareto" end to end: the fit is pareto_test on the same matrix (an independent call), the request and its
refusals, the certificate's file (its own checks, and the whole certificate recomputed from the table beside it), the
model's stored configuration table, and generate with the configuration chosen, bit for bit as EarlyExit at it."""

import json
import warnings

import numpy as np
import pytest
import torch

from hf_safe_exit import EarlyExit, enable, model_fingerprint
from hf_safe_exit.config import EarlyExitConfig
from hf_safe_exit.digest import with_digest
from hf_safe_exit.errors import CorruptFileError, InconsistentCalibrationError, MissingCalibrationError
from hf_safe_exit.risk import (CONFIGURATIONS_FILENAME, RISK_CONTROL_FILENAME, Calibration, ConfigurationTable,
                               LossTable, RiskCertificate, RiskControlled, RiskController, pareto_test,
                               store_calibration)
from hf_safe_exit.risk.pareto import split_examples

from toy_configurations import CONFIGS, LAMBDAS, model_table, one_run
from tiny_t5 import random_t5

pytestmark = pytest.mark.usefixtures("fresh_risk_cache")

GAP = (-1.0, 1.0)


def fitted(eps=0.2, table=None, **kwargs):  # a request fitted on a configuration table (by default, 400 examples)
    table = table if table is not None else ConfigurationTable.from_tables(one_run(n=400))
    return RiskController(eps, 0.1, method="pareto", **kwargs).fit_table(table), table


@pytest.mark.parametrize("p_value,seed,cost", [("hoeffding_bentkus", 0, None), ("wsr", 3, None),
                                               ("hoeffding_bentkus", 5, "wall_time")])
def test_the_fit_is_pareto_test_on_the_same_matrix(p_value, seed, cost):
    table = ConfigurationTable.from_tables(one_run(n=400))
    rc = RiskController(0.2, 0.1, method="pareto", p_value=p_value, seed=seed).fit_table(table, cost=cost)
    losses = np.stack([row for t in one_run(n=400) for row in t.losses["performance_gap"]])
    keep = [g for g in range(losses.shape[0]) if g == 4 or g % 5 != 4]  # the λ = 1 rows of later tables dropped
    costs = np.stack([row for t in one_run(n=400) for row in t.extras[cost or "layer_fraction"]])[keep]
    ref = pareto_test(losses[keep], costs, 0.2, 0.1, p_value=p_value, seed=seed, loss_range=GAP)
    table_of, k = [(i, k) for i in range(3) for k in range(5)][keep[ref.index]]  # the row's table and λ, by hand
    chosen = EarlyExitConfig(**CONFIGS[table_of])
    assert ref.index is not None and LAMBDAS[k] < 1  # a real choice, not the fallback
    cert = rc.certificate
    assert rc.index == ref.index and rc.threshold == LAMBDAS[k] and rc.config == chosen
    assert cert.configuration == {**chosen.to_dict(), "threshold": LAMBDAS[k]}
    assert cert.method == "pareto" and cert.bound == p_value and cert.feasible and cert.eps == 0.2
    assert cert.front == ref.front.tolist() and cert.front_p_value == ref.p_values.tolist()
    assert cert.front_size == ref.front_size and cert.num_rejected == ref.num_rejected
    assert (cert.n_opt, cert.n_test, cert.n) == (ref.n_opt, ref.n_test, 400) and cert.risk_bound == ref.risk_bound
    assert cert.cost == (cost or "layer_fraction") and cert.seed == seed and cert.num_configurations == 13
    test = split_examples(400, 0.5, seed)[1]
    assert cert.empirical_risk == pytest.approx(losses[keep][ref.index, test].mean(), abs=1e-12)
    assert cert.measure == chosen.measure_name


def test_nothing_certified_decodes_the_default_row_at_one():
    table = ConfigurationTable.from_tables(one_run(n=40))
    with pytest.warns(UserWarning, match=r"pareto, eps=0.01.*among the 13 configurations.*p-value .* > δ.*So λ̂ = 1.*"
                      r"never exits early"):
        rc, _ = fitted(0.01, table)
    cert = rc.certificate
    assert rc.threshold == 1.0 and rc.index == table.full_model_index == 4 and not cert.feasible
    assert cert.p_value is None and cert.risk_bound is None and cert.num_rejected == 0
    assert rc.config == EarlyExitConfig(measure="softmax")


def _rc(**kwargs):
    return RiskControlled(0.1, **{"delta": 0.1, "method": "pareto", **kwargs})


@pytest.mark.parametrize("make,match", [
    (lambda: RiskController(0.1, method="pareto"), "pass delta"),
    (lambda: _rc(bound="hoeffding"), "drop bound"),
    (lambda: _rc(monotonize="per_example"), "drop monotonize"),
    (lambda: _rc(p_value="hoeffding"), "p_value='hoeffding' is unknown"),
    (lambda: _rc(opt_fraction=1.0), "opt_fraction=1.0"),
    (lambda: _rc(opt_fraction=True), "opt_fraction=True"),
    (lambda: _rc(seed=-1), "seed=-1"),
    (lambda: _rc(seed=1.5), "seed=1.5"),
    (lambda: RiskControlled(0.1, p_value="wsr"), "p_value configure Pareto Testing"),
    (lambda: RiskControlled(0.1, 0.1, method="ucb", seed=1, opt_fraction=0.3), "opt_fraction, seed configure"),
    (lambda: _rc(config=EarlyExitConfig(measure="softmax")), "drop config="),
    (lambda: RiskController(0.1, method="magic"), "'pareto'"),
    (lambda: _rc().fit_table(one_run()[0]), "ConfigurationTable.from_tables"),
    (lambda: RiskControlled(0.1).fit_table(ConfigurationTable.from_tables(one_run())), "Use method='pareto'"),
    (lambda: RiskController(0.1).fit_table(one_run()[0], cost="layer_fraction"), "drop it"),
    (lambda: _rc().fit_table(ConfigurationTable.from_tables(one_run()), cost="time"), "cost='time' is not a cost"),
    (lambda: _rc(risk="performance_gap_bounded").fit_table(ConfigurationTable.from_tables(
        [LossTable(t.lambdas, {"consistency": t.losses["consistency"]}, metadata=t.metadata, extras=t.extras)
         for t in one_run()])), "no 'performance_gap_bounded' losses"),
    (lambda: RiskController(0.1, 0.1, method="pareto").fit([0.5, 1.0], np.zeros((2, 3))), "fit_table"),
    (lambda: _rc().fit_table("table.npz"), "expects a LossTable"),
])
def test_bad_requests_are_refused(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


# ---------------------------------------------------------------- the file
def _saved(tmp_path, with_table=True):
    rc = RiskControlled(0.2, 0.1, method="pareto", seed=2).fit_table(ConfigurationTable.from_tables(one_run(n=400)))
    assert rc.certificate.feasible and rc.certificate.num_rejected >= 1 and rc.certificate.front_size >= 2
    rc.save_pretrained(tmp_path)
    if with_table:
        ConfigurationTable.from_tables(one_run(n=400)).save(tmp_path)
    return rc, tmp_path / RISK_CONTROL_FILENAME


def test_the_calibration_round_trips(tmp_path):
    rc, path = _saved(tmp_path)
    back = Calibration.from_pretrained(tmp_path)
    assert back == rc.calibration and back.config == rc.calibration.config and back.threshold < 1
    assert back.request == {"eps": 0.2, "delta": 0.1, "method": "pareto", "risk": "performance_gap", "monotonize": None,
                            "p_value": "hoeffding_bentkus", "opt_fraction": 0.5, "seed": 2}
    again = RiskControlled.from_pretrained(tmp_path)
    assert again.seed == 2 and again.certificate == rc.certificate
    assert RiskCertificate.from_dict(json.loads(json.dumps(rc.certificate.to_dict()))) == rc.certificate


def test_scalar_certificates_keep_their_form():
    cert = RiskControlled(0.1).fit_table(one_run()[0]).certificate
    assert "front" not in cert.to_dict() and cert.front_size is None
    with pytest.raises(ValueError, match="recorded by method 'pareto' only"):
        RiskCertificate.from_dict({**cert.to_dict(), "seed": 0})


def _edit(path, change, redigest=True):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(with_digest(data) if redigest else data))


@pytest.mark.parametrize("change,error,match", [
    (lambda d: d["certificate"].update(configuration_index=0), InconsistentCalibrationError, "the configuration chosen"),
    (lambda d: d["certificate"].update(num_rejected=0, p_value=None, risk_bound=None), InconsistentCalibrationError,
     "num_rejected"),
    (lambda d: d["certificate"].update(n_opt=150, n_test=250), InconsistentCalibrationError, "n_opt"),
    (lambda d: [d["certificate"][k].reverse() for k in ("front", "front_risk", "front_cost", "front_p_value")],
     InconsistentCalibrationError, "testing order"),
    (lambda d: d["certificate"].update(feasible=False), InconsistentCalibrationError, "feasible"),
    (lambda d: d["params"].update(seed=7), InconsistentCalibrationError, "params.seed"),
    (lambda d: d["calibration"].update(min_exit_layer=2), InconsistentCalibrationError, "its early-exit configuration"),
    (lambda d: d["calibration"].update(measure="meta"), InconsistentCalibrationError, "its early-exit configuration"),
    (lambda d: d["params"].pop("seed"), CorruptFileError, "no \\['seed'\\]"),
    (lambda d: d["certificate"].update(bound="hoeffding"), CorruptFileError, "not a p-value of method 'pareto'"),
    (lambda d: d["certificate"].pop("front"), CorruptFileError, "no \\['front'\\]"),
    (lambda d: d["certificate"].update(risk_bound=None), CorruptFileError, "exactly when it rejected"),
])
def test_an_edited_file_is_refused_without_its_table(tmp_path, change, error, match):
    _, path = _saved(tmp_path, with_table=False)
    _edit(path, change)
    with pytest.raises(error, match=match) as caught:
        Calibration.from_pretrained(tmp_path)
    assert str(caught.value).startswith(f"'{path}': ")


def test_the_table_beside_it_recomputes_the_whole_certificate(tmp_path):
    _, path = _saved(tmp_path)

    def resplit(d):  # every p-value 0, the cheapest of the whole front chosen: consistent, and only the table can tell
        cert = d["certificate"]
        cert.update(front_p_value=[0.0] * len(cert["front"]), p_value=0.0, num_rejected=len(cert["front"]))
        pos = int(np.lexsort((cert["front"], cert["front_risk"], cert["front_cost"]))[0])
        setting = ConfigurationTable.from_tables(one_run(n=400)).settings[cert["front"][pos]]
        cert.update(configuration_index=cert["front"][pos], configuration=setting, lambda_hat=setting["threshold"],
                    feasible=setting["threshold"] < 1, measure=setting["measure"])
        d["lambda_"] = setting["threshold"]
        d["calibration"].update({k: v for k, v in setting.items() if k != "threshold"})

    _edit(path, resplit)
    with pytest.raises(InconsistentCalibrationError, match=f"refitting the loss table stored beside it "
                       f"\\('{tmp_path / CONFIGURATIONS_FILENAME}'\\)"):
        Calibration.from_pretrained(tmp_path)
    (tmp_path / CONFIGURATIONS_FILENAME).unlink()  # alone, the forged file passes its own checks
    assert Calibration.from_pretrained(tmp_path).certificate.front_p_value[0] == 0.0


# ---------------------------------------------------------------- a model that stores a configuration table
INPUTS = {"input_ids": torch.tensor([[5, 6, 7, 8, 1], [9, 10, 1, 0, 0]]),
          "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])}


def test_generate_decodes_the_configuration_chosen(tmp_path):
    model = enable(random_t5(seed=3, initializer_factor=4.0))
    model.name_or_path = str(tmp_path)
    table = model_table(model)
    store_calibration(tmp_path, table=table)
    request = RiskControlled(0.1, 0.1, method="pareto", risk="consistency")
    out = model.generate(**INPUTS, early_exit=request, return_dict_in_generate=True, output_scores=True)
    chosen = EarlyExitConfig(measure="saturation", schedule="decaying")
    assert out.certificate.method == "pareto" and out.certificate.configuration == {**chosen.to_dict(), "threshold": 0.4}
    assert out.early_exit.config.to_dict() == chosen.to_dict() and out.early_exit.threshold == 0.4
    ref = model.generate(**INPUTS, early_exit=EarlyExit(0.4, config=chosen), max_new_tokens=5,
                         return_dict_in_generate=True, output_scores=True)
    assert torch.equal(out.sequences, ref.sequences) and torch.equal(out.exit_layers, ref.exit_layers)
    assert all(torch.equal(a, b) for a, b in zip(out.scores, ref.scores)) and len(out.scores) == len(ref.scores)
    # stored with its calibration, the file is read back (its certificate recomputed from the table) to the same
    fitted = RiskControlled(0.1, 0.1, method="pareto", risk="consistency").fit_table(table)
    store_calibration(tmp_path, controlled=fitted)
    again = model.generate(**INPUTS, early_exit=RiskControlled.from_pretrained(tmp_path, task="toy"),
                           return_dict_in_generate=True)
    assert torch.equal(again.sequences, ref.sequences)


def test_the_scalar_methods_keep_the_one_d_table(tmp_path):
    model = enable(random_t5(seed=3))
    model.name_or_path = str(tmp_path)
    store_calibration(tmp_path, table=model_table(model))
    with pytest.raises(MissingCalibrationError, match="method='crc'.*only .*early_exit_configurations.npz.*"
                       "RiskControlled\\(eps, delta=..., method='pareto'\\)"):
        RiskControlled(0.1, risk="consistency").policy_for(model)
    (one_d,) = one_run(configs=({"measure": "softmax"},), model_fingerprint=model_fingerprint(model), task="toy")
    store_calibration(tmp_path, table=one_d)
    crc = RiskControlled(0.1).policy_for(model)[0]
    assert crc.threshold == RiskControlled(0.1).fit_table(one_d).threshold and crc.certificate.method == "crc"
    pareto = RiskControlled(0.1, 0.1, method="pareto", risk="consistency").policy_for(model)[0]
    assert pareto.certificate.method == "pareto" and pareto.threshold == 0.4


def test_pareto_refuses_a_model_with_only_a_one_d_table(tmp_path):
    model = enable(random_t5(seed=3))
    model.name_or_path = str(tmp_path)
    (one_d,) = one_run(configs=({"measure": "softmax"},), model_fingerprint=model_fingerprint(model), task="toy")
    store_calibration(tmp_path, table=one_d)
    with pytest.raises(MissingCalibrationError, match="needs the task's multi-configuration table \\(calibration/toy/"
                       "early_exit_configurations.npz\\).*early_exit_calibration.npz.*from_tables") as caught:
        model.generate(**INPUTS, early_exit=RiskControlled(0.1, 0.1, method="pareto"))
    assert "\n" not in str(caught.value)


def test_a_damaged_stored_table_is_refused_naming_it(tmp_path):
    model = enable(random_t5(seed=3))
    model.name_or_path = str(tmp_path)
    path = store_calibration(tmp_path, table=model_table(model))[0]
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CorruptFileError) as caught:
        model.generate(**INPUTS, early_exit=RiskControlled(0.1, 0.1, method="pareto", risk="consistency"))
    assert caught.value.path == str(path)
    other = model_table(random_t5(seed=4))
    store_calibration(tmp_path, table=other)
    with pytest.raises(ValueError, match="calibrated for another model"):
        model.generate(**INPUTS, early_exit=RiskControlled(0.1, 0.1, method="pareto", risk="consistency"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fit itself warns of nothing here
        RiskControlled(0.1, 0.1, method="pareto", risk="consistency").fit_table(other)
