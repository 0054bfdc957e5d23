"""Tests for the SegDiff port: published counts, official key map, RRDB encoder, caching of F(I)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import OFFICIAL_CASES, check_official

from diffseg_jax.data import segdiff_augment
from diffseg_jax.diffusion import ddim_sample, get_schedule
from diffseg_jax.models import MODELS, can_drop_image, get_model, param_count, param_shapes
from diffseg_jax.models.rrdb import RRDBNet
from diffseg_jax.models.segdiff import SegDiffUNet, torch_key
from diffseg_jax.state_dicts import export_state_dict, import_weights, to_flax_layout

# MoNuSeg: 1-channel mask x_t, RGB image, eps output.  H and W do not change any parameter shape.
FULL_X, FULL_COND, FULL_T = (1, 64, 64, 1), (1, 64, 64, 3), (1,)
TINY = {
    "out_channels": 1,
    "model_channels": 32,
    "channel_mult": (1, 2),
    "num_res_blocks": 1,
    "attention_resolutions": (2,),  # 16x16 of a 32x32 input, where the channels change
    "num_heads": 4,
    "rrdb_blocks": 1,
    "rrdb_features": 16,
    "rrdb_growth": 8,
}


# XLA's CPU backend optimisations dominate compile time here (2 cores); they do not change what is tested,
# and programs compared for exact equality are compiled with the same options.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
_MODEL = SegDiffUNet(**TINY)
_forward = _jit(lambda v, x, t, cond: _MODEL.apply(v, x, t, cond))
_forward_cached = _jit(lambda v, x, t, feats: _MODEL.apply(v, x, t, None, image_features=feats))
_encode = _jit(lambda v, cond: _MODEL.apply(v, cond, method="encode_image"))


@functools.cache
def _full_shapes():
    """eval_shape parameter tree of the full MoNuSeg model (no compute)."""
    return param_shapes(SegDiffUNet(out_channels=1), FULL_X, FULL_COND, FULL_T)


def _paths(tree):
    """(path tuple, leaf) pairs of a nested dict."""
    return [(tuple(k.key for k in kp), leaf) for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _fill(tree, seed=0, scale=0.1):
    """Random NumPy values for every leaf (avoids compiling Flax initialisers with threefry)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda a: jnp.asarray(scale * rng.standard_normal(a.shape), jnp.float32), tree
    )


def _tiny_inputs(seed=0, batch=2, size=32):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((batch, size, size, 1)), jnp.float32)
    cond = jnp.asarray(rng.standard_normal((batch, size, size, 3)), jnp.float32)
    t = jnp.array([3, 57], jnp.int32)[:batch]
    return x, t, cond


@functools.cache
def _tiny_params(seed=0):
    """Random non-zero parameters of the tiny model (head included)."""
    x, t, cond = _tiny_inputs()
    return {"params": _fill(param_shapes(SegDiffUNet(**TINY), x.shape, cond.shape, t.shape), seed)}


# ---------------------------------------------------------------- the official PyTorch structure
def _official_state_dict_shapes(
    in_ch=1,
    img_ch=3,
    mc=128,
    out_ch=1,
    mult=(1, 1, 1, 2, 2, 4, 4),
    nrb=3,
    attn_ds=(16, 32),
    nb=12,
    nf=64,
    gc=32,
):
    """Key -> PyTorch shape of the official ``UNetModel.state_dict()``, from its constructor's logic."""
    sd = {}

    def conv(p, cin, cout, k=3):
        sd[p + ".weight"], sd[p + ".bias"] = (cout, cin, k, k), (cout,)

    def conv1d(p, cin, cout):
        sd[p + ".weight"], sd[p + ".bias"] = (cout, cin, 1), (cout,)

    def linear(p, cin, cout):
        sd[p + ".weight"], sd[p + ".bias"] = (cout, cin), (cout,)

    def gn(p, c):
        sd[p + ".weight"], sd[p + ".bias"] = (c,), (c,)

    def resblock(p, cin, cout):
        gn(p + ".in_layers.0", cin)
        conv(p + ".in_layers.2", cin, cout)
        linear(p + ".emb_layers.1", 4 * mc, cout)
        gn(p + ".out_layers.0", cout)
        conv(p + ".out_layers.3", cout, cout)
        if cin != cout:
            conv(p + ".skip_connection", cin, cout, k=1)

    def attention(p, c):
        gn(p + ".norm", c)
        conv1d(p + ".qkv", c, 3 * c)
        conv1d(p + ".proj_out", c, c)

    linear("time_embed.0", mc, 4 * mc)
    linear("time_embed.2", 4 * mc, 4 * mc)
    conv("rrdb.conv_first", img_ch, nf)
    for i in range(nb):
        for r in (1, 2, 3):
            for n in range(1, 6):
                conv(f"rrdb.RRDB_trunk.{i}.RDB{r}.conv{n}", nf + (n - 1) * gc, nf if n == 5 else gc)
    conv("rrdb.trunk_conv", nf, nf)
    conv("rrdb.HRconv", nf, nf)
    conv("rrdb.conv_last", nf, mc)

    conv("input_blocks.0.0", in_ch, mc)
    chans, ch, ds, idx = [mc], mc, 1, 1
    for level, m in enumerate(mult):
        for _ in range(nrb):
            resblock(f"input_blocks.{idx}.0", ch, m * mc)
            ch = m * mc
            if ds in attn_ds:
                attention(f"input_blocks.{idx}.1", ch)
            chans.append(ch)
            idx += 1
        if level != len(mult) - 1:
            conv(f"input_blocks.{idx}.0.op", ch, ch)
            chans.append(ch)
            ds *= 2
            idx += 1
    resblock("middle_block.0", ch, ch)
    attention("middle_block.1", ch)
    resblock("middle_block.2", ch, ch)
    idx = 0
    for level, m in list(enumerate(mult))[::-1]:
        for i in range(nrb + 1):
            resblock(f"output_blocks.{idx}.0", ch + chans.pop(), m * mc)
            ch, sub = m * mc, 1
            if ds in attn_ds:
                attention(f"output_blocks.{idx}.{sub}", ch)
                sub += 1
            if level and i == nrb:
                conv(f"output_blocks.{idx}.{sub}.conv", ch, ch)
                ds //= 2
            idx += 1
    gn("out.0", ch)
    conv("out.2", mc, out_ch)
    return sd


# ---------------------------------------------------------------- published parameter counts and structure
def test_published_param_counts():
    params = _full_shapes()
    assert param_count(params) == 164_154_753
    assert param_count(params["rrdb"]) == 8_782_592
    assert param_count({k: v for k, v in params.items() if k != "rrdb"}) == 155_372_161

    def part(prefix):
        return sum(param_count(v) for k, v in params.items() if k.startswith(prefix))

    assert part("time_embed") == 328_704
    assert part("input_blocks") == 47_652_352 and param_count(params["input_blocks_0_0"]) == 1_280
    assert part("middle_block") == 11_020_288
    assert part("output_blocks") == 96_369_408
    assert param_count(params["out_norm"]) + param_count(params["out_conv"]) == 1_409
    # The independent transcription of the PyTorch constructor gives the same total.
    assert sum(math.prod(s) for s in _official_state_dict_shapes().values()) == 164_154_753


def test_rrdb_block_count_matches_published_variants():
    def rrdb_count(nb):
        net = RRDBNet(out_channels=128, num_blocks=nb)
        return param_count(jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3))))

    per_block = rrdb_count(2) - rrdb_count(1)
    assert per_block == 719_424
    assert rrdb_count(12) == 8_782_592
    assert 164_154_753 - 2 * per_block == 162_715_905  # rrdb_blocks 10
    assert 164_154_753 + 3 * per_block == 166_313_025  # rrdb_blocks 15 (Cityscapes)


def test_published_structure():
    params = _full_shapes()

    def blocks(prefix, marker):
        return [k for k, v in params.items() if k.startswith(prefix) and marker in v]

    assert len(blocks("input_blocks_", "emb_dense")) == 21  # 7 levels x 3
    assert len(blocks("middle_block_", "emb_dense")) == 2
    assert len(blocks("output_blocks_", "emb_dense")) == 28  # 7 levels x 4
    attn = {p: blocks(p, "qkv") for p in ("input_blocks_", "middle_block_", "output_blocks_")}
    assert sum(map(len, attn.values())) == 15
    assert len(attn["input_blocks_"]) == 6 and len(attn["output_blocks_"]) == 8
    # Attention at 16x16 (256 ch) and 8x8 (512 ch) of a 256 input, plus the middle block.
    assert sorted({params[k]["qkv"]["kernel"].shape[0] for k in attn["input_blocks_"]}) == [256, 512]
    assert len(blocks("input_blocks_", "op")) == 6 and len(blocks("output_blocks_", "conv")) == 6
    assert sorted(params["rrdb"]) == sorted(
        ["conv_first", "trunk_conv", "HRconv", "conv_last"] + [f"RRDB_trunk_{i}" for i in range(12)]
    )
    assert params["rrdb"]["conv_last"]["kernel"].shape == (3, 3, 64, 128)  # F(I) has G(x_t)'s width
    assert params["input_blocks_0_0"]["kernel"].shape == (3, 3, 1, 128)  # G sees only x_t


# ---------------------------------------------------------------- official weight mapping
def test_torch_key_matches_official_state_dict():
    expected = _official_state_dict_shapes()
    paths = _paths(_full_shapes())
    keys = [torch_key(p) for p, _ in paths]
    assert len(set(keys)) == len(keys) == len(expected)  # injective and complete
    assert set(keys) == set(expected)
    for (path, leaf), key in zip(paths, keys):
        # Zero-stride view: checks the layout conversion without allocating 164M floats.
        torch_shaped = np.broadcast_to(np.float32(0), expected[key])
        assert to_flax_layout(path, torch_shaped).shape == leaf.shape, key

    spots = {
        ("time_embed", "dense_0", "kernel"): "time_embed.0.weight",
        ("time_embed", "dense_1", "bias"): "time_embed.2.bias",
        ("input_blocks_0_0", "kernel"): "input_blocks.0.0.weight",
        ("input_blocks_1_0", "in_conv", "kernel"): "input_blocks.1.0.in_layers.2.weight",
        ("input_blocks_1_0", "in_norm", "scale"): "input_blocks.1.0.in_layers.0.weight",
        ("input_blocks_3_0", "emb_dense", "bias"): "input_blocks.3.0.emb_layers.1.bias",
        ("input_blocks_4_0", "op", "kernel"): "input_blocks.4.0.op.weight",
        ("input_blocks_13_0", "skip_connection", "kernel"): "input_blocks.13.0.skip_connection.weight",
        ("input_blocks_17_1", "qkv", "kernel"): "input_blocks.17.1.qkv.weight",
        ("middle_block_1", "proj_out", "bias"): "middle_block.1.proj_out.bias",
        ("middle_block_2", "out_conv", "kernel"): "middle_block.2.out_layers.3.weight",
        ("output_blocks_0_0", "out_norm", "bias"): "output_blocks.0.0.out_layers.0.bias",
        ("output_blocks_7_2", "conv", "kernel"): "output_blocks.7.2.conv.weight",
        ("out_norm", "scale"): "out.0.weight",
        ("out_conv", "kernel"): "out.2.weight",
        ("rrdb", "conv_first", "kernel"): "rrdb.conv_first.weight",
        ("rrdb", "RRDB_trunk_11", "RDB3", "conv5", "kernel"): "rrdb.RRDB_trunk.11.RDB3.conv5.weight",
        ("rrdb", "RRDB_trunk_0", "RDB1", "conv2", "bias"): "rrdb.RRDB_trunk.0.RDB1.conv2.bias",
        ("rrdb", "trunk_conv", "bias"): "rrdb.trunk_conv.bias",
        ("rrdb", "HRconv", "kernel"): "rrdb.HRconv.weight",
        ("rrdb", "conv_last", "kernel"): "rrdb.conv_last.weight",
    }
    for path, key in spots.items():
        assert torch_key(path) == key
        assert key in expected
    assert expected["input_blocks.17.1.qkv.weight"] == (768, 256, 1)
    assert expected["output_blocks.0.0.skip_connection.weight"] == (512, 1024, 1, 1)


def test_official_state_dict_import_round_trip():
    """Our params exported under the official names and layouts import back exactly (diffseg_jax.convert)."""
    params = _tiny_params()
    state_dict = export_state_dict(params["params"], torch_key)
    assert state_dict["rrdb.conv_first.weight"].shape == (16, 3, 3, 3)  # OIHW
    assert state_dict["input_blocks.3.1.qkv.weight"].shape == (192, 64, 1)  # 1x1 Conv1d
    assert state_dict["time_embed.0.weight"].shape == (128, 32)  # Linear (out, in)
    back = import_weights(_MODEL, params["params"], state_dict)
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, params["params"])
    with pytest.raises(ValueError, match="not mapped"):
        import_weights(_MODEL, params["params"], {**state_dict, "label_emb.weight": np.zeros(3)})


# ---------------------------------------------------------------- RRDB encoder
def _np_conv3x3(x, kernel, bias):
    """NHWC 3x3 convolution with zero padding 1 (PyTorch Conv2d(k=3, padding=1) semantics)."""
    h, w = x.shape[1:3]
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = sum(
        np.einsum("bhwi,io->bhwo", xp[:, dy : dy + h, dx : dx + w], kernel[dy, dx])
        for dy in range(3)
        for dx in range(3)
    )
    return out + bias


def _np_rrdbnet(p, x):
    """NumPy transcription of the official RRDBNet.forward."""
    lrelu = lambda v: np.where(v > 0, v, 0.2 * v)
    conv = lambda q, v: _np_conv3x3(v, np.asarray(q["kernel"]), np.asarray(q["bias"]))
    fea = conv(p["conv_first"], x)
    trunk = fea
    for i in range(sum(k.startswith("RRDB_trunk_") for k in p)):
        out = trunk
        for r in (1, 2, 3):
            q = p[f"RRDB_trunk_{i}"][f"RDB{r}"]
            x1 = lrelu(conv(q["conv1"], out))
            x2 = lrelu(conv(q["conv2"], np.concatenate([out, x1], -1)))
            x3 = lrelu(conv(q["conv3"], np.concatenate([out, x1, x2], -1)))
            x4 = lrelu(conv(q["conv4"], np.concatenate([out, x1, x2, x3], -1)))
            x5 = conv(q["conv5"], np.concatenate([out, x1, x2, x3, x4], -1))
            out = x5 * 0.2 + out
        trunk = out * 0.2 + trunk
    fea = fea + conv(p["trunk_conv"], trunk)
    return conv(p["conv_last"], lrelu(conv(p["HRconv"], fea)))


def test_rrdbnet_matches_numpy_transcription():
    net = RRDBNet(out_channels=5, features=4, num_blocks=2, growth=2)
    x = np.random.default_rng(3).standard_normal((2, 6, 5, 3)).astype(np.float32)
    variables = _fill(jax.eval_shape(net.init, jax.random.key(0), x), seed=4, scale=0.3)
    y = np.asarray(jax.jit(net.apply)(variables, x))
    assert y.shape == (2, 6, 5, 5)
    expected = _np_rrdbnet(variables["params"], x.astype(np.float64))
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)


def test_rrdb_uses_pytorch_default_init():
    net = RRDBNet(out_channels=8, features=64, num_blocks=1, growth=32)
    # Returning one conv lets XLA drop the other initialisers (compiling them all is slow on CPU).
    pick = jax.jit(
        lambda key: net.init(key, jnp.zeros((1, 4, 4, 3)))["params"]["RRDB_trunk_0"]["RDB3"]["conv5"]
    )
    conv5 = pick(jax.random.key(0, impl="rbg"))
    bound = 1 / math.sqrt(9 * (64 + 4 * 32))  # U(-1/sqrt(fan_in), 1/sqrt(fan_in)), kernel and bias
    k, b = np.asarray(conv5["kernel"]), np.asarray(conv5["bias"])
    assert np.abs(k).max() <= bound and np.abs(b).max() <= bound and np.abs(b).min() > 0
    np.testing.assert_allclose(k.std(), bound / math.sqrt(3), rtol=0.03)


# ---------------------------------------------------------------- tiny forward passes
def test_tiny_forward_zero_init_and_dependencies():
    x, t, cond = _tiny_inputs()

    def zero_init_leaves(key):
        # Only these leaves of the real init are returned, so XLA drops the other initialisers: fast.
        p = _MODEL.init(key, x, t, cond)["params"]
        return {k: p[k] for k in ("out_conv", "input_blocks_1_0", "middle_block_1")}

    real = _jit(zero_init_leaves)(jax.random.key(1, impl="rbg"))
    assert not np.any(np.asarray(real["out_conv"]["kernel"]))
    assert not np.any(np.asarray(real["out_conv"]["bias"]))
    assert not np.any(np.asarray(real["input_blocks_1_0"]["out_conv"]["kernel"]))  # ResBlock out_layers.3
    assert not np.any(np.asarray(real["middle_block_1"]["proj_out"]["kernel"]))  # attention proj_out
    assert np.any(np.asarray(real["input_blocks_1_0"]["in_conv"]["kernel"]))

    params = _tiny_params()
    # The initialised head makes the output exactly zero whatever the rest of the parameters are.
    at_init = {"params": {**params["params"], "out_conv": real["out_conv"]}}
    out0 = _forward(at_init, x, t, cond)
    assert out0.shape == (2, 32, 32, 1) and out0.dtype == jnp.float32
    assert not np.any(np.asarray(out0))

    out = np.asarray(_forward(params, x, t, cond))
    assert np.abs(out).mean() > 1e-3
    other_image = np.asarray(_forward(params, x, t, cond[::-1]))
    assert np.abs(other_image - out).mean() > 1e-3 * np.abs(out).mean()
    other_t = np.asarray(_forward(params, x, jnp.array([4, 57], jnp.int32), cond))
    assert np.abs(other_t[0] - out[0]).max() > 1e-6 and np.array_equal(other_t[1], out[1])


def test_cached_image_features_equal_uncached():
    x, t, cond = _tiny_inputs()
    params = _tiny_params()
    feats = _encode(params, cond)
    assert feats.shape == (2, 32, 32, TINY["model_channels"])
    # Both spellings of the method work (eager vs compiled: equal up to rounding).
    np.testing.assert_allclose(_MODEL.apply(params, cond, method=SegDiffUNet.encode_image), feats, atol=1e-5)
    full = _forward(params, x, t, cond)
    cached = _forward_cached(params, x, t, feats)
    np.testing.assert_array_equal(np.asarray(cached), np.asarray(full))
    with pytest.raises(ValueError, match="image_features"):
        jax.eval_shape(_MODEL.apply, params, x, t, None, image_features=feats[..., :8])


def test_sampling_with_cached_features_is_identical():
    # One resolution level (still with F, ResBlocks and the middle attention) keeps the two compiles short.
    model = SegDiffUNet(**{**TINY, "channel_mult": (1,), "attention_resolutions": ()})
    x, _, cond = _tiny_inputs(size=16)
    params = {"params": _fill(param_shapes(model, x.shape, cond.shape, (2,)), seed=1)}
    feats = _jit(lambda v, c: model.apply(v, c, method="encode_image"))(params, cond)
    # SegDiff's T = 100 and unclipped x0 (clip_denoised=False); 5 DDIM steps keep the test short.
    run = functools.partial(
        ddim_sample,
        schedule=get_schedule("linear", num_timesteps=100),
        shape=x.shape,
        num_steps=5,
        clip_range=None,
    )

    @_jit
    def sample_uncached(image, key):
        return run(lambda x_t, t: model.apply(params, x_t, t, image), key=key)

    @_jit
    def sample_cached(features, key):
        return run(lambda x_t, t: model.apply(params, x_t, t, None, image_features=features), key=key)

    key = jax.random.key(7)
    a = np.asarray(sample_uncached(cond, key))
    np.testing.assert_array_equal(np.asarray(sample_cached(feats, key)), a)
    # The image matters for the sample, so the equality above is not trivial.
    assert np.abs(np.asarray(sample_uncached(cond[::-1], key)) - a).max() > 1e-4


def test_without_image_the_branch_is_removed():
    x, t, cond = _tiny_inputs()
    no_image = param_shapes(_MODEL, x.shape, None, t.shape)
    with_image = param_shapes(_MODEL, x.shape, cond.shape, t.shape)
    assert "rrdb" not in no_image
    assert jax.tree_util.tree_structure(no_image) == jax.tree_util.tree_structure(
        {k: v for k, v in with_image.items() if k != "rrdb"}
    )
    params = _tiny_params()["params"]
    body = {"params": {k: v for k, v in params.items() if k != "rrdb"}}
    out = np.asarray(_jit(lambda v, x, t: _MODEL.apply(v, x, t))(body, x, t))
    assert np.abs(out).mean() > 1e-3
    # Removing F is the same as adding F(I) = 0 after the first conv.
    zeros = jnp.zeros((2, 32, 32, TINY["model_channels"]))
    np.testing.assert_allclose(out, _forward_cached({"params": params}, x, t, zeros), atol=1e-6)
    assert np.abs(out - np.asarray(_forward({"params": params}, x, t, cond))).max() > 1e-4


def test_gradients_reach_every_parameter():
    x, t, cond = _tiny_inputs(size=16)
    params = _tiny_params()["params"]
    w = jnp.asarray(np.random.default_rng(5).standard_normal((2, 16, 16, 1)), jnp.float32)

    def loss(p):
        return jnp.sum(_MODEL.apply({"params": p}, x, t, cond) * w)

    grads = _jit(jax.grad(loss))(params)
    dead = [torch_key(path) for path, g in _paths(grads) if not np.any(np.asarray(g))]
    assert not dead, dead


def test_mixed_precision_keeps_float32_params_and_output():
    model = SegDiffUNet(**TINY, dtype=jnp.bfloat16)
    x, t, cond = _tiny_inputs()
    params = param_shapes(model, x.shape, cond.shape, t.shape)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.float32)}
    out = jax.eval_shape(model.apply, {"params": params}, x, t, cond)
    assert out.dtype == jnp.float32 and out.shape == (2, 32, 32, 1)


def test_registry():
    assert MODELS["segdiff"] is SegDiffUNet
    assert can_drop_image("segdiff")
    model = get_model("segdiff", out_channels=1)
    assert model.channel_mult == (1, 1, 1, 2, 2, 4, 4) and model.attention_resolutions == (16, 32)
    assert (model.num_res_blocks, model.num_heads, model.rrdb_blocks) == (3, 4, 12)
    assert not model.use_scale_shift_norm and model.dropout == 0.0


def test_image_standardisation_is_the_official_loaders():
    """With MoNuSeg's statistics, F sees (255·image − mean) / std of the [0, 1] image, as the official loader."""
    mean, std = (142.07, 98.48, 132.96), (65.78, 57.05, 57.78)
    model = SegDiffUNet(**TINY, image_mean=mean, image_std=std)
    params = _tiny_params()  # no parameters added by the normalisation
    image = jnp.asarray(np.random.default_rng(3).uniform(0, 1, (1, 32, 32, 3)), jnp.float32)
    ours = _jit(lambda v, c: model.apply(v, c, method="encode_image"))(params, image)
    expected = _encode(params, (image * 255.0 - jnp.asarray(mean)) / jnp.asarray(std))
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(ours, _encode(params, image), atol=1e-3)


@OFFICIAL_CASES
def test_segdiff_matches_official_fixture(corrupt, tmp_path):
    """tomeramit/SegDiff's ``UNetModel`` with RRDB F (tiny: 32 ch, mult (1, 2), 4 heads, one RRDB of nf 8, gc 4;
    every tensor randomised; tests/data/make_official_fixtures.py) and ours with its state dict imported by
    ``diffseg_jax.convert``: the same output; the official model gets the image standardised as its loader does,
    ours standardises it inside (``image_mean``/``image_std``)."""

    def outputs(model, variables, io):
        return {"out": jax.jit(model.apply)(variables, io["x_t"], io["t"], io["image"])}

    check_official(corrupt, outputs, "segdiff", tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# SegDiff's MoNuSeg augmentation (issue 32): RandomAffine(22°, 0.75-1.25) and ColorJitter(0.4, 0.4, 0.4, 0.1).


def test_segdiff_monuseg_scheme_augments_and_its_isic_one_does_not():
    from configs import e1_monuseg, e2_isic, e2_monuseg

    assert e2_monuseg.get_config("segdiff").data.augment == "segdiff"
    assert e1_monuseg.get_config("segdiff,tiny").data.augment == "segdiff"
    assert e2_isic.get_config("segdiff").data.augment == "none"
    assert e2_monuseg.get_config("ensemdiff").data.augment == "none"


def test_segdiff_affine_and_colour_jitter_match_their_closed_forms():

    rng = np.random.default_rng(0)
    image = jnp.asarray(rng.uniform(0.05, 0.95, (9, 9, 3)), jnp.float32)
    mask = jnp.zeros((9, 9, 1)).at[2:4, 5:8].set(1.0)
    same_image, same_mask = segdiff_augment.affine_nearest_mask(
        image, mask, jnp.float32(0.0), jnp.float32(1.0)
    )
    np.testing.assert_allclose(same_image, image, atol=1e-6)
    np.testing.assert_array_equal(same_mask, mask)
    # A quarter turn moves the mask as rot90 does (in one of the two senses), and stays binary.
    turned = segdiff_augment.affine_nearest_mask(image, mask, jnp.float32(np.pi / 2), jnp.float32(1.0))[1][
        ..., 0
    ]
    assert any(np.array_equal(turned, np.rot90(mask[..., 0], k)) for k in (1, 3))
    # zoom 2 (torchvision's scale > 1 enlarges): the centre pixel stays, its neighbour comes from half as far.
    zoomed = segdiff_augment.affine_nearest_mask(image, mask, jnp.float32(0.0), jnp.float32(2.0))[0]
    np.testing.assert_allclose(zoomed[4, 4], image[4, 4], atol=1e-6)
    np.testing.assert_allclose(zoomed[4, 6], image[4, 5], atol=1e-6)
    # Colour: torchvision's formulas; the hue round trip and a third of a turn taking red to green.
    gray = 0.2989 * image[..., 0] + 0.587 * image[..., 1] + 0.114 * image[..., 2]
    np.testing.assert_allclose(
        segdiff_augment.adjust_brightness(image, 1.3), np.clip(image * 1.3, 0, 1), atol=1e-6
    )
    np.testing.assert_allclose(
        segdiff_augment.adjust_contrast(image, 0.6), np.clip(0.6 * image + 0.4 * gray.mean(), 0, 1), atol=1e-6
    )
    np.testing.assert_allclose(
        segdiff_augment.adjust_saturation(image, 1.4),
        np.clip(1.4 * image - 0.4 * gray[..., None], 0, 1),
        atol=1e-6,
    )
    np.testing.assert_allclose(
        segdiff_augment.hsv_to_rgb(segdiff_augment.rgb_to_hsv(image)), image, atol=1e-5
    )
    np.testing.assert_allclose(segdiff_augment.adjust_hue(image, 0.0), image, atol=1e-5)
    red = jnp.asarray([[[1.0, 0.0, 0.0]]])
    np.testing.assert_allclose(segdiff_augment.adjust_hue(red, 1 / 3), [[[0.0, 1.0, 0.0]]], atol=1e-5)


def test_segdiff_augmentation_runs_jitted_in_the_step_and_keeps_masks_binary():
    from diffseg_jax.data import augment

    fn, model = augment.for_training("segdiff", "the model")
    assert model == "the model"  # SegDiff normalises its image inside the model, after the augmentation
    rng = np.random.default_rng(1)
    batch = {
        "image": jnp.asarray(rng.uniform(0, 1, (4, 16, 16, 3)), jnp.float32),
        "mask": jnp.asarray(rng.integers(0, 2, (4, 16, 16, 1)), jnp.float32),
    }
    out = jax.jit(fn)(jax.random.PRNGKey(0), batch)
    assert set(np.unique(np.asarray(out["mask"]))) <= {0.0, 1.0}
    assert float(out["image"].min()) >= 0.0 and float(out["image"].max()) <= 1.0
    assert not np.allclose(out["image"], batch["image"])  # every example drawn its own angle and colours
    again = jax.jit(fn)(jax.random.PRNGKey(0), batch)
    np.testing.assert_array_equal(out["image"], again["image"])
