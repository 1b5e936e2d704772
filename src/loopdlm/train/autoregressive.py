"""Autoregressive training of a judge model for generative perplexity, reusing the diffusion trainer.

A judge is a plain `LoopedTransformer` (usually without a looped core) run with a causal attention mask and trained
on next-token prediction. Its checkpoint is an ordinary one (same weight names), so `load_pretrained` restores it;
whoever scores with it must pass the causal mask again (see `loopdlm.eval.genppl.LoopedJudge`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from loopdlm.diffusion.masked import Denoiser, NelboTerms
from loopdlm.models.transformer import DenoiserOutput, LoopedTransformer


def causal_mask(length: int, device: torch.device | str) -> Tensor:
    """bool [1, 1, L, L], True where query i may attend key j (j <= i)."""
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None]


class CausalTransformer(LoopedTransformer):
    """A `LoopedTransformer` whose forward defaults to a causal mask, so the trainer (which passes no mask) trains
    it autoregressively. Weight names are those of `LoopedTransformer`."""

    def forward(self, tokens: Tensor, loops: int = 1, position_ids: Tensor | None = None,
                attn_mask: Tensor | None = None, **kwargs) -> DenoiserOutput:
        """As `LoopedTransformer.forward` (tokens int64 [B, L]); attn_mask None means causal over the L tokens."""
        if attn_mask is None:
            attn_mask = causal_mask(tokens.shape[1], tokens.device)
        return super().forward(tokens, loops, position_ids, attn_mask, **kwargs)


class NextTokenObjective:
    """Next-token cross-entropy in the trainer's `Objective` shape: `nelbo` returns the exact NLL of x0[:, 1:]
    given its prefix (an autoregressive model has no bound to take), in nats per predicted token."""

    def nelbo(self, denoiser: Denoiser, x0: Tensor, generator: torch.Generator | None = None,
              noisable: Tensor | None = None) -> NelboTerms:
        """denoiser: tokens [B, L] -> logits [B, L, V] (causal); x0 int64 [B, L]. `generator` is unused (nothing
        is random); `noisable` bool [B, L], when given, restricts scoring to those target positions."""
        logits = denoiser(x0)[:, :-1].float()
        targets = x0[:, 1:]
        nll = -torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None]).squeeze(-1)
        scored = torch.ones_like(targets, dtype=torch.bool) if noisable is None else noisable[:, 1:]
        row_nll = torch.where(scored, nll, torch.zeros_like(nll)).sum(dim=1)
        row_tokens = scored.sum(dim=1).float()
        return NelboTerms(nll_sum=row_nll.sum(), n_tokens=row_tokens.sum(),
                          per_row=row_nll / row_tokens.clamp(min=1))

    def bound(self, denoiser: Denoiser, x0: Tensor, generator: torch.Generator | None = None,
              noisable: Tensor | None = None, samples: int = 1) -> NelboTerms:
        """The reported validation value: the exact NLL, as `nelbo`. Nothing is sampled, so `samples` draws would
        all be equal and one is computed."""
        return self.nelbo(denoiser, x0, generator, noisable)
