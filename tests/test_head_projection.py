"""The read-out projection in vocabulary chunks (decoding/head_projection.py) returns exactly ``head(x)``: checked
against ``nn.Linear``'s own forward and, end to end, against HF's ``generate`` at batch sizes where the chunks are
used; when chunks would round differently, or the head is not a plain linear layer, the head itself is called."""

import pytest
import torch
from torch import nn
from transformers import T5Config, T5ForConditionalGeneration

import hf_safe_exit
from hf_safe_exit import ForcedExit
from hf_safe_exit.decoding import head_projection


@pytest.fixture(autouse=True)
def _fresh_probes(one_thread, monkeypatch):
    monkeypatch.setattr(head_projection, "_IDENTICAL", {})
    yield


@pytest.fixture
def chunk_calls(monkeypatch):
    """The projections computed in chunks (the probes' own chunked projections are not counted)."""
    calls, probing = [], []
    real_chunked, real_probe = head_projection._chunked, head_projection._probe_identical

    def spy(x, weight, chunk):
        if not probing:
            calls.append((x.shape, chunk))
        return real_chunked(x, weight, chunk)

    def probe(*args):
        probing.append(True)
        try:
            return real_probe(*args)
        finally:
            probing.pop()

    monkeypatch.setattr(head_projection, "_chunked", spy)
    monkeypatch.setattr(head_projection, "_probe_identical", probe)
    return calls


def skip_unless_chunks_are_exact():
    if not all(head_projection._IDENTICAL.values()):
        pytest.skip("this BLAS rounds the vocabulary chunks differently, so head(x) itself is used (checked above)")


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
    skip_unless_chunks_are_exact()
    assert sorted({s[:-1].numel() for s, _ in chunk_calls}) == list(range(4, 16))
    assert all(chunk < 32128 for _, chunk in chunk_calls)


def test_inputs_at_any_alignment_and_thread_count():
    # a state sliced out of a larger buffer starts at any float offset from the allocator's 64-byte alignment; the
    # probe is keyed by that offset and by the thread count, so every call still equals the head's own forward
    head = linear(32128, 768)
    buffer = torch.randn(8 * 768 + 16)
    with torch.no_grad():
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for k in range(16):
                x = buffer[k:k + 8 * 768].view(8, 1, 768)
                assert torch.equal(head_projection.project(head, x), head(x)), (threads, k)
    assert len(head_projection._IDENTICAL) == 32


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
    compiled = linear(4096, 64)
    compiled._compiled_call_impl = lambda x: torch.ones(x.shape[0], 4096)  # what Module.compile() installs

    class Quantised(torch.Tensor):  # a weight tensor subclass (torchao-style) that keeps the Linear's type
        pass

    subclassed = linear(4096, 64)
    weight = subclassed.weight.detach().as_subclass(Quantised)
    del subclassed.weight
    subclassed.weight = weight
    with torch.no_grad():
        for head in (hooked, biased, scaled, replaced, compiled, subclassed):
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
    # our loop with every token at the last layer (ForcedExit(L); λ = 1 itself runs HF's own loop), a 32,128-token
    # vocabulary in float32: the read-out of 4 and 8 rows goes through the chunks, and the tokens and logits are
    # HF's bit for bit; a forced exit reads out every exiting row through them too
    torch.manual_seed(3)
    cfg = T5Config(vocab_size=32128, d_model=512, d_kv=16, d_ff=128, num_heads=4, num_layers=2, num_decoder_layers=2,
                   decoder_start_token_id=0, eos_token_id=1, pad_token_id=0, tie_word_embeddings=kind == "tied",
                   feed_forward_proj="relu" if kind == "tied" else "gated-gelu")
    model = hf_safe_exit.enable(T5ForConditionalGeneration(cfg).eval())
    ids = torch.randint(2, 32128, (rows, 9))
    kwargs = dict(input_ids=ids, max_new_tokens=6, min_new_tokens=6, return_dict_in_generate=True, output_logits=True)
    ours = model.generate(**kwargs, early_exit=ForcedExit(cfg.num_decoder_layers))
    theirs = type(model).generate(model, **kwargs)
    assert torch.equal(ours.sequences, theirs.sequences)
    assert all(torch.equal(a, b) for a, b in zip(ours.logits, theirs.logits))
    skip_unless_chunks_are_exact()
    assert any(shape[:-1].numel() == rows for shape, _ in chunk_calls)
    chunk_calls.clear()
    model.generate(**kwargs, early_exit=ForcedExit(1))
    assert chunk_calls
