"""One table from the JSON files the benchmarks wrote: ``python benchmarks/summary.py DIR``."""

from __future__ import annotations

import glob
import json
import os
import sys


def _f(value, fmt: str) -> str:
    return "-" if value is None else fmt % value


def _train_what(r: dict) -> str:
    return f"{r['dtype']}{' remat' if r.get('remat') else ''} batch {r['batch']}"


def main(directory: str) -> None:
    results = []  # (benchmark name, its JSON), every file read once
    for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
        with open(path, encoding="utf-8") as f:
            result = json.load(f)
        if "rows" in result:
            results.append((os.path.splitext(os.path.basename(path))[0], result))
    if not results:
        print(f"no benchmark JSON in {directory}")
        return
    print(f"\n==== summary ({results[0][1]['device']})")
    print(f"{'benchmark':20s} {'model':15s} {'px':>4s} {'what':44s} {'figure':>36s}")
    for name, result in results:
        for r in result["rows"]:
            if "error" in r:
                print(f"{name:20s} {r['model']:15s} {'':4s} {_train_what(r):44s} FAILED: {r['error'][:60]}")
                continue
            if "train_step_gflops" in r:
                what = _train_what(r)
                what += " (timed beside compiles)" if r.get("timed_beside_compilation") else ""
                figure = (
                    f"{_f(r.get('images_per_s'), '%.1f')} img/s {_f(r.get('achieved_tflops'), '%.1f')} TFLOP/s "
                    f"{_f(r.get('device_peak_gib') or r.get('xla_memory_gib'), '%.1f')} GiB"
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
            print(f"{name:20s} {r['model']:15s} {r['image_size']:4d} {what:44s} {figure:>36s}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmark_results")
