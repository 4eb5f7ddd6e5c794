"""Issue 16.5: every CLI option explains itself, and the methods, bounds and risks the docs name all work."""

import argparse
import re
import warnings
from pathlib import Path

import numpy as np
import pytest

from hf_safe_exit import EarlyExitConfig
from hf_safe_exit.cli import build_parser
from hf_safe_exit.risk import ConfigurationTable, LossTable, RiskControlled

ROOT = Path(__file__).resolve().parents[1]
READMES = [ROOT / "README.md", ROOT / "hf_safe_exit" / "default_model" / "README.md"]


def _parsers():
    """(command line, parser) for the top-level parser and every subcommand's."""
    found = []

    def walk(parser, name):
        found.append((name, parser))
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, subparser in action.choices.items():
                    walk(subparser, f"{name} {sub}")

    walk(build_parser(), "hf-safe-exit")
    return found


def test_every_subcommand_has_a_description_and_every_option_help(capsys):
    parsers = _parsers()
    assert {name.split()[-1] for name, _ in parsers} >= {"collect", "calibrate", "evaluate", "plot", "card", "demo"}
    for name, parser in parsers:
        assert parser.description and parser.description.strip(), f"`{name} --help` has no description"
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:  # the one-line summaries in the top-level --help
                    assert choice.help and choice.help.strip(), f"{name} {choice.dest}: no summary"
                continue
            label = "/".join(action.option_strings) or action.dest
            assert action.help and action.help.strip() and action.help != argparse.SUPPRESS, \
                f"`{name}` option {label} has no help text"
        # and --help itself renders
        with pytest.raises(SystemExit) as caught:
            build_parser().parse_args([*name.split()[1:], "--help"])
        assert caught.value.code == 0 and capsys.readouterr().out.strip()


def _named_in_help(option: str) -> dict[str, set[str]]:
    """The names each ``option``'s help lists (after its first ':', parentheses dropped), per subcommand."""
    names = {}
    for name, parser in _parsers():
        for action in parser._actions:
            if option in action.option_strings:
                text = action.help.split(":", 1)[1] if ":" in action.help else action.help
                text = re.sub(r"\([^)]*\)", " ", text)
                names[name] = {w for w in re.split(r"[,\s]+", text) if w and w not in ("or", "and")}
                names[name].add(action.default if isinstance(action.default, str) else "")
                names[name].discard("")
    return names


def _named_in_readmes(key: str) -> set[str]:
    found = set()
    for readme in READMES:
        text = readme.read_text(encoding="utf-8")
        found |= set(re.findall(rf"\b{key}\s*=\s*[\"'](\w+)[\"']", text))
        for listed in re.findall(rf"--{key}s?\s+([\w,]+)", text):
            found |= set(listed.split(","))
    return found


def _toy_table():
    rng = np.random.default_rng(0)
    lam = np.linspace(0, 1, 6)
    task = np.clip(rng.uniform(0, 0.5, (6, 200)) * (1 - lam)[:, None] + rng.uniform(0, 0.3, 200), 0, 1)
    task[-1] = rng.uniform(0, 0.3, 200)
    return LossTable.from_task_losses(lam, task, consistency_losses=np.abs(task - task[-1]))


def _toy_configurations():
    """The toy table as the one configuration of a ConfigurationTable (its settings and cost recorded)."""
    toy = _toy_table()
    cost = np.tile(np.linspace(0.25, 1.0, toy.lambdas.size)[:, None], (1, toy.n))  # fraction of blocks run
    table = LossTable(toy.lambdas, toy.losses, bounds=toy.bounds, extras={**toy.extras, "layer_fraction": cost},
                      metadata={**toy.metadata, **EarlyExitConfig(measure="softmax").to_dict()})
    return ConfigurationTable.from_tables([table])


def _works(**kwargs):
    # Pareto Testing chooses among configurations: it fits a ConfigurationTable (a 1-D table is its special case)
    table = _toy_configurations() if kwargs.get("method") == "pareto" else _toy_table()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an infeasible toy fit warns; working is what counts
        rc = RiskControlled(0.2, **kwargs).fit_table(table)
    assert 0.0 <= rc.threshold <= 1.0


def test_every_method_bound_and_risk_named_in_the_docs_and_the_cli_works():
    methods = set().union(*_named_in_help("--method").values(), *_named_in_help("--methods").values(),
                          _named_in_readmes("method"))
    bounds = set().union(*_named_in_help("--bound").values(), _named_in_readmes("bound"))
    risks = set().union(*_named_in_help("--risk").values(), _named_in_readmes("risk"))
    # README's bullet list of methods and bounds, in backticks
    bullet = re.search(r"\* Methods:(.*?)\n\*", (ROOT / "README.md").read_text(encoding="utf-8"), re.S).group(1)
    for token in re.findall(r"`([^`]+)`", bullet):
        name = token.split("=")[-1].strip("\"'")
        (bounds if name in ("wsr", "hoeffding", "hoeffding_bentkus") or token.startswith(("bound", '"')) else
         methods).add(name)
    assert methods == {"crc", "ucb", "ltt", "naive", "pareto"}, methods
    assert bounds == {"wsr", "hoeffding", "hoeffding_bentkus"}, bounds
    assert risks >= {"performance_gap", "performance_gap_bounded", "consistency"}, risks
    for method in methods:
        _works(method=method, delta=0.1 if method in ("ucb", "ltt", "pareto") else None)
    for bound in bounds:
        _works(method="ucb", delta=0.1, bound=bound)
    for risk in risks:
        _works(risk=risk)
