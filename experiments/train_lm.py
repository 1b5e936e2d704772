"""Train one language model of the study: `python experiments/train_lm.py PRESET OUT_DIR [section.key=value ...]`.

The same `build_run` as `loopdlm train` (prepare the corpus, build model and objective, run the Trainer), called
through the library API.
"""

from __future__ import annotations

import sys

from loopdlm.config import load_config
from loopdlm.workflow import build_run


def main(preset: str, out_dir: str, overrides: list[str]) -> None:
    config = load_config(preset, [*overrides, f"train.out_dir={out_dir}"])
    # The validation stream does not depend on the training seed, so every run is scored on the same text.
    run = build_run(config, val_seed=12345)
    result = run.trainer.fit()
    print(f"{out_dir}: {result.step} steps, {run.model.num_parameters()} parameters, final eval "
          f"{result.eval_metrics}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
