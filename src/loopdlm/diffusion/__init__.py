"""Diffusion objectives: MDLM masked diffusion and BD3-LM block diffusion."""

from loopdlm.diffusion.masked import DiffusionConfig, MaskedDiffusion, NelboTerms, subs_log_probs
from loopdlm.diffusion.schedules import Cosine, LogLinear, Schedule, make_schedule

__all__ = ["Cosine", "DiffusionConfig", "LogLinear", "MaskedDiffusion", "NelboTerms", "Schedule",
           "make_schedule", "subs_log_probs"]
