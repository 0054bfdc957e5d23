"""Official-weight import: names and shapes of the official EnsemDiff state dict, strictness, round trip."""

import jax
import numpy as np
import pytest

from diffseg_jax import build, convert, models, state_dicts

PUBLISHED = dict(
    model_channels=128, channel_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, attention_resolutions=(16,)
)


def _template(out_channels=1, **kwargs):
    model = models.get_model("ensemdiff", out_channels=out_channels, **(kwargs or PUBLISHED))
    return model, {"params": models.param_shapes(model, (1, 256, 256, 1), (1, 256, 256, 3), (1,))}


def test_ensemdiff_keys_match_the_official_state_dict():
    model, template = _template()
    names = state_dicts.export_state_dict(
        jax.tree.map(lambda a: np.zeros(a.shape, np.float32), template), state_dicts.torch_key_for(model)
    )
    # Counted from the official structure: 32 ResBlocks x 10 tensors, 20 of them with a 1x1 skip (2 each),
    # 6 attention blocks x 6, 5 downsamples + 5 upsamples x 2, time_embed 4, stem 2, head 4.
    assert len(names) == 32 * 10 + 20 * 2 + 6 * 6 + 10 * 2 + 4 + 2 + 4 == 426
    expected = {
        "time_embed.0.weight": (512, 128),
        "time_embed.2.bias": (512,),
        "input_blocks.0.0.weight": (128, 4, 3, 3),
        "input_blocks.1.0.in_layers.0.weight": (128,),
        "input_blocks.1.0.emb_layers.1.weight": (128, 512),
        "input_blocks.1.0.out_layers.3.weight": (128, 128, 3, 3),
        "input_blocks.3.0.op.weight": (128, 128, 3, 3),
        "input_blocks.7.0.skip_connection.weight": (256, 128, 1, 1),
        "input_blocks.13.1.qkv.weight": (1536, 512, 1),
        "input_blocks.13.1.proj_out.bias": (512,),
        "middle_block.1.norm.weight": (512,),
        "middle_block.2.in_layers.2.weight": (512, 512, 3, 3),
        "output_blocks.0.0.skip_connection.weight": (512, 1024, 1, 1),
        "output_blocks.2.1.conv.weight": (512, 512, 3, 3),
        "output_blocks.5.1.qkv.weight": (1536, 512, 1),
        "output_blocks.5.2.conv.weight": (512, 512, 3, 3),
        "output_blocks.17.0.in_layers.2.weight": (128, 256, 3, 3),
        "out.0.weight": (128,),
        "out.2.weight": (1, 128, 3, 3),
    }
    for key, shape in expected.items():
        assert names[key].shape == shape, key


def test_round_trip_and_strictness():
    tiny = dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,))
    model = models.get_model("ensemdiff", out_channels=2, **tiny)
    shapes = {"params": models.param_shapes(model, (1, 16, 16, 1), (1, 16, 16, 3), (1,))}
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32), shapes)
    key_fn = state_dicts.torch_key_for(model)
    sd = state_dicts.export_state_dict(variables, key_fn)
    back = state_dicts.import_state_dict(sd, shapes, key_fn)
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(back)):
        np.testing.assert_array_equal(a, np.asarray(b))
    # Conv kernels are OIHW in the state dict, attention qkv a 1x1 Conv1d.
    assert sd["input_blocks.0.0.weight"].shape == (32, 4, 3, 3)
    assert sd["input_blocks.3.1.qkv.weight"].ndim == 3
    with pytest.raises(ValueError, match="missing.*out.2.weight"):
        state_dicts.import_state_dict({k: v for k, v in sd.items() if k != "out.2.weight"}, shapes, key_fn)
    with pytest.raises(ValueError, match="not mapped.*label_emb.weight"):
        state_dicts.import_state_dict({**sd, "label_emb.weight": np.zeros(3)}, shapes, key_fn)
    bad = dict(sd, **{"out.2.weight": np.zeros((1, 32, 3, 3), np.float32)})
    with pytest.raises(ValueError, match="wrong shape.*out.2.weight"):
        state_dicts.import_state_dict(bad, shapes, key_fn)
    # PyTorch's BatchNorm counters have no counterpart and are ignored.
    state_dicts.import_state_dict({**sd, "x.num_batches_tracked": np.zeros(())}, shapes, key_fn)


def test_npz_loading_and_missing_file(tmp_path):
    np.savez(tmp_path / "w.npz", **{"a.weight": np.ones((2, 3))})
    assert state_dicts.load_state_dict(str(tmp_path / "w.npz"))["a.weight"].shape == (2, 3)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        state_dicts.load_state_dict(str(tmp_path / "nope.pt"))


@pytest.mark.parametrize("bottleneck", ["none", "trained"])
def test_medsegdiff_round_trip_with_batch_stats(bottleneck):
    """params and BatchNorm statistics map to official names; the trained bottleneck has no official twin."""
    tiny = dict(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(4,))
    model = models.get_model(
        "medsegdiff", out_channels=2, cond_features=(16, 32), image_size=32, bottleneck=bottleneck, **tiny
    )
    shapes = jax.eval_shape(
        lambda: model.init(
            jax.random.key(0, impl="rbg"),
            np.zeros((1, 32, 32, 1)),
            np.zeros((1,), np.int32),
            np.zeros((1, 32, 32, 3)),
        )
    )
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32), dict(shapes))
    key_fn = state_dicts.torch_key_for(model)
    sd = state_dicts.export_state_dict(variables, key_fn)
    assert any(k.endswith("running_mean") for k in sd) and any("complex_weight" in k for k in sd)
    assert ("hwm.bottleneck_proj.weight" in sd) == (bottleneck == "trained")
    back = state_dicts.import_state_dict(sd, shapes, key_fn)
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(back)):
        np.testing.assert_array_equal(a, np.asarray(b))


def _convert_cli(weights, workdir, tfds_dir):
    """``python -m diffseg_jax.convert`` of ``weights`` into ``workdir`` on the tiny E2 config, as the README runs it."""
    import subprocess
    import sys

    from conftest import ROOT

    cmd = [sys.executable, "-m", "diffseg_jax.convert", "--config=configs/e2_synthetic.py:tiny"]
    cmd += [f"--config.data.data_dir={tfds_dir}", f"--weights={weights}", f"--workdir={workdir}"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_cli_writes_a_step0_checkpoint_of_the_weights_and_refuses_a_used_workdir(tmp_path, tfds_dir):
    """``python -m diffseg_jax.convert`` with a config override, as the README runs it."""

    from conftest import tiny_config

    from diffseg_jax import checkpoints

    config = tiny_config("e2_synthetic", data_dir=tfds_dir)
    _, model, _, _, state = build.setup(config)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32), state.params)
    sd = state_dicts.export_state_dict({"params": params}, state_dicts.torch_key_for(model))
    np.savez(tmp_path / "weights.npz", **sd)
    workdir = tmp_path / "run"
    out = _convert_cli(tmp_path / "weights.npz", workdir, tfds_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    ckpt = checkpoints.Checkpointer(str(workdir / "checkpoints"))
    restored, meta = ckpt.restore(0, state)
    ckpt.close()
    assert meta["imported_from"] == str(tmp_path / "weights.npz") and int(restored.step) == 0
    for got, want in zip(jax.tree.leaves(restored.params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(got), want)  # every tensor, by name and layout
    for got, want in zip(jax.tree.leaves(restored.ema_params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(got), want)  # evaluation samples the EMA weights by default
    # Again into the same workdir: refused, since --mode evaluate would read the latest step, not step 0.
    again = _convert_cli(tmp_path / "weights.npz", workdir, tfds_dir)
    assert again.returncode != 0 and "already holds a checkpoint at step 0" in again.stderr


def test_weights_files_that_are_not_what_they_claim_are_named(tmp_path):
    from diffseg_jax.data import files

    (tmp_path / "page.npz").write_text("<html>Not Found</html>\n")  # a failed download, saved under the name
    with pytest.raises(
        files.DatasetFileError, match=r"page\.npz is not an \.npz of named arrays: numpy cannot"
    ):
        state_dicts.load_state_dict(str(tmp_path / "page.npz"))
    with open(tmp_path / "single.npz", "wb") as f:
        np.save(f, np.ones(3))
    with pytest.raises(files.DatasetFileError, match=r"single\.npz .*a single unnamed \.npy array"):
        state_dicts.load_state_dict(str(tmp_path / "single.npz"))
    np.savez(tmp_path / "empty.npz")
    with pytest.raises(files.DatasetFileError, match=r"empty\.npz is not a state dict: it holds no arrays"):
        state_dicts.load_state_dict(str(tmp_path / "empty.npz"))
    pytest.importorskip("safetensors")
    (tmp_path / "page.safetensors").write_text("<html>Not Found</html>\n")
    with pytest.raises(files.DatasetFileError, match=r"page\.safetensors is not a \.safetensors file"):
        state_dicts.load_state_dict(str(tmp_path / "page.safetensors"))


def test_a_state_dict_of_another_model_says_so():
    tiny = dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,))
    model = models.get_model("ensemdiff", out_channels=2, **tiny)
    shapes = {"params": models.param_shapes(model, (1, 16, 16, 1), (1, 16, 16, 3), (1,))}
    unrelated = {"encoder.layer1.weight": np.zeros((3, 3)), "head.bias": np.zeros(3)}
    with pytest.raises(
        ValueError, match=r"none of its 2 tensors is named as a parameter.*not a checkpoint of this"
    ):
        state_dicts.import_state_dict(unrelated, shapes, state_dicts.torch_key_for(model))


def test_convert_refuses_bad_weights_files_before_creating_the_checkpoint_folder(tmp_path, tfds_dir):
    """In process (convert_to_workdir) and from the command line: one message naming the file, no traceback,
    and no empty checkpoints/ folder left in the new workdir."""

    from conftest import tiny_config

    from diffseg_jax import configlib
    from diffseg_jax.data import files

    config = tiny_config("e2_synthetic", data_dir=tfds_dir)
    np.savez(tmp_path / "unrelated.npz", **{"encoder.layer1.weight": np.zeros((3, 3))})
    (tmp_path / "page.npz").write_text("<html>Not Found</html>\n")
    workdir = tmp_path / "run"
    with pytest.raises(
        configlib.ConfigError, match=r"--weights .*unrelated\.npz into the config's 'ensemdiff'"
    ):
        convert.convert_to_workdir(config, str(tmp_path / "unrelated.npz"), str(workdir))
    with pytest.raises(files.DatasetFileError, match=r"page\.npz is not an \.npz"):
        convert.convert_to_workdir(config, str(tmp_path / "page.npz"), str(workdir))
    assert not (workdir / "checkpoints").exists()
    out = _convert_cli(tmp_path / "page.npz", workdir, tfds_dir)
    assert out.returncode == 1 and "Error: " in out.stderr and "page.npz is not an .npz" in out.stderr
    assert "Traceback" not in out.stderr and not (workdir / "checkpoints").exists()
