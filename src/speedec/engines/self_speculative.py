"""Draft-then-verify self-speculation (the LayerSkip recipe), the SPEED peer.

Each round drafts ``draft_tokens`` (k) guesses one after another with only the
first ``exit_loop`` loops (reading the early exit), then pushes all k + 1 rows
(the last verified token and the k guesses) through the remaining loops as one
batch, reusing the cache entries the draft wrote for the early loops. The
longest prefix of guesses that the final predictions confirm is kept, plus
the final prediction after it (always correct), so every round yields between
1 and k + 1 tokens and the output equals greedy decoding.
"""

from __future__ import annotations

import torch

from ..cache import KVCache
from ..errors import GenerationError
from ..sampling import Sampler
from .base import Engine, GenerationStats, Output
from .protocol import DecodingModel


class SelfSpeculativeEngine(Engine):
    name = "self-speculative"

    def __init__(self, model: DecodingModel, *, draft_tokens: int = 4) -> None:
        super().__init__(model)
        if not model.config.has_early_exit:
            raise GenerationError(
                "the self-speculative engine needs a model with an early exit (n_loops >= 2); "
                "decode this model with the autoregressive engine")
        if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, int) or draft_tokens < 1:
            raise GenerationError(f"draft_tokens must be an integer >= 1, got {draft_tokens!r}")
        self.draft_tokens = draft_tokens

    def decode(self, cache: KVCache, first_pos: int, out: Output, stats: GenerationStats,
               sampler: Sampler) -> None:
        model = self.model
        c = model.config
        exit_loop, n_loops = c.exit_loop, c.n_loops
        pos = first_pos  # position of the last verified token, not yet processed
        rows_total = 0
        while not out.done:
            remaining = out.max_new_tokens - len(out.tokens)
            k = min(self.draft_tokens, remaining - 1)  # rows past the last needed token are waste

            # Draft: row i (token at pos + i) through the early loops gives guess i + 1.
            tokens = [out.tokens[-1]]
            hidden, draft_probs = [], []
            for i in range(k + 1):
                x = model.embed_rows(torch.tensor([[tokens[i]]], device=model.device))  # [1, 1, D]
                hidden.append(model.run_loops(x, model.layout([[pos + i]], [0]), cache, exit_loop))
                if i < k:
                    exit_logits = model.exit_head(hidden[-1][0, 0])
                    stats.lm_head_calls += 1
                    if sampler.greedy:
                        tokens.append(int(exit_logits.argmax()))  # deliberate sync per guess
                    else:
                        draft_probs.append(sampler.probs(exit_logits))
                        tokens.append(sampler.draw(draft_probs[-1]))
            stats.steps += (k + 1) * exit_loop
            stats.drafts_launched += k

            # Verify: all k + 1 rows through the remaining loops at once, causal among themselves,
            # each as a group of its own (one row per group, as every other engine decodes: a
            # row's attention is then computed as it is alone, in every dtype, so the verified
            # tokens are autoregressive's bit for bit).
            x = torch.cat(hidden, dim=0)  # [k + 1, 1, D]
            layout = model.layout([[pos + i] for i in range(k + 1)], [exit_loop] * (k + 1))
            x = model.run_loops(x, layout, cache, n_loops - exit_loop)
            stats.steps += n_loops - exit_loop
            stats.lm_head_calls += 1
            rows_total += (k + 1) * exit_loop + (k + 1) * (n_loops - exit_loop)
            final_logits = model.head(x[:, 0])  # [k + 1, V]
            emitted = self._judge(final_logits, tokens[1:], draft_probs, sampler)
            accepted = len(emitted) - 1
            stats.drafts_accepted += accepted
            if accepted < k:
                stats.drafts_rejected += 1
                stats.drafts_discarded += k - accepted - 1
                stats.flushes += 1
            for token in emitted:
                out.emit(token)
                if out.done:
                    break
            pos += accepted + 1
        stats.mean_in_flight = rows_total / stats.steps if stats.steps else 0.0

    @staticmethod
    def _judge(final_logits: torch.Tensor, guesses: list[int], draft_probs: list[torch.Tensor],
               sampler: Sampler) -> list[int]:
        """Tokens a round yields: the kept prefix of the guesses, then one verified token.

        Row i of ``final_logits`` is the truth for the position of guess i.
        """
        if sampler.greedy:
            final = final_logits.argmax(-1).tolist()  # deliberate host sync: once per round
            n = 0
            while n < len(guesses) and guesses[n] == final[n]:
                n += 1
            return final[: n + 1]
        emitted = []
        for i, guess in enumerate(guesses):
            kept, token = sampler.accept(sampler.probs(final_logits[i]), draft_probs[i], guess)
            emitted.append(token)
            if not kept:
                return emitted
        emitted.append(sampler.draw(sampler.probs(final_logits[len(guesses)])))
        return emitted
