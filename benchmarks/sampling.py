"""Ensemble sampling: one compiled scan over timesteps with vmapped members, against the published codes' way.

  python benchmarks/sampling.py                                  # tiny EnsemDiff, CPU-sized
  python benchmarks/sampling.py --models ensemdiff,segdiff --size published --members 5 --steps 50
  python benchmarks/sampling.py --published --size published   # seconds per image at the paper's settings

The published samplers (guided-diffusion's ``p_sample_loop``, as EnsemDiff, SegDiff and MedSegDiff run it)
loop in Python over timesteps, and their evaluation scripts loop over ensemble members: one network call per
(member, step). The naive row does exactly that here, with the same model and the same per-step function
jitted (so it is the structure being compared, not eager against compiled code); the scan row is
``sampling.make_ensemble_fn``: one ``lax.scan`` over the steps with the members vmapped (``--chunk`` members
at a time). Both draw the same noise (same keys), so their ensemble means must agree; the table shows the
largest difference. Throughput is member-steps per second: images × members × steps / seconds.

``--published``: what a user pays per segmented image at the paper's settings (issue 31). For each model and
compute dtype (``model.dtype``, float32 and bfloat16), the evaluation's own ensemble (``sampling.ensemble_fn``
of the dataset's published config: 10 members for ISIC, 25 for MoNuSeg, in chunks of ``eval.member_chunk``)
runs a few real steps of the real sampler (DDPM over a T = ``--measure-steps`` schedule, whose steps are
those of T = 1000: one network call each; DDIM with ``--measure-steps`` of T = 1000's steps) at the batch
``eval.batch_size=0`` chooses from the device's memory (``auto_batch.auto_batch_size``; ``--images N`` fixes
it), and the member-steps/s measured are extrapolated to the whole test set: 379 ISIC images (the ISIC 2016
test split), 14 MoNuSeg images of 512 px (4 tiles of 256 each), DDPM over all 1000 steps and DDIM-50. Rows go
in order of importance (a time limit loses the last): ISIC's DDPM in float32 and bfloat16, then DDIM-50, then
MoNuSeg. What was measured and what extrapolated are printed apart.
"""

from __future__ import annotations

import sys
import time

import common
import jax
import jax.numpy as jnp
import numpy as np

from diffseg_jax import auto_batch, build, defaults, diffusion, sampling

PUBLISHED_SIZE = 256


def _setup(name: str, published: bool, steps: int):
    config = defaults.get_config(name if published else f"{name},tiny")
    config.experiment = "e2"
    config.objective.loss = "eps_mse"  # one output channel, fixed variance: the same step for every model
    config.diffusion.num_timesteps = steps  # DDPM over a T-step schedule: one network call per step
    config.diffusion.schedule = "cosine"  # valid for any T (linear betas scale with 1000/T)
    config.eval.sampler = "ddpm"
    size = PUBLISHED_SIZE if published else config.data.image_size
    model = build.build_model(config.model, 1, size)
    # Host-made weights of the model's shapes (common.host_variables): its own initialisation only costs
    # compile time on a GPU, and its zero-initialised output layer would leave the network's output zero.
    variables = common.host_variables(common.abstract_variables(model, size, 3))
    return config, model, variables, size


def naive_sampler(model, schedule, variables, config):
    """One jitted DDPM step for one member; the loops over members and steps stay in Python."""
    clip = (-1.0, 1.0) if config.eval.clip_denoised else None

    @jax.jit
    def step(x, t, images, step_key):
        tb = jnp.full((x.shape[0],), t, jnp.int32)
        out = model.apply(variables, x, tb, images, train=False, rngs=build.model_rngs(jax.random.PRNGKey(0)))
        x0, _ = diffusion.model_x0_eps(schedule, out, x, tb, prediction="eps", clip_range=clip)
        mean, _, _ = diffusion.q_posterior(schedule, x0, x, tb)
        log_var = diffusion.step_log_variance(schedule, tb, x.shape, config.diffusion.variance, None)
        noise = jax.random.normal(jax.random.fold_in(step_key, t), x.shape)
        return mean + jnp.where(t > 0, jnp.exp(0.5 * log_var), 0.0) * noise

    def sample(images, shape, key, members):
        probs = []
        for member_key in jax.random.split(key, members):  # as ensemble_sample splits its key
            init_key, step_key = jax.random.split(member_key)  # as ddpm_sample splits the member's key
            x = jax.random.normal(init_key, shape)
            for t in range(schedule.num_timesteps - 1, -1, -1):
                x = step(x, t, images, step_key)
            probs.append(diffusion.diffusion_to_prob(x, config.diffusion.mask_range))
        return jnp.mean(jnp.stack(probs), axis=0)

    return sample


def bench(
    name: str, published: bool, images: int, members: int, steps: int, chunk: int, repeats: int
) -> dict:
    config, model, variables, size = _setup(name, published, steps)
    schedule = build.build_schedule(config.diffusion)
    rng = np.random.default_rng(0)
    imgs = jnp.asarray(rng.random((images, size, size, 3), np.float32))
    shape = (images, size, size, 1)
    key = jax.random.PRNGKey(7)
    member_steps = images * members * steps
    row = dict(model=name, size="published" if published else "tiny", image_size=size, images=images,
               members=members, steps=steps)  # fmt: skip

    ensemble = sampling.make_ensemble_fn(sampling.make_member_fn(model, schedule, config), members, chunk)
    template = jnp.zeros(shape)
    scan_mean = lambda: ensemble(variables, imgs, template, key)["mean"]  # noqa: E731
    row["scan_compile_s"], row["scan_s"] = common.timed(scan_mean, repeats)
    naive = naive_sampler(model, schedule, variables, config)
    naive_mean = lambda: naive(imgs, shape, key, members)  # noqa: E731
    row["naive_compile_s"], row["naive_s"] = common.timed(naive_mean, repeats)
    row["scan_member_steps_per_s"] = member_steps / row["scan_s"]
    row["naive_member_steps_per_s"] = member_steps / row["naive_s"]
    row["speedup"] = row["naive_s"] / row["scan_s"]
    row["max_abs_diff_of_means"] = float(jnp.max(jnp.abs(scan_mean() - naive_mean())))
    return row


# The paper's test sets (Sec. 3.1): images, model-sized inputs per image, and the steps of each sampler.
PAPER_SETS = {"isic": {"images": 379, "tiles": 1}, "monuseg": {"images": 14, "tiles": 4}}
PAPER_STEPS = {"ddpm": 1000, "ddim": 50}
# (dataset, sampler, dtype) in the order a time limit should keep them.
PAPER_ROWS = (
    ("isic", "ddpm", "float32"),
    ("isic", "ddpm", "bfloat16"),
    ("isic", "ddim", "bfloat16"),
    ("isic", "ddim", "float32"),
    ("monuseg", "ddpm", "bfloat16"),
    ("monuseg", "ddpm", "float32"),
    ("monuseg", "ddim", "bfloat16"),
    ("monuseg", "ddim", "float32"),
)


def paper_config(name: str, dataset: str, sampler: str, dtype: str, published: bool, measure_steps: int):
    """The dataset's published E2 config of ``name`` (tiny: its CPU-test variant), with ``dtype`` as
    ``model.dtype`` and the sampler cut to ``measure_steps`` network calls per member."""
    config = defaults.experiment_config("e2", dataset, name if published else f"{name},tiny")
    config.eval.ensemble_size = defaults.DATASET_SETTINGS[dataset]["ensemble_size"]  # tiny keeps the paper's too
    config.model.dtype = dtype
    config.eval.sampler = sampler
    config.eval.batch_size = auto_batch.AUTO_BATCH
    if sampler == "ddpm":  # DDPM over a T-step schedule: T network calls, each as one of T = 1000's
        config.diffusion.num_timesteps = measure_steps
        config.diffusion.schedule = "cosine"  # valid for any T (linear betas scale with 1000/T)
    else:
        config.diffusion.num_timesteps = 1000
        config.eval.ddim_steps = measure_steps
    return config


def paper_row(name, dataset, sampler, dtype, args, images=0, batch_from=None) -> dict:
    """One row: the member-steps/s measured on the evaluation's ensemble, extrapolated to the test set.

    ``images`` per call; 0: chosen from the device's memory as ``eval.batch_size=0`` chooses it (at most
    ``--max-images`` when given: a CPU dry run keeps its batch small)."""
    published, measure_steps = args.size == "published", args.measure_steps
    config = paper_config(name, dataset, sampler, dtype, published, measure_steps)
    size = config.data.image_size
    model = build.build_model(config.model, build.output_channels(config, 3), size)
    variables = common.host_variables(common.abstract_variables(model, size, 3))
    schedule = build.build_schedule(config.diffusion)
    ensemble = sampling.ensemble_fn(config, model, schedule)
    members, paper = config.eval.ensemble_size, PAPER_SETS[dataset]
    inputs = paper["images"] * paper["tiles"]
    n_dev = jax.device_count()
    row = {
        "model": name,
        "size": "published" if published else "tiny",
        "image_size": size,
        "dataset": dataset,
        "sampler": sampler,
        "dtype": dtype,
        "members": members,
        "member_chunk": config.eval.member_chunk,
        "measured_steps": measure_steps,
    }
    t0 = time.perf_counter()
    if images:
        batch, row["batch_from"] = -(-images // n_dev) * n_dev, batch_from or "--images"
    else:
        auto = auto_batch.auto_batch_size(
            ensemble, variables, (size, size, 3), (size, size, 1), inputs, "benchmark"
        )
        batch = min(auto, -(-args.max_images // n_dev) * n_dev) if args.max_images else auto
        row["batch_from"], row["auto_batch"] = "eval.batch_size=0 (device memory)", auto
        row["auto_s"] = time.perf_counter() - t0  # its own compilation for one image per device
    row["batch"] = batch
    rng = np.random.default_rng(0)
    imgs = jnp.asarray(rng.random((batch, size, size, 3), np.float32))
    template, key = jnp.zeros((batch, size, size, 1)), jax.random.PRNGKey(7)
    first, row["measured_s"] = common.timed(
        lambda: ensemble(variables, imgs, template, key)["mean"], args.repeats
    )
    row["compile_s"] = first - row["measured_s"]
    rate = batch * members * measure_steps / row["measured_s"]
    row["member_steps_per_s"] = rate
    steps = PAPER_STEPS[sampler]
    row.update(paper_steps=steps, paper_images=paper["images"], paper_inputs=inputs)
    row.update(extrapolate(rate, batch, members, steps, inputs, paper["images"]))
    return row


def extrapolate(rate: float, batch: int, members: int, steps: int, inputs: int, images: int) -> dict:
    """A test set of ``inputs`` model-sized inputs (``images`` images) sampled at ``rate`` member-steps/s in calls
    of ``batch`` inputs (the last one padded, as ``sampling.sample_statistics`` pads it), ``members`` members
    and ``steps`` steps each: its hours, seconds per image and images per hour."""
    total_s = -(-inputs // batch) * batch * members * steps / rate
    return {
        "set_hours": total_s / 3600,
        "s_per_image": total_s / images,
        "images_per_hour": 3600 * images / total_s,
    }


def published_main(args) -> None:
    print(
        "measured: the evaluation's ensemble (sampling.ensemble_fn) on batch × members per call, "
        f"{args.measure_steps} sampler steps; extrapolated: the paper's test set at all its steps",
        flush=True,
    )
    print(
        f"{'model':10s} {'set':8s} {'sampler':9s} {'dtype':9s} {'px':>4s} {'batch×mem':>10s} "
        f"{'measured s':>10s} {'compile s':>9s} {'m-steps/s':>10s} | {'s/image':>9s} {'images/h':>9s} "
        f"{'set h':>7s}"
    )
    rows = []
    chosen = {}  # the automatic batch of (model, set, dtype): both samplers' calls have the same shapes
    for name in args.models.split(","):
        selected = [r for r in PAPER_ROWS if r[0] in args.sets.split(",")]
        for dataset, sampler, dtype in selected[: args.rows or None]:
            images, batch_from = args.images, None
            if not images and (name, dataset, dtype) in chosen:
                images, batch_from = chosen[name, dataset, dtype], "eval.batch_size=0 (its DDPM row's)"
            try:
                row = paper_row(name, dataset, sampler, dtype, args, images, batch_from)
                chosen[name, dataset, dtype] = row["batch"]
            except Exception as e:  # noqa: BLE001 — e.g. out of memory: written, and the next row goes on
                row = {
                    "model": name,
                    "dataset": dataset,
                    "sampler": sampler,
                    "dtype": dtype,
                    "error": repr(e),
                }
                print(f"{name:10s} {dataset:8s} {sampler:9s} {dtype:9s} failed: {repr(e)[:300]}", flush=True)
            rows.append(row)
            common.write_json(args.json, rows)  # after every row: a time limit loses nothing done
            if "error" in row:
                continue
            label, shape = f"{sampler}-{row['paper_steps']}", f"{row['batch']}×{row['members']}"
            print(
                f"{name:10s} {dataset:8s} {label:9s} {dtype:9s} {row['image_size']:4d} {shape:>10s} "
                f"{row['measured_s']:10.3f} {row['compile_s']:9.1f} {row['member_steps_per_s']:10.1f} | "
                f"{row['s_per_image']:9.2f} {row['images_per_hour']:9.1f} {row['set_hours']:7.3f}",
                flush=True,
            )
    print(
        "measured: m-steps/s = batch × members × steps / measured s; extrapolated from it: s/image, images/h "
        "and set h for "
        + ", ".join(f"{k}: {v['images']} images × {v['tiles']} input(s)" for k, v in PAPER_SETS.items())
        + " at DDPM-1000 / DDIM-50",
        flush=True,
    )


def main():
    parser = common.comparison_parser(__doc__, images=2)
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="T of the DDPM (cosine) schedule")
    parser.add_argument("--chunk", type=int, default=0, help="members at once in the scan sampler (0: all)")
    parser.add_argument(
        "--published",
        action="store_true",
        help="seconds per image at the paper's settings (ISIC, MoNuSeg; DDPM-1000, DDIM-50; fp32, bf16)",
    )
    parser.add_argument(
        "--measure-steps",
        type=int,
        default=0,
        help="--published: sampler steps timed per row (0: 10, tiny 2)",
    )
    parser.add_argument(
        "--max-images",
        type=int,
        default=-1,
        help="--published: cap on the automatic batch (-1: none, tiny 2)",
    )
    parser.add_argument("--rows", type=int, default=0, help="--published: only the first N rows (0: all)")
    parser.add_argument("--sets", default="isic,monuseg", help="--published: the test sets measured")
    args = parser.parse_args()
    if args.published:
        tiny = args.size == "tiny"
        if not any(a.startswith("--images") for a in sys.argv):
            args.images = 0  # chosen from the device's memory, as eval.batch_size=0
        args.measure_steps = args.measure_steps or (2 if tiny else 10)
        args.max_images = (2 if tiny else 0) if args.max_images < 0 else args.max_images
        print(common.device_line(), flush=True)
        published_main(args)
        return
    print(common.device_line(), flush=True)
    print(
        f"{'model':15s} {'size':9s} {'px':>4s} {'img×mem×T':>12s} {'scan s':>8s} {'naive s':>8s} "
        f"{'scan m-s/s':>11s} {'naive m-s/s':>11s} {'speedup':>8s} {'|Δmean|':>9s} {'compile s':>10s}"
    )
    rows = []
    for name in args.models.split(","):
        row = bench(
            name,
            args.size == "published",
            args.images,
            args.members,
            args.steps,
            args.chunk or None,
            args.repeats,
        )
        rows.append(row)
        common.write_json(args.json, rows)  # after every row: a time limit loses nothing done
        print(
            f"{name:15s} {row['size']:9s} {row['image_size']:4d} "
            f"{f'{args.images}×{args.members}×{args.steps}':>12s} {row['scan_s']:8.3f} {row['naive_s']:8.3f} "
            f"{row['scan_member_steps_per_s']:11.1f} {row['naive_member_steps_per_s']:11.1f} "
            f"{row['speedup']:8.2f} {row['max_abs_diff_of_means']:9.1e} {row['scan_compile_s']:10.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
