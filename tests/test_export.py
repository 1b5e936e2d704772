"""Hugging Face export: the folder loads offline with transformers (trust_remote_code), gives loopdlm's logits at
S = 1, S_max and S > S_max with every LoopMDM recipe option, refuses options it does not know, and its tokenizer
(char or BPE) encodes and decodes exactly as loopdlm's."""

import dataclasses
import json

import pytest
import torch

from conftest import make_model
from loopdlm.cli import main
from loopdlm.config import RunConfig
from loopdlm.data.tokenizers import CharTokenizer, train_bpe
from loopdlm.errors import UserError
from loopdlm.export.hf import export_hf
from loopdlm.models import LoopedTransformer, ModelConfig
from loopdlm.workflow import LoadedModel

transformers = pytest.importorskip("transformers")

TEXT = "ROMEO: what light through yonder window breaks?\nJULIET: ay me!"
#: Model options per case: each recipe option on its own (training-only ones included), and all of them at once.
OPTIONS = {
    "plain": dict(),
    "legacy-add": dict(input_injection=True),
    "add": dict(injection="add"),
    "concat": dict(injection="concat"),
    "zero": dict(residual_init="zero"),
    "gated": dict(residual_init="gated"),
    "loop-norm": dict(loop_norm=True),
    "training-only": dict(injection="add", init_depth="effective", backprop_loops=1),
    "all": dict(injection="concat", residual_init="gated", loop_norm=True, init_depth="effective",
                backprop_loops=2, tie_embeddings=True),
}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def loaded_model(tokenizer, seq_len=32, **model_kwargs) -> LoadedModel:
    """A perturbed 4-layer model with a 2-layer core (S_max = 3); input injection unless the options say otherwise."""
    config = RunConfig()
    config.data.seq_len = seq_len
    model_kwargs = model_kwargs or dict(input_injection=True)
    model = make_model(vocab_size=tokenizer.vocab_size, n_layers=4, core=(1, 3), max_loops=3, **model_kwargs)
    return LoadedModel(model, tokenizer, config, path=None)


def load_hf(directory):
    model, info = transformers.AutoModelForMaskedLM.from_pretrained(directory, trust_remote_code=True,
                                                                    output_loading_info=True)
    assert not any(info.values()), info  # every stored tensor has its place and every parameter was stored
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(directory)
    return model.eval(), tokenizer


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_exported_model_gives_loopdlm_logits_at_any_loop_count(tmp_path, name):
    loaded = loaded_model(CharTokenizer.from_text(TEXT), **OPTIONS[name])
    export_hf(loaded, tmp_path / "hf")
    model, _ = load_hf(tmp_path / "hf")
    tokens = torch.tensor([loaded.tokenizer.encode(TEXT[:24]), loaded.tokenizer.encode(TEXT[24:48])])
    tokens[:, ::3] = loaded.tokenizer.mask_id
    with torch.no_grad():
        for loops in (1, 3, 7):  # S = 1, S = S_max, S > S_max
            expected = loaded.model(tokens, loops=loops).logits
            assert torch.allclose(model(tokens, loops=loops).logits, expected, atol=1e-5, rtol=0)
        assert torch.allclose(model(tokens).logits, loaded.model(tokens, loops=3).logits, atol=1e-5, rtol=0)
        assert not torch.allclose(loaded.model(tokens, loops=1).logits, loaded.model(tokens, loops=7).logits)
        padded = model(tokens, loops=2, attention_mask=torch.ones_like(tokens)).logits
        assert torch.allclose(padded, loaded.model(tokens, loops=2).logits, atol=1e-5, rtol=0)
    if loaded.model.config.tie_embeddings:
        assert model.head.weight.data_ptr() == model.embed.weight.data_ptr()
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    recorded = dataclasses.asdict(loaded.model.config)
    recorded["injection"] = loaded.model.config.injection_mode
    for key in ("injection", "residual_init", "loop_norm", "init_depth", "backprop_loops"):
        assert written[key] == recorded[key], key
    assert "input_injection" not in written


def test_fresh_exported_model_starts_as_loopdlm_does(tmp_path):
    """from_config (no weights) gives gates 0, the concat adapter [I | 0] and unit loop-norm gains, as loopdlm."""
    loaded = loaded_model(CharTokenizer.from_text(TEXT), **OPTIONS["all"])
    export_hf(loaded, tmp_path / "hf")
    config = transformers.AutoConfig.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    fresh = transformers.AutoModelForMaskedLM.from_config(config, trust_remote_code=True)
    reference = LoopedTransformer(loaded.model.config)
    for name, param in reference.named_parameters():
        if param.dim() == 1 or name == "injection_adapter.weight":
            assert torch.equal(fresh.get_parameter(name), param), name
    with torch.no_grad():  # residual projections N(0, 0.02 / sqrt(2 n_layers)), the others N(0, 0.02)
        assert abs(float(fresh.layers[0].attn.out.weight.std()) - 0.02 / 8 ** 0.5) < 0.004
        assert abs(float(fresh.layers[0].attn.qkv.weight.std()) - 0.02) < 0.004


def test_export_refuses_model_options_it_does_not_know(tmp_path, monkeypatch, capsys):
    """A future field or choice must stop the export (one line, exit 2) before anything is written."""
    loaded = loaded_model(CharTokenizer.from_text(TEXT), injection="concat")
    loaded.model.config.injection = "gru"
    with pytest.raises(UserError, match="injection='gru'"):
        export_hf(loaded, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    future = dataclasses.make_dataclass("FutureModelConfig", [("loop_gate", bool, False)], bases=(ModelConfig,))
    loaded = loaded_model(CharTokenizer.from_text(TEXT))
    loaded.model.config = future(**dataclasses.asdict(loaded.model.config))
    monkeypatch.setattr("loopdlm.commands.export.load_pretrained", lambda *args, **kwargs: loaded)
    capsys.readouterr()
    assert main(["export", "run", "--hf", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "loop_gate" in err[0], err
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_exported_tokenizer_round_trips_with_loopdlm_ids(tmp_path, kind):
    tokenizer = CharTokenizer.from_text(TEXT) if kind == "char" else train_bpe([TEXT] * 20, 300)
    export_hf(loaded_model(tokenizer), tmp_path / "hf")
    _, hf = load_hf(tmp_path / "hf")
    ids = tokenizer.encode(TEXT)
    assert hf.encode(TEXT) == ids and hf.decode(ids) == TEXT
    assert (hf.mask_token_id, hf.pad_token_id, hf.eos_token_id) == (tokenizer.mask_id, tokenizer.pad_id,
                                                                     tokenizer.eos_id)
    assert hf.encode("ROMEO" + hf.mask_token * 2) == tokenizer.encode("ROMEO") + [tokenizer.mask_id] * 2
    assert hf.decode(ids + [tokenizer.mask_id], skip_special_tokens=True) == TEXT


def test_export_command_writes_a_loadable_folder_and_rejects_bad_inputs(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"line {i}: the quick brown fox {i % 7}" for i in range(200)))
    run = tmp_path / "run"
    assert main(["train", "--config", "tiny-cpu", "model.n_layers=3", "model.d_model=32", "model.n_heads=2",
                 "model.core_start=1", "model.core_end=2", "model.max_loops=2", "data.seq_len=32", "train.steps=2",
                 "train.batch_size=2", "train.eval_every=2", "train.eval_batches=1", "train.ckpt_every=2",
                 f"data.source=text:{corpus}", f"data.cache_dir={tmp_path / 'cache'}", f"train.out_dir={run}"]) == 0
    out = tmp_path / "hf"
    assert main(["export", str(run), "--hf", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"config.json", "modeling_loopdlm.py", "model.safetensors",
                                               "tokenizer.json", "tokenizer_config.json"}
    imports = [line for line in (out / "modeling_loopdlm.py").read_text().splitlines()
               if line.startswith(("import ", "from "))]
    assert imports and not any("loopdlm" in line for line in imports)  # self-contained
    assert json.loads((out / "config.json").read_text())["auto_map"]["AutoModelForMaskedLM"]
    model, tokenizer = load_hf(out)
    from loopdlm.workflow import load_pretrained

    loaded = load_pretrained(run)
    tokens = torch.tensor([tokenizer.encode("line 3: the quick")])
    with torch.no_grad():
        assert torch.allclose(model(tokens, loops=5).logits, loaded.model(tokens, loops=5).logits, atol=1e-5, rtol=0)
    capsys.readouterr()
    for args, message in [(["export", str(tmp_path / "nope"), "--hf", str(out)], "checkpoint not found"),
                          (["export", str(run), "--hf", str(corpus)], "is not a folder")]:
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
