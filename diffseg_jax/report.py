"""Table 1 (and Fig. 1) of the paper from evaluated runs: ``python -m diffseg_jax.report --runs DIR... --out DIR``.

Collects every ``eval/metrics.json`` under the given folders (a workdir, its ``eval/`` folder, or a folder of
many runs) and writes ``table1.md``, ``table1.csv`` and ``table1.tex``: one row per dataset and method, the
feed-forward (E1) IoU and ECE, the diffusion (E2) IoU and ECE, and their difference (diffusion −
feed-forward), formatted as the paper (IoU in %, ECE to three decimals); where both runs of a cell kept their
``ensemble.npz``, each difference carries its 95 % paired-bootstrap interval over the test images
(:func:`compare`). A cell without a run stays blank. Several runs for one cell that differ only in ``seed``
(their ``config.json`` beside ``eval/`` says so; :data:`REPEAT_KEYS`) are repeats, beyond the paper's single
runs: the cell is their mean ± standard deviation (n), and a difference between two repeated cells carries the
95 % Welch interval over the runs, which counts the training's randomness that the bootstrap over images does
not; runs for one cell that differ in anything else are an error naming both and the keys. The IoU and ECE are
the ``iou``/``ece`` of each metrics.json, i.e. its ``eval.pooling``; runs pooled differently, or averaging
soft and hard members (``eval.member_output``), are not mixed in one table. Beyond the paper,
``uncertainty.{md,csv}``: per run (per seed for repeats), how well its std and entropy maps point at its
errors (``metrics.json``'s ``uncertainty`` block), and ``reliability.png``: the reliability diagram behind
each ECE, a panel per cell with its feed-forward and diffusion runs. ``--compare EVAL_DIR...`` draws Fig. 1 of
evaluated runs (their ``eval/`` folders or their workdirs) and writes ``comparison.json`` and their
reliability diagrams in ``comparison_reliability.png`` (:func:`write_comparison`) from their ``ensemble.npz``,
without sampling again. Runs evaluated at several kept steps (``diffseg_jax.table1`` with ``table.eval_steps``) also
give ``learning_curves.{md,csv,png}``: IoU, ECE and the std map's error AUROC against the training step per run
and sampler (:func:`collect_learning_curves`).
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Sequence

from diffseg_jax import collection, comparison, learning_curves, result_files


def uncertainty_markdown(rows: list[dict[str, Any]]) -> str:
    """The uncertainty table as Markdown: IoU and error pixels in %, the scores to three decimals; 'image ρ' is
    the Spearman correlation of an image's mean uncertainty with its 1 − IoU."""
    header = (
        "| Dataset | Method | Kind | IoU ↑ | Brier ↓ | error pixels | mean std | std: error AUROC ↑ | std: UEO ↑ "
        "| std: image ρ ↑ | entropy: error AUROC ↑ | entropy: UEO ↑ | entropy: image ρ ↑ |"
    )
    lines = [header, "|" + "---|" * 13]
    last = None
    for r in rows:
        dataset = collection.DATASETS.get(r["dataset"], r["dataset"])
        cells = [dataset if dataset != last else "", collection.METHODS.get(r["method"], r["method"])]
        kind = {"ff": "FF", "diff": "Diff"}[r["kind"]]
        cells.append(kind if r.get("seed") is None else f"{kind} (seed {r['seed']})")
        cells += [f"{100 * r['iou']:.2f}", f"{r['brier']:.3f}", f"{100 * r['error_fraction']:.1f} %"]
        cells += [
            "" if r[c] is None else f"{r[c]:.3f}"
            for c in collection.UNCERTAINTY_COLUMNS[collection.UNCERTAINTY_COLUMNS.index("mean_std") :]
        ]
        lines.append("| " + " | ".join(cells) + " |")
        last = dataset
    return "\n".join(lines) + "\n"


def _fmt(column: str, value: float | None) -> str:
    """The paper's formatting: IoU in % with 2 decimals, ECE with 3, differences signed."""
    if value is None:
        return ""
    if column.endswith("iou"):
        return f"{100 * value:+.2f}" if column.startswith("delta") else f"{100 * value:.2f}"
    return f"{value:+.3f}" if column.startswith("delta") else f"{value:.3f}"


def _display(rows: list[dict[str, Any]]) -> list[list[str]]:
    """Table cells; a difference with its interval reads '+0.53 [-0.21, +1.30]', a repeated cell its mean,
    standard deviation and number of runs: '86.39 ± 0.41 (3)'."""
    out, last = [], None
    for row in rows:
        dataset = collection.DATASETS.get(row["dataset"], row["dataset"])
        cells = [_fmt(c, row[c]) for c in collection.COLUMNS[2:]]
        for i, column in enumerate(collection.COLUMNS[2:6]):
            std, n = row.get(f"{column}_std"), row.get(f"{column.split('_')[0]}_n")
            if std is not None:
                cells[i] += f" ± {_fmt(column, std)} ({n})"
        for i, name in ((4, "delta_iou"), (5, "delta_ece")):
            low, high = row.get(f"{name}_ci_low"), row.get(f"{name}_ci_high")
            if low is not None and high is not None:
                cells[i] += f" [{_fmt(name, low)}, {_fmt(name, high)}]"
        out.append(
            [dataset if dataset != last else "", collection.METHODS.get(row["method"], row["method"])] + cells
        )
        last = dataset
    return out


def markdown(rows: list[dict[str, Any]]) -> str:
    """Table 1 as a Markdown table."""
    header = "| Dataset | Method | FF IoU ↑ | FF ECE ↓ | Diff IoU ↑ | Diff ECE ↓ | Δ IoU | Δ ECE |"
    lines = [header, "|" + "---|" * 8]
    lines += ["| " + " | ".join(r) + " |" for r in _display(rows)]
    if any(row.get(f"{kind}_n") and row[f"{kind}_n"] > 1 for row in rows for kind in ("ff", "diff")):
        lines += ["", REPEATS_NOTE]
    return "\n".join(lines) + "\n"


REPEATS_NOTE = (
    "x ± s (n): mean and standard deviation of n runs that differ only in their seed; a difference between "
    "two such cells comes with the 95 % Welch interval over the runs, one between single runs with the 95 % "
    "paired-bootstrap interval over the test images."
)


def latex(rows: list[dict[str, Any]]) -> str:
    """Table 1 as a LaTeX ``tabular`` (booktabs), grouped headers as in the paper."""
    lines = [
        r"\begin{tabular}{llrrrrrr}",
        r"\toprule",
        r" & & \multicolumn{2}{c}{Feed-forward} & \multicolumn{2}{c}{Diffusion} & \multicolumn{2}{c}{Difference} \\",
        r"\cmidrule(lr){3-4}\cmidrule(lr){5-6}\cmidrule(lr){7-8}",
        r"Dataset & Method & IoU $\uparrow$ & ECE $\downarrow$ & IoU $\uparrow$ & ECE $\downarrow$ & IoU & ECE \\",
        r"\midrule",
    ]
    for r in _display(rows):
        cells = (c.replace("_", r"\_").replace("%", r"\%").replace("±", r"$\pm$") for c in r)
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def write(
    rows: list[dict[str, Any]],
    out_dir: str,
    uncertainty: list[dict[str, Any]] | None = None,
    reliability: list[tuple[str, list[tuple[str, dict]]]] | None = None,
) -> dict[str, str]:
    """Writes table1.{md,csv,tex} into ``out_dir``, uncertainty.{md,csv} when ``uncertainty`` rows
    (:func:`collect_uncertainty`) are given and reliability.png when ``reliability`` panels
    (:func:`collect_reliability`) are; returns their paths. The CSVs keep full precision."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {ext: os.path.join(out_dir, f"table1.{ext}") for ext in ("md", "csv", "tex")}
    with open(paths["md"], "w", encoding="utf-8") as f:
        f.write(markdown(rows))
    with open(paths["tex"], "w", encoding="utf-8") as f:
        f.write(latex(rows))
    result_files.write_csv(
        rows, collection.COLUMNS + collection.INTERVAL_COLUMNS + collection.REPEAT_COLUMNS, paths["csv"]
    )
    if uncertainty:
        paths["uncertainty_md"] = os.path.join(out_dir, "uncertainty.md")
        paths["uncertainty_csv"] = os.path.join(out_dir, "uncertainty.csv")
        with open(paths["uncertainty_md"], "w", encoding="utf-8") as f:
            f.write(uncertainty_markdown(uncertainty))
        result_files.write_csv(uncertainty, collection.UNCERTAINTY_COLUMNS, paths["uncertainty_csv"])
    if reliability:
        from diffseg_jax import plots  # noqa: PLC0415 — matplotlib only when drawing

        paths["reliability"] = os.path.join(out_dir, "reliability.png")
        plots.reliability_figure(reliability, paths["reliability"])
    return paths


def main(argv: Sequence[str] | None = None) -> dict[str, str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs",
        nargs="+",
        help="workdirs, eval/ folders, or folders of runs; runs of one cell that differ only in their seed are "
        "averaged (mean ± std, Welch intervals)",
    )
    parser.add_argument(
        "--compare",
        nargs="+",
        metavar="EVAL_DIR",
        help="evaluated runs' eval/ folders or workdirs (e.g. a diffusion and a feed-forward run): Fig. 1 "
        "and comparison.json into --out, from their ensemble.npz, nothing sampled again",
    )
    parser.add_argument(
        "--num_images", type=int, default=4, help="--compare: rows of figure1.png (default 4)"
    )
    parser.add_argument("--out", default="table1", help="output folder (default: ./table1)")
    args = parser.parse_args(argv)
    if not (args.runs or args.compare):
        parser.error("give --runs (Table 1) and/or --compare (Fig. 1 and comparison.json).")
    paths = {}
    if args.compare:
        paths.update(comparison.write_comparison(args.compare, args.out, args.num_images))
        with open(paths["comparison"], encoding="utf-8") as f:
            print(f.read())
    if not args.runs:
        print("wrote " + ", ".join(paths.values()))
        return paths
    found = collection.tables(args.runs)
    if not found["rows"]:
        raise SystemExit(
            f"No E1/E2 eval/metrics.json under {args.runs}; evaluate runs first (--mode evaluate)."
        )
    paths.update(write(found["rows"], args.out, found["uncertainty"], found["reliability"]))
    curves = learning_curves.collect_learning_curves(args.runs)
    if any(r["step"] != curves[0]["step"] for r in curves):  # evaluations at more than one step
        paths.update(learning_curves.write_learning_curves(curves, args.out))
        print(learning_curves.learning_curves_markdown(curves))
    print(markdown(found["rows"]))
    if found["uncertainty"]:
        print(uncertainty_markdown(found["uncertainty"]))
    print("wrote " + ", ".join(paths.values()))
    return paths


if __name__ == "__main__":
    from diffseg_jax import cli

    # Its refusals (duplicate cells, mixed poolings, a corrupt metrics.json, no shared images) are ValueErrors.
    cli.reporting_user_errors(main, also=(ValueError,))
