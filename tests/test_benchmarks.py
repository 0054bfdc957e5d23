"""benchmarks/: XLA's FLOP count against a closed form, a tiny models.py run, and the summary gpu_check.sh prints."""

import gzip
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import common  # noqa: E402
import profiling  # noqa: E402
import summary  # noqa: E402

from diffseg_jax import build, distributed, validation


def test_hlo_flops_of_a_matmul_is_the_closed_form():
    m, k, n = 8, 16, 4
    lowered = jax.jit(jnp.matmul).lower(jnp.zeros((m, k)), jnp.zeros((k, n)))
    assert common.hlo_flops(lowered) == 2 * m * k * n
    # The route a GPU behind a PJRT plugin takes (its Lowered.cost_analysis() is None): the same count, also
    # for a program with sharding annotations, as the train step is lowered over the data mesh.
    assert common.cpu_hlo_flops(lowered) == 2 * m * k * n
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    rows = NamedSharding(distributed.data_mesh(), P("data"))
    sharded = jax.jit(jnp.matmul, in_shardings=(rows, None), out_shardings=rows)
    lowered = sharded.lower(jnp.zeros((m, k)), jnp.zeros((k, n)))
    # XLA counts the annotated program 1 FLOP short (1,023): both routes agree, near the closed form.
    assert common.cpu_hlo_flops(lowered) == lowered.cost_analysis()["flops"]
    assert common.cpu_hlo_flops(lowered) == pytest.approx(2 * m * k * n, rel=1e-2)


def test_flops_of_a_train_step_lowered_for_cuda_are_counted_without_a_gpu():
    """The GPU route of ``hlo_flops``: the train step as JAX lowers it for CUDA (cross-platform lowering, no GPU
    needed), counted by XLA:CPU's analysis, is the CPU lowering's count. The only difference JAX's lowering
    rules make is the random-number generator, a loop on the CPU (counted once) and unrolled for CUDA."""
    import models as bench_models

    config = bench_models._config("ensemdiff", True, "float32", False)
    size, ch = config.data.image_size, config.data.image_channels
    model = build.build_model(config.model, build.output_channels(config, ch), size)
    variables = common.host_variables(common.abstract_variables(model, size, ch))
    step, state, batch = bench_models.step_and_inputs(config, model, variables, 2)
    on_cpu = common.hlo_flops(step.lower(state, batch))
    for_cuda = step.trace(state, batch).lower(lowering_platforms=("cuda",))
    assert "custom_call" not in for_cuda.as_text()  # nothing left uncounted by a kernel call
    assert common.cpu_hlo_flops(for_cuda) == pytest.approx(on_cpu, rel=1e-3)
    assert on_cpu > 2 * 1e9  # the tiny step's 2.86 GFLOP at batch 2, not a count of the optimizer alone


def test_step_memory_credits_a_row_only_with_a_peak_it_raised():
    # JAX's peak counter runs over the process: rows timed one after another share it.
    raised = common.step_memory(before=(10.0, 40.0), after=(10.5, 52.0))
    assert raised == {"device_peak_gib": 52.0, "step_transient_gib": 42.0, "device_resident_gib": 10.0}
    under = common.step_memory(before=(10.0, 52.0), after=(10.0, 52.0))
    assert under == {"device_peak_below_gib": 52.0, "device_resident_gib": 10.0}
    assert common.step_memory(None, None) == {}  # CPU: no allocator statistics
    assert common.device_memory() is None or len(common.device_memory()) == 2


def _trace_file(tmp_path, events) -> str:
    path = tmp_path / "perfetto_trace.json.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        json.dump({"traceEvents": events}, f)
    return str(path)


def _meta(pid, name, tid=None):
    kind = "process_name" if tid is None else "thread_name"
    return {
        "ph": "M",
        "pid": pid,
        **({} if tid is None else {"tid": tid}),
        "name": kind,
        "args": {"name": name},
    }


def _op(pid, tid, dur_us, op, name=None):
    return {
        "ph": "X",
        "pid": pid,
        "tid": tid,
        "ts": 0.0,
        "dur": dur_us,
        "name": name or op,
        "args": {"hlo_op": op},
    }


def test_top_ops_sums_a_device_trace_by_op_and_kind(tmp_path):
    """A GPU-like trace: the host's launch events (op names too) and a non-op event are left out; the kernels of
    one op add up; kinds drop XLA's instance numbers; shares are of the device's busy time."""
    events = [
        _meta(1, "/host:CPU"),
        _meta(2, "/device:GPU:0"),
        _meta(2, "Stream #13(Compute)", tid=13),
        _op(1, 7, 9000.0, "fusion.1"),  # the host's launch of fusion.1: not device time
        {"ph": "X", "pid": 2, "tid": 13, "ts": 0.0, "dur": 500.0, "name": "memcpy"},  # no hlo_op
        _op(2, 13, 3000.0, "cudnn-conv.2", "sm90_xmma_fprop"),  # one conv, two kernels: 4 ms together
        _op(2, 13, 1000.0, "cudnn-conv.2", "sm90_xmma_fprop_tail"),
        _op(2, 13, 2500.0, "fusion.1"),
        _op(2, 13, 1500.0, "fusion.7"),
        _op(2, 13, 2000.0, "cudnn-conv.5"),
    ]
    top = profiling.top_ops(_trace_file(tmp_path, events), n=3)
    assert top["process"] == "/device:GPU:0"
    assert top["busy_ms"] == pytest.approx(10.0)
    assert [(r["op"], r["ms"], r["count"]) for r in top["ops"]] == [
        ("cudnn-conv.2", 4.0, 2),
        ("fusion.1", 2.5, 1),
        ("cudnn-conv.5", 2.0, 1),
    ]
    assert top["ops"][0]["share"] == pytest.approx(0.4) and top["ops"][0]["kernel"] == "sm90_xmma_fprop"
    assert [(r["kind"], r["ms"]) for r in top["kinds"]] == [("cudnn-conv", 6.0), ("fusion", 4.0)]


def test_top_ops_reads_the_derived_op_line_alone_where_the_trace_has_one(tmp_path):
    """With an 'XLA Ops' line (one event per op) beside the kernels under it, each op counts once."""
    events = [
        _meta(2, "/device:GPU:0"),
        _meta(2, "Stream #13(Compute)", tid=13),
        _meta(2, "XLA Ops", tid=99),
        _op(2, 13, 700.0, "fusion.3", "kernel_a"),
        _op(2, 13, 300.0, "fusion.3", "kernel_b"),
        _op(2, 99, 1200.0, "fusion.3"),  # the op's span, launch gaps included
    ]
    top = profiling.top_ops(_trace_file(tmp_path, events))
    assert top["busy_ms"] == pytest.approx(1.2) and top["ops"][0]["count"] == 1


def test_peak_of_the_devices_the_gpu_scripts_ran_on():
    assert common.peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.0
    assert common.peak_tflops("NVIDIA H100 PCIe", "float32") == 378.0
    assert common.peak_tflops("NVIDIA H200", "float32") == 495.0
    assert common.peak_tflops("cpu", "bfloat16") is None


def test_summary_says_what_each_row_and_part_came_to(tmp_path, capsys):
    base = {"size": "published", "image_size": 256, "dtype": "float32", "remat": False, "batch": 8}
    rows = [
        {**base, "model": "segformer", "depthwise": "conv", "pending": True},
        {**base, "model": "segdiff", "pending": False, "error": "XlaRuntimeError: RESOURCE_EXHAUSTED"},
        {**base, "model": "medsegdiff", "train_step_gflops": 1553.0, "init_s": 20.0, "compile_s": 40.4},
        {
            **base,
            "model": "ensemdiff",
            "remat": True,
            "train_step_gflops": 2954.0,
            "init_s": 5.0,
            "compile_s": 48.5,
            "images_per_s": 89.4,
            "achieved_tflops": 133.0,
            "xla_memory_gib": 13.3,
            "device_peak_gib": 36.1,
            "step_transient_gib": 30.2,
            "timed_beside_compilation": True,
        },
    ]
    rows.append(
        {
            **base,
            "model": "ensemdiff_31",  # issue 31's forms: the step's own TFLOP/s and its share of the peak
            "dtype": "bfloat16",
            "remat": True,
            "remat_policy": "conv_outputs",
            "norm_impl": "stats_float32",
            "batch": 32,
            "train_step_gflops": 12000.0,
            "init_s": 5.0,
            "compile_s": 50.0,
            "images_per_s": 200.0,
            "achieved_tflops": 300.0,
            "model_tflops": 296.7,
            "percent_of_peak": 30.0,
            "xla_memory_gib": 40.0,
        }
    )
    (tmp_path / "train.json").write_text(json.dumps({"device": "backend: gpu", "rows": rows}))
    (tmp_path / "train.log").write_text("")
    (tmp_path / "curves.log").write_text("=== curves stopped at its 40s limit\n")
    summary.main(str(tmp_path))
    lines = {line.split()[1]: line for line in capsys.readouterr().out.splitlines()[2:]}
    assert lines["segformer"].endswith("not compiled: time limit")
    assert "float32 dwconv batch 8" in lines["segformer"]
    assert "FAILED: XlaRuntimeError: RESOURCE_EXHAUSTED" in lines["segdiff"]
    assert lines["medsegdiff"].endswith("compiled in 60 s, not timed")
    assert "float32 remat batch 8 (timed beside compiles)" in lines["ensemdiff"]
    assert lines["ensemdiff"].endswith("89.4 img/s 133.0 TFLOP/s XLA 13.3 GiB, step +30.2 GiB")
    assert "bfloat16 remat remat_conv gnstats batch 32" in lines["ensemdiff_31"]
    assert lines["ensemdiff_31"].endswith("200.0 img/s 296.7 TFLOP/s (30 % of peak) XLA 40.0 GiB")
    assert lines["no"].startswith("curves") and "see curves.log" in lines["no"]  # a part without any row


def test_model_entries_carry_their_variant_into_the_config_and_the_label():
    import models as bench  # benchmarks/models.py

    assert bench.parse_entry("ensemdiff+bfloat16+remat", "float32", False) == (
        "ensemdiff",
        "bfloat16",
        True,
        (),
    )
    # SegFormer has no model.remat: a --remat default falls back to what it computes.
    name, dtype, remat, other = bench.parse_entry("segformer+dwconv", "bfloat16", True)
    assert (name, dtype, remat, other) == ("segformer", "bfloat16", False, (("depthwise", "conv"),))
    config = bench._config(name, True, dtype, remat, other)
    assert config.model.depthwise == "conv" and config.model.dtype == "bfloat16"
    assert bench._config(name, True, dtype, remat).model.depthwise == "shift"  # the default
    label = bench.variant_label(bench._pending((name, "bfloat16", True, other, True), 8))
    assert label == "bfloat16+remat+dwconv"
    with pytest.raises(SystemExit, match="sets model.depthwise, which ensemdiff does not have"):
        bench.parse_entry("ensemdiff+dwconv", "float32", False)
    # nnU-Net has no model.remat: an explicit remat entry is refused, a remat default is not applied (its row
    # would otherwise say remat of a step without it).
    with pytest.raises(SystemExit, match="sets model.remat, which nnunet does not have"):
        bench.parse_entry("nnunet+remat", "float32", False)
    assert bench.parse_entry("nnunet", "bfloat16", True) == ("nnunet", "bfloat16", False, ())
    with pytest.raises(SystemExit, match="unknown variant 'fp8'"):
        bench.parse_entry("segformer+fp8", "float32", False)
    # Issue 31's forms: a remat policy turns remat on; models without the option refuse the token.
    name, dtype, remat, other = bench.parse_entry(
        "ensemdiff+bfloat16+gnstats+remat_conv+dpa", "float32", False
    )
    assert (dtype, remat) == ("bfloat16", True)
    assert dict(other) == {
        "attention_impl": "dot_product",
        "norm_impl": "stats_float32",
        "remat_policy": "conv_outputs",
    }
    config = bench._config(name, True, dtype, remat, other)
    assert (config.model.remat, config.model.remat_policy, config.model.norm_impl) == (
        True,
        "conv_outputs",
        "stats_float32",
    )
    validation.validate(config, check_data=False)
    assert bench.variant_label(bench._pending((name, dtype, remat, other, True), 8)) == (
        "bfloat16+remat+dpa+gnstats+remat_conv"
    )
    with pytest.raises(SystemExit, match="sets model.norm_impl, which nnunet does not have"):
        bench.parse_entry("nnunet+gnstats", "float32", False)
    assert bench.split_batch("ensemdiff+bfloat16@16", 8) == ("ensemdiff+bfloat16", 16)
    assert bench.split_batch(" medsegdiff ", 8) == ("medsegdiff", 8)
    with pytest.raises(SystemExit, match="positive integer"):
        bench.split_batch("ensemdiff@0", 8)


def _benchmark(tmp_path, script: str, *args: str) -> tuple[str, list[dict]]:
    """Runs ``benchmarks/<script> <args>`` as a user does; returns its stdout and the rows of its JSON."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, f"benchmarks/{script}", *args, "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())["rows"]


@pytest.mark.slow
def test_models_benchmark_counts_and_times_a_tiny_step(tmp_path):
    stdout, (row,) = _benchmark(
        tmp_path,
        "models.py",
        *("--models", "nnunet", "--sizes", "tiny", "--batch", "2", "--repeats", "2"),
        *("--profile", str(tmp_path / "profile"), "--profile-steps", "2"),
    )
    assert stdout.startswith("backend: cpu")
    # --profile: the ops of a jax.profiler trace of 2 more steps, ranked, printed as a table of 10.
    top = row["profile"]
    assert top["steps"] == 2 and top["process"] == "/host:CPU" and os.path.exists(top["trace"])
    ms = [op["ms"] for op in top["ops"]]
    assert len(ms) == 10 and ms == sorted(ms, reverse=True) and 0 < sum(ms) <= top["busy_ms"]
    assert f"  {top['ops'][0]['op']}" in stdout.split("-- top ops of nnunet")[1]
    assert row["percent_of_peak"] is None and row["model_gflops"] == row["train_step_gflops"]  # CPU, no remat
    assert "pending" not in row and "error" not in row  # the pending placeholder was replaced
    from diffseg_jax import defaults, models

    config = defaults.get_config("nnunet,tiny")
    size, ch = config.data.image_size, config.data.image_channels
    model = build.build_model(config.model, build.output_channels(config, ch), size)
    x, t, cond = jnp.zeros((1, size, size, 1)), jnp.zeros((1,), jnp.int32), jnp.zeros((1, size, size, ch))
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, t, cond))
    assert row["params"] == models.param_count(abstract["params"]) and row["image_size"] == size
    assert row["images_per_s"] == pytest.approx(2 / row["train_step_median_s"])
    assert np.isfinite(row["last_loss"]) and row["last_loss"] > 0  # host-made weights train to a real loss
    assert row["achieved_tflops"] == pytest.approx(
        row["train_step_gflops"] / row["train_step_median_s"] / 1e3
    )
    # A train step is a forward and a backward pass (about twice the forward's FLOPs) per image, plus the update:
    # about 3 forward passes per image (3.06 here); counting only the forward, or the batch twice, would not be.
    ratio = row["train_step_gflops"] / (2 * row["forward_gflops_per_image"])
    assert 2.5 < ratio < 4


@pytest.mark.slow
@pytest.mark.parametrize(
    "script, args, diff",
    [
        ("sampling.py", ["--images", "2", "--members", "2", "--steps", "5"], "max_abs_diff_of_means"),
        ("curves.py", ["--images", "2", "--timesteps", "50"], "max_abs_diff"),
    ],
)
def test_jitted_and_naive_ways_agree_in_the_speed_benchmarks(tmp_path, script, args, diff):
    """The sampler (scan + vmap) and the curve evaluator (one compiled call) against the published codes' Python
    loops, with the same keys: the benchmark only times them, so their outputs must be the same numbers."""
    _, (row,) = _benchmark(
        tmp_path, script, "--models", "ensemdiff", "--size", "tiny", *args, "--repeats", "1"
    )
    assert row[diff] < 1e-4, row


def test_paper_settings_extrapolate_the_measured_rate_to_the_whole_test_set(tmp_path, capsys):
    import importlib

    paper = importlib.import_module("sampling")  # benchmarks/sampling.py
    # The configs timed: the paper's members per dataset, the automatic batch, the dtype, and the sampler cut to
    # the measured calls (DDPM over a T-call schedule; DDIM's calls on T = 1000).
    for dataset, members in (("isic", 10), ("monuseg", 25)):
        ddim = paper.paper_config("ensemdiff", dataset, "ddim", "bfloat16", False, 3)
        assert (ddim.eval.ensemble_size, ddim.eval.batch_size, ddim.model.dtype) == (members, 0, "bfloat16")
        assert (ddim.eval.sampler, ddim.eval.ddim_steps, ddim.diffusion.num_timesteps) == ("ddim", 3, 1000)
        ddpm = paper.paper_config("ensemdiff", dataset, "ddpm", "float32", True, 4)
        assert (ddpm.diffusion.num_timesteps, ddpm.model.model_channels, ddim.model.model_channels) == (4, 128, 32)
    # ISIC: 379 images in calls of 10 (the last padded: 38 calls), 10 members × 1000 steps at 1000 m-s/s.
    isic = paper.extrapolate(1000.0, 10, 10, 1000, 379, 379)
    assert isic["set_hours"] == pytest.approx(380 * 10 * 1000 / 1000 / 3600)
    assert isic["s_per_image"] == pytest.approx(3800 / 379)
    assert isic["images_per_hour"] == pytest.approx(3600 * 379 / 3800)
    # MoNuSeg: 14 images of 4 tiles in calls of 16 tiles (4 calls), 25 members × 50 DDIM steps.
    assert paper.extrapolate(1000.0, 16, 25, 50, 56, 14)["s_per_image"] == pytest.approx(
        64 * 25 * 50 / 1000 / 14
    )
    row = {"model": "ensemdiff", "image_size": 256, "dataset": "isic", "sampler": "ddpm", "dtype": "bfloat16"}
    rows = [
        {**row, "paper_steps": 1000, "batch": 10, "members": 10, "member_steps_per_s": 1000.0, **isic},
        {**row, "dataset": "monuseg", "error": "XlaRuntimeError: RESOURCE_EXHAUSTED"},
    ]
    (tmp_path / "sampling_paper.json").write_text(json.dumps({"device": "backend: gpu", "rows": rows}))
    summary.main(str(tmp_path))
    out = capsys.readouterr().out
    assert "isic ddpm-1000 bfloat16 10×10/call" in out and "1000 m-s/s → 10.03 s/img, 359 img/h" in out
    assert "monuseg ddpm bfloat16" in out and "FAILED: XlaRuntimeError" in out


def test_seconds_per_image_times_the_runs_own_evaluation(tmp_path, tfds_dir):
    """``seconds_per_image.py`` times what ``--mode evaluate`` does for the run: the same ensemble maps of the
    same test images (stored at 64 px, so each is four 32 px tiles), and the calls per member of the sampler it
    is given; folders are searched for trained runs."""
    import jax

    import seconds_per_image
    from conftest import tiny_config

    from diffseg_jax import checkpoints, configlib, evaluate

    config = tiny_config("e2_synthetic", data_dir=tfds_dir)
    config.data.resize, config.data.num_train, config.eval.num_images = 64, 16, 3
    workdir = tmp_path / "grid" / "cell"
    _, _, _, state = build.model_and_state(config, (32, 32, 3))
    leaves, treedef = jax.tree.flatten(state.params)  # a fresh output layer is zero: samples ignore the image
    keys = jax.random.split(jax.random.key(0), len(leaves))
    params = jax.tree.unflatten(treedef, [p + 0.2 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    state = state.replace(step=3, params=params, ema_params=params)
    ckpt = checkpoints.Checkpointer(str(workdir / "checkpoints"))
    ckpt.save(3, state, {})
    ckpt.wait()
    ckpt.close()
    configlib.save(config, str(workdir / "config.json"))
    evaluate.evaluate(config, str(workdir))
    with np.load(workdir / "eval" / "ensemble.npz") as ev:
        evaluated = ev["mean"]

    assert seconds_per_image.trained_runs([str(tmp_path / "grid")]) == [str(workdir)]
    row, mean = seconds_per_image.time_run(str(workdir), images=3, repeats=1)
    np.testing.assert_allclose(mean, evaluated, atol=1e-6)
    assert (row["images"], row["members"], row["calls_per_member"]) == (3, config.eval.ensemble_size, 5)
    assert row["sampler"] == "ddim5" and row["prediction"] == "eps" and row["s_per_image"] > 0
    # images=0: one evaluation batch, which counts tiles (eval.batch_size 4 = one image of four tiles).
    row, _ = seconds_per_image.time_run(str(workdir), images=0, repeats=1, sampler="ddpm")
    assert (row["sampler"], row["calls_per_member"]) == ("ddpm", config.diffusion.num_timesteps)
    assert row["images"] == config.eval.batch_size // 4 == 1
    with pytest.raises(SystemExit, match="No trained run"):
        seconds_per_image.trained_runs([str(tmp_path / "grid" / "cell" / "eval")])
