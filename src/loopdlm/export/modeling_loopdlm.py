"""A loopdlm looped masked-diffusion transformer as a Hugging Face `PreTrainedModel` (written by `loopdlm export`).

Self-contained (torch and transformers only), so `AutoModelForMaskedLM.from_pretrained(DIR, trust_remote_code=True)`
loads it without loopdlm. The stack is embed -> prelude [0, core_start) -> core [core_start, core_end) applied
`loops` times with shared weights -> coda [core_end, n_layers) -> RMSNorm -> head; every layer is a pre-norm block
(RMSNorm, bidirectional attention with rotary embeddings, GELU MLP). The loop options of loopdlm's LoopMDM recipe:
`injection` says how the prelude output e re-enters the core (none; add: h + e before loops 2..S; concat: a
Linear(2d -> d) on [h ; e] before every loop), `residual_init="gated"` multiplies each block's attention and MLP
branch by a learned per-channel gate, and `loop_norm` RMS-normalises the core output after every loop.
`init_depth`, `backprop_loops` and `residual_init="zero"` only shaped training; config.json
records them and the forward pass ignores them. `forward(input_ids, loops=S)` takes any S >= 1, also above the
training maximum `max_loops` (the default). The logits score every token but the model was trained to predict only
at masked positions (`mask_token_id`) and never predicts the mask token itself.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput


#: How the prelude output e re-enters the core.
INJECTIONS = ("none", "add", "concat")
#: How the residual branches started in training; only "gated" changes the forward pass (it adds the gates).
RESIDUAL_INITS = ("default", "zero", "gated")


class LoopDLMConfig(PretrainedConfig):
    """Shape of the looped transformer; field names follow loopdlm's `ModelConfig`."""

    model_type = "loopdlm"

    def __init__(self, vocab_size: int = 3, n_layers: int = 6, d_model: int = 256, n_heads: int = 4,
                 mlp_ratio: float = 4.0, core_start: int = 0, core_end: int = 0, max_loops: int = 1,
                 injection: str = "none", residual_init: str = "default", loop_norm: bool = False,
                 rope_theta: float = 10000.0, mask_token_id: int = 0, tie_word_embeddings: bool = False, **kwargs):
        if injection not in INJECTIONS:
            raise ValueError(f"injection must be one of {', '.join(INJECTIONS)}, got {injection!r}")
        if residual_init not in RESIDUAL_INITS:
            raise ValueError(f"residual_init must be one of {', '.join(RESIDUAL_INITS)}, got {residual_init!r}")
        self.vocab_size = vocab_size
        self.n_layers = n_layers
        self.d_model = d_model
        self.n_heads = n_heads
        self.mlp_ratio = mlp_ratio
        self.core_start = core_start
        self.core_end = core_end
        self.max_loops = max_loops
        self.injection = injection
        self.residual_init = residual_init
        self.loop_norm = loop_norm
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


class ResidualProjection(nn.Linear):
    """A projection that writes into the residual stream (attention out, MLP down): its fresh init is scaled down."""


class InjectionAdapter(nn.Linear):
    """The concat injection's Linear(2d -> d) on [h ; e]; it starts as [I | 0], passing the carry h through."""


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, rope_theta: float):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.rope_theta = rope_theta
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = ResidualProjection(d_model, d_model, bias=False)

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
        self.down = ResidualProjection(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class Block(nn.Module):
    """x + attn(norm(x)), then x + mlp(norm(x)); gated: each branch scaled by a per-channel gate [D] first."""

    def __init__(self, d_model: int, n_heads: int, hidden: int, rope_theta: float, gated: bool):
        super().__init__()
        self.attn_norm = nn.RMSNorm(d_model)
        self.attn = Attention(d_model, n_heads, rope_theta)
        self.mlp_norm = nn.RMSNorm(d_model)
        self.mlp = MLP(d_model, hidden)
        self.attn_gate = nn.Parameter(torch.zeros(d_model)) if gated else None
        self.mlp_gate = nn.Parameter(torch.zeros(d_model)) if gated else None

    def forward(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        attended = self.attn(self.attn_norm(x), positions, mask)
        x = x + (attended if self.attn_gate is None else self.attn_gate * attended)
        update = self.mlp(self.mlp_norm(x))
        return x + (update if self.mlp_gate is None else self.mlp_gate * update)


class LoopDLMForMaskedLM(PreTrainedModel):
    """Looped bidirectional transformer with a masked-token head: `forward(input_ids, loops=S)`."""

    config_class = LoopDLMConfig
    base_model_prefix = "loopdlm"
    _tied_weights_keys = {"head.weight": "embed.weight"}

    def __init__(self, config: LoopDLMConfig):
        super().__init__(config)
        hidden = int(config.mlp_ratio * config.d_model)
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        gated = config.residual_init == "gated"
        self.layers = nn.ModuleList(Block(config.d_model, config.n_heads, hidden, config.rope_theta, gated)
                                    for _ in range(config.n_layers))
        self.final_norm = nn.RMSNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        # As in loopdlm, the loop modules exist only with a core (their state-dict names are loopdlm's too).
        looped = config.core_end > config.core_start
        self.loop_norm = nn.RMSNorm(config.d_model) if config.loop_norm and looped else None
        self.injection_adapter = (InjectionAdapter(2 * config.d_model, config.d_model, bias=False)
                                  if config.injection == "concat" and looped else None)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Fresh weights (from_config) as loopdlm's default: matrices N(0, 0.02), residual projections
        N(0, 0.02 / sqrt(2 n_layers)), gates 0, the concat adapter [I | 0]. For remote code transformers skips
        modules without parameters of their own, and its guarded nn.init functions leave loaded weights alone."""
        if isinstance(module, InjectionAdapter):
            nn.init.eye_(module.weight)
        elif isinstance(module, ResidualProjection):
            nn.init.normal_(module.weight, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layers))
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, nn.RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, Block) and module.attn_gate is not None:
            nn.init.zeros_(module.attn_gate)
            nn.init.zeros_(module.mlp_gate)

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
                if cfg.injection == "add" and loop > 1:
                    h = h + prelude
                elif cfg.injection == "concat":
                    h = self.injection_adapter(torch.cat((h, prelude), dim=-1))
                for layer in self.layers[cfg.core_start:cfg.core_end]:
                    h = layer(h, positions, mask)
                if self.loop_norm is not None:
                    h = self.loop_norm(h)
        for layer in self.layers[cfg.core_end:]:
            h = layer(h, positions, mask)
        logits = self.head(self.final_norm(h))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100)
        return MaskedLMOutput(loss=loss, logits=logits)
