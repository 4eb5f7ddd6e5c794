"""One BiLD generation, round by round: the small model drafts, the large model verifies, each row commits.

The algorithm, its thresholds and what it guarantees are described in :mod:`hf_safe_exit.decoding.bild`; the
per-row croppable caches in :mod:`hf_safe_exit.decoding.bild_cache`.
"""

from __future__ import annotations

from typing import Callable

import torch

from .bild_cache import BiLDDecoder, common_prefix
from .bild_output import BiLDOutput, BiLDStats

__all__ = ["BiLDRun"]

ROW_COUNTS = ("row_accepted", "row_rolled_back", "row_large_tokens", "row_large_calls", "row_small_calls")


class BiLDRun:
    """The state of one BiLD ``generate`` call: both decoders, every row's committed tokens, the statistics.

    ``while run.active: run.round(callback)`` decodes until every row has stopped; :meth:`output` then returns
    what ``generate`` returns. Rows leave ``active`` as they finish; ``seqs`` keeps every row's tokens.
    """

    def __init__(self, large: BiLDDecoder, small: BiLDDecoder, input_ids: torch.Tensor, logits_processor,
                 stopping_criteria, gen_cfg, *, fallback: float, rollback: float, max_draft_len: int,
                 stats: BiLDStats):
        self.large, self.small = large, small
        self.device = input_ids.device
        self.logits_processor = logits_processor
        self.use_processors = len(logits_processor) > 0
        self.stopping_criteria = stopping_criteria
        self.do_sample = bool(gen_cfg.do_sample)
        self.max_length = gen_cfg.max_length
        self.fallback, self.rollback, self.max_draft = fallback, rollback, max_draft_len
        self.stats = stats
        self.seqs: list[list[int]] = [row.tolist() for row in input_ids]
        self.start_len = input_ids.shape[1]
        self.per_row = {name: [0] * len(self.seqs) for name in ROW_COUNTS}
        self.active = list(range(len(self.seqs)))

    # -- scores and stops, per row and position, with that position's own prefix ------------------
    def process(self, prefix: list[int], logits: torch.Tensor) -> torch.Tensor:
        if not self.use_processors:
            return logits
        ids = torch.tensor([prefix], dtype=torch.long, device=self.device)
        return self.logits_processor(ids, logits[None])[0]

    def choose(self, scores: torch.Tensor) -> int:
        if self.do_sample:
            return int(torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1)[0])
        return int(torch.argmax(scores))

    def stops(self, seq: list[int]) -> bool:
        ids = torch.tensor([seq], dtype=torch.long, device=self.device)
        return bool(self.stopping_criteria(ids, None)[0])

    # -- one round ---------------------------------------------------------------------------------
    def round(self, step_callback: Callable | None = None) -> None:
        """Draft, verify and commit once for every active row; crop both caches to the kept prefixes, report the
        round to ``step_callback`` (see :meth:`hf_safe_exit.decoding.bild.BiLD.decode`), drop finished rows."""
        active = self.active
        cur = [self.seqs[r] for r in active]
        drafts, fell_back = self.draft(cur)
        out = self.large.forward([c + d for c, d in zip(cur, drafts)], [len(d) + 1 for d in drafts])
        self.stats.large_model_calls += 1
        for r in active:
            self.per_row["row_large_calls"][r] += 1
        dropped, finished = [0] * len(active), [False] * len(active)
        for i, r in enumerate(active):  # each row commits right after its verdict: `cur[i]` is `seqs[r]`
            new, from_large, dropped[i] = self.verify_row(r, cur[i], drafts[i], fell_back[i], out[i])
            finished[i] = self.commit_row(r, new, from_large)
        for dec in (self.large, self.small):
            dec.truncate([common_prefix(t, self.seqs[r]) for t, r in zip(dec.tokens, active)])
        if step_callback is not None:
            step_callback({"large": self.large, "small": self.small, "rows": list(active),
                           "sequences": [list(self.seqs[r]) for r in active],
                           "rolled_back": [d > 0 for d in dropped], "rolled_back_tokens": list(dropped)})
        self._drop_finished(finished)

    def draft(self, cur: list[list[int]]) -> tuple[list[list[int]], list[bool]]:
        """The small model's drafts after each row's tokens ``cur``, in lockstep, and which drafts ended in a fallback.

        A row drafts until its confidence falls below the fallback threshold, it has ``max_draft_len`` tokens, or a
        stopping criterion fires; a row already at ``max_length`` drafts nothing.
        """
        n = len(cur)
        drafts: list[list[int]] = [[] for _ in range(n)]
        fell_back = [False] * n
        drafting = [self.max_length is None or len(cur[i]) < self.max_length for i in range(n)]
        while any(drafting):
            full = [cur[i] + drafts[i] for i in range(n)]
            out = self.small.forward(full, [1 if drafting[i] else 0 for i in range(n)])
            self.stats.small_model_calls += 1
            for r in self.active:
                self.per_row["row_small_calls"][r] += 1
            for i in range(n):
                if not drafting[i]:
                    continue
                scores = self.process(full[i], out[i][-1])
                probs = torch.softmax(scores, dim=-1)
                if float(probs.max()) < self.fallback:
                    drafting[i], fell_back[i] = False, True
                    self.stats.num_fallbacks += 1
                    continue
                token = int(torch.multinomial(probs, 1)[0]) if self.do_sample else int(torch.argmax(scores))
                drafts[i].append(token)
                self.stats.num_drafted += 1
                if len(drafts[i]) >= self.max_draft or self.stops(full[i] + [token]):
                    drafting[i] = False
        return drafts, fell_back

    def verify_row(self, r: int, cur: list[int], draft: list[int], fell_back: bool,
                   logits: torch.Tensor) -> tuple[list[int], list[bool], int]:
        """The large model's verdict on row ``r``'s ``draft`` after ``cur``, from its ``logits`` at every drafted
        position and one more: the tokens to commit, whether each is the large model's, and how many drafted tokens
        were rolled back (0 when none was)."""
        new: list[int] = []
        from_large: list[bool] = []
        for j in range(len(draft) + 1):
            prefix = cur + draft[:j]
            if j < len(draft):
                scores = self.process(prefix, logits[j])
                logp = float(torch.log_softmax(scores, dim=-1)[draft[j]])
                if -logp > self.rollback:
                    new.append(self.choose(scores))
                    from_large.append(True)
                    dropped = len(draft) - j
                    self.stats.num_rollbacks += 1
                    self.stats.num_rolled_back += dropped
                    self.per_row["row_rolled_back"][r] += dropped
                    return new, from_large, dropped
                new.append(draft[j])
                from_large.append(False)
            elif fell_back:  # the pass already computed the large model's token after the whole draft
                new.append(self.choose(self.process(prefix, logits[j])))
                from_large.append(True)
        return new, from_large, 0

    def commit_row(self, r: int, new: list[int], from_large: list[bool]) -> bool:
        """Append ``new`` to row ``r`` up to the first token after which it stops; returns whether it stopped."""
        seq = self.seqs[r]
        for token, large_token in zip(new, from_large):
            seq.append(token)
            if large_token:
                self.stats.num_large_tokens += 1
                self.per_row["row_large_tokens"][r] += 1
            else:
                self.stats.num_accepted += 1
                self.per_row["row_accepted"][r] += 1
            if self.stops(seq):
                return True
        if not new:  # cannot happen: an empty draft always falls back
            raise AssertionError("BiLD made no progress")
        return False

    def _drop_finished(self, finished: list[bool]) -> None:
        if any(finished):
            keep = [i for i, done in enumerate(finished) if not done]
            self.active = [self.active[i] for i in keep]
            if self.active:
                self.large.select_rows(keep)
                self.small.select_rows(keep)

    # -- the result --------------------------------------------------------------------------------
    def output(self, pad_id: int, return_dict: bool):
        """Every row's tokens, padded with ``pad_id`` to the longest; a :class:`BiLDOutput` with the statistics
        when ``return_dict``."""
        batch, device = len(self.seqs), self.device
        sequences = torch.full((batch, max(len(s) for s in self.seqs)), pad_id, dtype=torch.long, device=device)
        for r, s in enumerate(self.seqs):
            sequences[r, : len(s)] = torch.tensor(s, dtype=torch.long, device=device)
        new_tokens = [len(s) - self.start_len for s in self.seqs]
        self.stats.num_new_tokens = sum(new_tokens)
        if not return_dict:
            return sequences
        rows = {name: torch.tensor(v, dtype=torch.long, device=device) for name, v in self.per_row.items()}
        rows["row_new_tokens"] = torch.tensor(new_tokens, dtype=torch.long, device=device)
        return BiLDOutput(sequences=sequences, **self.stats.as_dict(), **rows)
