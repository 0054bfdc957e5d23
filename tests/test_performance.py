"""Performance options keep the numbers: bf16 mixed precision, rematerialisation, multi-host training."""

import json
import os
import re
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import ROOT, tiny_config

from diffseg_jax import build, checkpoints, data, defaults, distributed, train, validation


def _batch(size=16, n=4):
    """A fixed batch: uniform noise images and a centred disc mask."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 4) ** 2).astype(np.float32)
    return {
        "image": jnp.asarray(rng.random((n, size, size, 3), np.float32)),
        "mask": jnp.asarray(np.broadcast_to(disc[None, ..., None], (n, size, size, 1))),
    }


def _setup(dtype="float32", remat=False, arch="ensemdiff"):
    config = tiny_config(arg=f"{arch},tiny")
    config.model.dtype, config.model.remat = dtype, remat
    config.objective.loss = "eps_mse"
    config.train.lr = 1e-3
    model = build.build_model(config.model, build.output_channels(config, 3), 16)
    optimizer = build.make_optimizer(config.train)
    make = lambda: build.create_train_state(  # noqa: E731
        build.init_variables(model, jax.random.PRNGKey(0), (1, 16, 16, 1), (1, 16, 16, 3)),
        optimizer,
        jax.random.PRNGKey(1),
    )
    step = train.make_train_step(model, optimizer, build.build_schedule(config.diffusion), config)
    return model, jax.jit(make)(), step


def _losses(state, step, n):
    step = jax.jit(step)
    batch, out = _batch(), []
    for _ in range(n):
        state, metrics = step(state, batch)
        out.append(float(metrics["loss"]))
    return np.asarray(out), state


@pytest.mark.slow
def test_bf16_computes_in_bf16_keeps_f32_params_and_tracks_the_f32_loss_curve():
    model, state32, step32 = _setup("float32")
    _, state16, step16 = _setup("bfloat16")
    # Same float32 initial parameters: the compute dtype does not enter the parameter tree.
    for a, b in zip(jax.tree.leaves(state32.params), jax.tree.leaves(state16.params)):
        assert a.dtype == b.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The bf16 step really convolves in bf16 (and the f32 one does not).
    jaxpr16 = str(jax.make_jaxpr(step16)(state16, _batch()))
    jaxpr32 = str(jax.make_jaxpr(step32)(state32, _batch()))
    assert "conv_general_dilated" in jaxpr16 and "bf16[" in jaxpr16
    assert "bf16[" not in jaxpr32

    n = 6
    l32, _ = _losses(state32, step32, n)
    l16, s16 = _losses(state16, step16, n)
    assert np.all(np.isfinite(l16))
    floats = [
        x for x in jax.tree.leaves((s16.params, s16.opt_state)) if jnp.issubdtype(x.dtype, jnp.floating)
    ]
    assert floats and all(x.dtype == jnp.float32 for x in floats)  # params and Adam moments stay float32
    # Measured (2 CPU cores): the curves agree to < 0.1 % relative over the first 10 steps and drift to a few
    # per cent by step 30 as the two trajectories separate; 2 % over 6 steps leaves room without hiding a bug
    # (a model computing in the wrong dtype or losing the head's float32 cast differs from step 1).
    rel = np.abs(l16 - l32) / np.abs(l32)
    assert rel.max() < 0.02, (l32, l16)
    assert l16[-1] < l16[0]  # and it learns


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["nnunet", "segformer"])
def test_bf16_feed_forward_references_keep_f32_params_and_track_the_f32_e1_loss(arch):
    """model.dtype for the E1 references: the same float32 parameters, bf16 matmuls or convolutions, float32
    logits, and an E1 loss curve that follows float32's."""
    losses, jaxprs = {}, {}
    for dtype in ("float32", "bfloat16"):
        config = tiny_config("e1_synthetic", f"{arch},tiny")
        config.model.dtype = dtype
        if arch == "nnunet":
            config.model.plan.mode = "fixed"  # the tiny plan as it stands: no dataset to plan from
        validation.validate(config, check_data=False)
        model = build.build_model(config.model, build.output_channels(config, 3), 16)
        optimizer = optax.adam(1e-3)  # a rate that moves the weights within a few steps
        variables = build.init_variables(model, jax.random.PRNGKey(0), (1, 16, 16, 1), (1, 16, 16, 3))
        state = build.create_train_state(variables, optimizer, jax.random.PRNGKey(1))
        step = train.make_train_step(model, optimizer, build.build_schedule(config.diffusion), config)
        jaxprs[dtype] = str(jax.make_jaxpr(step)(state, _batch()))
        losses[dtype], state = _losses(state, step, 5)
        floats = [
            x
            for x in jax.tree.leaves((state.params, state.opt_state))
            if jnp.issubdtype(x.dtype, jnp.floating)
        ]
        assert floats and all(x.dtype == jnp.float32 for x in floats)
    assert "bf16[" in jaxprs["bfloat16"] and "bf16[" not in jaxprs["float32"]
    assert np.all(np.isfinite(losses["bfloat16"]))
    # The same first loss to bf16's rounding (a model still in float32 would match exactly), then curves that
    # follow each other. Measured (2 CPU cores): at most 0.19 % (nnU-Net) and 0.11 % (SegFormer) over 5 steps.
    rel = np.abs(losses["bfloat16"] - losses["float32"]) / np.abs(losses["float32"])
    assert 0 < rel[0] and rel.max() < 0.01, losses
    assert losses["bfloat16"][-1] < losses["bfloat16"][0]


@pytest.mark.slow
def test_remat_gives_the_same_parameters_and_step():
    _, plain, step_plain = _setup(remat=False)
    _, remat, step_remat = _setup(remat=True)
    assert jax.tree.structure(plain.params) == jax.tree.structure(remat.params)
    jaxpr = str(jax.make_jaxpr(step_remat)(remat, _batch()))
    assert "remat" in jaxpr or "checkpoint" in jaxpr
    assert "remat" not in str(jax.make_jaxpr(step_plain)(plain, _batch()))
    a, sa = _losses(plain, step_plain, 2)
    b, sb = _losses(remat, step_remat, 2)
    np.testing.assert_allclose(a, b, rtol=1e-5)
    for x, y in zip(jax.tree.leaves(sa.params), jax.tree.leaves(sb.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)


def test_remat_policies_give_the_gradients_of_no_remat_and_keep_what_they_name(capsys):
    """``model.remat_policy`` (issue 31): a ResBlock under every policy differentiates to the one without remat;
    in the UNet, 'nothing' keeps the fewest activations, 'conv_outputs' the ResBlocks' named first 3x3 conv
    outputs besides, 'dots' every convolution's output."""
    from diffseg_jax.models import EnsemDiffUNet
    from diffseg_jax.models.layers import REMAT_RESBLOCKS, ResBlock

    rng = np.random.default_rng(0)
    h, emb = jnp.asarray(rng.standard_normal((2, 8, 8, 32)), jnp.float32), jnp.ones((2, 16), jnp.float32)
    shapes = jax.eval_shape(ResBlock(64).init, jax.random.key(0), h, emb)
    variables = jax.tree.map(lambda a: jnp.asarray(0.1 * rng.standard_normal(a.shape), jnp.float32), shapes)

    def grads(cls):
        loss = lambda v, h: jnp.sum(cls(64).apply(v, h, emb, False) ** 2)  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(variables, h)

    plain = grads(ResBlock)
    for policy, cls in REMAT_RESBLOCKS.items():
        for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(grads(cls))):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

    tiny = dict(
        out_channels=2, model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,)
    )
    x, cond, t = jnp.ones((2, 16, 16, 1)), jnp.ones((2, 16, 16, 3)), jnp.array([1, 5])
    params = jax.eval_shape(EnsemDiffUNet(**tiny).init, jax.random.key(0), x, t, cond)["params"]
    kept = {}
    variants = {"none": {}, **{p: dict(remat=True, remat_policy=p) for p in REMAT_RESBLOCKS}}
    for name, kwargs in variants.items():
        model = EnsemDiffUNet(**tiny, **kwargs)
        capsys.readouterr()  # what the backward pass keeps, traced only
        jax.ad_checkpoint.print_saved_residuals(
            lambda p: jnp.sum(model.apply({"params": p}, x, t, cond)), params
        )
        kept[name] = capsys.readouterr().out.splitlines()
    resblocks = 8  # 2 encoder, 2 middle, 2 + 2 decoder
    named = lambda name: [line for line in kept[name] if "named 'conv_out'" in line]  # noqa: E731
    assert len(named("conv_outputs")) == resblocks and not named("nothing")
    assert len(kept["nothing"]) < len(kept["dots"]) < len(kept["none"])
    assert any("conv_general_dilated" in line for line in kept["dots"])
    assert not any("conv_general_dilated" in line for line in kept["nothing"] + kept["conv_outputs"])


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(remat=True, remat_policy="everything"), "model.remat_policy.*Choose one of"),
        (dict(remat_policy="dots"), "model.remat_policy.*set --config.model.remat=True"),
        (dict(norm_impl="bfloat16"), "model.norm_impl.*Choose one of"),
        (dict(attention_impl="flash"), "model.attention_impl.*Choose one of"),
        (dict(attention_impl="cudnn"), "needs model.dtype='bfloat16'"),
        (dict(attention_impl="cudnn", dtype="bfloat16"), "only on an NVIDIA GPU.*backend is cpu"),
    ],
)
def test_train_step_forms_are_checked_with_their_fix(overrides, match):
    config = tiny_config()
    config.model.update(overrides)
    with pytest.raises(ValueError, match=match):
        validation.validate(config, check_data=False)


def test_cudnn_attention_names_the_head_width_it_cannot_take(monkeypatch):
    """Published EnsemDiff attends with one 512-channel head, beyond cuDNN's 256 (checked as on a GPU)."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    config = defaults.get_config("ensemdiff")
    config.model.update(attention_impl="cudnn", dtype="bfloat16")
    with pytest.raises(ValueError, match=r"heads of \[512\] channels.*'dot_product'"):
        validation.validate(config, check_data=False)
    config.model.num_head_channels = 64  # 8 heads of 64: cuDNN takes them
    validation.validate(config, check_data=False)


def test_configs_without_the_train_step_forms_still_validate():
    """A run's config saved before issue 31 lacks the three keys: the published forms, no error."""
    config = tiny_config()
    with config.unlocked():
        for key in ("remat_policy", "norm_impl", "attention_impl"):
            del config.model[key]
    validation.validate(config, check_data=False)


def test_unknown_compute_dtype_is_rejected():
    config = tiny_config()
    config.model.dtype = "float16"
    with pytest.raises(ValueError, match="model.dtype"):
        validation.validate(config, check_data=False)


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _logged_losses(log):
    return [float(m) for m in re.findall(r"step \d+/\d+  loss ([0-9.]+)", log)]


@pytest.mark.slow
def test_two_hosts_train_in_lock_step_to_the_single_host_parameters(tmp_path, tfds_dir):
    """Two processes on localhost (one CPU device each, gloo collectives) against one process, same global batch:
    the dataset built once into a fresh data_dir, the same losses, parameters and evaluation."""
    from diffseg_jax import evaluate

    steps = 4
    config = tiny_config(data_dir=tfds_dir)
    config.train.num_steps, config.train.log_every, config.train.ckpt_every = steps, 1, steps
    ref_dir = str(tmp_path / "one_host")
    ref_metrics = evaluate.evaluate(config, ref_dir, state=train.train(config, ref_dir))

    multi_dir = tmp_path / "two_hosts"
    port = _free_port()
    args = [
        sys.executable, "-m", "diffseg_jax.main", "--config", "configs/e2_synthetic.py:tiny",
        # Both hosts find the dataset missing: process 0 builds it while the other waits (else both build it
        # and one fails renaming tfds' temporary folder).
        "--workdir", str(multi_dir), f"--config.data.data_dir={tmp_path / 'tfds_two_hosts'}",
        f"--config.train.num_steps={steps}", "--config.train.log_every=1", f"--config.train.ckpt_every={steps}",
    ]  # fmt: skip
    procs = []
    for pid in range(2):
        env = dict(
            os.environ,
            JAX_PLATFORMS="cpu",
            JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(pid),
        )
        procs.append(
            subprocess.Popen(
                args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=600)[0])
    finally:
        for proc in procs:
            proc.kill()
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, log[-3000:]
    assert "of 2 host(s)" in logs[0]
    # Lock-step: both hosts saw the same global loss at every step, and it is the single host's loss.
    ref = [json.loads(line)["loss"] for line in open(os.path.join(ref_dir, "metrics.jsonl"))]
    for log in logs:
        np.testing.assert_allclose(_logged_losses(log), ref, rtol=1e-4)
    # The checkpoints (the last and the 75 % one of train.keep_at), written once by the two processes together,
    # and the same parameters as one host.
    kept = sorted({steps, *train.kept_steps(config.train)})
    assert sorted(os.listdir(multi_dir / "checkpoints"), key=int) == [str(s) for s in kept] and len(kept) == 2
    assert len(open(multi_dir / "metrics.jsonl").readlines()) == steps  # only process 0 writes metrics
    _, _, _, _, abstract = build.setup(config, abstract=True)
    restored = []
    for workdir in (ref_dir, str(multi_dir)):
        ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"))
        restored.append(ckpt.restore(steps, abstract)[0])
        ckpt.close()
    for a, b in zip(jax.tree.leaves(restored[0].params), jax.tree.leaves(restored[1].params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    # The evaluation sampled on both hosts (its batch a multiple of the 2 devices) scores as the single host's.
    metrics = json.loads((multi_dir / "eval" / "metrics.json").read_text())
    assert metrics["num_images"] == ref_metrics["num_images"] == 4 and metrics["step"] == steps
    for key in ("iou", "ece", "mean_std"):
        assert metrics[key] == pytest.approx(ref_metrics[key], rel=1e-3, abs=1e-4), key
    assert not (multi_dir / "eval" / "partial").exists()  # the batches kept for a resume are gone when done


def test_distributed_environment_is_checked():
    assert not distributed.initialize_from_env({})
    with pytest.raises(ValueError, match="JAX_PROCESS_ID missing"):
        distributed.initialize_from_env({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"})
    with pytest.raises(ValueError, match="outside 0..1"):
        distributed.initialize_from_env(
            {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}
        )


def test_host_shards_concatenate_to_the_single_host_batch(tfds_dir):
    config = tiny_config(data_dir=tfds_dir)
    whole = data.train_dataset(config.data, batch_size=8, seed=3)
    halves = [data.train_dataset(config.data, batch_size=8, seed=3, shard=(h, 2)) for h in range(2)]
    for step in (0, 5):
        for key in ("image", "mask"):
            joined = np.concatenate([halves[0][step][key], halves[1][step][key]])
            np.testing.assert_array_equal(joined, whole[step][key])
    # The read-ahead stream yields exactly the indexed batches, threads or not, from any start.
    stream = data.batch_stream(whole, 2, num_threads=3, buffer=4)
    for step in range(2, 6):
        np.testing.assert_array_equal(next(stream)["image"], whole[step]["image"])
