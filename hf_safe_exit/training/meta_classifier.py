"""Training CALM's meta-classifier confidence head (Schuster et al. 2022, Eq. 7).

The backbone is frozen. Decoder states of every layer but the last are collected
with teacher forcing; the input of the head is ``decoder.final_layer_norm`` of the
raw block output and the label is 1 iff that layer's read-out argmax equals the
last layer's argmax at the same position. The loss is class-balanced
cross-entropy with weights n / (2 n_c).
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F

from ..confidence.meta import MetaClassifierHead, MetaHeadConfig
from ..decoding.readout import check_supported_model, intermediate_logits

__all__ = ["collect_meta_examples", "meta_labels", "balanced_class_weights", "train_meta_classifier"]


@torch.no_grad()
def meta_labels(model, outputs, mask: torch.Tensor | None = None):
    """For a teacher-forced forward ``outputs`` (with hidden states), return ``(features, labels, layers)``.

    ``features``: (N, d_model) normed states of layers 1..L-1 at the valid positions,
    ``labels``: (N,) 1 iff that layer's argmax equals the last layer's, ``layers``: (N,) 1-based layer index.
    """
    hs = outputs.decoder_hidden_states
    L = len(hs) - 1
    final_top = outputs.logits.argmax(-1)
    if mask is None:
        mask = torch.ones_like(final_top, dtype=torch.bool)
    feats, labels, layers = [], [], []
    for i in range(1, L):
        normed = model.decoder.final_layer_norm(hs[i])
        top = intermediate_logits(model, normed, normed=True).argmax(-1)
        feats.append(normed[mask])
        labels.append((top == final_top)[mask].long())
        layers.append(torch.full_like(labels[-1], i))
    return torch.cat(feats), torch.cat(labels), torch.cat(layers)


@torch.no_grad()
def collect_meta_examples(model, batches: Iterable[dict], *, max_examples: int | None = None):
    """Run teacher-forced forwards over ``batches`` (dicts with ``input_ids``, ``attention_mask``, ``labels``)
    and stack the meta-classifier training examples. Returns ``(features, labels, layers)`` on CPU."""
    check_supported_model(model)
    model.eval()
    device = next(model.parameters()).device
    F_, Y_, I_ = [], [], []
    n = 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        labels = batch["labels"]
        out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                    decoder_input_ids=model._shift_right(labels), output_hidden_states=True,
                    return_dict=True, use_cache=False)
        f, y, i = meta_labels(model, out, labels != -100)
        F_.append(f.float().cpu()); Y_.append(y.cpu()); I_.append(i.cpu())
        n += y.numel()
        if max_examples is not None and n >= max_examples:
            break
    f, y, i = torch.cat(F_), torch.cat(Y_), torch.cat(I_)
    if max_examples is not None:
        f, y, i = f[:max_examples], y[:max_examples], i[:max_examples]
    return f, y, i


def balanced_class_weights(labels: torch.Tensor) -> torch.Tensor:
    """Weights n / (2 n_c) for classes 0 and 1 (a class absent from ``labels`` gets weight 0)."""
    n = labels.numel()
    counts = torch.bincount(labels.long(), minlength=2).double()
    w = torch.where(counts > 0, n / (2.0 * counts.clamp_min(1)), torch.zeros_like(counts))
    return w.float()


def train_meta_classifier(model, dataloader_or_batches: Iterable[dict], *, hidden_size: int = 0,
                          epochs: int = 5, lr: float = 1e-3, batch_size: int = 1024, weight_decay: float = 0.0,
                          max_examples: int | None = 200_000, seed: int = 0,
                          return_stats: bool = False):
    """Train a :class:`MetaClassifierHead` for ``model`` with the backbone frozen.

    ``dataloader_or_batches`` yields dicts with ``input_ids``, ``attention_mask`` and
    ``labels`` (-100 = padding). Returns the head (in eval mode, on the model's
    device); save it next to the model with ``head.save_pretrained(model_dir)``.
    With ``return_stats=True`` returns ``(head, stats)`` with the class balance and
    the final training accuracy.
    """
    check_supported_model(model)
    was_training = model.training
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        feats, labels, layers = collect_meta_examples(model, dataloader_or_batches, max_examples=max_examples)
    finally:
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
        model.train(was_training)
    if labels.numel() == 0:
        raise ValueError("no target positions found in the batches")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = MetaClassifierHead(MetaHeadConfig(d_model=model.config.d_model, hidden_size=hidden_size))
    cw = balanced_class_weights(labels)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    head.train()
    n = labels.numel()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for s in range(0, n, batch_size):
            idx = perm[s:s + batch_size]
            loss = F.cross_entropy(head(feats[idx]), labels[idx], weight=cw)
            opt.zero_grad()
            loss.backward()
            opt.step()
    head.eval()
    with torch.no_grad():
        pred = head(feats).argmax(-1)
        acc = (pred == labels).float().mean().item()
        bal = 0.5 * sum(((pred == c) & (labels == c)).sum().item() / max((labels == c).sum().item(), 1) for c in (0, 1))
    param = next(model.parameters())
    head.to(device=param.device)
    stats = {"n_examples": n, "positive_rate": labels.float().mean().item(), "class_weights": cw.tolist(),
             "train_accuracy": acc, "train_balanced_accuracy": bal,
             "positive_rate_per_layer": {int(i): labels[layers == i].float().mean().item()
                                         for i in layers.unique().tolist()}}
    return (head, stats) if return_stats else head
