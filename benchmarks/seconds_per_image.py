"""Seconds per segmented image of trained runs, as their evaluation samples them (issue 33's cost column).

  python benchmarks/seconds_per_image.py --runs runs/table1                   # every trained run under it
  python benchmarks/seconds_per_image.py --runs runs/e2 --samplers ddim10,ddpm --images 32

For each trained run (a folder with ``config.json`` and ``checkpoints/``; folders are searched), the run's own
evaluation is timed: its config as recorded (``configs/from_run.py``), its weights (``eval.step``, default the
latest), its test images (the first ``--images``; default one evaluation batch), and ``sampling.ensemble_maps`` with the run's ensemble,
sampler, η, member chunk, tiling and self-conditioning, compiled once. A variant's real cost is in it: BerDiff's
sampler step, the self-conditioning input, SegDiff's tiles. The first call (compilation included) is reported
apart from the median of ``--repeats`` further calls (``common.timed``). ``--samplers`` re-times every diffusion
run (E1 has one pass) with each listed sampler ('ddpm', 'ddim<K>') instead of its own.

The rows are per image, members included: one image costs ``ensemble_size`` × calls per member network calls (a
MoNuSeg image cut into tiles costs that per tile). On a CPU pin the process (``taskset -c 0``): XLA:CPU runs
one process's convolutions on about one core.
"""

from __future__ import annotations

import argparse
import os

import common
import numpy as np

from configs import from_run
from diffseg_jax import (
    configlib,
    data,
    learning_curves,
    objectives,
    planning,
    restore,
    sampling,
    table1,
    variants,
)

COLUMNS = (
    "run",
    "experiment",
    "process",
    "prediction",
    "self_condition",
    "sampler",
    "members",
    "calls_per_member",
    "images",
    "first_s",
    "s_per_image",
)


def trained_runs(paths: list[str]) -> list[str]:
    """The trained runs at or under ``paths`` (folders holding ``config.json`` and ``checkpoints/``), sorted."""
    found = []
    for path in paths:
        if not os.path.isdir(path):
            raise SystemExit(f"--runs {path}: no such folder.")
        for root, dirs, files in os.walk(path):
            if "config.json" in files and "checkpoints" in dirs:
                found.append(root)
                dirs[:] = []  # below a run only its own phases (a protocol's select/), not other variants
    if not found:
        raise SystemExit(f"No trained run (config.json + checkpoints/) under {paths}; train one first.")
    return sorted(found)


def time_run(workdir: str, images: int, repeats: int, sampler: str | None = None) -> tuple[dict, np.ndarray]:
    """One row of the table for the run in ``workdir`` (``sampler``: 'ddpm' or 'ddim<K>' instead of the
    run's own), and the ensemble mean it sampled (the same maps ``--mode evaluate`` gives those images)."""
    config = from_run.get_config(workdir)
    if sampler and config.experiment != "e1":
        config.eval.sampler, config.eval.ddim_steps = table1.parse_sampler(sampler)
    config = planning.prepare(config, workdir, "evaluate")
    if images <= 0:  # one evaluation batch (eval.batch_size counts tiles where images are cut into tiles)
        images = max(1, config.eval.batch_size // sampling.tiles_per_image(config.data))
    test = data.eval_arrays(config.data, split="test", max_examples=images)
    channels = test["image" if config.experiment == "e4" else "mask"].shape[-1]
    model, schedule, step, variables = restore.trained_network(config, workdir, test["image"].shape[-1])
    ensemble = sampling.ensemble_fn(config, model, schedule)

    def run(batch):
        return sampling.ensemble_maps(
            config,
            model,
            schedule,
            variables,
            batch,
            step,
            x_channels=channels,
            what="time",
            ensemble=ensemble,
        )

    maps = []  # the last call's (mean, std)
    first, median = common.timed(lambda: maps.append(run(test["image"])), repeats)
    mean = maps[-1][0]
    calls = variants.network_calls(
        {
            "experiment": config.experiment,
            "sampler": config.eval.sampler,
            "ddim_steps": config.eval.ddim_steps,
        },
        {"diffusion.num_timesteps": config.diffusion.num_timesteps},
    )
    row = {
        "run": workdir,
        "experiment": config.experiment,
        "process": config.diffusion.process,
        "prediction": objectives.prediction_of(config),  # 'logits' for E1, the resolved target otherwise
        "self_condition": bool(config.objective.self_condition),
        "sampler": "-"
        if config.experiment == "e1"
        else learning_curves.sampler_label(config.eval.sampler, config.eval.ddim_steps),
        "members": config.eval.ensemble_size,
        "calls_per_member": calls,
        "images": len(test["image"]),
        "first_s": first,
        "s_per_image": median / len(test["image"]),
    }
    return row, mean


def markdown(rows: list[dict]) -> str:
    head = (
        "| run | exp. | process | prediction | self-cond. | sampler | members | calls/member | images "
        "| first call (s) | s/image |"
    )
    lines = [head, "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['experiment']} | {r['process']} | {r['prediction']} | {r['self_condition']} | "
            f"{r['sampler']} | {r['members']} | {r['calls_per_member']} | {r['images']} | {r['first_s']:.1f} | "
            f"{r['s_per_image']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", nargs="+", required=True, help="trained runs, or folders of them (grids)")
    parser.add_argument(
        "--images",
        type=int,
        default=0,
        help="test images timed per run (default 0: one evaluation batch, eval.batch_size; a number that is not "
        "a multiple of it times a padded last batch, as the evaluation pays for it)",
    )
    parser.add_argument("--repeats", type=int, default=2, help="timed calls after the compiling one (median)")
    parser.add_argument(
        "--samplers", default="", help="comma-separated 'ddpm'/'ddim<K>' to time each diffusion run with"
    )
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    samplers = [s for s in args.samplers.split(",") if s] or [None]
    for s in samplers:
        try:
            if s:
                table1.parse_sampler(s)  # a misspelt sampler fails before any run is loaded
        except configlib.ConfigError as e:
            raise SystemExit(
                f"--samplers: {s!r} is not a sampler; use 'ddpm' (all T steps) or 'ddim<K>' (K steps), comma-"
                "separated, e.g. --samplers ddim10,ddpm."
            ) from e
    print(common.device_line())
    rows = []
    for workdir in trained_runs(args.runs):
        for s in samplers:
            row, _ = time_run(workdir, args.images, args.repeats, s)
            rows.append(row)
            common.write_json(args.json, rows)  # after every row: a time limit loses nothing done
            print(
                f"{row['run']}: {row['sampler']} × {row['members']} members, {row['s_per_image']:.3f} s/image "
                f"(first call {row['first_s']:.1f} s)",
                flush=True,
            )
            if row["experiment"] == "e1":
                break  # one pass whatever the sampler
    print(markdown(rows))
    return rows


if __name__ == "__main__":
    main()
