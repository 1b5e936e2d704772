"""Two gloo processes on CPU against single-process references over the same global batches (MDLM, FSDP, WINO+,
CoDD prior fitting; the last two also through their public functions and `loopdlm train-codd`)."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from loopdlm.cli import main
from loopdlm.config import RunConfig
from loopdlm.data.batches import PairedSource, RowSource, TensorRows
from loopdlm.data.task_source import task_tokenizer
from loopdlm.data.tasks import SudokuTask
from loopdlm.diffusion import LogLinear, MaskedDiffusion
from loopdlm.models import LoopedTransformer
from loopdlm.train import TensorBatchSource, Trainer, read_weights, setup_distributed, teardown_distributed
from loopdlm.train.codd_training import (
    CoDDTrainConfig,
    CoupledPriorObjective,
    CoupledScorer,
    frozen_log_probs,
    initial_prior,
    train_codd_prior,
)
from loopdlm.train.wino_plus import (
    SupervisedAnchor,
    WinoPlusBatch,
    WinoPlusLossWeights,
    WinoPlusObjective,
    WinoPlusRows,
    finetune_wino_plus,
    record_trajectories,
)
from loopdlm.workflow import load_pretrained
from conftest import make_model
from test_coupling import make_tiny_checkpoint
from test_trainer_objectives import prior_weights
from test_train import MASK_ID, SEQ_LEN, VOCAB, InterruptAfter, RowKeyedNoise, random_corpus, run_config
from test_wino import ScriptedSudoku, wino_plus_model

WORLD = 2
PER_RANK_BATCH = 4


def make_run(name: str, root, rank: int, world: int, batch_size: int, grad_accum: int = 1, **options):
    """A 4-step run of a tied-embedding looped model; `options`: objective, train_source, distributed, dist."""
    config = run_config(steps=4, grad_accum=grad_accum, tie=True, eval_every=1, ckpt_every=2, eval_batches=1,
                        eval_samples=1, distributed=options.pop("distributed", "ddp"))
    torch.manual_seed(0)
    model = LoopedTransformer(config.model)
    source = options.pop("train_source", None) or TensorBatchSource(random_corpus(), batch_size=batch_size, seed=1,
                                                                     rank=rank, world_size=world)
    val = TensorBatchSource(random_corpus(8, seed=99), batch_size=2, seed=2, rank=rank, world_size=world)
    objective = options.pop("objective", None) or MaskedDiffusion(MASK_ID)
    return Trainer(config, model, objective, source, val, root / name, **options)


def wino_plus_rows(n: int = 24, seed: int = 0) -> WinoPlusRows:
    """Random WINO+ rows: half the answer hidden, half of that the step's targets."""
    generator = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, MASK_ID, (n, SEQ_LEN), generator=generator)
    hidden = torch.rand(n, SEQ_LEN, generator=generator) < 0.5
    targets = hidden & (torch.rand(n, SEQ_LEN, generator=generator) < 0.5)
    return WinoPlusRows(clean.masked_fill(hidden, MASK_ID), clean, targets, torch.ones_like(hidden))


def make_wino_plus_run(root, rank: int, world: int, batch_size: int, grad_accum: int = 1, **options):
    """4 WINO+ updates (all three terms active, plus the supervised anchor's NELBO with its noise) of a perturbed
    looped model; the anchor reads half as many rows per micro-batch."""
    config = run_config(steps=4, grad_accum=grad_accum, tie=True)
    model = make_model(vocab_size=VOCAB, n_layers=2, core=(0, 1), max_loops=3, tie_embeddings=True, seed=3).train()
    config.model = model.config
    rows = RowSource(wino_plus_rows(), batch_size, seed=1, rank=rank, world_size=world)
    anchor = RowSource(TensorRows(random_corpus(16, seed=5)), batch_size // 2, seed=2, rank=rank, world_size=world)
    source = PairedSource(rows, anchor, lambda main, extra: WinoPlusBatch(main.rows, extra))
    objective = WinoPlusObjective(MASK_ID, WinoPlusLossWeights(confident_above=0.2), MaskedDiffusion(MASK_ID), 0.5)
    return Trainer(config, model, objective, source, None, root / "wino-plus", **options)


def make_codd_run(root, rank: int, world: int, batch_size: int, grad_accum: int = 1, **options):
    """4 updates of a 3-state CoDD prior (window 4) on a frozen perturbed model's log-probs, noise per shard."""
    config = RunConfig()
    for key, value in dict(steps=4, grad_accum=grad_accum, lr=0.1, seed=7, device="cpu", precision="fp32",
                           warmup_steps=0, lr_schedule="constant", weight_decay=0.0, grad_clip=0.0, ema_decay=0.0,
                           eval_every=0, ckpt_every=0, log_every=1).items():
        setattr(config.train, key, value)
    frozen = frozen_log_probs(make_model(vocab_size=VOCAB, n_layers=2, core=(0, 1), seed=4), MASK_ID, loops=2)
    scorer = CoupledScorer(initial_prior(3, VOCAB, init_std=0.5, seed=2), window=4)
    source = TensorBatchSource(random_corpus(), batch_size=batch_size, seed=1, rank=rank, world_size=world)
    objective = CoupledPriorObjective(frozen, MaskedDiffusion(MASK_ID, LogLinear()))
    return Trainer(config, scorer, objective, source, None, root / "codd", **options)


class SeenRows(WinoPlusRows):
    """WINO+ rows that remember the indices of the rows read from them."""

    def __init__(self, rows: WinoPlusRows):
        super().__init__(rows.inputs, rows.clean, rows.targets, rows.block)
        self.seen: list[int] = []

    def select(self, index):
        self.seen.extend(index.tolist())
        return super().select(index)


def finetune_through_public_function(batch_size: int, grad_accum: int = 1, dist=None):
    """(model, log, row indices read) of 4 `finetune_wino_plus` updates with the supervised anchor, on this
    process's share of the rows."""
    rows = SeenRows(wino_plus_rows())
    model = make_model(vocab_size=VOCAB, n_layers=2, core=(0, 1), max_loops=3, tie_embeddings=True, seed=3)
    anchor = SupervisedAnchor(random_corpus(16, seed=5), torch.ones(16, SEQ_LEN, dtype=torch.bool),
                              MaskedDiffusion(MASK_ID), weight=0.5, batch_size=batch_size // 2)
    log = finetune_wino_plus(model, rows, MASK_ID, steps=4, lr=3e-3, batch_size=batch_size, seed=1,
                             weights=WinoPlusLossWeights(confident_above=0.2), anchor=anchor, grad_accum=grad_accum,
                             dist=dist)
    return model, log, rows.seen


def fit_prior_through_public_function(batch_size: int, topk: int, dist=None):
    """(result, the rows x_t the frozen model ran on) of 4 `train_codd_prior` updates (3-state prior, window 4)
    on this process's share of the rows."""
    frozen_inputs = []
    frozen = frozen_log_probs(make_model(vocab_size=VOCAB, n_layers=2, core=(0, 1), seed=4), MASK_ID, loops=2)

    def recorded(tokens):
        frozen_inputs.extend(tokens.tolist())
        return frozen(tokens)

    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    source = TensorBatchSource(random_corpus(), batch_size=batch_size, seed=1, rank=rank, world_size=world)
    # Adam's first updates are about lr x sign(gradient): at lr 0.01 the fp32 rounding of gradients summed in
    # another order stays well under the 1e-6 the comparisons allow.
    config = CoDDTrainConfig(n_states=3, window=4, steps=4, lr=0.01, topk=topk, pool_batches=3, seed=7)
    result = train_codd_prior(recorded, source, MaskedDiffusion(MASK_ID, LogLinear()), VOCAB, config, dist=dist)
    return result, frozen_inputs


def record_sudoku(dist=None):
    """Trajectories recorded one prompt per batch; prompts pass on their 1st, 2nd, never, 1st verification."""
    task = SudokuTask(4, givens=6)
    tokenizer, examples = task_tokenizer(task), task.generate(4, seed=0)
    scripted = ScriptedSudoku([e.prompt for e in examples], passes_on=[1, 2, 0, 1])
    trajectories = record_trajectories(wino_plus_model(tokenizer), scripted, tokenizer, examples, batch_size=1,
                                       seed=3, dist=dist)
    return [(t.example_index, t.temperature, t.tokens.tolist(), t.accept_step.tolist(), t.window_index.tolist())
            for t in trajectories]


def train_codd_command(checkpoint, out, batch_size: int) -> int:
    return main(["train-codd", "--checkpoint", str(checkpoint), "--out", str(out), "--states", "3", "--window", "8",
                 "--steps", "3", "--batch-size", str(batch_size), "--topk", "2", "--pool-batches", "2", "--lr",
                 "0.01", "--device", "cpu"])


def _public_functions(info, root) -> dict:
    """WINO+ recording and fine-tuning, CoDD prior fitting (top-k pool and recomputed) and `loopdlm train-codd`
    on this rank; rank 0 saves the weights."""
    model, log, seen = finetune_through_public_function(PER_RANK_BATCH, dist=info)
    pooled, pool_inputs = fit_prior_through_public_function(PER_RANK_BATCH, topk=3, dist=info)
    recomputed, step_inputs = fit_prior_through_public_function(PER_RANK_BATCH, topk=0, dist=info)
    exit_code = train_codd_command(root / "tiny" / "run", root / "codd-command", PER_RANK_BATCH // 2)
    if info.is_main:
        torch.save({"wino-plus": model.state_dict(), "pooled": pooled.prior.state_dict()}, root / "public.pt")
    return {"wino-plus": {"log": log, "seen": seen}, "trajectories": record_sudoku(info),
            "pooled": {"history": pooled.history, "frozen_inputs": pool_inputs},
            "recomputed": {"history": recomputed.history, "frozen_inputs": step_inputs}, "command": exit_code}


def _worker(rank: int, port: int, root) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    info = setup_distributed("cpu")
    try:
        assert (info.rank, info.world_size, info.device.type) == (rank, WORLD, "cpu")
        results = {}
        for name, batch, options in (("ddp", PER_RANK_BATCH, {}),
                                     ("fsdp", PER_RANK_BATCH, {"distributed": "fsdp"}),
                                     ("fsdp-accum", PER_RANK_BATCH // 2, {"distributed": "fsdp", "grad_accum": 2}),
                                     ("rowkeyed", PER_RANK_BATCH, {"objective": RowKeyedNoise()})):
            results[name] = make_run(name, root, rank, WORLD, batch, dist=info, **options).fit()
        # FSDP interrupted in update 3 on both ranks, then resumed from its step-2 checkpoint.
        source = InterruptAfter(random_corpus(), batch_size=PER_RANK_BATCH, seed=1, rank=rank, world_size=WORLD,
                                fail_at=3)
        with pytest.raises(KeyboardInterrupt):
            make_run("fsdp-resumed", root, rank, WORLD, PER_RANK_BATCH, dist=info, distributed="fsdp",
                     train_source=source).fit()
        results["fsdp-resumed"] = make_run("fsdp-resumed", root, rank, WORLD, PER_RANK_BATCH, dist=info,
                                           distributed="fsdp").fit()
        results["wino-plus"] = make_wino_plus_run(root, rank, WORLD, PER_RANK_BATCH, dist=info).fit()
        results["codd"] = make_codd_run(root, rank, WORLD, PER_RANK_BATCH, dist=info).fit()
        summary = {name: {"history": r.history, "eval": {str(k): v for k, v in r.eval_metrics.items()}}
                   for name, r in results.items()}
        (root / f"rank{rank}.json").write_text(json.dumps(summary))
        # What each rank saw differs by design; kept apart from the summary the ranks must agree on.
        (root / f"rank{rank}-public.json").write_text(json.dumps(_public_functions(info, root)))
    finally:
        teardown_distributed()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    (root / "tiny").mkdir()
    make_tiny_checkpoint(root / "tiny")  # the frozen checkpoint of `loopdlm train-codd`
    mp.spawn(_worker, args=(_free_port(), root), nprocs=WORLD, join=True)
    return root, [json.loads((root / f"rank{r}.json").read_text()) for r in range(WORLD)]


def single_process_run(name: str, root, **options):
    return make_run(name, root, 0, 1, **options).fit()


def assert_weights_close(run_dir, reference_dir) -> None:
    for use_ema in (False, True):
        got, want = read_weights(run_dir, use_ema), read_weights(reference_dir, use_ema)
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-5, msg=name)


def public_runs(root) -> list[dict]:
    """Every rank's `_public_functions` results."""
    return [json.loads((root / f"rank{r}-public.json").read_text()) for r in range(WORLD)]


def losses(history) -> list[float]:
    return [loss for _, loss, _ in history]


def test_ranks_agree_on_loops_and_all_reduced_losses(two_rank_runs):
    _, (rank0, rank1) = two_rank_runs
    assert rank0 == rank1  # same S every step, losses all-reduced before reporting, same eval numbers
    assert len({s for _, _, s in rank0["ddp"]["history"]}) > 1  # S actually varied


def test_ddp_equals_one_process_accumulating_the_same_micro_batches(two_rank_runs, tmp_path):
    # Noise is drawn per (step, micro-batch shard), so 2 ranks x batch 4 and 1 rank x batch 4 x accum 2 see the
    # same rows with the same noise.
    root, (rank0, _) = two_rank_runs
    reference = single_process_run("single", tmp_path, batch_size=PER_RANK_BATCH, grad_accum=WORLD)
    assert [s for _, _, s in rank0["ddp"]["history"]] == [s for _, _, s in reference.history]
    assert losses(rank0["ddp"]["history"]) == pytest.approx(losses(reference.history), rel=1e-5)
    assert_weights_close(root / "ddp", tmp_path / "single")


def test_ddp_with_identical_noise_equals_one_process_with_the_whole_global_batch(two_rank_runs, tmp_path):
    root, (rank0, _) = two_rank_runs
    reference = single_process_run("whole", tmp_path, batch_size=PER_RANK_BATCH * WORLD, objective=RowKeyedNoise())
    assert losses(rank0["rowkeyed"]["history"]) == pytest.approx(losses(reference.history), rel=1e-5)
    assert_weights_close(root / "rowkeyed", tmp_path / "whole")


def test_fsdp_matches_ddp_and_resumes_exactly(two_rank_runs):
    root, (rank0, _) = two_rank_runs
    assert losses(rank0["fsdp"]["history"]) == pytest.approx(losses(rank0["ddp"]["history"]), rel=1e-5)
    for loops, values in rank0["ddp"]["eval"].items():
        assert rank0["fsdp"]["eval"][loops] == pytest.approx(values, rel=1e-5)
    assert_weights_close(root / "fsdp", root / "ddp")
    assert rank0["fsdp-resumed"]["history"] == rank0["fsdp"]["history"][2:]
    assert rank0["fsdp-resumed"]["eval"] == rank0["fsdp"]["eval"]


def test_fsdp_accumulation_equals_one_process_over_the_same_shards(two_rank_runs, tmp_path):
    # Micro-batch m of rank r is shard m * WORLD + r of the step: 2 ranks x 2 rows x 2 micro-batches see the
    # rows and noise of 1 rank x 2 rows x 4 micro-batches.
    root, (rank0, _) = two_rank_runs
    half = PER_RANK_BATCH // 2
    reference = single_process_run("single", tmp_path, batch_size=half, grad_accum=2 * WORLD)
    assert losses(rank0["fsdp-accum"]["history"]) == pytest.approx(losses(reference.history), rel=1e-5)
    assert_weights_close(root / "fsdp-accum", tmp_path / "single")


@pytest.mark.parametrize(("name", "make_trainer"), [("wino-plus", make_wino_plus_run), ("codd", make_codd_run)])
def test_wino_plus_and_codd_prior_training_under_ddp_equal_one_process(two_rank_runs, tmp_path, name, make_trainer):
    # As for MDLM: 2 ranks x batch 4 see the rows and noise of 1 rank x batch 4 x accum 2, and the update is the
    # gradient of the count-weighted mean over the global batch however it is split.
    root, (rank0, rank1) = two_rank_runs
    assert rank0[name] == rank1[name]
    reference = make_trainer(tmp_path, 0, 1, PER_RANK_BATCH, grad_accum=WORLD).fit()
    assert [s for _, _, s in rank0[name]["history"]] == [s for _, _, s in reference.history]
    assert losses(rank0[name]["history"]) == pytest.approx(losses(reference.history), rel=1e-5)
    assert len(set(losses(reference.history))) > 1  # the runs actually trained
    assert_weights_close(root / name, tmp_path / name)


def test_finetune_wino_plus_splits_the_rows_over_ranks_and_equals_one_process(two_rank_runs):
    # Each WINO+ term is a mean over its micro-batch's positions, so 2 ranks x batch 4 equal 1 process x batch 4 x
    # 2 accumulated micro-batches (the same rows, the same anchor noise per shard).
    root, _ = two_rank_runs
    rank0, rank1 = public_runs(root)
    wino0, wino1 = rank0["wino-plus"], rank1["wino-plus"]
    model, log, seen = finetune_through_public_function(PER_RANK_BATCH, grad_accum=WORLD)
    assert wino0["log"] == wino1["log"]
    assert [r["loss"] for r in wino0["log"]] == pytest.approx([r["loss"] for r in log], rel=1e-6)
    assert len({r["loss"] for r in log}) > 1
    # The ranks read disjoint rows, together the single process's rows, micro-batch by micro-batch.
    assert len(wino0["seen"]) == len(wino1["seen"]) == 4 * PER_RANK_BATCH
    assert not set(wino0["seen"][:PER_RANK_BATCH * 2]) & set(wino1["seen"][:PER_RANK_BATCH * 2])
    chunks = [seen[i:i + PER_RANK_BATCH] for i in range(0, len(seen), PER_RANK_BATCH)]
    assert chunks[0::2] == [wino0["seen"][i:i + PER_RANK_BATCH] for i in range(0, 4 * PER_RANK_BATCH, PER_RANK_BATCH)]
    assert chunks[1::2] == [wino1["seen"][i:i + PER_RANK_BATCH] for i in range(0, 4 * PER_RANK_BATCH, PER_RANK_BATCH)]
    saved = torch.load(root / "public.pt")["wino-plus"]
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(saved[name], tensor, atol=1e-6, rtol=1e-6, msg=name)


def test_recorded_trajectories_are_shared_out_and_gathered(two_rank_runs):
    # Rank r decodes batches r, r + 2, ...; both ranks return exactly the single process's recording.
    rank0, rank1 = public_runs(two_rank_runs[0])
    reference = [list(t) for t in record_sudoku()]
    assert [(t[0], t[1]) for t in reference] == [(0, 0.0), (1, 0.1), (3, 0.0)]
    assert rank0["trajectories"] == rank1["trajectories"] == reference


def test_codd_top_k_pool_is_built_in_shares_and_two_ranks_equal_one_process_with_the_whole_batch(two_rank_runs):
    # Every rank noises the whole global batch from the one seeded stream and runs the frozen model on its own
    # rows; with the exchanged pool, 2 ranks x batch 4 train exactly as 1 process x batch 8.
    root, _ = two_rank_runs
    rank0, rank1 = public_runs(root)
    pooled0, pooled1 = rank0["pooled"], rank1["pooled"]
    reference, frozen_inputs = fit_prior_through_public_function(PER_RANK_BATCH * WORLD, topk=3)
    assert pooled0["history"] == pooled1["history"]
    assert [v for h in pooled0["history"] for v in h] == pytest.approx([v for h in reference.history for v in h],
                                                                       rel=1e-6)
    assert len({coupled for _, coupled, _ in reference.history}) > 1
    assert len(pooled0["frozen_inputs"]) == len(pooled1["frozen_inputs"]) == 3 * PER_RANK_BATCH
    assert pooled0["frozen_inputs"] != pooled1["frozen_inputs"]
    for batch in range(3):
        mine = slice(batch * PER_RANK_BATCH, (batch + 1) * PER_RANK_BATCH)
        whole = frozen_inputs[batch * 2 * PER_RANK_BATCH:(batch + 1) * 2 * PER_RANK_BATCH]
        assert pooled0["frozen_inputs"][mine] + pooled1["frozen_inputs"][mine] == whole
    saved = torch.load(root / "public.pt")["pooled"]
    for name, tensor in reference.prior.state_dict().items():
        torch.testing.assert_close(saved[name], tensor, atol=1e-6, rtol=1e-6, msg=name)


def test_codd_recomputing_q_splits_each_step_over_ranks(two_rank_runs):
    rank0, rank1 = public_runs(two_rank_runs[0])
    recomputed0, recomputed1 = rank0["recomputed"], rank1["recomputed"]
    assert recomputed0["history"] == recomputed1["history"]  # losses all-reduced: one prior on both ranks
    assert len(recomputed0["frozen_inputs"]) == len(recomputed1["frozen_inputs"]) == 4 * PER_RANK_BATCH
    assert recomputed0["frozen_inputs"] != recomputed1["frozen_inputs"]


def test_train_codd_command_under_two_ranks_equals_one_process_with_the_whole_batch(two_rank_runs, tmp_path):
    root, _ = two_rank_runs
    rank0, rank1 = public_runs(root)
    assert rank0["command"] == rank1["command"] == 0
    assert train_codd_command(root / "tiny" / "run", tmp_path / "single", PER_RANK_BATCH) == 0
    vocab_size = load_pretrained(root / "tiny" / "run").model.config.vocab_size
    got, want = prior_weights(root / "codd-command", vocab_size), prior_weights(tmp_path / "single", vocab_size)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-6, msg=name)
