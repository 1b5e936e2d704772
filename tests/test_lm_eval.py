"""The lm-eval adapter with the real lm-eval package: a tiny model trained on word pairs must beat chance on a
multiple-choice task and answer a generation task, both written here as task YAML + jsonl (no download)."""

import json
import os

import pytest
import torch

from conftest import make_model
from loopdlm.cli import main
from loopdlm.config import RunConfig
from loopdlm.data.tokenizers import CharTokenizer
from loopdlm.eval.continuation import ContinuationScorer
from loopdlm.train.checkpoint_files import save_checkpoint

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

from loopdlm.integrations.lm_eval import LoopDLMEval  # noqa: E402  (registers the model "loopdlm")

PAIRS = {"cat": "red", "dog": "big", "sun": "hot", "owl": "shy"}


@pytest.fixture(scope="module")
def facts_run(tmp_path_factory):
    """A looped MDLM trained on lines 'cat red.', 'dog big.', ... in random order (1000 steps: at 600 the chain rule
    still ranked one pair wrong)."""
    root = tmp_path_factory.mktemp("facts")
    generator = torch.Generator().manual_seed(0)
    lines = [f"{key} {value}." for key, value in PAIRS.items()]
    picks = torch.randint(len(lines), (3000,), generator=generator).tolist()
    (root / "corpus.txt").write_text("\n".join(lines[i] for i in picks))
    run = root / "run"
    overrides = ["model.n_layers=3", "model.d_model=64", "model.n_heads=2", "model.core_start=1",
                 "model.core_end=2", "model.max_loops=2", "data.seq_len=16", "train.steps=1000",
                 "train.batch_size=32", "train.lr=0.004", "train.lr_schedule=constant", "train.warmup_steps=10",
                 "train.ema_decay=0", "train.eval_every=1000", "train.eval_batches=1", "train.ckpt_every=1000",
                 "train.log_every=1000", f"data.source=text:{root / 'corpus.txt'}", f"data.cache_dir={root / 'cache'}",
                 f"train.out_dir={run}"]
    assert main(["train", "--config", "tiny-cpu", *overrides]) == 0
    return run


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A multiple-choice and a generation task over PAIRS, as lm-eval task YAML files + one jsonl."""
    folder = tmp_path_factory.mktemp("tasks")
    keys = list(PAIRS)
    docs = [{"key": key, "value": PAIRS[key], "choices": [PAIRS[k] for k in keys], "gold": keys.index(key)}
            for key in keys]
    data = folder / "pairs.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (folder / "pairs_mc.yaml").write_text(
        "task: pairs_mc\n" + common + "output_type: multiple_choice\ndoc_to_text: '{{key}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{gold}}'\nmetric_list:\n  - metric: acc\n")
    (folder / "pairs_gen.yaml").write_text(
        "task: pairs_gen\n" + common + "output_type: generate_until\ndoc_to_text: '{{key}} '\n"
        "doc_to_target: '{{value}}'\ngeneration_kwargs:\n  until: ['.']\n  max_gen_toks: 5\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    return folder


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))


def requests_for(key):
    return [Instance("loglikelihood", {}, (key, f" {value}"), index) for index, value in enumerate(PAIRS.values())]


@pytest.mark.parametrize("likelihood", ["mc", "chain_rule"])
def test_loglikelihood_ranks_the_gold_continuation_first(facts_run, likelihood):
    lm = LoopDLMEval(checkpoint=str(facts_run), loops=2, likelihood=likelihood, mc_samples=64)
    for gold, key in enumerate(PAIRS):
        scores = lm.loglikelihood(requests_for(key))
        assert max(range(len(scores)), key=lambda i: scores[i][0]) == gold, (key, scores)
        if likelihood == "mc":
            assert all(s.stderr > 0 for s in lm.last_scores)
        else:
            assert all(s.stderr == 0 and s.greedy is not None for s in lm.last_scores)
    info = lm.get_model_info()["loopdlm"]
    assert info["loops"] == 2 and info["likelihood_stats"]["forward_passes"] > 0
    assert info["likelihood_stats"]["core_applications"] == 2 * info["likelihood_stats"]["rows"]
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("cat red.\ndog big.\nsun hot.",), 0)])
    assert rolling[0] < 0


def test_lm_eval_runs_multiple_choice_and_generation_tasks(facts_run, task_dir):
    import lm_eval
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(
        model="loopdlm", model_args={"checkpoint": str(facts_run), "loops": 2, "mc_samples": 16,
                                     "sampler": "topk", "steps": 5},
        tasks=["pairs_mc", "pairs_gen"], task_manager=TaskManager(include_path=str(task_dir)), batch_size=4)
    assert results["results"]["pairs_mc"]["acc,none"] > 1 / len(PAIRS)  # beats chance
    assert results["results"]["pairs_gen"]["exact_match,none"] >= 0.5
    info = results["config"]["loopdlm"]
    assert info["generation_stats"]["forward_passes"] > 0 and info["generation_stats"]["tokens_per_s"] > 0
    assert info["generation_stats"]["core_applications"] > 0 and info["loglikelihood_stderr"]["mean"] > 0


def test_loopdlm_lm_eval_command_forwards_to_the_harness(facts_run, task_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["lm-eval", "--model", "loopdlm", "--model_args", f"checkpoint={facts_run},likelihood=chain_rule",
                 "--tasks", "pairs_mc", "--include_path", str(task_dir), "--output_path", str(out)])
    assert code == 0
    written = [json.loads(p.read_text()) for p in out.rglob("results*.json")]
    assert written and written[0]["results"]["pairs_mc"]["acc,none"] > 1 / len(PAIRS)
    code = main(["lm-eval", "--model", "loopdlm", "--model_args", f"checkpoint={tmp_path / 'missing'}",
                 "--tasks", "pairs_mc", "--include_path", str(task_dir)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "checkpoint not found" in err[-1] and err[-1].startswith("loopdlm lm-eval: error:")
    assert os.path.isdir(out)


@pytest.mark.parametrize("block_size", [None, 4])
def test_a_checkpoint_with_every_loop_option_scores_as_its_model_and_generates(tmp_path, block_size):
    """The adapter loads a checkpoint with every LoopMDM recipe option on (concat injection, gated branches, loop
    norm, and the training-only ones), scores exactly as the model it was saved from, and generates."""
    tokenizer = CharTokenizer.from_text(" ".join(f"{key} {value}." for key, value in PAIRS.items()))
    model = make_model(vocab_size=tokenizer.vocab_size, injection="concat", residual_init="gated", loop_norm=True,
                       init_depth="effective", backprop_loops=2)
    config = RunConfig()
    config.model, config.data.seq_len, config.diffusion.block_size = model.config, 16, block_size
    state = model.state_dict()
    save_checkpoint(tmp_path / "run", 1, model_state=state, ema_state=state, training_state={"step": 1},
                    config=config, tokenizer_saver=tokenizer.save)
    lm = LoopDLMEval(checkpoint=str(tmp_path / "run"), loops=4, likelihood="chain_rule", sampler="topk", steps=4)
    assert lm.loaded.model.config == model.config
    expected = ContinuationScorer(model, tokenizer.mask_id, 16, 4, block_size).chain_rule(
        [(tokenizer.encode("cat"), tokenizer.encode(f" {value}")) for value in PAIRS.values()])
    scores = [score for score, _ in lm.loglikelihood(requests_for("cat"))]
    assert scores == pytest.approx([e.log_likelihood for e in expected], abs=1e-5)
    assert len(set(scores)) > 1
    request = Instance("generate_until", {}, ("dog ", {"until": ["."], "max_gen_toks": 6, "do_sample": False}), 0)
    assert isinstance(lm.generate_until([request])[0], str)
    assert lm.generation["core_applications"] == 4 * lm.generation["forward_passes"] > 0
