"""MDLM: absorbing-state forward process, SUBS parameterisation and the continuous-time NELBO.

The objective knows nothing about looping: it calls a `Denoiser`, any callable mapping (tokens [B, L]) to
logits [B, L, V]; the trainer binds the loop count S into that callable. Only masked positions are scored, so a
denoiser marked with `reads_out_positions` is asked for the logits there alone (`logits_at`): the head, the
log-softmax and their backward then skip the unmasked positions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from loopdlm.diffusion.schedules import SCHEDULES, Schedule, make_schedule, stratified_times
from loopdlm.errors import ConfigError
from loopdlm.settings import NON_NEGATIVE, POSITIVE, PROBABILITY, OneOf, Range, check_fields, setting

#: tokens [B, L] -> logits [B, L, V]; one marked with `reads_out_positions` also takes readout_mask= (see there).
Denoiser = Callable[..., Tensor]
D = TypeVar("D", bound=Callable[..., Tensor])


@dataclass
class DiffusionConfig:
    """Noise process settings. `block_size` = None (or the sequence length) is MDLM; smaller is BD3-LM.

    eps is the smallest diffusion time. MDLM: t in [eps, 1], masking probability (1 - eps) t (kuleshov-group/mdlm's
    log-linear noise with sampling_eps). BD3-LM: t in [max(clip_low, eps), clip_high], masking probability t
    (kuleshov-group/bd3lms `_sample_t` with sampling_eps_min = 1e-3); eps = 0 is floored at 1e-6.
    """

    schedule: str = setting("loglinear", "noise schedule: " + " or ".join(SCHEDULES), OneOf(tuple(SCHEDULES)))
    eps: float = setting(1e-3, "MDLM: the schedule keeps a fraction eps of tokens unmasked at t = 1; block "
                         "diffusion: the smallest noise level t (BD3-LM's 1e-3; 0 = a 1e-6 floor)",
                         Range(0, 1, high_open=True))
    antithetic: bool = setting(True, "stratified (antithetic) noise levels t across a batch")
    block_size: int | None = setting(None, "block diffusion (BD3-LM) block length; unset or data.seq_len = MDLM",
                                     POSITIVE)
    clip_low: float = setting(0.0, "block diffusion: lower end of the clipped masking rate during training",
                              PROBABILITY)
    clip_high: float = setting(1.0, "block diffusion: upper end of the clipped masking rate during training",
                               PROBABILITY)
    adaptive_clip: bool = setting(False, "block diffusion: pick the lowest-variance clip interval on validation "
                                  "data")
    clip_search_batches: int = setting(100, "block diffusion with adaptive_clip: validation batches drawn to score "
                                       "each candidate noise interval (the BD3-LM reference uses up to 100)", POSITIVE)
    loop_supervision: float = setting(
        0.0, "per-loop (deep) supervision: training loss = final NELBO + this weight x the mean NELBO read out after "
        "each earlier loop (same noise); 0 = off. Reported NELBOs stay the final loop's", NON_NEGATIVE)

    def validate(self) -> None:
        """Raise ConfigError naming the first out-of-range field."""
        check_fields(self, "diffusion.")
        if self.clip_low >= self.clip_high:
            raise ConfigError(f"need diffusion.clip_low < diffusion.clip_high, got {self.clip_low}, {self.clip_high}")


@dataclass
class NelboTerms:
    """Sums over a batch: weighted NLL (nats), number of scored tokens, and the per-row NELBO [B] (nats/token)."""

    nll_sum: Tensor
    n_tokens: Tensor
    per_row: Tensor

    @property
    def loss(self) -> Tensor:
        """Mean NELBO in nats per scored token (a scalar to minimise)."""
        return self.nll_sum / self.n_tokens.clamp(min=1)


def reads_out_positions(denoiser: D) -> D:
    """Mark `denoiser` as taking `readout_mask=` (bool [B, L]) and then returning logits [N, V] at those positions
    only, in row-major order (as `LoopedTransformer` does); `logits_at` then asks it for the scored positions alone.
    Returns the denoiser itself."""
    denoiser.reads_out_positions = True
    return denoiser


def logits_at(denoiser: Denoiser, tokens: Tensor, positions: Tensor, **inputs) -> Tensor:
    """The denoiser's logits on `tokens` [B, L_in] at the True entries of `positions` bool [B, L_in]: [N, V] in
    row-major order. Only those are computed when the denoiser `reads_out_positions`; otherwise they are selected
    from its full logits [B, L_in, V]. `inputs` (position_ids, attn_mask, ...) go to the denoiser."""
    if getattr(denoiser, "reads_out_positions", False):
        return denoiser(tokens, readout_mask=positions, **inputs)
    return denoiser(tokens, **inputs)[positions]


def subs_log_probs(logits: Tensor, mask_id: int) -> Tensor:
    """SUBS (a): the model never predicts the mask token. logits [..., V] -> float32 log-probs [..., V]."""
    blocked = torch.tensor([mask_id], device=logits.device)
    return torch.log_softmax(logits.float().index_fill(-1, blocked, float("-inf")), dim=-1)


def apply_mask(x0: Tensor, mask_prob: Tensor, noisable: Tensor | None, mask_id: int,
               generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Absorbing-state forward process: each noisable token becomes `mask_id` with probability `mask_prob`.

    Args:
        x0: int64 [B, L] clean tokens.
        mask_prob: float broadcastable to [B, L].
        noisable: optional bool [B, L]; False positions (e.g. prompts) are never masked.
    Returns:
        (x_t int64 [B, L], masked bool [B, L]).
    """
    u = torch.rand(x0.shape, generator=generator, device=x0.device)
    masked = u < mask_prob
    if noisable is not None:
        masked &= noisable
    return torch.where(masked, torch.full_like(x0, mask_id), x0), masked


class SubsNll(torch.autograd.Function):
    """-log p(target) under SUBS (the mask token gets no probability), fused: forward keeps only the logsumexp
    and the target's logit instead of a [N, V] log-softmax, backward writes softmax - one-hot in one buffer
    (autograd's log_softmax + gather + index_fill chain allocates, zero-fills and reads [N, V] several times).

    apply(logits float [N, V], targets int64 [N], mask_id) -> float32 [N] in nats.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, mask_id: int) -> Tensor:
        scores = logits.float().index_fill(-1, torch.tensor([mask_id], device=logits.device), float("-inf"))
        normaliser = torch.logsumexp(scores, dim=-1)
        ctx.save_for_backward(scores, normaliser, targets)
        ctx.logits_dtype = logits.dtype
        return normaliser - scores.gather(-1, targets[:, None]).squeeze(-1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        scores, normaliser, targets = ctx.saved_tensors
        probs = (scores - normaliser[:, None]).exp_()  # the softmax (the saved scores stay intact for a retained graph)
        probs.scatter_add_(-1, targets[:, None], -torch.ones_like(normaliser[:, None]))
        return probs.mul_(grad[:, None]).to(ctx.logits_dtype), None, None


def masked_token_nll(logits: Tensor, x0: Tensor, masked: Tensor, weight: Tensor, mask_id: int) -> Tensor:
    """SUBS + NELBO integrand per token: w * -log p(x0) at masked positions, exactly 0 at unmasked ones (they carry
    over with probability 1), from the logits at the masked positions alone.

    Args: logits float [N, V] at the N masked positions in row-major order (`logits_at(denoiser, xt, masked)`);
        x0 int64 [B, L]; masked bool [B, L]; weight float broadcastable to [B, L].
    Returns: float32 [B, L] in nats.
    """
    nll = SubsNll.apply(logits, x0[masked], mask_id)
    weighted = nll * weight.expand(x0.shape)[masked]
    return torch.zeros(x0.shape, dtype=weighted.dtype, device=x0.device).masked_scatter(masked, weighted)


def average_terms(draws: list[NelboTerms]) -> NelboTerms:
    """Average independent NELBO draws of the same batch (a lower-variance estimate of the same bound)."""
    count = len(draws)
    return NelboTerms(nll_sum=sum(d.nll_sum for d in draws) / count, n_tokens=draws[0].n_tokens,
                      per_row=sum(d.per_row for d in draws) / count)


class NelboHooks:
    """The optional training hooks of a NELBO objective, no-ops here; block diffusion overrides them to tune its
    noise interval on validation data and checkpoint the choice.

    validation_batches: how many clean validation batches `on_validation` wants (None = train.eval_batches).
    """

    validation_batches: int | None = None

    def on_validation(self, denoiser: Denoiser, batches: list, log: Callable[[dict], None]) -> None:
        """Adapt to clean validation batches [(x0 int64 [B, L], noisable bool [B, L] or None), ...]; `log` records
        a dict in the run's metrics."""

    def state_dict(self) -> dict:
        """What `on_validation` learnt (plain values), saved with checkpoints."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`."""


class MaskedDiffusion(NelboHooks):
    """The MDLM objective over whole sequences: one t per sequence, stratified over the batch."""

    def __init__(self, mask_id: int, schedule: Schedule | None = None, antithetic: bool = True):
        self.mask_id = mask_id
        self.schedule = schedule if schedule is not None else make_schedule("loglinear")
        self.antithetic = antithetic

    def sample_times(self, n: int, generator: torch.Generator | None, device: torch.device | str) -> Tensor:
        """n diffusion times in (eps, 1]: stratified over the batch when `antithetic`, i.i.d. otherwise."""
        eps = getattr(self.schedule, "eps", 0.0)
        if self.antithetic:
            return stratified_times(n, eps, generator, device)
        return eps + (1 - eps) * torch.rand(n, generator=generator, device=device)

    def nelbo(self, denoiser: Denoiser, x0: Tensor, generator: torch.Generator | None = None,
              noisable: Tensor | None = None, t: Tensor | None = None) -> NelboTerms:
        """One Monte-Carlo sample of the NELBO for each row.

        Args:
            denoiser: tokens [B, L] -> logits [B, L, V] (asked for the masked positions only when it
                `reads_out_positions`).
            x0: int64 [B, L] clean tokens.
            noisable: optional bool [B, L]; only these are noised and scored (default: all).
            t: optional float [B] times; drawn with `sample_times` when omitted.
        Returns:
            NelboTerms whose `loss` is nats per scored token.
        """
        batch = x0.shape[0]
        if t is None:
            t = self.sample_times(batch, generator, x0.device)
        xt, masked = apply_mask(x0, self.schedule.mask_probability(t)[:, None], noisable, self.mask_id, generator)
        row_nll = masked_token_nll(logits_at(denoiser, xt, masked), x0, masked, self.schedule.weight(t)[:, None],
                                   self.mask_id).sum(dim=1)
        row_tokens = (noisable.sum(dim=1) if noisable is not None
                      else torch.full((batch,), x0.shape[1], device=x0.device)).float()
        return NelboTerms(nll_sum=row_nll.sum(), n_tokens=row_tokens.sum(),
                          per_row=row_nll / row_tokens.clamp(min=1))

    def bound(self, denoiser: Denoiser, x0: Tensor, generator: torch.Generator | None = None,
              noisable: Tensor | None = None, samples: int = 1) -> NelboTerms:
        """The reported NELBO (upper bound on the NLL) averaged over `samples` t draws per row."""
        return average_terms([self.nelbo(denoiser, x0, generator, noisable) for _ in range(samples)])
