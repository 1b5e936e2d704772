"""Autoregressive training of a judge model for generative perplexity, reusing the diffusion trainer.

A judge is a plain `LoopedTransformer` (usually without a looped core) built with `model.causal = true`, so its
forward masks attention causally whenever no mask is passed, and trained on next-token prediction. The flag is
part of the saved model config, so `load_pretrained` restores a causal model. `next_token_nll` is the one
next-token NLL: the judge's training loss here, and its score of generated text in `eval/genppl.py`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from loopdlm.diffusion.masked import Denoiser, NelboHooks, NelboTerms


def next_token_nll(logits: Tensor, tokens: Tensor) -> Tensor:
    """-log p(tokens[:, i + 1] | tokens[:, :i + 1]) for every predicted position, from a causal model's output.

    logits: float [B, L, V], the model's logits on `tokens` (position i predicts token i + 1; the last position
    predicts nothing); tokens: int64 [B, L]. Returns float32 [B, L - 1] in nats (computed in float32 whatever the
    logits' dtype).
    """
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return -log_probs.gather(-1, tokens[:, 1:, None]).squeeze(-1)


class NextTokenObjective(NelboHooks):
    """Next-token cross-entropy in the trainer's `Objective` shape: `nelbo` returns the exact NLL of x0[:, 1:]
    given its prefix (an autoregressive model has no bound to take), in nats per predicted token."""

    def nelbo(self, denoiser: Denoiser, x0: Tensor, generator: torch.Generator | None = None,
              noisable: Tensor | None = None) -> NelboTerms:
        """denoiser: tokens [B, L] -> logits [B, L, V] (causal); x0 int64 [B, L]. `generator` is unused (nothing
        is random); `noisable` bool [B, L], when given, restricts scoring to those target positions."""
        nll = next_token_nll(denoiser(x0), x0)
        scored = torch.ones_like(nll, dtype=torch.bool) if noisable is None else noisable[:, 1:]
        row_nll = torch.where(scored, nll, torch.zeros_like(nll)).sum(dim=1)
        row_tokens = scored.sum(dim=1).float()
        return NelboTerms(nll_sum=row_nll.sum(), n_tokens=row_tokens.sum(),
                          per_row=row_nll / row_tokens.clamp(min=1))

    def bound(self, denoiser: Denoiser, x0: Tensor, generator: torch.Generator | None = None,
              noisable: Tensor | None = None, samples: int = 1) -> NelboTerms:
        """The reported validation value: the exact NLL, as `nelbo`. Nothing is sampled, so `samples` draws would
        all be equal and one is computed."""
        return self.nelbo(denoiser, x0, generator, noisable)
