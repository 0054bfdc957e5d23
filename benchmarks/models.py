"""Per-architecture parameters, FLOPs, train-step throughput, achieved FLOP/s and memory.

  python benchmarks/models.py                       # tiny configs timed; published configs counted only
  python benchmarks/models.py --time-published      # also time the published configs (use an accelerator)
  python benchmarks/models.py --models ensemdiff,segdiff --dtype bfloat16 --remat --json out.json

Prints the backend and device, then one row per (architecture, size). FLOPs are XLA's cost analysis: one
forward pass of one image, and one whole train step (forward, backward, optimizer) of the batch; achieved
TFLOP/s = train-step FLOPs / median step time. The step is each architecture's own: E2 with its published
loss for the diffusion models, E1 for the feed-forward references. Compile time (lowering + XLA compilation
of the step) is reported apart from the steady-state median. Memory: XLA's analysis of the compiled step (arguments + outputs +
temporaries) and, where the backend exposes it (GPU/TPU), the allocator's peak so far in this process.
"""

from __future__ import annotations

import argparse
import time

import common
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import base
from diffseg_jax import models, train

PUBLISHED_SIZE = 256  # the size the paper's ISIC runs use; MoNuSeg trains on 256 crops too


def _config(name: str, tiny: bool, dtype: str, remat: bool):
    config = base.get_config(f"{name},tiny" if tiny else name)
    config.experiment = "e1" if models.is_feed_forward(name) else "e2"
    if not tiny:
        config.data.image_size = PUBLISHED_SIZE
    if "dtype" in config.model:
        config.model.dtype = dtype
    if "remat" in config.model:
        config.model.remat = remat
    return config


def _forward_flops(model, variables, x, t, cond) -> float:
    fwd = jax.jit(
        lambda v, x, t, c: model.apply(v, x, t, c, train=False, rngs=train.model_rngs(jax.random.PRNGKey(0)))
    )
    return common.hlo_flops(fwd.lower(variables, x, t, cond)) / x.shape[0]


def bench(name: str, tiny: bool, batch: int, repeats: int, time_it: bool, dtype: str, remat: bool) -> dict:
    config = _config(name, tiny, dtype, remat)
    size, ch = config.data.image_size, config.data.image_channels
    model = train.build_model(config.model, train.output_channels(config, ch), size)
    x = jnp.zeros((1, size, size, 1))
    cond = jnp.zeros((1, size, size, ch))
    t = jnp.zeros((1,), jnp.int32)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0, impl="rbg"), x, t, cond))
    row = {
        "model": name,
        "size": "tiny" if tiny else "published",
        "image_size": size,
        "dtype": dtype,
        "remat": remat,
        "params": models.param_count(abstract["params"]),
        "batch": batch,
    }
    variables = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), dict(abstract))
    row["forward_gflops_per_image"] = _forward_flops(model, variables, x, t, cond) / 1e9
    if not time_it:
        return row
    optimizer = train.make_optimizer(config.train)
    state = jax.jit(
        lambda: train.create_train_state(
            train.init_variables(model, jax.random.PRNGKey(0), (1, size, size, 1), (1, size, size, ch)),
            optimizer,
            jax.random.PRNGKey(1),
        )
    )()
    mesh = train.data_mesh()
    # Replicated as the train loop places it: the step's output sharding, so the step compiles once.
    state = jax.device_put(state, NamedSharding(mesh, P()))
    step = train.jit_train_step(
        train.make_train_step(model, optimizer, train.build_schedule(config.diffusion), config), mesh
    )
    rng = np.random.default_rng(0)
    batch_np = {
        "image": rng.random((batch, size, size, ch), np.float32),
        "mask": (rng.random((batch, size, size, 1)) > 0.5).astype(np.float32),
    }
    device_batch = train.shard_batch(batch_np, mesh)
    t0 = time.perf_counter()
    lowered = step.lower(state, device_batch)
    compiled = lowered.compile()  # jit reuses this executable below
    row["compile_s"] = time.perf_counter() - t0
    row["train_step_gflops"] = common.hlo_flops(lowered) / 1e9
    row["xla_memory_gib"] = common.memory_gib(compiled)
    holder = {"state": state}

    def one_step():
        holder["state"], metrics = step(holder["state"], device_batch)
        return metrics["loss"]

    row["first_step_s"], row["train_step_median_s"] = common.timed(one_step, repeats)
    row["images_per_s"] = batch / row["train_step_median_s"]
    row["achieved_tflops"] = row["train_step_gflops"] / row["train_step_median_s"] / 1e3
    row["device_peak_gib"] = common.device_peak_gib()
    return row


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default=",".join(sorted(models.MODELS)))
    parser.add_argument("--sizes", default="tiny,published", help="tiny, published or both")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--remat", action="store_true")
    parser.add_argument("--time-published", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    print(common.device_line(), flush=True)
    rows = []
    header = (
        f"{'model':15s} {'size':9s} {'px':>4s} {'dtype':8s} {'params':>12s} {'GF/img':>7s} {'GF/step':>8s} "
        f"{'compile':>8s} {'step s':>7s} {'img/s':>7s} {'TFLOP/s':>8s} {'XLA GiB':>8s}"
    )
    print(header)
    for name in args.models.split(","):
        for size in args.sizes.split(","):
            tiny = size == "tiny"
            row = bench(
                name, tiny, args.batch, args.repeats, tiny or args.time_published, args.dtype, args.remat
            )
            rows.append(row)
            common.write_json(args.json, rows, dtype=args.dtype, remat=args.remat, batch=args.batch)
            fmt = lambda k, f: (f % row[k]) if row.get(k) is not None else "-"  # noqa: E731
            print(
                f"{name:15s} {row['size']:9s} {row['image_size']:4d} {args.dtype[:8]:8s} {row['params']:12,d} "
                f"{row['forward_gflops_per_image']:7.1f} {fmt('train_step_gflops', '%8.1f'):>8s} "
                f"{fmt('compile_s', '%8.1f'):>8s} {fmt('train_step_median_s', '%7.3f'):>7s} "
                f"{fmt('images_per_s', '%7.1f'):>7s} {fmt('achieved_tflops', '%8.2f'):>8s} "
                f"{fmt('xla_memory_gib', '%8.2f'):>8s}",
                flush=True,
            )


if __name__ == "__main__":
    main()
