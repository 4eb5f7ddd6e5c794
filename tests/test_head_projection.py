"""The read-out projection in vocabulary chunks (decoding/head_projection.py) returns exactly ``head(x)``: checked
against ``nn.Linear``'s own forward and, end to end, against HF's ``generate`` at batch sizes where the chunks are
used; when chunks would round differently, or the head is not a plain linear layer, the head itself is called."""

import pytest
import torch
from torch import nn
from transformers import T5Config, T5ForConditionalGeneration

import hf_safe_exit
from hf_safe_exit import EarlyExit, ForcedExit
from hf_safe_exit.decoding import head_projection


@pytest.fixture(autouse=True)
def _fresh_probes(one_thread, monkeypatch):
    monkeypatch.setattr(head_projection, "_IDENTICAL", {})
    yield


@pytest.fixture
def chunk_calls(monkeypatch):
    calls = []
    real = head_projection._chunked

    def spy(x, weight, chunk):
        calls.append((x.shape, chunk))
        return real(x, weight, chunk)

    monkeypatch.setattr(head_projection, "_chunked", spy)
    return calls


def linear(vocab: int, d: int, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(d, vocab, bias=False)


@pytest.mark.parametrize("d", [64, 512])
def test_equals_the_heads_own_forward_at_every_row_count(d, chunk_calls):
    head = linear(32128, d)
    for rows in range(1, 20):
        for shape in ((rows, d), (rows, 1, d)):
            x = torch.randn(shape)
            with torch.no_grad():
                assert torch.equal(head_projection.project(head, x), head(x)), (rows, shape)
    # the chunks were used exactly in the small-batch range, and cut the vocabulary into several pieces
    used = sorted({s[:-1].numel() for s, _ in chunk_calls if len(chunk_calls)})
    assert used == list(range(4, 16))
    assert all(chunk < 32128 for _, chunk in chunk_calls)


def test_chunks_that_round_differently_are_not_used(monkeypatch):
    real = head_projection._chunked
    # a BLAS whose chunked kernel rounds the last bit differently: the probe must catch it and keep head(x)
    monkeypatch.setattr(head_projection, "_chunked",
                        lambda x, w, c: torch.nextafter(real(x, w, c), torch.tensor(float("inf"))))
    head = linear(4096, 128)
    x = torch.randn(8, 128)
    with torch.no_grad():
        assert torch.equal(head_projection.project(head, x), head(x))


def test_heads_that_are_not_a_plain_linear_layer_are_called(chunk_calls):
    x = torch.randn(8, 64)
    hooked = linear(4096, 64)
    hooked.register_forward_hook(lambda module, args, out: out * 2)
    biased = nn.Linear(64, 4096)

    class Scaled(nn.Linear):  # stands in for LoRA / quantised subclasses with their own forward
        def forward(self, x):
            return super().forward(x) + 1

    scaled = Scaled(64, 4096, bias=False)
    replaced = linear(4096, 64)
    replaced.forward = lambda x: torch.zeros(x.shape[0], 4096)  # what accelerate's offload hooks do
    with torch.no_grad():
        for head in (hooked, biased, scaled, replaced):
            assert torch.equal(head_projection.project(head, x), head(x))
        assert torch.equal(head_projection.project(linear(4096, 64).double(), x.double()),
                           linear(4096, 64).double()(x.double()))
    assert chunk_calls == []
    # with autograd on, the head's own forward (and its graph) is used
    grad_head = linear(4096, 64)
    assert head_projection.project(grad_head, x).grad_fn is not None


@pytest.mark.parametrize("rows", [4, 8])
@pytest.mark.parametrize("kind", ["tied", "untied"])
def test_full_model_equals_hf_generate_with_a_real_vocabulary(rows, kind, chunk_calls):
    # λ = 1 with a 32,128-token vocabulary in float32: the read-out of 4 and 8 rows goes through the chunks, and
    # the tokens and logits are exactly HF's; a forced exit reads out every exiting row through them too
    torch.manual_seed(3)
    cfg = T5Config(vocab_size=32128, d_model=64, d_kv=16, d_ff=128, num_heads=4, num_layers=2, num_decoder_layers=2,
                   decoder_start_token_id=0, eos_token_id=1, pad_token_id=0, tie_word_embeddings=kind == "tied",
                   feed_forward_proj="relu" if kind == "tied" else "gated-gelu")
    model = hf_safe_exit.enable(T5ForConditionalGeneration(cfg).eval())
    ids = torch.randint(2, 32128, (rows, 9))
    kwargs = dict(input_ids=ids, max_new_tokens=6, min_new_tokens=6, return_dict_in_generate=True, output_logits=True)
    ours = model.generate(**kwargs, early_exit=EarlyExit(threshold=1.0))
    theirs = type(model).generate(model, **kwargs)
    assert torch.equal(ours.sequences, theirs.sequences)
    assert all(torch.equal(a, b) for a, b in zip(ours.logits, theirs.logits))
    assert any(shape[:-1].numel() == rows for shape, _ in chunk_calls)
    chunk_calls.clear()
    model.generate(**kwargs, early_exit=ForcedExit(1))
    assert chunk_calls
