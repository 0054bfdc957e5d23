"""diffseg_jax.sampling: members, ensembles and their statistics over many images, sharded and with TTA."""

from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from diffseg_jax import (
    build,
    diffusion,
    sampling,
    validation,
)


class _TinyNet(nn.Module):
    """One conv on [x, cond]: enough to make members differ and depend on the image."""

    @nn.compact
    def __call__(self, x, t, cond=None, train=False):
        del train
        h = x if cond is None else jnp.concatenate([x, cond], -1)
        return nn.Conv(x.shape[-1], (3, 3))(h) + 0.01 * t[:, None, None, None]


def _tiny_sampling(experiment):
    """A 4-step DDIM config of ``experiment``, its schedule, a :class:`_TinyNet`, two 8 px images, its weights."""
    config = tiny_config(f"{experiment}_synthetic")
    config.diffusion.num_timesteps = 50
    config.eval.ddim_steps = 4
    model = _TinyNet()
    images = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (2, 8, 8, 3)), jnp.float32)
    variables = model.init(
        jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32), images[:1]
    )
    return config, build.build_schedule(config.diffusion), model, images, variables


@pytest.mark.parametrize("experiment", ["e1", "e2"])
def test_ensemble_statistics_equal_a_loop_over_members(experiment):
    config, schedule, model, images, variables = _tiny_sampling(experiment)
    member = sampling.make_member_fn(model, schedule, config)
    key = jax.random.PRNGKey(3)
    out = sampling.make_ensemble_fn(member, 3, member_chunk=2)(
        variables, images, jnp.zeros((2, 8, 8, 1)), key
    )
    singles = np.stack(
        [np.asarray(member(variables, images, (2, 8, 8, 1), k)) for k in jax.random.split(key, 3)]
    )
    np.testing.assert_allclose(out["mean"], singles.mean(0), atol=1e-5)
    np.testing.assert_allclose(out["std"], singles.std(0), atol=1e-5)
    assert singles.std(0).max() > 1e-3  # the members really differ (noise input / sampling noise)


def test_hard_members_average_the_votes_of_the_soft_ones():
    # The same keys give the same members; 'hard' thresholds each at 0.5, so the mean is a vote fraction.
    config, schedule, model, images, variables = _tiny_sampling("e2")
    key, template = jax.random.PRNGKey(3), jnp.zeros((2, 8, 8, 1))
    soft = sampling.make_member_fn(model, schedule, config)
    singles = np.stack(
        [np.asarray(soft(variables, images, (2, 8, 8, 1), k)) for k in jax.random.split(key, 4)]
    )
    config.eval.member_output = "hard"
    validation.validate(config)
    out = sampling.make_ensemble_fn(sampling.make_member_fn(model, schedule, config), 4, 2)(
        variables, images, template, key
    )
    votes = (singles > 0.5).astype(np.float32)
    np.testing.assert_allclose(out["mean"], votes.mean(0), atol=1e-6)
    np.testing.assert_allclose(out["std"], votes.std(0), atol=1e-6)
    assert set(np.unique(np.round(4 * np.asarray(out["mean"])))) <= {0, 1, 2, 3, 4}
    assert not np.allclose(singles, votes)  # the soft members were not already binary
    config.eval.member_output = "majority"
    with pytest.raises(ValueError, match="eval.member_output"):
        validation.validate(config)


class _CalNet(nn.Module):
    """A network with an auxiliary head and a postprocess that returns it (as MedSegDiff v1 blends ``cal``)."""

    @nn.compact
    def __call__(self, x, t, cond=None, train=False):
        out = nn.Conv(1, (3, 3))(jnp.concatenate([x, cond], -1))
        return out, {"cal": jnp.full_like(out, 0.25)}

    def postprocess_member(self, sample01, extras):
        return extras["cal"]


@pytest.mark.parametrize("experiment", ["e1", "e2"])
@pytest.mark.parametrize("cal_weight", [0.0, 10.0])
def test_untrained_auxiliary_heads_stay_out_of_the_members(cal_weight, experiment):
    """A trained cal head is blended into E2's members (MedSegDiff v1's sampler); E1 is classical segmentation
    (issue 32): its member is the sigmoid alone, whatever the cal weight."""
    config = tiny_config(f"{experiment}_synthetic")
    config.objective.cal_weight = cal_weight
    schedule = build.build_schedule(config.diffusion)
    model = _CalNet()
    images = jnp.ones((1, 8, 8, 3))
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32), images)
    member = sampling.make_member_fn(model, schedule, config)(
        variables, images, (1, 8, 8, 1), jax.random.PRNGKey(1)
    )
    if cal_weight > 0 and experiment == "e2":  # the trained cal head is the member, as the postprocess says
        np.testing.assert_allclose(member, 0.25)
    else:  # untrained, or E1: the network's own output
        assert not np.allclose(member, 0.25)
    if experiment == "e1":
        assert float(member.min()) > 0 and float(member.max()) < 1  # a sigmoid


def test_the_cal_blend_gets_the_sample_on_the_mask_scale_unclipped():
    """MedSegDiff's code diffuses {0,1} masks and blends its sampler's raw output (x̂0 clipped to [-1, 1]):
    clip(cal + 0.25 s, 0, 1) with s = -0.8 lowers cal by 0.2. Clipping s to [0, 1] first (before issue 32) would
    leave cal at 0.5; under the symmetric range the sample goes in as (x + 1)/2."""
    from diffseg_jax.models.medsegdiff import blend_cal

    x = jnp.asarray([-0.8, 0.3, 1.0, -1.0])
    seen = sampling.diffusion_member(x, {"cal": None}, "binary", lambda s, e: s)
    np.testing.assert_allclose(seen, x)
    np.testing.assert_allclose(
        sampling.diffusion_member(x, {"cal": None}, "symmetric", lambda s, e: s), (x + 1) / 2
    )
    cal = jnp.full(4, 0.5)  # the sample (> 0 at 2 of 4) and cal disagree: Dice 0.5 < 0.65, so cal + 0.25 s
    blended = sampling.diffusion_member(x, {"cal": cal}, "binary", lambda s, e: blend_cal(s, e["cal"]))
    np.testing.assert_allclose(blended, [0.3, 0.575, 0.75, 0.25], atol=1e-6)
    # Without extras (no trained head), the member is the sample mapped to [0, 1], as before.
    np.testing.assert_allclose(sampling.diffusion_member(x, {}, "binary", lambda s, e: s), [0, 0.3, 1, 0])


_SHARDED_SCRIPT = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
import flax.linen as nn
sys.path.insert(0, {root!r})
sys.path.insert(0, {tests!r})
from conftest import assert_metrics_are_the_ensembles, tiny_config
from diffseg_jax import build, evaluate, sampling, train

class Net(nn.Module):
    @nn.compact
    def __call__(self, x, t, cond=None, train=False):
        return nn.Conv(1, (3, 3))(jnp.concatenate([x, cond], -1)) + 0.01 * t[:, None, None, None]

config = tiny_config("e2_synthetic")
config.diffusion.num_timesteps = 50
config.eval.ddim_steps = 3
schedule = build.build_schedule(config.diffusion)
model = Net()
images = np.random.default_rng(0).uniform(0, 1, (6, 8, 8, 3)).astype(np.float32)
variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32), images[:1])
ensemble = sampling.make_ensemble_fn(sampling.make_member_fn(model, schedule, config), 3, 2)
mean, std = sampling.sample_statistics(ensemble, variables, images, (8, 8, 1), 4, jax.random.PRNGKey(5))
print(json.dumps({{"devices": jax.device_count(), "mean": mean.ravel().tolist(), "std": std.ravel().tolist()}}))
"""


def test_sharded_evaluation_does_not_depend_on_the_device_count():
    """6 images in batches of 4 (the last padded), split over 1 or 2 CPU devices: the same statistics."""
    import subprocess
    import sys

    from conftest import ROOT

    results = {}
    for n in (1, 2):
        env = dict(os.environ)
        env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}"
        script = _SHARDED_SCRIPT.format(root=ROOT, tests=os.path.join(ROOT, "tests"))
        out = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
        )
        assert out.returncode == 0, out.stderr[-3000:]
        results[n] = json.loads(out.stdout.strip().splitlines()[-1])
        assert results[n]["devices"] == n
    np.testing.assert_allclose(results[2]["mean"], results[1]["mean"], atol=1e-5)
    np.testing.assert_allclose(results[2]["std"], results[1]["std"], atol=1e-5)
    assert len(results[1]["mean"]) == 6 * 64 and np.std(results[1]["mean"]) > 0


class _RampNet(nn.Module):
    """Logits that rise from left to right whatever the input: what test-time augmentation does to a network
    that is not flip-invariant has a closed form."""

    @nn.compact
    def __call__(self, x, t, cond=None, train=False):
        del t, cond, train
        scale = self.param("scale", nn.initializers.constant(4.0), ())
        ramp = jnp.linspace(-1.0, 1.0, x.shape[2])[None, None, :, None]
        return scale * ramp + 0.0 * x


def test_test_time_augmentation_averages_the_outputs_turned_back():
    config = tiny_config("e1_synthetic")
    schedule = build.build_schedule(config.diffusion)
    model = _RampNet()
    images = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (2, 8, 8, 3)), jnp.float32)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32))
    member = sampling.make_member_fn(model, schedule, config)
    key, template = jax.random.PRNGKey(1), jnp.zeros((2, 8, 8, 1))
    p = jax.nn.sigmoid(4.0 * jnp.linspace(-1.0, 1.0, 8))[None, None, :, None] * jnp.ones((2, 8, 8, 1))
    plain = sampling.make_ensemble_fn(member, 3, None)(variables, images, template, key)
    np.testing.assert_allclose(plain["mean"], p, atol=1e-6)
    # Flips: identity and the height flip give p back, the width flip and the 180° turn its mirror image.
    flips = sampling.make_ensemble_fn(member, 3, 2, tta="flips")(variables, images, template, key)
    mirror = p[:, :, ::-1]
    np.testing.assert_allclose(flips["mean"], (p + mirror) / 2, atol=1e-6)
    np.testing.assert_allclose(flips["std"], jnp.abs(p - mirror) / 2, atol=1e-6)
    # All eight: the mean of an orbit is unchanged by every rotation and flip.
    d4 = sampling.make_ensemble_fn(member, 2, None, tta="d4")(variables, images, template, key)
    for r, f in diffusion.TTA_TRANSFORMS["d4"]:
        np.testing.assert_allclose(diffusion.dihedral(d4["mean"], r, f), d4["mean"], atol=1e-6)
        x = np.arange(2 * 8 * 8 * 3, dtype=np.float32).reshape(2, 8, 8, 3)
        np.testing.assert_array_equal(diffusion.dihedral(diffusion.dihedral(x, r, f), r, f, inverse=True), x)
    assert float(d4["std"].max()) > 0.1
    # On an image-dependent network: a loop over the transforms, each with its members' keys (the identity's
    # are the plain ensemble's), outputs turned back.
    tiny = _TinyNet()
    tv = tiny.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32), images[:1])
    m = sampling.make_member_fn(tiny, schedule, config)
    loop = []
    for i, (r, f) in enumerate(diffusion.TTA_TRANSFORMS["flips"]):
        seen = diffusion.dihedral(images, r, f)
        for k in jax.random.split(key if i == 0 else jax.random.fold_in(key, i), 3):
            loop.append(np.asarray(diffusion.dihedral(m(tv, seen, (2, 8, 8, 1), k), r, f, inverse=True)))
    both = sampling.make_ensemble_fn(m, 3, None, tta="flips")(tv, images, template, key)
    np.testing.assert_allclose(both["mean"], np.mean(loop, 0), atol=1e-5)
    np.testing.assert_allclose(both["std"], np.std(loop, 0), atol=1e-5)
    plain = sampling.make_ensemble_fn(m, 3, None)(tv, images, template, key)
    np.testing.assert_allclose(plain["mean"], np.mean(loop[:3], 0), atol=1e-5)


def _conv_dtypes(hlo_text: str) -> list[str]:
    """The result element type of every convolution in a lowered program's StableHLO text (scan bodies included)."""
    import re

    return re.findall(r"stablehlo\.convolution.*-> tensor<[\dx]*x(\w+)>", hlo_text)


def test_bf16_sampling_runs_the_network_in_bf16_and_keeps_the_sampler_in_f32():
    """``model.dtype=bfloat16`` as evaluation builds the network (``build.model_and_state``): the ensemble's
    convolutions compute in bf16, while x_t, the schedule's arithmetic and the outputs stay float32 (a bf16 x_t
    would not fit the scan's float32 carry), close to the float32 network's samples with the same weights and
    keys."""
    outputs, convs = {}, {}
    key = jax.random.PRNGKey(4)
    images = jnp.asarray(np.random.default_rng(1).random((2, 16, 16, 3)), jnp.float32)
    for dtype in ("float32", "bfloat16"):
        config = tiny_config("e2_synthetic")
        config.model.dtype = dtype
        config.eval.ensemble_size, config.eval.ddim_steps = 2, 4
        model, schedule, _, state = build.model_and_state(config, (16, 16, 3), abstract=True)
        # Random weights everywhere, made on the host (the zero-initialised output layer would leave the
        # network's output zero).
        draw = np.random.default_rng(0).standard_normal
        params = jax.tree.map(lambda p, d=draw: 0.1 * d(p.shape).astype(p.dtype), state.params)
        variables = {"params": params}
        args = (variables, images, jnp.zeros((2, 16, 16, 1)), key)
        lowered = sampling.ensemble_fn(config, model, schedule).lower(*args)
        convs[dtype] = _conv_dtypes(lowered.as_text())
        out = lowered.compile()(*args)
        assert out["mean"].dtype == out["std"].dtype == jnp.float32
        outputs[dtype] = np.asarray(out["mean"])
    assert convs["float32"] and set(convs["float32"]) == {"f32"}
    # Every convolution of the UNet body in bf16; the float32 head (as guided-diffusion's convert_to_fp16) may stay.
    assert convs["bfloat16"].count("bf16") >= len(convs["bfloat16"]) - 1 > 0
    assert np.std(outputs["float32"]) > 0.05  # samples that vary, not a constant both dtypes would agree on
    # Close on the whole (measured: mean |Δ| 2e-4; a rare pixel differs by 0.1, bf16 rounding amplified by the
    # sampling steps), and the same segmentation almost everywhere.
    assert np.abs(outputs["bfloat16"] - outputs["float32"]).mean() < 5e-3
    assert np.mean((outputs["bfloat16"] > 0.5) == (outputs["float32"] > 0.5)) > 0.99
