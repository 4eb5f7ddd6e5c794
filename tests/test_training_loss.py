"""CALM loss and meta-classifier training checked against hand computations on tiny T5s."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import T5Config, T5ForConditionalGeneration

from hf_safe_exit.confidence.meta import MetaClassifierHead
from hf_safe_exit.training import (CALMSeq2SeqTrainer, balanced_class_weights, calm_loss, collect_meta_examples,
                                   layer_weights, train_meta_classifier)


def tiny_t5(tied: bool, seed: int = 0, dec_layers: int = 3, dtype=torch.float64):
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=40, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=dec_layers,
                   num_heads=2, feed_forward_proj="gated-gelu" if not tied else "relu", tie_word_embeddings=tied,
                   decoder_start_token_id=0, dropout_rate=0.0, initializer_factor=4.0)
    return T5ForConditionalGeneration(cfg).to(dtype).eval()


def tiny_batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 40, (3, 7), generator=g)
    att = torch.ones_like(ids)
    att[1, 5:] = 0
    ids[1, 5:] = 0
    labels = torch.randint(3, 40, (3, 5), generator=g)
    labels[0, 3:] = -100  # padded targets
    labels[2, 4:] = -100
    return {"input_ids": ids, "attention_mask": att, "labels": labels}


def rms_norm(h, weight, eps):
    return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps))


def hand_layer_losses(model, batch):
    """Each layer's CE computed independently: RMS norm, scale, tied/untied head, log-softmax, mean over targets."""
    cfg = model.config
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                output_hidden_states=True)
    hs = out.decoder_hidden_states
    L = cfg.num_decoder_layers
    assert len(hs) == L + 1
    W = model.lm_head.weight
    ln = model.decoder.final_layer_norm
    labels = batch["labels"]
    valid = labels != -100
    losses = []
    for i in range(1, L + 1):
        h = hs[i] if i == L else rms_norm(hs[i], ln.weight, ln.variance_epsilon)  # last entry already normed
        if cfg.scale_decoder_outputs:  # T5 v1.0 (tied) scaling; checked against HF's own loss below
            h = h * cfg.d_model ** -0.5
        logp = torch.log_softmax(h @ W.T, dim=-1)
        nll = -logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        losses.append(nll[valid].sum() / valid.sum())
    return torch.stack(losses), out.loss


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("weighting", ["linear", "uniform", "geometric"])
def test_weighted_loss_equals_hand_computation(tied, weighting):
    model = tiny_t5(tied)
    assert model.config.scale_decoder_outputs == tied
    batch = tiny_batch()
    hand, hf_loss = hand_layer_losses(model, batch)
    L = hand.numel()
    if weighting == "linear":
        w = torch.tensor([i / (L * (L + 1) / 2) for i in range(1, L + 1)], dtype=torch.float64)
    elif weighting == "uniform":
        w = torch.full((L,), 1.0 / L, dtype=torch.float64)
    else:
        w = torch.tensor([2.0 ** (i - 1) for i in range(1, L + 1)], dtype=torch.float64)
        w = w / w.sum()
    out = calm_loss(model, batch, weighting=weighting)
    torch.testing.assert_close(out.layer_losses.double(), hand, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.loss.double(), (w * hand).sum(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.weights.double(), w, rtol=1e-6, atol=1e-7)
    # the last layer's loss is HF's own seq2seq loss
    torch.testing.assert_close(hand[-1], hf_loss, rtol=1e-9, atol=1e-9)


class FixedMask(torch.nn.Module):
    """A deterministic stand-in for the decoder's dropout module: zero feature 0, double the rest."""

    def forward(self, h):
        scale = torch.full((h.shape[-1],), 2.0, dtype=h.dtype)
        scale[0] = 0.0
        return h * scale


def test_every_exit_is_read_out_through_the_decoder_dropout_like_the_last():
    """In training mode HF's last layer is read out as head(dropout(norm(h))): the intermediate exits must be
    read out the same way, or only the last exit trains on dropped-out features."""
    model = tiny_t5(tied=True).train()
    model.decoder.dropout = FixedMask()
    batch = tiny_batch()
    out = calm_loss(model, batch, return_outputs=True)
    hs, labels, cfg = out.outputs.decoder_hidden_states, batch["labels"], model.config
    ln, W, valid = model.decoder.final_layer_norm, model.lm_head.weight, batch["labels"] != -100
    for i in range(1, cfg.num_decoder_layers):
        h = FixedMask()(rms_norm(hs[i], ln.weight, ln.variance_epsilon)) * cfg.d_model ** -0.5
        nll = -torch.log_softmax(h @ W.T, dim=-1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(out.layer_losses[i - 1].double(), nll[valid].sum() / valid.sum(),
                                   rtol=1e-6, atol=1e-6)
    # the last exit is HF's own loss, which applies the same module after the final norm
    hf = model(**{k: v for k, v in batch.items()}).loss
    torch.testing.assert_close(out.layer_losses[-1].double(), hf, rtol=1e-6, atol=1e-6)
    # in eval mode nn.Dropout is the identity: the losses are the plain read-outs again
    model.decoder.dropout = torch.nn.Dropout(0.5)
    model.eval()
    torch.testing.assert_close(calm_loss(model, batch).layer_losses.double(), hand_layer_losses(model, batch)[0],
                               rtol=1e-6, atol=1e-6)


def test_layer_weights_values():
    assert layer_weights(4).tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert layer_weights(4, "uniform").tolist() == pytest.approx([0.25] * 4)
    assert layer_weights(3, "geometric", gamma=3.0).tolist() == pytest.approx([1 / 13, 3 / 13, 9 / 13])
    with pytest.raises(ValueError):
        layer_weights(3, "cubic")


def test_one_step_lowers_loss_and_gradients_reach_backbone():
    model = tiny_t5(tied=False, dtype=torch.float32).train()
    batch = tiny_batch()
    before = calm_loss(model, batch).loss
    model.zero_grad()
    before.backward()
    for name in ("encoder.block.0.layer.0.SelfAttention.q.weight", "decoder.block.0.layer.1.EncDecAttention.k.weight",
                 "decoder.block.2.layer.2.DenseReluDense.wo.weight", "shared.weight"):
        g = dict(model.named_parameters())[name].grad
        assert g is not None and g.abs().sum() > 0, name
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    opt.step()
    after = calm_loss(model, batch).loss
    assert after.item() < before.item()


def test_trainer_compute_loss_matches_function(tmp_path):
    from transformers import Seq2SeqTrainingArguments

    model = tiny_t5(tied=True, dtype=torch.float32)
    args = Seq2SeqTrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, per_device_train_batch_size=3)
    trainer = CALMSeq2SeqTrainer(model=model, args=args, calm_weighting="linear")
    batch = tiny_batch()
    got = trainer.compute_loss(model, dict(batch))
    ref = calm_loss(model, batch).loss
    torch.testing.assert_close(got, ref)
    with pytest.raises(ValueError):
        CALMSeq2SeqTrainer(model=model, args=args, calm_weighting="bogus")


def test_meta_labels_match_hand_computation():
    model = tiny_t5(tied=True)
    batch = tiny_batch()
    feats, labels, layers = collect_meta_examples(model, [batch])
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                output_hidden_states=True)
    hs, ln, cfg = out.decoder_hidden_states, model.decoder.final_layer_norm, model.config
    valid = batch["labels"] != -100
    final = (hs[-1] * cfg.d_model ** -0.5 @ model.lm_head.weight.T).argmax(-1)
    exp_f, exp_y = [], []
    for i in range(1, cfg.num_decoder_layers):
        n = rms_norm(hs[i], ln.weight, ln.variance_epsilon)
        top = (n * cfg.d_model ** -0.5 @ model.lm_head.weight.T).argmax(-1)
        exp_f.append(n[valid])
        exp_y.append((top == final)[valid].long())
    torch.testing.assert_close(feats.double(), torch.cat(exp_f), rtol=1e-5, atol=1e-6)
    assert labels.tolist() == torch.cat(exp_y).tolist()
    n_valid = int(valid.sum())
    assert layers.tolist() == [i for i in range(1, cfg.num_decoder_layers) for _ in range(n_valid)]
    assert 0 < labels.sum() < labels.numel()  # both classes present in this fixture


def test_balanced_class_weights_by_hand():
    y = torch.tensor([1, 1, 1, 0, 1, 1, 0, 1])  # n = 8, n0 = 2, n1 = 6
    assert balanced_class_weights(y).tolist() == pytest.approx([8 / 4, 8 / 12])
    assert balanced_class_weights(torch.tensor([1, 1])).tolist() == pytest.approx([0.0, 2 / 4])  # absent class: 0


def test_train_meta_classifier_uses_balanced_loss_and_saves(tmp_path):
    model = tiny_t5(tied=True, dtype=torch.float32)
    batches = [tiny_batch(s) for s in range(1, 6)]
    params_before = {k: v.clone() for k, v in model.state_dict().items()}
    head, stats = train_meta_classifier(model, batches, epochs=200, lr=1e-2, batch_size=4096, return_stats=True)
    for k, v in model.state_dict().items():  # backbone frozen
        assert torch.equal(v, params_before[k]), k
    assert all(p.requires_grad for p in model.parameters())  # flags restored
    assert isinstance(head, MetaClassifierHead) and head.config.d_model == model.config.d_model
    feats, labels, _ = collect_meta_examples(model, batches)
    cw = balanced_class_weights(labels)
    assert stats["class_weights"] == pytest.approx(cw.tolist())
    assert stats["positive_rate"] == pytest.approx(labels.float().mean().item())
    # class-balanced objective: a trained linear head beats chance on balanced accuracy
    assert stats["train_balanced_accuracy"] > 0.6
    loss = F.cross_entropy(head(feats), labels, weight=cw)
    assert math.isfinite(loss.item())
    head.save_pretrained(tmp_path)
    loaded = MetaClassifierHead.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded.prob_agree(feats), head.prob_agree(feats))
