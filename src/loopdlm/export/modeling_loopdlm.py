"""A loopdlm looped masked-diffusion transformer as a Hugging Face `PreTrainedModel` (written by `loopdlm export`).

Self-contained (torch and transformers only), so `AutoModelForMaskedLM.from_pretrained(DIR, trust_remote_code=True)`
loads it without loopdlm. The stack is embed -> prelude [0, core_start) -> core [core_start, core_end) applied
`loops` times with shared weights -> coda [core_end, n_layers) -> RMSNorm -> head; every layer is a pre-norm block
(RMSNorm, bidirectional attention with rotary embeddings, GELU MLP). `forward(input_ids, loops=S)` takes any S >= 1,
also above the training maximum `max_loops` (the default). The logits score every token but the model was trained
to predict only at masked positions (`mask_token_id`) and never predicts the mask token itself.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput


class LoopDLMConfig(PretrainedConfig):
    """Shape of the looped transformer; field names follow loopdlm's `ModelConfig`."""

    model_type = "loopdlm"

    def __init__(self, vocab_size: int = 3, n_layers: int = 6, d_model: int = 256, n_heads: int = 4,
                 mlp_ratio: float = 4.0, core_start: int = 0, core_end: int = 0, max_loops: int = 1,
                 input_injection: bool = False, rope_theta: float = 10000.0, mask_token_id: int = 0,
                 tie_word_embeddings: bool = False, **kwargs):
        self.vocab_size = vocab_size
        self.n_layers = n_layers
        self.d_model = d_model
        self.n_heads = n_heads
        self.mlp_ratio = mlp_ratio
        self.core_start = core_start
        self.core_end = core_end
        self.max_loops = max_loops
        self.input_injection = input_injection
        self.rope_theta = rope_theta
        self.mask_token_id = mask_token_id
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


def _rotary(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate channel pairs (first half, second half) of x [B, H, L, hd] by angles position * theta^(-2i/hd)."""
    head_dim = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=x.device, dtype=torch.float32) / head_dim)
    angles = positions.to(torch.float32)[..., None] * inv_freq
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, rope_theta: float):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.rope_theta = rope_theta
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = _rotary(q, positions, self.rope_theta), _rotary(k, positions, self.rope_theta)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(batch, length, -1))


class MLP(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, hidden: int, rope_theta: float):
        super().__init__()
        self.attn_norm = nn.RMSNorm(d_model)
        self.attn = Attention(d_model, n_heads, rope_theta)
        self.mlp_norm = nn.RMSNorm(d_model)
        self.mlp = MLP(d_model, hidden)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), positions, mask)
        return x + self.mlp(self.mlp_norm(x))


class LoopDLMForMaskedLM(PreTrainedModel):
    """Looped bidirectional transformer with a masked-token head: `forward(input_ids, loops=S)`."""

    config_class = LoopDLMConfig
    base_model_prefix = "loopdlm"
    _tied_weights_keys = {"head.weight": "embed.weight"}

    def __init__(self, config: LoopDLMConfig):
        super().__init__(config)
        hidden = int(config.mlp_ratio * config.d_model)
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config.d_model, config.n_heads, hidden, config.rope_theta)
                                    for _ in range(config.n_layers))
        self.final_norm = nn.RMSNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2 style N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layers) (as loopdlm)."""
        std = 0.02
        if isinstance(module, (Attention, MLP)):
            return
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        for name in ("out", "down"):
            child = getattr(module, name, None)
            if isinstance(child, nn.Linear):
                nn.init.normal_(child.weight, mean=0.0, std=std / math.sqrt(2 * self.config.n_layers))

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.head = value

    def forward(self, input_ids: torch.Tensor, loops: int | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                return_dict: bool | None = None, **kwargs) -> MaskedLMOutput:
        """input_ids int64 [B, L] (mask_token_id where masked); loops: core applications S (default max_loops);
        attention_mask [B, L], 0 = padding no query may attend; labels [B, L] with -100 where unscored.
        Returns MaskedLMOutput with logits [B, L, V] (and the cross-entropy loss when labels are given)."""
        cfg = self.config
        loops = cfg.max_loops if loops is None else int(loops)
        if loops < 1:
            raise ValueError(f"loops must be >= 1, got {loops}")
        length = input_ids.shape[1]
        positions = (torch.arange(length, device=input_ids.device)[None] if position_ids is None
                     else position_ids)
        mask = attention_mask.bool()[:, None, None, :] if attention_mask is not None else None
        h = self.embed(input_ids)
        for layer in self.layers[:cfg.core_start]:
            h = layer(h, positions, mask)
        if cfg.core_end > cfg.core_start:
            prelude = h
            for loop in range(1, loops + 1):
                if cfg.input_injection and loop > 1:
                    h = h + prelude
                for layer in self.layers[cfg.core_start:cfg.core_end]:
                    h = layer(h, positions, mask)
        for layer in self.layers[cfg.core_end:]:
            h = layer(h, positions, mask)
        logits = self.head(self.final_norm(h))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100)
        return MaskedLMOutput(loss=loss, logits=logits)
