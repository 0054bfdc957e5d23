"""Quickstart: a small EnsemDiff trained for diffusion segmentation (E2) on the synthetic lesion dataset.

Beyond the paper, the best variant measured at this scale (issue 33; docs/results.md, "BerDiff against E1 over
three seeds"): Bernoulli diffusion of the mask (BerDiff, Chen et al. 2023; ``diffusion.process='bernoulli'``)
with the network predicting the mask x0 as a probability, self-conditioning (Chen et al. 2022) and BerDiff's
10-step sampler. Over seeds 0-2 it is level with the same network trained feed-forward (E1) on IoU, ECE and the
std map's error AUROC, at 10 network calls per member, where Gaussian diffusion with the same options had an ECE
of 0.036. ``--config.diffusion.process=gaussian --config.eval.ddim_eta=1`` gives that Gaussian variant (x0 target,
stochastic DDIM-10), and with ``--config.objective.prediction=eps`` the paper's ε (Eq. 3). The per-timestep
analyses of the paper (``--mode analyse``: Figs. 3-4) are of Gaussian diffusion; on this config's runs they give
the mask prediction error under Bernoulli noise instead (``bernoulli_mask_error``) and no ε loss.

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
    # Issue 33: Bernoulli diffusion (BerDiff): pixels flipped to fair coins, KL + BCE loss (objective.loss is not
    # used), the network's x0 a probability; 'gaussian' is the paper's process.
    config.diffusion.process = "bernoulli"
    # Issue 33: the previous x̂0 as extra input channels (a stop-gradient first pass on half the training batches).
    config.objective.self_condition = True
    config.objective.prediction = "x0"  # Beyond the paper: the mask as target (BerDiff's code: the flips, 'eps').
    # x_t (and the previous x̂0) fed to the network as 2m-1 in [-1, 1] (Gaussian: the range x0 is diffused in and
    # clipped to; EnsemDiff's own code diffuses {0, 1}).
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
    config.eval.ddim_steps = 10  # ≤ 10 network calls per member (issue 33): BerDiff's DDIM-like sampler
    config.eval.ddim_eta = 0.0  # BerDiff's sampler has no η (each step draws Bernoulli samples); Gaussian: 1
    config.eval.batch_size = 32
    if defaults.parse_arg(arg)[1]:
        defaults.apply_tiny(config)
    return config
