"""Fig. 4 across runs: ``python -m diffseg_jax.analysis.fingerprints --runs DIR... --out DIR``.

Collects the ``analysis/curves.csv`` and ``analysis/model_free.csv`` files under the given folders (written by
``--mode analyse``), and writes ``fingerprints.csv`` (all mask prediction error curves), ``fingerprints.png``
(one panel per dataset against t/T, so SegDiff's T = 100 and the others' T = 1000 share the axis and the
average: each model dotted, their average solid, the model-free curve dashed) and
``fingerprints.md``: per dataset and model, the timestep where the smoothed error first reaches half of its
maximum (``t_half``), the error at the last timestep and how much the smoothed curve still rises over its last
10 % of timesteps (``rise_tail``, a fraction of its range; ``converged`` when at most ``--tol``), the numbers behind
"which dataset loses its mask first" and "which needs a higher final noise level".
"""

from __future__ import annotations

import argparse
import os
from typing import Sequence

import numpy as np

from diffseg_jax import cli, plots, result_files
from diffseg_jax.adaptive import tail_rise
from diffseg_jax.result_files import CSV_COLUMNS, read_rows, write_rows


def find_curves(paths: Sequence[str]) -> list[str]:
    """Every analysis curve CSV at or under ``paths``."""
    return result_files.find_run_files(
        paths, (os.path.join("**", "curves.csv"), os.path.join("**", "model_free.csv"))
    )


def half_rise(t: np.ndarray, values: np.ndarray, smoothing: int) -> int:
    """The first t where the curve, smoothed over ``smoothing`` samples, reaches half of its maximum."""
    v = plots.smooth(values, smoothing)
    return int(t[np.argmax(v >= 0.5 * v.max())])


def summarise(rows: list[dict], smoothing: int, tol: float = 0.02) -> list[dict]:
    """Per (dataset, model, experiment, T): t_half (and ``t_half_frac``, (t_half + 1)/T, comparable across T), the
    error at the first and last timesteps, the rise over the last 10 % of timesteps and whether it has converged
    (rise at most ``tol``); each curve smoothed over ``smoothing`` timesteps, however densely --mode analyse
    sampled it (``analysis.t_step``). T is each curve's (``plots.with_horizon``)."""
    out = []
    for (dataset, model, experiment, curve, horizon), (u, v, _) in sorted(
        plots.fraction_series(rows).items()
    ):
        if curve == "mask_error":
            t = np.rint(u * horizon - 1.0)
            window = plots.samples_in(t, smoothing)
            t_half = half_rise(t, v, window)
            out.append(
                dict(
                    dataset=dataset,
                    model=model,
                    experiment=experiment,
                    num_timesteps=horizon,
                    t_half=t_half,
                    t_half_frac=(t_half + 1) / horizon,
                    error_first=float(v[0]),
                    error_last=float(v[-1]),
                    rise_tail=tail_rise(t, v, window),
                    converged=tail_rise(t, v, window) <= tol,
                )
            )
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, str]:
    """``python -m diffseg_jax.analysis.fingerprints`` with ``argv`` (``--runs`` run folders or curve CSVs,
    ``--out``, ``--smoothing`` in timesteps, ``--tol``): writes Fig. 4 and its table into ``--out``, prints the
    table, and returns the paths written: ``csv`` (the mask_error curves gathered), ``png`` (Fig. 4), ``md``
    (the table printed)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", required=True, help="run folders or curve CSVs")
    parser.add_argument("--out", default="fingerprints", help="output folder")
    parser.add_argument(
        "--smoothing", type=int, default=25, help="moving-average window in timesteps (0 or 1: none)"
    )
    parser.add_argument("--tol", type=float, default=0.02, help="largest final rise of a converged curve")
    args = parser.parse_args(argv)
    if args.smoothing < 0:
        parser.error(f"--smoothing {args.smoothing}: use a window of 0 (none) or more timesteps.")
    # A --runs path that does not exist, or a file that is no curve table: one message, no traceback.
    files = cli.reporting_user_errors(lambda: find_curves(args.runs))
    # T from each file's own grid (plots.with_horizon), before the files' rows are pooled.
    rows = cli.reporting_user_errors(
        lambda: [r for f in files for r in plots.with_horizon(read_rows(f)) if r["curve"] == "mask_error"]
    )
    if not rows:
        raise SystemExit(f"No mask_error curves under {args.runs}; run --mode analyse on E2/E3 runs first.")
    os.makedirs(args.out, exist_ok=True)
    paths = {
        "csv": os.path.join(args.out, "fingerprints.csv"),
        "png": os.path.join(args.out, "fingerprints.png"),
        "md": os.path.join(args.out, "fingerprints.md"),
    }
    write_rows(paths["csv"][:-4], [{k: r[k] for k in CSV_COLUMNS} for r in rows])
    plots.fingerprint_figure(
        [r for f in files for r in result_files.read_rows(f)], paths["png"], args.smoothing
    )
    lines = [
        "| dataset | model | experiment | T | t_half | t_half / T | error at t=0 | error at T-1 | rise over last 10 % "
        "| converged |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {s['dataset']} | {s['model']} | {s['experiment']} | {s['num_timesteps']} | {s['t_half']} | "
        f"{s['t_half_frac']:.3f} | {s['error_first']:.4f} | "
        f"{s['error_last']:.4f} | {s['rise_tail']:.3f} | {'yes' if s['converged'] else 'no'} |"
        for s in summarise(rows, args.smoothing, args.tol)
    ]
    with open(paths["md"], "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return paths


if __name__ == "__main__":
    main()
