"""Export a checkpoint as a Hugging Face model folder loadable with `trust_remote_code=True` and no loopdlm.

The folder holds config.json (with `auto_map` to the self-contained `modeling_loopdlm.py` copied beside it, and
every `ModelConfig` field), model.safetensors (parameter names as in loopdlm; a tied head is stored once, as the
embedding), and tokenizer.json
+ tokenizer_config.json for `PreTrainedTokenizerFast`. Both tokenizers export to the Rust `tokenizers` format with
loopdlm's ids: the char tokenizer as a BPE model without merges (every character is its own token), the byte-level
BPE as itself. The special tokens keep ids 0-2 and, as usual in transformers, are recognised in text, so a prompt
can spell out the mask token.

The modeling file reproduces the forward pass of every model option it is listed with below; a `ModelConfig` field
or choice missing from these lists stops the export, so an option added later cannot export silently wrong.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from importlib import resources
from pathlib import Path

from safetensors.torch import save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models

from loopdlm.data.tokenizers import EOS_TOKEN, MASK_TOKEN, PAD_TOKEN, SPECIAL_TOKENS, CharTokenizer, Tokenizer
from loopdlm.errors import UserError
from loopdlm.models import ModelConfig
from loopdlm.workflow import LoadedModel

MODELING_FILE = "modeling_loopdlm.py"

#: ModelConfig fields the modeling file reads, with their config.json keys (transformers' name for tied embeddings).
INFERENCE_FIELDS = {
    "vocab_size": "vocab_size", "n_layers": "n_layers", "d_model": "d_model", "n_heads": "n_heads",
    "mlp_ratio": "mlp_ratio", "core_start": "core_start", "core_end": "core_end", "max_loops": "max_loops",
    "injection": "injection", "residual_init": "residual_init", "loop_norm": "loop_norm",
    "rope_theta": "rope_theta", "tie_embeddings": "tie_word_embeddings", "causal": "causal",
}
#: ModelConfig fields that only shape training (initialisation, gradient truncation): recorded in config.json
#: under their own names, no code in the modeling file.
TRAINING_FIELDS = ("init_depth", "backprop_loops")
#: The choices of the fields that the modeling file handles (residual_init "zero" only differs at init; a causal
#: judge is not a masked LM).
SUPPORTED_CHOICES = {"injection": ("none", "add", "concat"), "residual_init": ("default", "zero", "gated"),
                     "init_depth": ("stored", "effective"), "causal": (False,)}


def hf_tokenizer(tokenizer: Tokenizer) -> HFTokenizer:
    """A Rust `tokenizers` tokenizer with the same ids as `tokenizer` for plain text and for the special tokens."""
    if isinstance(tokenizer, CharTokenizer):
        vocab = {token: index for index, token in enumerate(list(SPECIAL_TOKENS) + tokenizer.chars)}
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
        hf.decoder = decoders.Fuse()
    else:
        hf = HFTokenizer.from_str(tokenizer.canonical_json())
    hf.add_special_tokens(list(SPECIAL_TOKENS))
    hf.encode_special_tokens = False
    return hf


def hf_model_config(model_config: ModelConfig) -> dict:
    """The config.json entries of `model_config`: every field, under its Hugging Face key where it has one.

    Raises UserError for a field or choice this exporter does not know (the modeling file would ignore it)."""
    values = dataclasses.asdict(model_config)
    values["injection"] = model_config.injection_mode  # resolves the legacy spelling input_injection=true
    del values["input_injection"]
    unknown = sorted(set(values) - set(INFERENCE_FIELDS) - set(TRAINING_FIELDS))
    unknown += [f"{name}={values[name]!r}" for name, choices in SUPPORTED_CHOICES.items()
                if values[name] not in choices]
    if unknown:
        raise UserError(f"cannot export to Hugging Face: the export does not support model option(s) "
                        f"{', '.join(unknown)} (the exported model would not match this checkpoint)")
    return {INFERENCE_FIELDS.get(name, name): value for name, value in values.items()}


def export_hf(loaded: LoadedModel, directory: str | Path) -> Path:
    """Write `loaded` as a Hugging Face model folder (created if needed; files of the same names are replaced)."""
    directory = Path(directory)
    model_config, tokenizer = loaded.model.config, loaded.tokenizer
    model_entries = hf_model_config(model_config)  # before anything is written
    if directory.exists() and not directory.is_dir():
        raise UserError(f"--hf {directory} exists and is not a folder")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create {directory}: {err.strerror or err}") from None
    config = {
        "architectures": ["LoopDLMForMaskedLM"],
        "model_type": "loopdlm",
        "auto_map": {"AutoConfig": "modeling_loopdlm.LoopDLMConfig",
                     "AutoModelForMaskedLM": "modeling_loopdlm.LoopDLMForMaskedLM"},
        **model_entries,
        "mask_token_id": tokenizer.mask_id, "pad_token_id": tokenizer.pad_id, "eos_token_id": tokenizer.eos_id,
        "max_position_embeddings": loaded.config.data.seq_len, "torch_dtype": "float32",
    }
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in loaded.model.state_dict().items()}
    if model_config.tie_embeddings:
        del state["head.weight"]  # safetensors stores a tensor once; transformers re-ties it from the config
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    with resources.as_file(resources.files("loopdlm.export").joinpath(MODELING_FILE)) as source:
        shutil.copyfile(source, directory / MODELING_FILE)
    hf_tokenizer(tokenizer).save(str(directory / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "mask_token": MASK_TOKEN, "pad_token": PAD_TOKEN,
        "eos_token": EOS_TOKEN, "model_max_length": loaded.config.data.seq_len, "clean_up_tokenization_spaces": False,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n", encoding="utf-8")
    return directory
