"""Generative perplexity: entropy / distinct-n on hand cases, the causal judge and its objective, the commands."""

import json
import math

import pytest
import torch

from conftest import make_model
from loopdlm.cli import main
from loopdlm.config import load_config
from loopdlm.data.corpus import TokenDataset
from loopdlm.data.tokenizers import CharTokenizer
from loopdlm.eval.genppl import (
    GenPPLReport,
    HFJudge,
    LoopedJudge,
    distinct_n,
    generative_perplexity,
    unigram_entropy,
)
from loopdlm.models.layers import causal_mask
from loopdlm.models.transformer import LoopedTransformer
from loopdlm.train.autoregressive import NextTokenObjective, next_token_nll
from loopdlm.train.trainer import Trainer
from loopdlm.data.batches import RowSource
from loopdlm.workflow import build_model, build_objective, load_pretrained, prepare_data


def test_unigram_entropy_and_distinct_n_on_hand_cases():
    assert unigram_entropy([7, 7, 7, 7]) == 0.0
    assert unigram_entropy([1, 1, 2, 2]) == pytest.approx(math.log(2))
    assert unigram_entropy([1, 2, 3, 4]) == pytest.approx(math.log(4))
    assert unigram_entropy([1, 1, 1, 2]) == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert distinct_n([[1, 1, 1, 1]], 1) == 0.25
    assert distinct_n([[1, 1, 2, 2]], 2) == 1.0  # (1,1) (1,2) (2,2)
    assert distinct_n([[1, 2, 1, 2], [1, 2]], 2) == pytest.approx(2 / 4)  # (1,2) (2,1) (1,2) | (1,2)
    assert distinct_n([[1]], 2) == 0.0


def _judge_model(vocab):
    torch.manual_seed(0)
    model = LoopedTransformer(make_model(vocab_size=vocab, n_layers=2, core=(0, 0), max_loops=1, causal=True).config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def test_causal_judge_never_looks_ahead_and_matches_its_training_objective():
    model = _judge_model(23)
    tokens = torch.randint(3, 23, (2, 10), generator=torch.Generator().manual_seed(0))
    changed = tokens.clone()
    changed[:, 6:] = 3
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits[:, :6], model(changed).logits[:, :6])
        assert not torch.allclose(model(tokens).logits[:, 6:], model(changed).logits[:, 6:])
        terms = NextTokenObjective().nelbo(lambda x: model(x).logits, tokens)
        logits = model(tokens, attn_mask=causal_mask(10, "cpu")).logits
    manual = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 23), tokens[:, 1:].reshape(-1),
                                               reduction="sum")
    torch.testing.assert_close(terms.nll_sum, manual)
    assert terms.n_tokens == 2 * 9


def test_generative_perplexity_of_a_tiny_judge_is_finite_with_entropy_beside_it():
    tok = CharTokenizer("abcdefgh ")
    judge = LoopedJudge(_judge_model(tok.vocab_size), tok, context_length=8, batch_size=2)
    texts = ["abc abc abc", "hgfedcba", "aaaa"]
    total, count = judge.score(texts)
    assert count == (7 + 2) + 7 + 3  # 11 chars -> windows of 8 and 3; each window predicts all but its first
    rows = [tok.encode(t) for t in texts]
    report = generative_perplexity(judge, texts, rows)
    assert math.isfinite(report.gen_ppl) and report.gen_ppl == pytest.approx(math.exp(total / count))
    assert 1.0 < report.gen_ppl < 2 * tok.vocab_size  # a perturbed random model is roughly uniform
    assert report.entropy == pytest.approx((unigram_entropy(rows[0]) + math.log(8) + 0.0) / 3)
    assert report.distinct[1] == pytest.approx(len(set(sum(rows, []))) / sum(map(len, rows)))
    assert isinstance(report, GenPPLReport) and set(report.as_dict()) >= {"gen_ppl", "entropy", "distinct_4"}


def test_next_token_nll_has_its_hand_computed_value():
    # Position i predicts token i + 1; the last position predicts nothing.
    logits = torch.tensor([[[math.log(3), 0.0, 0.0], [0.0, math.log(2), 0.0], [5.0, -1.0, 3.0]]])
    tokens = torch.tensor([[0, 1, 2]])
    expected = torch.tensor([[math.log(5), math.log(4)]])  # p(1) = 1/(3 + 1 + 1); p(2) = 1/(1 + 2 + 1)
    torch.testing.assert_close(next_token_nll(logits, tokens), expected)
    low_precision = next_token_nll(logits.bfloat16(), tokens)
    assert low_precision.dtype == torch.float32
    torch.testing.assert_close(low_precision, expected, atol=1e-2, rtol=1e-2)


def test_the_judge_objective_and_both_judges_score_with_next_token_nll():
    tok = CharTokenizer("abcdefgh ")
    model = _judge_model(tok.vocab_size)
    texts = ["abc abcd", "hgfedcba"]  # 8 characters each: one window per text
    tokens = torch.tensor([tok.encode(text) for text in texts])
    with torch.no_grad():
        expected = next_token_nll(model(tokens, attn_mask=causal_mask(8, "cpu")).logits, tokens)
        objective = NextTokenObjective().nelbo(lambda x: model(x).logits, tokens)
    torch.testing.assert_close(objective.nll_sum, expected.sum())
    torch.testing.assert_close(objective.per_row, expected.mean(dim=1))
    total, count = LoopedJudge(model, tok, context_length=8).score(texts)
    assert count == 2 * 7 and total == pytest.approx(float(expected.sum()), rel=1e-5)
    hf = object.__new__(HFJudge)  # no Hugging Face model on disk: our judge and tokenizer stand in for one
    hf.tokenizer = lambda text, add_special_tokens: {"input_ids": tok.encode(text)}
    hf.model = lambda ids: model(ids, attn_mask=causal_mask(ids.shape[1], "cpu"))
    hf.device, hf.context_length = torch.device("cpu"), 8
    total, count = hf.score(texts)
    assert count == 2 * 7 and total == pytest.approx(float(expected.sum()), rel=1e-5)


def test_hugging_face_judge_needs_transformers():
    pytest.importorskip("transformers")
    from loopdlm.errors import UserError
    from loopdlm.eval.genppl import load_judge

    with pytest.raises(UserError, match="cannot load"):
        load_judge("hf:/nonexistent/model", "cpu")


def test_train_judge_and_genppl_commands_run_end_to_end(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("to be or not to be, that is the question. " * 60)
    data = [f"data.source=text:{corpus}", f"data.cache_dir={tmp_path / 'cache'}", "data.seq_len=16",
            "data.val_fraction=0.2"]
    tiny = ["model.n_layers=2", "model.d_model=32", "model.n_heads=2", "train.batch_size=4", "train.steps=4",
            "train.warmup_steps=1", "train.eval_every=4", "train.eval_batches=1", "train.device=cpu"]
    assert main(["train-judge", "--config", "judge-tiny", *data, *tiny, f"train.out_dir={tmp_path / 'judge'}"]) == 0
    assert "val NLL" in capsys.readouterr().out

    config = load_config("tiny-cpu", [*data, *tiny, "model.n_layers=4", f"train.out_dir={tmp_path / 'mdm'}"])
    prepared = prepare_data(config.data)
    sources = [RowSource(TokenDataset(prepared.directory, split, 16), 4, seed=0) for split in ("train", "val")]
    model = build_model(config.model, prepared.tokenizer.vocab_size)
    config.model = model.config
    Trainer(config, model, build_objective(config, prepared.tokenizer.mask_id), *sources, tmp_path / "mdm",
            tokenizer=prepared.tokenizer).fit()

    assert main(["genppl", "--checkpoint", str(tmp_path / "mdm"), "--judge", str(tmp_path / "judge"),
                 "--num-samples", "3", "--batch-size", "2", "--steps", "8", "--loops", "2", "--device", "cpu",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert math.isfinite(report["gen_ppl"]) and report["gen_ppl"] > 1.0
    assert 0.0 <= report["entropy"] <= math.log(16) and report["num_samples"] == 3 and report["loops"] == 2


def test_a_judge_checkpoint_records_its_causality_and_is_refused_as_a_denoiser(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("to be or not to be, that is the question. " * 60)
    run = tmp_path / "judge"
    assert main(["train-judge", "--config", "judge-tiny", f"data.source=text:{corpus}",
                 f"data.cache_dir={tmp_path / 'cache'}", "data.seq_len=16", "data.val_fraction=0.2",
                 "model.n_layers=2", "model.d_model=32", "model.n_heads=2", "train.batch_size=4", "train.steps=2",
                 "train.warmup_steps=1", "train.eval_every=2", "train.eval_batches=1", "train.device=cpu",
                 f"train.out_dir={run}"]) == 0
    capsys.readouterr()
    loaded = load_pretrained(run)
    assert loaded.model.config.causal
    tokens = torch.randint(3, loaded.model.config.vocab_size, (1, 10))
    changed = tokens.clone()
    changed[0, 7:] = 3
    # Causal without being told: positions before the change see the same logits.
    assert torch.equal(loaded.model(tokens).logits[0, :7], loaded.model(changed).logits[0, :7])
    for command in (["sample"], ["eval"]):
        assert main([*command, "--checkpoint", str(run), "--device", "cpu"]) == 2
        assert "autoregressive judge" in capsys.readouterr().err
