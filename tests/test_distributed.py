"""Two gloo processes on CPU against single-process references over the same global batches (MDLM, FSDP, WINO+,
CoDD prior fitting)."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from loopdlm.config import RunConfig
from loopdlm.data.batches import PairedSource, RowSource, TensorRows
from loopdlm.diffusion import LogLinear, MaskedDiffusion
from loopdlm.models import LoopedTransformer
from loopdlm.train import TensorBatchSource, Trainer, read_weights, setup_distributed, teardown_distributed
from loopdlm.train.codd_training import CoupledPriorObjective, CoupledScorer, frozen_log_probs, initial_prior
from loopdlm.train.wino_plus import WinoPlusBatch, WinoPlusLossWeights, WinoPlusObjective, WinoPlusRows
from conftest import make_model
from test_train import MASK_ID, SEQ_LEN, VOCAB, InterruptAfter, RowKeyedNoise, random_corpus, run_config

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
    finally:
        teardown_distributed()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
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
