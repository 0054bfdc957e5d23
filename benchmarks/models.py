"""Per-architecture parameters, forward GFLOPs (XLA cost analysis) and median jitted train-step time.

  python benchmarks/models.py                       # tiny configs timed; published configs counted only
  python benchmarks/models.py --time-published      # also time the published configs (use an accelerator)
  python benchmarks/models.py --models ensemdiff,segdiff --json out.json

Prints the backend and device, one row per (architecture, size), and writes JSON if asked. FLOPs are XLA's
estimate for one forward pass of one image (convolutions and matmuls dominate); the train step is E2 with
the published scheme's loss at the stated batch size, timed after compilation (compile time reported
separately).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import base  # noqa: E402
from diffseg_jax import models, train  # noqa: E402

PUBLISHED_SIZE = {"ensemdiff": 256, "segdiff": 256, "medsegdiff": 256, "medsegdiff_new": 256}


def _config(name: str, tiny: bool):
    config = base.get_config(f"{name},tiny" if tiny else name)
    config.experiment = "e2"
    if not tiny:
        config.data.image_size = PUBLISHED_SIZE[name]
    return config


def _forward_flops(model, variables, x, t, cond) -> float:
    fwd = jax.jit(
        lambda v, x, t, c: model.apply(v, x, t, c, train=False, rngs=train.model_rngs(jax.random.PRNGKey(0)))
    )
    cost = fwd.lower(variables, x, t, cond).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan"))) / x.shape[0]


def bench(name: str, tiny: bool, batch: int, repeats: int, time_it: bool) -> dict:
    config = _config(name, tiny)
    size, ch = config.data.image_size, config.data.image_channels
    model = train.build_model(config.model, train.output_channels(config, ch), size)
    x = jnp.zeros((batch, size, size, 1))
    cond = jnp.zeros((batch, size, size, ch))
    t = jnp.zeros((batch,), jnp.int32)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0, impl="rbg"), x[:1], t[:1], cond[:1]))
    row = {
        "model": name,
        "size": "tiny" if tiny else "published",
        "image_size": size,
        "params": models.param_count(abstract["params"]),
        "batch": batch,
    }
    variables = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), dict(abstract))
    row["forward_gflops_per_image"] = _forward_flops(model, variables, x[:1], t[:1], cond[:1]) / 1e9
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
    step = train.jit_train_step(
        train.make_train_step(model, optimizer, train.build_schedule(config.diffusion), config), mesh
    )
    rng = np.random.default_rng(0)
    batch_np = {
        "image": rng.random((batch, size, size, ch), np.float32),
        "mask": (rng.random((batch, size, size, 1)) > 0.5).astype(np.float32),
    }
    t0 = time.perf_counter()
    state, m = step(state, train.shard_batch(batch_np, mesh))
    jax.block_until_ready(m["loss"])
    row["compile_plus_first_step_s"] = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state, m = step(state, train.shard_batch(batch_np, mesh))
        jax.block_until_ready(m["loss"])
        times.append(time.perf_counter() - t0)
    row["train_step_median_s"] = statistics.median(times)
    row["images_per_s"] = batch / row["train_step_median_s"]
    return row


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default=",".join(m for m in PUBLISHED_SIZE if m in models.MODELS))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--time-published", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    dev = jax.devices()[0]
    print(f"backend: {jax.default_backend()}  device: {dev.device_kind}  count: {jax.device_count()}")
    rows = []
    header = f"{'model':16s} {'size':10s} {'px':>4s} {'params':>13s} {'GFLOP/img':>10s} {'compile s':>10s} {'step s':>8s} {'img/s':>8s}"
    print(header)
    for name in args.models.split(","):
        for tiny in (True, False):
            row = bench(name, tiny, args.batch, args.repeats, time_it=tiny or args.time_published)
            rows.append(row)
            fmt = lambda k, f: (f % row[k]) if k in row else "-"
            print(
                f"{name:16s} {row['size']:10s} {row['image_size']:4d} {row['params']:13,d} "
                f"{row['forward_gflops_per_image']:10.2f} {fmt('compile_plus_first_step_s', '%10.1f'):>10s} "
                f"{fmt('train_step_median_s', '%8.3f'):>8s} {fmt('images_per_s', '%8.1f'):>8s}",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"backend": jax.default_backend(), "device": dev.device_kind, "rows": rows}, f, indent=2
            )


if __name__ == "__main__":
    main()
