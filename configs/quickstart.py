"""Quickstart: a small EnsemDiff trained for diffusion segmentation (E2) on the synthetic lesion dataset.

Beyond the paper, the network predicts the mask x0 instead of the noise ε (``objective.prediction='x0'``): at a
short run's scale ε-prediction leaves the members on soft values (issue 32). ``--config.objective.prediction=eps``
trains the paper's ε (Eq. 3). Beyond the paper too (issue 33): self-conditioning (``objective.self_condition``,
Chen et al. 2022) and a stochastic 10-step DDIM (η = 1), the best variant measured at this scale
(docs/results.md, "Beyond the paper: better diffusion segmentation"): against x0 with DDIM-25 its std map finds the
errors better (AUROC 0.937 vs 0.917) at 10 instead of 25 network calls per member, with the same IoU and ECE.

  python -m diffseg_jax.main --config configs/quickstart.py --workdir runs/quickstart

Minutes on 2 CPU cores: builds the synthetic dataset, trains, samples a DDIM ensemble on held-out images and
writes runs/quickstart/eval/metrics.json (IoU, ensemble size, baselines) and eval/ensemble.png
(image / ground truth / ensemble mean / ensemble std). ``:tiny`` shrinks it further for the tests.
"""

from diffseg_jax import defaults


def get_config(arg=None):
    config = defaults.get_config(arg)
    config.experiment = "e2"
    config.objective.loss = (
        "eps_mse"  # The plain MSE, no learned variance (EnsemDiff's hybrid loss also works).
    )
    # Issue 33: the previous x̂0 as extra input channels (a stop-gradient first pass on half the training batches).
    config.objective.self_condition = True
    config.objective.prediction = "x0"  # Beyond the paper: the mask as target; 'eps' is the paper's Eq. 3.
    # Masks diffused as 2m-1 in [-1, 1], the range the sampler clips x0 to (EnsemDiff's own code diffuses {0, 1}).
    config.diffusion.mask_range = "symmetric"
    config.data.kind = "lesion"
    config.data.image_size = 32
    config.data.num_train = 512
    config.data.num_test = 32
    config.model = defaults.tiny_model("ensemdiff")
    config.train.num_steps = 600
    config.train.batch_size = 8
    config.train.lr = 5e-4  # Faster than the published 1e-4 for this small net and short run.
    config.train.log_every = 50
    config.train.ckpt_every = 200
    config.train.ema_decay = 0.995  # A short run: an EMA over ~200 steps; sampled with it.
    config.eval.use_ema = True
    config.eval.ensemble_size = 5
    config.eval.sampler = "ddim"
    config.eval.ddim_steps = 10  # ≤ 10 network calls per member (issue 33); 25 before
    config.eval.ddim_eta = 1.0  # stochastic DDIM: DDPM's posterior variance at each of the 10 steps
    config.eval.batch_size = 32
    if defaults.parse_arg(arg)[1]:
        defaults.apply_tiny(config)
    return config
