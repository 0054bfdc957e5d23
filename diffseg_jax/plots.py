"""Figures, drawn from arrays already computed (never recomputing a model)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from diffseg_jax.diffusion import timesteps  # noqa: E402


def ensemble_figure(
    images: np.ndarray,
    masks: np.ndarray | None,
    mean: np.ndarray,
    std: np.ndarray,
    path: str,
    generated: bool = False,
) -> None:
    """Rows of image / ground truth / ensemble mean / ensemble std (Fig. 1 of the paper) saved to ``path``.

    With ``generated`` (E4) the mean/std columns are of generated images rather than masks; without ``masks``
    (images segmented by ``--mode predict``) the ground-truth column is left out.
    """
    n = len(images)
    titles = ["image", "ground truth", "ensemble mean", "ensemble std"]
    if masks is None:
        del titles[1]
    fig, axes = plt.subplots(n, len(titles), figsize=(2 * len(titles), 2 * n + 0.4), squeeze=False)
    for row in range(n):
        panels = [images[row], *([] if masks is None else [masks[row, ..., 0]]), mean[row], std[row]]
        for col, panel in enumerate(panels):
            ax = axes[row, col]
            panel = np.asarray(panel)
            if panel.ndim == 3 and panel.shape[-1] == 1:
                panel = panel[..., 0]
            if col == len(titles) - 1:
                im = ax.imshow(panel if panel.ndim == 2 else panel.mean(-1), cmap="magma", vmin=0)
                fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
            elif panel.ndim == 2:
                ax.imshow(panel, cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(np.clip(panel, 0, 1))
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                mapped = titles[col].startswith("ensemble")
                ax.set_title(("generated " if generated and mapped else "") + titles[col], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


_KIND = {"e1": "feed-forward", "e2": "diffusion", "e3": "mask prediction", "e4": "generation"}


def run_name(meta: dict) -> str:
    """'<model> <kind of training>' of an evaluated run from its ``metrics.json``, with the sampler where one
    was run (e.g. 'segdiff diffusion, ddim-10'; E1's members are one forward pass)."""
    name = f"{meta.get('model', '?')} {_KIND.get(meta.get('experiment'), meta.get('experiment', ''))}"
    sampler = meta.get("sampler")
    if meta.get("experiment") == "e1" or sampler is None:
        return name
    return f"{name}, {sampler}" + (
        f"-{meta['ddim_steps']}" if sampler == "ddim" and meta.get("ddim_steps") else ""
    )


def comparison_figure(evaluations: tuple, path: str, num_images: int = 4) -> None:
    """Fig. 1 of the paper from evaluated runs: image, ground truth, then mean and std of each run.

    ``eval_dirs`` are ``<workdir>/eval`` folders with ``ensemble.npz`` and ``metrics.json``, or those workdirs
    (e.g. a diffusion and a feed-forward run on the same test set); the rows are the first ``num_images`` ids
    they share, and the std colour scale is shared across runs so the spreads compare directly.
    ``evaluations``: what :func:`read_evaluations` already read of them, not read again.
    """
    runs, rows = evaluations
    rows = rows[:num_images]
    vmax = max(float(r["std"].max()) for r, _ in runs) or 1.0
    ncols = 2 + 2 * len(runs)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(2 * ncols, 2 * len(rows) + 0.5), squeeze=False)
    first = runs[0][0]
    for row, index in enumerate(rows):
        panels = [
            (first["image"][index[0]] / 255.0, "image", None),
            (first["mask"][index[0], ..., 0], "ground truth", None),
        ]
        for (r, meta), j in zip(runs, index):
            name = run_name(meta).replace(", ", "\n")  # the sampler on a line of its own
            panels += [
                (r["mean"][j, ..., 0], f"{name}\nmean", "gray"),
                (r["std"][j, ..., 0], f"{name}\nstd", "magma"),
            ]
        for col, (panel, title, cmap) in enumerate(panels):
            ax = axes[row, col]
            if cmap == "magma":
                im = ax.imshow(panel, cmap="magma", vmin=0, vmax=vmax)
            elif np.ndim(panel) == 2:
                ax.imshow(panel, cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(np.clip(panel, 0, 1))
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=8)
    fig.colorbar(im, ax=axes[:, -1].tolist(), fraction=0.046, pad=0.04)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def reliability_points(bins: dict) -> dict[str, np.ndarray | float]:
    """The non-empty bins of a reliability diagram and the ECE they imply.

    ``bins`` is :func:`diffseg_jax.metrics.calibration_bins`' output or ``metrics.json``'s ``reliability``
    (per bin the mean confidence, the accuracy and the pixel count). Returns, for the bins that hold pixels,
    ``confidence``, ``accuracy`` and ``share`` (their fraction of all pixels), and ``ece``, the share-weighted
    gap |accuracy - confidence|: the pooled ECE of :func:`diffseg_jax.metrics.expected_calibration_error`.
    """
    count = np.asarray(bins["count"], np.float64)
    if count.sum() <= 0:
        raise ValueError(f"A reliability diagram needs pixels; every bin is empty: {bins}")
    keep = count > 0
    conf = np.asarray(bins["confidence"], np.float64)[keep]
    acc = np.asarray(bins["accuracy"], np.float64)[keep]
    share = count[keep] / count.sum()
    return {
        "confidence": conf,
        "accuracy": acc,
        "share": share,
        "ece": float(np.sum(share * np.abs(acc - conf))),
    }


def reliability_figure(panels: list[tuple[str, list[tuple[str, dict]]]], path: str, ncols: int = 5) -> None:
    """Reliability diagrams: per panel ``(title, [(label, bins), ...])`` one line per run.

    Above, the observed foreground fraction against the mean predicted foreground probability of each
    non-empty bin (on the diagonal: calibrated; below it: over-confident in foreground), the label carrying
    the ECE; below, each bin's share of the pixels on a log scale (most pixels sit in the extreme bins, which
    is why a pooled ECE is small). ``bins`` as :func:`reliability_points`.
    """
    if not panels:
        raise ValueError("No reliability diagrams to draw: evaluate E1/E2 runs first (--mode evaluate).")
    ncols = min(ncols, len(panels))
    nrows = -(-len(panels) // ncols)
    fig = plt.figure(figsize=(3.2 * ncols, 3.9 * nrows))
    grid = fig.add_gridspec(2 * nrows, ncols, height_ratios=[3, 1] * nrows, hspace=0.08)
    for i, (title, series) in enumerate(panels):
        row, col = divmod(i, ncols)
        top = fig.add_subplot(grid[2 * row, col])
        bottom = fig.add_subplot(grid[2 * row + 1, col], sharex=top)
        top.plot([0, 1], [0, 1], "--", color="gray", lw=0.8)
        for label, bins in series:
            pts = reliability_points(bins)
            (line,) = top.plot(
                pts["confidence"], pts["accuracy"], "o-", ms=3, label=f"{label} (ECE {pts['ece']:.4f})"
            )
            bottom.plot(pts["confidence"], pts["share"], "o-", ms=2, color=line.get_color())
        top.set_xlim(0, 1)
        top.set_ylim(0, 1)
        top.set_title(title, fontsize=9)
        top.legend(fontsize=7, loc="upper left")
        top.tick_params(labelbottom=False)
        bottom.set_yscale("log")
        bottom.set_xlabel("mean predicted foreground probability", fontsize=8)
        if col == 0:
            top.set_ylabel("observed foreground fraction", fontsize=8)
            bottom.set_ylabel("pixel share", fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average over ``window`` samples (``diffusion.timesteps.moving_average``).

    How the curves of Figs. 3 and 4 are smoothed here (the paper says only "smoothed"); ``window <= 1`` is none.
    """
    return timesteps.moving_average(values, window)


def samples_in(t: np.ndarray, timesteps: int) -> int:
    """How many samples of a curve on the grid ``t`` span ``timesteps`` (at least 1): a window given in
    timesteps smooths a curve sampled every t_step-th t as much as one sampled at every t."""
    spacing = float(np.median(np.diff(t))) if len(t) > 1 else 1.0
    return max(1, round(timesteps / max(spacing, 1.0)))


def with_horizon(rows: list[dict]) -> list[dict]:
    """``rows`` of one curve file, each given ``T``, its process's number of timesteps: the largest t of its
    (dataset, model, experiment, curve) plus one (``--mode analyse``'s grid always ends at T - 1). A ``T`` a row
    has already is kept."""
    last: dict[tuple, int] = {}
    for r in rows:
        key = (r["dataset"], r["model"], r["experiment"], r["curve"])
        last[key] = max(last.get(key, -1), int(r["t"]))
    return [
        r if "T" in r else dict(r, T=last[(r["dataset"], r["model"], r["experiment"], r["curve"])] + 1)
        for r in rows
    ]


def fraction_series(rows: list[dict]) -> dict[tuple, tuple[np.ndarray, np.ndarray, int]]:
    """{(dataset, model, experiment, curve, T): (u, value, T)} with u = (t + 1) / T, the fraction of the forward
    process done after step t (so SegDiff's T = 100 and the others' T = 1000 share one axis, as the paper's
    Fig. 4); curves of the same key and T are averaged per t as in :func:`curve_series`. Rows without ``T`` take
    it from :func:`with_horizon`."""
    rows = with_horizon(rows)
    out = {}
    for horizon in sorted({int(r["T"]) for r in rows}):
        for key, (t, v) in curve_series([r for r in rows if int(r["T"]) == horizon]).items():
            out[(*key, horizon)] = ((t + 1.0) / horizon, v, horizon)
    return out


def average_on_fraction(curves: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """The mean of curves on the t/T axis: each interpolated linearly onto the densest one's grid."""
    grid = max((u for u, _ in curves), key=len)
    return grid, np.mean([np.interp(grid, u, v) for u, v in curves], axis=0)


def curve_series(rows: list[dict]) -> dict[tuple, tuple[np.ndarray, np.ndarray]]:
    """{(dataset, model, experiment, curve): (t, value)} sorted by t; values given twice for one t (e.g. the
    model-free curve of one dataset written by several runs) are averaged."""
    groups: dict[tuple, dict[int, list[float]]] = {}
    for r in rows:
        key = (r["dataset"], r["model"], r["experiment"], r["curve"])
        groups.setdefault(key, {}).setdefault(int(r["t"]), []).append(float(r["value"]))
    return {
        k: (np.asarray(sorted(v), np.float64), np.asarray([np.mean(v[t]) for t in sorted(v)], np.float64))
        for k, v in groups.items()
    }


_CURVE_LABELS = {
    "mask_error": "mask prediction error (MSE)",
    "eps_loss": "ε loss (MSE)",
    "bernoulli_mask_error": "mask prediction error, Bernoulli noise (MSE)",
}


def curve_figure(rows: list[dict], path: str, smoothing: int = 1) -> None:
    """Per-timestep curves (Fig. 3) from curve CSVs, one panel per curve kind, one line per run."""
    series = curve_series(rows)
    kinds = sorted({k[3] for k in series})
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.5 * len(kinds), 3.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for (dataset, model, experiment, curve), (t, v) in sorted(series.items()):
            if curve == kind:
                ax.plot(t, smooth(v, smoothing), label=f"{model} {experiment} ({dataset})")
        ax.set_xlabel("timestep t")
        ax.set_ylabel(_CURVE_LABELS.get(kind, kind))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def fingerprint_figure(rows: list[dict], path: str, smoothing: int = 25) -> None:
    """Fig. 4: per dataset, each model's mask prediction error (dotted), the average over the models of each
    experiment (solid), and the model-free fingerprint (dashed) where present, against t/T
    (:func:`fraction_series`): architectures with different T (SegDiff's 100, the others' 1000) share the axis
    and enter the average, interpolated onto the densest curve's grid (:func:`average_on_fraction`).
    ``smoothing`` is in timesteps of the panel's longest process; a curve of T' steps is smoothed over the same
    fraction of its own (``smoothing`` · T' / T_max timesteps, :func:`samples_in` of its grid)."""
    series = {k: v for k, v in fraction_series(rows).items() if k[3] == "mask_error"}
    datasets = sorted({k[0] for k in series})
    if not datasets:
        raise ValueError("No mask_error curves in these rows; run --mode analyse on E2/E3 runs first.")
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.2 * len(datasets), 3.2), squeeze=False, sharey=True)
    for ax, dataset in zip(axes[0], datasets):
        panel = {k: v for k, v in series.items() if k[0] == dataset}
        longest = max(k[4] for k in panel)

        def smoothed(u, v, horizon, longest=longest):
            return smooth(v, samples_in(u * horizon, smoothing * horizon / longest))

        trained = {k: v for k, v in panel.items() if k[1] != "model-free"}
        for (_, model, experiment, _, horizon), (u, v, _) in sorted(trained.items()):
            ax.plot(u, smoothed(u, v, horizon), ":", label=f"{model} {experiment} (T={horizon})")
        for exp in sorted({k[2] for k in trained}):  # one average per experiment (Fig. 4 averages E2 models)
            curves_e = [(u, smoothed(u, v, h)) for k, (u, v, h) in trained.items() if k[2] == exp]
            if len(curves_e) > 1:
                ax.plot(*average_on_fraction(curves_e), "-", label=f"average {exp}")
        for (_, model, _, _, horizon), (u, v, _) in sorted(panel.items()):
            if model == "model-free":
                ax.plot(u, smoothed(u, v, horizon), "--", color="gray", label=f"model-free (T={horizon})")
        ax.set_title(dataset, fontsize=9)
        ax.set_xlabel("t / T")
        ax.legend(fontsize=7)
    axes[0, 0].set_ylabel(_CURVE_LABELS["mask_error"])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def forward_figure(arrays: dict, path: str) -> None:
    """Fig. 2: the image (upper row) and its mask (lower row) noised at the stored timesteps."""
    ts = arrays["t"]
    fig, axes = plt.subplots(2, len(ts), figsize=(1.6 * len(ts), 3.4), squeeze=False)
    for col, t in enumerate(ts):
        for row, name in enumerate(("image", "mask")):
            panel = arrays[name][col]
            ax = axes[row, col]
            ax.imshow(panel[..., 0] if panel.shape[-1] == 1 else panel, cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"t = {int(t)}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def convergence_figure(curves: dict, path: str) -> None:
    """IoU and ECE against training steps: one column per dataset, one line per variant (mean over seeds, shaded
    ± one standard deviation). ``curves[(dataset, variant)] = (steps, iou (seeds, n), ece (seeds, n))``."""
    datasets = sorted({d for d, _ in curves})
    variants = list(dict.fromkeys(v for _, v in curves))
    fig, axes = plt.subplots(2, len(datasets), figsize=(3.2 * len(datasets), 5.2), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for col, dataset in enumerate(datasets):
        for row, (name, index) in enumerate((("IoU", 1), ("ECE", 2))):
            ax = axes[row, col]
            for i, variant in enumerate(variants):
                if (dataset, variant) not in curves:
                    continue
                entry = curves[(dataset, variant)]
                steps, values = entry[0], np.asarray(entry[index])
                mean, sd = values.mean(0), values.std(0)
                colour = colours[i % len(colours)]
                ax.plot(steps, mean, marker="o", ms=3, color=colour, label=variant)
                ax.fill_between(steps, mean - sd, mean + sd, color=colour, alpha=0.15)
            ax.set_title(f"{dataset}: {name}", fontsize=9)
            ax.set_xlabel("training step", fontsize=8)
            ax.tick_params(labelsize=7)
    axes[0, -1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def learning_curves_figure(rows: list[dict], path: str) -> None:
    """IoU, ECE and the std map's error AUROC against the training step (``learning_curves.collect_learning_curves``'
    rows): a panel per metric and dataset, a line per model, experiment, prediction, sampler and seed; where rows
    have ``mask_error_T``, a fourth panel of the network's mask prediction error at t = T - 1 (a line per run) with
    its predict-the-mean limit dashed in the same colour."""
    datasets = sorted({str(r["dataset"]) for r in rows})
    metrics = (("iou", "IoU"), ("ece", "ECE"), ("std_error_auroc", "std → error AUROC"))
    late = any(r.get("mask_error_T") is not None for r in rows)
    fig, axes = plt.subplots(
        len(datasets),
        3 + late,
        figsize=(13 + 4.3 * late, 3.2 * len(datasets)),
        squeeze=False,
        constrained_layout=True,
    )
    for row_axes, dataset in zip(axes, datasets):
        lines: dict[tuple, list[dict]] = {}
        for r in rows:
            if str(r["dataset"]) == dataset:
                key = (r["model"], r["experiment"], r["prediction"], r["sampler"], r["seed"])
                lines.setdefault(key, []).append(r)
        for ax, (name, label) in zip(row_axes, metrics):
            for (model, exp, pred, sampler, seed), pts in sorted(lines.items(), key=str):
                pts = sorted((p for p in pts if p[name] is not None), key=lambda p: p["step"])
                if not pts:
                    continue
                tag = f"{model} {exp}" + ("" if exp == "e1" else f" {pred} {sampler}") + f" s{seed}"
                ax.plot(
                    [p["step"] for p in pts],
                    [p[name] for p in pts],
                    "o-" if exp != "e1" else "s--",
                    label=tag,
                )
            ax.set_xscale("log")
            ax.set_xlabel("training step")
            ax.set_ylabel(label)
            ax.set_title(f"{dataset}: {label}", fontsize=9)
        if row_axes[0].get_legend_handles_labels()[0]:
            row_axes[0].legend(fontsize=6)
        if late:
            ax = row_axes[3]
            runs: dict[str, dict[int, dict]] = {}
            for r in rows:  # one value per run and step, whichever sampler's row carries it
                if str(r["dataset"]) == dataset and r.get("mask_error_T") is not None:
                    runs.setdefault(str(r["run"]), {})[r["step"]] = r
            for run, by_step in sorted(runs.items()):
                pts = [by_step[s] for s in sorted(by_step)]
                first = pts[0]
                tag = f"{first['model']} {first['experiment']} {first['prediction']} s{first['seed']}"
                (line,) = ax.plot([p["step"] for p in pts], [p["mask_error_T"] for p in pts], "o-", label=tag)
                ax.plot(
                    [p["step"] for p in pts],
                    [p["mean_limit_T"] for p in pts],
                    "--",
                    color=line.get_color(),
                    label=f"{tag}: predict the mean",
                )
            ax.set_xscale("log")
            ax.set_xlabel("training step")
            ax.set_ylabel("mask error at t = T - 1")
            ax.set_title(f"{dataset}: mask error at T - 1 (dashed: the mean)", fontsize=9)
            ax.legend(fontsize=6)
    fig.savefig(path, dpi=100)
    plt.close(fig)
