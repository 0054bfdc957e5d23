"""Tests for MedSegDiff (v1 and 'new'): published counts, official names, FF-Parser algebra, behaviour."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import OFFICIAL_CASES, check_official

from diffseg_jax.models import EnsemDiffUNet, can_drop_image, get_model, param_count
from diffseg_jax.models.condnet import GenericUNet, ff_parser, upsample_bilinear
from diffseg_jax.models.medsegdiff import MedSegDiffUNet, blend_cal, torch_key

RBG = functools.partial(jax.random.key, impl="rbg")  # cheap initialiser compiles on CPU
# Unoptimised XLA backend: halves the compile time of these tiny models, which run in well under a second.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _jit(fn):
    """``jax.jit`` compiled with :data:`FAST_COMPILE` (one compile per argument signature)."""
    jitted = jax.jit(fn)
    compiled = {}

    def call(*args):
        sig = jax.tree.structure(args), tuple((a.shape, a.dtype) for a in jax.tree.leaves(args))
        if sig not in compiled:
            compiled[sig] = jitted.lower(*args).compile(compiler_options=FAST_COMPILE)
        return compiled[sig](*args)

    return call


def _fill(variables, seed=0, scale=0.1):
    """Random NumPy values for a variables tree (shapes or arrays); BatchNorm variances stay positive."""
    rng = np.random.default_rng(seed)

    def leaf(path, a):
        name = path[-1].key
        if name == "var":
            return jnp.asarray(rng.uniform(0.5, 1.5, a.shape), jnp.float32)
        if name == "scale":  # norm gains near 1, so that deep stacks keep their signal
            return jnp.asarray(1.0 + scale * rng.standard_normal(a.shape), jnp.float32)
        # FF-Parser weights near 1 so the gated features do not vanish.
        s = 1.0 if name == "complex_weight" else scale
        return jnp.asarray(s * rng.standard_normal(a.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(leaf, variables)


def _flat(tree):
    """{'a/b/c': leaf} for a nested dict."""
    return {"/".join(k.key for k in p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


@functools.cache
def _isic_variables(name, bottleneck="trained"):
    """Shapes of all variables at the ISIC config (RGB, 256 px, out 2), by ``jax.eval_shape``."""
    model = get_model(name, bottleneck=bottleneck)
    x, c = (
        jax.ShapeDtypeStruct((1, 256, 256, 1), jnp.float32),
        jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32),
    )
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    return jax.eval_shape(lambda x, t, c: model.init(jax.random.key(0), x, t, c), x, t, c)


# ---------------------------------------------------------------- published parameter counts
@pytest.mark.parametrize(
    "name, bottleneck, expected",
    [
        ("medsegdiff", "none", 130_527_814),  # the reference's registered parameters
        ("medsegdiff", "random_per_call", 130_527_814),  # the per-call conv is not a parameter
        ("medsegdiff", "trained", 130_774_086),  # + Conv(480 -> 512, 1x1) = 246,272
        ("medsegdiff_new", "trained", 129_400_450),  # 'new' has no bottleneck projection at all
    ],
)
def test_published_param_counts(name, bottleneck, expected):
    variables = _isic_variables(name, bottleneck)
    assert param_count(variables["params"]) == expected
    # BatchNorm running mean + var (the reference's 8,726 buffers less 22 num_batches_tracked).
    assert param_count(variables["batch_stats"]) == 8_726 - 22


def test_published_part_counts_v1():
    p = _isic_variables("medsegdiff", "none")["params"]
    hwm = p["hwm"]
    part = lambda prefix: sum(param_count(v) for k, v in hwm.items() if k.startswith(prefix))
    assert param_count({k: v for k, v in p.items() if k != "hwm"}) == 113_673_218  # diffusion UNet
    assert part("conv_blocks_context") == 8_506_656
    assert part("conv_blocks_localization") == 7_220_544
    assert part("seg_outputs") == 32
    assert part("conv_trans_blocks_a") == 111_072 and part("conv_trans_blocks_b") == 484
    assert part("ffparser") == 1_015_808
    # Hard-coded for 256 px in the reference: [32,128,65], [64,64,33], [128,32,17], [256,16,9].
    shapes = [hwm[f"ffparser_{d}"]["complex_weight"].shape for d in range(4)]
    assert shapes == [(32, 128, 65, 2), (64, 64, 33, 2), (128, 32, 17, 2), (256, 16, 9, 2)]
    # conv1x1 input widths int(d/2+1)*128 of the reference = the diffusion downsample outputs.
    assert [hwm[f"conv_trans_blocks_a_{d}"]["kernel"].shape[2:] for d in range(4)] == [
        (128, 32),
        (128, 64),
        (256, 128),
        (256, 256),
    ]


def test_torch_keys_match_official_state_dict():
    variables = _isic_variables("medsegdiff", "none")
    keys = {}
    for col in ("params", "batch_stats"):
        for path, leaf in jax.tree_util.tree_leaves_with_path(variables[col]):
            keys[torch_key((col,) + tuple(k.key for k in path))] = leaf.shape
    assert len(keys) == sum(len(jax.tree_util.tree_leaves(variables[c])) for c in ("params", "batch_stats"))

    # The whole condition network, as Generic_UNet(3, 32, 1, 5, highway=True) registers it.
    expected = {"hwm.seg_outputs.0.weight"}

    def block(prefix):
        expected.update(f"{prefix}.conv.{w}" for w in ("weight", "bias"))
        expected.update(f"{prefix}.instnorm.{w}" for w in ("weight", "bias", "running_mean", "running_var"))

    for d in range(5):
        block(f"hwm.conv_blocks_context.{d}.blocks.0")
        block(f"hwm.conv_blocks_context.{d}.blocks.1")
    for k in range(2):
        block(f"hwm.conv_blocks_context.5.{k}.blocks.0")
    for u in range(5):
        for k in range(2):
            block(f"hwm.conv_blocks_localization.{u}.{k}.blocks.0")
    for d in range(4):
        expected.update(f"hwm.conv_trans_blocks_{ab}.{d}.{w}" for ab in "ab" for w in ("weight", "bias"))
        expected.add(f"hwm.ffparser.{d}.complex_weight")
    assert {k for k in keys if k.startswith("hwm.")} == expected

    # Diffusion UNet samples (guided-diffusion names); shapes are Flax layouts of the same tensors.
    assert keys["time_embed.0.weight"] == (128, 512) and keys["time_embed.2.bias"] == (512,)
    assert keys["input_blocks.0.0.weight"] == (3, 3, 4, 128)  # image (3) + x_t (1)
    assert keys["input_blocks.1.0.in_layers.0.weight"] == (128,)
    assert keys["input_blocks.1.0.in_layers.2.weight"] == (3, 3, 128, 128)
    assert keys["input_blocks.1.0.emb_layers.1.weight"] == (512, 128)
    assert keys["input_blocks.1.0.out_layers.3.bias"] == (128,)
    assert keys["input_blocks.3.0.op.weight"] == (3, 3, 128, 128)
    assert keys["input_blocks.7.0.skip_connection.weight"] == (1, 1, 128, 256)
    assert keys["input_blocks.13.1.qkv.weight"] == (512, 1536)
    assert keys["middle_block.1.proj_out.bias"] == (512,)
    assert keys["output_blocks.5.2.conv.weight"] == (3, 3, 512, 512)
    assert keys["out.0.weight"] == (128,) and keys["out.2.weight"] == (3, 3, 128, 2)
    assert keys["hwm.ffparser.3.complex_weight"] == (256, 16, 9, 2)  # the PyTorch array as is
    assert torch_key(("params", "hwm", "bottleneck_proj", "kernel")) == "hwm.bottleneck_proj.weight"
    with pytest.raises(ValueError):
        torch_key(("hwm", "conv_blocks_context_0"))


# ---------------------------------------------------------------- FF-Parser, upsampling, cal blend
def test_ff_parser_all_ones_is_identity():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 3)), jnp.float32)
    ones = jnp.stack([jnp.ones((3, 8, 5)), jnp.zeros((3, 8, 5))], axis=-1)
    np.testing.assert_allclose(ff_parser(x, ones), x, atol=1e-5)


def test_ff_parser_phase_ramp_is_per_channel_circular_shift():
    """w = exp(-2 pi i (ky sy / H + kx sx / W)) shifts channel c by (sy_c, sx_c): checks axes and weight layout."""
    h = w = 8
    x = np.random.default_rng(1).standard_normal((1, h, w, 2)).astype(np.float32)
    shifts = [(1, 3), (-2, 1)]
    ky, kx = np.arange(h)[:, None], np.arange(w // 2 + 1)[None, :]
    phase = np.stack(
        [np.exp(-2j * np.pi * (ky * sy / h + kx * sx / w)) for sy, sx in shifts]
    )  # (C, H, W//2+1)
    weight = jnp.asarray(np.stack([phase.real, phase.imag], axis=-1), jnp.float32)
    y = np.asarray(ff_parser(jnp.asarray(x), weight))
    for c, (sy, sx) in enumerate(shifts):
        np.testing.assert_allclose(y[..., c], np.roll(x[..., c], (sy, sx), axis=(1, 2)), atol=1e-5)


def test_ff_parser_size_is_checked():
    model = MedSegDiffUNet(**dict(V1_TINY, image_size=32))
    x, c, t = jnp.zeros((1, 16, 16, 1)), jnp.zeros((1, 16, 16, 3)), jnp.zeros((1,), jnp.int32)
    with pytest.raises(ValueError, match="built for 32x32"):
        jax.eval_shape(model.init, jax.random.key(0), x, t, c)
    # Without the image there is no FF-Parser, and any size goes.
    assert jax.eval_shape(model.init, jax.random.key(0), x, t)["params"]["out_conv"]["kernel"].shape[-1] == 2


def _torch_bilinear_up(x, factor):
    """NumPy transcription of F.interpolate(mode='bilinear', align_corners=False) for (H, W)."""
    h, w = x.shape

    def coords(n):
        src = np.maximum((np.arange(n * factor) + 0.5) / factor - 0.5, 0.0)
        i0 = np.floor(src).astype(int)
        i1 = np.minimum(i0 + 1, n - 1)
        return i0, i1, src - i0

    y0, y1, fy = coords(h)
    x0, x1, fx = coords(w)
    top = x[y0][:, x0] * (1 - fx) + x[y0][:, x1] * fx
    bot = x[y1][:, x0] * (1 - fx) + x[y1][:, x1] * fx
    return top * (1 - fy[:, None]) + bot * fy[:, None]


@pytest.mark.parametrize("factor", [2, 4])
def test_upsample_bilinear_matches_pytorch(factor):
    x = np.random.default_rng(2).standard_normal((5, 3)).astype(np.float32)
    y = upsample_bilinear(jnp.asarray(x)[None, :, :, None], factor)[0, :, :, 0]
    np.testing.assert_allclose(y, _torch_bilinear_up(x, factor), atol=1e-5)


def test_blend_cal_dice_rule():
    cal = jnp.array([0.9, 0.8, 0.1, 0.0])
    agree = jnp.array([1.0, 1.0, -1.0, -1.0])  # (s > 0) = [1, 1, 0, 0]: dice = 3.4 / 3.8 > 0.65
    np.testing.assert_allclose(blend_cal(agree, cal), jnp.clip(0.5 * cal + 0.5 * agree, 0, 1), atol=1e-6)
    disagree = jnp.array([-1.0, -0.5, 1.0, 1.0])  # dice = 0.2 / 3.8 < 0.65
    np.testing.assert_allclose(blend_cal(disagree, cal), [0.65, 0.675, 0.35, 0.25], atol=1e-6)
    # 0/0 Dice (empty prediction, zero cal) is NaN in the reference and takes the 0.5/0.5 branch.
    np.testing.assert_allclose(blend_cal(-jnp.ones(4), jnp.zeros(4)), jnp.zeros(4))


# ---------------------------------------------------------------- tiny models
# v1 needs len(channel_mult) - 1 == len(cond_features) (the bottlenecks meet); 'new' needs
# 2 * cond_features[0] + cond_features[1] == model_channels * channel_mult[0] (the anchors).
# 64 channels: GroupNorm32 then has 2 channels per group, else it would erase the time embedding.
V1_TINY = {
    "out_channels": 2,
    "model_channels": 64,
    "channel_mult": (1, 1, 1),
    "num_res_blocks": 1,
    "attention_resolutions": (),
    "cond_features": (16, 32),
    "image_size": 16,
}
NEW_TINY = {**V1_TINY, "channel_mult": (1, 1), "cond_features": (16, 32, 64), "version": "new"}


def _inputs(seed=0, size=16):
    rng = np.random.default_rng(seed)
    x_t = jnp.asarray(rng.standard_normal((2, size, size, 1)), jnp.float32)
    cond = jnp.asarray(rng.uniform(size=(2, size, size, 3)), jnp.float32)
    return x_t, jnp.array([3, 700]), cond


def _variants():
    """4 input sets stacked: base, other image, other t, other x_t (one vmapped compile for all)."""
    x_t, t, cond = _inputs()
    rng = np.random.default_rng(1)
    cond2 = jnp.asarray(rng.uniform(size=cond.shape), jnp.float32)
    x2 = jnp.asarray(rng.standard_normal(x_t.shape), jnp.float32)
    return jnp.stack([x_t, x_t, x_t, x2]), jnp.stack([t, t, t + 50, t]), jnp.stack([cond, cond2, cond, cond])


@functools.cache
def _tiny(version):
    """(model, random variables, probe, probe(variables)) for a tiny model; one compile per version.

    ``probe(variables)`` returns, for each input variant (eval mode), out, cal and the parameter
    gradients of <out, r1> + <cal, r2> and of <out, r1> alone.
    """
    model = MedSegDiffUNet(**(V1_TINY if version == "v1" else NEW_TINY))
    x_t, t, cond = _inputs()
    variables = _fill(jax.eval_shape(model.init, jax.random.key(0), x_t, t, cond))
    rng = np.random.default_rng(3)
    r1 = jnp.asarray(rng.standard_normal((2, 16, 16, 2)), jnp.float32)
    r2 = jnp.asarray(rng.standard_normal((2, 16, 16, 1)), jnp.float32)

    def one(variables, x_t, t, cond):
        def f(params):
            out, aux = model.apply(dict(variables, params=params), x_t, t, cond)
            return out, aux["cal"]

        (out, cal), vjp = jax.vjp(f, variables["params"])
        # Both cotangents in one batched pullback: about half the compile time of two.
        grads = jax.vmap(vjp)((jnp.stack([r1, r1]), jnp.stack([r2, jnp.zeros_like(r2)])))[0]
        return out, cal, jax.tree.map(lambda g: g[0], grads), jax.tree.map(lambda g: g[1], grads)

    compiled = _jit(jax.vmap(one, in_axes=(None, 0, 0, 0)))
    probe = lambda v: compiled(v, *_variants())
    return model, variables, probe, probe(variables)


def _norm(a):
    return float(np.abs(np.asarray(a)).max())


@pytest.mark.parametrize("version", ["v1", "new"])
def test_zero_head_at_init_and_initialisers(version):
    model, v, probe, _ = _tiny(version)
    x_t, t, cond = _inputs()
    # Only the requested leaves of a real init are compiled (XLA drops the other initialisers).
    names = ["out_conv/kernel", "out_conv/bias", "hwm/conv_blocks_context_1/blocks_1/conv/kernel"]
    names += [
        "hwm/conv_blocks_context_1/blocks_1/conv/bias",
        "hwm/conv_blocks_context_1/blocks_1/instnorm/scale",
    ]
    if version == "v1":
        names += ["hwm/ffparser_0/complex_weight", "hwm/bottleneck_proj/kernel"]
    real = _jit(lambda k: [_flat(model.init(k, x_t, t, cond)["params"])[n] for n in names])(RBG(0))
    real = dict(zip(names, real))
    assert not np.any(real["out_conv/kernel"]) and not np.any(real["out_conv/bias"])
    # nnU-Net's InitWeights_He(1e-2): kaiming normal, fan_in 3*3*32, zero bias; BatchNorm scale 1.
    k = np.asarray(real["hwm/conv_blocks_context_1/blocks_1/conv/kernel"])
    assert abs(k.std() / math.sqrt(2 / (1 + 1e-4) / (9 * 32)) - 1) < 0.05
    assert not np.any(real["hwm/conv_blocks_context_1/blocks_1/conv/bias"])
    np.testing.assert_array_equal(real["hwm/conv_blocks_context_1/blocks_1/instnorm/scale"], 1.0)
    if version == "v1":
        assert abs(np.asarray(real["hwm/ffparser_0/complex_weight"]).std() / 0.02 - 1) < 0.05  # randn * 0.02
        w = np.asarray(real["hwm/bottleneck_proj/kernel"])  # PyTorch default: U(+-1/sqrt(fan_in))
        bound = 1 / math.sqrt(32)
        assert np.abs(w).max() <= bound and abs(w.std() / (bound / math.sqrt(3)) - 1) < 0.05

    # With the real (zero) head, the main output is zero whatever the other parameters are.
    zero_head = dict(
        v, params=dict(v["params"], out_conv=jax.tree_util.tree_map(jnp.zeros_like, v["params"]["out_conv"]))
    )
    out, cal, _, _ = probe(zero_head)
    assert not np.any(np.asarray(out)) and np.all((cal > 0) & (cal < 1))


@pytest.mark.parametrize("version", ["v1", "new"])
def test_tiny_forward_dependencies(version):
    outs, cals, _, _ = _tiny(version)[3]
    assert outs.shape == (4, 2, 16, 16, 2) and cals.shape == (4, 2, 16, 16, 1)
    assert np.all(np.isfinite(outs)) and np.abs(outs[0]).mean() > 1e-3
    assert np.all((cals > 0) & (cals < 1))  # sigmoid
    diff = lambda a, i: _norm(a[i] - a[0])
    assert diff(outs, 1) > 1e-3 and diff(outs, 2) > 1e-3 and diff(outs, 3) > 1e-3  # image, t, x_t
    assert diff(cals, 1) > 1e-3  # cal sees the image ...
    if version == "v1":  # ... and, through the gating by the diffusion features, x_t and t
        assert diff(cals, 2) > 1e-3 and diff(cals, 3) > 1e-3
    else:  # 'new': hwm runs on the image alone (up to the batched conv's summation order)
        assert diff(cals, 2) < 1e-5 and diff(cals, 3) < 1e-5


def test_v1_condition_enters_only_through_bottleneck():
    _, v, probe, base = _tiny("v1")
    # With the projection zeroed, every other hwm parameter is irrelevant to the main output.
    zero = jax.tree_util.tree_map(jnp.zeros_like, v["params"]["hwm"]["bottleneck_proj"])
    other_hwm = _fill({"params": v["params"]["hwm"], "batch_stats": v["batch_stats"]["hwm"]}, seed=5)
    a = dict(v, params=dict(v["params"], hwm=dict(v["params"]["hwm"], bottleneck_proj=zero)))
    b = {
        "params": dict(v["params"], hwm=dict(other_hwm["params"], bottleneck_proj=zero)),
        "batch_stats": {"hwm": other_hwm["batch_stats"]},
    }
    out_a, out_b = probe(a)[0], probe(b)[0]
    np.testing.assert_allclose(out_a, out_b, atol=1e-5)
    assert _norm(out_a - base[0]) > 1e-4  # and the projection does matter


def test_new_anchors_reach_the_output():
    _, v, probe, base = _tiny("new")
    other = dict(v, params=dict(v["params"], hwm=_fill(v["params"]["hwm"], seed=7)))
    assert _norm(probe(other)[0] - base[0]) > 1e-4


def test_v1_gradients():
    _, _, g_all, g_out = _tiny("v1")[3]
    g_all, g_out = _flat(g_all), _flat(g_out)
    # Every parameter trains through <out, r1> + <cal, r2>.
    assert [k for k, g in g_all.items() if _norm(g[0]) == 0] == []
    # Except, inside FF-Parser weights, the imaginary parts at the 4 self-conjugate frequencies
    # (rows 0, H/2 x columns 0, W/2): irfft2 discards them.
    cw = np.asarray(g_all["hwm/ffparser_0/complex_weight"][0])
    h = cw.shape[1]
    np.testing.assert_array_equal(cw[:, [0, 0, h // 2, h // 2], [0, -1, 0, -1], 1], 0.0)
    assert np.all(cw[:, 1 : h // 2, 1:-1] != 0)
    # The denoiser output reaches hwm only through its encoder, gating and bottleneck projection.
    for k, g in g_out.items():
        if k.startswith(("hwm/conv_blocks_localization", "hwm/seg_outputs")):
            assert _norm(g) == 0.0, k
        else:
            assert _norm(g[0]) > 0, k


def test_new_gradients():
    _, _, g_all, g_out = _tiny("new")[3]
    g_all, g_out = _flat(g_all), _flat(g_out)
    assert [k for k, g in g_all.items() if _norm(g[0]) == 0] == []
    # The anchors are detached: the diffusion output trains no hwm parameter (only cal does).
    hwm = [k for k in g_out if k.startswith("hwm/")]
    assert hwm and all(_norm(g_out[k]) == 0.0 for k in hwm)
    assert all(_norm(g_out[k][0]) > 0 for k in g_out if not k.startswith("hwm/"))


def test_without_image_is_the_plain_diffusion_unet():
    """cond=None (E3/E4): no condition network at all; same names and function as EnsemDiff on x_t."""
    assert can_drop_image("medsegdiff") and can_drop_image("medsegdiff_new")
    model = MedSegDiffUNet(**dict(V1_TINY, attention_resolutions=(2,)))
    ens = EnsemDiffUNet(
        **{k: V1_TINY[k] for k in ("out_channels", "model_channels", "channel_mult", "num_res_blocks")},
        attention_resolutions=(2,),
    )
    x_t, t, _ = _inputs()
    shapes = jax.eval_shape(model.init, jax.random.key(0), x_t, t)
    assert set(shapes) == {"params"} and "hwm" not in shapes["params"]  # no batch_stats either
    assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(
        jax.eval_shape(ens.init, jax.random.key(0), x_t, t)
    )
    v = _fill(shapes)
    out, ref = _jit(lambda v: (model.apply(v, x_t, t), ens.apply(v, x_t, t)))(v)
    assert isinstance(out, jax.Array) and out.shape == (2, 16, 16, 2)  # just the array, no cal
    np.testing.assert_allclose(out, ref, atol=1e-5)


# ---------------------------------------------------------------- bottleneck modes
def test_bottleneck_modes():
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 8, 8, 3)), jnp.float32)
    t = jnp.array([5, 5])

    def emb_fn(mode):
        net = GenericUNet((8,), highway=True, bottleneck=mode, bottleneck_features=16)
        return _jit(lambda v, t, r: net.apply(v, x, [], t=t, rngs=r).emb)

    fns = {mode: emb_fn(mode) for mode in ("trained", "random_per_call")}

    def run(mode, variables, t=t, rngs=None):
        return fns[mode](variables, t, rngs)

    net = GenericUNet((8,), highway=True, bottleneck_features=16)
    v = _fill(jax.eval_shape(net.init, jax.random.key(0), x, [], t=t))
    assert param_count(v["params"]["bottleneck_proj"]) == 8 * 16 + 16
    trained = run("trained", v)
    np.testing.assert_array_equal(trained, run("trained", v))  # a normal, deterministic conv

    v_none = dict(v, params={k: w for k, w in v["params"].items() if k != "bottleneck_proj"})
    none = GenericUNet((8,), highway=True, bottleneck="none")
    assert jax.eval_shape(lambda v: none.apply(v, x, [], t=t), v_none).emb is None
    key = lambda s: {"bottleneck": jax.random.key(s)}
    e1, e2 = run("random_per_call", v_none, rngs=key(1)), run("random_per_call", v_none, rngs=key(2))
    assert e1.shape == trained.shape and _norm(e1 - e2) > 1e-3  # a fresh projection per call ...
    np.testing.assert_array_equal(e1, run("random_per_call", v_none, rngs=key(1)))  # ... from the stream
    # Without that stream: a fixed seed folded with t, so it changes between diffusion steps.
    f5 = run("random_per_call", v_none)
    np.testing.assert_array_equal(f5, run("random_per_call", v_none))
    assert _norm(f5 - run("random_per_call", v_none, t=t + 1)) > 1e-3


def test_condnet_train_mode():
    """BatchNorm batch statistics need mutable=['batch_stats']; Dropout2d needs a 'dropout' RNG."""
    net = GenericUNet((8,))
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 8, 8, 3)), jnp.float32)
    v = _fill(jax.eval_shape(net.init, jax.random.key(0), x))
    r = jnp.asarray(np.random.default_rng(1).standard_normal((2, 8, 8, 1)), jnp.float32)
    with pytest.raises(Exception, match="batch_stats"):  # immutable collection
        jax.eval_shape(lambda v: net.apply(v, x, train=True, rngs={"dropout": jax.random.key(0)}), v)

    @_jit
    def train_step(params, key):
        def loss(params):
            out, upd = net.apply(
                {"params": params, "batch_stats": v["batch_stats"]},
                x,
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": key},
            )
            return jnp.sum(out.cal * r), (out.cal, upd)

        return jax.grad(loss, has_aux=True)(params)

    g, (cal, upd) = train_step(v["params"], jax.random.key(0))
    _, (cal2, _) = train_step(v["params"], jax.random.key(1))
    assert _norm(cal - cal2) > 1e-4  # channel dropout (p=0.5) in the encoder and bottleneck
    moved = [
        _norm(a - b) for a, b in zip(jax.tree.leaves(upd["batch_stats"]), jax.tree.leaves(v["batch_stats"]))
    ]
    assert min(moved) > 0  # every running statistic was updated
    # With batch statistics, a per-channel constant is removed by BatchNorm: the bias of a conv that
    # feeds BN directly (decoder: no dropout in between) gets no gradient, by design.
    g = _flat(g)
    no_grad = {k for k in g if k.startswith("conv_blocks_localization") and k.endswith("conv/bias")}
    assert len(no_grad) == 2
    for k, grad in g.items():
        if k in no_grad:
            assert _norm(grad) < 1e-5 * _norm(g[k.replace("bias", "kernel")]), k
        else:
            assert _norm(grad) > 0, k


def test_registry_and_validation():
    assert get_model("medsegdiff").version == "v1" and get_model("medsegdiff").blends_cal
    assert get_model("medsegdiff_new").version == "new"
    x_t, t, cond = _inputs()
    for bad in ({"version": "v2"}, {"bottleneck": "random"}):
        with pytest.raises(ValueError):
            jax.eval_shape(MedSegDiffUNet(**dict(V1_TINY, **bad)).init, jax.random.key(0), x_t, t, cond)
    with pytest.raises(ValueError, match="anchor"):  # 2*16 + 32 != 128
        model = MedSegDiffUNet(**dict(NEW_TINY, model_channels=128))
        jax.eval_shape(model.init, jax.random.key(0), x_t, t, cond)


@OFFICIAL_CASES
def test_medsegdiff_v1_matches_official_fixture(corrupt, tmp_path):
    """KidsWithTokens/MedSegDiff's ``UNetModel_v1preview`` (tiny: 32 ch x 6 levels, 2 res blocks, condition
    network 4..32 features at 32 px, BatchNorm running statistics randomised too, the per-call bottleneck conv
    fixed; tests/data/make_official_fixtures.py) and ours with its state dict imported by ``diffseg_jax.convert``:
    the same output and the same ``cal`` (also compared as its logit)."""

    def outputs(model, variables, io):
        out, extras = _jit(lambda v, x, t, c: model.apply(v, x, t, c))(
            variables, io["x_t"], io["t"], io["image"]
        )
        # cal = sigmoid(logit) stays near 0.5 here: its logit is the sensitive comparison.
        io["cal_logit"] = np.log(io["cal"] / (1 - io["cal"]))
        cal = np.asarray(extras["cal"], np.float64)
        return {"out": out, "cal": cal, "cal_logit": np.log(cal / (1 - cal))}

    check_official(corrupt, outputs, "medsegdiff", tmp_path)
