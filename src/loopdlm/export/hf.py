"""Export a checkpoint as a Hugging Face model folder loadable with `trust_remote_code=True` and no loopdlm.

The folder holds config.json (with `auto_map` to the self-contained `modeling_loopdlm.py` copied beside it),
model.safetensors (parameter names as in loopdlm; a tied head is stored once, as the embedding), and tokenizer.json
+ tokenizer_config.json for `PreTrainedTokenizerFast`. Both tokenizers export to the Rust `tokenizers` format with
loopdlm's ids: the char tokenizer as a BPE model without merges (every character is its own token), the byte-level
BPE as itself. The special tokens keep ids 0-2 and, as usual in transformers, are recognised in text, so a prompt
can spell out the mask token.
"""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

from safetensors.torch import save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models

from loopdlm.data.tokenizers import EOS_TOKEN, MASK_TOKEN, PAD_TOKEN, SPECIAL_TOKENS, CharTokenizer, Tokenizer
from loopdlm.errors import UserError
from loopdlm.workflow import LoadedModel

MODELING_FILE = "modeling_loopdlm.py"


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


def export_hf(loaded: LoadedModel, directory: str | Path) -> Path:
    """Write `loaded` as a Hugging Face model folder (created if needed; files of the same names are replaced)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise UserError(f"--hf {directory} exists and is not a folder")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create {directory}: {err.strerror or err}") from None
    model_config, tokenizer = loaded.model.config, loaded.tokenizer
    config = {
        "architectures": ["LoopDLMForMaskedLM"],
        "model_type": "loopdlm",
        "auto_map": {"AutoConfig": "modeling_loopdlm.LoopDLMConfig",
                     "AutoModelForMaskedLM": "modeling_loopdlm.LoopDLMForMaskedLM"},
        "vocab_size": model_config.vocab_size, "n_layers": model_config.n_layers, "d_model": model_config.d_model,
        "n_heads": model_config.n_heads, "mlp_ratio": model_config.mlp_ratio,
        "core_start": model_config.core_start, "core_end": model_config.core_end,
        "max_loops": model_config.max_loops, "input_injection": model_config.input_injection,
        "rope_theta": model_config.rope_theta, "tie_word_embeddings": model_config.tie_embeddings,
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
