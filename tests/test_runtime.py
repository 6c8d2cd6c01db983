"""Device and precision choice for training and inference, checked without a GPU by standing in for CUDA's answers:
a T4 (bfloat16 only emulated) gets float16 with a scaler, an A100 bfloat16, and cuda:1 stays cuda:1."""

import contextlib
import os
import sys
from pathlib import Path

import pytest
import torch

import tinygemma.runtime as runtime
from tinygemma import UserError
from tinygemma.devices import autocast_dtype, pick_dtype
from tinygemma.errors import under_torchrun, whole_number


class FakeCuda:
    """CUDA's answers for one machine: `native_bf16` False is a T4/V100, whose is_bf16_supported() says True
    only through emulation. Records the device current when each question is asked."""

    def __init__(self, monkeypatch, native_bf16: bool, device_count: int = 2, capability: tuple | None = None):
        self.current, self.log = 0, []
        capability = capability or ((8, 0) if native_bf16 else (7, 5))  # an A100; a T4
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: device_count)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(torch.cuda, "set_device", self.set_device)
        monkeypatch.setattr(torch.cuda, "device", self.device)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", self.is_bf16_supported)
        monkeypatch.setattr(torch, "set_float32_matmul_precision", lambda precision: None)
        self.native_bf16 = native_bf16

    def set_device(self, device):
        self.current = torch.device(device).index
        self.log.append(("set_device", self.current))

    @contextlib.contextmanager
    def device(self, device):
        previous, self.current = self.current, torch.device(device).index
        yield
        self.current = previous

    def is_bf16_supported(self, including_emulation: bool = True):
        self.log.append(("is_bf16_supported", self.current))
        return self.native_bf16 or including_emulation


@pytest.mark.parametrize("native, expected", [(False, torch.float16), (True, torch.bfloat16)], ids=["t4", "a100"])
def test_auto_training_precision_follows_native_bfloat16(monkeypatch, native, expected):
    FakeCuda(monkeypatch, native_bf16=native)
    assert autocast_dtype("auto", torch.device("cuda", 0)) == expected
    assert autocast_dtype("bfloat16", torch.device("cuda", 0)) == torch.bfloat16  # asked for: given
    assert autocast_dtype("auto", torch.device("cpu")) == torch.float32


def test_auto_inference_precision_is_float32_without_native_bfloat16(monkeypatch):
    FakeCuda(monkeypatch, native_bf16=False)
    assert pick_dtype("auto", torch.device("cuda", 0)) == torch.float32
    FakeCuda(monkeypatch, native_bf16=True)
    assert pick_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16


def test_an_explicit_gpu_is_honoured_and_made_current_before_the_precision_check(monkeypatch):
    cuda = FakeCuda(monkeypatch, native_bf16=False)
    rt = runtime.setup_runtime("cuda:1", "auto")
    assert rt.device == torch.device("cuda", 1) and rt.dtype == torch.float16
    assert cuda.log[0] == ("set_device", 1) and ("is_bf16_supported", 1) in cuda.log
    assert runtime.setup_runtime("cuda", "auto").device == torch.device("cuda", 1)  # the current one


def test_closing_the_runtime_gives_back_the_float32_matmul_precision(monkeypatch):
    """setup_runtime turns TF32 on for a GPU run; close() (a Trainer's) restores it, so a notebook's float32
    work after train() is not silently TF32."""
    real = torch.set_float32_matmul_precision
    FakeCuda(monkeypatch, native_bf16=True)
    monkeypatch.setattr(torch, "set_float32_matmul_precision", real)  # FakeCuda's leaves it alone
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        rt = runtime.setup_runtime("cuda", "auto")
        assert torch.get_float32_matmul_precision() == "high"
        rt.close()
        assert torch.get_float32_matmul_precision() == "highest"
        torch.set_float32_matmul_precision("medium")
        runtime.setup_runtime("cpu", "auto").close()  # a CPU run changes nothing and restores nothing
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        real(before)


def test_closing_the_runtime_gives_back_the_current_gpu(monkeypatch):
    """A run on cuda:1 made it the current GPU for good: a notebook's next run with device="cuda" (or "auto") went
    to cuda:1, and so did any later .cuda(). close() makes the GPU current before it current again."""
    cuda = FakeCuda(monkeypatch, native_bf16=True)
    rt = runtime.setup_runtime("cuda:1", "auto")
    assert cuda.current == 1
    rt.close()
    assert cuda.current == 0 and runtime.setup_runtime("cuda", "auto").device == torch.device("cuda", 0)


def test_a_torchrun_process_keeps_its_own_gpu_to_the_end(monkeypatch):
    """Under torchrun, close() made every process's GPU 0 current again (each opening a CUDA context on GPU 0,
    about 0.5 GiB), and before its process group ended. A process of a torchrun keeps its own GPU: nothing to give
    back."""
    import torch.distributed as dist

    cuda = FakeCuda(monkeypatch, native_bf16=True, device_count=4)
    for key, value in dict(WORLD_SIZE="4", RANK="3", LOCAL_RANK="3", MASTER_ADDR="localhost",
                           MASTER_PORT="1").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: None)
    monkeypatch.setattr(dist, "destroy_process_group", lambda *a: cuda.log.append(("destroy", cuda.current)))
    rt = runtime.setup_runtime("cuda", "auto")
    assert rt.device == torch.device("cuda", 3) and rt.owns_process_group
    rt.close()
    assert [entry for entry in cuda.log if entry[0] != "is_bf16_supported"] == [("set_device", 3), ("destroy", 3)]


def test_under_torchrun_each_process_takes_its_local_rank(monkeypatch):
    FakeCuda(monkeypatch, native_bf16=True, device_count=4)
    assert runtime.cuda_device(torch.device("cuda"), world_size=4, local_rank=3) == torch.device("cuda", 3)
    with pytest.raises(UserError, match="cuda:LOCAL_RANK"):
        runtime.cuda_device(torch.device("cuda", 1), world_size=4, local_rank=3)
    FakeCuda(monkeypatch, native_bf16=True, device_count=2)  # --nproc-per-node 4 on a 2-GPU machine
    with pytest.raises(UserError, match="LOCAL_RANK 3, but 2 GPUs are visible. Use --nproc-per-node 2 or fewer"):
        runtime.cuda_device(torch.device("cuda"), world_size=4, local_rank=3)


def test_a_gpu_index_beyond_the_machine_is_one_clear_error(monkeypatch):
    from tinygemma.devices import pick_device

    FakeCuda(monkeypatch, native_bf16=True, device_count=2)
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(UserError, match="sees 2 CUDA GPU"):
        pick_device("cuda:3")


def test_muon_runs_its_float16_iteration_on_gpus_that_only_emulate_bfloat16(monkeypatch):
    """A T4 (Colab's free GPU; sm75, no native bf16): auto is float16, its tensor cores' half precision (it was
    float32, at an eighth of their rate), but float32 on a GPU without tensor cores; a GPU with native bf16 takes our batched bfloat16 iteration, the fastest
    the H100 measured (2026-12-05), whether or not torch has torch.optim.Muon."""
    from tinygemma.optim import muon_backend

    monkeypatch.delattr(torch.optim, "Muon", raising=False)
    FakeCuda(monkeypatch, native_bf16=False)
    assert muon_backend(torch.device("cuda", 0)) == "float16"
    FakeCuda(monkeypatch, native_bf16=False, capability=(6, 1))  # Pascal (a GTX 1080): float16 at 1/64 speed
    assert muon_backend(torch.device("cuda", 0)) == "float32"
    FakeCuda(monkeypatch, native_bf16=True)
    assert muon_backend(torch.device("cuda", 0)) == "bfloat16"


def test_torchrun_restarts_through_a_shared_store_are_warned_about():
    """torchrun --max-restarts with its rendezvous store shared with the processes (its default) can fail to
    reconnect a restarted process (seen in tests/test_reliability_train.py); the warning names the fix."""
    from tinygemma.runtime import restart_warning

    shared = {"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_MAX_RESTARTS": "3"}
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in restart_warning(shared)
    assert restart_warning({**shared, "TORCHELASTIC_USE_AGENT_STORE": "False"}) is None  # what that variable gives
    assert restart_warning({**shared, "TORCHELASTIC_MAX_RESTARTS": "0"}) is None  # nothing is restarted
    assert restart_warning({}) is None  # not under torchrun


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_torchrun_worker_dies_with_its_launcher(tmp_path):
    """torchrun starts its workers in sessions of their own: a launcher killed outright left them training and
    writing the run. die_with_parent (called by setup_runtime under torchrun) has the kernel signal the worker
    when its parent dies."""
    import subprocess
    import time

    src = Path(__file__).resolve().parents[1] / "src"
    worker = (f"import sys, time; sys.path.insert(0, {str(src)!r})\n"
              "from tinygemma.runtime import die_with_parent\n"
              "die_with_parent(); print('ready', flush=True); time.sleep(60)\n")
    launcher = ("import subprocess, sys, time\n"
                f"p = subprocess.Popen([sys.executable, '-c', {worker!r}], start_new_session=True, stdout=subprocess.PIPE, text=True)\n"
                "assert p.stdout.readline() == 'ready\\n'\n"
                "print(p.pid, flush=True); time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", launcher], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.kill()  # SIGKILL: no handler runs, nothing is forwarded to the child's session
    parent.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:  # gone, or a zombie its new parent has not reaped yet
            if Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return
        except (FileNotFoundError, ProcessLookupError):
            return
        time.sleep(0.1)
    os.kill(child, 9)
    pytest.fail("the worker outlived its launcher")


def test_asking_to_die_with_the_parent_is_linuxs_alone(monkeypatch):
    """Elsewhere it does nothing: on Windows ctypes.CDLL(None) raises a TypeError, which ended every torchrun
    worker (and prepare's tokenizing workers) as it started."""
    import ctypes

    def windows_cdll(name, *args, **kwargs):
        if name is None:
            raise TypeError("argument of type 'NoneType' is not iterable")  # (Windows' CDLL(None))
        return real(name, *args, **kwargs)

    real = ctypes.CDLL
    monkeypatch.setattr(ctypes, "CDLL", windows_cdll)
    for platform in ("win32", "darwin"):
        monkeypatch.setattr(sys, "platform", platform)
        assert runtime.die_with_parent() is None


def test_any_process_torchrun_started_asks_to_die_with_it(monkeypatch):
    """torchrun puts its workers in sessions of their own even with --nproc-per-node 1 (WORLD_SIZE 1)."""
    called = []
    monkeypatch.setattr(runtime, "die_with_parent", lambda: called.append(True))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    runtime.setup_runtime("cpu", "float32")
    assert called == []  # a plain process: nothing to die with
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    runtime.setup_runtime("cpu", "float32")
    assert called == [True]


def test_an_apple_gpu_is_named_as_such_and_waited_for(monkeypatch):
    """An MPS run recorded the Mac's CPU as its hardware (a CPU run on the same Mac read the same), and --profile
    waited only for CUDA, so an MPS profile timed the work queued, not done."""
    from tinygemma import devices

    mps = torch.device("mps")
    assert devices.device_description(mps).startswith("Apple GPU (MPS), beside ")
    assert devices.device_description(mps) != devices.device_description(torch.device("cpu"))
    waited = []
    monkeypatch.setattr(torch.mps, "synchronize", lambda: waited.append("mps"))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append("cuda"))
    for device in ("mps", "cpu", "cuda"):
        devices.synchronize(torch.device(device))
    assert waited == ["mps", "cuda"]
    assert not devices.float64_on(mps) and devices.float64_on(torch.device("cuda"))


# ------------------------------------------------------------------ mutation round 16

TORCHRUN = {"MASTER_ADDR": "localhost", "MASTER_PORT": "29500"}


def test_world_size_zero_is_refused():
    from tinygemma import UserError
    from tinygemma.runtime import env_world_size
    with pytest.raises(UserError, match="WORLD_SIZE must be a positive integer"):
        env_world_size({"WORLD_SIZE": "0"})


def test_a_rank_equal_to_the_world_size_is_refused():
    from tinygemma import UserError
    from tinygemma.runtime import env_world_size
    env = {**TORCHRUN, "WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"}
    with pytest.raises(UserError, match="RANK must be a whole number below WORLD_SIZE"):
        env_world_size(env)
    assert env_world_size({**env, "RANK": "1"}) == 2


def test_a_local_rank_equal_to_the_gpu_count_is_refused(monkeypatch):
    from tinygemma import UserError, runtime
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(UserError, match="LOCAL_RANK 2, but 2 GPUs are visible"):
        runtime.cuda_device(torch.device("cuda"), world_size=3, local_rank=2)


def test_a_single_processs_error_is_its_own_to_print():
    from tinygemma import UserError
    from tinygemma.runtime import Runtime, raise_on_all_ranks
    with pytest.raises(OSError) as error:
        raise_on_all_ranks("could not write x", Runtime(torch.device("cpu"), torch.float32), kind=OSError)
    assert error.value.shown_by_rank_0 is False
    with pytest.raises(UserError) as error:
        raise_on_all_ranks("bad", Runtime(torch.device("cpu"), torch.float32))
    assert error.value.shown_by_rank_0 is False


def test_a_gpu_index_equal_to_the_gpu_count_is_refused(monkeypatch):
    from tinygemma import UserError
    from tinygemma.devices import pick_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(UserError, match="sees 2 CUDA GPU"):
        pick_device("cuda:2")


def test_a_cpu_without_any_listed_flag_says_so_once(monkeypatch):
    from pathlib import Path

    from tinygemma import devices
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: "model name\t: Old CPU\nflags\t\t: fpu sse2\n")
    text = devices.cpu_description()
    assert "(none of avx2, avx512f, avx512_bf16, amx_bf16)," in text and "; no " not in text


def test_the_cpu_description_names_the_model_where_platform_gives_only_the_architecture(monkeypatch):
    """Linux's platform.processor() is "": the name is /proc/cpuinfo's model name, not "x86_64", in every report
    and benchmark figure."""
    import platform
    from pathlib import Path

    from tinygemma import devices
    monkeypatch.setattr(platform, "processor", lambda: "")
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: "model name\t: Old CPU\nflags\t\t: fpu avx2\n")
    assert devices.cpu_description().startswith("Old CPU (avx2; no avx512f, avx512_bf16, amx_bf16), ")


def _main_process_first_worker(rank, store, results):
    import datetime

    import torch.distributed as dist

    from tinygemma.runtime import Runtime, main_process_first
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    rt = Runtime(torch.device("cpu"), torch.float32, rank, rank, 2)

    def work():
        raise OSError(28, "No space left on device")
    try:
        main_process_first(work, rt, timeout=datetime.timedelta(seconds=20))
        outcome = "no error"
    except OSError as e:
        outcome = f"OSError shown_by_rank_0={getattr(e, 'shown_by_rank_0', None)}"
    except Exception as e:  # the other rank left waiting: a timeout
        outcome = type(e).__name__
    (results / f"rank{rank}").write_text(outcome)
    dist.destroy_process_group()


def test_a_machine_error_in_rank_0s_work_is_raised_on_every_rank(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_main_process_first_worker, args=(str(tmp_path / "store"), tmp_path), nprocs=2, join=True)
    assert (tmp_path / "rank0").read_text() == "OSError shown_by_rank_0=False"
    assert (tmp_path / "rank1").read_text() == "OSError shown_by_rank_0=True"


def test_a_restart_count_alone_is_no_shared_store():
    from tinygemma.runtime import restart_warning
    assert restart_warning({"TORCHELASTIC_MAX_RESTARTS": "3"}) is None  # TORCHELASTIC_USE_AGENT_STORE unset


def test_auto_loads_an_apple_gpus_model_in_float32():
    from tinygemma.devices import pick_dtype
    assert pick_dtype("auto", torch.device("mps")) == torch.float32


def test_load_and_evaluate_take_auto_as_their_device():
    from tinygemma.devices import as_device, pick_device
    assert as_device("auto") == pick_device("auto")
    assert as_device(torch.device("cpu")) == torch.device("cpu")


def test_raise_on_all_ranks_gives_the_other_processes_rank_0s_kind_of_error(tmp_path):
    """A process other than 0 raises what rank 0 raises in kind: an OSError (the machine's failure, exit status
    1) stays one on every process, so torchrun's workers all end with the same status; a UserError (exit
    status 2) stays a UserError. A one-process gloo group stands in for torchrun's: this process is rank 0 of
    the group (the broadcast's source) posing as process 1 of two (kills: every other process's error made a
    UserError whatever rank 0's kind)."""
    import torch.distributed as dist

    from tinygemma.errors import UserError
    from tinygemma.runtime import Runtime, raise_on_all_ranks

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        process_1 = Runtime(torch.device("cpu"), torch.float32, rank=1, world_size=2)
        with pytest.raises(OSError, match="disk full") as raised:
            raise_on_all_ranks("disk full", process_1, kind=OSError)
        assert not isinstance(raised.value, UserError) and raised.value.shown_by_rank_0
        with pytest.raises(UserError, match="bad input") as raised:
            raise_on_all_ranks("bad input", process_1)
        assert raised.value.shown_by_rank_0
        raise_on_all_ranks(None, process_1)  # nothing said: nothing raised
    finally:
        dist.destroy_process_group()


def test_a_process_group_already_started_is_joined_not_started_again(tmp_path, monkeypatch):
    """`tinygemma run` under torchrun starts the process group (pipeline.run_recipe), then train() sets up its
    runtime again: it joins that group and does not own it (init_process_group twice is a ValueError)."""
    import torch.distributed as dist

    from tinygemma.runtime import setup_runtime

    for name, value in {**TORCHRUN, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        rt = setup_runtime("cpu", "float32")
        assert rt.world_size == 2 and not rt.owns_process_group
        rt.close()
        assert dist.is_initialized()  # (not its to end)
    finally:
        dist.destroy_process_group()


def test_an_empty_torchrun_variable_is_a_missing_one():
    from tinygemma.runtime import env_world_size

    with pytest.raises(UserError, match="WORLD_SIZE is 2 but MASTER_ADDR is not set"):
        env_world_size({**TORCHRUN, "MASTER_ADDR": "", "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"})


def test_a_local_rank_that_is_no_number_is_one_line():
    from tinygemma.runtime import env_world_size

    for local_rank in ("x", "2"):
        with pytest.raises(UserError, match=rf"LOCAL_RANK must be a whole number below WORLD_SIZE \(2\), got '{local_rank}'"):
            env_world_size({**TORCHRUN, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": local_rank})


def test_a_rank_left_in_a_single_processs_environment_is_rank_0():
    """RANK exported in a shell (or a scheduler's), no WORLD_SIZE: one process, which is rank 0 and prints eval's
    and run's results; under torchrun a RANK that is no number is refused in one line."""
    from tinygemma.runtime import env_rank

    assert env_rank({"RANK": "3"}) == 0
    with pytest.raises(UserError, match="RANK must be a whole number"):
        env_rank({**TORCHRUN, "WORLD_SIZE": "2", "RANK": "x", "LOCAL_RANK": "0"})


def test_under_torchrun_a_device_naming_the_processs_own_gpu_is_taken(monkeypatch):
    from tinygemma.runtime import cuda_device

    FakeCuda(monkeypatch, native_bf16=True, device_count=2)
    assert cuda_device(torch.device("cuda", 1), 2, 1) == torch.device("cuda", 1)
    with pytest.raises(UserError, match="would put two processes on one GPU"):
        cuda_device(torch.device("cuda", 0), 2, 1)


def test_rank_0_raises_its_own_kind_of_machine_error(tmp_path):
    import torch.distributed as dist

    from tinygemma.runtime import Runtime, raise_on_all_ranks

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(FileNotFoundError, match="no such file") as raised:
            raise_on_all_ranks("no such file", Runtime(torch.device("cpu"), torch.float32, rank=0, world_size=2),
                               kind=FileNotFoundError)
        assert not raised.value.shown_by_rank_0
    finally:
        dist.destroy_process_group()


def test_devices_by_name(monkeypatch):
    from tinygemma import devices

    assert devices.pick_device("cpu:0") == torch.device("cpu", 0)  # the CPU's one index
    with pytest.raises(UserError, match="unknown device 'cpu:1'"):
        devices.pick_device("cpu:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="device cuda was asked for, but PyTorch sees no CUDA GPU"):
        devices.pick_device("cuda")
    assert devices.parse_dtype("BF16") == torch.bfloat16 and devices.parse_dtype("Half") == torch.float16


def test_a_cpu_with_either_bfloat16_flag_computes_in_it(monkeypatch):
    """Cooper Lake and Zen 4 have AVX-512 BF16 without AMX, Sapphire Rapids both: either is native bfloat16, which
    `generate` on such a CPU loads its model in."""
    from tinygemma import devices

    class Cpuinfo:
        flags = ""

        def __init__(self, path):
            pass

        def read_text(self):
            return f"flags\t: fpu avx2 {Cpuinfo.flags}\n"

    monkeypatch.setattr(devices, "Path", Cpuinfo)
    for flags, native in (("", False), ("avx512_bf16", True), ("amx_bf16", True), ("avx512_bf16 amx_bf16", True)):
        Cpuinfo.flags = flags
        assert devices.cpu_has_bf16() == native, flags
        assert devices.pick_dtype("auto", torch.device("cpu")) == (torch.bfloat16 if native else torch.float32)


def test_an_evaluation_asked_for_in_a_dtype_gets_it_on_a_cpu():
    from tinygemma.devices import evaluation_dtype

    assert evaluation_dtype("auto", torch.device("cpu")) == "float32"
    assert evaluation_dtype("bfloat16", torch.device("cpu")) == "bfloat16"
    assert evaluation_dtype("auto", torch.device("cuda", 0)) == "auto"


def test_a_runtimes_autocast_is_its_dtypes():
    """tests/test_runtime.py. float32: no autocast, not entered at all (torch.autocast in float32 turns itself off
    on a CPU, warning into every float32 run); bfloat16 and float16 (with the scaler): autocast in it."""
    import warnings

    from tinygemma.runtime import Runtime

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "In CPU autocast, but the target dtype is not supported"
        with Runtime(torch.device("cpu"), torch.float32).autocast():
            assert not torch.is_autocast_enabled("cpu")
    for dtype in (torch.bfloat16, torch.float16):
        with Runtime(torch.device("cpu"), dtype).autocast():
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == dtype


def test_a_sum_over_two_processes_is_reduced(monkeypatch):
    """tests/test_runtime.py. Every world size above 1 adds up the processes' sums (validation's, the loss's)."""
    import tinygemma.runtime as runtime_module
    from tinygemma.runtime import Runtime, all_reduce_sum

    reduced = []
    monkeypatch.setattr(runtime_module.dist, "all_reduce", lambda t, op=None: reduced.append(t.clone()))
    for world_size in (1, 2, 4):
        all_reduce_sum(torch.ones(4), Runtime(torch.device("cpu"), torch.float32, world_size=world_size))
    assert len(reduced) == 2


def test_a_gpus_bfloat16_is_asked_of_that_gpu(monkeypatch):
    """tests/test_runtime.py (FakeCuda). `generate --device cuda:1` on a machine whose GPU 0 is current: the
    question goes to GPU 1 (an A100 beside a T4 answers for itself)."""
    from tinygemma.devices import cuda_has_bf16

    cuda = FakeCuda(monkeypatch, native_bf16=True)
    cuda_has_bf16(torch.device("cuda", 1))
    assert cuda.log == [("is_bf16_supported", 1)] and cuda.current == 0


def test_torchrun_on_an_apple_gpu_is_refused_in_one_line(monkeypatch):
    """torchrun on an Apple GPU is refused in one line: no process group is started on MPS."""
    import torch.distributed as dist

    started = []
    for key, value in dict(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="localhost", MASTER_PORT="1").items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setattr(runtime, "pick_device", lambda name: torch.device("mps"))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: started.append(kwargs))
    with pytest.raises(UserError, match="multi-process training runs on CUDA .NCCL. or CPU .gloo., not MPS"):
        runtime.setup_runtime("mps", "auto")
    assert started == []


def test_only_rank_0_warns_of_torchruns_shared_store(monkeypatch, capsys):
    """torchrun's shared rendezvous store is warned of once a job (by rank 0), not once a process."""
    import torch.distributed as dist

    for key, value in dict(WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="localhost", MASTER_PORT="1",
                           TORCHELASTIC_USE_AGENT_STORE="True", TORCHELASTIC_MAX_RESTARTS="3").items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: None)
    said = []
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", rank)
        runtime.setup_runtime("cpu", "auto")
        said.append(capsys.readouterr().err)
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in said[0] and said[1] == ""


def test_an_apple_gpu_asked_for_without_mps_is_one_line(monkeypatch):
    """An Apple GPU (mps) asked for on a machine without it (Linux, Colab)
    is refused at once, not by a later traceback from the first tensor moved there."""
    from tinygemma.devices import pick_device

    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(UserError, match="device mps was asked for, but this PyTorch has no MPS backend"):
        pick_device("mps")


def test_no_device_at_all_is_one_line():
    """A device that is no device at all (load(..., device=1.5) from Python) is one line, not a TypeError."""
    from tinygemma.devices import as_device

    with pytest.raises(UserError, match="unknown device"):
        as_device(1.5)


def test_a_compiled_copy_keeps_the_keyword_only_defaults():
    """A compiled copy keeps the function's keyword-only defaults: flex_attention has one (return_aux=None), and
    without it every fresh flex kernel (one per trained model) failed with "missing 1 required keyword-only
    argument"."""
    from tinygemma.devices import compiled_copy

    def scaled(x, *, by=3.0):
        return x * by

    assert compiled_copy(scaled, backend="eager")(torch.ones(2)).tolist() == [3.0, 3.0]


def test_torchrun_is_known_by_its_run_id_alone():
    assert under_torchrun({"TORCHELASTIC_RUN_ID": "x"})
    assert not under_torchrun({})


def test_a_whole_number_is_ascii_digits_only():
    assert whole_number("12") == 12
    assert whole_number("\u0664") is None  # Arabic-Indic four: int() takes it
    assert whole_number("\u00b2") is None  # superscript two: int() raises
    with pytest.raises(UserError, match="RANK must be a whole number"):
        runtime.env_world_size({"WORLD_SIZE": "2", "RANK": "\u0660", "LOCAL_RANK": "0", "MASTER_ADDR": "h",
                        "MASTER_PORT": "1"})


def test_the_torchrun_environment_is_read_from_os_environ_as_it_is_at_the_call(monkeypatch):
    """A library may put another object in os.environ's place (datasets' map(num_proc=...) puts a deep copy
    there): what torchrun set is read from os.environ as it is then, not from the object it was at import (the
    world size read 1 and every process took itself for process 0)."""
    monkeypatch.setattr(os, "environ", dict(os.environ))
    os.environ.update({**TORCHRUN, "WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"})
    assert runtime.env_world_size() == 2 and runtime.env_rank() == 1
