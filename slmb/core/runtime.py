"""Process and device settings that training and generation share (DESIGN.md §7): threads, allocator, precision.

Measured on this project's 2-core AVX512-BF16 CPU with the GPT-2 benchmark shape (docs/benchmarks.md): the
glibc allocator hands the logits-sized buffers back to the kernel after every step (a quarter or more of CPU
time in page faults), and bf16 autocast is 1.7-1.9x faster than fp32 once that is fixed, while a toy model
(d=64, V=257) is slower under bf16. ``prepare_device`` is called by every code path that trains or generates
(the trainer, the generator; so the CLI and the service's workers too).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# bf16 autocast pays only where the matrix products dominate; for smaller models its casts cost what it saves.
# Measured with bench/dtype_sizes.py (1 thread, docs/benchmarks.md): bf16/fp32 = 0.97x at 0.07 M parameters
# (d=64, V=257), 1.30x at 0.44 M (d=128, V=257), 1.6-1.9x from 3 M up (and for every GPT-2-vocabulary model).
AUTO_BF16_MIN_PARAMS = 250_000


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX on this CPU (oneDNN's own check)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def keep_freed_memory() -> None:
    """Stop glibc from handing the big logits-sized buffers back to the kernel after every step.

    By default each buffer above the mmap threshold is a fresh mmap, so every step page-faults hundreds of MB
    back in (a quarter or more of CPU training time in the kernel). Serving them from the heap and never
    trimming it trades a stable peak RSS for 1.5-3x faster CPU steps. Process-wide and idempotent; a no-op
    where the C library is not glibc (jemalloc or tcmalloc preloaded already behave this way).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL(None)
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)


def prepare_device(device: torch.device) -> None:
    """CPU: one thread per core (unless OMP_NUM_THREADS says otherwise) and the allocator fix. CUDA: TF32."""
    if device.type == "cpu":
        if "OMP_NUM_THREADS" not in os.environ:  # an explicit thread count wins
            torch.set_num_threads(cpu_cores())
        keep_freed_memory()
    elif device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def native_bf16(device: torch.device) -> bool:
    return ((device.type == "cuda" and torch.cuda.is_bf16_supported())
            or (device.type == "cpu" and cpu_has_native_bf16()))


def autocast_for(dtype: str, device: torch.device, num_parameters: int | None = None
                 ) -> tuple[str, Callable[[], Any], str | None]:
    """(the dtype actually used, a context-manager factory for the forward pass, a fallback warning or None).

    "auto" (what a request without ``dtype`` gets) is bf16 where the device has native bf16 and the model is
    large enough to gain from it (``AUTO_BF16_MIN_PARAMS``; always on CUDA), else fp32. An explicit dtype is
    honoured where the device supports it.
    """
    if dtype == "auto":
        big = device.type == "cuda" or num_parameters is None or num_parameters >= AUTO_BF16_MIN_PARAMS
        dtype = "bf16" if big and native_bf16(device) else "fp32"
    if dtype == "bf16" and native_bf16(device):
        return "bf16", lambda: torch.autocast(device.type, dtype=torch.bfloat16), None
    if dtype == "fp16" and device.type == "cuda":
        return "fp16", lambda: torch.autocast("cuda", dtype=torch.float16), None
    if dtype == "fp32":
        return "fp32", contextlib.nullcontext, None
    where = "this CPU has no native bf16" if device.type == "cpu" and dtype == "bf16" else f"not on {device.type}"
    return "fp32", contextlib.nullcontext, f"dtype {dtype} is not supported here ({where}); training in fp32"


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_peaks: dict[tuple, float] = {}


def matmul_peak(device: torch.device, dtype: str, n: int | None = None, reps: int = 3,
                budget_s: float | None = 1.0) -> float:
    """The device's matmul FLOP/s in ``dtype`` ("fp32", "bf16", "fp16"), measured once per process and setting.

    A square product (``n``: 1024³ on a CPU, 8192³ on a GPU by default), the best of ``reps`` after a warm-up:
    ~0.1 s on a 2-core CPU. It is the ceiling the trainer's model FLOP utilisation (MFU) is reported against
    (``bench/peak.py`` reports it too), measured rather than looked up so that it holds for any CPU, thread count
    and GPU clock (fp32 on CUDA includes TF32 when on). On a CPU the product shrinks (``matmul_peak_size``) so
    that the measurement takes about ``budget_s`` at most: bf16 on a CPU without native bf16 runs at well
    under 1 GFLOP/s, where a 2048³ product would take minutes.
    """
    n = n or (8192 if device.type == "cuda" else 1024)
    threads = torch.get_num_threads() if device.type == "cpu" else 0
    tf32 = device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    key = (str(device), dtype, threads, tf32, n, reps, budget_s)
    if key not in _peaks:
        size = matmul_peak_size(device, dtype, n, reps, budget_s)
        _peaks[key] = 2 * size**3 / _best_matmul_seconds(device, dtype, size, reps)
    return _peaks[key]


PROBE_N = 256


def matmul_peak_size(device: torch.device, dtype: str, n: int, reps: int, budget_s: float | None) -> int:
    """The product size ``matmul_peak`` measures: ``n``, or on a CPU the largest multiple of 64 (at least
    ``PROBE_N``) whose ``reps`` + 1 products fit ``budget_s``, as extrapolated (n³) from one timed
    ``PROBE_N``³ product. Small products run below the peak rate, so the estimate errs towards smaller sizes."""
    if budget_s is None or device.type != "cpu" or n <= PROBE_N:
        return n
    probe = _best_matmul_seconds(device, dtype, PROBE_N, 1)
    fit = PROBE_N * (budget_s / ((reps + 1) * probe)) ** (1 / 3)  # (reps + 1) · probe · (fit / PROBE_N)³ = budget
    return n if fit >= n else max(PROBE_N, int(fit) // 64 * 64)


def _best_matmul_seconds(device: torch.device, dtype: str, n: int, reps: int) -> float:
    """The fastest of ``reps`` n×n @ n×n products after one warm-up, on random data from a generator of its
    own (the training RNG stream stays untouched)."""
    sync = (torch.cuda.synchronize if device.type == "cuda"
            else torch.mps.synchronize if device.type == "mps" else (lambda: None))
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.inference_mode():
        a = torch.randn(n, n, device=device, dtype=_DTYPES[dtype], generator=gen)
        b = torch.randn(n, n, device=device, dtype=_DTYPES[dtype], generator=gen)
        best = float("inf")
        for i in range(reps + 1):
            sync()
            t0 = time.perf_counter()
            a @ b
            sync()
            if i:  # the first is the warm-up
                best = min(best, time.perf_counter() - t0)
    return best


# ---------------------------------------------------------------------------------------------------- honest MFU

PEAKS_FILE = "peaks.json"  # under $SLMB_HOME: the best matmul peak each machine and setting has shown


def machine_key(device: torch.device, dtype: str) -> str:
    """What a matmul peak belongs to: the processor (CPU model and the threads used, or the GPU's name), the
    dtype and TF32, and the torch version (a new release can change the kernels)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        what = f"cuda:{torch.cuda.get_device_name(index)}:tf32={torch.backends.cuda.matmul.allow_tf32}"
    elif device.type == "cpu":
        what = f"cpu:{cpu_model()}:threads={torch.get_num_threads()}"
    else:
        what = device.type
    return f"{what}|{dtype}|torch={torch.__version__}"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def read_peaks(home: Path) -> dict[str, float]:
    """The cached peaks; an unreadable or foreign file counts as empty (it is rewritten on the next save)."""
    try:
        data = json.loads((home / PEAKS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: float(v["flops"]) for k, v in data.items()
            if isinstance(v, dict) and isinstance(v.get("flops"), (int, float)) and v["flops"] > 0}


def _save_peak(home: Path, key: str, flops: float) -> None:
    """Record ``flops`` for ``key`` unless a higher value is there (read, merge, atomic rename: a concurrent
    writer can at worst lose one of two simultaneous updates, never corrupt the file)."""
    path = home / PEAKS_FILE
    try:
        data = json.loads(path.read_text())
        data = data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        data = {}
    old = data.get(key)
    if isinstance(old, dict) and isinstance(old.get("flops"), (int, float)) and old["flops"] >= flops:
        return
    data[key] = {"flops": flops, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    home.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=home, prefix=f".{PEAKS_FILE}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def trusted_peak(device: torch.device, dtype: str, home: Path | None, measure: Callable[[], float] | None = None
                 ) -> float:
    """The matmul peak MFU is reported against: the higher of this process's measurement and the best one this
    machine has recorded in ``home`` (which it then updates).

    A measurement only ever errs low (other work stealing the cores, clocks still ramping): a busy machine at
    start-up made MFU read 256-1,252%. Keeping the best measurement per machine and setting means that one good
    start-up (an idle moment, ``bench/peak.py``) serves every later run. ``home`` None: this measurement alone."""
    measured = (measure or (lambda: matmul_peak(device, dtype)))()
    if home is None:
        return measured
    key = machine_key(device, dtype)
    best = max(measured, read_peaks(home).get(key, 0.0))
    if best == measured:
        with contextlib.suppress(OSError):  # a read-only home: this run uses its own measurement
            _save_peak(home, key, measured)
    return best


def utilisation(model_flops: float, peak: float) -> float | None:
    """MFU, or None where it would exceed 100%: the peak was measured low and no better one is recorded, so
    no honest figure can be given (the model FLOP/s, reported beside it, stays true)."""
    if peak <= 0 or model_flops > peak:
        return None
    return model_flops / peak
