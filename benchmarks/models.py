"""Per-architecture parameters, FLOPs, train-step throughput, achieved FLOP/s and memory.

  python benchmarks/models.py                       # tiny configs timed; published configs counted only
  python benchmarks/models.py --time-published      # also time the published configs (use an accelerator)
  python benchmarks/models.py --models ensemdiff,segdiff --dtype bfloat16 --remat --json out.json
  python benchmarks/models.py --sizes published --time-published \
      --models nnunet,ensemdiff,ensemdiff+bfloat16,ensemdiff+remat,medsegdiff,segdiff,segformer

Prints the backend and device, then one row per (architecture, size). FLOPs are XLA's cost analysis: one
forward pass of one image, and one whole train step (forward, backward, optimizer) of the batch; achieved
TFLOP/s = train-step FLOPs / median step time. The step is each architecture's own: E2 with its published
loss for the diffusion models, E1 for the feed-forward references. Compile time (lowering and XLA
compilation of the step) is reported apart from the steady-state median, and the state's set-up apart from
both (host-made weights of the model's shapes, ``common.host_variables``; ``--model-init`` for the model's own
initialisation, compiled). Memory: XLA's analysis of the compiled step (arguments + outputs +
temporaries) and, where the backend exposes it (GPU/TPU), the allocator's peak and what the step added to the
memory in use before it (``common.step_memory``: credited only to the row that raised the process's peak).

A model entry may carry its own variant: ``ensemdiff+bfloat16``, ``ensemdiff+remat``,
``ensemdiff+bfloat16+remat`` (``--dtype`` / ``--remat`` are the default of entries without one), and
``segformer+dwconv`` (SegFormer's depthwise conv as ``nn.Conv``, ``model.depthwise='conv'``, against the
default shifted multiply-adds). Issue 31's forms of the guided-diffusion UNets: ``gnstats``
(``model.norm_impl='stats_float32'``), ``dpa`` / ``cudnn`` (``model.attention_impl``), ``remat_conv`` /
``remat_dots`` (``model.remat_policy``, which turns remat on). ``entry@N`` gives that entry batch N instead of
``--batch`` (``ensemdiff+bfloat16+gnstats@16``). Each timed row also reports the step's TFLOP/s without remat's
recomputation (``model_tflops``) and its percentage of the device's dense peak (``common.peak_tflops``; printed
TFLOP/s are these), and with ``--profile DIR`` the top device ops of a ``jax.profiler`` trace of
``--profile-steps`` more steps (``profiling.py``).

``--compile-workers N`` prepares up to N rows at once in threads (XLA releases the GIL while it compiles), then
times the rows one after another once every compilation has finished, so no compilation (nor the GPU's
convolution autotuning) runs beside a timed step. It pays on a CPU (two published rows prepared on 2 cores in
246.6 s against 401 s one after the other) but not on a GPU: on the H200 (2026-11-28) seven published rows
prepared in 7 threads had one row ready after 420 s, while one at a time EnsemDiff's steps compile in
51-71 s, so ``gpu_check.sh`` prepares them one at a time. Each row's ``compile_s`` is then measured beside
the others' (``compile_concurrency`` in the row says with how many), so it is an upper bound of its compile
time alone. ``--compile-deadline S``: after
S seconds the rows that are ready are timed anyway, beside the compilations still running (marked
``timed_beside_compilation``), and the rest as they come, so one slow compilation under a time limit does
not lose every timing. A row that fails (out of memory, an unsupported op) is reported with its error and
the others go on.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import os
import threading
import time
from typing import Callable

import common
import jax
import jax.numpy as jnp
import numpy as np
import profiling
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from diffseg_jax import build, defaults, distributed, models, train

PUBLISHED_SIZE = 256  # the size the paper's ISIC runs use; MoNuSeg trains on 256 crops too
VARIANT_TOKENS = {
    "float32": ("dtype", "float32"),
    "bfloat16": ("dtype", "bfloat16"),
    "remat": ("remat", True),
    "dwconv": ("depthwise", "conv"),  # SegFormer's depthwise conv as nn.Conv (the default: shifted adds)
    # Issue 31's train-step forms of the guided-diffusion UNets (EnsemDiff, MedSegDiff, SegDiff):
    "dpa": ("attention_impl", "dot_product"),  # jax.nn.dot_product_attention
    "cudnn": ("attention_impl", "cudnn"),  # its cuDNN fused kernel (GPU, bf16, heads <= 256 channels)
    "gnstats": ("norm_impl", "stats_float32"),  # GroupNorm: float32 statistics, applied in the compute dtype
    "remat_conv": ("remat_policy", "conv_outputs"),  # remat keeping the ResBlocks' conv outputs (sets remat)
    "remat_dots": ("remat_policy", "dots"),  # remat keeping every conv and matmul output (sets remat)
}
# Variant keys besides dtype and remat, set only by their tokens.
OTHER_KEYS = ("depthwise", "attention_impl", "norm_impl", "remat_policy")
IMPLICIT = {"dtype": "float32", "remat": False}  # what a model without the config key computes


def parse_entry(entry: str, dtype: str, remat: bool) -> tuple[str, str, bool, tuple]:
    """``'ensemdiff+bfloat16+remat'`` → ``('ensemdiff', 'bfloat16', True, ())``; unmarked entries get the
    defaults ``dtype`` and ``remat``, or what the model computes where its config lacks the key (nnU-Net and
    SegFormer have no ``model.remat``: no remat). The last item holds the other model settings as
    ``(key, value)`` pairs (``'segformer+dwconv'`` → ``(('depthwise', 'conv'),)``). A token whose setting the
    model lacks is an error, so no row is labelled with a variant it did not run."""
    name, *tokens = entry.strip().split("+")
    if name not in models.MODELS:
        raise SystemExit(
            f"--models: unknown architecture {name!r} in {entry!r}; known: {sorted(models.MODELS)}"
        )
    model_keys = defaults.get_config(name).model
    variant = {"dtype": dtype, "remat": remat}
    for token in tokens:
        if token not in VARIANT_TOKENS:
            raise SystemExit(
                f"--models: unknown variant {token!r} in {entry!r}; use {sorted(VARIANT_TOKENS)}"
            )
        key, value = VARIANT_TOKENS[token]
        if key not in model_keys and value != IMPLICIT.get(key):
            raise SystemExit(f"--models: {token!r} in {entry!r} sets model.{key}, which {name} does not have")
        variant[key] = value
        if key == "remat_policy":  # a policy says what remat keeps: it turns remat on
            variant["remat"] = True
    for key, value in IMPLICIT.items():
        if key not in model_keys:
            variant[key] = value
    other = tuple((k, variant[k]) for k in OTHER_KEYS if k in variant)
    return name, variant["dtype"], variant["remat"], other


def split_batch(entry: str, default: int) -> tuple[str, int]:
    """``'ensemdiff+bfloat16@16'`` → ``('ensemdiff+bfloat16', 16)``; an entry without ``@`` gets ``default``
    (``--batch``), so one run can sweep the batch of one architecture."""
    entry, _, batch = entry.strip().partition("@")
    if not batch:
        return entry, default
    if not batch.isdigit() or int(batch) < 1:
        raise SystemExit(f"--models: the batch after '@' in {entry}@{batch} must be a positive integer")
    return entry, int(batch)


def _config(name: str, tiny: bool, dtype: str, remat: bool, other: tuple = ()):
    config = defaults.get_config(f"{name},tiny" if tiny else name)
    for key, value in other:
        config.model[key] = value
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
        lambda v, x, t, c: model.apply(v, x, t, c, train=False, rngs=build.model_rngs(jax.random.PRNGKey(0)))
    )
    return common.hlo_flops(fwd.lower(variables, x, t, cond)) / x.shape[0]


def jitted_step(config, model):
    """The jitted train step of ``model`` as the train loop builds it."""
    optimizer = build.make_optimizer(config.train)
    return train.jit_train_step(
        train.make_train_step(model, optimizer, build.build_schedule(config.diffusion), config),
        distributed.data_mesh(),
    )


def step_and_inputs(config, model, variables, batch: int):
    """(the jitted train step as the train loop builds it, its replicated state, a random sharded batch)."""
    size, ch = config.data.image_size, config.data.image_channels
    optimizer = build.make_optimizer(config.train)
    state = jax.jit(lambda v: build.create_train_state(v, optimizer, jax.random.PRNGKey(1)))(variables)
    mesh = distributed.data_mesh()
    # Replicated as the train loop places it: the step's output sharding, so the compiled step takes its own
    # output back (the AOT executable `prepare` compiles refuses anything else instead of recompiling quietly).
    state = jax.device_put(state, NamedSharding(mesh, P()))
    step = jitted_step(config, model)
    rng = np.random.default_rng(0)
    batch_np = {
        "image": rng.random((batch, size, size, ch), np.float32),
        "mask": (rng.random((batch, size, size, 1)) > 0.5).astype(np.float32),
    }
    return step, state, distributed.shard_batch(batch_np, mesh)


def prepare(
    name: str,
    tiny: bool,
    batch: int,
    time_it: bool,
    dtype: str,
    remat: bool,
    model_init: bool = False,
    other: tuple = (),
    profile: str | None = None,
    profile_steps: int = 3,
) -> tuple[dict, Callable[[int], None] | None]:
    """(the row's counts, and a function that times the compiled step and adds its figures) — None if untimed.

    The state starts from ``common.host_variables`` unless ``model_init`` (the model's own initialisation).
    ``other``: further ``(key, value)`` model settings (:func:`parse_entry`). With ``profile`` (a directory),
    the timed row then traces ``profile_steps`` more steps there and prints and records the top device ops
    (``profiling.py``).
    """
    config = _config(name, tiny, dtype, remat, other)
    size, ch = config.data.image_size, config.data.image_channels
    model = build.build_model(config.model, build.output_channels(config, ch), size)
    x = jnp.zeros((1, size, size, 1))
    cond = jnp.zeros((1, size, size, ch))
    t = jnp.zeros((1,), jnp.int32)
    abstract = common.abstract_variables(model, size, ch)
    row = {
        "model": name,
        "size": "tiny" if tiny else "published",
        "image_size": size,
        "dtype": dtype,
        "remat": remat,
        **dict(other),
        "params": models.param_count(abstract["params"]),
        "batch": batch,
    }
    variables = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), dict(abstract))
    row["forward_gflops_per_image"] = _forward_flops(model, variables, x, t, cond) / 1e9
    if not time_it:
        return row, None
    t0 = time.perf_counter()
    if model_init:
        variables = jax.jit(
            lambda: build.init_variables(
                model, jax.random.PRNGKey(0), (1, size, size, 1), (1, size, size, ch)
            )
        )()
    else:
        variables = common.host_variables(abstract)  # an argument, not a constant folded into the program
    step, state, device_batch = step_and_inputs(config, model, variables, batch)
    common.block(state)
    row["init_s"] = time.perf_counter() - t0  # the state's set-up (and its compilation)
    t0 = time.perf_counter()
    lowered = step.lower(state, device_batch)
    compiled = lowered.compile()
    row["compile_s"] = time.perf_counter() - t0
    row["train_step_gflops"] = common.hlo_flops(lowered) / 1e9
    # The step's own FLOPs, without what remat computes twice: what the percentage of the peak counts.
    row["model_gflops"] = row["train_step_gflops"]
    if remat:
        plain = _config(name, tiny, dtype, False, other)
        plain_model = build.build_model(plain.model, build.output_channels(plain, ch), size)
        row["model_gflops"] = (
            common.hlo_flops(jitted_step(plain, plain_model).lower(state, device_batch)) / 1e9
        )
    row["xla_memory_gib"] = common.memory_gib(compiled)
    holder = {"state": state}

    def one_step():
        holder["state"], metrics = compiled(holder["state"], device_batch)
        return metrics["loss"]

    def run(repeats: int) -> None:
        before = common.device_memory()
        row["first_step_s"], row["train_step_median_s"] = common.timed(one_step, repeats)
        row["images_per_s"] = batch / row["train_step_median_s"]
        row["achieved_tflops"] = row["train_step_gflops"] / row["train_step_median_s"] / 1e3
        row["model_tflops"] = row["model_gflops"] / row["train_step_median_s"] / 1e3
        peak = common.peak_tflops(jax.devices()[0].device_kind, dtype)
        row["percent_of_peak"] = None if peak is None else 100 * row["model_tflops"] / peak
        row["last_loss"] = float(one_step())  # a finite loss: the timed steps computed something real
        row.update(common.step_memory(before, common.device_memory()))
        if profile:
            label = f"{name}_{row['size']}_{variant_label(row)}_b{batch}"
            path, wall = profiling.trace_calls(one_step, profile_steps, os.path.join(profile, label))
            top = profiling.top_ops(path)
            row["profile"] = {"trace": path, "steps": profile_steps, "wall_s": wall, **top}
            profiling.print_top_ops(top, profile_steps, wall, f"{name} {variant_label(row)} batch {batch}")
        holder.clear()  # the state's device memory goes before the next row is timed

    return row, run


def _pending(spec: tuple[str, str, bool, tuple, bool], batch: int) -> dict:
    """The row of ``spec`` = (name, dtype, remat, other settings, tiny) before it is prepared."""
    name, dtype, remat, other, tiny = spec
    size = "tiny" if tiny else "published"
    return {
        "model": name,
        "size": size,
        "dtype": dtype,
        "remat": remat,
        **dict(other),
        "batch": batch,
        "pending": True,
    }


def _failed(spec: tuple[str, str, bool, tuple, bool], batch: int, error: BaseException) -> dict:
    """The row of ``spec`` that raised ``error``."""
    msg = f"{type(error).__name__}: {error}".splitlines()[0][:300]
    print(f"{spec[0]}: FAILED — {msg}", flush=True)
    return {**_pending(spec, batch), "pending": False, "error": msg}


def variant_label(row: dict) -> str:
    """``'float32'``, ``'bfloat16+remat'``, ``'float32+dwconv'``: a row's dtype and the tokens that made it."""
    label = row["dtype"] + ("+remat" if row.get("remat") else "")
    for token, (key, value) in VARIANT_TOKENS.items():
        if key in OTHER_KEYS and row.get(key) == value:
            label += "+" + token
    return label


def _print_row(row: dict) -> None:
    if "error" in row:
        return
    fmt = lambda k, f: (f % row[k]) if row.get(k) is not None else "-"  # noqa: E731
    label = variant_label(row)
    print(
        f"{row['model']:15s} {row['size']:9s} {row['image_size']:4d} {label:24s} {row['batch']:5d} "
        f"{row['params']:12,d} {row['forward_gflops_per_image']:7.1f} "
        f"{fmt('train_step_gflops', '%8.1f'):>8s} "
        f"{fmt('compile_s', '%8.1f'):>8s} {fmt('train_step_median_s', '%7.3f'):>7s} "
        f"{fmt('images_per_s', '%7.1f'):>7s} {fmt('model_tflops', '%8.2f'):>8s} "
        f"{fmt('percent_of_peak', '%5.1f'):>5s} {fmt('xla_memory_gib', '%8.2f'):>8s}",
        flush=True,
    )


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
    parser.add_argument(
        "--model-init",
        action="store_true",
        help="start from the model's own initialisation (compiled: slow on GPU) instead of host-made weights",
    )
    parser.add_argument("--compile-workers", type=int, default=1, help="rows prepared at once (threads)")
    parser.add_argument(
        "--compile-deadline",
        type=float,
        default=None,
        help="seconds after which the compiled rows are timed even if others still compile (default: wait)",
    )
    parser.add_argument(
        "--profile",
        default=None,
        metavar="DIR",
        help="after timing each row, trace --profile-steps more steps with jax.profiler into DIR/<row> and "
        "print the top device ops",
    )
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    print(common.device_line(), flush=True)
    xla_flags = os.environ.get("XLA_FLAGS", "").strip()
    if xla_flags:  # read once per process: what the rows below ran under
        print(f"XLA_FLAGS: {xla_flags}", flush=True)
    entries = [split_batch(entry, args.batch) for entry in args.models.split(",")]
    sizes = args.sizes.split(",")
    specs = [
        (*parse_entry(entry, args.dtype, args.remat), size == "tiny")
        for entry, _ in entries
        for size in sizes
    ]
    batches = [batch for _, batch in entries for _ in sizes]  # entry@N: this entry's batch
    # Every row is in the JSON from the start, marked pending until prepared: if a time limit kills the run,
    # the file still says which rows never finished compiling.
    rows: list[dict] = [_pending(spec, batch) for spec, batch in zip(specs, batches)]
    common.write_json(
        args.json, rows, batch=args.batch, compile_workers=args.compile_workers, xla_flags=xla_flags
    )
    lock = threading.Lock()

    def record(i: int, row: dict) -> None:
        with lock:
            rows[i] = row
            common.write_json(
                args.json, rows, batch=args.batch, compile_workers=args.compile_workers, xla_flags=xla_flags
            )

    def prepare_one(i: int):
        name, dtype, remat, other, tiny = specs[i]
        try:
            row, run = prepare(
                name,
                tiny,
                batches[i],
                tiny or args.time_published,
                dtype,
                remat,
                args.model_init,
                other,
                args.profile,
                args.profile_steps,
            )
        except Exception as error:  # noqa: BLE001 — one failing row must not lose the others
            record(i, _failed(specs[i], batches[i], error))
            return None
        row["compile_concurrency"] = min(args.compile_workers, len(specs))
        record(i, row)
        if args.compile_workers > 1 and run is not None:
            print(f"compiled {name} {row['size']}: init {row['init_s']:.1f} s, step {row['compile_s']:.1f} s")
        return run

    def time_one(i: int, run) -> None:
        if run is None:
            return
        try:
            run(args.repeats)
        except Exception as error:  # noqa: BLE001
            record(i, {**rows[i], **_failed(specs[i], batches[i], error)})
            return
        record(i, rows[i])

    header = (
        f"{'model':15s} {'size':9s} {'px':>4s} {'variant':24s} {'batch':>5s} {'params':>12s} {'GF/img':>7s} "
        f"{'GF/step':>8s} {'compile':>8s} {'step s':>7s} {'img/s':>7s} {'TFLOP/s':>8s} {'%peak':>5s} "
        f"{'XLA GiB':>8s}"
    )
    if args.compile_workers <= 1:
        print(header)
        for i in range(len(specs)):
            time_one(i, prepare_one(i))
            _print_row(rows[i])
        return
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.compile_workers) as pool:
        futures = {pool.submit(prepare_one, i): i for i in range(len(specs))}
        ready, pending = concurrent.futures.wait(futures, timeout=args.compile_deadline)
        if pending:
            print(
                f"{len(pending)} of {len(specs)} rows still compiling after {args.compile_deadline:.0f} s: "
                "timing each row as it is ready, beside the compilations still running (timed_beside_compilation)",
                flush=True,
            )
        else:
            print(f"all {len(specs)} rows prepared in {time.perf_counter() - t0:.1f} s", flush=True)
        print(header)
        # The ready rows in order, then each late one as it comes (a lazy chain: a list would wait for all).
        for future in itertools.chain(
            sorted(ready, key=futures.get), concurrent.futures.as_completed(pending)
        ):
            i, run = futures[future], future.result()
            if run is not None:
                rows[i]["timed_beside_compilation"] = any(not f.done() for f in futures)
            time_one(i, run)
            _print_row(rows[i])


if __name__ == "__main__":
    main()
