"""Denoisers for the shared loop: wrap a model into p_theta(x_0 | x_t) over a window."""

from __future__ import annotations

import torch
from torch import Tensor

from loopdlm.diffusion.masked import subs_log_probs
from loopdlm.models.transformer import LoopedTransformer
from loopdlm.sampling.engine import DenoiserOutputs
from loopdlm.sampling.loops import FixedLoops


class ModelDenoiser:
    """Full-sequence denoiser: runs the whole (bidirectional) sequence and returns the window's SUBS log-probs.

    loop_policy decides S (and an optional early exit) from denoising progress; defaults to S = 1.
    """

    def __init__(self, model: LoopedTransformer, mask_id: int, loop_policy=None):
        self.model = model
        self.mask_id = mask_id
        self.loop_policy = loop_policy or FixedLoops(1)

    @torch.no_grad()
    def __call__(self, tokens: Tensor, window: slice, progress: float) -> DenoiserOutputs:
        """tokens int64 [B, L] -> DenoiserOutputs with log_probs float32 [B, W, V]."""
        loops = self.loop_policy.loops_for(progress)
        out = self.model(tokens, loops=loops, loop_exit=self.loop_policy.exit_rule)
        return DenoiserOutputs(log_probs=subs_log_probs(out.logits[:, window], self.mask_id),
                               core_applications=out.core_applications, loops=loops)

    def begin_window(self, tokens: Tensor, window: slice) -> None:
        pass

    def end_window(self, tokens: Tensor, window: slice) -> None:
        pass
