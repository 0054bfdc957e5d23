"""Table 1 at CPU scale: E1 (feed-forward) and E2 (diffusion) for EnsemDiff, SegDiff and MedSegDiff on the
three synthetic fingerprints (lesion ~ ISIC16, nuclei ~ MoNuSeg, clusters ~ HER2), then the table.

  python -m diffseg_jax.table1 --config configs/table1_synthetic.py --workdir runs/table1

18 runs of the tiny models (32 px), each trained and evaluated in <workdir>/<kind>/<model>_<experiment>;
rerunning skips finished runs and resumes unfinished ones. Writes <workdir>/table1.{md,csv,tex}. A test of the
whole pipeline on a CPU, not the paper's numbers: the models are tiny, the data synthetic, the training short,
and both objectives use the same learning rate (the paper's 1e-5 for E1 is for its full-length runs; set
table.e1_protocol=True to run the paper's feed-forward protocol for the E1 cells instead).

nnU-Net's reference rows (E1 only; it keeps its own SGD/poly training, planned batch size and augmentation, and
takes the grid's step count):

  python -m diffseg_jax.table1 --config configs/table1_synthetic.py --workdir runs/table1 \
      --config.table.models='("nnunet","ensemdiff","segdiff","medsegdiff")'

Real data at the same scale: any folder holding train/{images,masks} and test/{images,masks} (the
segmentation_folder layout; MoNuSeg's 512 px tiles here, or a private set like the paper's HER2) becomes a
dataset of the grid, stored at data.resize px, trained on random 32 px crops and evaluated on 32 px tiles:

  python -m diffseg_jax.table1 --config configs/table1_synthetic.py --workdir runs/table1 \
      --config.table.kinds='()' --config.table.folders='("../shared/data/monuseg2018_512",)' \
      --config.data.resize=128

The analyses of Sec. 4.2-4.3 (Figs. 3 and 4) on the same data, E2/E3/E4 of the image-droppable models:

  python -m diffseg_jax.table1 --config configs/table1_synthetic.py --workdir runs/table1 \
      --config.table.analyse=True --config.table.experiments='("e2","e3","e4")' \
      --config.table.models='("ensemdiff","segdiff")'

Repeats (beyond the paper's single runs): every cell with three seeds, Table 1 as mean ± std (n) with Welch
intervals for the differences (seed 0 stays in <model>_<experiment>, the others in <model>_<experiment>_seed<S>):

  python -m diffseg_jax.table1 --config configs/table1_synthetic.py --workdir runs/table1 \
      --config.table.seeds='(0,1,2)'
"""

import ml_collections

from diffseg_jax import defaults


def get_config(arg=None):
    del arg
    c = defaults.get_config("ensemdiff,tiny")
    c.table = ml_collections.ConfigDict(
        dict(
            kinds=("lesion", "nuclei", "clusters"),
            folders=(),  # real datasets: folders holding train/ and test/ images/ + masks/
            models=("ensemdiff", "segdiff", "medsegdiff"),
            experiments=("e1", "e2"),
            e1_protocol=False,
            e2_protocol=False,  # the E2 cells through --mode e2_protocol (validated step count; beyond the paper)
            analyse=False,
            # Repeats: every cell once per seed, e.g. (0, 1, 2); the table then gives mean ± std over them and
            # Welch intervals for the differences. Empty: one run a cell with the grid's `seed`.
            seeds=(),
            # diffusion.mask_range of every cell: '' keeps each architecture's published one, 'symmetric' or
            # 'binary' sets it for all.
            mask_range="",
            # diffusion.num_timesteps (T) of every cell: 0 keeps the tiny scheme's T = 100; e.g. 1000 for the
            # published codes' T (the ablation of issue 32). The schedule's betas scale with T as the codes do.
            num_timesteps=0,
            # Learning curves: every cell also evaluated at these kept steps (train.keep_every keeps them), with
            # each sampler of eval_samplers ('ddpm', 'ddim<K>'; empty: the grid's eval.sampler).
            eval_steps=(),
            eval_samplers=(),
        )
    )
    # What every cell shares (set on each model's tiny config with its published scheme).
    c.data.num_train = 256
    c.data.num_test = 16
    c.objective.loss = "eps_mse"  # the paper's Eq. 3 for all three, no learned variance
    c.train.num_steps = 100
    c.train.batch_size = 4
    c.train.lr = 1e-3
    c.train.ema_decay = 0.95
    c.train.log_every = 50
    c.train.ckpt_every = 100
    c.eval.use_ema = True
    c.eval.ensemble_size = 5
    # DDIM-10 keeps CPU evaluation short, but the sampler moves short-trained diffusion models a lot: on ISIC at
    # 1,000 steps DDPM over all T gives 55 % IoU where DDIM-10 gives 43 %; after this grid's 100 steps it moves
    # the synthetic cells up to 15 points either way (README, Results). --config.eval.sampler=ddpm samples as
    # the paper's codes do, at 10x the sampling time.
    c.eval.sampler = "ddim"
    c.eval.ddim_steps = 10
    c.eval.num_images = 16
    c.eval.batch_size = 16
    c.eval.member_chunk = 5
    c.protocol.max_epochs = 4
    c.analysis.analyses = ("mask_error", "loss", "model_free")
    c.analysis.t_step = 1  # every t of T = 100
    c.analysis.num_images = 16
    c.analysis.num_draws = 2
    c.analysis.batch_size = 16
    return c
