"""Held-out likelihood: the NELBO upper bound on NLL, averaged over batches and K t-samples per batch."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from loopdlm.models.transformer import LoopedTransformer


@dataclass
class LikelihoodReport:
    """NELBO in nats per token, bits per token and the perplexity bound exp(nats); tokens scored; bits per
    character when the characters per token of the scored text are known."""

    loops: int
    nats_per_token: float
    tokens: int
    characters_per_token: float | None = None

    @property
    def bits_per_token(self) -> float:
        return self.nats_per_token / math.log(2)

    @property
    def bits_per_char(self) -> float | None:
        return bits_per_char(self.nats_per_token, self.characters_per_token)

    @property
    def perplexity_bound(self) -> float:
        return math.exp(self.nats_per_token)

    def as_dict(self) -> dict[str, float]:
        return {"loops": self.loops, "nats_per_token": self.nats_per_token, "bits_per_token": self.bits_per_token,
                "bits_per_char": self.bits_per_char, "ppl_bound": self.perplexity_bound, "tokens": self.tokens}


def bits_per_char(nats_per_token: float, characters_per_token: float | None) -> float | None:
    """nats/token -> bits/character of the underlying text (None when characters per token are unknown)."""
    if not characters_per_token:
        return None
    return nats_per_token / math.log(2) / characters_per_token


@torch.no_grad()
def likelihood_bound(model: LoopedTransformer, objective, batches: Iterable[tuple[Tensor, Tensor | None]],
                     loops: int, samples: int = 1, seed: int = 0, characters_per_token: float | None = None
                     ) -> LikelihoodReport:
    """NELBO of `model` run with S = `loops`, token-weighted over `batches` of (x0 [B, L], noisable [B, L] | None),
    each scored with `samples` independent t draws (a tighter Monte-Carlo estimate of the same bound).

    Deterministic for a given seed, so values are comparable across checkpoints.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    total_nll, total_tokens = 0.0, 0.0

    def denoiser(tokens: Tensor, **kwargs) -> Tensor:
        return model(tokens, loops=loops, **kwargs).logits

    for x0, noisable in batches:
        x0 = x0.to(device)
        noisable = noisable.to(device) if noisable is not None else None
        terms = objective.bound(denoiser, x0, generator, noisable, samples)
        total_nll += float(terms.nll_sum)
        total_tokens += float(terms.n_tokens)
    model.train(was_training)
    return LikelihoodReport(loops=loops, nats_per_token=total_nll / max(total_tokens, 1.0), tokens=int(total_tokens),
                            characters_per_token=characters_per_token)
