"""Block KV cache for block-diffusion (BD3-LM) sampling, and the window predictors that read it.

Blocks of L' columns (aligned at column 0) are decoded left to right. The clean prefix is run once, its keys and
values are cached per layer application (layer, loop), and every denoising step runs only the current block
against the cache; once the block is committed, one clean pass appends its keys and values. Keys are stored before
RoPE with their positions, so the cache can slide past the training context by dropping its oldest entries and
re-basing positions (RoPE only sees position differences, re-basing keeps angles in the trained range).

Left-padded batches: a padding mask (True = pad column) keeps pad keys out of every query's attention; a pad query
attends to itself so its (unused) output stays finite.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from loopdlm.diffusion.block import block_causal_mask
from loopdlm.errors import UserError
from loopdlm.models.layers import PastKV
from loopdlm.models.transformer import LayerSlot, LoopedTransformer
from loopdlm.sampling.predictors import ForwardLayout, NetworkPredictor


@dataclass
class CacheOptions:
    """How the block KV cache behaves.

    reuse_last_loop: for core layers store only the last loop's keys/values and serve them for every loop
        (memory flat in S; an approximation of exact caching).
    context_window: keep at most this many positions (cache + current block); older entries slide out and positions
        are re-based. None = never slide. Must be a multiple of the block size.
    commit_loops: core loops used when committing blocks into the cache; None = the loop policy's largest S.
    """

    reuse_last_loop: bool = False
    context_window: int | None = None
    commit_loops: int | None = None


class BlockKVCache(Mapping[LayerSlot, PastKV]):
    """Cached clean prefix: per layer application (layer, loop) keys before RoPE [B,H,P,hd] and values [B,H,P,hd],
    plus positions int64 [1, P] (shared by rows) and key validity bool [B, P] (None = all valid).

    With `reuse_last_loop`, core slots (loop >= 1) are stored once, from the committing pass's last loop, and served
    for any loop index; iteration lists the stored slots only.
    """

    def __init__(self, reuse_last_loop: bool = False):
        self.reuse_last_loop = reuse_last_loop
        self._kv: dict[LayerSlot, tuple[Tensor, Tensor]] = {}
        self.positions: Tensor | None = None
        self.key_valid: Tensor | None = None
        self.loops = 0

    def __getitem__(self, slot: LayerSlot) -> PastKV:
        layer, loop = slot
        if self.reuse_last_loop and loop >= 1:
            slot = (layer, self.loops)
        keys, values = self._kv[slot]
        return keys, values, self.positions

    def __iter__(self) -> Iterator[LayerSlot]:
        return iter(self._kv)

    def __len__(self) -> int:
        return len(self._kv)

    @property
    def length(self) -> int:
        """Number of cached positions P."""
        return 0 if self.positions is None else self.positions.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes held by cached keys and values."""
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self._kv.values())

    def serves(self, loops: int) -> bool:
        """Whether a pass with `loops` core applications finds every slot it needs."""
        return self.reuse_last_loop or self.loops == 0 or loops <= self.loops

    def append(self, present: Mapping[LayerSlot, tuple[Tensor, Tensor]], positions: Tensor,
               key_valid: Tensor | None) -> None:
        """Add one clean pass's keys/values (each [B,H,W,hd]) at positions int64 [1, W] with validity bool [B, W]."""
        loops = max((loop for _, loop in present), default=0)
        if self.reuse_last_loop:
            present = {slot: kv for slot, kv in present.items() if slot[1] in (0, loops)}
        if self._kv and (set(present) != set(self._kv) or loops != self.loops):
            raise ValueError("a cache can only be extended by passes with the same layers and loop count")
        batch, width = present[next(iter(present))][0].shape[0], positions.shape[1]
        if self.key_valid is not None or key_valid is not None:
            all_valid = torch.ones(batch, self.length + width, dtype=torch.bool, device=positions.device)
            old = self.key_valid if self.key_valid is not None else all_valid[:, :self.length]
            new = key_valid if key_valid is not None else all_valid[:, self.length:]
            self.key_valid = torch.cat((old, new), dim=1)
        for slot, (keys, values) in present.items():
            if slot in self._kv:
                old_keys, old_values = self._kv[slot]
                keys, values = torch.cat((old_keys, keys), dim=2), torch.cat((old_values, values), dim=2)
            self._kv[slot] = (keys, values)
        self.positions = positions if self.positions is None else torch.cat((self.positions, positions), dim=1)
        self.loops = loops

    def slide(self, keep: int) -> int:
        """Drop all but the newest `keep` positions and re-base positions so the oldest kept one is 0.
        Returns the shift subtracted from every position (0 when nothing was dropped)."""
        drop = self.length - keep
        if drop <= 0:
            return 0
        shift = int(self.positions[0, drop])
        self._kv = {slot: (k[:, :, drop:], v[:, :, drop:]) for slot, (k, v) in self._kv.items()}
        self.positions = self.positions[:, drop:] - shift
        if self.key_valid is not None:
            self.key_valid = self.key_valid[:, drop:]
        return shift

    def select_rows(self, index: Tensor) -> None:
        """Keep only the rows `index` (int64 [B']) of every cached tensor, e.g. when rows stop generating."""
        self._kv = {slot: (k.index_select(0, index), v.index_select(0, index)) for slot, (k, v) in self._kv.items()}
        if self.key_valid is not None:
            self.key_valid = self.key_valid.index_select(0, index)


def max_policy_loops(loop_policy) -> int:
    """The largest S a loop policy asks for over denoising progress in [0, 1]."""
    return max(loop_policy.loops_for(i / 100) for i in range(101))


def attention_mask(block_rule: Tensor | None, n_past: int, key_valid: Tensor | None) -> Tensor | None:
    """Mask for queries = the W new tokens over keys = (P cached ++ W new).

    block_rule: bool [W, W] among the new tokens (None = all allowed); key_valid: bool [B, P+W] (None = all valid).
    Returns bool [B|1, 1, W, P+W] (True = may attend), or None when everything is allowed.
    """
    if block_rule is None and key_valid is None:
        return None
    width = block_rule.shape[0] if block_rule is not None else key_valid.shape[1] - n_past
    device = block_rule.device if block_rule is not None else key_valid.device
    allowed = torch.ones(width, n_past + width, dtype=torch.bool, device=device)
    if block_rule is not None:
        allowed[:, n_past:] = block_rule
    allowed = allowed[None, None]
    if key_valid is not None:
        itself = torch.zeros(width, n_past + width, dtype=torch.bool, device=device)
        itself[:, n_past:] = torch.eye(width, dtype=torch.bool, device=device)
        allowed = allowed & (key_valid[:, None, None, :] | itself)
    return allowed


def padding_validity(padding: Tensor | None, start: int, stop: int) -> Tensor | None:
    """Key validity bool [B, stop - start] of canvas columns [start, stop) from a padding mask bool [B, N] (True =
    pad; columns >= N are valid). None when no column in range is padding."""
    if padding is None or start >= padding.shape[1] or not padding[:, start:stop].any():
        return None
    valid = torch.ones(padding.shape[0], stop - start, dtype=torch.bool, device=padding.device)
    inside = min(stop, padding.shape[1])
    valid[:, : inside - start] = ~padding[:, start:inside]
    return valid


class CachedBlockPredictor(NetworkPredictor):
    """Block-diffusion predictor over a KV cache (the engine's `WindowPredictor` protocol; use `align_windows=True`).

    begin_window caches every clean block before the window (prompt blocks too), sliding the cache when a context
    window is set; __call__ runs only the window's tokens at their positions against the cache; end_window runs the
    committed block once, clean, and appends its keys/values. With a fixed loop count this equals
    `UncachedBlockPredictor` up to float rounding; with a varying S the prefix stays at `commit_loops` depth, and an
    adaptive exit rule sees only the window's hidden states.

    Args:
        model: the denoiser network.
        mask_id: mask token id.
        loop_policy: S per step (and optional early exit); default S = 1. The cache is committed with
            `cache_options.commit_loops` (default: the policy's largest S) so every step finds its loops cached.
        block_size: L', the block length the model was trained with.
        cache_options: see `CacheOptions`.
        padding: optional bool [B, N] over the first N canvas columns, True = pad (never attended).
    """

    def __init__(self, model: LoopedTransformer, mask_id: int, loop_policy=None, block_size: int = 16,
                 cache_options: CacheOptions | None = None, padding: Tensor | None = None):
        super().__init__(model, mask_id, loop_policy)
        self.block_size = block_size
        self.options = cache_options or CacheOptions()
        window = self.options.context_window
        if window is not None and (window <= block_size or window % block_size):
            raise UserError(f"context_window {window} must be a multiple of block_size {block_size} above it")
        self.commit_loops = self.options.commit_loops or max_policy_loops(self.loop_policy)
        self.padding = padding
        self.cache = BlockKVCache(self.options.reuse_last_loop)
        self.end = 0
        self.offset = 0

    def _positions(self, start: int, stop: int, device: torch.device) -> Tensor:
        return (torch.arange(start, stop, device=device) - self.offset)[None]

    def _key_valid(self, start: int, stop: int) -> Tensor | None:
        new = padding_validity(self.padding, start, stop)
        if new is None and self.cache.key_valid is None:
            return None
        batch = self.padding.shape[0]
        if new is None:
            new = torch.ones(batch, stop - start, dtype=torch.bool, device=self.padding.device)
        old = self.cache.key_valid
        if old is None:
            old = torch.ones(batch, self.cache.length, dtype=torch.bool, device=new.device)
        return torch.cat((old, new), dim=1)

    def _past(self) -> BlockKVCache | None:
        return self.cache if self.cache.length else None

    def _make_room(self, width: int) -> None:
        """Slide the cache so that it plus `width` new columns fit the context window."""
        window = self.options.context_window
        if window is not None and self.cache.length + width > window:
            self.offset += self.cache.slide(window - self.block_size)

    @torch.no_grad()
    def _commit(self, tokens: Tensor, start: int, stop: int) -> None:
        """Run clean canvas columns [start, stop) (whole blocks) against the cache and append their keys/values."""
        columns = torch.arange(start, stop, device=tokens.device)
        rule = block_causal_mask(columns, columns, self.block_size) if stop - start > self.block_size else None
        valid = self._key_valid(start, stop)
        out = self.model(tokens[:, start:stop], loops=self.commit_loops, position_ids=self._positions(start, stop,
                         tokens.device), attn_mask=attention_mask(rule, self.cache.length, valid), past=self._past(),
                         return_present=True)
        self.cache.append(out.present, self._positions(start, stop, tokens.device),
                          None if valid is None else valid[:, self.cache.length:])
        self.end = stop

    def begin_window(self, tokens: Tensor, window: slice) -> None:
        """Cache clean columns [end, window.start) and make room for the window."""
        if window.start % self.block_size or window.stop - window.start > self.block_size:
            raise UserError(f"block-diffusion windows must be whole blocks of {self.block_size} aligned at column 0 "
                            f"(got columns {window.start}..{window.stop}); pass align_windows=True to generate")
        if self.end > window.start:
            raise UserError("this cache already holds columns past the window; use a fresh predictor per canvas")
        if (tokens[:, self.end:window.start] == self.mask_id).any():
            raise UserError("block diffusion decodes left to right: the prefix before a window has masked slots")
        context = self.options.context_window
        while self.end < window.start:
            self._make_room(self.block_size)
            room = window.start - self.end if context is None else context - self.cache.length
            self._commit(tokens, self.end, min(window.start, self.end + room - room % self.block_size))
        self._make_room(window.stop - window.start)

    def layout(self, tokens: Tensor, window: slice, loops: int) -> ForwardLayout:
        """Only the window's tokens (canvas int64 [B, N]), at their positions, against the cache."""
        if self.cache.length and not self.cache.serves(loops):
            raise UserError(f"the cache was committed with {self.cache.loops} loops; this step asks for {loops}")
        mask = attention_mask(None, self.cache.length, self._key_valid(window.start, window.stop))
        return ForwardLayout(inputs=tokens[:, window], position_ids=self._positions(window.start, window.stop,
                             tokens.device), attn_mask=mask, window=slice(0, window.stop - window.start),
                             past=self._past(), past_length=self.cache.length)

    def end_window(self, tokens: Tensor, window: slice) -> None:
        """Append the committed window's clean keys/values."""
        self._commit(tokens, window.start, window.stop)

    def select_rows(self, index: Tensor) -> None:
        """Continue with rows `index` (int64 [B']) only (rows that stopped generating are dropped)."""
        self.cache.select_rows(index)
        if self.padding is not None:
            self.padding = self.padding.index_select(0, index)


class UncachedBlockPredictor(NetworkPredictor):
    """Reference block-diffusion predictor: every call recomputes prefix + current block with the block-causal mask
    (the prefix at the step's S). Same protocol and arguments as `CachedBlockPredictor` (no cache options); with a
    fixed loop count both give the same log-probs up to float rounding."""

    def __init__(self, model: LoopedTransformer, mask_id: int, loop_policy=None, block_size: int = 16,
                 padding: Tensor | None = None):
        super().__init__(model, mask_id, loop_policy)
        self.block_size = block_size
        self.padding = padding

    def layout(self, tokens: Tensor, window: slice, loops: int) -> ForwardLayout:
        """The canvas (int64 [B, N]) up to the window's end under the block-causal mask."""
        columns = torch.arange(window.stop, device=tokens.device)
        mask = attention_mask(block_causal_mask(columns, columns, self.block_size), 0,
                              padding_validity(self.padding, 0, window.stop))
        return ForwardLayout(inputs=tokens[:, :window.stop], position_ids=None, attn_mask=mask, window=window)

    def begin_window(self, tokens: Tensor, window: slice) -> None:
        if window.start % self.block_size or window.stop - window.start > self.block_size:
            raise UserError(f"block-diffusion windows must be whole blocks of {self.block_size} aligned at column 0; "
                            "pass align_windows=True to generate")
