"""Per-timestep error and loss curves: the jitted evaluator (lax.map over t, vmapped draws) against a Python
loop over t.

  python benchmarks/curves.py                          # tiny EnsemDiff, T = 100, every t
  python benchmarks/curves.py --size published --timesteps 1000 --t-step 10 --images 8

The loop row calls one jitted function per timestep (what a script written around the published codes does:
for t in range(T): predict, compare); the evaluator row is ``analysis.curves.timestep_curves`` in one
compiled call (``--t-chunk`` timesteps at once). Both use the same keys, so the curves must agree; the table
shows the largest difference. Throughput: network evaluations (images × draws × timesteps) per second.
"""

from __future__ import annotations

import common
import jax
import jax.numpy as jnp
import numpy as np

from diffseg_jax import build, defaults
from diffseg_jax.analysis import curves

PUBLISHED_SIZE = 256


def bench(name, published, images, timesteps, t_step, draws, t_chunk, repeats) -> dict:
    config = defaults.get_config(name if published else f"{name},tiny")
    config.diffusion.num_timesteps = timesteps
    size = PUBLISHED_SIZE if published else config.data.image_size
    model = build.build_model(config.model, 1, size)
    # Host-made weights of the model's shapes (common.host_variables): its own initialisation only costs
    # compile time on a GPU, and its zero-initialised output layer would leave the network's output zero.
    variables = common.host_variables(common.abstract_variables(model, size, 3))
    schedule = build.build_schedule(config.diffusion)
    rng = np.random.default_rng(0)
    imgs = jnp.asarray(rng.random((images, size, size, 3), np.float32))
    x0 = jnp.asarray(np.where(rng.random((images, size, size, 1)) > 0.5, 1.0, -1.0).astype(np.float32))
    ts = np.arange(0, timesteps, t_step)
    key = jax.random.PRNGKey(3)
    rngs = build.model_rngs(jax.random.PRNGKey(0))
    out_fn = lambda x, t: model.apply(variables, x, t, imgs, train=False, rngs=rngs)  # noqa: E731

    evaluator = jax.jit(
        lambda: curves.timestep_curves(
            out_fn, schedule, x0, jnp.asarray(ts), key, num_draws=draws, t_chunk=t_chunk
        )
    )
    one_t = jax.jit(
        lambda t: jax.tree.map(
            lambda a: a[0],
            curves.timestep_curves(out_fn, schedule, x0, t[None], key, num_draws=draws),
        )
    )

    def loop():
        rows = [one_t(jnp.asarray(t, jnp.int32)) for t in ts]
        return {k: jnp.stack([r[k] for r in rows]) for k in rows[0]}

    row = dict(model=name, size="published" if published else "tiny", image_size=size, images=images,
               timesteps=len(ts), draws=draws)  # fmt: skip
    row["evaluator_compile_s"], row["evaluator_s"] = common.timed(evaluator, repeats)
    row["loop_compile_s"], row["loop_s"] = common.timed(loop, repeats)
    evals = images * draws * len(ts)
    row["evaluator_evals_per_s"] = evals / row["evaluator_s"]
    row["loop_evals_per_s"] = evals / row["loop_s"]
    row["speedup"] = row["loop_s"] / row["evaluator_s"]
    a, b = evaluator(), loop()
    row["max_abs_diff"] = float(max(jnp.max(jnp.abs(a[k] - b[k])) for k in a))
    return row


def main():
    parser = common.comparison_parser(__doc__, images=4)
    parser.add_argument("--timesteps", type=int, default=100)
    parser.add_argument("--t-step", type=int, default=1)
    parser.add_argument("--draws", type=int, default=1)
    parser.add_argument("--t-chunk", type=int, default=0, help="timesteps at once in the evaluator (0: all)")
    args = parser.parse_args()
    print(common.device_line(), flush=True)
    print(
        f"{'model':15s} {'size':9s} {'px':>4s} {'img×draw×t':>11s} {'eval s':>8s} {'loop s':>8s} "
        f"{'eval n/s':>9s} {'loop n/s':>9s} {'speedup':>8s} {'|Δ|':>8s} {'compile s':>10s}"
    )
    rows = []
    for name in args.models.split(","):
        row = bench(
            name, args.size == "published", args.images, args.timesteps, args.t_step, args.draws,
            args.t_chunk or None, args.repeats,
        )  # fmt: skip
        rows.append(row)
        common.write_json(args.json, rows)  # after every row: a time limit loses nothing done
        work = f"{args.images}×{args.draws}×{row['timesteps']}"
        print(
            f"{name:15s} {row['size']:9s} {row['image_size']:4d} {work:>11s} "
            f"{row['evaluator_s']:8.3f} {row['loop_s']:8.3f} {row['evaluator_evals_per_s']:9.1f} "
            f"{row['loop_evals_per_s']:9.1f} {row['speedup']:8.2f} {row['max_abs_diff']:8.1e} "
            f"{row['evaluator_compile_s']:10.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
