"""A dataset as the runs read it, written out as an image/mask folder: ``python -m diffseg_jax.data.export``.

  python -m diffseg_jax.data.export --config configs/e2_monuseg.py --config.data.manual_dir=/data/MoNuSeg \\
      --out /data/monuseg2018_512

Every split the dataset has on disk (``train``, ``test``; a held-out ``data.test_fraction`` part too) goes to
``OUT/<split>/images/<id>.png`` and ``OUT/<split>/masks/<id>.png`` (0/255), at the size the dataset is stored
(``data.resize``, else ``data.image_size``) and exactly as stored: the segmentation_folder builder reads the
folder back into the same arrays. Uses: the official MoNuSeg release (TIFF + XML polygons) or ISIC 2016 as a
folder for the Table 1 grid's ``table.folders`` and ``adaptive_study --monuseg_dir``, which read folders; a
look at what the model is trained on. Written into ``OUT.partial`` and renamed when complete, so an interrupted
export leaves no folder that looks whole; an existing ``OUT`` is refused.
"""

from __future__ import annotations

import os
import shutil
import time

import ml_collections
import numpy as np

from diffseg_jax import validation
from diffseg_jax.data import files, pipeline

PARTIAL_SUFFIX = ".partial"


def _sources(data_config: ml_collections.ConfigDict) -> dict[str, pipeline.Source]:
    """The dataset's train and test splits, those it has (a held-out test part counts)."""
    found = {}
    for split in ("train", "test"):
        try:
            found[split] = pipeline.load_split(data_config, split)
        except pipeline.MissingSplitError:
            continue
    return found


def _id_path(example_id) -> str:
    """A file name for an example id: its text, any folders in it kept (the folder builder pairs by relative path)."""
    text = example_id.decode() if isinstance(example_id, bytes) else str(example_id)
    name = os.path.normpath(text.lstrip("/"))
    if name.split(os.sep)[0] == "..":
        raise ValueError(f"Example id {text!r} would be written outside the export folder.")
    return name


def export(data_config: ml_collections.ConfigDict, out: str, log=print) -> dict[str, int]:
    """Writes the dataset of ``data_config`` to the folder ``out`` (see the module doc); returns the number of
    examples per split."""
    if os.path.exists(out):
        raise FileExistsError(f"--out {out} exists; export into a new folder (nothing is overwritten).")
    partial = out.rstrip("/\\") + PARTIAL_SUFFIX
    shutil.rmtree(partial, ignore_errors=True)  # a previous export that was cut short
    counts = {}
    t0 = time.time()
    for split, source in _sources(data_config).items():
        for i in range(len(source)):
            example = source[i]
            name = _id_path(example["id"])
            mask = np.asarray(example["mask"])
            binary = pipeline.binary_mask(mask[..., 0] if mask.ndim == 3 else mask)  # as the runs read it
            for kind, data in (
                ("images", files.png_bytes(np.asarray(example["image"]))),
                ("masks", files.mask_png(binary)),
            ):
                path = os.path.join(partial, split, kind, name + ".png")
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:
                    f.write(data)
        counts[split] = len(source)
        log(f"export: {split}: {len(source)} images and masks ({time.time() - t0:.0f} s)")
    if not counts:
        raise ValueError(f"The dataset {data_config.name!r} has neither a train nor a test split to export.")
    os.replace(partial, out)
    return counts


def main() -> None:
    """CLI: ``--config FILE[:arg]`` with ``--config.key=value`` overrides, as ``diffseg_jax.main``; ``--out DIR``."""
    from absl import flags  # noqa: PLC0415 — flags are defined only when this module is the command

    from diffseg_jax import cli, configlib, writers  # noqa: PLC0415 — only when run as the command

    config = configlib.define_config_flag(
        "config", None, "Config file whose data group names the dataset, e.g. configs/e2_monuseg.py."
    )
    out = flags.DEFINE_string("out", None, "a new folder: OUT/<split>/images and OUT/<split>/masks")
    flags.mark_flags_as_required(["config", "out"])

    def run(_):
        writers.quiet_libraries()
        validation.validate(config.value)
        counts = cli.reporting_user_errors(
            lambda: export(config.value.data, out.value), also=(FileExistsError,)
        )
        size = pipeline.stored_size(config.value.data)
        print(
            f"Exported {', '.join(f'{n} {s}' for s, n in counts.items())} images at {size} px to {out.value}"
        )

    cli.run(run)


if __name__ == "__main__":
    main()
