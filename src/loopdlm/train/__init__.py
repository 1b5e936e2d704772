"""Training: the loop, checkpoints, distributed setup, learning-rate schedule, EMA and FLOP accounting."""

from loopdlm.train.checkpoint_files import (
    latest_checkpoint,
    load_checkpoint_config,
    load_model_weights,
    read_training_state,
    read_weights,
    resolve_checkpoint,
    save_checkpoint,
)
from loopdlm.train.distributed import DistInfo, setup_distributed, teardown_distributed, wrap_model
from loopdlm.train.ema import EMA
from loopdlm.train.flops import expected_loops, measure_matmul_flops, training_flops
from loopdlm.train.loop_counts import loops_for_step
from loopdlm.train.lr import learning_rate
from loopdlm.train.callbacks import Callback, EarlyStopping, Validation
from loopdlm.train.objective import LossTerms, NelboObjective, Objective
from loopdlm.train.trainer import BatchSource, TensorBatchSource, Trainer, TrainResult

__all__ = ["EMA", "BatchSource", "Callback", "DistInfo", "EarlyStopping", "LossTerms", "NelboObjective", "Objective",
           "Validation", "TensorBatchSource", "TrainResult", "Trainer",
           "expected_loops", "latest_checkpoint", "learning_rate", "load_checkpoint_config", "load_model_weights",
           "loops_for_step", "measure_matmul_flops", "read_training_state", "read_weights", "resolve_checkpoint",
           "save_checkpoint", "setup_distributed", "teardown_distributed", "training_flops", "wrap_model"]
