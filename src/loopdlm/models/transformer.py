"""The denoiser: embed -> prelude -> looped core x S -> coda -> norm -> head.

LoopMDM splits the layer stack into a prelude [0, a) run once, a core [a, b) run S times with the *same module
instances* (shared weights), and a coda [b, L) run once. A plain transformer is the same class with an empty core.
The model knows nothing about diffusion: masks, positions and the loop count are arguments of `forward`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from loopdlm.errors import ConfigError
from loopdlm.models.layers import Block, PastKV, init_weights
from loopdlm.settings import NON_NEGATIVE, POSITIVE, Range, check_fields, setting

#: Identifies one layer application: (layer index, loop index); loop index is 0 outside the core.
LayerSlot = tuple[int, int]


@dataclass
class ModelConfig:
    """Shape of the denoiser. `vocab_size` counts every token id, the mask token included."""

    vocab_size: int = setting(0, "token ids, the mask included (0 = take the tokenizer's)", NON_NEGATIVE)
    n_layers: int = setting(6, "transformer layers in total (prelude + core + coda)", POSITIVE)
    d_model: int = setting(256, "hidden width; d_model / n_heads must be even", POSITIVE)
    n_heads: int = setting(4, "attention heads", POSITIVE)
    mlp_ratio: float = setting(4.0, "MLP hidden width as a multiple of d_model", Range(0, low_open=True))
    core_start: int = setting(0, "first layer of the looped core (a in [a, b))", NON_NEGATIVE)
    core_end: int = setting(0, "layer after the looped core (b; core_start = core_end is a plain transformer)",
                            NON_NEGATIVE)
    max_loops: int = setting(1, "S_max: training draws S ~ U{1..S_max} core applications per step", POSITIVE)
    input_injection: bool = setting(False, "add the prelude output before loops 2..S")
    checkpoint_loops: bool = setting(False, "activation checkpointing per loop (memory flat in S)")
    tie_embeddings: bool = setting(False, "share the input embedding with the output head")
    rope_theta: float = setting(10000.0, "RoPE base", Range(0, low_open=True))

    def validate(self) -> None:
        """Raise ConfigError (a ValueError) naming the first out-of-range or inconsistent field."""
        check_fields(self, "model.")
        if self.vocab_size == 1:
            raise ConfigError("model.vocab_size must be 0 (take the tokenizer's) or >= 2, got 1")
        if not self.core_start <= self.core_end <= self.n_layers:
            raise ConfigError(f"need model.core_start <= model.core_end <= model.n_layers, got {self.core_start}, "
                              f"{self.core_end}, {self.n_layers}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ConfigError(f"model.d_model / model.n_heads must be an even integer (RoPE rotates channel pairs), "
                              f"got {self.d_model} / {self.n_heads}")

    @property
    def core_layers(self) -> int:
        """Number of layers in the looped core (0 for a plain transformer)."""
        return self.core_end - self.core_start


class LoopExit(Protocol):
    """Decides, after loop k of the core, which rows (or tokens) keep iterating."""

    def keep_going(self, loop: int, previous: Tensor, current: Tensor) -> Tensor:
        """previous, current: [B, L, D] hidden states before/after loop `loop` (1-based).

        Returns bool [B] (per sequence) or [B, L] (per token): True where iteration continues.
        """


@dataclass
class DenoiserOutput:
    """What one forward pass returns.

    logits: [B, L, V] float; loop_hidden: core outputs after each loop, each [B, L, D] (only when requested);
    core_applications: float [B], loops actually applied per row (per-token exits count the mean over tokens);
    present: per layer application (layer, loop) the (keys before RoPE, values) of this input, when requested.
    """

    logits: Tensor
    core_applications: Tensor
    loop_hidden: list[Tensor] = field(default_factory=list)
    present: dict[LayerSlot, tuple[Tensor, Tensor]] | None = None


class LoopedTransformer(nn.Module):
    """Bidirectional transformer whose layers [core_start, core_end) can be applied S times with shared weights."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        hidden = int(config.mlp_ratio * config.d_model)
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(
            Block(config.d_model, config.n_heads, hidden, config.rope_theta) for _ in range(config.n_layers)
        )
        self.final_norm = nn.RMSNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        init_weights(self, config.n_layers)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight

    def forward(
        self,
        tokens: Tensor,
        loops: int = 1,
        position_ids: Tensor | None = None,
        attn_mask: Tensor | None = None,
        past: Mapping[LayerSlot, PastKV] | None = None,
        return_present: bool = False,
        return_hidden: bool = False,
        loop_exit: LoopExit | None = None,
    ) -> DenoiserOutput:
        """Run the stack with the core applied `loops` times.

        Args:
            tokens: int64 [B, L].
            loops: S >= 1; any value is allowed, also above `config.max_loops` (ignored without a core).
            position_ids: [B|1, L]; defaults to 0..L-1.
            attn_mask: optional bool [B|1, 1, L, P+L] (P = cached prefix length), True = may attend.
            past: cached prefix per layer application, e.g. a block-diffusion KV cache.
            return_present: also return each application's (keys, values) for caching.
            return_hidden: also return the core output after every loop.
            loop_exit: optional early-exit rule for the core (adaptive depth); `loops` is then the maximum.
        """
        if loops < 1:
            raise ValueError(f"loops must be >= 1, got {loops}")
        batch, length = tokens.shape
        if position_ids is None:
            position_ids = torch.arange(length, device=tokens.device)[None]
        present: dict[LayerSlot, tuple[Tensor, Tensor]] | None = {} if return_present else None

        def apply(index: int, loop: int, h: Tensor) -> Tensor:
            slot = (index, loop)
            layer_past = past.get(slot) if past is not None else None
            h, kv = self.layers[index](h, position_ids, attn_mask, layer_past)
            if present is not None:
                present[slot] = kv
            return h

        cfg = self.config
        h = self.embed(tokens)
        for index in range(cfg.core_start):
            h = apply(index, 0, h)

        core_applications = torch.zeros(batch, device=tokens.device)
        loop_hidden: list[Tensor] = []
        if cfg.core_layers:
            prelude_out = h
            active: Tensor | None = None
            for loop in range(1, loops + 1):
                previous = h
                core_in = h + prelude_out if cfg.input_injection and loop > 1 else h

                def run_core(x: Tensor, loop: int = loop) -> Tensor:
                    for index in range(cfg.core_start, cfg.core_end):
                        x = apply(index, loop, x)
                    return x

                if cfg.checkpoint_loops and torch.is_grad_enabled() and present is None:
                    h = checkpoint(run_core, core_in, use_reentrant=False)
                else:
                    h = run_core(core_in)
                if active is not None:
                    h = torch.where(_broadcastable(active), h, previous)
                    core_applications += active.float().reshape(batch, -1).mean(dim=1)
                else:
                    core_applications += 1
                if return_hidden:
                    loop_hidden.append(h)
                if loop_exit is not None and loop < loops:
                    keep = loop_exit.keep_going(loop, previous, h)
                    active = keep if active is None else active & keep
                    if not active.any():
                        break

        for index in range(cfg.core_end, cfg.n_layers):
            h = apply(index, 0, h)
        logits = self.head(self.final_norm(h))
        return DenoiserOutput(logits=logits, core_applications=core_applications, loop_hidden=loop_hidden,
                              present=present)

    def num_parameters(self) -> int:
        """Count of distinct trainable parameters (shared core weights counted once, tied head once)."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int, loops: float, training: bool = True) -> float:
        """Matmul FLOPs per token for one pass, counting the core `loops` times (may be fractional: an expectation).

        Per layer application: 2 * (4 d^2 + 2 d h) for the attention and MLP projections (h = MLP width) plus
        4 * L * d for attention scores and weighted values; the head adds 2 * d * V. Training multiplies by 3
        (the backward pass costs twice the forward).
        """
        cfg = self.config
        d = cfg.d_model
        per_layer = 2 * (4 * d * d + 2 * d * int(cfg.mlp_ratio * d)) + 4 * seq_len * d
        applications = cfg.n_layers - cfg.core_layers + cfg.core_layers * loops
        forward = applications * per_layer + 2 * d * cfg.vocab_size
        return forward * (3 if training else 1)


def _broadcastable(active: Tensor) -> Tensor:
    """Shape a [B] or [B, L] activity mask to broadcast against [B, L, D] hidden states."""
    return active[:, None, None] if active.dim() == 1 else active[..., None]
