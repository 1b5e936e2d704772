"""The denoiser: embed -> prelude -> looped core x S -> coda -> norm -> head.

LoopMDM splits the layer stack into a prelude [0, a) run once, a core [a, b) run S times with the *same module
instances* (shared weights), and a coda [b, L) run once. A plain transformer is the same class with an empty core.
The model knows nothing about diffusion: masks, positions and the loop count are arguments of `forward`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor, nn
from torch.nn.utils import skip_init
from torch.utils.checkpoint import checkpoint

from loopdlm.errors import ConfigError
from loopdlm.models.layers import Block, PastKV, causal_mask, init_weights, rotary_angles
from loopdlm.settings import NON_NEGATIVE, POSITIVE, OneOf, Range, check_fields, setting

#: Identifies one layer application: (layer index, loop index); loop index is 0 outside the core.
LayerSlot = tuple[int, int]


#: How the prelude output e re-enters the looped core (see `ModelConfig.injection`).
INJECTIONS = ("none", "add", "concat")
#: How residual branches start (see `ModelConfig.residual_init`).
RESIDUAL_INITS = ("default", "zero", "gated")
#: Which depth scales the residual-projection initialisation (see `ModelConfig.init_depth`).
INIT_DEPTHS = ("stored", "effective")


#: ModelConfig fields that shape no weights: `architecture()` leaves them out (a resume may change them).
RUN_TIME_FIELDS = ("max_loops",)


@dataclass
class ModelConfig:
    """Shape of the denoiser. `vocab_size` counts every token id, the mask token included.

    The loop-recipe defaults are the recipe study's winner (docs/results.md): the loop-carry norm on, every other
    option (injection, residual_init, init_depth, backprop_loops) off. With loop_norm=false as well the model and
    its state dict are exactly those of the paper-faithful LoopMDM (the `loopmdm-paper` preset). The loop-only
    options (injection, loop_norm, backprop_loops) are ignored by a model without a core, so a plain MDM shares
    the defaults.
    """

    vocab_size: int = setting(0, "token ids, the mask included (0 = take the tokenizer's)", NON_NEGATIVE)
    n_layers: int = setting(6, "transformer layers in total (prelude + core + coda)", POSITIVE)
    d_model: int = setting(256, "hidden width; d_model / n_heads must be even", POSITIVE)
    n_heads: int = setting(4, "attention heads", POSITIVE)
    mlp_ratio: float = setting(4.0, "MLP hidden width as a multiple of d_model", Range(0, low_open=True))
    core_start: int = setting(0, "first layer of the looped core (a in [a, b))", NON_NEGATIVE)
    core_end: int = setting(0, "layer after the looped core (b; core_start = core_end is a plain transformer)",
                            NON_NEGATIVE)
    max_loops: int = setting(1, "S_max: training draws S in 1..S_max core applications per step; the default S of "
                             "sampling and evaluation (a resume may change it: it shapes no weights)", POSITIVE)
    input_injection: bool = setting(False, "legacy spelling of injection=add (configs written before `injection` "
                                    "existed)")
    injection: str = setting(
        "none", "how the prelude output e re-enters the core: none; add (h + e before loops 2..S); concat (Huginn's "
        "adapter Linear([h ; e]) -> d before every loop, starting as the identity on h)", OneOf(INJECTIONS))
    residual_init: str = setting(
        "default", "residual branches at init: default (small random output projections); zero (attention-out and "
        "MLP-down projections start at 0: every block starts as the identity); gated (a per-channel gate on each "
        "branch, starting at 0, as DiT's adaLN-zero)", OneOf(RESIDUAL_INITS))
    init_depth: str = setting(
        "stored", "depth that scales the residual output projections' init std 0.02 / sqrt(2 * depth): stored "
        "(n_layers) or effective (the core counted max_loops times)", OneOf(INIT_DEPTHS))
    loop_norm: bool = setting(True, "RMS-normalise the core output after every loop (own gain), so the carry "
                              "re-entering the core and the state entering the coda are normalised (as Huginn's "
                              "recurrent state); false = the paper's recipe")
    backprop_loops: int = setting(
        0, "truncated backprop: only the last k loops build a graph, earlier ones run under no_grad (as Huginn); "
        "0 = backpropagate through every loop. Needs an injection so the prelude keeps its gradient", NON_NEGATIVE)
    tie_embeddings: bool = setting(False, "share the input embedding with the output head")
    causal: bool = setting(False, "causal attention when no mask is passed (an autoregressive judge, `train-judge`); "
                           "False = bidirectional (a denoiser)")
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
        if self.input_injection and self.injection not in ("none", "add"):
            raise ConfigError(f"model.input_injection=true means injection=add; it conflicts with "
                              f"injection={self.injection}")
        if self.backprop_loops and self.core_layers and self.injection_mode == "none":
            # Without injection the prelude (and embedding) reach the loss only through the first loop, which
            # truncation runs without a graph: they would stop learning whenever S > backprop_loops.
            raise ConfigError("model.backprop_loops needs model.injection=add or concat")

    @property
    def core_layers(self) -> int:
        """Number of layers in the looped core (0 for a plain transformer)."""
        return self.core_end - self.core_start

    @property
    def injection_mode(self) -> str:
        """The injection in use: `injection`, or 'add' for configs that still say input_injection=true."""
        return "add" if self.input_injection and self.injection == "none" else self.injection

    @property
    def effective_layers(self) -> int:
        """Block applications of a forward pass at S = max_loops (the core counted max_loops times)."""
        return self.n_layers + self.core_layers * (self.max_loops - 1)

    def architecture(self) -> dict[str, object]:
        """The fields that decide which weights exist and what they compute: every field but `max_loops`, which
        only sets the default S (training's S_max, sampling's default), so a resume may change it."""
        return {name: value for name, value in vars(self).items() if name not in RUN_TIME_FIELDS}


class LoopExit(Protocol):
    """Decides, after loop k of the core, which rows (or tokens) keep iterating."""

    def keep_going(self, loop: int, previous: Tensor, current: Tensor) -> Tensor:
        """previous, current: [B, L, D] hidden states before/after loop `loop` (1-based).

        Returns bool [B] (per sequence) or [B, L] (per token): True where iteration continues.
        """


@dataclass
class TransformerOutput:
    """What one forward pass returns.

    logits: [B, L, V] float, or [N, V] at the N positions a `readout_mask` selects (row-major order);
    loop_hidden: core outputs after each loop, each [B, L, D] (only when requested);
    loop_logits: the prediction read out (coda, final norm, head) after each loop run, each shaped as `logits`,
    the last being `logits` (only when requested; a model without a core gives [logits]);
    core_applications: float [B], loops actually applied per row (per-token exits count the mean over tokens);
    present: per layer application (layer, loop) the (keys before RoPE, values) of this input, when requested.
    """

    logits: Tensor
    core_applications: Tensor
    loop_hidden: list[Tensor] = field(default_factory=list)
    loop_logits: list[Tensor] = field(default_factory=list)
    present: dict[LayerSlot, tuple[Tensor, Tensor]] | None = None


class LoopedTransformer(nn.Module):
    """Bidirectional transformer whose layers [core_start, core_end) can be applied S times with shared weights."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        #: Activation checkpointing per loop (memory flat in S): a run-time switch (train.checkpoint_loops), not
        #: part of the architecture.
        self.checkpoint_loops = False
        hidden = int(config.mlp_ratio * config.d_model)
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        gated = config.residual_init == "gated"
        self.layers = nn.ModuleList(
            Block(config.d_model, config.n_heads, hidden, config.rope_theta, gated) for _ in range(config.n_layers)
        )
        self.final_norm = nn.RMSNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        # Optional modules come last and draw nothing at construction, so that the shared modules get the same
        # initial weights with them or without. Each takes part in every forward pass (data parallelism needs
        # every parameter to get a gradient on every step, whatever S).
        looped = config.core_layers > 0
        self.loop_norm = nn.RMSNorm(config.d_model) if config.loop_norm and looped else None
        self.injection_adapter = (skip_init(nn.Linear, 2 * config.d_model, config.d_model, bias=False)
                                  if config.injection_mode == "concat" and looped else None)
        depth = config.effective_layers if config.init_depth == "effective" else config.n_layers
        init_weights(self, depth, zero_residual=config.residual_init == "zero")
        if self.injection_adapter is not None:
            # [I | 0]: the adapter starts by passing the carry h through unchanged and learns how much of e to
            # mix in, so loop 1 (where h = e) starts as the plain model's.
            with torch.no_grad():
                self.injection_adapter.weight.zero_()
                self.injection_adapter.weight[:, : config.d_model].copy_(torch.eye(config.d_model))
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
        return_loop_logits: bool = False,
        readout_mask: Tensor | None = None,
    ) -> TransformerOutput:
        """Run the stack with the core applied `loops` times.

        Args:
            tokens: int64 [B, L].
            loops: S >= 1; any value is allowed, also above `config.max_loops` (ignored without a core).
            position_ids: [B|1, L]; defaults to 0..L-1.
            attn_mask: optional bool [B|1, 1, L, P+L] (P = cached prefix length), True = may attend; None = all
                keys (bidirectional), or causal over the L tokens when `config.causal`.
            past: cached prefix per layer application, e.g. a block-diffusion KV cache.
            return_present: also return each application's (keys, values) for caching.
            return_hidden: also return the core output after every loop.
            loop_exit: optional early-exit rule for the core (adaptive depth); `loops` is then the maximum.
            return_loop_logits: also read the prediction out after every loop (per-loop supervision); not with
                return_present, whose coda entries would be overwritten by the readouts.
            readout_mask: optional bool [B, L]: logits only where True, [N, V] in row-major order (as Hugging
                Face's logits_to_keep). Every layer still runs at every position (attention reads them all); only
                the final norm and the head are restricted, which saves their work where nothing is scored.
        """
        if loops < 1:
            raise ValueError(f"loops must be >= 1, got {loops}")
        if return_loop_logits and return_present:
            raise ValueError("return_loop_logits and return_present cannot be combined")
        batch, length = tokens.shape
        if attn_mask is None and self.config.causal and past is None:
            attn_mask = causal_mask(length, tokens.device)
        if position_ids is None:
            position_ids = torch.arange(length, device=tokens.device)[None]
        present: dict[LayerSlot, tuple[Tensor, Tensor]] | None = {} if return_present else None
        # every layer application rotates by the same positions: build the tables once
        rotary = rotary_angles(position_ids, self.config.d_model // self.config.n_heads, self.config.rope_theta)

        def apply(index: int, loop: int, h: Tensor) -> Tensor:
            slot = (index, loop)
            layer_past = past.get(slot) if past is not None else None
            h, kv = self.layers[index](h, position_ids, attn_mask, layer_past, present is not None, rotary)
            if present is not None:
                present[slot] = kv
            return h

        cfg = self.config
        h = self.embed(tokens)
        for index in range(cfg.core_start):
            h = apply(index, 0, h)

        core_applications = torch.zeros(batch, device=tokens.device)
        loop_hidden: list[Tensor] = []
        loop_logits: list[Tensor] = []
        if cfg.core_layers:
            prelude_out = h
            active: Tensor | None = None
            first_with_grad = loops - cfg.backprop_loops + 1 if cfg.backprop_loops else 1
            for loop in range(1, loops + 1):
                previous = h

                def run_core(x: Tensor, loop: int = loop) -> Tensor:
                    for index in range(cfg.core_start, cfg.core_end):
                        x = apply(index, loop, x)
                    return x

                with torch.no_grad() if loop < first_with_grad else contextlib.nullcontext():
                    core_in = self._loop_input(h, prelude_out, loop)
                    if self.checkpoint_loops and torch.is_grad_enabled() and present is None:
                        h = checkpoint(run_core, core_in, use_reentrant=False)
                    else:
                        h = run_core(core_in)
                    if self.loop_norm is not None:
                        h = self.loop_norm(h)
                    if active is not None:
                        h = torch.where(_broadcastable(active), h, previous)
                        core_applications += active.float().reshape(batch, -1).mean(dim=1)
                    else:
                        core_applications += 1
                if return_hidden:
                    loop_hidden.append(h)
                stopping = loop == loops
                if loop_exit is not None and loop < loops:
                    keep = loop_exit.keep_going(loop, previous, h)
                    active = keep if active is None else active & keep
                    stopping = not active.any()
                if return_loop_logits and not stopping:
                    loop_logits.append(self._read_out(h, apply, readout_mask))
                if stopping:
                    break

        logits = self._read_out(h, apply, readout_mask)
        if return_loop_logits:
            loop_logits.append(logits)
        return TransformerOutput(logits=logits, core_applications=core_applications, loop_hidden=loop_hidden,
                              loop_logits=loop_logits, present=present)

    def _loop_input(self, h: Tensor, prelude_out: Tensor, loop: int) -> Tensor:
        """What enters the core on loop `loop` (1-based): the carry h [B, L, D] combined with the prelude output
        [B, L, D] as `injection` says."""
        mode = self.config.injection_mode
        if mode == "add" and loop > 1:
            return h + prelude_out
        if mode == "concat":
            return self.injection_adapter(torch.cat((h, prelude_out), dim=-1))
        return h

    def _read_out(self, h: Tensor, apply: Callable[[int, int, Tensor], Tensor], readout_mask: Tensor | None
                  ) -> Tensor:
        """Coda, final norm and head on a core output h [B, L, D] -> logits [B, L, V], or [N, V] at the True
        positions of readout_mask [B, L]."""
        for index in range(self.config.core_end, self.config.n_layers):
            h = apply(index, 0, h)
        if readout_mask is not None:
            h = h[readout_mask]
        return self.head(self.final_norm(h))

    def num_parameters(self) -> int:
        """Count of distinct trainable parameters (shared core weights counted once, tied head once)."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int, loops: float, training: bool = True, readouts: int = 0,
                        readout_fraction: float = 1.0) -> float:
        """Matmul FLOPs per token for one pass, counting the core `loops` times (may be fractional: an expectation).

        Per layer application: 2 * (4 d^2 + 2 d h) for the attention and MLP projections (h = MLP width) plus
        4 * L * d for attention scores and weighted values; the head adds 2 * d * V at the `readout_fraction` of
        positions it reads out (a `readout_mask`'s share of True) and a concat injection adapter 2 * 2d * d per
        loop; each of `readouts` extra predictions (after earlier loops) runs the coda and the head again.
        Training multiplies by 3 (the backward pass costs twice the forward).
        """
        cfg = self.config
        d = cfg.d_model
        per_layer = 2 * (4 * d * d + 2 * d * int(cfg.mlp_ratio * d)) + 4 * seq_len * d
        applications = cfg.n_layers - cfg.core_layers + cfg.core_layers * loops
        applications += readouts * (cfg.n_layers - cfg.core_end)
        forward = applications * per_layer + (1 + readouts) * 2 * d * cfg.vocab_size * readout_fraction
        if self.injection_adapter is not None and cfg.core_layers:
            forward += loops * 2 * (2 * d) * d
        return forward * (3 if training else 1)


def _broadcastable(active: Tensor) -> Tensor:
    """Shape a [B] or [B, L] activity mask to broadcast against [B, L, D] hidden states."""
    return active[:, None, None] if active.dim() == 1 else active[..., None]
