"""Window predictors: the network run as p_theta(x_0 | x_t) over the window the shared loop is decoding.

Every predictor that runs the network says only how one forward pass is laid out (`ForwardLayout`: which tokens go
in, at which positions, seeing what, against which cached keys) and `NetworkPredictor` runs that layout under the
loop policy. The layouts: `FullSequencePredictor` (the whole bidirectional sequence, here) and the block-diffusion
predictors over a KV cache (kv_cache.py). `wino.ShadowBlock` extends any of these layouts with WINO's shadow block.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from loopdlm.diffusion.masked import subs_log_probs
from loopdlm.models.layers import PastKV
from loopdlm.models.transformer import LayerSlot, LoopedTransformer, TransformerOutput
from loopdlm.sampling.engine import WindowPrediction
from loopdlm.sampling.loops import FixedLoops


@dataclass
class ForwardLayout:
    """One forward pass for a window.

    inputs int64 [B, I]; position_ids int64 [1, I] (None = 0..I-1); attn_mask bool [B|1, 1, I, P + I] over the P
    cached keys then the inputs (True = may attend; None = everything visible); past: the P cached positions' keys
    and values (None = no cache); window: the input rows that hold the window being decoded; past_length: P.
    """

    inputs: Tensor
    position_ids: Tensor | None
    attn_mask: Tensor | None
    window: slice
    past: Mapping[LayerSlot, PastKV] | None = None
    past_length: int = 0


class NetworkPredictor:
    """Base of the predictors that run the network; a subclass lays out the pass (`layout`) and may prepare or
    commit state between windows (`begin_window` / `end_window`).

    loop_policy decides S (and an optional early exit) from denoising progress; defaults to S = 1.
    """

    def __init__(self, model: LoopedTransformer, mask_id: int, loop_policy=None):
        self.model = model
        self.mask_id = mask_id
        self.loop_policy = loop_policy or FixedLoops(1)

    def layout(self, tokens: Tensor, window: slice, loops: int) -> ForwardLayout:
        """How to run the pass that predicts `window` of `tokens` (int64 [B, L]) with S = `loops`."""
        raise NotImplementedError

    def run(self, layout: ForwardLayout, loops: int) -> TransformerOutput:
        """The network's output for `layout` at S = `loops` under the policy's exit rule."""
        return self.model(layout.inputs, loops=loops, position_ids=layout.position_ids, attn_mask=layout.attn_mask,
                          past=layout.past, loop_exit=self.loop_policy.exit_rule)

    @torch.no_grad()
    def __call__(self, tokens: Tensor, window: slice, progress: float) -> WindowPrediction:
        """tokens int64 [B, L] -> WindowPrediction with log_probs float32 [B, W, V]."""
        loops = self.loop_policy.loops_for(progress)
        layout = self.layout(tokens, window, loops)
        out = self.run(layout, loops)
        return WindowPrediction(log_probs=subs_log_probs(out.logits[:, layout.window], self.mask_id),
                                core_applications=out.core_applications, loops=loops)

    def begin_window(self, tokens: Tensor, window: slice) -> None:
        pass

    def end_window(self, tokens: Tensor, window: slice) -> None:
        pass


class FullSequencePredictor(NetworkPredictor):
    """Runs the whole (bidirectional) sequence every pass and reads the window's SUBS log-probs."""

    def layout(self, tokens: Tensor, window: slice, loops: int) -> ForwardLayout:
        return ForwardLayout(inputs=tokens, position_ids=None, attn_mask=None, window=window)
