"""The default confidence measure ``"auto"`` (chosen by benchmarks/measure_choice.py): meta where a trained meta head
exists, ``HEAD_FREE_DEFAULT`` elsewhere; calibrations record the measure it resolved to."""

from __future__ import annotations

import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration

import hf_safe_exit
from hf_safe_exit import EarlyExit, EarlyExitConfig, MetaClassifierHead, MetaHeadConfig, RiskControlled
from hf_safe_exit.confidence import HEAD_FREE_DEFAULT, MEASURES, get_measure
from tiny_t5 import CONFIGS, VOCAB


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    yield


def tiny(with_head: bool) -> T5ForConditionalGeneration:
    options = dict(CONFIGS["v1.1-untied-2+4"])
    torch.manual_seed(options.pop("seed"))
    model = T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_heads=4,
                                                decoder_start_token_id=0, eos_token_id=1, pad_token_id=0,
                                                initializer_factor=1.0, **options)).eval()
    if with_head:
        model.meta_head = MetaClassifierHead(MetaHeadConfig(d_model=model.config.d_model)).eval()
    return model


def run(model, measure, threshold=0.3):
    ids = torch.randint(2, VOCAB, (3, 7), generator=torch.Generator().manual_seed(1))
    kwargs = dict(input_ids=ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    policy = EarlyExit(threshold=threshold) if measure is None else EarlyExit(threshold=threshold, measure=measure)
    return hf_safe_exit.generate(model, **kwargs, early_exit=policy)


def test_defaults_are_auto_everywhere():
    import inspect

    from hf_safe_exit.calibration import collect
    from hf_safe_exit.cli import build_parser

    from hf_safe_exit import EarlyExitConfig

    assert EarlyExit().measure == "auto" and EarlyExitConfig().measure == "auto"
    assert inspect.signature(collect).parameters["config"].default is None  # None: EarlyExitConfig()
    # the CLI leaves an unset option to the configuration's default
    assert build_parser().parse_args(["collect", "--model", "m", "--task", "cnndm", "--output", "o.npz"]).measure \
        is None
    assert HEAD_FREE_DEFAULT in MEASURES and HEAD_FREE_DEFAULT != "meta"


@pytest.mark.parametrize("with_head, expected", [(False, HEAD_FREE_DEFAULT), (True, "meta")])
def test_auto_decodes_as_the_measure_it_names(with_head, expected):
    model = tiny(with_head)
    auto, explicit = run(model, None), run(model, expected)
    assert auto.early_exit.measure.name == expected
    assert torch.equal(auto.sequences, explicit.sequences)
    assert torch.equal(auto.exit_layers, explicit.exit_layers)
    assert auto.exit_layers[auto.exit_layers > 0].float().mean() < model.config.num_decoder_layers  # exits happen


@pytest.mark.parametrize("with_head", [False, True])
def test_auto_with_product_of_experts_is_the_softmax_margin(with_head):
    # PoE projects every layer onto the vocabulary anyway; its confidences are the PoE distribution's margins
    model = tiny(with_head)
    ids = torch.randint(2, VOCAB, (3, 7), generator=torch.Generator().manual_seed(1))
    kwargs = dict(input_ids=ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    auto = hf_safe_exit.generate(model, **kwargs, early_exit=EarlyExit(threshold=0.05, anytime="poe"))
    explicit = hf_safe_exit.generate(model, **kwargs, early_exit=EarlyExit(threshold=0.05, measure="softmax",
                                                                           anytime="poe"))
    assert auto.early_exit.measure.name == "softmax"
    assert torch.equal(auto.sequences, explicit.sequences) and torch.equal(auto.exit_layers, explicit.exit_layers)


def test_auto_needs_a_model_and_unknown_names_are_refused():
    with pytest.raises(ValueError, match="resolved against a model"):
        get_measure("auto")
    with pytest.raises(ValueError, match="Unknown confidence measure 'softmx'"):
        EarlyExit(measure="softmx")


def test_shipped_model_resolves_to_meta_and_its_calibrations_record_it():
    model, _ = hf_safe_exit.load_default_model()
    assert EarlyExit().bind(model).measure.name == "meta"  # it ships a trained meta head
    for task in ("cnndm", "squad"):  # its calibrations were made with the default, so they decode with meta too
        rc = RiskControlled(eps=0.05, task=task).resolve(model)
        assert rc.certificate.measure == "meta" and rc.measure.name == "meta"


def test_collect_records_the_resolved_measure(tmp_path):
    from hf_safe_exit.calibration import collect
    from tiny_calibration import build_tiny_t5, build_word_tokenizer

    rows = [{"article": "the cat sat on the mat . it was warm .", "highlights": "cat sat .", "id": "a"},
            {"article": "a dog ran in the park . it was fast .", "highlights": "dog ran .", "id": "b"}]
    tokenizer = build_word_tokenizer([r["article"] + " " + r["highlights"] for r in rows])
    model = build_tiny_t5(len(tokenizer))
    common = dict(lambdas=[0.5, 1.0], batch_size=2, max_new_tokens=3, max_input_length=16, progress=False)
    plain = collect(model, tokenizer, "cnndm", rows, **common)
    assert plain.metadata["measure"] == HEAD_FREE_DEFAULT
    model.meta_head = MetaClassifierHead(MetaHeadConfig(d_model=model.config.d_model)).eval()
    with_head = collect(model, tokenizer, "cnndm", rows, **common)
    assert with_head.metadata["measure"] == "meta"
    # a config with measure="auto" asks for the calibration's measure, as config=None does
    a = RiskControlled(eps=0.5, config=EarlyExitConfig(measure="auto")).fit_table(with_head)
    b = RiskControlled(eps=0.5).fit_table(with_head)
    assert a.threshold == b.threshold and a.certificate.measure == b.certificate.measure == "meta"
