"""Which device and which number format: one chooser for training, evaluation and generation; and torch.compile
of a function whose compiled graphs are its own."""

from __future__ import annotations

import os
import platform
import types
from pathlib import Path

import torch

from tinygemma.errors import UserError


def pick_device(name: str = "auto") -> torch.device:
    """The device `name` names ("auto": CUDA, else MPS, else the CPU), checked to be there. Training uses it too."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps") or (device.type != "cuda" and device.index):
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps")  # meta, xpu, cpu:1: not ours
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name} was asked for, but PyTorch sees no CUDA GPU")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"device {name} was asked for, but PyTorch sees {torch.cuda.device_count()} CUDA GPU(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {name} was asked for, but this PyTorch has no MPS backend")
    return device


def as_device(device) -> torch.device:
    """A device as torch takes it (a name, an index, a torch.device), checked as `pick_device` checks a name."""
    if isinstance(device, str):
        return pick_device(device)
    try:
        name = str(torch.device(device))
    except (RuntimeError, TypeError):  # torch.device(0) without an accelerator, or no device at all
        raise UserError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from None
    return pick_device(name)


def cpu_has_bf16() -> bool:
    """Whether the CPU computes in bfloat16 natively (AVX-512 BF16 or AMX); elsewhere bf16 is emulated, slowly."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cuda_has_bf16(device: torch.device) -> bool:
    """Whether this GPU computes in bfloat16 natively (Ampere and later). `torch.cuda.is_bf16_supported()` alone
    also says yes on a T4 or V100, which only emulate it: slower than float32, and refused by Inductor."""
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def cuda_has_fp16_tensor_cores(device: torch.device) -> bool:
    """Whether this GPU multiplies float16 matrices on tensor cores (Volta, compute capability 7.0, and later):
    a T4 at 8x its float32 rate. Pascal's have none (a GTX 1080 computes float16 at 1/64 of its float32 rate)."""
    return torch.cuda.get_device_capability(device) >= (7, 0)


# Triton, which torch.compile's GPU code (inductor's) and flex_attention's kernels are written in, compiles for
# compute capability 7.0 (Volta) and later: on a Pascal GPU (a P100, a GTX 10xx) inductor stops at the first
# compiled call with GPUTooOldForTriton.
TRITON_MIN_CAPABILITY = (7, 0)


def inductor_runs_on(device: torch.device) -> bool:
    """Whether torch.compile's inductor can compile for `device`: a CPU (C++ code), or a GPU that Triton supports."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= TRITON_MIN_CAPABILITY


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype to load a model in for evaluation and generation: "auto" is bfloat16 where the device computes in
    it natively, else float32 (not float16: Gemma's activations can overflow it without training's scaler)."""
    if name != "auto":
        return parse_dtype(name, auto=True)
    if device.type == "cuda":
        return torch.bfloat16 if cuda_has_bf16(device) else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    return torch.float32


def evaluation_dtype(name: str, device: torch.device) -> str:
    """The dtype for `pick_dtype` when a model is evaluated: "auto" is bfloat16 on GPUs that compute in it and
    float32 elsewhere, so that a CPU evaluation gives the numbers of training's own (float32 on CPUs)."""
    return "float32" if name == "auto" and device.type != "cuda" else name


def autocast_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype training computes in under autocast (float32: no autocast); "auto" is bfloat16 on GPUs that
    have it natively, float16 (with a gradient scaler) on older GPUs, float32 on CPUs and MPS."""
    if name != "auto":
        return parse_dtype(name, auto=True)
    if device.type == "cuda":
        return torch.bfloat16 if cuda_has_bf16(device) else torch.float16
    return torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16": the spelling recipes, logs and config.json use."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str, auto: bool = False) -> torch.dtype:
    """A dtype by any of its usual names, in any case: float32 (fp32, f32), bfloat16 (bf16), float16 (fp16, f16,
    half), as GGUF's --dtype takes them too. `auto`: the refusal names auto too (which the caller resolved)."""
    table = {"float32": torch.float32, "fp32": torch.float32, "f32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "f16": torch.float16,
             "half": torch.float16}
    key = name.lower() if isinstance(name, str) else name
    if key not in table:
        raise UserError(f"unknown dtype {name!r}; choose {'auto, ' if auto else ''}float32, bfloat16 or float16")
    return table[key]


CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # the ones that change our CPU figures


def cpu_description() -> str:
    """E.g. "AMD EPYC (avx2; no avx512f, avx512_bf16, amx_bf16), 2 cores"."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name in ("", platform.machine(), platform.processor()):
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    have = [f for f in CPU_FLAGS if f in flags]
    lacking = [f for f in CPU_FLAGS if f not in flags]
    listed = ", ".join(have) or "none of " + ", ".join(CPU_FLAGS)
    return f"{name} ({listed}{'; no ' + ', '.join(lacking) if have and lacking else ''}), {os.cpu_count()} cores"


def device_description(device: torch.device) -> str:
    """The GPU's name, or the CPU's description with the threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":  # (its CPU would read as a CPU run's)
        return f"Apple GPU (MPS), beside {cpu_description()}"
    return f"{cpu_description()}, {torch.get_num_threads()} threads"


def float64_on(device: torch.device) -> bool:
    """Whether `device` computes in float64: Apple's MPS has none (a TypeError names it)."""
    return device.type != "mps"


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (a GPU's: CUDA's or Apple's)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def function_copy(fn, code: types.CodeType | None = None):
    """`fn` on a copy of its code object, or on `code` (one made from it), with its attributes (a decorator's
    `__wrapped__`, dynamo's markers): dynamo keeps a function's graphs with its code object, so the copy's are its
    own."""
    copy = types.FunctionType(code or fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__,
                              fn.__closure__)
    copy.__kwdefaults__, copy.__qualname__ = fn.__kwdefaults__, fn.__qualname__
    copy.__dict__.update(fn.__dict__)
    return copy


def compiled_copy(fn, **options):
    """torch.compile of a copy of `fn` with a code object of its own. Dynamo keeps a function's graphs with its code
    object, at most 8 (one per shape): compiled once for the whole process, a function used by several models (a
    notebook's sweep) runs out of them, and past them runs uncompiled (or raises, under fullgraph=True)."""
    return torch.compile(function_copy(fn), **options)
