"""Per-timestep curves (oracle, closed forms, loop equivalence), the model-free fingerprint, the forward process,
and the curve files feeding the plots."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffseg_jax import diffusion, plots, result_files
from diffseg_jax.analysis import curves, fingerprints, forward, run
from diffseg_jax.diffusion import model_free

SCHEDULE = diffusion.get_schedule("linear", 100)
TS = jnp.array([0, 7, 30, 64, 99])


def _masks(seed=0, n=3, size=16):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.integers(0, 2, (n, size, size, 1)), jnp.float32)


def test_oracle_networks_have_zero_mask_error():
    x0 = 2.0 * _masks() - 1.0
    direct = curves.timestep_curves(
        lambda x_t, t: x0, SCHEDULE, x0, TS, jax.random.PRNGKey(0), prediction="x0"
    )
    np.testing.assert_allclose(direct["mask_error"], 0.0, atol=1e-10)

    def eps_oracle(x_t, t):  # the noise that produced x_t from the true x0
        return diffusion.predict_eps_from_x0(SCHEDULE, x_t, t, x0)

    out = curves.timestep_curves(
        eps_oracle, SCHEDULE, x0, TS, jax.random.PRNGKey(0), prediction="eps", num_draws=2
    )
    np.testing.assert_allclose(out["mask_error"], 0.0, atol=1e-6)
    np.testing.assert_allclose(out["eps_loss"], 0.0, atol=1e-6)


def test_zero_network_matches_closed_forms():
    """An x0-network that outputs 0: the mask estimate is 1/2 everywhere, so the error is 1/4 at every t, and
    eps_hat = x_t / sqrt(1 - abar) misses eps by sqrt(abar) x0 / sqrt(1 - abar): the loss is abar / (1 - abar)."""
    x0 = 2.0 * _masks() - 1.0
    out = curves.timestep_curves(
        lambda x_t, t: jnp.zeros_like(x_t),
        SCHEDULE,
        x0,
        TS,
        jax.random.PRNGKey(1),
        prediction="x0",
        num_draws=3,
    )
    np.testing.assert_allclose(out["mask_error"], 0.25, rtol=1e-6)
    abar = np.asarray(SCHEDULE.alphas_cumprod)[np.asarray(TS)]
    np.testing.assert_allclose(out["eps_loss"], np.repeat((abar / (1 - abar))[:, None], 3, 1), rtol=1e-4)


def test_chunked_map_equals_a_loop_over_timesteps():
    x0 = 2.0 * _masks(1) - 1.0
    weights = jnp.linspace(0.5, 1.5, 16)[None, :, None, None]

    def net(x_t, t):  # depends on x_t and t, so every timestep differs
        return jnp.tanh(x_t * weights) * (1.0 + t[:, None, None, None] / 100.0)

    key = jax.random.PRNGKey(4)
    together = curves.timestep_curves(net, SCHEDULE, x0, TS, key, num_draws=2, t_chunk=2)
    for i, t in enumerate(np.asarray(TS)):
        alone = curves.timestep_curves(net, SCHEDULE, x0, jnp.array([t]), key, num_draws=2)
        for name in ("mask_error", "eps_loss"):
            np.testing.assert_allclose(together[name][i], alone[name][0], rtol=1e-5)


def test_box_sum_matches_a_direct_window_sum():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 7, 9, 1)), jnp.float32)
    s, n = model_free.box_sum(x, 3)
    xp = np.pad(np.asarray(x), [(0, 0), (1, 1), (1, 1), (0, 0)])
    direct = sum(xp[:, dy : dy + 7, dx : dx + 9] for dy in range(3) for dx in range(3))
    np.testing.assert_allclose(s, direct, atol=1e-5)
    assert float(n[0, 0, 0, 0]) == 4 and float(n[0, 3, 4, 0]) == 9


def test_model_free_fingerprint_limits_and_object_size():
    schedule = diffusion.get_schedule("linear", 1000)
    ts = jnp.array([0, 150, 300, 999])
    key = jax.random.PRNGKey(0)
    big = np.zeros((4, 32, 32, 1), np.float32)
    big[:, 4:28, 6:30] = 1.0  # one large blob, 56 % foreground
    small = np.zeros((4, 32, 32, 1), np.float32)
    small[:, 1::4, 1::4] = 1.0  # isolated single pixels, 6 % foreground
    small[:, 2::4, 1::4] = 1.0
    out_big = model_free.model_free_curve(schedule, jnp.asarray(big), ts, key, num_draws=2)
    out_small = model_free.model_free_curve(schedule, jnp.asarray(small), ts, key, num_draws=2)
    for masks, out in ((big, out_big), (small, out_small)):
        rate = masks.mean()
        assert float(out["mask_error"][0]) < 1e-4  # no noise yet
        assert float(out["mask_error"][-1]) == pytest.approx(
            rate * (1 - rate), rel=0.05
        )  # all noise: the rate
        assert np.all(np.diff(np.asarray(out["mask_error"])) > 0)
    # Large objects keep their information longer (big windows average the noise away); relative to the rate
    # baseline the small objects are lost earlier.
    rel_big = float(out_big["mask_error"][2]) / (big.mean() * (1 - big.mean()))
    rel_small = float(out_small["mask_error"][2]) / (small.mean() * (1 - small.mean()))
    assert rel_big < rel_small
    assert int(out_big["window"][2]) > 1 and int(out_small["window"][1]) == 1


def test_model_free_chunks_are_sized_to_memory_and_leave_the_curve_unchanged(monkeypatch):
    # 16 masks of 256 px, 2 draws, 6 windows: 12.6 M floats per timestep, so one timestep at a time (50 at
    # once held 13 GB on the CPU); small masks fill a chunk up to the cap.
    assert model_free.chunk_size(16 * 256 * 256, 6, 2, cap=50) == 1
    assert model_free.chunk_size(4 * 32 * 32, 6, 1, cap=50) == 50
    assert model_free.chunk_size(4 * 32 * 32, 6, 1) == int(model_free.CHUNK_FLOATS // (4 * 32 * 32 * 6))
    masks = jnp.asarray(_masks(3))
    ts = jnp.arange(0, 100, 9)
    key = jax.random.PRNGKey(2)
    one_at_a_time = model_free.model_free_curve(SCHEDULE, masks, ts, key, num_draws=2, t_chunk=1)
    # A budget of three timesteps' window sums: chunks of 3 over 12 timesteps.
    monkeypatch.setattr(model_free, "CHUNK_FLOATS", 3 * masks.size * len(model_free.WINDOWS) * 2)
    assert model_free.chunk_size(masks.size, len(model_free.WINDOWS), 2) == 3
    chunked = model_free.model_free_curve(SCHEDULE, masks, ts, key, num_draws=2)
    np.testing.assert_allclose(chunked["errors"], one_at_a_time["errors"], rtol=1e-5, atol=1e-7)


def test_forward_process_rows():
    image = np.full((8, 8, 3), 0.25, np.float32)
    mask = np.zeros((8, 8, 1), np.float32)
    out = forward.forward_process(SCHEDULE, image, mask, (0, 50, 99), jax.random.PRNGKey(0))
    assert out["image"].shape == (3, 8, 8, 3) and out["mask"].shape == (3, 8, 8, 1)
    assert abs(out["image"][0].mean() - 0.25) < 0.01 and out["image"][0].std() < 0.03  # t = 0: almost clean
    assert out["image"][2].std() > 0.3  # t = T - 1: noise


def test_curve_files_round_trip_into_the_plots(tmp_path):
    ts = np.arange(0, 100, 10)
    rows = [
        dict(t=int(t), value=float(v), curve="mask_error", model=m, experiment="e2", dataset=d, step=5)
        for d in ("synthetic-lesion", "synthetic-nuclei")
        for m, scale in (("ensemdiff", 1.0), ("segdiff", 0.8))
        for t, v in zip(ts, scale * ts / 100)
    ]
    result_files.write_rows(str(tmp_path / "curves"), rows)
    assert result_files.read_rows(str(tmp_path / "curves.csv")) == rows
    saved = np.load(tmp_path / "curves.npz")
    np.testing.assert_array_equal(saved["t"], [r["t"] for r in rows])
    plots.curve_figure(
        result_files.read_rows(str(tmp_path / "curves.csv")), str(tmp_path / "curves.png"), smoothing=3
    )
    paths = fingerprints.main(["--runs", str(tmp_path), "--out", str(tmp_path / "fp"), "--smoothing", "1"])
    for key in ("png", "csv", "md"):
        assert (tmp_path / "fp" / f"fingerprints.{key}").stat().st_size > 100, paths[key]
    summary = fingerprints.summarise(rows, 1)
    assert summary[0]["t_half"] == 50 and summary[0]["error_last"] == pytest.approx(0.9)
    # A curve written by several runs (the model-free one) counts once, its values averaged.
    twice = rows[:10] + [dict(r, value=r["value"] + 0.1) for r in rows[:10]]
    t, v = plots.curve_series(twice)[("synthetic-lesion", "ensemdiff", "e2", "mask_error")]
    np.testing.assert_array_equal(t, ts)
    np.testing.assert_allclose(v, ts / 100 + 0.05)


def test_fingerprint_smoothing_is_in_timesteps_whatever_the_grid():
    # The same saturating curve analysed at every t and at every 10th t: a 25-timestep window is 25 samples of
    # the first and about 3 of the second, so both are judged alike (25 samples of a 10-point curve flattened
    # it into 'still rising' before).
    def rows(ts):
        return [
            dict(t=int(t), value=float(1 - np.exp(-t / 30)), curve="mask_error", model="m", experiment="e3",
                 dataset="d", step=1)
            for t in ts
        ]  # fmt: skip

    dense, sparse = (fingerprints.summarise(rows(np.arange(0, 200, k)), 25)[0] for k in (1, 10))
    assert plots.samples_in(np.arange(0, 200, 10), 25) == 2 and plots.samples_in(np.arange(200), 25) == 25
    assert dense["converged"] and sparse["converged"]
    assert sparse["rise_tail"] == pytest.approx(dense["rise_tail"], abs=0.01)
    assert abs(sparse["t_half"] - dense["t_half"]) <= 10


def test_smoothing_keeps_constants_and_shrinks_at_the_ends():
    np.testing.assert_allclose(plots.smooth(np.full(10, 3.0), 5), 3.0)
    smoothed = plots.smooth(np.arange(10.0), 3)
    assert smoothed[0] == pytest.approx(0.5) and smoothed[5] == pytest.approx(5.0)
    np.testing.assert_array_equal(plots.smooth(np.arange(4.0), 1), np.arange(4.0))


def test_timestep_grid_ends_at_the_last_step():
    np.testing.assert_array_equal(run.timestep_grid(100, 30), [0, 30, 60, 90, 99])
    assert len(run.timestep_grid(1000, 1)) == 1000


def _analyse_config(tfds_dir, experiment="e2", analyses=("forward", "model_free")):
    from conftest import tiny_config

    config = tiny_config(f"{experiment}_synthetic", data_dir=tfds_dir)
    config.analysis.analyses = analyses
    config.analysis.update(t_step=25, num_images=2, num_draws=1)
    return config


def _old_analysis(workdir):
    """An earlier run's analysis/ folder, with contents to recognise."""
    old = workdir / "analysis"
    old.mkdir(parents=True)
    for name in ("forward.npz", "model_free.csv", "convergence.json", "curves.csv"):
        (old / name).write_text(f"old {name}")
    return {p.name: p.read_text() for p in old.iterdir()}


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(analyses=("mask_error", "curvez")), r"analysis\.analyses=.*Unknown analyses \['curvez'\]"),
        (dict(forward_timesteps=(0, 100)), r"analysis\.forward_timesteps=.*\[100\], outside 0\.\.99"),
    ],
)
def test_analyse_refuses_bad_settings_as_config_errors(tmp_path, change, match):
    from conftest import tiny_config

    from diffseg_jax import configlib

    config = tiny_config("e2_synthetic", data_dir=str(tmp_path / "tfds"))
    config.analysis.update(**change)
    before = _old_analysis(tmp_path)
    with pytest.raises(configlib.ConfigError, match=match):
        run.analyse(config, str(tmp_path))
    assert {p.name: p.read_text() for p in (tmp_path / "analysis").iterdir()} == before


@pytest.mark.parametrize(
    "experiment, analyses, supported",
    [
        (
            "e3",
            ("loss",),
            r"an 'e3' run has only \['mask_error'\].*\['mask_error', 'forward', 'model_free'\]",
        ),
        (
            "e1",
            ("mask_error", "loss", "forward", "model_free"),
            r"need a diffusion model.*\['forward', 'model_free'\]",
        ),
    ],
)
def test_analyse_refuses_curves_the_experiment_lacks_before_writing(
    tmp_path, experiment, analyses, supported
):
    """E3's network predicts no eps loss and E1's no curve at all: refused, naming what the run supports,
    before the forward process and the model-free curve are written (they were, and then nothing said why)."""
    from conftest import tiny_config

    from diffseg_jax import configlib

    config = tiny_config(f"{experiment}_synthetic", data_dir=str(tmp_path / "tfds"))
    config.analysis.analyses = analyses
    with pytest.raises(configlib.ConfigError, match=supported):
        run.analyse(config, str(tmp_path))
    assert not (tmp_path / "analysis").exists() and not (tmp_path / run.PARTIAL_DIR).exists()
    assert run.supported_analyses("e4") == ("loss", "forward", "model_free")


def test_bernoulli_mask_error_closed_forms():
    """BerDiff's curve: an x0 (or ε = x_t XOR x0) oracle errs 0; a network that returns x_t as its x0 errs
    P(x_t != x0) = (1 - ᾱ_t)/2 at every t; a network unsure everywhere (logit 0) errs 1/4 whatever the mask."""
    from diffseg_jax.diffusion import bernoulli

    masks = _masks(n=4, size=32)
    sure = 30.0  # logits: sigmoid(±30) is 0 or 1 to float32

    def run_curve(out_fn, prediction="x0"):
        out = curves.bernoulli_timestep_curves(
            out_fn, SCHEDULE, masks, TS, jax.random.PRNGKey(0), prediction=prediction, num_draws=4
        )
        return np.asarray(out["bernoulli_mask_error"])  # (len(TS), B)

    np.testing.assert_allclose(run_curve(lambda x_t, t: sure * (2 * masks - 1)), 0.0, atol=1e-10)
    eps_oracle = lambda x_t, t: sure * (2 * bernoulli.x0_from_eps(x_t, masks) - 1)  # noqa: E731
    np.testing.assert_allclose(run_curve(eps_oracle, "eps"), 0.0, atol=1e-10)
    np.testing.assert_allclose(run_curve(lambda x_t, t: jnp.zeros_like(x_t)), 0.25, atol=1e-7)
    echo = run_curve(lambda x_t, t: sure * (2 * x_t - 1)).mean(1)  # 4 draws x 4 x 32 x 32 pixels per t
    flip = (1 - np.asarray(SCHEDULE.alphas_cumprod)[np.asarray(TS)]) / 2
    np.testing.assert_allclose(echo, flip, atol=0.01)
    with pytest.raises(ValueError, match="prediction must be one of"):
        curves.bernoulli_timestep_curves(lambda x, t: x, SCHEDULE, masks, TS, jax.random.PRNGKey(0), prediction="v")


def test_analyse_of_a_bernoulli_run_writes_its_mask_error_curve(tmp_path, tfds_dir, caplog):
    """A BerDiff run (diffusion.process='bernoulli', self-conditioned as the quickstart) gets the mask prediction
    error under its own noise as ``bernoulli_mask_error``, equal to the curve of its network computed directly;
    the ε loss it lacks is said and skipped; asking for the loss alone is refused before anything is written."""
    from conftest import tiny_config

    from diffseg_jax import build, checkpoints, configlib, data, objectives

    config = _analyse_config(tfds_dir, analyses=("mask_error", "loss", "forward"))
    config.diffusion.process = "bernoulli"
    config.diffusion.learn_sigma = False
    config.objective.update(prediction="x0", self_condition=True)
    config.eval.ddim_eta = 0.0
    assert run.supported_analyses("e2", "bernoulli") == ("mask_error", "forward", "model_free")
    assert run.mask_error_curve(config) == "bernoulli_mask_error"
    model, _, _, state = build.model_and_state(config, (32, 32, 3))
    params = jax.tree.map(lambda p: p + 0.01, state.params)  # the output layer starts at zero
    ckpt = checkpoints.Checkpointer(str(tmp_path / "checkpoints"))
    ckpt.save(3, state.replace(step=3, params=params, ema_params=params), {})
    ckpt.wait()
    ckpt.close()
    only_loss = config.copy_and_resolve_references()
    only_loss.analysis.analyses = ("loss",)
    with pytest.raises(configlib.ConfigError, match=r"Bernoulli diffusion.*only \['bernoulli_mask_error'\]"):
        run.analyse(only_loss, str(tmp_path / "elsewhere"))
    assert not (tmp_path / "elsewhere").exists()
    with caplog.at_level("WARNING"):
        written = run.analyse(config, str(tmp_path))
    assert "no ['loss'] curve" in caplog.text
    rows = result_files.read_rows(written["curves"])
    assert {r["curve"] for r in rows} == {"bernoulli_mask_error"} and {r["step"] for r in rows} == {3}
    ts = run.timestep_grid(100, config.analysis.t_step)
    test = data.model_sized_arrays(config.data, "test", 2)
    mask_range = config.diffusion.mask_range  # EnsemDiff's published {0, 1}: x_t fed as it is
    schedule = build.build_schedule(config.diffusion)

    def out_fn(x_t, t):  # the network as the sampler's first step calls it: zeros for the previous estimate
        x_in = jnp.concatenate([diffusion.mask_to_diffusion(x_t, mask_range), jnp.zeros_like(x_t)], -1)
        out = model.apply({"params": params}, x_in, t, jnp.asarray(test["image"]), train=False)
        return objectives.split_output(out)[0]

    want = curves.bernoulli_timestep_curves(
        out_fn, schedule, jnp.asarray(test["mask"]), jnp.asarray(ts), jax.random.fold_in(
            jax.random.PRNGKey(config.analysis.seed), 0), prediction="x0")["bernoulli_mask_error"]  # fmt: skip
    np.testing.assert_allclose([r["value"] for r in rows], np.asarray(want).mean(1), rtol=1e-5)
    assert 0.0 < rows[-1]["value"] < 1.0


def test_analyse_without_a_checkpoint_fails_before_replacing_the_old_files(tmp_path, tfds_dir):
    config = _analyse_config(tfds_dir, analyses=("mask_error", "forward", "model_free"))
    before = _old_analysis(tmp_path)
    with pytest.raises(FileNotFoundError, match="No checkpoint in"):
        run.analyse(config, str(tmp_path))
    assert {p.name: p.read_text() for p in (tmp_path / "analysis").iterdir()} == before
    assert not (tmp_path / run.PARTIAL_DIR).exists()


def test_an_interrupted_analyse_leaves_the_old_files_and_a_complete_one_swaps_in(
    tmp_path, tfds_dir, monkeypatch
):
    config = _analyse_config(tfds_dir)
    before = _old_analysis(tmp_path)

    def interrupted(*args, **kwargs):  # after forward.* are written into the new folder
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(model_free, "model_free_curve", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run.analyse(config, str(tmp_path))
    assert {p.name: p.read_text() for p in (tmp_path / "analysis").iterdir()} == before
    assert not (tmp_path / run.PARTIAL_DIR).exists()

    # A run killed outright leaves its partial folder: the next run clears it and swaps in the complete set.
    (tmp_path / run.PARTIAL_DIR).mkdir()
    (tmp_path / run.PARTIAL_DIR / "forward.npz").write_text("killed")
    written = run.analyse(config, str(tmp_path))
    assert set(written) == {"forward", "model_free", "convergence"}
    assert all(p.startswith(str(tmp_path / "analysis")) and os.path.isfile(p) for p in written.values())
    assert np.load(written["forward"])["image"].shape[0] == len(config.analysis.forward_timesteps)
    assert result_files.read_rows(written["model_free"])[0]["model"] == "model-free"
    # curves.csv belongs to an analysis not run this time: kept, as the files of a new run would have kept it.
    assert (tmp_path / "analysis" / "curves.csv").read_text() == before["curves.csv"]
    assert not (tmp_path / run.PARTIAL_DIR).exists() and not (tmp_path / run.OLD_DIR).exists()


def test_fingerprints_report_a_missing_path_or_a_file_of_another_kind_as_one_message(tmp_path):
    from diffseg_jax.data import files

    with pytest.raises(SystemExit, match=r"Error: --runs .*nowhere: no such file or folder"):
        fingerprints.main(["--runs", str(tmp_path / "nowhere"), "--out", str(tmp_path / "fp")])
    (tmp_path / "config.json").write_text('{"experiment": "e2"}\n')
    with pytest.raises(SystemExit, match=r"config\.json is not a curve table .*no column \['t', 'value'"):
        fingerprints.main(["--runs", str(tmp_path / "config.json"), "--out", str(tmp_path / "fp")])
    assert not (tmp_path / "fp").exists()
    (tmp_path / "cut.csv").write_text(
        "t,value,curve,model,experiment,dataset,step\n0,0.1,mask_error,m,e2,d\n"
    )
    with pytest.raises(files.DatasetFileError, match=r"cut\.csv, row 2"):
        result_files.read_rows(str(tmp_path / "cut.csv"))


def test_analysing_other_data_than_the_run_trained_on_is_said(tmp_path, tfds_dir, caplog):
    """--mode analyse with a config whose data differs from the run's record (a config file retyped without
    the training's --config.data.kind) runs, as analysing a model on other data is legitimate, but says so."""
    from conftest import tiny_config

    from diffseg_jax import configlib, evaluate

    trained = tiny_config(data_dir=tfds_dir)
    trained.data.kind = "nuclei"
    configlib.save(trained, str(tmp_path / "config.json"))
    assert evaluate.trained_dataset(str(tmp_path)) == "synthetic-nuclei"
    assert evaluate.trained_dataset(str(tmp_path / "nothing")) is None
    config = tiny_config(data_dir=tfds_dir)  # lesions
    config.analysis.analyses = ("forward",)  # no checkpoint needed
    with caplog.at_level("WARNING"):
        written = run.analyse(config, str(tmp_path))
    assert os.path.exists(written["forward"])
    assert "trained on synthetic-nuclei; these analyses are of synthetic-lesion" in caplog.text
    caplog.clear()
    trained.analysis.analyses = ("forward",)
    with caplog.at_level("WARNING"):
        run.analyse(trained, str(tmp_path))
    assert "trained on" not in caplog.text


@pytest.mark.parametrize("mask_range", ["symmetric", "binary"])
def test_a_v_oracle_has_zero_mask_error_and_eps_loss(mask_range):
    """objective.prediction='v' (issue 32): a network returning the true v = √ᾱ ε − √(1-ᾱ) x0 gives back x0 and ε
    exactly at every t, in either mask range."""
    x0 = diffusion.mask_to_diffusion(_masks(), mask_range)

    def v_oracle(x_t, t):
        eps = diffusion.predict_eps_from_x0(SCHEDULE, x_t, t, x0)
        return diffusion.v_from_x0_eps(SCHEDULE, x0, eps, t)

    out = curves.timestep_curves(
        v_oracle, SCHEDULE, x0, TS, jax.random.PRNGKey(0), prediction="v", mask_range=mask_range, num_draws=2
    )
    np.testing.assert_allclose(out["mask_error"], 0.0, atol=1e-6)
    np.testing.assert_allclose(out["eps_loss"], 0.0, atol=1e-6)


def test_fig4_puts_curves_of_different_T_on_one_t_over_T_axis(tmp_path):
    """Issue 32: SegDiff's T = 100 curve and EnsemDiff's T = 1000 one of the same shape in t/T coincide on the
    t/T axis, their average is that shape (not a mix of t = 50 and t = 500), their t_half/T agree, and the
    model-free curves of the two horizons stay apart instead of being averaged per t."""

    def rows(model, horizon, curve_model=None):
        return [
            dict(t=int(t), value=float(((t + 1) / horizon) ** 2), curve="mask_error", model=curve_model or model,
                 experiment="e2", dataset="d", step=1)
            for t in range(horizon)
        ]  # fmt: skip

    for model, horizon in (("segdiff", 100), ("ensemdiff", 1000)):
        os.makedirs(tmp_path / model / "analysis")
        result_files.write_rows(str(tmp_path / model / "analysis" / "curves"), rows(model, horizon))
        result_files.write_rows(
            str(tmp_path / model / "analysis" / "model_free"), rows(model, horizon, "model-free")
        )
    everything = [r for m in ("segdiff", "ensemdiff") for f in ("curves", "model_free")
                  for r in plots.with_horizon(result_files.read_rows(str(tmp_path / m / "analysis" / f"{f}.csv")))]  # fmt: skip
    series = plots.fraction_series(everything)
    assert set(series) == {
        ("d", m, "e2", "mask_error", h) for m in ("segdiff", "ensemdiff", "model-free") for h in (100, 1000)
    } - {("d", "segdiff", "e2", "mask_error", 1000), ("d", "ensemdiff", "e2", "mask_error", 100)}
    u100, v100, _ = series[("d", "segdiff", "e2", "mask_error", 100)]
    np.testing.assert_allclose(v100, u100**2)
    grid, mean = plots.average_on_fraction(
        [series[("d", m, "e2", "mask_error", h)][:2] for m, h in (("segdiff", 100), ("ensemdiff", 1000))]
    )
    assert len(grid) == 1000
    np.testing.assert_allclose(mean, grid**2, atol=1e-4)  # interpolation error of u² on a 0.01 grid
    summary = {s["model"]: s for s in fingerprints.summarise(everything, 1) if s["model"] != "model-free"}
    assert summary["segdiff"]["t_half_frac"] == pytest.approx(summary["ensemdiff"]["t_half_frac"], abs=0.01)
    paths = fingerprints.main(["--runs", str(tmp_path), "--out", str(tmp_path / "fp"), "--smoothing", "1"])
    with open(paths["md"]) as f:
        assert "| d | segdiff | e2 | 100 | 70 | 0.710 |" in f.read()


def test_model_free_curve_of_binary_masks_is_the_exact_posterior_at_a_quarter_snr():
    """Issue 32: masks diffused in {0,1} (EnsemDiff's and MedSegDiff's codes) are noisier than 2m - 1 at every
    t. The curve for mask_range='binary' must match a direct simulation of the binary process with its exact
    per-pixel posterior p = sigmoid(logit π + (√ᾱ x - ᾱ/2)/(1 - ᾱ)), and lie above the symmetric one."""
    masks = _masks(seed=3, n=64)
    ts = jnp.array([20, 40, 60])
    symmetric = model_free.model_free_curve(
        SCHEDULE, masks, ts, jax.random.PRNGKey(0), windows=(1,), num_draws=4
    )
    binary = model_free.model_free_curve(
        SCHEDULE, masks, ts, jax.random.PRNGKey(0), windows=(1,), num_draws=4, mask_range="binary"
    )
    rate = float(masks.mean())
    for i, t in enumerate(np.asarray(ts)):
        a = float(SCHEDULE.alphas_cumprod[t])
        noise = jax.random.normal(jax.random.PRNGKey(100 + i), (8,) + masks.shape)
        x_t = np.sqrt(a) * masks + np.sqrt(1 - a) * noise
        p = jax.nn.sigmoid(np.log(rate / (1 - rate)) + (np.sqrt(a) * x_t - a / 2) / (1 - a))
        direct = float(jnp.mean((p - masks) ** 2))
        assert float(binary["mask_error"][i]) == pytest.approx(direct, abs=0.006)
    gap = np.asarray(binary["mask_error"]) - np.asarray(symmetric["mask_error"])
    assert np.all(gap > 0) and np.all(gap[:2] > 0.03)  # (both near the limit π(1 - π) by t = 60)


def test_late_error_mean_limit_at_t_max_is_the_error_of_predicting_the_training_rate():
    """late_error.mean_limit (issue 32): at t = T - 1 of a 1000-step linear schedule (ᾱ ≈ 4e-5) x_t says
    almost nothing of the mask, so the best estimator from x_t alone predicts the training rate π at every pixel,
    whose error on test masks of rate ρ is E[(π - m)²] = ρ (1 - ρ) + (π - ρ)² (for a pixel: π² with probability
    1 - ρ, (1 - π)² with probability ρ). The first-order correction, the information x_t still carries, is
    O(ᾱ) ≈ 1e-4 relative: far inside the tolerance. With the test masks' own rate it would be ρ (1 - ρ) (0.21
    instead of 0.25 here)."""
    from diffseg_jax.analysis import late_error

    schedule = diffusion.get_schedule("linear", 1000)
    test = np.zeros((4, 20, 20, 1), np.float32)
    test[:, :6] = 1.0  # ρ = 0.3
    train = np.zeros((6, 20, 20, 1), np.float32)
    train[:, :2] = 1.0  # π = 0.1
    rho, pi = 0.3, 0.1
    ts = late_error.late_timesteps(1000)
    np.testing.assert_array_equal(ts, [900, 925, 950, 974, 999])
    for mask_range in ("symmetric", "binary"):
        out = late_error.mean_limit(schedule, test, train, ts, jax.random.PRNGKey(0), mask_range=mask_range)
        assert (out["rate_train"], out["rate_test"]) == pytest.approx((pi, rho))
        assert out["mean_limit"][-1] == pytest.approx(rho * (1 - rho) + (pi - rho) ** 2, rel=2e-3)
        assert np.all(out["mean_limit"] <= out["mean_limit"][-1] + 1e-3)  # earlier t: x_t tells a little more


@pytest.mark.slow
def test_late_error_point_is_network_curves_at_t_max_with_the_kept_steps_weights(tmp_path, tfds_dir):
    """late_error.write_point (issue 32) stores, for the kept step asked for, network_curves' mask error at
    t = T - 1 with that step's weights (not the latest), and the mean limit of the test masks under the
    training rate; a second call finds the file and skips; the learning curves pick it up as a row of its own."""
    from conftest import tiny_config

    from diffseg_jax import build, checkpoints, data, learning_curves
    from diffseg_jax.analysis import late_error

    config = tiny_config("e2_synthetic", data_dir=tfds_dir)
    config.eval.num_images = 3
    config.objective.prediction = "x0"  # ε̂ of random weights, amplified ~1/√ᾱ at T - 1, saturates the clip
    _, _, _, state = build.model_and_state(config, (32, 32, 3))
    ckpt = checkpoints.Checkpointer(str(tmp_path / "checkpoints"))
    for step in (2, 4):  # two kept steps with different weights (the output layer starts at zero)
        params = jax.tree.map(lambda p, s=step: p + 0.02 * s, state.params)
        ckpt.save(step, state.replace(step=step, params=params, ema_params=params), {})
    ckpt.wait()
    ckpt.close()
    written = {}
    for step in (2, 4):
        path = late_error.write_point(config, str(tmp_path), step)
        assert path == str(tmp_path / "learning_curve" / f"step{step}_mask_error.json")
        written[step] = learning_curves.read_mask_error(path)
    test = data.model_sized_arrays(config.data, "test", 3)
    c = config.copy_and_resolve_references()
    c.eval.step = 2  # had write_point taken the latest weights, step 2's record would hold step 4's error
    ts = late_error.late_timesteps(100)
    direct, got = run.network_curves(c, str(tmp_path), test, ts, jax.random.PRNGKey(c.analysis.seed))
    assert got == 2 == written[2]["step"] and written[2]["t"] == ts.tolist() and ts[-1] == 99
    np.testing.assert_allclose(written[2]["mask_error"], direct["mask_error"], rtol=1e-5)
    assert written[2]["mask_error_T"] != pytest.approx(written[4]["mask_error_T"], rel=1e-3)
    train = data.model_sized_arrays(config.data, "train")["mask"]
    limit = late_error.mean_limit(
        build.build_schedule(config.diffusion), test["mask"], train, np.array([99]),
        jax.random.PRNGKey(config.analysis.seed), mask_range=config.diffusion.mask_range,
    )  # fmt: skip
    assert written[4]["mean_limit_T"] == pytest.approx(float(limit["mean_limit"][-1]), rel=1e-5)
    assert late_error.write_point(config, str(tmp_path), 4) is None  # there already: resumable
    rows = learning_curves.collect_learning_curves([str(tmp_path)])
    assert [(r["step"], r["sampler"], r["mask_error_T"]) for r in rows] == [
        (2, "-", written[2]["mask_error_T"]),
        (4, "-", written[4]["mask_error_T"]),
    ]
