"""Every code snippet in docs/*.md runs as written, and every link in README.md and docs/ resolves.

The rule, the same as README.md's (``tests/test_readme_snippets.py``): a ```python block is code that runs. Each
docs file's ```python blocks run in order in one fresh namespace (as a reader pasting them into one session
would). Illustrative text (layouts, diagrams, pseudo-code) goes in ```text blocks, which are not run; shell
commands go in ```bash blocks, whose ``hf-safe-exit ...`` lines are parsed by the CLI's own parser (lines with
``...`` are placeholders and skipped) and whose ``python examples/...`` / ``bash examples/...`` lines must name a
script that exists. No other fence language is allowed, so that no python block escapes the test under another
name (```py, ```pycon, an untagged fence).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

from hf_safe_exit.cli import build_parser
from hf_safe_exit.models import default_model_available

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS]
LANGUAGES = {"python", "bash", "text"}
_FENCE = re.compile(r"^```(.*)$")


def _fenced(path: Path) -> list[tuple[str, str, int]]:
    """(language, body, line of the opening fence) of every fenced block of ``path``."""
    blocks, lang, body, start = [], None, [], 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        match = _FENCE.match(line)
        if lang is None and match:
            lang, body, start = match.group(1).strip(), [], number
        elif lang is not None and line.strip() == "```":
            blocks.append((lang, "\n".join(body) + "\n", start))
            lang = None
        elif lang is not None:
            body.append(line)
    assert lang is None, f"{path.name}: the fence opened at line {start} is never closed"
    return blocks


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_there_are_docs_and_readme_links_each():
    names = {p.name for p in DOCS}
    assert {"design.md", "benchmarks.md", "risk_control.md", "calibration.md"} <= names, names
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for page in DOCS:
        assert f"(docs/{page.name}" in readme, f"README.md does not link docs/{page.name}"


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_every_fence_names_an_allowed_language(page):
    for lang, _, line in _fenced(page):
        assert lang in LANGUAGES, (f"{_name(page)} line {line}: fence language {lang!r}; use ```python (runs), "
                                   "```bash (CLI lines parsed) or ```text (not run)")


@pytest.mark.skipif(not default_model_available(), reason="the shipped default model is not installed")
@pytest.mark.parametrize("page", DOCS, ids=_name)
def test_docs_python_blocks_run_as_written(page, capsys):
    torch.manual_seed(0)
    namespace: dict = {"__name__": f"__docs_{page.stem}__"}
    for lang, block, line in _fenced(page):
        if lang != "python":
            continue
        try:
            exec(compile(block, f"{_name(page)} python block at line {line}", "exec"), namespace)
        except Exception as err:  # noqa: BLE001 - say which block failed
            raise AssertionError(f"{_name(page)} python block at line {line} failed: {type(err).__name__}: "
                                 f"{err}\n{block}")
    capsys.readouterr()


def test_docs_python_blocks_exist():
    """The pages that show the API show it in code that runs (not only in prose)."""
    runnable = {p.name: sum(lang == "python" for lang, _, _ in _fenced(p)) for p in DOCS}
    for name in ("design.md", "risk_control.md", "training.md"):
        assert runnable.get(name, 0) >= 1, runnable


def _command_lines(page: Path) -> list[str]:
    return [line.split("#", 1)[0].strip() for lang, block, _ in _fenced(page) if lang == "bash"
            for line in block.splitlines()]


@pytest.mark.parametrize("page", DOCS, ids=_name)
def test_docs_cli_lines_parse(page):
    parser = build_parser()
    for line in _command_lines(page):
        if line.startswith("hf-safe-exit ") and "..." not in line:
            argv = [a.strip("[]") for a in shlex.split(line)[1:] if a not in ("[", "]")]
            try:
                parser.parse_args(argv)
            except SystemExit as err:
                raise AssertionError(f"{_name(page)}: command does not parse: {line}") from err


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_scripts_named_in_bash_blocks_exist(page):
    for line in _command_lines(page):
        words = shlex.split(line) if line else []
        if len(words) >= 2 and words[0] in ("python", "bash") and words[1].endswith((".py", ".sh")):
            assert (ROOT / words[1]).is_file(), f"{_name(page)}: {words[1]} does not exist"


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (letters, digits, '-', '_' kept), spaces → '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = page.read_text(encoding="utf-8")
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)  # a '#' line in a code block is no heading
    return {_slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_relative_links_and_anchors_resolve(page):
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{_name(page)}: link to {target}: no such file"
        if anchor:
            assert anchor in _anchors(linked), f"{_name(page)}: link to {target}: no such heading in {linked.name}"
