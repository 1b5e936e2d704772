"""Canvases: prompts laid out for decoding, with the slots to generate masked."""

from __future__ import annotations

import torch
from torch import Tensor

from loopdlm.errors import UserError


def prompt_canvas(prompts: list[list[int]], length: int, mask_id: int, pad_id: int) -> Tensor:
    """Rows of [left pad | prompt | masks] of total `length`, so every row's generation starts at the same column.

    prompts: token ids per row (may be empty) -> int64 [B, length]. Raises UserError if a prompt leaves no room.
    """
    longest = max((len(p) for p in prompts), default=0)
    if longest >= length:
        raise UserError(f"prompt of {longest} tokens leaves no room to generate within length {length}")
    canvas = torch.full((len(prompts), length), mask_id, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        canvas[row, :longest] = pad_id
        if prompt:
            canvas[row, longest - len(prompt):longest] = torch.tensor(prompt, dtype=torch.long)
    return canvas


def block_prompt_canvas(prompts: list[list[int]], block_size: int, filler: int) -> tuple[Tensor, Tensor]:
    """Prompts right-aligned on a canvas whose width is the longest prompt rounded up to whole blocks (block
    diffusion generates from a block boundary).

    Returns (tokens int64 [B, P], padding bool [B, P], True = pad column holding `filler`).
    """
    width = -(-max((len(p) for p in prompts), default=0) // block_size) * block_size
    tokens = torch.full((len(prompts), width), filler, dtype=torch.long)
    padding = torch.ones(len(prompts), width, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        if prompt:
            tokens[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            padding[row, width - len(prompt):] = False
    return tokens, padding
