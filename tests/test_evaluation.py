"""diffseg_jax.evaluate: a trained run sampled and scored on its test split, resumable, written where it replaces no
other result, refused where the config would give its network another meaning."""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from diffseg_jax import (
    auto_batch,
    build,
    configlib,
    data,
    evaluate,
    planning,
    restore,
    sampling,
)

# ---------------------------------------------------------------------------------------------------------------
# Metrics.


# ---------------------------------------------------------------------------------------------------------------
# Ensembles: make_ensemble_fn against a loop of single members with the same keys.


# ---------------------------------------------------------------------------------------------------------------
# The feed-forward protocol.


# ---------------------------------------------------------------------------------------------------------------
# Table 1.


class _ToyNet(nn.Module):
    @nn.compact
    def __call__(self, x, t, cond=None, train=False):
        return nn.Conv(1, (3, 3))(jnp.concatenate([x, cond], -1)) + 0.01 * t[:, None, None, None]


def test_an_interrupted_evaluation_resumes_to_the_uninterrupted_result(tmp_path):

    config = tiny_config("e2_synthetic")
    config.diffusion.num_timesteps = 50
    config.eval.ddim_steps = 3
    model = _ToyNet()
    images = np.random.default_rng(0).uniform(0, 1, (7, 8, 8, 3)).astype(np.float32)
    variables = model.init(
        jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32), images[:1]
    )
    member = sampling.make_member_fn(model, build.build_schedule(config.diffusion), config)
    ensemble = sampling.make_ensemble_fn(member, 3, 2)
    key, calls = jax.random.PRNGKey(5), []

    def counting(*args):
        calls.append(1)
        if len(calls) == crash_at:
            raise RuntimeError("killed")
        return ensemble(*args)

    def run(params, run_id, resume=str(tmp_path / "partial")):
        calls.clear()
        return sampling.sample_statistics(counting, params, images, (8, 8, 1), 2, key, resume, run_id)

    crash_at = None
    full_mean, full_std = run(variables, None, resume=None)  # 7 images in 4 batches, no files
    crash_at = 3  # killed while sampling the third batch
    with pytest.raises(RuntimeError, match="killed"):
        run(variables, {"step": 4})
    assert sorted(os.listdir(tmp_path / "partial")) == ["batch_00000.npz", "batch_00001.npz", "meta.json"]
    crash_at = None
    mean, std = run(variables, {"step": 4})
    assert len(calls) == 2  # only batches 2 and 3 were sampled again
    np.testing.assert_array_equal(mean, full_mean)  # batch i depends on fold_in(key, i) alone
    np.testing.assert_array_equal(std, full_std)
    # Another evaluation (another step, or other weights at the same step) samples everything again.
    run(variables, {"step": 5})
    assert len(calls) == 4
    run(jax.tree.map(lambda w: 1.5 * w, variables), {"step": 5})
    assert len(calls) == 4
    run(jax.tree.map(lambda w: 1.5 * w, variables), {"step": 5})
    assert len(calls) == 0  # finished before: read back whole


def test_sampling_reads_the_weights_whatever_optimizer_or_sampler_trained_them(tmp_path):
    """Evaluation restores only the weights: a run trained with Adam and uniform timesteps evaluates under a
    config with nnU-Net's SGD and the loss-aware sampler (whose states do not fit), while a whole-state
    restore of that checkpoint fails naming it and the fix."""
    from diffseg_jax import checkpoints  # noqa: PLC0415

    config = tiny_config("e2_synthetic")
    _, _, _, state = build.model_and_state(config, (32, 32, 3))
    state = state.replace(
        step=state.step + 7, ema_params=jax.tree.map(lambda p: p + 1.0, state.params)
    )  # weights a fresh state does not have
    ckpt = checkpoints.Checkpointer(str(tmp_path / "checkpoints"))
    ckpt.save(7, state, {})
    ckpt.close()
    other = tiny_config("e2_synthetic")
    other.train.optimizer = "sgd_nesterov"
    other.timesteps.sampling = "loss_aware"
    for use_ema, expected in ((False, state.params), (True, state.ema_params)):
        other.eval.use_ema = use_ema
        _, _, step, variables = restore.trained_network(other, str(tmp_path), 3)
        assert step == 7
        jax.tree.map(np.testing.assert_array_equal, variables["params"], expected)
    _, _, _, fresh = build.model_and_state(other, (32, 32, 3), abstract=True)
    with pytest.raises(
        checkpoints.CheckpointMismatchError, match=r"checkpoints/7 does not fit .*new --workdir"
    ):
        checkpoints.Checkpointer(str(tmp_path / "checkpoints")).restore(7, fresh)


def test_evaluations_go_where_they_replace_no_other_result(tmp_path, monkeypatch):
    """eval/ is the latest model's (Table 1 reads it), eval_step{S}/ an earlier one's (predict/ and
    predict_step{S}/ alike); --eval_dir (--predict_dir) may not be the
    run's own folder or lie in another run's; a --compare_workdir without an evaluation is named before any
    test image is read."""
    run, other = tmp_path / "run", tmp_path / "other"
    for folder in (run, other):
        folder.mkdir()
        (folder / "config.json").write_text("{}")
    assert evaluate.output_dir(str(run), None) == str(run / "eval")
    assert evaluate.output_dir(str(run), None, 45000) == str(run / "eval_step45000")
    # --mode predict's outputs the same way: an earlier checkpoint's never replace the latest one's.
    assert evaluate.output_dir(str(run), None, -1, "predict") == str(run / "predict")
    assert evaluate.output_dir(str(run), None, 7, "predict") == str(run / "predict_step7")
    with pytest.raises(configlib.ConfigError, match=f"--predict_dir {other}/p lies in .*another run"):
        evaluate.output_dir(str(run), str(other / "p"), -1, "predict", "--predict_dir")
    for ok in (run / "eval_ext", tmp_path / "elsewhere" / "eval", run / "eval"):
        assert evaluate.output_dir(str(run), str(ok), 7) == str(ok)
    with pytest.raises(configlib.ConfigError, match="is the run's own folder"):
        evaluate.output_dir(str(run), str(run))
    with pytest.raises(configlib.ConfigError, match=f"another run \\({other}\\)"):
        evaluate.output_dir(str(run), str(other / "eval"))
    (run / "select").mkdir()  # a run inside this one (the protocol's selection run): its own folder
    (run / "select" / "config.json").write_text("{}")
    assert evaluate.output_dir(str(run / "select"), str(run / "select" / "eval_x")) == str(
        run / "select" / "eval_x"
    )

    def no_data(*args, **kwargs):
        raise AssertionError("test images read before the comparison run was checked")

    monkeypatch.setattr(data, "eval_arrays", no_data)
    monkeypatch.setattr(planning, "resolve_as_trained", lambda config, workdir: config)
    with pytest.raises(FileNotFoundError, match="--compare_workdir .*other has no eval/ensemble.npz"):
        evaluate.evaluate(tiny_config(), str(run), compare_workdir=str(other))
    # Another dataset than the run trained on is not scored into its own eval/ (a retyped config file without
    # the training's --config.data.kind, or an external test set without --eval_dir).
    trained = tiny_config()
    trained.data.kind = "nuclei"
    configlib.save(trained, str(run / "config.json"))
    for kind, folder in (("lesion", None), ("lesion", str(run / "eval_step2"))):
        config = tiny_config()
        config.data.kind, config.eval.step = kind, -1 if folder is None else 2
        with pytest.raises(
            configlib.ConfigError,
            match=r"trained on synthetic-nuclei .*this config's data is synthetic-lesion.*--eval_dir .*"
            r"eval_synthetic-lesion.*configs/from_run.py:",
        ):
            evaluate.evaluate(config, str(run))
    config = tiny_config()
    config.data.kind = "lesion"
    with pytest.raises(AssertionError, match="test images read"):  # past the check: a folder of its own
        evaluate.evaluate(config, str(run), out_dir=str(run / "eval_lesion"))
    with pytest.raises(AssertionError, match="test images read"):  # the data it trained on
        evaluate.evaluate(trained, str(run))


def test_an_earlier_checkpoint_kept_by_keep_every_is_the_one_eval_step_reads(tmp_path):
    """``train.keep_every`` keeps checkpoints at its multiples beside the last ``keep_checkpoints``; evaluation,
    prediction and the analyses read ``eval.step`` (the paper's Fig. 3 uses the models after 75 % of training),
    and a step that was not kept is refused with the steps there are."""
    from diffseg_jax import checkpoints  # noqa: PLC0415

    config = tiny_config("e2_synthetic")
    _, _, _, state = build.model_and_state(config, (32, 32, 3))
    states = {}
    ckpt = checkpoints.Checkpointer(str(tmp_path / "checkpoints"), max_to_keep=1, keep_every=4)
    for step in (2, 4, 6, 8):
        states[step] = state.replace(step=step, params=jax.tree.map(lambda p, s=step: p + s, state.params))
        ckpt.save(step, states[step], {})
        ckpt.wait()
    ckpt.close()
    ckpt = checkpoints.Checkpointer(str(tmp_path / "checkpoints"))
    assert ckpt.all_steps() == [4, 8] and ckpt.latest_step() == 8
    ckpt.close()
    for step, state_given, expected in ((-1, None, 8), (4, None, 4), (-1, states[8], 8), (4, states[8], 4)):
        config.eval.step = step
        _, _, got, variables = restore.trained_network(config, str(tmp_path), 3, state_given)
        assert got == expected
        jax.tree.map(np.testing.assert_array_equal, variables["params"], states[expected].params)
    config.eval.step = 6
    with pytest.raises(
        FileNotFoundError, match=r"No checkpoint of step 6 .*holds steps \[4, 8\].*train\.keep_every"
    ):
        restore.trained_network(config, str(tmp_path), 3)
    assert checkpoints.Checkpointer(str(tmp_path / "checkpoints")).all_steps() == [
        4,
        8,
    ]  # reading deletes none


def test_a_run_is_sampled_only_with_the_settings_that_give_its_network_meaning(tmp_path):
    """evaluate / predict / analyse refuse a config that would run the network as something it was not trained
    as (an E1 network as an E2 denoiser, another schedule); another test set and other sampling settings pass."""
    from diffseg_jax import configlib, planning  # noqa: PLC0415

    trained = tiny_config("e1_synthetic")
    configlib.save(trained, str(tmp_path / "config.json"))
    same = tiny_config("e1_synthetic")
    same.data.name, same.data.manual_dir, same.data.resize = "segmentation_folder", "/external", 64
    same.eval.sampler, same.diffusion.variance = "ddim", "fixed_small"
    assert planning.resolve_as_trained(same, str(tmp_path)).experiment == "e1"
    wrong = tiny_config("e2_synthetic")
    wrong.diffusion.num_timesteps = 1000
    with pytest.raises(
        ValueError, match=r"experiment: trained with 'e1', this config has 'e2'; diffusion\.num_timesteps"
    ):
        planning.resolve_as_trained(wrong, str(tmp_path))


def test_an_evaluation_with_an_automatic_batch_equals_the_batch_it_chose(tmp_path, tfds_dir):
    """``eval.batch_size=0`` (the default) on a tiny run: the batch comes from the device's memory, capped at the
    4 test images here, and the evaluation equals one with that batch given explicitly (the samples depend on
    the batch: batch i draws from fold_in(seed, i))."""
    from diffseg_jax import checkpoints  # noqa: PLC0415

    config = tiny_config("e2_synthetic", data_dir=tfds_dir)
    config.eval.update(batch_size=0, num_images=4, ddim_steps=2, num_figure_images=1)
    _, _, _, state = build.model_and_state(config, (32, 32, 3))
    ckpt = checkpoints.Checkpointer(str(tmp_path / "checkpoints"))
    ckpt.save(4, state, {})
    ckpt.close()
    means = {}
    for name, batch in (("auto", 0), ("explicit4", 4)):
        config.eval.batch_size = batch
        evaluate.evaluate(config, str(tmp_path), out_dir=str(tmp_path / name))
        with np.load(tmp_path / name / "ensemble.npz") as saved:
            means[name] = saved["mean"]
    np.testing.assert_array_equal(means["auto"], means["explicit4"])
    assert [batch for _, batch in auto_batch._AUTO_CHOICES.values()][-1] == 4
