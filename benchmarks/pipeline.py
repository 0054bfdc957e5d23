"""Input pipeline: training batches per second from a config's dataset, against what a train step consumes.

  python benchmarks/pipeline.py --config configs/e2_synthetic.py
  python benchmarks/pipeline.py --config configs/e2_folder.py \
      --config.data.manual_dir=../shared/data/monuseg2018_512 --config.data.data_dir=/tmp/tfds \
      --threads 1,4 --workers 0,2 --needed 89.4

Reads ``--batches`` batches of the config's ``train.batch_size`` through the loop's own reader
(``data.train_dataset`` + ``data.batch_stream``: random crops and flips as configured, grain threads reading
ahead, worker processes with ``--workers`` > 0) for every (threads, workers) pair, and prints images/s in the
steady state apart from the start-up (first batch: building the dataset if not built, starting workers).
``--needed`` (images/s, e.g. a train step's from ``models.py``) prints how many such pipelines it takes to feed
that step: the figure says whether the host keeps the devices fed. The dataset is prepared once (tfds
``data_dir``), as a real run does, before anything is timed.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402 — puts the repository root on the path first
from absl import app, flags  # noqa: E402

from diffseg_jax import configlib, data  # noqa: E402

_CONFIG = configlib.define_config_flag(
    "config", "e2_synthetic", "Config file[:arg] or a shipped config's name."
)
_BATCHES = flags.DEFINE_integer("batches", 20, "batches timed after the first")
_THREADS = flags.DEFINE_string("threads", "1,4", "grain reader threads to try")
_WORKERS = flags.DEFINE_string("workers", "0,2", "worker processes to try")
_NEEDED = flags.DEFINE_float("needed", None, "images/s a train step consumes (to compare against)")
_JSON = flags.DEFINE_string("json", None, "write the rows here")


def measure(config, threads: int, workers: int, num_batches: int) -> dict:
    """Seconds to the first batch and steady-state images/s of ``num_batches`` more."""
    t0 = time.perf_counter()
    ds = data.train_dataset(config.data, config.train.batch_size, seed=0)
    stream = data.batch_stream(ds, 0, num_threads=threads, num_workers=workers, buffer=config.data.prefetch)
    first = next(stream)
    startup = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(num_batches):
        batch = next(stream)
    seconds = time.perf_counter() - t0
    images = num_batches * len(batch["image"])
    return {
        "dataset": config.data.name,
        "image_size": int(first["image"].shape[1]),
        "batch": len(first["image"]),
        "threads": threads,
        "workers": workers,
        "startup_s": startup,
        "images_per_s": images / seconds,
    }


def main(argv):
    del argv
    config = _CONFIG.value
    print(common.device_line(), f" host CPUs: {os.cpu_count()}", flush=True)
    data.train_dataset(config.data, config.train.batch_size, seed=0)  # builds the dataset once, untimed
    print(
        f"{'dataset':20s} {'px':>4s} {'batch':>5s} {'threads':>7s} {'workers':>7s} {'start s':>8s} {'img/s':>8s}"
    )
    rows = []
    for workers in (int(w) for w in _WORKERS.value.split(",")):
        for threads in (int(t) for t in _THREADS.value.split(",")):
            row = measure(config, threads, workers, _BATCHES.value)
            if _NEEDED.value:
                row["needed_images_per_s"] = _NEEDED.value
                row["pipelines_to_feed"] = _NEEDED.value / row["images_per_s"]
            rows.append(row)
            common.write_json(_JSON.value, rows)
            feed = (
                f"  {row['pipelines_to_feed']:.2f} of these feed {_NEEDED.value} img/s"
                if _NEEDED.value
                else ""
            )
            print(
                f"{row['dataset']:20s} {row['image_size']:4d} {row['batch']:5d} {threads:7d} {workers:7d} "
                f"{row['startup_s']:8.1f} {row['images_per_s']:8.1f}{feed}",
                flush=True,
            )


if __name__ == "__main__":
    app.run(main)
