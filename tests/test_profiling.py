"""The profile's device figures, computed from a Chrome trace: busy time, kernel count, and time by kind of kernel.

A real CUDA trace is checked in tests/test_cuda.py; here, traces written by hand in Kineto's format, so each figure
can be worked out on paper.
"""

import json

import pytest
import torch

import tinygemma.profiling
from tinygemma.errors import UserError
from tinygemma.profiling import (
    KERNEL_NAME_CHARS,
    TOP_KERNELS,
    StepProfiler,
    describe_activity,
    device_activity,
    kernel_kind,
    kernel_table,
    short_kernel_name,
)


def kernel(name, ts, dur, cat="kernel"):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}


@pytest.mark.parametrize("name, kind", [
    ("nvjet_hsh_128x256_64x4_2x1_v_bz_coopB_TNT", "matmul"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
    ("ampere_bf16_s16816gemm_bf16_128x128_ldg8_f2f_stages_64x3_nn", "matmul"),
    # SDPA's kernels name CUTLASS or wgmma in their templates: still attention, not matmul.
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4, false, false, "
     "cutlass::bfloat16_t, Flash_kernel_traits<64, 128, 128, 4, cutlass::bfloat16_t>>, false, true>", "attention"),
    ("fmha_cutlassF_bf16_aligned_64x128_rf_sm80(PyTorchMemEffAttention::AttentionKernel<cutlass::bfloat16_t, "
     "cutlass::arch::Sm80, true, 64, 128, 128, true, true>::Params)", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128_4x1x1_kernel0_0", "attention"),
    ("triton_tem_fused_0", "attention"),  # flex attention's template
    ("triton_tem_fused_addmm_3", "matmul"),  # a matmul template (max-autotune)
    ("triton_tem_fused__to_copy_mm_0", "matmul"),  # one with an epilogue fused in
    ("triton_tem_fused_mm_mul_0", "matmul"),  # inductor sorts the fused ops' names: the epilogue's may follow
    ("triton_tem_fused_addmm_gelu_1", "matmul"),
    ("triton_tem_fused_bmm_mul_2", "matmul"),
    ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_3", "fused pointwise and reductions"),
    ("triton_poi_fused_gelu_mul_7", "fused pointwise and reductions"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>",
     "optimizer and clipping (multi-tensor)"),
    ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", "communication"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>", "other"),
])
def test_kernels_are_sorted_into_kinds_by_name(name, kind):
    assert kernel_kind(name) == kind


def test_copies_and_fills_are_sorted_by_their_category():
    assert kernel_kind("Memcpy HtoD (Pinned -> Device)", "gpu_memcpy") == "copies and fills"
    assert kernel_kind("Memset (Device)", "gpu_memset") == "copies and fills"


def test_busy_time_counts_overlapping_kernels_once_and_shares_add_up():
    events = [
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 900},  # host side: not device time
        kernel("nvjet_gemm", 100, 300),                # 100-400
        kernel("triton_poi_fused_mul_0", 350, 100),    # 350-450, overlaps the product by 50 on another stream
        kernel("Memcpy HtoD", 600, 50, "gpu_memcpy"),  # 600-650
        kernel("triton_tem_fused_0", 700, 150),        # 700-850
        {"ph": "f", "cat": "ac2g", "name": "flow", "ts": 100},  # flow arrows have no duration
    ]
    activity = device_activity(events, wall_s=0.001)  # 1,000 us of wall time
    assert activity["busy_s"] == pytest.approx(550e-6)  # 100-450, 600-650, 700-850
    assert activity["busy"] == pytest.approx(0.55)
    assert activity["kernels"] == 3 and activity["mean_kernel_us"] == pytest.approx(550 / 3)
    shares = activity["share_by_kind"]
    assert shares == pytest.approx({"matmul": 300 / 600, "attention": 150 / 600,
                                    "fused pointwise and reductions": 100 / 600, "copies and fills": 50 / 600})
    assert list(shares) == ["matmul", "attention", "fused pointwise and reductions", "copies and fills"]
    text = describe_activity(activity)
    assert text.startswith("device busy 55.0% of the 0.001 s") and "matmul 50.0%, attention 25.0%" in text


def test_the_top_kernels_are_tallied_by_name_longest_first_and_capped():
    events = [kernel("nvjet_gemm", 0, 300), kernel("triton_poi_fused_mul_0", 300, 100),
              kernel("nvjet_gemm", 400, 200), kernel("triton_tem_fused_0", 600, 250),
              kernel("Memcpy HtoD", 850, 50, "gpu_memcpy"), kernel("x" * 500, 900, 10)]  # a C++ template's length: kept whole
    events += [kernel(f"triton_poi_fused_{i}", 1000 + i, 1) for i in range(TOP_KERNELS)]  # the tail, cut off
    activity = device_activity(events, wall_s=0.002)
    top = activity["top_kernels"]
    total = 300 + 100 + 200 + 250 + 50 + 10 + TOP_KERNELS
    assert len(top) == TOP_KERNELS
    assert top[:5] == [
        {"name": "nvjet_gemm", "kind": "matmul", "calls": 2, "total_us": 500.0, "share": pytest.approx(500 / total)},
        {"name": "triton_tem_fused_0", "kind": "attention", "calls": 1, "total_us": 250.0,
         "share": pytest.approx(250 / total)},
        {"name": "triton_poi_fused_mul_0", "kind": "fused pointwise and reductions", "calls": 1, "total_us": 100.0,
         "share": pytest.approx(100 / total)},
        {"name": "Memcpy HtoD", "kind": "copies and fills", "calls": 1, "total_us": 50.0,
         "share": pytest.approx(50 / total)},
        {"name": "x" * 500, "kind": "other", "calls": 1, "total_us": 10.0, "share": pytest.approx(10 / total)}]
    table = kernel_table(activity).splitlines()
    assert len(table) == 1 + TOP_KERNELS and table[0].split() == ["share", "total", "ms", "calls", "kind", "kernel"]
    assert table[1].split() == [f"{500 / total:.1%}", "0.500", "2", "matmul", "nvjet_gemm"]


def test_shares_of_no_device_time_are_zero_everywhere():
    """Kernels that all last 0 us (a trace's rounding): every share is 0, the kernels' as the kinds'."""
    activity = device_activity([kernel("nvjet_gemm", 0, 0), kernel("triton_poi_fused_0", 1, 0)], wall_s=1e-3)
    assert set(activity["share_by_kind"].values()) == {0.0}
    assert [k["share"] for k in activity["top_kernels"]] == [0.0, 0.0]


def test_a_trace_without_device_events_has_no_device_figures():
    assert device_activity([{"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 5}], 1.0) is None


def test_long_kernel_names_keep_the_part_where_they_differ():
    """ATen's templated kernels differ far into their names (the functor): shortened, two stay two."""
    head = "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::" * 3
    plus, times = head + "BinaryOpScalarFunctor<float, std::plus<float>>", head + "BinaryOpScalarFunctor<float, std::multiplies<float>>"
    for chars in (KERNEL_NAME_CHARS, 90):
        short = {short_kernel_name(plus, chars), short_kernel_name(times, chars)}
        assert len(short) == 2 and all(len(name) == chars for name in short)
        assert short_kernel_name(plus, chars).endswith("std::plus<float>>")
    assert short_kernel_name("nvjet_gemm", 90) == "nvjet_gemm"
    assert [short_kernel_name("abcdefgh", n) for n in (1, 2, 3)] == ["\u2026", "a\u2026", "a\u2026h"]
    activity = device_activity([kernel(plus, 0, 10), kernel(times, 10, 20)], wall_s=1e-4)
    assert [k["name"] for k in activity["top_kernels"]] == [times, plus]  # whole in profile.json
    rows = kernel_table(activity).splitlines()[1:]
    assert "std::multiplies<float>>" in rows[0] and "std::plus<float>>" in rows[1]


def test_a_profile_range_of_one_step_is_that_step():
    from tinygemma.profiling import parse_profile_range

    assert parse_profile_range("3") == (3, 3) and parse_profile_range("2:5") == (2, 5)
    with pytest.raises(UserError, match="START:END"):  # its end left out: refused, not taken as step 3
        parse_profile_range("3:")


def test_a_profile_of_an_invocation_that_trains_nothing_says_so():
    """A finished run, or --stop-at at the run's step: the refusal said "trains optimizer steps 7 to 6"."""
    from tinygemma.config import TrainConfig
    from tinygemma.errors import UserError
    from tinygemma.train import check_profile_range

    cfg = TrainConfig(max_steps=6, warmup_steps=0)
    with pytest.raises(UserError, match=r"^--profile 7:8: this invocation trains no step \(the run is at step 6 and "
                                        r"its schedule ends there, max_steps 6\); profile a run with steps to train$"):
        check_profile_range("7:8", 6, 6, cfg)
    with pytest.raises(UserError, match=r"--profile 4:4: this invocation trains no step \(the run is at step 3 and "
                                        r"--stop-at is not past that step\)"):
        check_profile_range("4:4", 3, 3, cfg)
    assert check_profile_range("4:4", 3, 4, cfg) == (4, 4)


# ------------------------------------------------------------------ mutation round 16

class FakeProfile:
    def __init__(self, log, events=()):
        self.log, self.events = log, list(events)
    def __enter__(self):
        self.log.append("enter")
    def __exit__(self, *exc):
        self.log.append("exit")
    def export_chrome_trace(self, path):
        with open(path, "w") as f:
            json.dump({"traceEvents": self.events}, f)
    def key_averages(self):
        log = self.log
        class Averages:
            def table(self, sort_by, row_limit):
                log.append(("sort_by", sort_by))
                return "TABLE"
        return Averages()


def test_the_profiler_runs_over_exactly_the_steps_asked_for(tmp_path, monkeypatch):  # kills m41
    from tinygemma.profiling import StepProfiler
    log = []
    monkeypatch.setattr(torch.profiler, "profile", lambda **kwargs: FakeProfile(log))
    profiler = StepProfiler(2, 3, tmp_path / "profile", torch.device("cpu"))
    profiled = []
    for step in range(5):  # 0-based, as the loop counts: steps 2 and 3 are indices 1 and 2
        profiler.begin(step)
        if profiler.profiler is not None:
            profiled.append(step + 1)
        profiler.end(step)
    assert profiled == [2, 3] and log.count("enter") == log.count("exit") == 1
    assert (tmp_path / "profile" / "summary.txt").read_text().startswith("torch.profiler: optimizer steps 2 to 3")
    one = StepProfiler(4, 4, tmp_path / "one", torch.device("cpu"))
    for step in range(5):
        one.begin(step)
        one.end(step)
    assert (tmp_path / "one" / "summary.txt").exists()


def test_a_gpu_profiles_operators_are_sorted_by_device_time(tmp_path):  # kills m44
    from tinygemma.profiling import StepProfiler
    log = []
    events = [{"cat": "kernel", "name": "ampere_sgemm_128x64", "ph": "X", "ts": 0, "dur": 500}]
    profiler = StepProfiler(2, 3, tmp_path, torch.device("cuda", 0))
    profiler.profiler = FakeProfile(log, events)
    profiler.write(0.001)
    assert ("sort_by", "self_device_time_total") in log
    summary = (tmp_path / "summary.txt").read_text()
    assert "operators sorted by self_device_time_total" in summary and "device busy 50.0%" in summary


def test_a_kernel_name_of_exactly_the_width_is_kept_whole():  # kills m45
    from tinygemma.profiling import short_kernel_name
    assert short_kernel_name("k" * 160, 160) == "k" * 160
    assert short_kernel_name("k" * 161, 160) != "k" * 161


def test_the_busy_fraction_never_exceeds_one():  # kills m47
    from tinygemma.profiling import device_activity
    activity = device_activity([{"cat": "kernel", "name": "gemm", "ph": "X", "ts": 0, "dur": 1_200_000}], 1.0)
    assert activity["busy"] == 1.0 and activity["busy_s"] == pytest.approx(1.2)


def test_busy_time_counts_a_kernel_inside_a_longer_one_once():
    """A short kernel on another stream inside a long one must not end the covered reach: the kernel
    after it, still inside the long one, adds no busy time."""
    from tinygemma.profiling import device_activity

    def kernel(name, ts, dur):
        return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur}

    activity = device_activity([kernel("nvjet_gemm", 0, 1000), kernel("nccl_allreduce", 100, 100),
                                kernel("triton_poi_fused_0", 300, 100)], wall_s=0.002)
    assert activity["busy_s"] == pytest.approx(1000e-6) and activity["busy"] == pytest.approx(0.5)


def test_the_profiled_wall_time_is_the_steps_own_between_two_synchronisations(tmp_path, monkeypatch):
    """On a GPU the device is synchronised before the profiler starts and before it stops,
    and the clock runs from after the first to before the profiler's own teardown."""
    import tinygemma.profiling
    from tinygemma.profiling import StepProfiler

    log = []
    monkeypatch.setattr(torch.profiler, "profile", lambda **kwargs: FakeProfile(log))
    monkeypatch.setattr(tinygemma.profiling, "synchronize", lambda device: log.append("synchronize"))
    clock = iter(range(100))
    monkeypatch.setattr(tinygemma.profiling.time, "perf_counter", lambda: log.append("clock") or next(clock))
    monkeypatch.setattr(StepProfiler, "write", lambda self, wall_s: log.append(("write", wall_s)))
    profiler = StepProfiler(2, 3, tmp_path, torch.device("cuda", 0))
    for step in range(4):
        profiler.begin(step)
        profiler.end(step)
    assert log == ["synchronize", "enter", "clock", "synchronize", "clock", "exit", ("write", 1)]


def test_a_one_step_profile_names_its_step_once(tmp_path, monkeypatch):
    """The summary of --profile 4 says "optimizer steps 4", not "4 to 4"."""
    from tinygemma.profiling import StepProfiler

    monkeypatch.setattr(torch.profiler, "profile", lambda **kwargs: FakeProfile([]))
    profiler = StepProfiler(4, 4, tmp_path, torch.device("cpu"))
    for step in range(5):
        profiler.begin(step)
        profiler.end(step)
    assert (tmp_path / "summary.txt").read_text().startswith("torch.profiler: optimizer steps 4 on cpu, ")


def test_a_run_stopped_inside_the_profiled_steps_stops_the_profiler(tmp_path, monkeypatch):
    """Abandon() exits torch.profiler (else it goes on recording every later op of the process, and the
    notebook's next profiled train() meets a profiler still running) and writes nothing."""
    from tinygemma.profiling import StepProfiler

    log = []
    monkeypatch.setattr(torch.profiler, "profile", lambda **kwargs: FakeProfile(log))
    profiler = StepProfiler(2, 3, tmp_path / "profile", torch.device("cpu"))
    profiler.begin(1)
    profiler.abandon()
    assert log == ["enter", "exit"] and profiler.profiler is None and not (tmp_path / "profile").exists()


def test_a_profile_that_ends_one_step_past_the_invocation_is_refused():
    """--profile 3:5 on an invocation that trains steps 1 to 4 would never reach its last step (no profile is
    written): refused like any range past the end."""
    from tinygemma.config import TrainConfig
    from tinygemma.errors import UserError
    from tinygemma.train import check_profile_range

    cfg = TrainConfig(max_steps=8, warmup_steps=0, eval_interval=0, checkpoint_interval=0)
    with pytest.raises(UserError, match="trains optimizer steps 1 to 4"):
        check_profile_range("3:5", 0, 4, cfg)
    assert check_profile_range("3:4", 0, 4, cfg) == (3, 4)


def stand_in_profiler(monkeypatch) -> list:
    """torch.profiler.profile stood in for by a profiler that records nothing; returns the activities asked of it."""
    asked = []

    class Recorder:
        def __init__(self, activities, **kwargs):
            asked.extend(activities)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

    monkeypatch.setattr(torch.profiler, "profile", Recorder)
    return asked


def test_a_cuda_profile_records_the_device_side(tmp_path, monkeypatch):
    """On a GPU the profiler records the device side too, or profile.json's device_activity is None and
    summary.txt's device-time column all zeros (tests/test_cuda.py sees it on a GPU; this, on any machine)."""
    asked = stand_in_profiler(monkeypatch)
    monkeypatch.setattr(tinygemma.profiling, "synchronize", lambda device: None)
    profiler = StepProfiler(1, 2, tmp_path, torch.device("cuda", 0))
    profiler.begin(0)
    profiler.abandon()
    assert set(asked) == {torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA}
    asked.clear()
    cpu = StepProfiler(1, 2, tmp_path, torch.device("cpu"))
    cpu.begin(0)
    cpu.abandon()
    assert asked == [torch.profiler.ProfilerActivity.CPU]


def test_only_complete_device_events_are_counted():
    """A device-category event that is not a complete ("X") event -- a flow or instant marker, with no
    duration -- is neither a kernel nor busy time; one with no phase written is a complete one, and one with no
    timestamp is skipped (not a KeyError)."""
    events = [{"ph": "X", "cat": "kernel", "name": "nvjet_gemm", "ts": 0, "dur": 100},
              {"ph": "f", "cat": "kernel", "name": "nvjet_gemm", "ts": 50},
              {"ph": "i", "cat": "gpu_memcpy", "name": "Memcpy HtoD", "ts": 60},
              {"cat": "kernel", "name": "nvjet_gemm", "ts": 200, "dur": 100},
              {"ph": "X", "cat": "kernel", "name": "nvjet_gemm", "dur": 50}]
    activity = device_activity(events, wall_s=1e-3)
    assert activity["kernels"] == 2 and activity["mean_kernel_us"] == pytest.approx(100.0)
    assert activity["top_kernels"][0]["calls"] == 2 and list(activity["share_by_kind"]) == ["matmul"]


def test_kernel_kinds_ignore_the_case_of_a_name():
    """ROCm's Composable Kernel names its attention kernels `FmhaFwdKernel` (torch.cuda on an AMD GPU): still
    attention, not "other"."""
    assert kernel_kind("void ck_tile::kentry<256, 2, ck_tile::FmhaFwdKernel<ck_tile::BlockFmhaPipelineQRKSVS<>>>") \
        == "attention"


def test_shares_of_a_microsecond_of_device_time():
    activity = device_activity([kernel("nvjet_gemm", 0, 0.5), kernel("triton_poi_fused_0", 1, 0.5)], wall_s=1e-3)
    assert activity["share_by_kind"] == pytest.approx({"matmul": 0.5, "fused pointwise and reductions": 0.5})


def test_a_profile_that_cannot_be_written_for_a_disk_error_is_a_warning(tmp_path, monkeypatch, capsys):
    stand_in_profiler(monkeypatch)

    def full_disk(self, wall_s):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(StepProfiler, "write", full_disk)
    profiler = StepProfiler(1, 1, tmp_path, torch.device("cpu"))
    profiler.begin(0)
    profiler.end(0)  # no exception
    assert "was not written" in capsys.readouterr().err and profiler.profiler is None
