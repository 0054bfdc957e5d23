"""SegFormer, the feed-forward reference: Hugging Face's parameter counts and logits, weight import, configs."""

import logging
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_config

from diffseg_jax import build, configlib, defaults, models, state_dicts, summary, train, validation
from diffseg_jax.models import segformer

FIXTURE = os.path.join(os.path.dirname(__file__), "data", "segformer_hf.npz")
# The fixture's architecture (tests/data/make_segformer_fixture.py: CONFIG).
FIXTURE_ARCH = dict(
    depths=(1, 2, 1, 1), hidden_sizes=(8, 16, 24, 32), num_heads=(1, 2, 3, 4), decoder_size=32
)
TINY = dict(depths=(1, 1, 1, 1), hidden_sizes=(16, 32, 48, 64), num_heads=(1, 2, 3, 4), decoder_size=32)

# Obtained with torch 2.13 and transformers 5.24 by counting
#   sum(p.numel() for p in SegformerForSemanticSegmentation(SegformerConfig(
#       depths=[3, 4, 18, 3], hidden_sizes=[64, 128, 320, 512], num_attention_heads=[1, 2, 5, 8],
#       sr_ratios=[8, 4, 2, 1], decoder_hidden_size=768, num_labels=N)).parameters())
# (the B3 values of the Hub's nvidia/segformer-b3-* config.json), and the same over .segformer for the encoder;
# B0: depths [2, 2, 2, 2], hidden_sizes [32, 64, 160, 256], decoder_hidden_size 256. Parameters only: BatchNorm's
# running statistics are buffers in PyTorch and batch_stats here.
HF_B3_PARAMS = {1: 47_223_233, 2: 47_224_002, 150: 47_337_814}
# nvidia/mit-b3 (SegformerForImageClassification, 1000 classes) is 44,585,128 with its classifier.
HF_B3_ENCODER_PARAMS = 44_072_128
HF_B0_PARAMS_150 = 3_752_694


def _random_variables(model, image_shape, seed=0):
    """Every variable of ``model`` (params and batch_stats) filled with random numbers, from shapes only."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), None, None, jnp.zeros(image_shape)))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32) * 0.1 + 0.5, dict(shapes))


def _leaves_equal(a, b):
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def test_b3_parameter_counts_equal_hugging_face():
    config = tiny_config("e1_synthetic", "segformer")  # the published B3 with one output channel
    assert summary.summary_text(config).endswith(f"params: {HF_B3_PARAMS[1]}")
    for labels in (150,):
        model = models.get_model("segformer", out_channels=labels)
        shapes = models.param_shapes(model, (1, 64, 64, 1), (1, 64, 64, 3), (1,))
        assert models.param_count(shapes) == HF_B3_PARAMS[labels]
        assert models.param_count(shapes["encoder"]) == HF_B3_ENCODER_PARAMS
    b0 = models.get_model("segformer", out_channels=150, variant="b0")
    assert models.count_params(b0, (1, 64, 64, 1), (1, 64, 64, 3), (1,)) == HF_B0_PARAMS_150
    # Stochastic depth as HF: linear from 0 to drop_path_rate over all 28 blocks.
    rates = segformer.drop_path_rates(segformer.VARIANTS["b3"]["depths"], 0.1)
    assert len(rates) == 28 and rates[0] == 0.0 and rates[-1] == pytest.approx(0.1)
    np.testing.assert_allclose(np.diff(rates), 0.1 / 27)


@pytest.mark.parametrize("depthwise", segformer.DEPTHWISE_IMPLS)
def test_matches_hugging_face_logits(depthwise):
    """HF's SegFormer (random weights, eval mode) on a 77x70 image, imported by the Hub names: same logits,
    with the Mix-FFN's depthwise conv as shifted multiply-adds (the default) and as ``nn.Conv``."""
    f = np.load(FIXTURE)
    state = {k.removeprefix("state/"): f[k] for k in f.files if k.startswith("state/")}
    model = models.get_model("segformer", out_channels=2, depthwise=depthwise, **FIXTURE_ARCH)
    image = f["image"].astype(np.float32)
    template = jax.eval_shape(lambda: model.init(jax.random.key(0), None, None, jnp.asarray(image)))
    variables = state_dicts.import_weights(model, dict(template), state)
    logits, inter = jax.jit(lambda v, x: model.apply(v, None, None, x, capture_intermediates=True))(
        variables, image
    )
    quarter = inter["intermediates"]["decode_head"]["__call__"][0]
    assert quarter.shape == f["logits_quarter"].shape == (1, 20, 18, 2)
    # Measured: 1.1e-5 on logits up to 16.7 in magnitude (float32 rounding, torch vs XLA).
    np.testing.assert_allclose(np.asarray(quarter), f["logits_quarter"], rtol=0, atol=5e-5)
    np.testing.assert_allclose(np.asarray(logits), f["logits"], rtol=0, atol=5e-5)
    # transformers >= 5 names its modules differently; canonical_key maps its state_dict() keys to the Hub's.
    assert [segformer.canonical_key(k) for k in f["hf5_names"]] == list(f["hub_names"])
    # Bilinear resizing is torch's interpolate(align_corners=False), upsampling and downsampling.
    x = f["resize_input"]
    np.testing.assert_allclose(segformer.resize_bilinear(x, (11, 13)), f["resize_up"], atol=1e-6)
    np.testing.assert_allclose(segformer.resize_bilinear(x, (4, 3)), f["resize_down"], atol=1e-6)


@pytest.mark.parametrize("kernel_size,dtype", [(3, jnp.float32), (5, jnp.float32), (3, jnp.bfloat16)])
def test_depthwise_conv_as_shifted_adds_equals_grouped_conv_in_values_and_gradients(kernel_size, dtype):
    """DepthwiseConv against nn.Conv(feature_group_count=C) with the same variables: outputs, and gradients
    with respect to the input, the kernel and the bias (odd, unequal sides: the padding and the shifts)."""
    c = 6
    conv = nn.Conv(
        c, (kernel_size,) * 2, padding=[(kernel_size // 2,) * 2] * 2, feature_group_count=c, dtype=dtype
    )
    shift = segformer.DepthwiseConv(c, kernel_size, dtype)
    x = jax.random.normal(jax.random.key(0), (2, 9, 7, c))
    variables = shift.init(jax.random.key(1), x)
    shapes = jax.tree.map(jnp.shape, conv.init(jax.random.key(1), x))
    assert jax.tree.map(jnp.shape, variables) == shapes  # the same parameters, so checkpoints carry over
    # Random bias too (it starts at 0), and a kernel far from 0.02's scale.
    variables = jax.tree.map(lambda a: jax.random.normal(jax.random.key(2), a.shape), variables)
    a, b = conv.apply(variables, x), shift.apply(variables, x)
    assert b.dtype == a.dtype == dtype
    tol = 1e-5 if dtype == jnp.float32 else 5e-2  # bf16: the inputs' rounding; the sums run in float32
    np.testing.assert_allclose(np.asarray(b, np.float32), np.asarray(a, np.float32), rtol=tol, atol=tol)
    if dtype != jnp.float32:
        return
    loss = lambda m: lambda v, x: jnp.sum(jnp.sin(m.apply(v, x)))  # a non-trivial output gradient
    ga = jax.grad(loss(conv), argnums=(0, 1))(variables, x)
    gb = jax.grad(loss(shift), argnums=(0, 1))(variables, x)
    for (path, u), w in zip(jax.tree_util.tree_flatten_with_path(ga)[0], jax.tree.leaves(gb)):
        np.testing.assert_allclose(w, u, rtol=1e-4, atol=1e-4, err_msg=jax.tree_util.keystr(path))
    with pytest.raises(ValueError, match=r"\(k, k, 1, C\)"):
        segformer.depthwise_conv_shift(x, jnp.zeros((3, 3, 1, c + 1)))
    with pytest.raises(ValueError, match="model.depthwise='fft'"):
        segformer.MixFFN(4, depthwise="fft").init(jax.random.key(0), jnp.zeros((1, 4, 4, 4)))


def test_forward_ignores_x_t_and_t_and_keeps_input_size():
    model = models.get_model("segformer", out_channels=1, **TINY)
    variables = _random_variables(model, (2, 45, 37, 3))
    rng = np.random.default_rng(1)
    image = rng.uniform(size=(2, 45, 37, 3)).astype(np.float32)

    @jax.jit
    def forward(variables, x_t, t, image, key):
        eval_out = model.apply(variables, x_t, t, image, train=False)
        train_out, updates = model.apply(
            variables, x_t, t, image, train=True, rngs={"dropout": key}, mutable=["batch_stats"]
        )
        return eval_out, train_out, updates

    x1, t1 = jnp.zeros((2, 45, 37, 1)), jnp.zeros((2,), jnp.int32)
    out, train_out, updates = forward(variables, x1, t1, image, jax.random.key(0))
    assert out.shape == (2, 45, 37, 1) and np.all(np.isfinite(out))  # 45x37: not a multiple of 32
    out2, train_out2, _ = forward(variables, x1 + 1.0, t1 + 7, image, jax.random.key(1))
    np.testing.assert_array_equal(out, out2)  # x_t and t are ignored
    assert not np.allclose(train_out, train_out2)  # dropout and stochastic depth draw from the rng
    assert not np.allclose(updates["batch_stats"]["decode_head"]["batch_norm"]["mean"], 0.5, atol=0.3)
    with pytest.raises(ValueError, match="cond must be given"):
        model.apply(variables, x1, t1, None)


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """A tiny model, random 'initial' variables, and a different set exported under the Hub names."""
    model = models.get_model("segformer", out_channels=1, **TINY)
    init = _random_variables(model, (1, 32, 32, 3), seed=0)
    trained = _random_variables(model, (1, 32, 32, 3), seed=1)
    return model, init, trained, state_dicts.export_state_dict(trained, segformer.torch_key)


def test_import_round_trip_through_safetensors(tiny_weights, tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    model, init, trained, sd = tiny_weights
    assert sd["segformer.encoder.patch_embeddings.0.proj.weight"].shape == (16, 3, 7, 7)  # OIHW
    assert sd["segformer.encoder.block.1.0.mlp.dwconv.dwconv.weight"].shape == (128, 1, 3, 3)
    assert sd["segformer.encoder.block.0.0.attention.self.sr.weight"].shape == (16, 16, 8, 8)
    assert sd["decode_head.linear_c.3.proj.weight"].shape == (32, 64)  # Linear (out, in)
    assert sd["decode_head.linear_fuse.weight"].shape == (32, 128, 1, 1)
    assert "decode_head.batch_norm.running_var" in sd and "segformer.encoder.layer_norm.3.bias" in sd
    path = str(tmp_path / "model.safetensors")
    safetensors_numpy.save_file({**sd, "decode_head.batch_norm.num_batches_tracked": np.array(3)}, path)
    back = state_dicts.import_weights(model, init, state_dicts.load_state_dict(path))
    _leaves_equal(trained, back)


def test_import_failures_name_the_tensor_the_shapes_and_the_fix(tiny_weights):
    model, init, _, sd = tiny_weights
    renamed = dict(sd)
    renamed["segformer.encoder.block.0.0.mlp.dense_1.weight"] = renamed.pop(
        "segformer.encoder.block.0.0.mlp.dense1.weight"
    )
    with pytest.raises(ValueError, match=r"missing.*mlp\.dense1\.weight.*not mapped.*mlp\.dense_1\.weight"):
        state_dicts.import_weights(model, init, renamed)
    wrong = dict(sd, **{"decode_head.classifier.weight": np.zeros((150, 32, 1, 1), np.float32)})
    with pytest.raises(
        ValueError,
        match=r"decode_head\.classifier\.weight: the file has \(150, 32, 1, 1\), "
        r"the model needs \(1, 32, 1, 1\).*drop the decode_head\.classifier",
    ):
        state_dicts.import_weights(model, init, wrong)
    # An encoder of another variant: a missing encoder tensor is never left at initialisation.
    no_block = {k: v for k, v in sd.items() if not k.startswith("segformer.encoder.block.3.")}
    with pytest.raises(ValueError, match=r"missing.*encoder\.block\.3\.0.*model\.variant"):
        state_dicts.import_weights(model, init, no_block)
    # A decoder is loaded whole or not at all.
    partial = {k: v for k, v in sd.items() if k != "decode_head.linear_fuse.weight"}
    with pytest.raises(ValueError, match=r"missing.*decode_head\.linear_fuse\.weight"):
        state_dicts.import_weights(model, init, partial)


def test_encoder_checkpoint_with_imagenet_head_leaves_the_decoder_at_init(tiny_weights, caplog):
    model, init, trained, sd = tiny_weights
    encoder_only = {k: v for k, v in sd.items() if k.startswith("segformer.")}
    encoder_only.update(
        {"classifier.weight": np.zeros((1000, 64), np.float32), "classifier.bias": np.zeros(1000)}
    )
    with caplog.at_level(logging.INFO):
        out = state_dicts.import_weights(model, init, encoder_only)
    _leaves_equal(trained["params"]["encoder"], out["params"]["encoder"])
    _leaves_equal(init["params"]["decode_head"], out["params"]["decode_head"])
    _leaves_equal(init["batch_stats"], out["batch_stats"])
    assert "skipping classifier.weight (1000, 64): the ImageNet classifier" in caplog.text
    assert "no decode_head.* tensors" in caplog.text and "keep their initialisation" in caplog.text
    # Shapes alone cannot be kept: an abstract template needs every tensor.
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), init)
    with pytest.raises(ValueError, match=r"15 tensors missing.*decode_head\.batch_norm"):
        state_dicts.import_weights(model, abstract, encoder_only)
    # A full checkpoint for other classes, without its classifier: everything else loads.
    no_classifier = {k: v for k, v in sd.items() if not k.startswith("decode_head.classifier.")}
    out = state_dicts.import_weights(model, init, no_classifier)
    _leaves_equal(
        trained["params"]["decode_head"]["linear_fuse"], out["params"]["decode_head"]["linear_fuse"]
    )
    _leaves_equal(init["params"]["decode_head"]["classifier"], out["params"]["decode_head"]["classifier"])


def test_pretrained_repo_id_loads_through_the_hub_cache_and_gives_hugging_face_logits(tmp_path, monkeypatch):
    """model.pretrained=<repo id>, the Hub offline and the weights in its cache: the HF fixture's full checkpoint
    gives HF's logits; an encoder checkpoint with an ImageNet classifier (as nvidia/mit-b3) fills the encoder
    with the same tensors and leaves the decoder at initialisation."""
    hf_constants = pytest.importorskip("huggingface_hub.constants")
    from test_hub import COMMIT, _safetensors, populate_hf_cache

    f = np.load(FIXTURE)
    hf_state = {k.removeprefix("state/"): f[k] for k in f.files if k.startswith("state/")}
    encoder = {k: v for k, v in hf_state.items() if k.startswith("segformer.")}
    encoder["classifier.weight"] = np.ones((1000, 32), np.float32)
    encoder["classifier.bias"] = np.ones(1000, np.float32)
    cache = tmp_path / "hub"
    populate_hf_cache(cache, "acme/segformer-fixture", {"model.safetensors": _safetensors(hf_state)})
    populate_hf_cache(cache, "acme/mit-fixture", {"model.safetensors": _safetensors(encoder)})
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)  # both read from the environment at import
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))

    model = models.get_model("segformer", out_channels=2, **FIXTURE_ARCH)
    image = f["image"].astype(np.float32)
    init = _random_variables(model, image.shape)
    optimizer = optax.sgd(1e-3)  # the optimizer plays no part in the import
    state = build.create_train_state(init, optimizer, jax.random.key(0))
    config = defaults.get_config("segformer")
    config.model.pretrained = "acme/segformer-fixture"
    option, path = build.initial_weights(config)
    assert option == "model.pretrained" and path.endswith(f"snapshots/{COMMIT}/model.safetensors")
    full = build.import_initial_weights(path, model, optimizer, state, option)
    logits = jax.jit(lambda v, x: model.apply(v, None, None, x))(
        {"params": full.params, **full.model_state}, image
    )
    np.testing.assert_allclose(np.asarray(logits), f["logits"], rtol=0, atol=5e-5)

    config.model.pretrained = "acme/mit-fixture"
    encoder_state = build.import_initial_weights(build.initial_weights(config)[1], model, optimizer, state)
    _leaves_equal(full.params["encoder"], encoder_state.params["encoder"])
    _leaves_equal(init["params"]["decode_head"], encoder_state.params["decode_head"])
    _leaves_equal(init["batch_stats"], encoder_state.model_state["batch_stats"])
    # A file of another model names the option that gave it; train.init_weights wins without the Hub.
    np.savez(tmp_path / "other.npz", **{"encoder.layer1.weight": np.zeros((3, 3), np.float32)})
    with pytest.raises(configlib.ConfigError, match=r"model.pretrained='.*other\.npz' does not fit"):
        build.import_initial_weights(str(tmp_path / "other.npz"), model, optimizer, state, "model.pretrained")
    config.model.pretrained = "None"  # as --config.model.pretrained=None gives it: random initialisation
    assert build.initial_weights(config) is None
    config.model.pretrained = "acme/not-cached"
    config.train.init_weights = "weights.npz"
    assert build.initial_weights(config) == ("train.init_weights", "weights.npz")


def test_e1_configs_of_public_datasets_start_from_the_imagenet_encoder():
    for dataset in ("isic", "monuseg"):
        config = defaults.experiment_config("e1", dataset, "segformer")
        assert config.model.pretrained == "nvidia/mit-b3" and config.model.variant == "b3"
        assert config.model.pretrained_revision is None
        validation.validate(config, check_data=False)
        assert (
            defaults.experiment_config("e1", dataset, "segformer,tiny").model.pretrained is None
        )  # other widths
    assert defaults.experiment_config("e1", "folder", "segformer").model.pretrained is None
    config = defaults.experiment_config("e1", "isic", "segformer")
    config.model.variant = "b0"
    with pytest.raises(
        configlib.ConfigError, match=r"model.pretrained='nvidia/mit-b3'.*SegFormer-B3.*mit-b0"
    ):
        validation.validate(config, check_data=False)
    config.model.variant, config.model.pretrained = "b3", "no_such_file.safetensors"
    with pytest.raises(
        configlib.ConfigError, match=r"model.pretrained='no_such_file.safetensors'.*No such file"
    ):
        validation.validate(config, check_data=False)


def test_invalid_variant_or_depthwise_form_is_named_before_the_run_starts():
    for key, value, fix in [("variant", "b9", "b0"), ("depthwise", "fft", "'shift'")]:
        config = tiny_config("e1_synthetic", "segformer,tiny")
        config.model[key] = value
        with pytest.raises(configlib.ConfigError, match=rf"model.{key}='{value}'.*{fix}"):
            validation.validate(config, check_data=False)
    validation.validate(tiny_config("e1_synthetic", "segformer,tiny"), check_data=False)  # the defaults pass


def test_configs_give_the_published_scheme_and_one_member(tmp_path):
    assert models.is_feed_forward("segformer") and not models.can_drop_image("segformer")
    config = tiny_config("e1_synthetic", "segformer,tiny")
    assert config.eval.ensemble_size == 1 and config.model.depths == (1, 1, 1, 1)
    assert config.train.lr == 6e-5 and config.train.weight_decay == 0.01  # not the paper's E1 lr 1e-5
    isic = defaults.experiment_config("e1", "isic", "segformer")
    assert isic.eval.ensemble_size == 1 and isic.train.lr == 6e-5 and isic.model.variant == "b3"
    assert defaults.experiment_config("e1", "isic", "segformer,tiny").eval.ensemble_size == 1
    unet = defaults.experiment_config("e1", "isic", "ensemdiff")  # the diffusion architectures are unchanged
    assert unet.eval.ensemble_size == 10 and unet.train.lr == 1e-5
    assert config.train.init_weights is None
    config.train.init_weights = str(tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match="train.init_weights.*No such file"):
        validation.validate(config, check_data=False)


def test_init_weights_start_a_run_and_the_train_step_traces(tfds_dir, tmp_path):
    """train.init_weights: the step-0 state holds the file's weights (EMA too); the E1 step traces."""
    config = tiny_config("e1_synthetic", "segformer,tiny", data_dir=tfds_dir)
    ds, model, schedule, optimizer, abstract = build.setup(config, abstract=True)  # nothing compiled
    state = build.create_train_state(_random_variables(model, (1, 32, 32, 3)), optimizer, jax.random.key(0))
    file_vars = _random_variables(model, (1, 32, 32, 3), seed=1)
    path = str(tmp_path / "w.npz")
    np.savez(path, **state_dicts.export_state_dict(file_vars, segformer.torch_key))
    new = build.import_initial_weights(path, model, optimizer, state)
    assert int(new.step) == 0
    _leaves_equal(file_vars["params"], new.params)
    _leaves_equal(file_vars["params"], new.ema_params)
    _leaves_equal(file_vars["batch_stats"], new.model_state["batch_stats"])
    step = train.make_train_step(model, optimizer, schedule, config)
    new_state, metrics = jax.eval_shape(step, new, dict(ds[0]))
    assert metrics["loss"].shape == () and set(new_state.model_state) == {"batch_stats"}
