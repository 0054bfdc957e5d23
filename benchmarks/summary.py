"""One table from the JSON files the benchmarks wrote: ``python benchmarks/summary.py DIR``."""

from __future__ import annotations

import glob
import json
import os
import sys


def _f(value, fmt: str) -> str:
    return "-" if value is None else fmt % value


# A row's model settings besides dtype and remat, by the token of benchmarks/models.py that set them.
_TOKENS = {
    ("depthwise", "conv"): "dwconv",
    ("remat_policy", "conv_outputs"): "remat_conv",
    ("remat_policy", "dots"): "remat_dots",
    ("norm_impl", "stats_float32"): "gnstats",
    ("attention_impl", "dot_product"): "dpa",
    ("attention_impl", "cudnn"): "cudnn",
}


def _train_what(r: dict) -> str:
    tokens = "".join(f" {token}" for (key, value), token in _TOKENS.items() if r.get(key) == value)
    return f"{r['dtype']}{' remat' if r.get('remat') else ''}{tokens} batch {r['batch']}"


def main(directory: str) -> None:
    results = []  # (benchmark name, its JSON), every file read once
    # gpu_check.sh logs every part; a log without JSON is a part its time limit stopped before its first row.
    empty = [
        os.path.basename(log)
        for log in sorted(glob.glob(os.path.join(directory, "*.log")))
        if not os.path.exists(os.path.splitext(log)[0] + ".json")
    ]
    for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
        with open(path, encoding="utf-8") as f:
            result = json.load(f)
        if "rows" in result:
            results.append((os.path.splitext(os.path.basename(path))[0], result))
    device = results[0][1]["device"] if results else f"no benchmark JSON in {directory}"
    print(f"\n==== summary ({device})")
    print(f"{'benchmark':20s} {'model':15s} {'px':>4s} {'what':44s} {'figure':>50s}")
    for name, result in results:
        for r in result["rows"]:
            if "error" in r and "dataset" in r:  # sampling.py --published
                what = f"{r['dataset']} {r['sampler']} {r['dtype']}"
                print(f"{name:20s} {r['model']:15s} {'':4s} {what:44s} FAILED: {r['error'][:60]}")
                continue
            if "error" in r:
                print(f"{name:20s} {r['model']:15s} {'':4s} {_train_what(r):44s} FAILED: {r['error'][:60]}")
                continue
            if r.get("pending"):  # models.py lists every row first: this one never finished compiling
                print(
                    f"{name:20s} {r['model']:15s} {'':4s} {_train_what(r):44s} {'not compiled: time limit':>50s}"
                )
                continue
            if "train_step_gflops" in r and r.get("images_per_s") is None:
                what, figure = _train_what(r), f"compiled in {r['init_s'] + r['compile_s']:.0f} s, not timed"
            elif "train_step_gflops" in r:
                what = _train_what(r)
                what += " (timed beside compiles)" if r.get("timed_beside_compilation") else ""
                # XLA's memory analysis of the step, then what the step added on the device where known.
                # The step's own FLOPs per second (without remat's recomputation) where the row has them.
                tflops = r.get("model_tflops", r.get("achieved_tflops"))
                peak = (
                    f" ({r['percent_of_peak']:.0f} % of peak)" if r.get("percent_of_peak") is not None else ""
                )
                figure = (
                    f"{_f(r.get('images_per_s'), '%.1f')} img/s {_f(tflops, '%.1f')} TFLOP/s{peak} "
                    f"XLA {_f(r.get('xla_memory_gib'), '%.1f')} GiB"
                )
                if r.get("step_transient_gib") is not None:
                    figure += f", step +{r['step_transient_gib']:.1f} GiB"
            elif "s_per_image" in r:  # sampling.py --published: measured m-s/s, extrapolated s per image
                what = f"{r['dataset']} {r['sampler']}-{r['paper_steps']} {r['dtype']} {r['batch']}×{r['members']}/call"
                figure = (
                    f"{r['member_steps_per_s']:.0f} m-s/s → {r['s_per_image']:.2f} s/img, "
                    f"{r['images_per_hour']:.0f} img/h"
                )
            elif "scan_s" in r:
                what = f"{r['images']} img × {r['members']} members × {r['steps']} steps"
                figure = f"scan {r['scan_member_steps_per_s']:.0f} vs loop {r['naive_member_steps_per_s']:.0f} m-s/s ×{r['speedup']:.1f}"
            elif "evaluator_s" in r:
                what = f"{r['images']} img × {r['draws']} draws × {r['timesteps']} t"
                figure = f"eval {r['evaluator_evals_per_s']:.0f} vs loop {r['loop_evals_per_s']:.0f} n/s ×{r['speedup']:.1f}"
            elif "threads" in r:  # pipeline.py: the dataset in the model column
                r = {**r, "model": r["dataset"]}
                what = f"reader: {r['threads']} threads, {r['workers']} workers, batch {r['batch']}"
                figure = f"{r['images_per_s']:.1f} img/s"
            else:
                continue
            print(f"{name:20s} {r['model']:15s} {r['image_size']:4d} {what:44s} {figure:>50s}")
    for log in empty:
        print(
            f"{os.path.splitext(log)[0]:20s} no row: stopped (time limit?) before its first result; see {log}"
        )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmark_results")
