"""Attention analysis: how much attention masked query positions pay to masked vs unmasked keys, per layer
application (layer, loop k) and noise level t.

The LoopMDM mechanism claim is that looping raises attention from masked queries to masked keys. Attention runs
through SDPA, which returns no weights, so they are recomputed here from each attention module's own input (caught
by a forward pre-hook), its `qkv` projection and the same rotary embedding: exactly the softmax SDPA evaluates.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from loopdlm.diffusion.masked import apply_mask
from loopdlm.diffusion.schedules import LogLinear, Schedule
from loopdlm.errors import UserError
from loopdlm.models.layers import Attention, apply_rotary, rotary_angles
from loopdlm.models.transformer import LoopedTransformer


def attention_probabilities(attn: Attention, x: Tensor, position_ids: Tensor, attn_mask: Tensor | None = None
                            ) -> Tensor:
    """The attention weights `attn` uses on input x (no cached prefix).

    Args:
        attn: the module; x: float [B, L, D], its (normed) input; position_ids: [B|1, L];
        attn_mask: optional bool [B|1, 1|H, L, L], True = may attend.
    Returns:
        float32 [B, H, L, L]; each query's row sums to 1 over keys.
    """
    batch, length, _ = x.shape
    q, k, _ = attn.qkv(x).view(batch, length, 3, attn.n_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    cos, sin = rotary_angles(position_ids, attn.head_dim, attn.rope_theta)
    q, k = apply_rotary(q, cos, sin).float(), apply_rotary(k, cos, sin).float()
    scores = q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return scores.softmax(dim=-1)


def key_mass(probs: Tensor, masked: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Split each query's attention into the mass on masked keys, on unmasked keys, and on itself.

    probs float [B, H, L, L]; masked bool [B, L] (True = key/query is the mask token).
    Returns (masked_mass, unmasked_mass, self_mass), each float [B, H, L] over queries; masked + unmasked = 1.
    """
    on_masked = masked[:, None, None, :].to(probs.dtype)
    masked_mass = (probs * on_masked).sum(dim=-1)
    unmasked_mass = (probs * (1 - on_masked)).sum(dim=-1)
    self_mass = probs.diagonal(dim1=-2, dim2=-1)
    return masked_mass, unmasked_mass, self_mass


@dataclass
class AttentionRecord:
    """Means over masked queries (and heads, rows) of one layer application at one noise level.

    loop: 1-based loop index for core layers, 0 outside the core; depth: 0-based position of the application in
    the forward pass; masked_key_fraction: the mean share of keys that are masked, i.e. the masked mass uniform
    attention would give; queries: masked (row, query) pairs averaged over.
    """

    t: float
    layer: int
    loop: int
    depth: int
    masked_mass: float
    unmasked_mass: float
    self_mass: float
    masked_key_fraction: float
    queries: int

    @property
    def lift(self) -> float:
        """masked_mass / masked_key_fraction: > 1 when masked keys get more than their share."""
        return self.masked_mass / max(self.masked_key_fraction, 1e-12)

    def as_dict(self) -> dict[str, float | int]:
        """Plain values for JSON, with `lift`."""
        return {**vars(self), "lift": self.lift}


class _Accumulator:
    """Running sums per (layer, loop) over the forward passes of one noise level: masked, unmasked and self mass
    and the masked-key share, each summed over (row, head, masked query) triples, and the triple count."""

    def __init__(self):
        self.sums: dict[tuple[int, int], list[float]] = {}
        self.depth: dict[tuple[int, int], int] = {}
        self.heads = 1

    def add(self, slot: tuple[int, int], depth: int, probs: Tensor, masked: Tensor) -> None:
        masked_mass, unmasked_mass, self_mass = key_mass(probs, masked)
        selected = masked[:, None, :].expand_as(masked_mass)
        key_share = masked.float().mean(dim=1)[:, None, None].expand_as(masked_mass)
        values = [float(v[selected].sum()) for v in (masked_mass, unmasked_mass, self_mass, key_share)]
        totals = self.sums.setdefault(slot, [0.0] * 5)
        for i, v in enumerate(values + [float(selected.sum())]):
            totals[i] += v
        self.depth[slot] = depth
        self.heads = probs.shape[1]

    def records(self, t: float) -> list[AttentionRecord]:
        out = []
        for slot in sorted(self.sums, key=self.depth.__getitem__):
            masked_sum, unmasked_sum, self_sum, share_sum, triples = self.sums[slot]
            scale = 1.0 / max(triples, 1.0)
            out.append(AttentionRecord(t=t, layer=slot[0], loop=slot[1], depth=self.depth[slot],
                                       masked_mass=masked_sum * scale, unmasked_mass=unmasked_sum * scale,
                                       self_mass=self_sum * scale, masked_key_fraction=share_sum * scale,
                                       queries=int(triples) // self.heads))
        return out


@contextmanager
def _recording(model: LoopedTransformer, masked: Tensor, sink: _Accumulator) -> Iterator[None]:
    """While active, every forward pass of `model` adds each layer application's masked-query statistics to `sink`.

    masked: bool [B, L], the mask positions of the input about to be run. Applications are numbered in call order;
    a core layer's k-th call in a pass is loop k.
    """
    cfg = model.config
    calls: dict[int, int] = {}
    order = [0]

    def reset(module, args, kwargs):
        calls.clear()
        order[0] = 0

    def make_hook(index: int):
        def hook(module, args, kwargs):
            names = ("x", "position_ids", "attn_mask", "past", "return_present", "rotary")
            x, position_ids, attn_mask, past, _, _ = list(args) + [kwargs.get(n) for n in names[len(args):]]
            if past is not None:
                raise UserError("attention analysis does not support a cached prefix")
            calls[index] = calls.get(index, 0) + 1
            loop = calls[index] if cfg.core_start <= index < cfg.core_end else 0
            with torch.no_grad():
                probs = attention_probabilities(module, x, position_ids, attn_mask)
            sink.add((index, loop), order[0], probs, masked)
            order[0] += 1
        return hook

    handles = [model.register_forward_pre_hook(reset, with_kwargs=True)]
    handles += [layer.attn.register_forward_pre_hook(make_hook(i), with_kwargs=True)
                for i, layer in enumerate(model.layers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def analyze_attention(model: LoopedTransformer, batches: Sequence[tuple[Tensor, Tensor | None]], mask_id: int,
                      times: Iterable[float], loops: int, schedule: Schedule | None = None,
                      seed: int = 0) -> list[AttentionRecord]:
    """Masked-query attention statistics at each noise level t, per layer application.

    For every t, each clean batch x0 int64 [B, L] is noised by the forward process (1 - alpha_t of its noisable
    tokens masked; `noisable` bool [B, L] or None = all) and run with S = `loops`; statistics are averaged over
    all masked queries of all batches and all heads. Deterministic in `seed`. Runs on the model's device.

    Returns records ordered by t, then depth.
    """
    schedule = schedule or LogLinear()
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    records: list[AttentionRecord] = []
    try:
        for t in times:
            if not 0.0 < t <= 1.0:
                raise UserError(f"noise level t must be in (0, 1], got {t}")
            sink = _Accumulator()
            for x0, noisable in batches:
                x0 = x0.to(device)
                noisable = noisable.to(device) if noisable is not None else None
                prob = schedule.mask_probability(torch.tensor(t, device=device))
                xt, masked = apply_mask(x0, prob, noisable, mask_id, generator)
                with _recording(model, masked, sink):
                    model(xt, loops=loops)
            records += sink.records(t)
    finally:
        model.train(was_training)
    return records
