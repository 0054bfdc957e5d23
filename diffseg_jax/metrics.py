"""Segmentation and calibration metrics, pure jnp functions (jit/vmap friendly).

Each function pools **all pixels it is given**: call it on one image for a per-image value, on a stack for a
pooled value, or vmap it over images (:func:`per_image`) and average for the mean of per-image values.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def iou(pred_mask: jnp.ndarray, true_mask: jnp.ndarray, empty_value: float = 1.0) -> jnp.ndarray:
    """Intersection over union of two binary masks (any shape, truthy = foreground).

    When both masks are empty the IoU is undefined; ``empty_value`` (default 1: a correct empty
    prediction) is returned.
    """
    p, y = pred_mask.astype(bool), true_mask.astype(bool)
    inter = jnp.sum(p & y)
    union = jnp.sum(p | y)
    return jnp.where(union > 0, inter / jnp.maximum(union, 1), empty_value)


def dice(pred_mask: jnp.ndarray, true_mask: jnp.ndarray, empty_value: float = 1.0) -> jnp.ndarray:
    """Dice coefficient 2|P∩Y| / (|P| + |Y|) of two binary masks; ``empty_value`` when both are empty."""
    p, y = pred_mask.astype(bool), true_mask.astype(bool)
    denom = jnp.sum(p) + jnp.sum(y)
    return jnp.where(denom > 0, 2.0 * jnp.sum(p & y) / jnp.maximum(denom, 1), empty_value)


# config eval.pooling: which value metrics.json reports as `iou` / `ece`: over all test pixels, or the mean of
# per-image values (both are always written).
POOLINGS = ("pooled", "per_image")


def per_image(metric: Callable[..., jnp.ndarray], *arrays: jnp.ndarray) -> jnp.ndarray:
    """Applies a pooled metric to each image of stacked arrays (leading axis = image)."""
    return jax.vmap(metric)(*arrays)


def calibration_bins(
    probs: jnp.ndarray, labels: jnp.ndarray, num_bins: int = 10, top_label: bool = False
) -> dict[str, jnp.ndarray]:
    """Reliability-diagram data over all pixels given: per bin the mean confidence, accuracy and pixel count.

    Binary (default), as torchmetrics' ``BinaryCalibrationError``: the confidence is the foreground
    probability ``probs`` and the accuracy the foreground indicator ``labels``. ``top_label``: the
    confidence is max(p, 1 − p) of the predicted class (foreground iff p > 0.5) and the accuracy whether
    that class is right, which equals torchmetrics' ``MulticlassCalibrationError`` on the two-class
    probabilities [1 − p, p] (ties at 0.5 go to background, as its argmax).

    Bins as torchmetrics ``_binning_bucketize``: boundaries b_k = k / num_bins (float32; for
    ``num_bins=10`` bit-identical to torchmetrics' ``linspace``), bin k holds b_k <= c < b_{k+1}, and a
    last, (num_bins + 1)-th bin holds exactly c = 1. This matters for ensembles: the mean of N members
    lands on multiples of 1/N, i.e. on bin edges, and clipped diffusion samples give many exact 0s and
    1s. Returns arrays of length num_bins + 1: ``confidence`` and ``accuracy`` (0 for empty bins) and
    ``count``. Probabilities outside [0, 1] are clipped.
    """
    p = jnp.clip(jnp.ravel(probs).astype(jnp.float32), 0.0, 1.0)
    y = jnp.ravel(labels).astype(bool)
    if top_label:
        pred = p > 0.5
        conf = jnp.where(pred, p, 1.0 - p)
        acc = (pred == y).astype(jnp.float32)
    else:
        conf, acc = p, y.astype(jnp.float32)
    boundaries = jnp.asarray((np.arange(num_bins + 1) / num_bins).astype(np.float32))
    index = jnp.searchsorted(boundaries, conf, side="right") - 1  # torch.bucketize(right=True) - 1
    count = jnp.zeros(num_bins + 1, jnp.float32).at[index].add(1.0)
    conf_sum = jnp.zeros(num_bins + 1, jnp.float32).at[index].add(conf)
    acc_sum = jnp.zeros(num_bins + 1, jnp.float32).at[index].add(acc)
    safe = jnp.maximum(count, 1.0)
    return {
        "confidence": jnp.where(count > 0, conf_sum / safe, 0.0),
        "accuracy": jnp.where(count > 0, acc_sum / safe, 0.0),
        "count": count,
    }


def expected_calibration_error(
    probs: jnp.ndarray, labels: jnp.ndarray, num_bins: int = 10, top_label: bool = False
) -> jnp.ndarray:
    """ECE over all pixels given: sum over bins of |accuracy − confidence| × the bin's share of pixels.

    By default exactly torchmetrics' ``BinaryCalibrationError(n_bins=num_bins, norm='l1')`` (see
    :func:`calibration_bins` for the bins and the ``top_label`` variant). The paper (Öttl et al., Sec. 3.2)
    uses 10 bins and cites Nixon et al. Pooling is the caller's choice: one image for a per-image ECE, the
    whole test set for the pooled ECE (what a torchmetrics metric object accumulated over batches gives).
    """
    bins = calibration_bins(probs, labels, num_bins, top_label)
    share = bins["count"] / jnp.maximum(bins["count"].sum(), 1.0)
    return jnp.sum(jnp.abs(bins["accuracy"] - bins["confidence"]) * share)


@functools.partial(jax.jit, static_argnames=("num_bins",))
def segmentation_report(
    mean: jnp.ndarray, truth: jnp.ndarray, threshold: float = 0.5, num_bins: int = 10
) -> dict[str, jnp.ndarray]:
    """All metrics of an ensemble's mean foreground probability ``mean`` (N, ...) against binary ``truth``.

    The segmentation is ``mean > threshold``. Two poolings, both reported:

    * ``*_per_image``: the metric of each image's pixels (arrays of length N; their average is the
      "per-image" figure, as SegDiff's evaluation computes IoU);
    * ``*_pooled``: the metric of all pixels of all N images at once (what torchmetrics' metric objects give
      when updated batch by batch over a test set).

    Keys: ``iou``, ``dice``, ``ece`` (binary, torchmetrics' definition) and ``ece_top_label`` in both
    poolings, ``reliability`` (pooled :func:`calibration_bins`), and per image the true and predicted
    foreground fractions.
    """
    pred = mean > threshold
    truth = truth > 0.5
    ece = functools.partial(expected_calibration_error, num_bins=num_bins)
    ece_top = functools.partial(expected_calibration_error, num_bins=num_bins, top_label=True)
    return {
        "iou_per_image": per_image(iou, pred, truth),
        "dice_per_image": per_image(dice, pred, truth),
        "ece_per_image": per_image(ece, mean, truth),
        "ece_top_label_per_image": per_image(ece_top, mean, truth),
        "true_fraction_per_image": jnp.mean(truth.reshape(truth.shape[0], -1), axis=1),
        "pred_fraction_per_image": jnp.mean(pred.reshape(pred.shape[0], -1), axis=1),
        "iou_pooled": iou(pred, truth),
        "dice_pooled": dice(pred, truth),
        "ece_pooled": ece(mean, truth),
        "ece_top_label_pooled": ece_top(mean, truth),
        "reliability": calibration_bins(mean, truth, num_bins),
    }


def brier_score(probs: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
    """Mean squared difference between the foreground probability and the binary label (a proper score)."""
    p = jnp.clip(probs.astype(jnp.float32), 0.0, 1.0)
    return jnp.mean(jnp.square(p - labels.astype(jnp.float32)))


def binary_entropy(probs: jnp.ndarray) -> jnp.ndarray:
    """Entropy of a Bernoulli(p) in bits, in [0, 1]: the predictive (total) uncertainty of an ensemble mean."""
    p = jnp.clip(probs.astype(jnp.float32), 0.0, 1.0)
    q = 1.0 - p
    plogp = jnp.where(p > 0, p * jnp.log2(jnp.where(p > 0, p, 1.0)), 0.0)
    qlogq = jnp.where(q > 0, q * jnp.log2(jnp.where(q > 0, q, 1.0)), 0.0)
    return jnp.abs(plogp + qlogq)  # abs: no -0.0 where p is 0 or 1


def _blockwise_mean(x: jnp.ndarray, block: int = 4096) -> jnp.ndarray:
    """Mean of a long float32 vector as a mean of block means: two short sums instead of one long one."""
    n = x.shape[0]
    pad = -n % block
    blocks = jnp.pad(x, (0, pad)).reshape(-1, block)
    return jnp.sum(jnp.sum(blocks, axis=1)) / n


def pearson_correlation(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """Pearson correlation of two maps over all pixels given (NaN if either is constant)."""
    a = jnp.ravel(a).astype(jnp.float32)
    b = jnp.ravel(b).astype(jnp.float32)
    da, db = a - _blockwise_mean(a), b - _blockwise_mean(b)
    cov, va, vb = (_blockwise_mean(x * y) for x, y in ((da, db), (da, da), (db, db)))
    # Constant is decided exactly: the rounded mean of equal values can leave a variance of rounding errors.
    varies = (jnp.max(a) > jnp.min(a)) & (jnp.max(b) > jnp.min(b)) & (va > 0) & (vb > 0)
    return jnp.where(varies, cov / jnp.sqrt(jnp.maximum(va * vb, 1e-30)), jnp.nan)


def average_ranks(values: jnp.ndarray) -> jnp.ndarray:
    """1-based ranks of the values given, ties sharing their average rank (``scipy.stats.rankdata``'s default):
    a value's rank is the mean of the first and last place it takes in sorted order, by binary search."""
    x = jnp.ravel(values).astype(jnp.float32)
    ordered = jnp.sort(x)
    first = jnp.searchsorted(ordered, x, side="left")
    last = jnp.searchsorted(ordered, x, side="right")
    return (first + last + 1).astype(jnp.float32) / 2.0


def spearman_correlation(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """Spearman's rank correlation: the Pearson correlation of the average ranks (``scipy.stats.spearmanr``);
    NaN if either is constant."""
    return pearson_correlation(average_ranks(a), average_ranks(b))


def error_auroc(uncertainty: jnp.ndarray, error: jnp.ndarray) -> jnp.ndarray:
    """Area under the ROC curve of ``uncertainty`` as a detector of the ``error`` pixels, over all pixels given.

    The probability that an erroneous pixel is more uncertain than a correct one, ties counted half (the
    Mann–Whitney statistic, which is what ``sklearn.metrics.roc_auc_score`` computes): 1 when every error is
    more uncertain than every correct pixel, 0.5 for an uninformative map, NaN without errors or without correct
    pixels. Exact in O(n log n): for each correct pixel, the errors above and level with it are counted by
    binary search in the sorted error scores (int32 counts; the average over correct pixels is taken block-wise
    in float32, accurate to about 1e-6).
    """
    u = jnp.ravel(uncertainty).astype(jnp.float32)
    e = jnp.ravel(error).astype(bool)
    n_err = jnp.sum(e)
    n_ok = u.shape[0] - n_err
    # Errors' scores sorted, the correct pixels' pushed past every real score so the searches ignore them.
    err_sorted = jnp.sort(jnp.where(e, u, jnp.inf))
    below_or_level = jnp.searchsorted(err_sorted, u, side="right")
    below = jnp.searchsorted(err_sorted, u, side="left")
    above = n_err - below_or_level
    level = below_or_level - below
    credit = (above.astype(jnp.float32) + 0.5 * level.astype(jnp.float32)) / jnp.maximum(n_err, 1)
    mean_credit = _blockwise_mean(jnp.where(e, 0.0, credit)) * u.shape[0] / jnp.maximum(n_ok, 1)
    return jnp.where((n_err > 0) & (n_ok > 0), mean_credit, jnp.nan)


def uncertainty_error_overlap(
    uncertainty: jnp.ndarray, error: jnp.ndarray
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """UEO (Jungo & Reyes, MICCAI 2019): the best Dice between ``uncertainty >= τ`` and the ``error`` pixels.

    Exact over every threshold (not a grid): pixels sorted by decreasing uncertainty, the Dice of flagging the
    top k is 2 · (errors among them) / (k + errors), and a cut is allowed only between two different values.
    Returns (UEO, the τ that attains it: the lowest uncertainty still flagged; of equally good τ the highest).
    Without errors the best is to flag nothing, an empty Dice of 1 (as :func:`dice`), and τ is NaN.
    """
    u = jnp.ravel(uncertainty).astype(jnp.float32)
    e = jnp.ravel(error).astype(bool)
    order = jnp.argsort(-u)
    u_desc, e_desc = u[order], e[order]
    n_err = jnp.sum(e)
    k = jnp.arange(1, u.shape[0] + 1)
    hits = jnp.cumsum(e_desc.astype(jnp.int32))
    dice = 2.0 * hits.astype(jnp.float32) / (k + n_err).astype(jnp.float32)
    cut_ok = jnp.concatenate([u_desc[:-1] > u_desc[1:], jnp.array([True])])  # top-k is a threshold set
    dice = jnp.where(cut_ok, dice, -1.0)
    best = jnp.argmax(dice)
    ueo = jnp.where(n_err > 0, dice[best], 1.0)
    return ueo, jnp.where(n_err > 0, u_desc[best], jnp.nan)


@jax.jit
def uncertainty_report(
    mean: jnp.ndarray, std: jnp.ndarray, truth: jnp.ndarray, threshold: float = 0.5
) -> dict[str, jnp.ndarray]:
    """How well an ensemble's uncertainty maps point at its errors, pooled over all pixels given.

    The paper (Öttl et al., Sec. 3.2 and Fig. 1) shows the ensemble's std maps and observes that feed-forward
    ensembles mark "similar areas as uncertain" but less so; this puts numbers on it. The errors are the pixels
    where ``mean > threshold`` disagrees with ``truth``. Two maps: ``std`` (the members' spread, the map the
    paper shows) and ``entropy`` (:func:`binary_entropy` of the mean; the total predictive
    uncertainty, informative even when the members agree, as feed-forward ones nearly do). For each:
    ``*_error_auroc`` (:func:`error_auroc`) and ``*_ueo`` / ``*_ueo_threshold``
    (:func:`uncertainty_error_overlap`), pooled, and ``*_error_auroc_per_image``, which finds the images whose
    maps miss their errors. Per image, ``*_image_spearman``: the rank correlation of the map's mean with the
    image's failure, 1 − IoU of the thresholded mean (does the ensemble flag the images it segments badly, as a
    quality check would use it?). Also the pooled and per-image Brier score of the mean and the error fraction.
    """
    truth = truth > 0.5
    error = (mean > threshold) != truth
    failure = 1.0 - per_image(iou, mean > threshold, truth)
    out = {
        "brier_pooled": brier_score(mean, truth),
        "brier_per_image": per_image(brier_score, mean, truth),
        "error_fraction": jnp.mean(error.astype(jnp.float32)),
    }
    for name, u in (("std", std), ("entropy", binary_entropy(mean))):
        out[f"{name}_error_auroc"] = error_auroc(u, error)
        out[f"{name}_error_auroc_per_image"] = per_image(
            error_auroc, u, error
        )  # NaN: an image without errors
        out[f"{name}_ueo"], out[f"{name}_ueo_threshold"] = uncertainty_error_overlap(u, error)
        out[f"{name}_image_spearman"] = spearman_correlation(
            jnp.mean(u.reshape(u.shape[0], -1), axis=1), failure
        )
    return out


def image_statistics(
    mean: jnp.ndarray, truth: jnp.ndarray, threshold: float = 0.5, num_bins: int = 10
) -> dict[str, jnp.ndarray]:
    """Per-image sums from which the pooled IoU and ECE of any multiset of the images follow exactly.

    For each image (leading axis): ``intersection`` and ``union`` of ``mean > threshold`` with the truth, its
    ``pixels``, and per calibration bin (:func:`calibration_bins`, ``num_bins + 1`` of them) the summed
    confidence ``confidence_sum`` and summed foreground indicator ``accuracy_sum``. See :func:`pooled_scores`.
    """
    pred, truth = mean > threshold, truth > 0.5
    flat = lambda x: x.reshape(x.shape[0], -1)  # noqa: E731
    bins = per_image(functools.partial(calibration_bins, num_bins=num_bins), mean, truth)
    return {
        "intersection": jnp.sum(flat(pred & truth), axis=1).astype(jnp.float32),
        "union": jnp.sum(flat(pred | truth), axis=1).astype(jnp.float32),
        "pixels": jnp.full((mean.shape[0],), np.prod(mean.shape[1:]), jnp.float32),
        "confidence_sum": bins["confidence"] * bins["count"],
        "accuracy_sum": bins["accuracy"] * bins["count"],
    }


def image_scores(stats: dict[str, jnp.ndarray]) -> dict[str, jnp.ndarray]:
    """Each image's own IoU (1 where it and its prediction are empty, as :func:`iou`) and ECE (as
    :func:`expected_calibration_error` of its pixels) from its :func:`image_statistics`."""
    inter, union = stats["intersection"], stats["union"]
    gap = jnp.abs(stats["confidence_sum"] - stats["accuracy_sum"])
    return {
        "iou": jnp.where(union > 0, inter / jnp.maximum(union, 1.0), 1.0),
        "ece": jnp.sum(gap, axis=-1) / stats["pixels"],
    }


def pooled_scores(
    stats: dict[str, jnp.ndarray], weights: jnp.ndarray, pooling: str = "pooled"
) -> dict[str, jnp.ndarray]:
    """IoU and ECE of the images taken ``weights`` times each (:func:`image_statistics`), pooled as
    ``eval.pooling`` says.

    ``weights`` (..., N): with all ones and ``pooling='pooled'``, :func:`iou` of all pixels (1 where no image
    has foreground) and :func:`expected_calibration_error`, since the ECE is
    sum_k |confidence_sum_k - accuracy_sum_k| / pixels; ``pooling='per_image'``: the weighted means of the
    images' own scores (:func:`image_scores`), i.e. metrics.json's ``iou_per_image`` / ``ece_per_image``. With
    a bootstrap resample's multiplicities, the scores of that resample. Leading axes of ``weights`` batch.
    """
    w = jnp.asarray(weights, jnp.float32)
    # Full float32 products: an accelerator's default matmul precision (TF32/bf16 passes) would blur the sums.
    total = functools.partial(jnp.matmul, w, precision=jax.lax.Precision.HIGHEST)
    if pooling == "per_image":
        count = jnp.sum(w, axis=-1)
        return {k: total(v) / count for k, v in image_scores(stats).items()}
    if pooling != "pooled":
        raise ValueError(f"pooling={pooling!r}: choose 'pooled' or 'per_image' (eval.pooling).")
    inter, union = total(stats["intersection"]), total(stats["union"])
    gap = jnp.abs(total(stats["confidence_sum"]) - total(stats["accuracy_sum"]))
    return {
        "iou": jnp.where(union > 0, inter / jnp.maximum(union, 1.0), 1.0),
        "ece": jnp.sum(gap, axis=-1) / total(stats["pixels"]),
    }


@functools.partial(jax.jit, static_argnames=("num_samples", "pooling"))
def paired_bootstrap(
    stats_a: dict[str, jnp.ndarray],
    stats_b: dict[str, jnp.ndarray],
    key: jax.Array,
    num_samples: int = 1000,
    pooling: str = "pooled",
) -> dict[str, jnp.ndarray]:
    """Differences b − a of the IoU and ECE (pooled as ``pooling``, :func:`pooled_scores`) of two runs on the
    same N images, and ``num_samples`` bootstrap replicates of them: each resample draws N images with
    replacement and scores both runs on it, so the pairing by image is kept (the image-to-image variation
    both runs share cancels out). Returns ``iou_delta`` / ``ece_delta`` (on all images) and ``iou_deltas`` /
    ``ece_deltas`` (num_samples,).
    """
    n = stats_a["intersection"].shape[0]
    draws = jax.random.randint(key, (num_samples, n), 0, n)
    weights = jnp.zeros((num_samples, n), jnp.float32).at[jnp.arange(num_samples)[:, None], draws].add(1.0)
    ones = jnp.ones((n,), jnp.float32)
    a, b = (pooled_scores(s, ones, pooling) for s in (stats_a, stats_b))
    ra, rb = (pooled_scores(s, weights, pooling) for s in (stats_a, stats_b))
    return {
        **{f"{k}_delta": b[k] - a[k] for k in ("iou", "ece")},
        **{f"{k}_deltas": rb[k] - ra[k] for k in ("iou", "ece")},
    }
