"""Held-out likelihood: the NELBO upper bound on NLL, averaged over batches and K t-samples per batch."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from loopdlm.diffusion.masked import reads_out_positions
from loopdlm.models.transformer import LoopedTransformer


@dataclass
class LikelihoodReport:
    """NELBO in nats per token, bits per token and the perplexity bound exp(nats); tokens scored; bits per
    character when the characters per token of the scored text are known; each batch's NLL sum and scored tokens
    (for standard errors)."""

    loops: int
    nats_per_token: float
    tokens: int
    characters_per_token: float | None = None
    batch_nll: list[float] = field(default_factory=list)
    batch_tokens: list[float] = field(default_factory=list)

    @property
    def standard_error(self) -> float:
        """Standard error of nats_per_token over the scored batches (ratio estimator; nan below two batches)."""
        return _ratio_standard_error(self.batch_nll, self.batch_tokens)

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
                "bits_per_char": self.bits_per_char, "ppl_bound": self.perplexity_bound, "tokens": self.tokens,
                "standard_error": self.standard_error}


def paired_difference(report: LikelihoodReport, reference: LikelihoodReport) -> tuple[float, float]:
    """(report - reference in nats/token, its standard error) for two reports scored on the same batches with the
    same noise (as `likelihood_bound` does for every S under one seed): the shared noise cancels batch by batch,
    so a difference in S is resolved far below either report's own standard error."""
    if report.batch_tokens != reference.batch_tokens:
        raise ValueError("paired_difference needs two reports over the same batches")
    difference = [a - b for a, b in zip(report.batch_nll, reference.batch_nll)]
    return report.nats_per_token - reference.nats_per_token, _ratio_standard_error(difference, report.batch_tokens)


def _ratio_standard_error(sums: list[float], counts: list[float]) -> float:
    """Standard error of sum(sums) / sum(counts) over n >= 2 batches (delta method for a ratio of means)."""
    n, total = len(sums), sum(counts)
    if n < 2 or total <= 0:
        return math.nan
    ratio = sum(sums) / total
    residuals = sum((value - ratio * count) ** 2 for value, count in zip(sums, counts))
    return math.sqrt(n / (n - 1) * residuals) / total


def bits_per_char(nats_per_token: float, characters_per_token: float | None) -> float | None:
    """nats/token -> bits/character of the underlying text (None when characters per token are unknown)."""
    if not characters_per_token:
        return None
    return nats_per_token / math.log(2) / characters_per_token


@torch.no_grad()
def likelihood_bound(model: LoopedTransformer, objective, batches: Iterable[tuple[Tensor, Tensor | None]],
                     loops: int, samples: int = 1, seed: int = 0, characters_per_token: float | None = None, *,
                     autocast_dtype: torch.dtype | None = None,
                     reduce: Callable[[Tensor], Tensor] | None = None) -> LikelihoodReport:
    """NELBO of `model` run with S = `loops`, token-weighted over `batches` of (x0 [B, L], noisable [B, L] | None),
    each scored with `samples` independent t draws (a tighter Monte-Carlo estimate of the same bound).

    Deterministic for a given seed, so values are comparable across checkpoints; training's validation calls it
    with the same seed as `loopdlm eval`, so the two agree. autocast_dtype: run the model under autocast to this
    dtype (None = as it is); reduce: sums the per-batch (NLL, tokens) float64 [2, N] over processes in place (the
    trainer's all-reduce), so every rank reports the whole validation set.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    batch_nll, batch_tokens = [], []

    @reads_out_positions
    def denoiser(tokens: Tensor, **kwargs) -> Tensor:
        return model(tokens, loops=loops, **kwargs).logits

    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        for x0, noisable in batches:
            x0 = x0.to(device)
            noisable = noisable.to(device) if noisable is not None else None
            terms = objective.bound(denoiser, x0, generator, noisable, samples)
            batch_nll.append(terms.nll_sum.double())
            batch_tokens.append(terms.n_tokens.double())
    model.train(was_training)
    sums = torch.stack((torch.stack(batch_nll), torch.stack(batch_tokens))) if batch_nll else \
        torch.zeros(2, 0, dtype=torch.float64, device=device)
    if reduce is not None:
        reduce(sums)
    batch_nll, batch_tokens = sums.tolist()
    total_tokens = sum(batch_tokens)
    return LikelihoodReport(loops=loops, nats_per_token=sum(batch_nll) / max(total_tokens, 1.0),
                            tokens=int(total_tokens), characters_per_token=characters_per_token,
                            batch_nll=batch_nll, batch_tokens=batch_tokens)
