"""Ensemble sampling: one compiled scan over timesteps with vmapped members, against the published codes' way.

  python benchmarks/sampling.py                                  # tiny EnsemDiff, CPU-sized
  python benchmarks/sampling.py --models ensemdiff,segdiff --size published --members 5 --steps 50

The published samplers (guided-diffusion's ``p_sample_loop``, as EnsemDiff, SegDiff and MedSegDiff run it)
loop in Python over timesteps, and their evaluation scripts loop over ensemble members: one network call per
(member, step). The naive row does exactly that here, with the same model and the same per-step function
jitted (so it is the structure being compared, not eager against compiled code); the scan row is
``sampling.make_ensemble_fn``: one ``lax.scan`` over the steps with the members vmapped (``--chunk`` members
at a time). Both draw the same noise (same keys), so their ensemble means must agree; the table shows the
largest difference. Throughput is member-steps per second: images × members × steps / seconds.
"""

from __future__ import annotations

import common
import jax
import jax.numpy as jnp
import numpy as np

from diffseg_jax import build, defaults, diffusion, sampling

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


def main():
    parser = common.comparison_parser(__doc__, images=2)
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="T of the DDPM (cosine) schedule")
    parser.add_argument("--chunk", type=int, default=0, help="members at once in the scan sampler (0: all)")
    args = parser.parse_args()
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
