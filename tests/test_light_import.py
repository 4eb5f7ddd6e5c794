"""``import hf_safe_exit`` is light: no optional dependency, no calibration runner, card writer or demo.

The optional dependencies (pyproject.toml's extras ``calibrate``, ``train``, ``plot``) load only when a
calibration, evaluation, plot or training function runs; the runtime (switch a model on, decode with early
exit, fit ``RiskControlled`` from a stored loss table) works without them; and a function that needs a missing
one says which extra installs it. Each check runs in a fresh interpreter, where nothing was imported before.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from hf_safe_exit.lazy import OPTIONAL

ROOT = Path(__file__).resolve().parents[1]
# the heavy packages that must wait for the function that needs them (nltk and evaluate: rouge-score's and
# datasets' company, which no runtime path may pull in either)
HEAVY = ("scipy", "matplotlib", "accelerate", "datasets", "evaluate", "rouge_score", "nltk")
# what the extras install: blocked below to stand for an install without them (scipy is a runtime dependency)
EXTRAS_ONLY = ("accelerate", "datasets", "evaluate", "rouge_score", "nltk", "matplotlib")

PRELUDE = """
import json, sys
HEAVY = {heavy!r}
for name in {block!r}:
    sys.modules[name] = None  # `import name` fails and importlib.util.find_spec(name) is None: not installed

def heavy():
    return sorted({{m.split(".")[0] for m, mod in sys.modules.items() if mod is not None}} & set(HEAVY))

def ours(*names):
    return sorted(m for m in sys.modules if m in names or m.startswith(tuple(n + "." for n in names)))

result = {{}}
"""


def run(code: str, block=()) -> dict:
    script = PRELUDE.format(heavy=HEAVY, block=tuple(block)) + textwrap.dedent(code) + "\nprint(json.dumps(result))\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def fresh():
    """``import hf_safe_exit``, then the runtime's names, then the others, recording what each step loads."""
    return run("""
        import importlib
        import hf_safe_exit
        CALIBRATION = ("hf_safe_exit.calibration", "hf_safe_exit.cards", "hf_safe_exit.demo")
        result["import"] = {"heavy": heavy(), "loaded": ours(*CALIBRATION, "hf_safe_exit.training",
                                                             "hf_safe_exit.plotting", "hf_safe_exit.tasks")}
        exports = hf_safe_exit._EXPORTS
        later = {name for module in (".decoding", ".calibration", ".cards", ".demo", ".tasks")
                 for name in exports[module]}
        result["runtime names"] = sorted(set(hf_safe_exit.__all__) - later)
        for name in result["runtime names"]:
            getattr(hf_safe_exit, name)
        result["after runtime names"] = {"heavy": heavy(), "loaded": ours(*CALIBRATION)}
        for name in exports[".cards"] + exports[".demo"] + exports[".tasks"]:
            getattr(hf_safe_exit, name)
        result["after card, demo and task names"] = heavy()
        for name, module in (("run_demo", "hf_safe_exit.demo"), ("write_guarantee_card", "hf_safe_exit.cards.write"),
                             ("collect", "hf_safe_exit.calibration.runner")):
            found = getattr(hf_safe_exit, name)
            result[name] = [module in sys.modules, found is getattr(importlib.import_module(module), name)]
    """)


def test_import_loads_no_optional_dependency_and_no_calibration_code(fresh):
    assert fresh["import"] == {"heavy": [], "loaded": []}


def test_runtime_names_load_no_optional_dependency(fresh):
    assert {"EarlyExit", "RiskControlled", "LossTable", "load_default_model"} <= set(fresh["runtime names"])
    assert fresh["after runtime names"] == {"heavy": [], "loaded": []}


def test_calibration_names_resolve_and_load_their_modules_only_then(fresh):
    assert fresh["after card, demo and task names"] == []
    assert fresh["collect"] == fresh["run_demo"] == fresh["write_guarantee_card"] == [True, True]


def test_the_decoding_names_load_only_what_transformers_itself_loads():
    """``enable`` and ``generate`` need transformers' GenerationMixin and PreTrainedModel, and transformers imports
    accelerate (and scipy) on its own wherever they are installed; hf_safe_exit adds no heavy module to that."""
    out = run("""
        from transformers import GenerationMixin, PreTrainedModel, T5ForConditionalGeneration
        result["transformers"] = heavy()
        import hf_safe_exit
        for name in hf_safe_exit._EXPORTS[".decoding"]:
            getattr(hf_safe_exit, name)
        result["heavy"] = heavy()
    """)
    assert set(out["heavy"]) <= set(out["transformers"]), out


def test_all_and_dir():
    import hf_safe_exit

    assert len(set(hf_safe_exit.__all__)) == len(hf_safe_exit.__all__)
    for name in hf_safe_exit.__all__:
        assert getattr(hf_safe_exit, name) is not None, name
    assert set(hf_safe_exit.__all__) <= set(dir(hf_safe_exit))
    from hf_safe_exit import EarlyExit, RiskControlled, collect  # noqa: F401  (from-imports go through __getattr__)

    assert hf_safe_exit.risk.RiskControlled is RiskControlled  # a subpackage is an attribute, as before
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        hf_safe_exit.not_a_name  # noqa: B018
    with pytest.raises(ImportError):
        from hf_safe_exit import not_a_name  # noqa: F401


NEEDS_AN_EXTRA = {
    "plot": "hf_safe_exit.plotting.build_figures({'results': []})",
    "cnndm loss": "hf_safe_exit.tasks.get_task('cnndm').loss('a cat', 'a cat')",
    "training rouge": "hf_safe_exit.training.evaluation.rouge_l('a cat', 'a cat')",
    "task data": "hf_safe_exit.tasks.load_split('squad', 'pool', path=squad)",
}


@pytest.fixture(scope="module")
def without_extras(tmp_path_factory):
    """An interpreter where no extra's package can be imported (as after ``pip install hf_safe_exit``): load the
    shipped model, decode with early exit and under RiskControlled fitted from its stored loss tables by CRC and by
    LTT (whose Hoeffding-Bentkus p-values need scipy), then call what needs an extra."""
    squad = tmp_path_factory.mktemp("data") / "squad.json"
    squad.write_text('{"version": "1.1", "data": []}')
    calls = "".join(f"""
        try:
            {call}
        except ImportError as err:
            result[{label!r}] = [type(err).__name__, str(err)]""" for label, call in NEEDS_AN_EXTRA.items())
    return run(f"""
        import hf_safe_exit
        from hf_safe_exit import EarlyExit, RiskControlled

        model, tokenizer = hf_safe_exit.load_default_model()
        inputs = tokenizer(["summarize: The council voted on Tuesday to turn the old railway depot into a public "
                            "library."], return_tensors="pt")
        for label, rule in (("threshold", EarlyExit(threshold=0.9)), ("crc", RiskControlled(eps=0.05)),
                            ("ltt", RiskControlled(eps=0.1, delta=0.1, method="ltt"))):
            out = model.generate(**inputs, early_exit=rule, max_new_tokens=6, return_dict_in_generate=True)
            result[label] = int(out.sequences.shape[-1]) > 1
        result["heavy"] = heavy()

        import hf_safe_exit.plotting, hf_safe_exit.tasks, hf_safe_exit.training.evaluation
        squad = {str(squad)!r}{calls}
    """, block=EXTRAS_ONLY)


def test_the_runtime_works_without_the_extras(without_extras):
    assert {k: without_extras[k] for k in ("threshold", "crc", "ltt", "heavy")} == {
        "threshold": True, "crc": True, "ltt": True, "heavy": ["scipy"]}


@pytest.mark.parametrize("label, extra", [("plot", "plot"), ("cnndm loss", "calibrate"),
                                          ("training rouge", "calibrate"), ("task data", "calibrate")])
def test_a_missing_extra_is_named(without_extras, label, extra):
    kind, message = without_extras[label]
    assert kind == "ModuleNotFoundError" and "\n" not in message
    assert message.endswith(f"pip install 'hf_safe_exit[{extra}]'")


def test_the_extras_table_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = project["optional-dependencies"]

    def names(requirements):
        return {r.split(";")[0].split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower()
                .replace("-", "_") for r in requirements}

    runtime = names(project["dependencies"])
    for module, extra in OPTIONAL.items():
        assert module in names(extras[extra]), (module, extra)
        assert module not in runtime, module
    for extra in ("calibrate", "plot"):
        assert names(extras[extra]) <= set(OPTIONAL), extra
    assert "scipy" in runtime  # RiskControlled fits UCB and LTT bounds from a stored table at generate time
    assert {"train", "dev"} <= set(extras)
    assert "hf_safe_exit" in names(extras["train"]) and "hf_safe_exit" in names(extras["dev"])
    assert "pytest" in names(extras["dev"])
    dev_extras = {x for r in extras["dev"] if r.startswith("hf_safe_exit[") for x in r[13:r.index("]")].split(",")}
    assert dev_extras == {"calibrate", "train", "plot"}


def test_a_lazy_name_that_is_also_a_submodule_name_stays_the_function():
    """``training.calm_loss`` is a function defined in ``training/calm_loss.py``: importing the submodule (which binds
    it to the package) must not shadow the function, whichever comes first."""
    import hf_safe_exit.training.calm_loss  # noqa: F401
    from hf_safe_exit import training
    from hf_safe_exit.training import calm_loss

    assert callable(calm_loss) and calm_loss.__module__ == "hf_safe_exit.training.calm_loss"
    assert training.calm_loss is calm_loss
