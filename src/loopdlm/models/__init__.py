"""Denoiser networks: plain and looped bidirectional transformers."""

from loopdlm.models.transformer import DenoiserOutput, LoopedTransformer, LoopExit, ModelConfig

__all__ = ["DenoiserOutput", "LoopExit", "LoopedTransformer", "ModelConfig"]
