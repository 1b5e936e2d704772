"""Per-loop (deep) supervision for looped denoisers: the NELBO also read out after the earlier loops.

The training loss becomes  NELBO(final loop) + weight * mean_k NELBO(readout after loop k),  k = 1 .. S-1, where a
readout is the coda, final norm and head applied to the core output after loop k. Every term is scored on the same
noised input (same t, same mask), so the extra terms only add what the earlier loops get wrong on it.

Any objective whose randomness comes from the `generator` it is given can be wrapped (MDLM, block diffusion): the
wrapper runs the denoiser once, asking for every loop's logits, then replays the objective with the generator
rewound to score each earlier readout. The model knows nothing of this: it only reads out logits when asked.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from loopdlm.diffusion.masked import NelboTerms, average_terms, reads_out_positions


class LoopSupervision:
    """Wraps a training objective (`nelbo`, `bound`, and optionally `on_validation`, `state_dict`, ...).

    Args:
        objective: e.g. `MaskedDiffusion`; its `nelbo` must draw all its noise from the generator it is passed.
        weight: weight of the mean earlier-loop NELBO; 0 gives exactly the wrapped objective's `nelbo`.

    The denoiser handed to `nelbo` must accept `return_loop_logits=True` and then return the logits read out after
    every loop it ran, stacked: float [K, B, L, V] with the final loop last (the trainer's denoiser does this).
    When it reads out positions (`reads_out_positions`), so do the per-loop terms: [K, N, V] at the scored
    positions only. `bound` (the reported NELBO) and everything else are the wrapped objective's.
    """

    def __init__(self, objective: Any, weight: float):
        if weight < 0:
            raise ValueError(f"the per-loop supervision weight must be >= 0, got {weight}")
        self.objective, self.weight = objective, weight

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes this class lacks: bound, on_validation, state_dict, mask_id, ...
        if "objective" not in self.__dict__:  # e.g. while being copied, before __init__ ran
            raise AttributeError(name)
        return getattr(self.__dict__["objective"], name)

    def nelbo(self, denoiser, x0: Tensor, generator: torch.Generator | None = None,
              noisable: Tensor | None = None) -> NelboTerms:
        """final-loop NelboTerms + weight * (mean over earlier loops); x0 int64 [B, L], noisable bool [B, L]."""
        if self.weight == 0:
            return self.objective.nelbo(denoiser, x0, generator, noisable)
        if generator is None:
            raise ValueError("per-loop supervision replays the noise for every loop: pass a generator")
        start = generator.get_state()
        runs: list[tuple[Tensor, Tensor]] = []

        def every_loop(tokens: Tensor, **inputs: Any) -> Tensor:
            stacked = denoiser(tokens, return_loop_logits=True, **inputs)
            runs.append((tokens, stacked))
            return stacked[-1]

        positional = getattr(denoiser, "reads_out_positions", False)
        if positional:
            reads_out_positions(every_loop)

        final = self.objective.nelbo(every_loop, x0, generator, noisable)
        if len(runs) != 1:
            raise RuntimeError(f"per-loop supervision needs an objective that runs the denoiser once, not {len(runs)}")
        noisy, stacked = runs[0]
        end = generator.get_state()
        earlier = []
        for logits in stacked[:-1]:
            generator.set_state(start)

            def readout(tokens: Tensor, _logits: Tensor = logits, **inputs: Any) -> Tensor:
                if not torch.equal(tokens, noisy):
                    raise RuntimeError("the wrapped objective drew noise outside its generator; it cannot be "
                                       "replayed for per-loop supervision")
                return _logits

            if positional:  # the replayed objective asks for the same positions: `_logits` holds just those
                reads_out_positions(readout)
            earlier.append(self.objective.nelbo(readout, x0, generator, noisable))
        generator.set_state(end)
        if not earlier:  # S = 1: the final loop is the only one
            return final
        mean = average_terms(earlier)
        return NelboTerms(nll_sum=final.nll_sum + self.weight * mean.nll_sum, n_tokens=final.n_tokens,
                          per_row=final.per_row + self.weight * mean.per_row)
