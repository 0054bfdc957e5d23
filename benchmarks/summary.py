"""One table from the JSON files the benchmarks wrote: ``python benchmarks/summary.py DIR``."""

from __future__ import annotations

import glob
import json
import os
import sys


def _f(value, fmt: str) -> str:
    return "-" if value is None else fmt % value


def main(directory: str) -> None:
    files = [p for p in sorted(glob.glob(os.path.join(directory, "*.json"))) if "rows" in json.load(open(p))]
    if not files:
        print(f"no benchmark JSON in {directory}")
        return
    print(f"\n==== summary ({json.load(open(files[0]))['device']})")
    print(f"{'benchmark':20s} {'model':15s} {'px':>4s} {'what':44s} {'figure':>36s}")
    for path in files:
        name = os.path.splitext(os.path.basename(path))[0]
        for r in json.load(open(path))["rows"]:
            if "error" in r:
                what = f"{r['dtype']}{' remat' if r.get('remat') else ''} batch {r['batch']}"
                print(f"{name:20s} {r['model']:15s} {'':4s} {what:44s} FAILED: {r['error'][:60]}")
                continue
            if "images_per_s" in r or "train_step_gflops" in r:
                what = f"{r['dtype']}{' remat' if r.get('remat') else ''} batch {r['batch']}"
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
            else:
                continue
            print(f"{name:20s} {r['model']:15s} {r['image_size']:4d} {what:44s} {figure:>36s}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmark_results")
