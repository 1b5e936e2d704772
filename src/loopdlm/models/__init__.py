"""Denoiser networks: plain and looped bidirectional transformers."""

from loopdlm.models.transformer import LoopedTransformer, LoopExit, ModelConfig, TransformerOutput

__all__ = ["LoopExit", "LoopedTransformer", "ModelConfig", "TransformerOutput"]
