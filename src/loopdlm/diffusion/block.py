"""BD3-LM block diffusion: the [x_t ; x_0] attention mask, per-block noise and the block NELBO.

The likelihood factorises over blocks of L' tokens, log p(x) = sum_b log p(x^b | x^{<b}), each conditional a masked
diffusion model of its block. Training runs every conditional in one pass over [x_t ; x_0] (length 2L, both halves
at positions 0..L-1): a noisy block sees itself and the clean blocks before it, a clean block sees the clean blocks
up to itself. L' = L is MDLM, L' = 1 is autoregressive (every token masked, weight 1: the exact AR NLL).

Noise (decisions made here, where the paper and reference leave room):
  * one t per (sequence, block), stratified over the flattened batch x blocks grid and then randomly permuted over
    that grid: blocks are not exchangeable (block 0 has no context), so a fixed stratum order would give early
    blocks systematically lower t;
  * t in [max(beta, eps), omega] with eps = 1e-3 by default, masking probability t and weight 1/t, as the reference
    (kuleshov-group/bd3lms: `_sample_t` draws t in [sampling_eps_min, sampling_eps_max], default [1e-3, 1], and
    `LogLinearNoise` masks with probability t); L' = L gives the MDLM loss for the same t and mask;
  * clipped training interval t ~ U[beta, omega]: the reference redraws a block's mask until its masked fraction lies
    in [beta, omega]. We sample that same conditional distribution directly and without a retry loop: the number of
    masked tokens k ~ Binomial(n, p_t) truncated to k / n in [beta, omega], then k positions uniformly at random
    (n = noisable tokens of the block; a block whose band holds no integer keeps the untruncated binomial).
Reported likelihoods (`bound`) always use the unclipped interval [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from loopdlm.diffusion.masked import (
    DiffusionConfig,
    NelboHooks,
    NelboTerms,
    apply_mask,
    average_terms,
    logits_at,
    masked_token_nll,
)
from loopdlm.diffusion.schedules import LogLinear, stratified_times
from loopdlm.errors import UserError

#: Floor of t when eps = 0, so that the weight 1/t stays finite.
MIN_TIME = 1e-6
#: tokens [B, L_in] (+ position_ids [1, L_in], attn_mask) -> logits [B, L_in, V]; the trainer binds the loop count.
BlockDenoiser = Callable[..., Tensor]
Interval = tuple[float, float]


def default_clip_candidates(widths: Sequence[float] = (0.5, 0.75, 1.0), stride: float = 0.25) -> tuple[Interval, ...]:
    """Candidate training intervals (beta, omega) for the data-driven schedule: every width in `widths`, slid over
    [0, 1] in steps of `stride` (defaults: [0,1], [0,.75], [.25,1], [0,.5], [.25,.75], [.5,1])."""
    candidates = []
    for width in sorted(widths, reverse=True):
        low = 0.0
        while low + width <= 1.0 + 1e-9:
            candidates.append((round(low, 6), round(low + width, 6)))
            low += stride
    return tuple(candidates)


def block_diffusion_mask_mod(seq_len: int, block_size: int) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
    """The BD3-LM attention predicate over [x_t ; x_0] (2 * seq_len positions), in FlexAttention's `mask_mod` form.

    With clean(i) = i >= L and blk(i) = (i mod L) div L', query q may attend key k iff
    (same block and same half) or (q noisy, k clean, blk(k) < blk(q)) or (q clean, k clean, blk(k) <= blk(q)).
    Returns f(batch, head, q_idx, kv_idx) -> bool tensor; the index tensors broadcast, so the same function builds
    the dense mask and a FlexAttention BlockMask.
    """

    def mask_mod(batch: Tensor, head: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        q_clean, k_clean = q_idx >= seq_len, kv_idx >= seq_len
        q_block = torch.where(q_clean, q_idx - seq_len, q_idx) // block_size
        k_block = torch.where(k_clean, kv_idx - seq_len, kv_idx) // block_size
        same_block = (q_block == k_block) & (q_clean == k_clean)
        noisy_to_earlier_clean = ~q_clean & k_clean & (k_block < q_block)
        clean_to_clean_causal = q_clean & k_clean & (k_block <= q_block)
        return same_block | noisy_to_earlier_clean | clean_to_clean_causal

    return mask_mod


def dense_block_diffusion_mask(seq_len: int, block_size: int, device: torch.device | str) -> Tensor:
    """`block_diffusion_mask_mod` evaluated densely: bool [1, 1, 2L, 2L], True = may attend (for SDPA)."""
    index = torch.arange(2 * seq_len, device=device)
    return block_diffusion_mask_mod(seq_len, block_size)(None, None, index[:, None], index[None, :])[None, None]


def flex_block_diffusion_mask(seq_len: int, block_size: int, device: torch.device | str):
    """`block_diffusion_mask_mod` as a FlexAttention BlockMask over 2L x 2L (shared by batch and heads)."""
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(block_diffusion_mask_mod(seq_len, block_size), None, None, 2 * seq_len, 2 * seq_len,
                             device=device)


def block_causal_mask(query_columns: Tensor, key_columns: Tensor, block_size: int) -> Tensor:
    """Block-causal rule of a clean prefix followed by one (noisy) block: a query attends a key iff the key's block
    (column div L') is not later than the query's. query_columns int64 [Q], key_columns int64 [K] -> bool [Q, K]."""
    return (key_columns[None, :] // block_size) <= (query_columns[:, None] // block_size)


@dataclass
class BlockNoise:
    """One draw of the forward process: xt int64 [B, L] (masked slots = mask_id), masked bool [B, L], weight float
    [B, L] (NELBO weight of each token's block: 1/t, or 1 for L' = 1) and t float [B, n_blocks]."""

    xt: Tensor
    masked: Tensor
    weight: Tensor
    t: Tensor


class BlockDiffusion(NelboHooks):
    """The BD3-LM objective: block-wise masked diffusion trained in one [x_t ; x_0] pass.

    Args:
        mask_id: the mask token id.
        block_size: L' >= 1; sequences must be a multiple of it (a sequence no longer than L' is one block: MDLM).
        seq_len: optional training length, only to validate `block_size` divides it up front.
        clip_low, clip_high: the training interval [beta, omega] for t (masked fraction of each block kept inside).
        adaptive_clip: let `on_validation` switch the interval to the lowest-variance one among `candidates`.
        candidates: (beta, omega) pairs for the data-driven choice; default `default_clip_candidates()`.
        clip_search_batches: how many validation batches `on_validation` scores each candidate on (exposed to the
            trainer as `validation_batches`; the reference uses up to 100).
        eps: smallest diffusion time: t ~ U[max(beta, eps), omega] (the reference's sampling_eps_min, 1e-3); the
            masking probability is t itself and the weight 1/t. eps = 0 floors t at MIN_TIME instead.
        antithetic: stratify the (sequence, block) times; otherwise i.i.d. uniform.
        attention: 'dense' (bool SDPA mask, any device) or 'flex' (FlexAttention BlockMask; needs a model whose
            attention accepts one and, for training, a CUDA device: this torch has no FlexAttention backward on CPU).
    """

    def __init__(self, mask_id: int, block_size: int, seq_len: int | None = None, clip_low: float = 0.0,
                 clip_high: float = 1.0, adaptive_clip: bool = False, candidates: Sequence[Interval] | None = None,
                 eps: float = 1e-3, antithetic: bool = True, attention: str = "dense", clip_search_batches: int = 100):
        if block_size < 1:
            raise UserError(f"block_size must be >= 1, got {block_size}")
        if seq_len is not None and seq_len > block_size and seq_len % block_size:
            raise UserError(f"block_size {block_size} must divide the sequence length {seq_len}")
        if attention not in ("dense", "flex"):
            raise UserError(f"attention must be 'dense' or 'flex', got {attention!r}")
        if not 0.0 <= eps < 1.0:
            raise UserError(f"block diffusion eps (smallest diffusion time) must lie in [0, 1), got {eps}")
        if clip_search_batches < 1:
            raise UserError(f"clip_search_batches must be >= 1, got {clip_search_batches}")
        self.mask_id = mask_id
        self.block_size = block_size
        self.eps = eps
        self.schedule = LogLinear(0.0)  # masking probability t, weight 1/t
        self.validation_batches = clip_search_batches
        self.antithetic = antithetic
        self.attention = attention
        self.adaptive_clip = adaptive_clip
        self.clip = self._checked_interval((clip_low, clip_high))
        given = default_clip_candidates() if candidates is None else candidates
        usable = [tuple(map(float, c)) for c in given if candidates is not None or self._band_has_count(c)]
        self.candidates = tuple(self._checked_interval(c) for c in usable)
        self._masks: dict[tuple, object] = {}

    def _band_has_count(self, interval: Interval) -> bool:
        """Whether some masked count k in [1, L'] has k / L' inside the interval (always true for L' = 1)."""
        low, high = interval
        return self.block_size == 1 or any(low <= k / self.block_size <= high for k in range(1, self.block_size + 1))

    def _checked_interval(self, interval: Interval) -> Interval:
        low, high = float(interval[0]), float(interval[1])
        if not 0.0 <= low < high <= 1.0:
            raise UserError(f"clip interval must satisfy 0 <= low < high <= 1, got [{low}, {high}]")
        if not self._band_has_count((low, high)):
            raise UserError(f"clip interval [{low}, {high}] contains no masked fraction k/{self.block_size}")
        return low, high

    # ----------------------------------------------------------------------------------------------- noise
    def sample_times(self, rows: int, blocks: int, generator: torch.Generator | None, device: torch.device | str,
                     interval: Interval = (0.0, 1.0)) -> Tensor:
        """One time per (sequence, block), uniform on [max(beta, eps), max(omega, eps)] (the reference clamps both
        ends at sampling_eps): float32 [rows, blocks], floored at MIN_TIME."""
        low, high = (max(end, self.eps) for end in interval)
        count = rows * blocks
        if self.antithetic:
            times = stratified_times(count, 0.0, generator, device, low, high)
            times = times[torch.randperm(count, generator=generator, device=device)]
        else:
            times = low + (high - low) * torch.rand(count, generator=generator, device=device)
        return times.view(rows, blocks).clamp_min(MIN_TIME)

    def add_noise(self, x0: Tensor, generator: torch.Generator | None = None, noisable: Tensor | None = None,
                  t: Tensor | None = None, unclipped: bool = False) -> BlockNoise:
        """Draw x_t from x_0 block by block.

        Args:
            x0: int64 [B, L], L a multiple of L' (or L <= L').
            noisable: optional bool [B, L]; False positions (prompts) are never masked nor scored.
            t: optional float [B, n_blocks] times; drawn with `sample_times` when omitted.
            unclipped: use [0, 1] instead of the current training interval.
        """
        batch, length = x0.shape
        block = self._effective_block(length)
        blocks = length // block
        if block == 1:
            masked = noisable.clone() if noisable is not None else torch.ones_like(x0, dtype=torch.bool)
            ones = torch.ones(batch, length, device=x0.device)
            return BlockNoise(xt=x0.masked_fill(masked, self.mask_id), masked=masked, weight=ones, t=ones)
        interval = (0.0, 1.0) if unclipped else self.clip
        if t is None:
            t = self.sample_times(batch, blocks, generator, x0.device, interval)
        mask_prob = self.schedule.mask_probability(t)
        if interval == (0.0, 1.0):
            xt, masked = apply_mask(x0, mask_prob.repeat_interleave(block, dim=1), noisable, self.mask_id, generator)
        else:
            masked = self._banded_mask(mask_prob, noisable, interval, block, generator, x0)
            xt = x0.masked_fill(masked, self.mask_id)
        weight = self.schedule.weight(t).repeat_interleave(block, dim=1)
        return BlockNoise(xt=xt, masked=masked, weight=weight, t=t)

    def _banded_mask(self, mask_prob: Tensor, noisable: Tensor | None, interval: Interval, block: int,
                     generator: torch.Generator | None, x0: Tensor) -> Tensor:
        """Mask exactly k positions per block, k ~ Binomial(n, p) conditioned on k / n in [beta, omega]: the
        distribution the reference reaches by redrawing. mask_prob float [B, nb] -> masked bool [B, L]."""
        batch, blocks = mask_prob.shape
        if noisable is None:
            counts = torch.full((batch, blocks), block, device=x0.device, dtype=torch.float64)
        else:
            counts = noisable.view(batch, blocks, block).sum(dim=-1).double()
        n = counts[..., None]
        k = torch.arange(block + 1, device=x0.device, dtype=torch.float64)
        p = mask_prob.double()[..., None]
        possible = k <= n
        log_pmf = (torch.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma((n - k).clamp_min(0) + 1)
                   + torch.xlogy(k, p) + torch.xlogy((n - k).clamp_min(0), 1 - p))
        pmf = torch.where(possible, log_pmf.exp(), torch.zeros_like(log_pmf))
        fraction = k / n.clamp_min(1)
        low, high = interval
        in_band = (fraction >= low - 1e-9) & (fraction <= high + 1e-9)
        banded = pmf * in_band
        pmf = torch.where(banded.sum(dim=-1, keepdim=True) > 0, banded, pmf)
        draws = torch.multinomial(pmf.view(-1, block + 1).float(), 1, generator=generator).view(batch, blocks)
        scores = torch.rand(x0.shape, generator=generator, device=x0.device)
        if noisable is not None:
            scores = scores.masked_fill(~noisable, 2.0)
        ranks = scores.view(batch, blocks, block).argsort(dim=-1).argsort(dim=-1)
        return (ranks < draws[..., None]).view(batch, -1)

    def _effective_block(self, length: int) -> int:
        if length <= self.block_size:
            return length
        if length % self.block_size:
            raise UserError(f"sequence length {length} is not a multiple of block_size {self.block_size}")
        return self.block_size

    # ----------------------------------------------------------------------------------------------- loss
    def attention_mask(self, seq_len: int, device: torch.device | str):
        """The [x_t ; x_0] mask for sequences of `seq_len`: dense bool [1,1,2L,2L] or a FlexAttention BlockMask."""
        key = (seq_len, self.block_size, self.attention, str(device))
        if key not in self._masks:
            build = flex_block_diffusion_mask if self.attention == "flex" else dense_block_diffusion_mask
            self._masks[key] = build(seq_len, self.block_size, device)
        return self._masks[key]

    def logits(self, denoiser: BlockDenoiser, xt: Tensor, x0: Tensor, positions: Tensor | None = None) -> Tensor:
        """Logits of the x_t half: float [B, L, V], or [N, V] at the True entries of `positions` bool [B, L] in
        row-major order (only those are computed when the denoiser reads out positions, see `logits_at`). A
        single block runs x_t alone (its clean half would be invisible to it)."""
        length = x0.shape[1]
        if self._effective_block(length) == length:
            tokens, inputs, readout = xt, {}, positions
        else:
            if self.attention == "flex" and x0.device.type == "cpu" and torch.is_grad_enabled():
                raise UserError("FlexAttention has no CPU backward in this torch; use attention='dense' on CPU")
            tokens = torch.cat((xt, x0), dim=1)
            inputs = {"position_ids": torch.arange(length, device=x0.device).repeat(2)[None],
                      "attn_mask": self.attention_mask(length, x0.device)}
            readout = None if positions is None else torch.cat((positions, torch.zeros_like(positions)), dim=1)
        if readout is None:
            return denoiser(tokens, **inputs)[:, :length]
        return logits_at(denoiser, tokens, readout, **inputs)

    def score(self, denoiser: BlockDenoiser, x0: Tensor, noise: BlockNoise, noisable: Tensor | None = None
              ) -> NelboTerms:
        """NELBO terms of a given noise draw (see `nelbo`)."""
        row_nll = self._token_nll(denoiser, x0, noise).sum(dim=1)
        batch, length = x0.shape
        row_tokens = (noisable.sum(dim=1) if noisable is not None
                      else torch.full((batch,), length, device=x0.device)).float()
        return NelboTerms(nll_sum=row_nll.sum(), n_tokens=row_tokens.sum(), per_row=row_nll / row_tokens.clamp(min=1))

    def _token_nll(self, denoiser: BlockDenoiser, x0: Tensor, noise: BlockNoise) -> Tensor:
        """Weighted NLL of every token of x0 [B, L] under a noise draw (0 where unmasked): float [B, L], from the
        logits of the masked x_t positions alone."""
        logits = self.logits(denoiser, noise.xt, x0, noise.masked)
        return masked_token_nll(logits, x0, noise.masked, noise.weight, self.mask_id)

    def nelbo(self, denoiser: BlockDenoiser, x0: Tensor, generator: torch.Generator | None = None,
              noisable: Tensor | None = None, t: Tensor | None = None, unclipped: bool = False) -> NelboTerms:
        """One Monte-Carlo sample of the block NELBO per row (the training loss, under the current clip interval).

        Args:
            denoiser: (tokens [B, L_in], position_ids=None, attn_mask=None) -> logits [B, L_in, V] (asked for the
                masked x_t positions only when it reads out positions).
            x0: int64 [B, L] clean tokens.
            noisable: optional bool [B, L]; only these are noised and scored.
            t: optional float [B, L / L'] times.
            unclipped: score under [0, 1] (a bound on the NLL) instead of the training interval.
        Returns:
            NelboTerms; `loss` is nats per scored token.
        """
        return self.score(denoiser, x0, self.add_noise(x0, generator, noisable, t, unclipped), noisable)

    def bound(self, denoiser: BlockDenoiser, x0: Tensor, generator: torch.Generator | None = None,
              noisable: Tensor | None = None, samples: int = 1) -> NelboTerms:
        """The reported NELBO (upper bound on the NLL): unclipped [0, 1], averaged over `samples` noise draws."""
        return average_terms([self.nelbo(denoiser, x0, generator, noisable, unclipped=True) for _ in range(samples)])

    # ----------------------------------------------------------------------------------------------- schedule
    def block_losses(self, denoiser: BlockDenoiser, x0: Tensor, noise: BlockNoise, noisable: Tensor | None = None
                     ) -> tuple[Tensor, Tensor]:
        """The loss of every (sequence, block) under a given noise draw: its weighted NLL summed over the block and
        divided by the block's noisable tokens (all L' of them without `noisable`, which is the reference's
        per-block mean). Returns (losses float [B, n_blocks], scored bool [B, n_blocks]: blocks with a noisable
        token; the others hold 0)."""
        batch, length = x0.shape
        block = self._effective_block(length)
        token_nll = self._token_nll(denoiser, x0, noise).view(batch, -1, block)
        counts = (noisable.view(batch, -1, block).sum(dim=-1) if noisable is not None
                  else torch.full(token_nll.shape[:2], block, device=x0.device))
        return token_nll.sum(dim=-1) / counts.clamp(min=1), counts > 0

    @torch.no_grad()
    def on_validation(self, denoiser: BlockDenoiser, batches: Sequence[Tensor | tuple[Tensor, Tensor | None]],
                      log: Callable[[dict], None]) -> None:
        """Data-driven clipped schedule, as the reference's `_clipped_schedule_search` (kuleshov-group/bd3lms):
        for each candidate (beta, omega), draw the training noise of that interval on every validation batch, take
        the loss of every (sequence, block) (`block_losses`), and its variance within the batch; the candidate with
        the lowest mean of those per-batch variances becomes the training interval.

        batches: clean validation batches, each x0 int64 [B, L] or (x0, noisable bool [B, L] or None); the trainer
        draws `validation_batches` of them (the reference scores up to 100). Blocks without a noisable token (a
        prompt) are left out. Every candidate is scored with the same seed (common random numbers). Under
        torch.distributed each batch's variance is pooled over ranks, so every rank picks the same interval.
        Does nothing unless `adaptive_clip`; logs {'clip_low', 'clip_high', 'clip_var[beta,omega]': mean variance}.
        """
        if not self.adaptive_clip or not batches:
            return
        pairs = [batch if isinstance(batch, tuple) else (batch, None) for batch in batches]
        current = self.clip
        variances: dict[Interval, float] = {}
        try:
            for interval in self.candidates:
                self.clip = interval
                generator = torch.Generator(device=pairs[0][0].device).manual_seed(0)
                per_batch = []
                for x0, noisable in pairs:
                    losses, scored = self.block_losses(denoiser, x0, self.add_noise(x0, generator, noisable),
                                                       noisable)
                    per_batch.append(_variance_across_ranks(losses[scored].double()))
                variances[interval] = sum(per_batch) / len(per_batch)
        finally:
            self.clip = current
        self.clip = min(variances, key=variances.get)
        record = {"clip_low": self.clip[0], "clip_high": self.clip[1]}
        record.update({f"clip_var[{low:g},{high:g}]": value for (low, high), value in variances.items()})
        log(record)

    def state_dict(self) -> dict[str, float]:
        """The current training interval (what `on_validation` changes), for checkpoints."""
        return {"clip_low": self.clip[0], "clip_high": self.clip[1]}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore the training interval saved by `state_dict`."""
        self.clip = self._checked_interval((state["clip_low"], state["clip_high"]))


def _variance_across_ranks(values: Tensor) -> float:
    """Unbiased variance of `values` [n] pooled over every torch.distributed rank (just this rank's otherwise);
    0 when fewer than two values exist in all."""
    moments = torch.stack((torch.tensor(float(values.numel()), dtype=values.dtype, device=values.device),
                           values.sum(), (values * values).sum()))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(moments)
    count, total, squares = moments.tolist()
    if count < 2:
        return 0.0
    return (squares - total * total / count) / (count - 1)


def build_block_objective(diffusion_config: DiffusionConfig, mask_id: int, seq_len: int,
                          attention: str = "dense") -> BlockDiffusion:
    """The BD3-LM objective a run's `diffusion` section describes (block_size None = one block = MDLM loss).

    attention: 'dense' or 'flex' (use 'flex' only on CUDA, ideally with a compiled model)."""
    if diffusion_config.schedule != "loglinear":
        raise UserError(f"block diffusion uses the log-linear schedule, got '{diffusion_config.schedule}'")
    block_size = diffusion_config.block_size or seq_len
    return BlockDiffusion(mask_id, block_size, seq_len=seq_len, clip_low=diffusion_config.clip_low,
                          clip_high=diffusion_config.clip_high, adaptive_clip=diffusion_config.adaptive_clip,
                          eps=diffusion_config.eps, antithetic=diffusion_config.antithetic, attention=attention,
                          clip_search_batches=diffusion_config.clip_search_batches)
