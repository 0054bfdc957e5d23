"""The config a trained run recorded (its ``config.json``), to evaluate, sample or analyse it again.

  python -m diffseg_jax.main --config configs/from_run.py:runs/e2 --workdir runs/e2 --mode evaluate \\
      --eval_dir runs/e2/eval_d4 --config.eval.tta=d4
  python -m diffseg_jax.main --config configs/from_run.py:runs/table1/lesion/ensemdiff_e2 \\
      --workdir runs/table1/lesion/ensemdiff_e2 --mode analyse

The argument is the run's folder. Every value is the run's, so nothing has to be retyped (a Table 1 grid cell
has no config file of its own); overrides then change what may differ (the test set, the sampler, the ensemble,
test-time augmentation). The keys and their types are those of diffseg_jax/defaults.py for the run's architecture, so
a misspelt override still fails, and a run recorded before a key existed gets that key's default.
"""

import os

from diffseg_jax import configlib, defaults


def get_config(arg=None):
    if not arg:
        raise ValueError("configs/from_run.py needs the run's folder: --config configs/from_run.py:runs/NAME")
    path = os.path.join(arg, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} does not exist: {arg!r} is not a trained run's folder (--mode train writes config.json there)."
        )
    recorded = configlib.load(path)
    return configlib.load_onto(defaults.get_config(recorded.model.name), recorded, path)
