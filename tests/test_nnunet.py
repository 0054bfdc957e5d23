"""nnU-Net reference: the 2D planner against nnU-Net v2.8.1's, the network against dynamic_network_architectures,
its loss, optimizer and augmentation, and a tiny planned run end to end.

Expected plans and parameter counts were computed once, outside this repository, with the official code:
nnunetv2 2.8.1 (``ExperimentPlanner.get_plans_for_configuration`` for spacing (1, 1), the median shape, and
approximate_n_voxels_dataset = H·W·images, with the planner's defaults and a 2-label dataset.json) and
dynamic_network_architectures 0.4.4 (``PlainConvUNet(..., num_classes=1, deep_supervision=True)``, the sum of
``numel`` over ``parameters()``), both in a torch 2.13 CPU virtualenv.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import OFFICIAL_CASES, assert_metrics_are_the_ensembles, check_official, tiny_config
from PIL import Image

from diffseg_jax import build, configlib, defaults, objectives, planning, train, validation
from diffseg_jax.data import augment
from diffseg_jax.models import count_params, is_feed_forward
from diffseg_jax.models import nnunet_plan as P
from diffseg_jax.models.nnunet import NNUNet, zscore

S2 = ((1, 1),) + ((2, 2),) * 8  # the first stage keeps the resolution, every later one halves it


# ---------------------------------------------------------------------------------------------------------------
# The planner: (median H, W, training images) -> nnunetv2 2.8.1's 2D plan.
@pytest.mark.parametrize(
    "h, w, n, patch, batch, features, strides, vram",
    [
        # ISIC 2016 at 256 px: 7 stages; the batch is capped at 5 % of the dataset.
        (256, 256, 900, (256, 256), 45, (32, 64, 128, 256, 512, 512, 512), S2[:7], 20_627_456),
        (256, 256, 512, (256, 256), 26, (32, 64, 128, 256, 512, 512, 512), S2[:7], 20_627_456),
        # MoNuSeg tiles at 512 px: 8 stages, the minimum batch of 2.
        (512, 512, 30, (512, 512), 2, (32, 64, 128, 256, 512, 512, 512, 512), S2[:8], 82_624_512),
        (32, 32, 32, (32, 32), 2, (32, 64, 128, 256), S2[:4], 296_960),
        (64, 64, 512, (64, 64), 26, (32, 64, 128, 256, 512), S2[:5], 1_253_376),
        # Non-square: sides padded to multiples of 2^pools (300 -> 320).
        (300, 500, 100, (320, 512), 5, (32, 64, 128, 256, 512, 512, 512), S2[:7], 51_568_640),
        (1000, 1000, 30, (1024, 1024), 2, (32, 64, 128, 256) + (512,) * 5, S2[:9], 330_612_736),
        # Too large for 8 GB: the VRAM estimate shrinks the patch, the relatively largest axis first.
        (2048, 1536, 10, (1536, 1024), 2, (32, 64, 128, 256) + (512,) * 5, S2[:9], 495_919_104),
        # One axis stops pooling at 4 px; the other goes on alone while it is at least 12 px.
        (16, 200, 50, (16, 224), 2, (32, 64, 128, 256, 512, 512), S2[:3] + ((1, 2),) * 3, None),
        (100, 30, 7, (112, 32), 2, (32, 64, 128, 256, 512), S2[:4] + ((2, 1),), None),
    ],
)
def test_plan_matches_the_official_planner(h, w, n, patch, batch, features, strides, vram):
    plan = P.plan_2d((h, w), n, 3)
    assert plan.patch_size == patch and plan.batch_size == batch
    assert plan.features_per_stage == features and plan.strides == strides
    assert plan.kernel_sizes == ((3, 3),) * len(features)
    assert plan.n_conv_per_stage == (2,) * len(features) and plan.n_conv_per_stage_decoder == (2,) * (
        len(features) - 1
    )
    if vram is not None:  # the official static_estimate_VRAM_usage for the final patch
        assert plan.vram_estimate == vram


def test_plan_with_other_planner_settings():
    # Official planner with UNet_base_num_features / UNet_max_features_2d / gpu_memory_target_in_gb changed.
    tiny = P.plan_2d((32, 32), 32, 3, base_features=8, max_features=32)
    assert tiny.features_per_stage == (8, 16, 32, 32) and tiny.batch_size == 2
    small = P.plan_2d((256, 256), 900, 3, base_features=8, max_features=64)
    assert small.features_per_stage == (8, 16, 32, 64, 64, 64, 64) and small.batch_size == 45
    assert P.plan_2d((4000, 3000), 5, 3).patch_size == (1536, 1024)
    assert P.plan_2d((256, 256), 900, 3, gpu_memory_gb=40).batch_size == 45  # still 5 % of the data
    with pytest.raises(ValueError, match="too small"):
        P.plan_2d((6, 6), 10, 3)


def test_vram_estimate_counts_feature_maps():
    # Two stages on 8x8 with 4 and 8 features, 1 class: encoder 2·4·64 + 2·8·16, decoder (2 + 1)·4·64 + 1·64.
    assert P.feature_map_size((8, 8), (4, 8), ((1, 1), (2, 2)), (2, 2), (2,), 1) == 512 + 256 + 768 + 64


# ---------------------------------------------------------------------------------------------------------------
# The network.
def _model(plan: P.Plan, out_channels: int = 1, **kwargs) -> NNUNet:
    return NNUNet(out_channels=out_channels, **plan.architecture(), **kwargs)


@pytest.mark.parametrize(
    "h, w, n, out_channels, expected",
    [
        (256, 256, 900, 1, 33_470_886),  # ISIC 2016
        (256, 256, 900, 2, 33_472_396),  # the same with nnU-Net's 2-class softmax head
        (512, 512, 30, 1, 46_323_111),  # MoNuSeg 512 px
        (32, 32, 32, 1, 1_928_611),
        (16, 200, 50, 1, 19_766_693),  # anisotropic strides
    ],
)
def test_param_count_equals_plain_conv_unet(h, w, n, out_channels, expected):
    plan = P.plan_2d((h, w), n, 3)
    ph, pw = plan.patch_size
    assert count_params(_model(plan, out_channels), (1, ph, pw, 1), (1, ph, pw, 3), (1,)) == expected


def _tiny() -> NNUNet:
    return _model(P.plan_2d((32, 32), 32, 3, base_features=8, max_features=32))


def test_output_shape_equals_input_size_and_deep_supervision_heads():
    model = _tiny()
    assert count_params(model, (1, 32, 32, 1), (1, 32, 32, 3), (1,)) == 80_427  # PlainConvUNet, same plan
    x = jax.random.uniform(jax.random.key(0), (2, 32, 48, 3))
    noise = jnp.zeros((2, 32, 48, 1))
    shapes = jax.eval_shape(model.init, jax.random.key(1), noise, jnp.zeros((2,), jnp.int32), x)
    rng = np.random.default_rng(0)  # random values without compiling the initialisers
    variables = jax.tree.map(lambda a: jnp.asarray(0.3 * rng.standard_normal(a.shape), jnp.float32), shapes)
    scaled = 3.0 * x + jnp.asarray([0.5, -2.0, 7.0])  # per-channel gain and offset

    @jax.jit
    def outputs(variables):
        return (
            model.apply(variables, noise, None, x),
            model.apply(variables, noise, None, x, train=True),
            model.apply(variables, noise, None, scaled),
        )

    logits, (out, extras), logits_scaled = outputs(variables)
    assert logits.shape == (2, 32, 48, 1)
    np.testing.assert_array_equal(out, logits)
    assert [h.shape for h in extras["deep_supervision"]] == [(2, 16, 24, 1), (2, 8, 12, 1)]
    # nnU-Net's z-score input normalisation: per-channel gains and offsets of the image change nothing.
    np.testing.assert_allclose(logits_scaled, logits, atol=1e-4)
    assert is_feed_forward("nnunet") and not NNUNet.CAN_DROP_IMAGE
    with pytest.raises(ValueError, match="multiples of 8x8"):
        jax.eval_shape(lambda v: model.apply(v, None, None, jnp.zeros((1, 36, 32, 3))), variables)


def test_zscore_is_per_image_and_channel():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3)) * 4.0 + 2.0
    z = zscore(x)
    np.testing.assert_allclose(z.mean(axis=(1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(z.std(axis=(1, 2)), 1.0, atol=1e-5)
    assert np.all(np.asarray(zscore(jnp.ones((1, 4, 4, 1)))) == 0.0)  # a constant channel: std floor, no NaN


# ---------------------------------------------------------------------------------------------------------------
# The loss.
def test_deep_supervision_weights_and_targets():
    np.testing.assert_allclose(objectives.deep_supervision_weights(4), np.array([1, 0.5, 0.25, 0]) / 1.75)
    np.testing.assert_allclose(objectives.deep_supervision_weights(1), [1.0])
    mask = jnp.arange(16.0).reshape(1, 4, 4, 1)
    # nearest-exact: output pixel i takes input floor((i + 0.5)·factor).
    np.testing.assert_array_equal(objectives.downsample_mask(mask, 2, 2)[0, ..., 0], [[5, 7], [13, 15]])
    np.testing.assert_array_equal(objectives.downsample_mask(mask, 1, 1)[0, ..., 0], [[10]])


def test_batch_dice_pools_over_the_batch():
    logits = jnp.asarray([[[[10.0]], [[-10.0]]], [[[-10.0]], [[-10.0]]]])  # (2, 2, 1, 1)
    target = jnp.asarray([[[[1.0]], [[0.0]]], [[[0.0]], [[1.0]]]])
    p = jax.nn.sigmoid(logits)
    dice = 1 - (2 * jnp.sum(p * target) + 1e-5) / (jnp.sum(p) + jnp.sum(target) + 1e-5)
    np.testing.assert_allclose(objectives.batch_soft_dice_loss(logits, target), dice, rtol=1e-6)
    one = objectives.e1_per_example(logits[:1], target[:1], "batch", 1.0)
    np.testing.assert_allclose(one, objectives.e1_per_example(logits[:1], target[:1], "per_example", 1.0))


def test_e1_loss_weights_every_head():
    mask = (jax.random.uniform(jax.random.key(0), (2, 8, 8, 1)) > 0.5).astype(jnp.float32)
    heads = [jax.random.normal(jax.random.key(i), (2, 8 // 2**i, 8 // 2**i, 1)) for i in range(3)]

    def apply(params, x, t, cond, rng):
        return heads[0], {"deep_supervision": tuple(heads[1:])}

    batch = {"image": jnp.zeros((2, 8, 8, 3)), "mask": mask}
    schedule = build.build_schedule(defaults.get_config().diffusion)
    loss, _ = objectives.loss_fn(
        apply, None, batch, jax.random.key(1), schedule, experiment="e1", dice="batch", dice_smooth=1e-5
    )
    w = [1 / 1.5, 0.5 / 1.5, 0.0]
    expected = sum(
        w[i]
        * jnp.mean(
            objectives.e1_per_example(h, objectives.downsample_mask(mask, *h.shape[1:3]), "batch", 1e-5)
        )
        for i, h in enumerate(heads)
    )
    np.testing.assert_allclose(loss, expected, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# The optimizer: torch.optim.SGD(lr, momentum=0.99, nesterov=True, weight_decay=3e-5) after clipping to norm 12,
# with PolyLRScheduler's lr·(1 - step/max_steps)^0.9.
def test_sgd_nesterov_poly_matches_torch_update_rule():
    cfg = defaults.get_config("nnunet").train
    cfg.num_steps = 10
    opt = build.make_optimizer(cfg)
    params = jnp.asarray([1.0, -2.0])
    grads = [jnp.asarray([30.0, 40.0]), jnp.asarray([0.5, -1.0]), jnp.asarray([-2.0, 0.1])]
    state = opt.init(params)
    p, buf = np.array([1.0, -2.0]), np.zeros(2)
    for step, g in enumerate(grads):
        updates, state = opt.update(g, state, params)
        params = optax.apply_updates(params, updates)
        g = np.asarray(g) * min(1.0, 12.0 / np.linalg.norm(g))  # clip_grad_norm_(12)
        d = g + 3e-5 * p  # weight decay enters the gradient
        buf = 0.99 * buf + d
        p = p - 1e-2 * (1 - step / 10) ** 0.9 * (d + 0.99 * buf)
        np.testing.assert_allclose(params, p, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# The augmentation.
def _example(size=16, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    image = jax.random.normal(k1, (size, size, 3))
    mask = (jax.random.uniform(k2, (size, size, 1)) > 0.6).astype(jnp.float32)
    return image, mask


_augment_one = jax.jit(augment.augment_example, static_argnums=3)


def test_augmentation_is_the_identity_when_nothing_is_drawn():
    image, mask = _example()
    out_image, out_mask = _augment_one(jax.random.key(3), image, mask, augment.NONE)
    np.testing.assert_array_equal(out_image, image)
    np.testing.assert_array_equal(out_mask, mask)


def test_rotation_by_90_degrees_is_rot90():
    image, mask = _example()
    quarter = augment.dataclasses.replace(augment.NONE, p_rotation=1.0, rotation=(math.pi / 2, math.pi / 2))
    out_image, out_mask = _augment_one(jax.random.key(0), image, mask, quarter)
    np.testing.assert_allclose(out_image, np.rot90(image, k=-1), atol=1e-5)
    np.testing.assert_array_equal(out_mask, np.rot90(mask, k=-1))


def test_augmented_masks_stay_binary_and_seeds_reproduce():
    image, mask = _example()
    batch = {"image": jnp.stack([image] * 4), "mask": jnp.stack([mask] * 4)}  # one example, four times
    always = augment.AugmentParams(
        **{f.name: 1.0 for f in augment.dataclasses.fields(augment.AugmentParams) if f.name.startswith("p_")}
    )
    run = jax.jit(augment.augment_batch, static_argnums=2)
    first = run(jax.random.key(7), batch, always)
    assert set(np.unique(first["mask"])) <= {0.0, 1.0} and np.all(np.isfinite(first["image"]))
    assert 0 < first["mask"].sum() < first["mask"].size
    again = run(jax.random.key(7), batch, always)
    np.testing.assert_array_equal(first["image"], again["image"])
    np.testing.assert_array_equal(first["mask"], again["mask"])
    assert not np.allclose(first["image"], run(jax.random.key(8), batch, always)["image"])
    assert not np.allclose(first["image"][0], first["image"][1])  # each example draws its own parameters


def test_intensity_transforms_closed_forms():
    x = jnp.arange(16.0).reshape(4, 4)
    # Low resolution by 1/2: nearest-exact keeps pixels 1 and 3, bilinear (align_corners=False) restores 4.
    row = augment.simulate_low_resolution(x, jnp.float32(0.5))[0]
    np.testing.assert_allclose(row, [5.0, 5.5, 6.5, 7.0])
    np.testing.assert_allclose(augment.simulate_low_resolution(x, jnp.float32(1.0)), x, atol=1e-6)
    np.testing.assert_allclose(
        augment.gaussian_blur(jnp.full((6, 6), 2.5), jnp.asarray([0.7, 1.0])), 2.5, rtol=1e-6
    )
    y = augment.gamma_transform(x, jnp.float32(1.4), invert=True)
    np.testing.assert_allclose([y.mean(), y.std(ddof=1)], [x.mean(), x.std(ddof=1)], rtol=1e-5)
    np.testing.assert_allclose(augment.gamma_transform(x, jnp.float32(1.0), invert=False), x, atol=1e-5)
    draws = augment.bg_contrast(jax.random.key(0), (0.75, 1.25), (4000,))
    assert 0.75 <= draws.min() and draws.max() <= 1.25 and 0.45 < float(jnp.mean(draws < 1)) < 0.55


def test_training_normalises_before_augmenting():
    model = _tiny()
    assert augment.for_training("none", model) == (None, model)
    fn, train_model = augment.for_training("nnunet", model)
    assert train_model.normalize is False and model.normalize is True  # normalised once, before augmenting
    image, mask = _example()
    batch = {"image": image[None], "mask": mask[None]}
    # A per-channel gain and offset of the image is undone by the z-score taken before the augmentation.
    moved = {"image": image[None] * jnp.asarray([5.0, 0.5, 2.0]) + 3.0, "mask": mask[None]}
    run = jax.jit(fn)
    for key in (jax.random.key(0), jax.random.key(1)):
        out, out_moved = run(key, batch), run(key, moved)
        np.testing.assert_allclose(out["image"], out_moved["image"], atol=1e-4)
        np.testing.assert_array_equal(out["mask"], out_moved["mask"])
    assert not np.allclose(run(jax.random.key(0), batch)["image"], zscore(batch["image"]))  # it augments


# ---------------------------------------------------------------------------------------------------------------
# Configs and the plan in a run.
def test_configs_plan_and_validation():
    c = tiny_config("e1_synthetic", "nnunet,tiny")
    assert c.experiment == "e1" and c.eval.ensemble_size == 1 and c.train.lr == 1e-2
    assert c.train.optimizer == "sgd_nesterov" and c.data.augment == "nnunet" and c.objective.dice == "batch"
    validation.validate(c, check_data=False)
    planned = planning.resolve(c, fingerprint=((32.0, 32.0), 1280, 3))
    assert planning.resolve(planned) is planned  # resolved once; the input config is left as it was
    assert planned.model.plan.mode == "planned" and c.model.plan.mode == "auto"
    assert planned.train.batch_size == 64 and planned.data.image_size == 32  # 5 % of 1280 images
    assert planned.model.features_per_stage == (8, 16, 32, 32) and planned.model.plan.num_images == 1280
    assert "batch size 64, 4 stages" in planning.describe(planned)
    model = build.build_model(planned.model, 1)
    assert count_params(model, (1, 32, 32, 1), (1, 32, 32, 3), (1,)) == 80_427
    with pytest.raises(ValueError, match="planned a 320x512 patch"):
        planning.resolve(c, fingerprint=((300.0, 500.0), 10, 3))
    fixed = tiny_config("e1_synthetic", "nnunet,tiny")
    fixed.model.plan.mode = "fixed"
    assert planning.resolve(fixed) is fixed
    fixed.data.image_size = 36
    with pytest.raises(ValueError, match="data.image_size=36"):
        validation.validate(fixed, check_data=False)
    e2 = tiny_config("e2_synthetic", "nnunet,tiny")
    with pytest.raises(ValueError, match="feed-forward reference"):
        validation.validate(e2, check_data=False)
    with pytest.raises(ValueError, match="E1 only"):
        defaults.experiment_config("e2", "isic", "nnunet")
    isic = defaults.experiment_config("e1", "isic", "nnunet")
    assert isic.train.lr == 1e-2 and isic.eval.ensemble_size == 1  # not the paper's E1 Adam 1e-5 / 10 members


@pytest.mark.slow
def test_tiny_planned_run_trains_and_evaluates(tmp_path, tfds_dir, capsys):
    from diffseg_jax import evaluate

    config = tiny_config("e1_synthetic", "nnunet,tiny", data_dir=tfds_dir)
    config.train.num_steps = 2
    config.eval.num_images = 2
    state = train.train(config, str(tmp_path))
    out = capsys.readouterr().out
    assert "nnU-Net 2D plan" in out and "32 images of median size 32x32" in out and "batch size 2" in out
    assert (
        int(state.step) == 2
        and count_params(
            build.build_model(planning.resolve(config).model, 1), (1, 32, 32, 1), (1, 32, 32, 3), (1,)
        )
        == 80_427
    )
    saved = configlib.load(str(tmp_path / "config.json"))
    assert saved.model.plan.mode == "planned" and saved.train.batch_size == 2
    metrics = evaluate.evaluate(config, str(tmp_path), state=state)
    assert metrics["ensemble_size"] == 1 and metrics["mean_std"] == 0.0
    assert metrics == assert_metrics_are_the_ensembles(tmp_path / "eval")
    # Elsewhere, without the training data: the plan comes from the run's config.json, so the checkpoint restores
    # into the planned network for image files and for an external test set alike.
    from diffseg_jax import predict

    with np.load(tmp_path / "eval" / "ensemble.npz") as ev:
        image, mask, image_id = ev["image"][0], ev["mask"][0, ..., 0], str(ev["ids"][0])
    external = tmp_path / "external" / "test"
    for folder, array in (("images", image), ("masks", mask * 255)):
        (external / folder).mkdir(parents=True)
        Image.fromarray(array).save(external / folder / f"{image_id}.png")
    elsewhere = tiny_config("e1_synthetic", "nnunet,tiny")
    elsewhere.data.name = "segmentation_folder"
    elsewhere.data.manual_dir = str(tmp_path / "external")
    elsewhere.data.data_dir = str(tmp_path / "tfds_external")
    with pytest.raises(ValueError, match="no 'train' split"):
        planning.resolve(elsewhere)  # nothing to plan from here
    assert planning.resolve_as_trained(elsewhere, str(tmp_path)).model == planning.resolve(config).model
    rows = predict.predict(elsewhere, str(tmp_path), str(external / "images"))
    assert [r["id"] for r in rows] == [image_id]
    ext = evaluate.evaluate(elsewhere, str(tmp_path), out_dir=str(tmp_path / "eval_external"))
    assert ext["step"] == 2 and ext["num_images"] == 1 and ext["dataset"] == "external"
    # The same image, the same noise in place of x_t (one member, same key): the same probabilities, up to the
    # rounding of programs of another batch length (predict samples one file alone, evaluate pads to 4).
    with (
        np.load(tmp_path / "predict" / "predictions.npz") as pred,
        np.load(tmp_path / "eval_external" / "ensemble.npz") as ext_maps,
    ):
        np.testing.assert_allclose(pred["mean"][0], ext_maps["mean"][0, ..., 0], atol=2e-5)
        assert ext_maps["mean"].std() > 0


def test_table1_gives_nnunet_an_e1_reference_cell_with_its_own_training():
    from configs import table1_synthetic
    from diffseg_jax import table1

    grid = table1_synthetic.get_config()
    grid.table.models = ("nnunet", "ensemdiff")
    assert [c for c in table1.cells(grid) if c[1] == "nnunet"] == [
        (k, "nnunet", "e1") for k in grid.table.kinds
    ]
    cell = table1.cell_config(grid, "nuclei", "nnunet", "e1")
    assert (
        cell.train.num_steps == grid.train.num_steps
        and cell.train.lr == 1e-2
        and cell.eval.ensemble_size == 1
    )
    assert cell.train.optimizer == "sgd_nesterov" and cell.train.grad_clip == 12.0
    validation.validate(cell, check_data=False)


@OFFICIAL_CASES
def test_nnunet_matches_official_fixture(corrupt, tmp_path):
    """dynamic_network_architectures 0.4.4's ``PlainConvUNet`` (tiny nnU-Net 2D plan: 4 stages of 4..16
    features, instance norm, deep supervision, one output class; every tensor randomised;
    tests/data/make_official_fixtures.py) on the z-scored non-square image, and ours (z-scoring inside) with its
    state dict imported by ``diffseg_jax.convert``: every deep-supervision head the same."""

    def outputs(model, variables, io):
        out, extras = jax.jit(lambda v, c: model.apply(v, None, None, c, train=True))(variables, io["image"])
        return {"ds_0": out, **{f"ds_{i + 1}": h for i, h in enumerate(extras["deep_supervision"])}}

    check_official(corrupt, outputs, "nnunet", tmp_path)
