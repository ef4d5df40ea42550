"""Shared benchmark plumbing: machine facts, copy bandwidth, peak memory, result files.

Each benchmark times moefuse and its peer on the same data in the same run, and records the
ratio, the achieved bandwidth against a plain tensor copy on the same device, and the peak
extra memory in multiples of one input tensor.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import ctypes

import pytest
import torch

RESULTS = Path(__file__).resolve().parent / "results"
_M_MMAP_THRESHOLD = -3
_GLIBC_MAX_MMAP_THRESHOLD = 32 * 1024 * 1024


def _set_mmap_threshold(nbytes: int) -> None:
    """Set glibc's mmap threshold and hand free heap memory back to the OS (malloc_trim), so
    that later allocations fault fresh pages in and show up in the resident set."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, nbytes)
        libc.malloc_trim(0)
    except OSError:
        pass


def machine() -> Dict[str, str]:
    """Where the numbers come from."""
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        model = next(
            (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
            platform.processor(),
        )
        device = f"{model} ({torch.get_num_threads()} threads)"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    return {
        "device": device,
        "torch": torch.__version__,
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def best_seconds(fn: Callable[[], object], device: str, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def copy_bandwidth(tensor: torch.Tensor, rounds: int = 5) -> float:
    """GB/s of `tensor.clone()` (read once, write once) on its device."""
    seconds = best_seconds(lambda: tensor.clone(), tensor.device.type, rounds)
    return 2 * tensor.numel() * tensor.element_size() / seconds / 1e9


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_bytes(fn: Callable[[], torch.Tensor], device: str) -> int:
    """Peak memory above what was allocated before the call, minus the returned output."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before - out.numel() * out.element_size()
    # Serve every allocation over 64 KiB by mmap, given back on free, so that the resident set
    # tracks live tensors; afterwards use glibc's largest threshold, as its dynamic rule would.
    _set_mmap_threshold(64 * 1024)
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # reset the peak resident set size (VmHWM)
        before = _rss_bytes("VmRSS")
        out = fn()
        return _rss_bytes("VmHWM") - before - out.numel() * out.element_size()
    finally:
        _set_mmap_threshold(_GLIBC_MAX_MMAP_THRESHOLD)


def write_results(name: str, rows: List[dict]) -> Path:
    """Write rows plus the machine facts to benches/results/<name>.json."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1) + "\n")
    return path


def quiet_env() -> bool:
    return os.environ.get("MOEFUSE_BENCH_QUICK") == "1"


# A forked child's peak RSS (ru_maxrss) includes the pages it shared with its parent before exec,
# so every tool is started from this small launcher process rather than from pytest itself.
LAUNCHER = (
    "import os, subprocess, sys\n"
    "child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
    "_, status, usage = os.wait4(child.pid, 0)\n"
    "print(usage.ru_maxrss * 1024)\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


def run_measured(command) -> tuple:
    """(seconds, peak RSS bytes) of one tool run. Dirty pages of earlier runs are flushed first,
    so that no run pays for another's writeback."""
    os.sync()
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", LAUNCHER, *command], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{command[0]} failed: {result.stderr[-2000:]}")
    return seconds, int(result.stdout.strip().splitlines()[-1])


def apply_thread_setting() -> None:
    """MOEFUSE_BENCH_THREADS=N fixes torch's CPU thread count (e.g. 1 on a shared, busy machine)."""
    if "MOEFUSE_BENCH_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["MOEFUSE_BENCH_THREADS"]))


def plot_at_module_end(rows: List[dict], name: str, draw: Callable[[List[dict], Path, str], None]):
    """An autouse module fixture that draws `rows` (the module's own) with `draw(rows, png, device)`
    into RESULTS/<name>.png once the module's benchmarks have run; assign it to a module name."""

    @pytest.fixture(scope="module", autouse=True)
    def _plot_at_the_end():
        yield
        if rows:
            RESULTS.mkdir(exist_ok=True)
            draw(rows, RESULTS / f"{name}.png", machine()["device"])

    return _plot_at_the_end


def table_cli(argv: List[str], table: Callable[[Path], str], draw: Callable[[List[dict], Path, str], None]) -> None:
    """`python -m benches.<module> RESULT.json [--plot]`: print the module's Markdown table of a
    result file (and redraw its PNG from the rows)."""
    result = Path(argv[1])
    if "--plot" in argv:
        data = json.loads(result.read_text())
        draw(data["rows"], result.with_suffix(".png"), data["machine"]["device"])
    print(table(result))
