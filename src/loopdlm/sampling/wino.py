"""WINO: revokable parallel decoding ("wide in, narrow out") on the shared loop.

Every step runs ONE forward pass over [sequence | shadow block]. The shadow block holds W mask tokens that reuse
the position ids of the current window (W = window length), with attention such that shadow slot i sees the whole
sequence except the token now at window column i. Its prediction is therefore a second opinion on that token made
without looking at it:

* draft (wide in): commit masked window slots whose confidence > tau1, at most
  min(max(floor(0.7 * masked), 5), 20) of them (the most confident); if none pass, the single most confident;
* verify (narrow out): in rows that drafted more than one token this step, re-mask tokens decoded in earlier steps
  of this window whose shadow probability is < tau2, at most (tokens accepted in the previous step - 1) of them,
  the least supported first.

Draft and verify read the same forward pass. Earlier windows are final. Rows of a batch progress independently
(the reference, Feng-Hong/WINO-DLLM, runs one sequence at a time). `ShadowBlock` adds the shadow block to any
network predictor's pass: the full sequence (LLaDA-style semi-autoregressive blocks) or a block-diffusion window
against its KV cache (the shadow slots then see the cache as their twin window slots do).

Bound: a window with W masked slots finishes in at most W steps, because each step's re-masks are at most the
previous step's accepts minus one (so the decoded count grows by at least one per step); the engine's guard is
never the reason a WINO decode stops.

Leakage note: only the first layer application of shadow slot i is blind to token i. From the second application
on, shadow slot i reads main rows that themselves attended to token i (as in the reference, where main rows see the
whole sequence), so in deep models the second opinion is not strictly independent of the token it judges.
"""

from __future__ import annotations

import torch
from torch import Tensor

from loopdlm.diffusion.masked import subs_log_probs
from loopdlm.sampling.engine import Decision, StepContext, WindowPrediction
from loopdlm.sampling.predictors import ForwardLayout, NetworkPredictor
from loopdlm.sampling.selectors import top_k_mask


def shadow_block_mask(base: Tensor | None, window: slice, rows: int, past: int = 0,
                      device: torch.device | str | None = None) -> Tensor:
    """The WINO attention of a pass whose `rows` inputs (after `past` cached keys) gain a shadow block of W slots.

    * an input row never sees a shadow column; otherwise it keeps its `base` row;
    * a shadow row sees every shadow column;
    * shadow row i sees what input row window.start + i sees, except that row's own column.

    Args:
        base: bool [..., rows, past + rows], the pass's own attention (True = may attend); None = all True.
        window: the input rows being decoded [start, stop); W = stop - start.
    Returns:
        bool [..., rows + W, past + rows + W] (leading dims as `base`; none when base is None).
    """
    if base is None:
        base = torch.ones(rows, past + rows, dtype=torch.bool, device=device)
    width = window.stop - window.start
    twin = base[..., window, :].clone()
    slot = torch.arange(width, device=base.device)
    twin[..., slot, past + window.start + slot] = False
    top = torch.cat((base, base.new_zeros(*base.shape[:-1], width)), dim=-1)
    bottom = torch.cat((twin, base.new_ones(*twin.shape[:-1], width)), dim=-1)
    return torch.cat((top, bottom), dim=-2)


def shadow_position_ids(position_ids: Tensor, window: slice) -> Tensor:
    """Positions [1, I] of a pass's inputs -> [1, I + W]: the shadow block reuses the window rows' positions."""
    return torch.cat((position_ids, position_ids[:, window]), dim=1)


class ShadowBlock:
    """Wraps a network predictor (full sequence or KV-cached block) so that its one forward pass also predicts a
    shadow block: W mask tokens at the window's positions, slot i blind to the token now at window column i.

    Returns the wrapped predictor's prediction with `shadow_log_probs` (float32 [B, W, V], mask token at -inf). The
    input rows cannot see the shadow block, so `log_probs` equal the wrapped predictor's up to float rounding. Its
    loop policy decides S and an optional early exit as before (the exit rule then also measures the shadow rows'
    hidden states; per-token core applications average over input and shadow rows).
    """

    def __init__(self, inner: NetworkPredictor):
        self.inner = inner

    @torch.no_grad()
    def __call__(self, tokens: Tensor, window: slice, progress: float) -> WindowPrediction:
        """tokens int64 [B, L] -> WindowPrediction(log_probs [B, W, V], shadow_log_probs [B, W, V])."""
        inner = self.inner
        loops = inner.loop_policy.loops_for(progress)
        layout = inner.layout(tokens, window, loops)
        batch, rows = layout.inputs.shape
        width = window.stop - window.start
        positions = layout.position_ids
        if positions is None:
            positions = torch.arange(rows, device=tokens.device)[None]
        mask = shadow_block_mask(layout.attn_mask, layout.window, rows, layout.past_length, tokens.device)
        shadow = torch.full((batch, width), inner.mask_id, dtype=tokens.dtype, device=tokens.device)
        extended = ForwardLayout(inputs=torch.cat((layout.inputs, shadow), dim=1),
                                 position_ids=shadow_position_ids(positions, layout.window),
                                 attn_mask=mask if layout.attn_mask is not None else mask[None, None],
                                 window=layout.window, past=layout.past, past_length=layout.past_length)
        out = inner.run(extended, loops)
        return WindowPrediction(log_probs=subs_log_probs(out.logits[:, layout.window], inner.mask_id),
                                core_applications=out.core_applications, loops=loops,
                                shadow_log_probs=subs_log_probs(out.logits[:, rows:], inner.mask_id))

    def begin_window(self, tokens: Tensor, window: slice) -> None:
        self.inner.begin_window(tokens, window)

    def end_window(self, tokens: Tensor, window: slice) -> None:
        self.inner.end_window(tokens, window)

    def select_rows(self, index: Tensor) -> None:
        """Continue with rows `index` (int64 [B']) only (a KV-cached predictor drops the others' cache)."""
        self.inner.select_rows(index)


def accept_cap(masked: Tensor, fraction: float = 0.7, low: int = 5, high: int = 20) -> Tensor:
    """WINO's per-step draft cap min(max(floor(fraction * masked), low), high). masked int64 [B] -> int64 [B]."""
    return (masked.double() * fraction).floor().long().clamp(min=low, max=high)


def draft_mask(confidence: Tensor, selectable: Tensor, tau1: float, cap: Tensor) -> Tensor:
    """Wide in: selectable slots with confidence > tau1, the `cap` most confident if more pass, the single most
    confident if none pass. confidence float [B, W]; selectable bool [B, W]; cap int64 [B] -> bool [B, W]."""
    passing = (selectable & (confidence > tau1)).sum(dim=1)
    count = torch.where(passing > 0, torch.minimum(passing, cap), torch.ones_like(passing))
    return top_k_mask(confidence.double(), count, selectable)


def verify_mask(shadow_confidence: Tensor, decoded: Tensor, tau2: float, limit: Tensor) -> Tensor:
    """Narrow out: decoded slots whose shadow probability < tau2, at most `limit` per row (least supported first).

    shadow_confidence float [B, W]; decoded bool [B, W]; limit int64 [B] (clipped at 0) -> bool [B, W].
    """
    weak = decoded & (shadow_confidence < tau2)
    count = torch.minimum(weak.sum(dim=1), limit.clamp(min=0))
    return top_k_mask(-shadow_confidence.double(), count, weak)


class WinoSelector:
    """WINO's draft-and-verify rule (see the module docstring); needs a predictor that returns
    `shadow_log_probs` (a `ShadowBlock`).

    Args:
        tau1: draft threshold (reference: 0.6 for GSM8K, 0.7 for MATH and code).
        tau2: verify threshold (reference: 0.9); 0 disables re-masking.
        accept_fraction, min_accept, max_accept: the draft cap min(max(floor(fraction * masked), min), max).
    """

    def __init__(self, tau1: float = 0.6, tau2: float = 0.9, accept_fraction: float = 0.7, min_accept: int = 5,
                 max_accept: int = 20):
        if not 1 <= min_accept <= max_accept:
            raise ValueError(f"need 1 <= min_accept <= max_accept, got {min_accept}, {max_accept}")
        if accept_fraction < 0:
            raise ValueError(f"accept_fraction must be >= 0, got {accept_fraction}")
        self.tau1, self.tau2 = tau1, tau2
        self.accept_fraction, self.min_accept, self.max_accept = accept_fraction, min_accept, max_accept
        self._last_accepted: Tensor | None = None

    def start_window(self, masked_counts: Tensor) -> None:
        # Nothing is decoded at a window's first step, so this starting value never limits a re-mask.
        self._last_accepted = masked_counts.clone()

    def select(self, ctx: StepContext) -> Decision:
        if ctx.shadow_log_probs is None:
            raise ValueError("WinoSelector needs a predictor that returns shadow log-probs (wrap it in ShadowBlock)")
        cap = accept_cap(ctx.selectable.sum(dim=1), self.accept_fraction, self.min_accept, self.max_accept)
        commit = draft_mask(ctx.confidence, ctx.selectable, self.tau1, cap)
        accepted = commit.sum(dim=1)

        # Judge the tokens decoded before this step; the shadow block saw them all but each slot not its own.
        decoded = ctx.editable & ~ctx.selectable
        shadow_confidence = ctx.shadow_log_probs.gather(-1, ctx.tokens[..., None]).squeeze(-1).exp()
        limit = torch.where(accepted > 1, self._last_accepted - 1, torch.zeros_like(accepted))
        remask = verify_mask(shadow_confidence, decoded, self.tau2, limit)
        self._last_accepted = accepted
        return Decision(commit=commit, remask=remask)
