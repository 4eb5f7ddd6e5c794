"""The default model's from-scratch recipe (scripts/default_model_recipe): its settings and its card.

Reference for the card: the shipped default model's README.md, which ``--card-only`` must re-render byte for byte
from ``training_results.json`` (guarantee sections, their results and tags kept), and which must lose nothing
else when the guarantee sections are absent.
"""

from __future__ import annotations

import runpy
import shutil
import sys
from pathlib import Path

import pytest

from hf_safe_exit.models import default_model_available, default_model_path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = str(ROOT / "scripts")  # the recipe is not part of the library
sys.path.insert(0, SCRIPTS)
try:
    from default_model_recipe.recipe import RecipeConfig
finally:
    sys.path.remove(SCRIPTS)


def _copy_default_model(tmp_path: Path) -> Path:
    src, dst = default_model_path(), tmp_path / "model"
    dst.mkdir()
    for name in ("README.md", "training_results.json"):
        shutil.copyfile(src / name, dst / name)
    shutil.copytree(src / "calibration", dst / "calibration")
    return dst


@pytest.mark.skipif(not default_model_available(), reason="the shipped default model is not installed")
def test_card_only_rerenders_the_shipped_card_identically(tmp_path, capsys):
    model = _copy_default_model(tmp_path)
    (model / "README.md").write_text("stale text\n")  # not even a card: only training_results.json counts
    main = runpy.run_path(str(ROOT / "scripts" / "train_default_model.py"), run_name="train_default_model")["main"]
    main(["--card-only", "--out", str(model)])
    # without a card to carry over there is nothing of the guarantee: the training part alone, which the shipped
    # card starts with
    shipped = (default_model_path() / "README.md").read_text(encoding="utf-8")
    training_part = (model / "README.md").read_text(encoding="utf-8")
    body = training_part.split("\n---\n", 1)[1]
    assert body.rstrip("\n") in shipped and "hf_safe_exit:guarantee" not in training_part
    shutil.copyfile(default_model_path() / "README.md", model / "README.md")
    main(["--card-only", "--out", str(model)])
    assert (model / "README.md").read_text(encoding="utf-8") == shipped
    assert "rewrote" in capsys.readouterr().out


def test_recipe_settings_are_validated_with_the_fix_named():
    with pytest.raises(ValueError, match="keep_decoder_layers needs init_from"):
        RecipeConfig(out="o", keep_decoder_layers=4)
    with pytest.raises(ValueError, match="pretrain_mix='infill=x'"):
        RecipeConfig(out="o", pretrain_mix="infill=x")
    with pytest.raises(ValueError, match="summ_prob=1.5 must lie in"):
        RecipeConfig(out="o", summ_prob=1.5)
    tiny = RecipeConfig(out="o", tiny=True, d_model=512)
    assert (tiny.d_model, tiny.dec_layers) == (64, 3)  # the preset wins, as the smoke test expects
    assert tiny.stored_args()["exit_readout_dropout"] is True
