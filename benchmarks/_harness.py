"""Shared benchmark harness: time every provider in one run, record peak memory, append CSV, print markdown.

Each benchmark script builds :class:`Case` objects (a provider, a mode and a closure to time) and hands them
to :func:`run_cases`. Timing on CUDA uses CUDA events (median and 20/80% quantiles over repetitions); on CPU
it falls back to ``time.perf_counter`` so ``--quick`` smoke runs work without a GPU. Peak memory is the delta
of ``torch.cuda.max_memory_allocated`` over the memory in use before the case's inputs were built, so it
counts the inputs, the parameters and their gradients as well as the op's own work space.

>>> # python benchmarks/heads.py --quick  (see that script for a full example)
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import datetime
import gc
import math
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "Case",
    "HeapPeak",
    "Result",
    "add_common_arguments",
    "device_rates",
    "markdown_table",
    "read_csv_results",
    "run_cases",
    "run_in_child",
    "shard_processes",
    "synchronize",
    "time_fn",
]

Mode = str  # "fwd" | "bwd" | "fwd+bwd"
MODES: tuple[Mode, ...] = ("fwd", "bwd", "fwd+bwd")


@dataclass
class Case:
    """One measurement to take.

    Args:
        provider: who computes it (``torch``, ``megaclass``, ``cce``, ...).
        mode: ``fwd``, ``bwd`` or ``fwd+bwd``.
        params: the sizes and options that identify the case (printed and written as columns).
        setup: builds the inputs and returns the closure to time; called once, after the memory baseline.
            For ``bwd`` the closure runs only the backward (the forward is done in ``setup``).
        grad_to_none: called after ``setup`` returns, gives the tensors whose ``.grad`` is reset before each
            timed call (so gradient accumulation is not timed).
        flops: floating point operations of one call, for the achieved rate column (0: not reported).
        bytes_moved: minimum global-memory bytes of one call, for the achieved bandwidth column.
    """

    provider: str
    mode: Mode
    params: dict[str, Any]
    setup: Callable[[], Callable[[], Any]]
    grad_to_none: Callable[[], Sequence[torch.Tensor]] = lambda: ()
    flops: float = 0.0
    bytes_moved: float = 0.0


@dataclass
class Result:
    """What one :class:`Case` measured; ``status`` is ``ok``, ``OOM`` or ``error: ...``."""

    provider: str
    mode: Mode
    params: dict[str, Any]
    time_ms: float = math.nan
    q20_ms: float = math.nan
    q80_ms: float = math.nan
    peak_mem_gib: float = math.nan
    extra_mem_gib: float = math.nan
    tflops: float = math.nan
    bandwidth_gbs: float = math.nan
    status: str = "ok"
    extra: dict[str, Any] = field(default_factory=dict)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every benchmark script shares: ``--quick``, ``--results``, ``--reps``, ``--modes``."""
    parser.add_argument("--quick", action="store_true", help="small sizes, runs on CPU as a smoke test")
    parser.add_argument("--results", default="benchmarks/results.csv", help="CSV file to append rows to")
    parser.add_argument("--reps", type=int, default=20, help="timed repetitions per case")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before timing")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of fwd,bwd,fwd+bwd")


def unwind_on_terminate() -> None:
    """Make SIGTERM (as ``timeout`` sends) raise ``SystemExit`` in this process: its ``finally`` blocks and
    context managers then stop the processes it started and remove their files on the way out."""

    def unwind(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, unwind)


def process_memory(field: str) -> int:
    """A ``/proc/self/status`` memory field in bytes (``VmRSS``, ``VmHWM``, ...); Linux only."""
    with open("/proc/self/status") as file:
        for line in file:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_memory() -> None:
    """Start ``VmHWM`` again from the current resident set (``/proc/self/clear_refs``); Linux only."""
    with open("/proc/self/clear_refs", "w") as file:
        file.write("5")


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
            "keepcost",
        )
    ]  # fmt: skip


class HeapPeak(TorchDispatchMode):
    """The peak of the C heap's bytes in use (glibc ``mallinfo2``: chunks handed out plus mmapped ones) above
    where it stood on entry: what the process's allocations hold at once, without the freed memory the
    allocator keeps (which the resident set counts). Read after every torch op of the entering thread (an
    op's outputs are then held beside its inputs) and every millisecond in a thread of its own (for work in
    other threads, such as an index build in the background). ``peak`` stays None where the C library has
    no ``mallinfo2``.

    >>> with HeapPeak() as heap:  # doctest: +SKIP
    ...     work()
    >>> heap.peak  # doctest: +SKIP
    """

    def __init__(self) -> None:
        super().__init__()
        self.peak: int | None = None
        try:
            self._mallinfo = ctypes.CDLL(None).mallinfo2
            self._mallinfo.restype = _MallInfo2
        except (OSError, AttributeError):
            self._mallinfo = None
        self._base = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _note(self) -> None:
        info = self._mallinfo()
        self.peak = max(self.peak or 0, info.uordblks + info.hblkhd - self._base)

    def _sample(self) -> None:
        while not self._done.wait(0.001):
            self._note()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        if self._mallinfo is not None:
            self._note()
        return out

    def __enter__(self) -> HeapPeak:
        if self._mallinfo is not None:
            info = self._mallinfo()
            self._base, self.peak = info.uordblks + info.hblkhd, 0
            self._thread.start()
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        if self._mallinfo is not None:
            self._done.set()
            self._thread.join()


def synchronize() -> None:
    """Wait for the GPU's queued work (nothing on the CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_fn(
    fn: Callable[[], Any],
    *,
    reps: int = 20,
    warmup: int = 3,
    grad_to_none: Sequence[torch.Tensor] = (),
) -> tuple[float, float, float]:
    """``(median, q20, q80)`` milliseconds of ``fn`` over ``reps`` calls after ``warmup`` calls.

    CUDA: one pair of events around each call (gradients reset outside the timed span). CPU: perf_counter.
    """
    for _ in range(warmup):
        _reset_grads(grad_to_none)
        fn()
    synchronize()
    times: list[float] = []
    cuda = torch.cuda.is_available()
    for _ in range(reps):
        _reset_grads(grad_to_none)
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()  # deliberate sync: each sample needs its own elapsed time
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return _quantiles(times)


def cuda_graph(
    step: Callable[[], None], *, warmup: int = 2, generators: Sequence[torch.Generator] = ()
) -> Callable[[], None]:
    """``step`` captured once in a CUDA graph after ``warmup`` calls on a side stream; returns its replay.

    The replay is the step's GPU time without the host launching its ops one by one (what
    ``torch.compile(mode="reduce-overhead")`` gives); ``generators`` are the CUDA generators it draws from.
    The replay keeps ``step`` (and all it holds) alive: the graph reads that memory but does not own it.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    for generator in generators:
        graph.register_generator_state(generator)
    with torch.cuda.graph(graph):
        step()

    def replay() -> None:
        graph.replay()

    replay.step = step  # holds what the graph reads (a head's rows, mapped host memory) while it replays
    return replay


def cce_available() -> bool:
    """Whether Cut Cross-Entropy (``cut_cross_entropy``) can run here: importable, with a CUDA device."""
    if not torch.cuda.is_available():
        return False
    try:
        import cut_cross_entropy  # noqa: F401
    except ImportError:
        return False
    return True


def _quantiles(times: list[float]) -> tuple[float, float, float]:
    if len(times) == 1:
        return times[0], times[0], times[0]
    cuts = statistics.quantiles(times, n=10, method="inclusive")  # deciles: cuts[1] = 20%, cuts[7] = 80%
    return statistics.median(times), cuts[1], cuts[7]


def _reset_grads(tensors: Sequence[torch.Tensor]) -> None:
    for tensor in tensors:
        tensor.grad = None


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _measure(case: Case, *, reps: int, warmup: int) -> Result:
    result = Result(case.provider, case.mode, dict(case.params))
    cuda = torch.cuda.is_available()
    _free()
    baseline = torch.cuda.memory_allocated() if cuda else 0
    fn = case.setup()
    grads = tuple(case.grad_to_none())
    synchronize()
    if cuda:
        # Peak of one call over the memory in use before the inputs: inputs, parameters, grads, work space.
        after_inputs = torch.cuda.memory_allocated()
        _reset_grads(grads)
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        result.peak_mem_gib = (peak - baseline) / 2**30
        result.extra_mem_gib = (peak - after_inputs) / 2**30
    result.time_ms, result.q20_ms, result.q80_ms = time_fn(fn, reps=reps, warmup=warmup, grad_to_none=grads)
    if case.flops:
        result.tflops = case.flops / (result.time_ms * 1e-3) / 1e12
    if case.bytes_moved:
        result.bandwidth_gbs = case.bytes_moved / (result.time_ms * 1e-3) / 1e9
    del fn, grads
    return result


def run_cases(
    cases: Sequence[Case],
    *,
    benchmark: str,
    results_path: str,
    reps: int = 20,
    warmup: int = 3,
    extra_columns: dict[str, Any] | None = None,
    isolate: Callable[[Case], Result | None] | None = None,
) -> list[Result]:
    """Measure every case (an out-of-memory case becomes an ``OOM`` row), append CSV rows, return results.

    ``isolate(case)``, when given, may return the case's result itself (measured in a child process with
    :func:`run_in_child`, or refused up front): a case that can kill the CUDA context then cannot end the run.
    It returns None for a case to measure here.
    """
    results: list[Result] = []
    for case in cases:
        isolated = isolate(case) if isolate is not None else None
        if isolated is not None:
            results.append(isolated)
            print(_one_line(isolated), flush=True)
            continue
        try:
            result = _measure(case, reps=reps, warmup=warmup)
        except torch.cuda.OutOfMemoryError:
            result = Result(case.provider, case.mode, dict(case.params), status="OOM")
        except RuntimeError as error:  # a provider failing must not hide the others' numbers
            if "out of memory" in str(error).lower():
                result = Result(case.provider, case.mode, dict(case.params), status="OOM")
            else:
                result = Result(case.provider, case.mode, dict(case.params), status=f"error: {error}"[:200])
        _free()
        results.append(result)
        print(_one_line(result), flush=True)
    append_csv(results, benchmark=benchmark, path=results_path, extra_columns=extra_columns)
    return results


def _one_line(result: Result) -> str:
    params = " ".join(f"{key}={value}" for key, value in result.params.items())
    if result.status != "ok":
        return f"[{result.provider:>10} {result.mode:>7}] {params}: {result.status}"
    return (
        f"[{result.provider:>10} {result.mode:>7}] {params}: {result.time_ms:.3f} ms "
        f"({result.q20_ms:.3f}..{result.q80_ms:.3f}), peak {result.peak_mem_gib:.3f} GiB"
    )


def environment() -> dict[str, str]:
    """GPU name, library versions, git sha, time and command line, written with every CSV row."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    cpu = f"cpu ({platform.processor() or platform.machine()})"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else cpu
    return {
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": triton_version,
        "git_sha": sha or "unknown",
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(part) for part in [os.path.basename(sys.executable), *sys.argv]),
    }


RESULT_COLUMNS = (
    "time_ms",
    "q20_ms",
    "q80_ms",
    "peak_mem_gib",
    "extra_mem_gib",
    "tflops",
    "bandwidth_gbs",
    "status",
)


def append_csv(
    results: Sequence[Result], *, benchmark: str, path: str, extra_columns: dict[str, Any] | None = None
) -> None:
    """Append one row per result; the header is written when the file is new (columns: env, case, numbers)."""
    if not results:
        return
    env = environment()
    columns = ["benchmark", *env, *(extra_columns or {}), "provider", "mode", "params", *RESULT_COLUMNS]
    new_file = not os.path.exists(path) or os.path.getsize(path) == 0
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        if new_file:
            writer.writeheader()
        for result in results:
            row = {"benchmark": benchmark, **env, **(extra_columns or {})}
            row.update(
                provider=result.provider,
                mode=result.mode,
                params=";".join(f"{key}={value}" for key, value in result.params.items()),
            )
            row.update({name: _csv_value(getattr(result, name)) for name in RESULT_COLUMNS})
            writer.writerow(row)


def read_csv_results(path: str) -> list[Result]:
    """The results in a CSV file :func:`append_csv` wrote (the case's parameters come back as strings)."""
    results = []
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            params = dict(item.split("=", 1) for item in row["params"].split(";") if "=" in item)
            result = Result(row["provider"], row["mode"], params, status=row["status"])
            for name in RESULT_COLUMNS[:-1]:
                setattr(result, name, float(row[name]) if row[name] else math.nan)
            results.append(result)
    return results


def run_in_child(case: Case, argv: Sequence[str], *, timeout_s: float = 600.0) -> Result:
    """Measure ``case`` in a fresh Python process and return its result, or a ``crashed ...`` result.

    ``argv`` (the script and its options, without ``--results``) must measure exactly this case and append
    its row to the CSV named by the ``--results`` option added here. Whatever happens there (an illegal
    memory access leaves a CUDA context unusable for good, so only a new process recovers) stays there.
    """
    _free()  # hand the cached blocks back: the child needs the card's memory
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "child.csv")
        command = [sys.executable, *argv, "--results", path]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            return Result(
                case.provider, case.mode, dict(case.params), status=f"timed out after {timeout_s:.0f} s"
            )
        rows = read_csv_results(path) if os.path.exists(path) else []
    if done.returncode == 0 and rows:
        row = rows[-1]
        row.params = dict(case.params)
        return row
    lines = [line.strip() for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]  # the exception, not a hint after it
    why = (errors or lines or ["no output"])[-1]
    status = f"crashed (exit {done.returncode}): {why}"[:200]
    return Result(case.provider, case.mode, dict(case.params), status=status)


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return value


def markdown_table(results: Sequence[Result], *, columns: Sequence[str] = ()) -> str:
    """Markdown table: the case's parameters, provider, mode, then time, quantiles, peak memory, rates."""
    param_names: list[str] = []
    for result in results:
        param_names += [name for name in result.params if name not in param_names]
    shown = list(columns) or ["time_ms", "q20_ms", "q80_ms", "peak_mem_gib", "tflops", "bandwidth_gbs"]
    shown = [name for name in shown if any(not _missing(getattr(r, name)) for r in results)]
    header = [*param_names, "provider", "mode", *shown]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in results:
        cells = [str(result.params.get(name, "")) for name in param_names] + [result.provider, result.mode]
        if result.status != "ok":
            cells += [result.status] + [""] * (len(shown) - 1)
        else:
            cells += [_format(getattr(result, name)) for name in shown]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _missing(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _format(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


@dataclass(frozen=True)
class DeviceRates:
    """Measured card rates: copy bandwidth (GB/s, bytes read + written) and dense bf16 matmul (TFLOP/s)."""

    name: str
    bandwidth_gbs: float
    bf16_tflops: float

    def floor_ms(self, *, flops: float, bytes_moved: float) -> float:
        """Roofline floor of a call: the larger of its compute time and its memory time, in milliseconds."""
        return max(flops / (self.bf16_tflops * 1e12), bytes_moved / (self.bandwidth_gbs * 1e9)) * 1e3


def device_rates(*, copy_gib: float = 1.0, matmul_size: int = 8192) -> DeviceRates | None:
    """Measure the card once: a ``copy_gib`` device-to-device copy and a square bf16 matmul. None on CPU."""
    if not torch.cuda.is_available():
        return None
    numel = int(copy_gib * 2**30) // 4
    source = torch.empty(numel, dtype=torch.float32, device="cuda")
    target = torch.empty_like(source)
    copy_ms, _, _ = time_fn(lambda: target.copy_(source), reps=20, warmup=3)
    bandwidth = 2 * numel * 4 / (copy_ms * 1e-3) / 1e9
    left = torch.randn(matmul_size, matmul_size, dtype=torch.bfloat16, device="cuda")
    right = torch.randn(matmul_size, matmul_size, dtype=torch.bfloat16, device="cuda")
    matmul_ms, _, _ = time_fn(lambda: left @ right, reps=20, warmup=3)
    tflops = 2 * matmul_size**3 / (matmul_ms * 1e-3) / 1e12
    return DeviceRates(torch.cuda.get_device_name(), bandwidth, tflops)


@contextlib.contextmanager
def shard_processes(
    count: int,
    *,
    classes: int,
    dim: int,
    root: str,
    index_device: str = "cpu",
    dtype: str = "float32",
    average_decay: float = 0.0,
    threads: int = 0,
) -> Iterator[list[str]]:
    """``count`` shard processes of a ``(classes, dim)`` matrix; yields their addresses, kills them after."""
    processes: list[subprocess.Popen] = []
    addresses = []
    folder = tempfile.mkdtemp(prefix=f"ps-{count}x{dim}-", dir=root)
    try:
        for shard in range(count):
            command = [
                sys.executable, "-m", "megaclass", "paramserver", "serve", "--rows", str(classes),
                "--dim", str(dim), "--shard", f"{shard}/{count}", "--data-dir", f"{folder}/shard{shard}",
                "--port", "0", "--momentum", "0.9", "--index-device", index_device, "--dtype", dtype,
                "--average-decay", str(average_decay),
            ]  # fmt: skip
            command += ["--torch-threads", str(threads)] if threads else []
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            processes.append(process)
        for process in processes:
            for line in process.stdout:
                if "listening on" in line:
                    addresses.append(line.strip().rsplit(" ", 1)[1])
                    break
            else:
                raise RuntimeError(f"a shard process exited with {process.wait()}")
        yield addresses
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(folder, ignore_errors=True)
