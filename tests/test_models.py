"""Tests for diffseg_jax.models: published parameter counts, known values, and behaviour of the UNet."""

import math
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import OFFICIAL_CASES, check_official

from diffseg_jax.models import (
    EnsemDiffUNet,
    can_drop_image,
    count_params,
    get_model,
    param_count,
    param_shapes,
)
from diffseg_jax.models.ensemdiff import attention_ds, default_channel_mult
from diffseg_jax.models.layers import (
    NORM_IMPLS,
    AttentionBlock,
    Downsample,
    GroupNorm32,
    ResBlock,
    Upsample,
    timestep_embedding,
)


def _fill(tree, seed=0, scale=0.1):
    """Random NumPy values for every leaf of a pytree of arrays or shape structs (no XLA compiles)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda a: jnp.asarray(scale * rng.standard_normal(a.shape), jnp.float32), tree
    )


def _random_variables(module, *args):
    """Variables of ``module`` with random non-zero values, built from ``jax.eval_shape`` of its init."""
    return _fill(jax.eval_shape(module.init, jax.random.key(0), *args))


# ---------------------------------------------------------------- published parameter counts
# Numbers of the official PyTorch model (reference/ensemdiff.md, section 5).
@pytest.mark.parametrize(
    "cond_ch, out_ch, size, kwargs, expected",
    [
        (3, 1, 256, {}, 113_672_065),  # RGB, eps only
        (3, 2, 256, {}, 113_673_218),  # RGB, learn_sigma as the reference
        (4, 2, 224, {}, 113_674_370),  # BRATS original (224 crop through the 256 net)
        (
            3,
            1,
            128,
            dict(channel_mult=default_channel_mult(128), attention_resolutions=attention_ds(128)),
            85_601_537,
        ),
    ],
)
def test_published_param_counts(cond_ch, out_ch, size, kwargs, expected):
    model = get_model("ensemdiff", out_channels=out_ch, **kwargs)
    n = count_params(model, (1, size, size, 1), (1, size, size, cond_ch), (1,))
    assert n == expected


def test_block_param_counts():
    res = jax.eval_shape(
        ResBlock(512).init, jax.random.key(0), jnp.zeros((1, 4, 4, 512)), jnp.zeros((1, 512))
    )
    attn = jax.eval_shape(AttentionBlock().init, jax.random.key(0), jnp.zeros((1, 4, 4, 512)))
    assert param_count(res) == 4_984_320
    assert param_count(attn) == 1_051_648


def test_published_block_structure_and_skip_widths():
    params = param_shapes(EnsemDiffUNet(out_channels=2), (1, 64, 64, 1), (1, 64, 64, 4), (1,))

    def blocks(prefix, marker):
        return sorted(
            (k for k, v in params.items() if k.startswith(prefix) and marker in v),
            key=lambda k: [int(s) for s in k[len(prefix) :].split("_") if s],
        )

    assert len(blocks("input_blocks_", "emb_dense")) == 12
    assert len(blocks("middle_block_", "emb_dense")) == 2
    dec = blocks("output_blocks_", "emb_dense")
    assert len(dec) == 18
    n_attn = sum(len(blocks(p, "qkv")) for p in ("input_blocks_", "middle_block_", "output_blocks_"))
    assert n_attn == 6
    assert len(blocks("input_blocks_", "op")) == 5 and len(blocks("output_blocks_", "conv")) == 5
    # Stem sees 4 image channels + 1 noisy mask.
    assert params["input_blocks_0_0"]["kernel"].shape == (3, 3, 5, 128)
    # Decoder ResBlock input width = running width + popped skip width; skips pushed in the order
    # [128 | 128,128,128 | 128,128,128 | 256x3 | 256x3 | 512x3 | 512,512] (reference section 2).
    skips = [128] + [128] * 6 + [256] * 6 + [512] * 3 + [512, 512]
    widths = [512] * 6 + [256] * 6 + [128] * 6  # decoder output widths, deepest level first
    width, expected_in = 512, []
    for w in widths:
        expected_in.append(width + skips.pop())
        width = w
    assert not skips
    assert expected_in == [1024] * 5 + [768, 768] + [512] * 4 + [384, 384] + [256] * 5
    assert [params[k]["in_conv"]["kernel"].shape[2] for k in dec] == expected_in


# ---------------------------------------------------------------- layers
def test_timestep_embedding_known_values():
    emb = timestep_embedding(jnp.array([0, 5]), 8)
    assert emb.shape == (2, 8)
    np.testing.assert_allclose(emb[0, :4], 1.0)  # cos part first
    np.testing.assert_allclose(emb[0, 4:], 0.0)
    # i = 1: freq = exp(-ln(1e4) * 1/4) = 0.1, so t = 5 gives angle 0.5.
    np.testing.assert_allclose(emb[1, 1], math.cos(0.5), rtol=1e-6)
    np.testing.assert_allclose(emb[1, 5], math.sin(0.5), rtol=1e-6)
    np.testing.assert_allclose(emb[1, 0], math.cos(5.0), rtol=1e-6)
    odd = timestep_embedding(jnp.array([3]), 7)
    assert odd.shape == (1, 7) and float(odd[0, -1]) == 0.0


@pytest.mark.parametrize("impl", NORM_IMPLS)
def test_group_norm_eps_is_pytorch_default(impl):
    a = 0.01  # per-group variance a^2 = 1e-4, comparable with eps
    x = jnp.tile(jnp.array([a, -a], jnp.float32), 32).reshape(1, 1, 1, 64)
    gn = GroupNorm32(impl=impl)
    y = gn.apply({"params": {"scale": jnp.ones(64), "bias": jnp.zeros(64)}}, x)
    expected = a / math.sqrt(a * a + 1e-5)
    np.testing.assert_allclose(y[0, 0, 0, :2], [expected, -expected], rtol=1e-5)
    assert abs(float(y[0, 0, 0, 0]) - a / math.sqrt(a * a + 1e-6)) > 1e-2  # flax's default eps would differ
    assert gn.num_groups == 32 and gn.epsilon == 1e-5
    assert (
        gn.apply({"params": {"scale": jnp.ones(64), "bias": jnp.zeros(64)}}, x.astype(jnp.bfloat16)).dtype
        == jnp.bfloat16
    )


def _np_group_norm(x, groups=32, eps=1e-5):
    """GroupNorm over (B, T, C) in NumPy, no affine."""
    b, t, c = x.shape
    g = x.reshape(b, t, groups, c // groups)
    mean = g.mean(axis=(1, 3), keepdims=True)
    var = g.var(axis=(1, 3), keepdims=True)
    return ((g - mean) / np.sqrt(var + eps)).reshape(b, t, c)


def test_attention_matches_legacy_qkv_order():
    """Compare with a NumPy transcription of guided-diffusion's QKVAttentionLegacy (NCT layout)."""
    heads, c, hw = 2, 64, 3
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, hw, hw, c)), jnp.float32)
    block = AttentionBlock(num_heads=heads)
    params = _random_variables(block, x)
    y = np.asarray(jax.jit(block.apply)(params, x))

    p = jax.tree_util.tree_map(np.asarray, params["params"])
    xs = np.asarray(x).reshape(2, hw * hw, c)
    hn = _np_group_norm(xs) * p["norm"]["scale"] + p["norm"]["bias"]
    qkv = (hn @ p["qkv"]["kernel"] + p["qkv"]["bias"]).transpose(0, 2, 1)  # (B, 3C, T)
    ch = c // heads
    q, k, v = np.split(qkv.reshape(2 * heads, 3 * ch, hw * hw), 3, axis=1)
    s = 1 / math.sqrt(math.sqrt(ch))
    w = np.einsum("bct,bcs->bts", q * s, k * s)
    w = np.exp(w - w.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    a = np.einsum("bts,bcs->bct", w, v).reshape(2, c, hw * hw).transpose(0, 2, 1)
    ref = xs + a @ p["proj_out"]["kernel"] + p["proj_out"]["bias"]
    np.testing.assert_allclose(y.reshape(2, hw * hw, c), ref, rtol=1e-4, atol=1e-4)


def _group_norm_case(seed=0):
    """Activations far from zero mean (3 + 2 N(0, 1)): a form that cancelled (x - mean) badly would show."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(3.0 + 2.0 * rng.standard_normal((2, 8, 8, 64)), jnp.float32)
    params = {
        "scale": jnp.asarray(1.0 + 0.1 * rng.standard_normal(64), jnp.float32),
        "bias": jnp.asarray(0.1 * rng.standard_normal(64), jnp.float32),
    }
    return x, {"params": params}


def test_group_norm_float32_statistics_form_matches_the_published_one():
    """Issue 31's ``impl='stats_float32'``: the same parameters; in float32 the published form's numbers and
    gradients; in bf16 the float32 reference's within bf16 rounding, keeping no float32 copy of the activation
    for the backward pass (the published form keeps two)."""
    x, variables = _group_norm_case()
    shapes = {impl: jax.eval_shape(GroupNorm32(impl=impl).init, jax.random.key(0), x) for impl in NORM_IMPLS}
    assert shapes["float32"] == shapes["stats_float32"]
    published, fused = GroupNorm32(), GroupNorm32(impl="stats_float32")
    ref = jax.jit(published.apply)(variables, x)
    np.testing.assert_allclose(jax.jit(fused.apply)(variables, x), ref, rtol=0, atol=1e-6)

    def loss(gn):  # a loss whose gradient reaches every input, scale and bias differently
        w = jnp.asarray(np.random.default_rng(1).standard_normal(x.shape), jnp.float32)
        return jax.jit(jax.grad(lambda v, x: jnp.sum(gn.apply(v, x).astype(jnp.float32) * w), argnums=(0, 1)))

    for a, b in zip(
        jax.tree.leaves(loss(published)(variables, x)), jax.tree.leaves(loss(fused)(variables, x))
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

    x16 = x.astype(jnp.bfloat16)
    ref16 = jax.jit(published.apply)(variables, x16)
    out16 = jax.jit(fused.apply)(variables, x16)
    assert out16.dtype == ref16.dtype == jnp.bfloat16
    # bf16 keeps 8 bits: |y| <= ~4.5 here, so one unit in the last place is <= 2^-8 * 4 (0.016). Measured:
    # 0.018 (published) and 0.034 (stats_float32) from the float32 result; a form with the statistics in bf16 or
    # a wrong group axis is off by > 0.1.
    bound = 3 * 2.0**-8 * float(jnp.abs(ref).max())
    assert float(jnp.abs(out16.astype(jnp.float32) - ref).max()) < bound
    assert float(jnp.abs(ref16.astype(jnp.float32) - ref).max()) < bound


def _float32_activation_residuals(gn, capsys) -> list[str]:
    """The float32 tensors of the activation's size that the backward pass of ``gn`` on bf16 input keeps."""
    x, variables = _group_norm_case()
    capsys.readouterr()
    jax.ad_checkpoint.print_saved_residuals(
        lambda v, x: gn.apply(v, x).astype(jnp.float32).sum(), variables, x.astype(jnp.bfloat16)
    )
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith("f32[2,8,8,")]


def test_group_norm_float32_statistics_keep_no_float32_activation(capsys):
    assert _float32_activation_residuals(GroupNorm32(), capsys)  # the published form keeps (x - mean) in f32
    assert _float32_activation_residuals(GroupNorm32(impl="stats_float32"), capsys) == []


def test_attention_through_dot_product_attention_matches_the_explicit_form():
    """``attention_impl='dot_product'`` (jax.nn.dot_product_attention): the same parameters, the explicit form's
    output in float32 and, in bf16, within bf16 rounding of it. Two heads, so a head layout that differed from
    the legacy qkv order would show."""
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 4, 4, 64)), jnp.float32)
    # 'cudnn' traces only on a GPU (jax checks for cuDNN first); it shares dot_product's code path otherwise.
    blocks = {impl: AttentionBlock(num_heads=2, attention_impl=impl) for impl in ("explicit", "dot_product")}
    shapes = {impl: jax.eval_shape(b.init, jax.random.key(0), x) for impl, b in blocks.items()}
    assert shapes["explicit"] == shapes["dot_product"]
    variables = _fill(shapes["explicit"], seed=3, scale=0.3)  # proj_out non-zero: the attention shows
    ref = jax.jit(blocks["explicit"].apply)(variables, x)
    np.testing.assert_allclose(jax.jit(blocks["dot_product"].apply)(variables, x), ref, rtol=1e-6, atol=1e-6)
    for impl in ("explicit", "dot_product"):
        out = jax.jit(AttentionBlock(num_heads=2, dtype=jnp.bfloat16, attention_impl=impl).apply)(
            variables, x
        )
        assert out.dtype == jnp.bfloat16
        # Measured: 0.061 for both forms against |y| <= 7.3 (bf16 spacing at 4-8: 0.031), rounding through the
        # bf16 qkv and proj_out; a wrong scale or head split is off by more than 1.
        assert float(jnp.abs(out.astype(jnp.float32) - ref).max()) < 3 * 2.0**-8 * float(jnp.abs(ref).max())
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        AttentionBlock(attention_impl="flash").init(jax.random.key(0), x)


def test_train_step_forms_reach_every_block_of_the_unet():
    """``EnsemDiffUNet(norm_impl=..., attention_impl=...)``: every attention block calls
    jax.nn.dot_product_attention, and the whole UNet gives the published forms' output (float32) with the same
    parameters."""
    x_t = jnp.asarray(np.random.default_rng(4).standard_normal((2, 16, 16, 1)), jnp.float32)
    cond = jnp.asarray(np.random.default_rng(5).random((2, 16, 16, 3)), jnp.float32)
    t = jnp.array([3, 7])
    published = EnsemDiffUNet(**TINY)
    variables = _random_variables(published, x_t, t, cond)
    candidate = EnsemDiffUNet(**TINY, norm_impl="stats_float32", attention_impl="dot_product")
    assert jax.eval_shape(candidate.init, jax.random.key(0), x_t, t, cond) == jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), variables
    )
    with mock.patch.object(jax.nn, "dot_product_attention", wraps=jax.nn.dot_product_attention) as dpa:
        out = candidate.apply(variables, x_t, t, cond)
    # TINY attends at ds 2: one block in the encoder, the middle block, two decoder blocks.
    assert dpa.call_count == 4
    np.testing.assert_allclose(out, published.apply(variables, x_t, t, cond), rtol=1e-5, atol=1e-5)


def test_resblock_variants_and_dropout():
    x, emb = jnp.ones((2, 4, 4, 32)), jnp.ones((2, 16))
    shapes = lambda m: jax.eval_shape(m.init, jax.random.key(0), x, emb)["params"]
    assert shapes(ResBlock(64))["skip_connection"]["kernel"].shape == (1, 1, 32, 64)  # 1x1 skip, Cin != Cout
    assert "skip_connection" not in shapes(ResBlock(32))  # identity skip
    assert shapes(ResBlock(64, use_scale_shift_norm=True))["emb_dense"]["kernel"].shape == (16, 128)

    block = ResBlock(32, dropout=0.5, use_scale_shift_norm=True)
    variables = _random_variables(block, x, emb)
    apply = jax.jit(block.apply, static_argnames="train")
    ev = apply(variables, x, emb)
    np.testing.assert_array_equal(ev, apply(variables, x, emb, train=False))  # no rng needed, deterministic
    tr = apply(variables, x, emb, train=True, rngs={"dropout": jax.random.key(3)})
    assert np.abs(tr - ev).max() > 1e-4


def _center_tap_params(module, x):
    """Conv params whose kernel copies channel c to channel c through the centre tap only."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), x)
    c = x.shape[-1]
    kernel = np.zeros((3, 3, c, c), np.float32)
    kernel[1, 1] = np.eye(c)
    return jax.tree_util.tree_map(
        lambda p: jnp.asarray(kernel) if p.ndim == 4 else jnp.zeros(p.shape), shapes
    )


def test_downsample_samples_even_pixels_like_pytorch():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 8, 8, 2)), jnp.float32)
    down = Downsample()
    y = down.apply(_center_tap_params(down, x), x)
    # PyTorch stride 2, padding 1: output (i, j) is centred on input (2i, 2j) ('SAME' would give 2i+1).
    np.testing.assert_allclose(y, x[:, ::2, ::2], atol=1e-6)


def test_upsample_is_nearest():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 3, 3, 2)), jnp.float32)
    up = Upsample()
    y = up.apply(_center_tap_params(up, x), x)
    assert y.shape == (1, 6, 6, 2)
    for di in (0, 1):
        for dj in (0, 1):
            np.testing.assert_allclose(y[:, di::2, dj::2], x, atol=1e-6)


# ---------------------------------------------------------------- tiny UNet forward
TINY = dict(
    out_channels=2, model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,)
)


def test_tiny_forward_zero_init_and_dependencies():
    model = EnsemDiffUNet(**TINY)
    rng = np.random.default_rng(0)
    x_t = jnp.asarray(rng.standard_normal((2, 16, 16, 1)), jnp.float32)
    cond = jnp.asarray(rng.uniform(size=(2, 16, 16, 3)), jnp.float32)
    cond2 = jnp.asarray(rng.uniform(size=cond.shape), jnp.float32)
    t = jnp.array([3, 700])
    # One real (jitted) init; the 'rbg' key only keeps XLA's compile of the initialisers short.
    params = jax.jit(model.init)(jax.random.key(1, impl="rbg"), x_t, t, cond)
    apply = jax.jit(model.apply)

    out = apply(params, x_t, t, cond)
    assert out.shape == (2, 16, 16, 2) and out.dtype == jnp.float32
    assert not np.any(np.asarray(out))  # zero-initialised head
    flat = {"/".join(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
    zero = [k for k, v in flat.items() if ("/out_conv/" in k or "/proj_out/" in k)]
    assert len(zero) == 2 * (8 + 4 + 1)  # 8 ResBlocks + 4 attention blocks + head, kernel and bias each
    assert all(not np.any(np.asarray(flat[k])) for k in zero)
    assert all(np.any(np.asarray(v)) for k, v in flat.items() if k.endswith("kernel") and k not in zero)

    p = _fill(params)  # every layer non-zero
    base = apply(p, x_t, t, cond)
    assert np.all(np.isfinite(base)) and np.abs(base).mean() > 1e-3
    assert np.abs(apply(p, x_t, t, cond2) - base).max() > 1e-3  # depends on the image
    assert np.abs(apply(p, x_t, jnp.array([4, 10]), cond) - base).max() > 1e-3  # depends on t
    # Per sample: changing sample 1's image leaves sample 0's output unchanged.
    np.testing.assert_allclose(apply(p, x_t, t, cond.at[1].set(cond2[1]))[0], base[0], atol=1e-5)

    # Image channels come first: stem input axis is [3 image | 1 x_t]; zeroing the x_t slice
    # makes the output independent of x_t.
    assert params["params"]["input_blocks_0_0"]["kernel"].shape == (3, 3, 4, 32)
    p["params"]["input_blocks_0_0"]["kernel"] = p["params"]["input_blocks_0_0"]["kernel"].at[:, :, 3].set(0.0)
    np.testing.assert_allclose(apply(p, x_t, t, cond), apply(p, -x_t + 1.0, t, cond), atol=1e-5)


def test_tiny_forward_without_image():
    model = get_model("ensemdiff", **TINY)
    x_t = jnp.asarray(np.random.default_rng(0).standard_normal((2, 16, 16, 1)), jnp.float32)
    t = jnp.array([1, 2])
    variables = _random_variables(model, x_t, t)  # cond=None: only x_t goes in
    assert variables["params"]["input_blocks_0_0"]["kernel"].shape == (3, 3, 1, 32)
    out = jax.jit(model.apply)(variables, x_t, t)
    assert out.shape == (2, 16, 16, 2) and np.all(np.isfinite(out))


def test_mixed_precision_keeps_float32_params():
    model = EnsemDiffUNet(**TINY, dtype=jnp.bfloat16)
    params = param_shapes(model, (1, 16, 16, 1), (1, 16, 16, 3), (1,))
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.float32)}
    x, c, t = jnp.zeros((1, 16, 16, 1)), jnp.zeros((1, 16, 16, 3)), jnp.zeros((1,), jnp.int32)
    out = jax.eval_shape(lambda: model.apply(model.init(jax.random.key(0), x, t, c), x, t, c))
    assert out.dtype == jnp.float32  # head runs in float32, as with guided-diffusion's convert_to_fp16


# ---------------------------------------------------------------- registry and helpers
def test_registry():
    assert isinstance(get_model("ensemdiff", out_channels=1), EnsemDiffUNet)
    assert can_drop_image("ensemdiff") is True
    with pytest.raises(ValueError, match=r"'nope'.*ensemdiff"):
        get_model("nope")
    with pytest.raises(ValueError):
        can_drop_image("nope")


def test_default_channel_mult_and_attention_ds():
    assert default_channel_mult(256) == default_channel_mult(512) == (1, 1, 2, 2, 4, 4)
    assert default_channel_mult(128) == (1, 1, 2, 3, 4)
    assert default_channel_mult(64) == (1, 2, 3, 4)
    with pytest.raises(ValueError):
        default_channel_mult(224)
    assert attention_ds(256) == (16,) and attention_ds(128) == (8,)


@OFFICIAL_CASES
def test_ensemdiff_matches_official_fixture(corrupt, tmp_path):
    """The official guided-diffusion ``UNetModel`` of JuliaWolleb/Diffusion-based-Segmentation (tiny: 32 ch,
    mult (1, 2), attention at ds 2, learned sigma; every tensor randomised; tests/data/make_official_fixtures.py)
    and ours with its state dict imported by ``diffseg_jax.convert``: the same output on [image, x_t], t."""

    def outputs(model, variables, io):
        return {"out": jax.jit(model.apply)(variables, io["x_t"], io["t"], io["image"])}

    check_official(corrupt, outputs, "ensemdiff", tmp_path)
