"""diffseg_jax.protocol: the feed-forward protocol (E1) and its diffusion counterpart (E2): selection, patience,
resume, retraining."""

from __future__ import annotations

import json
import os

import ml_collections
import numpy as np
import pytest
from conftest import assert_metrics_are_the_ensembles, tiny_config

from diffseg_jax import (
    build,
    configlib,
    data,
    protocol,
    restore,
    sampling,
    train,
)


def test_choose_epochs_takes_the_lowest_and_earliest():
    assert protocol.choose_epochs({1: 0.5, 2: 0.3, 3: 0.3, 4: 0.4}) == 2
    with pytest.raises(ValueError, match="No validation losses"):
        protocol.choose_epochs({})


@pytest.mark.slow
def test_e1_protocol_selects_on_validation_then_retrains_on_all(tmp_path, tfds_dir):
    config = tiny_config("e1_synthetic", data_dir=tfds_dir)
    config.data.num_train = 16
    config.data.validation_fraction = 0.25  # fit 12 = 3 steps of 4, validation 4
    config.train.batch_size = 4
    config.train.lr = 1e-3
    config.protocol.max_epochs = 2
    config.eval.num_images = 2
    summary = protocol.run(config, str(tmp_path))
    records = [json.loads(line) for line in open(tmp_path / "select" / "validation.jsonl")]
    assert [r["epoch"] for r in records] == [1, 2] and [r["step"] for r in records] == [3, 6]
    losses = {r["epoch"]: r["validation_loss"] for r in records}
    assert summary["chosen_epochs"] == min(losses, key=losses.get)
    assert summary["final_steps"] == summary["chosen_epochs"] * 4  # epochs of the whole 16-example split
    saved = json.loads((tmp_path / "e1_protocol.json").read_text())
    assert saved["chosen_epochs"] == summary["chosen_epochs"]
    assert (tmp_path / "checkpoints" / str(summary["final_steps"])).is_dir()
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert m["experiment"] == "e1" and m["step"] == summary["final_steps"] and 0 <= m["ece"] <= 1
    assert m == assert_metrics_are_the_ensembles(tmp_path / "eval")
    # Rerunning finds both phases done: nothing is trained (or validated) again.
    config.eval.enabled = False
    again = protocol.run(config, str(tmp_path))
    assert again["chosen_epochs"] == summary["chosen_epochs"]
    assert len(open(tmp_path / "select" / "validation.jsonl").readlines()) == 2


@pytest.mark.slow
def test_e2_protocol_selects_on_validation_iou_then_retrains_on_all(tmp_path, tfds_dir, monkeypatch):
    """Beyond the paper: the diffusion model's step count chosen by the validation IoU of small ensembles."""
    config = tiny_config("e2_synthetic", data_dir=tfds_dir)
    config.data.num_train = 16
    config.data.validation_fraction = 0.25  # fit 12 = 3 steps of 4, validation 4 images
    config.train.batch_size = 4
    config.train.num_steps = 4
    config.train.lr = 1e-3
    config.protocol.validate_every = 2
    config.protocol.ensemble_size = 2
    config.protocol.ddim_steps = 2
    config.eval.enabled = False  # the E1 test checks the evaluation after retraining; here the selection
    maps = {}  # the validation ensembles' mean maps, by step, as the protocol samples them
    sample = sampling.ensemble_maps
    monkeypatch.setattr(
        sampling,
        "ensemble_maps",
        lambda c, m, s, v, images, step, **k: maps.setdefault(step, sample(c, m, s, v, images, step, **k)),
    )
    summary = protocol.run(config, str(tmp_path))
    monkeypatch.undo()
    records = [json.loads(line) for line in open(tmp_path / "select" / "validation.jsonl")]
    assert [r["step"] for r in records] == [2, 4] and [r["epochs"] for r in records] == [0.667, 1.333]
    ious = {r["step"]: r["validation_iou"] for r in records}
    # Each recorded IoU is the pooled IoU of that step's ensemble mean at 0.5 against the 4 validation masks,
    # counted here by hand; and the two steps' ensembles differ (the weights changed).
    truth = data.eval_arrays(config.data, "validation")["mask"][..., 0] > 0.5
    assert truth.shape[0] == 4 and sorted(maps) == [2, 4]
    for step, (mean, _) in maps.items():
        pred = np.asarray(mean)[..., 0] > 0.5
        assert ious[step] == pytest.approx((pred & truth).sum() / (pred | truth).sum(), abs=1e-6)
    assert np.abs(np.asarray(maps[2][0]) - np.asarray(maps[4][0])).max() > 1e-3
    assert all(0.0 <= r["validation_ece"] <= 1.0 for r in records)
    assert summary["chosen_step"] == max(sorted(ious), key=ious.get)  # the highest IoU, the earliest on ties
    assert summary["final_steps"] == round(
        summary["chosen_step"] * 4 / 3
    )  # as many epochs of all 16 examples
    saved = json.loads((tmp_path / "e2_protocol.json").read_text())
    assert saved["validation_iou"] == {str(k): v for k, v in ious.items()}
    assert (tmp_path / "checkpoints" / str(summary["final_steps"])).is_dir()  # retrained on all 16 examples
    # The recorded IoU is that of the step's weights, and the same noise every time: recomputed from the
    # selection run's last checkpoint, it is the same number.
    select = ml_collections.ConfigDict(config.to_dict())
    select.train.num_steps = 4
    _, model, schedule, _, fresh = build.setup(select, abstract=True, split="fit")
    state = restore.load_state(str(tmp_path / "select"), fresh)
    validate = protocol.make_validation_iou_fn(select, model, schedule)
    assert int(state.step) == 4 and validate(state)["validation_iou"] == pytest.approx(ious[4], abs=1e-6)
    # protocol.sampler=ddpm: the validation ensemble is built as an evaluation's with eval.sampler=ddpm.
    built = []
    monkeypatch.setattr(sampling, "ensemble_fn", lambda c, *args: built.append(c.eval.to_dict()))
    select.protocol.sampler = "ddpm"
    protocol.make_validation_iou_fn(select, model, schedule)
    assert built[0]["sampler"] == "ddpm" and built[0]["ensemble_size"] == 2
    monkeypatch.undo()
    # Rerunning finds both phases done: nothing is trained or validated again.
    assert protocol.run(config, str(tmp_path))["chosen_step"] == summary["chosen_step"]
    assert len(open(tmp_path / "select" / "validation.jsonl").readlines()) == 2
    # Each score records how it was sampled; a rerun sampling otherwise is refused, not mixed in.
    assert (records[0]["sampler"], records[0]["ensemble_size"], records[0]["ddim_steps"]) == ("ddim", 2, 2)
    config.protocol.ensemble_size = 3
    with pytest.raises(ValueError, match="protocol.ensemble_size: recorded 2, now 3"):
        protocol.run(config, str(tmp_path))


def test_a_protocol_refuses_a_workdir_it_would_misuse(tmp_path, monkeypatch):
    """Its retraining phase would continue a run the protocol did not start (evaluating that run as the
    protocol's result); a validation fraction of 0 leaves nothing to select on. Both before any training."""
    from diffseg_jax import checkpoints  # noqa: PLC0415

    def no_training(*args, **kwargs):
        raise AssertionError("trained")

    monkeypatch.setattr(train, "train", no_training)
    config = tiny_config("e1_synthetic")
    config.data.validation_fraction = 0.0
    with pytest.raises(configlib.ConfigError, match="data.validation_fraction=0.0.*fraction in \\(0, 1\\)"):
        protocol.run(config, str(tmp_path))
    _, _, _, state = build.model_and_state(tiny_config("e1_synthetic"), (32, 32, 3))
    ckpt = checkpoints.Checkpointer(str(tmp_path / "checkpoints"))
    ckpt.save(3, state.replace(step=state.step + 3), {})
    ckpt.close()
    with pytest.raises(
        configlib.ConfigError, match="holds a trained run .*step 3.*did not start.*new --workdir"
    ):
        protocol.run(tiny_config("e1_synthetic"), str(tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["e1", "e2"])
def test_protocol_patience_stops_the_selection_and_a_crashed_selection_resumes(
    tmp_path, tfds_dir, monkeypatch, experiment
):
    """Scripted validation scores by step (3 steps an epoch of the fit split, a validation each):
    best at step 6, then two without a better one, so ``protocol.patience=2`` stops the selection at step 12
    (the better step 15 is never reached). A crash in the validation at step 9 (before that step's checkpoint)
    and a rerun: training resumes from step 6's checkpoint (steps 3 and 6 are not validated again), validates 9
    and 12, and retrains for the chosen 2 epochs (8 steps of the whole 16-image set)."""
    from diffseg_jax import checkpoints

    config = tiny_config(f"{experiment}_synthetic", data_dir=tfds_dir)
    config.data.num_train = 16
    config.data.validation_fraction = 0.25  # fit 12 = 3 steps of 4, validation 4
    config.train.batch_size = 4
    config.protocol.patience = 2
    config.protocol.max_epochs = 6  # E1: 6 validations, steps 3 ... 18
    config.train.num_steps = 18  # E2: its budget, validated every 3 steps
    config.protocol.validate_every = 3
    config.eval.enabled = False
    losses = {3: 0.5, 6: 0.4, 9: 0.45, 12: 0.47, 15: 0.1, 18: 0.1}
    validated, crash = [], [9]

    def score(state):
        step = int(state.step)
        validated.append(step)
        if step in crash:
            crash.remove(step)
            raise RuntimeError("simulated crash in the validation")
        return losses[step]

    if experiment == "e1":
        monkeypatch.setattr(protocol, "make_validation_fn", lambda *a: score)
    else:  # higher is better
        iou = lambda state: {"validation_iou": 1 - score(state), "validation_ece": 0.0}
        monkeypatch.setattr(protocol, "make_validation_iou_fn", lambda *a: iou)
    with pytest.raises(RuntimeError, match="simulated crash"):
        protocol.run(config, str(tmp_path))
    assert validated == [3, 6, 9]
    summary = protocol.run(config, str(tmp_path))
    assert validated == [3, 6, 9, 9, 12]  # resumed at 6, stopped by patience at 12
    records = [json.loads(line) for line in open(tmp_path / "select" / "validation.jsonl")]
    assert [r["step"] for r in records] == [3, 6, 9, 12]
    assert summary["final_steps"] == 8 and summary["patience"] == 2
    assert summary["chosen_epochs" if experiment == "e1" else "chosen_step"] == (
        2 if experiment == "e1" else 6
    )
    assert sorted(os.listdir(tmp_path / "select" / "checkpoints")) == ["12"]  # the selection stopped at 12
    assert checkpoints.latest_step(str(tmp_path / "checkpoints")) == 8
    # Done: a rerun neither trains nor validates.
    assert protocol.run(config, str(tmp_path))["final_steps"] == 8 and validated == [3, 6, 9, 9, 12]
