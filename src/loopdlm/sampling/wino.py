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
(the reference, Feng-Hong/WINO-DLLM, runs one sequence at a time). `WinoDenoiser` runs the whole sequence each
step (LLaDA-style semi-autoregressive blocks); `CachedWinoDenoiser` runs only the window and its shadow against a
block-diffusion KV cache.

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
from loopdlm.errors import UserError
from loopdlm.models.transformer import LoopedTransformer
from loopdlm.sampling.engine import Decision, DenoiserOutputs, StepContext
from loopdlm.sampling.kv_cache import CachedBlockDenoiser
from loopdlm.sampling.loops import FixedLoops
from loopdlm.sampling.selectors import top_k_mask

#: Key of the shadow block's log-probs, float32 [B, W, V], in `DenoiserOutputs.extras` / `StepContext.extras`.
SHADOW_LOG_PROBS = "shadow_log_probs"


def wino_may_attend(query: Tensor, key: Tensor, length: int, window: slice, base: Tensor | None = None) -> Tensor:
    """The WINO attention predicate on index tensors of the extended layout [sequence (L) | shadow block (W)].

    * a sequence row never sees a shadow column; between sequence positions it follows `base` (all True when
      omitted, i.e. a bidirectional model);
    * a shadow row sees every shadow column;
    * shadow row i sees what window row i would see in the sequence, except window column i itself.

    Args:
        query, key: int64 index tensors of any broadcastable shapes, values in [0, L + W).
        length: L, the sequence length.
        window: the current window [start, stop) of the sequence; W = stop - start.
        base: optional bool [L, L], the sequence-to-sequence attention of the wrapped model (True = attend).
    Returns:
        bool tensor of the broadcast shape, True where `query` may attend `key`.
    """
    query_is_shadow, key_is_shadow = query >= length, key >= length
    # A shadow row reads the sequence as its twin window row would: map it onto that row.
    twin = torch.where(query_is_shadow, query - length + window.start, query)
    if base is None:
        sequence_rule = torch.ones_like(twin, dtype=torch.bool) & torch.ones_like(key, dtype=torch.bool)
    else:
        sequence_rule = base[twin.clamp(max=length - 1), key.clamp(max=length - 1)]
    blind_to_own_token = query_is_shadow & (key == twin)
    return torch.where(key_is_shadow, query_is_shadow, sequence_rule & ~blind_to_own_token)


def wino_attention_mask(length: int, window: slice, base: Tensor | None = None,
                        device: torch.device | str | None = None) -> Tensor:
    """Dense bool mask [L + W, L + W] of `wino_may_attend` (True = may attend), for SDPA's `attn_mask`.

    A KV-cached caller whose first P positions are cached uses rows [P:] of it (keys stay in full order).
    """
    total = length + window.stop - window.start
    index = torch.arange(total, device=device if base is None else base.device)
    return wino_may_attend(index[:, None], index[None, :], length, window, base)


def wino_position_ids(length: int, window: slice, device: torch.device | str | None = None) -> Tensor:
    """Positions [1, L + W]: 0..L-1 for the sequence, then the window's own positions for the shadow block."""
    shadow = torch.arange(window.start, window.stop, device=device)
    return torch.cat((torch.arange(length, device=device), shadow))[None]


class WinoDenoiser:
    """Full-sequence denoiser with a WINO shadow block: one forward pass returns the window's log-probs and, in
    `extras[SHADOW_LOG_PROBS]`, the shadow block's log-probs (float32 [B, W, V], mask token at -inf).

    The sequence rows cannot see the shadow block, so `log_probs` equal `ModelDenoiser`'s up to float rounding.
    loop_policy decides S and an optional early exit exactly as for `ModelDenoiser` (the exit rule then also
    measures the shadow rows' hidden states; per-token core applications average over sequence and shadow rows).
    """

    def __init__(self, model: LoopedTransformer, mask_id: int, loop_policy=None):
        self.model = model
        self.mask_id = mask_id
        self.loop_policy = loop_policy or FixedLoops(1)
        self._layout_key: tuple | None = None
        self._layout: tuple[Tensor, Tensor] | None = None

    def begin_window(self, tokens: Tensor, window: slice) -> None:
        pass

    def end_window(self, tokens: Tensor, window: slice) -> None:
        pass

    def _window_layout(self, tokens: Tensor, window: slice) -> tuple[Tensor, Tensor]:
        """Attention mask [1, 1, L+W, L+W] and position ids [1, L+W], built once per (length, window, device)."""
        key = (tokens.shape[1], window.start, window.stop, tokens.device)
        if key != self._layout_key:
            mask = wino_attention_mask(tokens.shape[1], window, device=tokens.device)[None, None]
            self._layout = (mask, wino_position_ids(tokens.shape[1], window, tokens.device))
            self._layout_key = key
        return self._layout

    @torch.no_grad()
    def __call__(self, tokens: Tensor, window: slice, progress: float) -> DenoiserOutputs:
        """tokens int64 [B, L] -> DenoiserOutputs(log_probs [B, W, V], extras {SHADOW_LOG_PROBS: [B, W, V]})."""
        attn_mask, position_ids = self._window_layout(tokens, window)
        batch, length = tokens.shape
        shadow = torch.full((batch, window.stop - window.start), self.mask_id, dtype=tokens.dtype,
                            device=tokens.device)
        loops = self.loop_policy.loops_for(progress)
        out = self.model(torch.cat((tokens, shadow), dim=1), loops=loops, position_ids=position_ids,
                         attn_mask=attn_mask, loop_exit=self.loop_policy.exit_rule)
        return DenoiserOutputs(log_probs=subs_log_probs(out.logits[:, window], self.mask_id),
                               core_applications=out.core_applications,
                               extras={SHADOW_LOG_PROBS: subs_log_probs(out.logits[:, length:], self.mask_id)},
                               loops=loops)


class CachedWinoDenoiser(CachedBlockDenoiser):
    """WINO over a block-diffusion KV cache (use `align_windows=True` in `generate`): each step runs the window's W
    tokens plus the W shadow slots against the cached clean prefix, in one pass.

    In the local layout [cache (P) | window (W) | shadow (W)] the attention is `wino_may_attend` with the window as
    the "sequence" tail: window rows see the cache and the window; shadow row i sees the cache, the window except
    column i, and the shadow block; cached pad columns stay invisible to every row. Caching, sliding and committing
    are those of `CachedBlockDenoiser` (same arguments); committed blocks never see a shadow block.
    """

    @torch.no_grad()
    def __call__(self, tokens: Tensor, window: slice, progress: float) -> DenoiserOutputs:
        """tokens int64 [B, N] -> DenoiserOutputs(log_probs [B, W, V], extras {SHADOW_LOG_PROBS: [B, W, V]})."""
        loops = self.loop_policy.loops_for(progress)
        if self.cache.length and not self.cache.serves(loops):
            raise UserError(f"the cache was committed with {self.cache.loops} loops; this step asks for {loops}")
        batch, width, cached = tokens.shape[0], window.stop - window.start, self.cache.length
        rule = wino_attention_mask(cached + width, slice(cached, cached + width), device=tokens.device)[cached:]
        attn_mask = rule[None, None]
        key_valid = self._key_valid(window.start, window.stop)
        if key_valid is not None:
            shadow_valid = torch.ones(batch, width, dtype=torch.bool, device=tokens.device)
            attn_mask = attn_mask & torch.cat((key_valid, shadow_valid), dim=1)[:, None, None, :]
        positions = self._positions(window.start, window.stop, tokens.device)
        shadow = torch.full((batch, width), self.mask_id, dtype=tokens.dtype, device=tokens.device)
        out = self.model(torch.cat((tokens[:, window], shadow), dim=1), loops=loops,
                         position_ids=torch.cat((positions, positions), dim=1), attn_mask=attn_mask,
                         past=self._past(), loop_exit=self.loop_policy.exit_rule)
        return DenoiserOutputs(log_probs=subs_log_probs(out.logits[:, :width], self.mask_id),
                               core_applications=out.core_applications,
                               extras={SHADOW_LOG_PROBS: subs_log_probs(out.logits[:, width:], self.mask_id)},
                               loops=loops)


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
    """WINO's draft-and-verify rule (see the module docstring); needs a denoiser that fills
    `extras[SHADOW_LOG_PROBS]` (e.g. `WinoDenoiser`).

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
        if SHADOW_LOG_PROBS not in ctx.extras:
            raise ValueError("WinoSelector needs a denoiser that returns shadow log-probs (use WinoDenoiser)")
        cap = accept_cap(ctx.selectable.sum(dim=1), self.accept_fraction, self.min_accept, self.max_accept)
        commit = draft_mask(ctx.confidence, ctx.selectable, self.tau1, cap)
        accepted = commit.sum(dim=1)

        # Judge the tokens decoded before this step; the shadow block saw them all but each slot not its own.
        decoded = ctx.editable & ~ctx.selectable
        shadow_confidence = ctx.extras[SHADOW_LOG_PROBS].gather(-1, ctx.tokens[..., None]).squeeze(-1).exp()
        limit = torch.where(accepted > 1, self._last_accepted - 1, torch.zeros_like(accepted))
        remask = verify_mask(shadow_confidence, decoded, self.tau2, limit)
        self._last_accepted = accepted
        return Decision(commit=commit, remask=remask)
