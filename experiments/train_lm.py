"""Train one language model of the study: `python experiments/train_lm.py PRESET OUT_DIR [section.key=value ...]`.

The same steps as `loopdlm train` (prepare the corpus, build model and objective, run the Trainer), kept here so the
study depends only on the library API.
"""

from __future__ import annotations

import sys

from loopdlm.config import load_config
from loopdlm.data.corpus import TokenDataset
from loopdlm.train.trainer import Trainer
from loopdlm.workflow import CorpusBatchSource, build_model, build_training_objective, prepare_data


def main(preset: str, out_dir: str, overrides: list[str]) -> None:
    config = load_config(preset, [*overrides, f"train.out_dir={out_dir}"])
    corpus = prepare_data(config.data)
    model = build_model(config.model, corpus.tokenizer.vocab_size, seed=config.train.seed)
    seq_len, batch, seed = config.data.seq_len, config.train.batch_size, config.train.seed
    train = CorpusBatchSource(TokenDataset(corpus.directory, "train", seq_len), batch, seed)
    # The validation stream does not depend on the training seed, so every run is scored on the same text.
    val = CorpusBatchSource(TokenDataset(corpus.directory, "val", seq_len), batch, 12345)
    objective = build_training_objective(config, corpus.tokenizer.mask_id)
    trainer = Trainer(config, model, objective, train, val, out_dir, tokenizer=corpus.tokenizer)
    result = trainer.fit()
    print(f"{out_dir}: {result.step} steps, {model.num_parameters()} parameters, final eval {result.eval_metrics}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
