"""Training loop-count distributions: the S used for each optimizer update.

Every draw is a fixed function of (seed, step), so all ranks agree without communicating and a resumed run draws
the same sequence as an uninterrupted one.

  * uniform: S ~ U{1, ..., S_max} (the LoopMDM paper).
  * poisson_lognormal: Huginn's heavy-tailed sampler, S = 1 + Poisson(r), r ~ LogNormal(log(m) - sigma^2 / 2,
    sigma) with sigma = 1/2, so E[r] = m; m = (S_max - 1) / 2 gives the uniform draw's mean (S_max + 1) / 2 before
    S is capped at S_max (the cap bounds memory, and S_max stays the largest S training sees).
  * curriculum: S ~ U{1, ..., c(step)} with the cap c growing linearly from 1 (step 0) to S_max (step
    `curriculum_steps` and after): early updates train shallow unrollings, later ones the full range.
"""

from __future__ import annotations

import math

import torch

from loopdlm.errors import UserError

LOOP_DISTRIBUTIONS = ("uniform", "poisson_lognormal", "curriculum")
#: Spread of the log-normal rate (Huginn's value).
LOGNORMAL_SIGMA = 0.5


def loops_for_step(seed: int, step: int, max_loops: int, distribution: str = "uniform",
                   curriculum_steps: int = 0) -> int:
    """Loop count S in {1, ..., max_loops} for optimizer update `step` (1-based), drawn from `distribution`."""
    if distribution not in LOOP_DISTRIBUTIONS:
        raise UserError(f"unknown train.loop_distribution '{distribution}'; choose one of "
                        f"{', '.join(LOOP_DISTRIBUTIONS)}")
    if distribution == "curriculum" and curriculum_steps < 1:
        raise UserError("train.loop_distribution=curriculum needs train.loop_curriculum_steps >= 1")
    if max_loops <= 1:
        return 1
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    if distribution == "poisson_lognormal":
        mean_rate = (max_loops - 1) / 2
        mu = math.log(mean_rate) - LOGNORMAL_SIGMA**2 / 2
        rate = torch.empty(1, dtype=torch.float64).log_normal_(mu, LOGNORMAL_SIGMA, generator=generator)
        return min(1 + int(torch.poisson(rate, generator=generator)), max_loops)
    cap = max_loops
    if distribution == "curriculum":
        cap = 1 + (max_loops - 1) * min(step, curriculum_steps) // curriculum_steps
    return int(torch.randint(1, cap + 1, (1,), generator=generator))
