"""Transformer building blocks: rotary embeddings from explicit position ids, attention over SDPA, MLP, block.

Keys are cached *before* rotation together with their position ids, so a cache can be re-based (slid past the
training context) by changing positions alone.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

#: A cached prefix for one layer application: (keys before RoPE [B,H,P,hd], values [B,H,P,hd], positions [B|1,P]).
PastKV = tuple[Tensor, Tensor, Tensor]
#: Rotary tables of a sequence's positions: (cos, sin), each float32 [B|1, 1, L, hd/2] (see `rotary_angles`).
Rotary = tuple[Tensor, Tensor]


def causal_mask(length: int, device: torch.device | str) -> Tensor:
    """bool [1, 1, L, L], True where query i may attend key j (j <= i)."""
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None]


def rotary_angles(position_ids: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """Cosines and sines for rotary embeddings.

    Args:
        position_ids: integer tensor [B|1, L].
        head_dim: even head dimension hd.
        theta: RoPE base.
    Returns:
        (cos, sin), each float32 [B|1, 1, L, hd/2].
    """
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim)
    angles = position_ids.to(torch.float32)[..., None] * inv_freq
    cos, sin = angles.cos(), angles.sin()
    return torch.cat((cos, cos), -1)[:, None], torch.cat((-sin, sin), -1)[:, None]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs (first half, second half) of x [B,H,L,hd] by the given angles; keeps x's dtype."""
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)
    return (x32 * cos + torch.cat((x2, x1), dim=-1) * sin).to(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention through `scaled_dot_product_attention`, bidirectional unless a mask says otherwise."""

    def __init__(self, d_model: int, n_heads: int, rope_theta: float):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.rope_theta = rope_theta
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def forward(
        self,
        x: Tensor,
        position_ids: Tensor,
        attn_mask: Tensor | None = None,
        past: PastKV | None = None,
        return_present: bool = True,
        rotary: Rotary | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """Attend from x to (past prefix ++ x).

        Args:
            x: [B, L, D] hidden states.
            position_ids: [B|1, L] integer positions of x.
            attn_mask: optional bool [B|1, 1|H, L, P+L], True where a query may attend a key, or a FlexAttention
                BlockMask over (L, P+L) (routed to `flex_attention`; fused only under torch.compile, and this torch
                has no FlexAttention backward on CPU).
            past: optional cached prefix (keys before RoPE, values, positions) with P entries.
            return_present: False returns None instead of this input's keys and values. They are views of the qkv
                projection, and a torch.compile'd forward that returns views of an intermediate makes aot_autograd
                replay those views on every call (one such replay died with a garbage shape); training asks for
                none, so its compiled graph has no such outputs.
            rotary: `rotary_angles(position_ids, ...)` when the caller has them (a model builds them once per
                forward instead of once per layer application); computed here when None.
        Returns:
            (output [B, L, D], (keys before RoPE [B,H,L,hd], values [B,H,L,hd]) or None) so callers can cache them.
        """
        batch, length, _ = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        present = (k, v) if return_present else None
        cos, sin = rotary if rotary is not None else rotary_angles(position_ids, self.head_dim, self.rope_theta)
        q = apply_rotary(q, cos, sin)
        if past is not None:
            past_k, past_v, past_pos = past
            k_pos = torch.cat((past_pos.expand(position_ids.shape[0], -1), position_ids), dim=1)
            k = torch.cat((past_k.expand(batch, -1, -1, -1), k), dim=2)
            v = torch.cat((past_v.expand(batch, -1, -1, -1), v), dim=2)
            cos, sin = rotary_angles(k_pos, self.head_dim, self.rope_theta)
        k = apply_rotary(k, cos, sin)
        if isinstance(attn_mask, BlockMask):
            y = flex_attention(q, k, v, block_mask=attn_mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out(y.transpose(1, 2).reshape(batch, length, -1)), present


class MLP(nn.Module):
    """Two-layer GELU feed-forward network, as in the DiT backbone of MDLM."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, L, D] -> [B, L, D]."""
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)).

    gated: multiply each branch by a learnable per-channel gate [D] that starts at 0, so the block starts as the
    identity (the adaLN-zero gates of DiT, without the conditioning); the gates get gradients from the first step.
    """

    def __init__(self, d_model: int, n_heads: int, mlp_hidden: int, rope_theta: float, gated: bool = False):
        super().__init__()
        self.attn_norm = nn.RMSNorm(d_model)
        self.attn = Attention(d_model, n_heads, rope_theta)
        self.mlp_norm = nn.RMSNorm(d_model)
        self.mlp = MLP(d_model, mlp_hidden)
        # Ungated blocks own no gate parameters, so their state dict (and old checkpoints) stay as they were.
        self.attn_gate = nn.Parameter(torch.zeros(d_model)) if gated else None
        self.mlp_gate = nn.Parameter(torch.zeros(d_model)) if gated else None

    def forward(
        self, x: Tensor, position_ids: Tensor, attn_mask: Tensor | None = None, past: PastKV | None = None,
        return_present: bool = True, rotary: Rotary | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """x [B, L, D] -> ([B, L, D], this application's (keys, values) or None); arguments as in
        `Attention.forward`."""
        attended, present = self.attn(self.attn_norm(x), position_ids, attn_mask, past, return_present, rotary)
        x = x + (attended if self.attn_gate is None else self.attn_gate * attended)
        update = self.mlp(self.mlp_norm(x))
        return x + (update if self.mlp_gate is None else self.mlp_gate * update), present


#: Parameter-name endings of the projections that write into the residual stream.
RESIDUAL_PROJECTIONS = ("out.weight", "down.weight")


def init_weights(module: nn.Module, depth: int, zero_residual: bool = False) -> None:
    """GPT-2 style initialisation: matrices N(0, 0.02), residual output projections N(0, 0.02 / sqrt(2 * depth))
    (depth = the number of block applications the residual stream passes through), or exactly 0 when
    `zero_residual` (every block then starts as the identity). Vectors (norm gains, gates) keep their values."""
    for name, param in module.named_parameters():
        if param.dim() < 2:
            continue
        if name.endswith(RESIDUAL_PROJECTIONS):
            if zero_residual:
                nn.init.zeros_(param)
            else:
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * depth))
        else:
            nn.init.normal_(param, mean=0.0, std=0.02)
