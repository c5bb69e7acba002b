"""Shared helpers of the benchmark scripts: machine description, timing, tables, JSON, HAM10000 subsets."""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DATA = ROOT.parent / "shared" / "data"
HAM10000 = DATA / "ham10000"
SQUEEZENET_WEIGHTS = ROOT.parent / "shared" / "weights" / "squeezenet1_1" / "squeezenet1_1_imagenet_features.pth"


def command_line() -> str:
    """The command that started this run, as it would be typed from the repository root."""
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(ROOT)
    except ValueError:
        pass
    return shlex.join(["python", str(script), *sys.argv[1:]])


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_vector_isa() -> str:
    """The CPU's widest vector instructions as /proc/cpuinfo lists them (the host decides: the same VM
    type has run on AVX-512 + AVX512_BF16 hosts and on AVX2-only ones, at very different speeds)."""
    try:
        flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                         if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return "unknown"
    found = [name for flag, name in (("avx512f", "AVX-512"), ("avx512_bf16", "AVX512_BF16"), ("amx_bf16", "AMX"))
             if flag in flags]
    return ", ".join(found) if found else ("AVX2" if "avx2" in flags else "no AVX2")


def mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine() -> dict[str, Any]:
    """Cores, load average, CPU, memory and library versions at the time of the call."""
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "cpu": cpu_model(),
        "cpu_vector_isa": cpu_vector_isa(),
        "mem_total_gib": mem_total_gib(),
        "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    for module in ("numpy", "torch", "faiss", "sklearn", "duckdb", "PIL"):
        if module in sys.modules:
            info[module] = getattr(sys.modules[module], "__version__", "?")
    if "torch" in sys.modules:
        info["torch_threads"] = sys.modules["torch"].get_num_threads()
    return info


def print_header(title: str) -> dict[str, Any]:
    """Print the command, the machine and its load now; return the machine dict."""
    info = machine()
    print(f"# {title}")
    print(f"command: {command_line()}")
    print(f"machine: {info['nproc']} cores ({info['cpu']}, {info['cpu_vector_isa']}), {info['mem_total_gib']} GiB RAM; "
          f"load average at start {' '.join(str(x) for x in info['loadavg'])} (1/5/15 min)")
    print()
    return info


def time_call(fn: Callable[[], Any], repeat: int = 1, warmup: int = 0) -> list[float]:
    """Wall seconds of ``repeat`` calls of fn (after ``warmup`` untimed calls)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def best(times: Sequence[float]) -> float:
    """The fastest of repeated timings: on a shared machine the least disturbed one."""
    return min(times)


def median(times: Sequence[float]) -> float:
    return statistics.median(times)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A markdown table of dict rows (floats rounded to 3 significant-ish digits); by default its
    columns are every key of any row, in the order they first appear."""
    if not rows:
        return "(no rows)"
    columns = list(columns or dict.fromkeys(key for row in rows for key in row))

    def cell(value: Any) -> str:
        if isinstance(value, float):
            if value != value:
                return "nan"
            if abs(value) >= 100:
                return f"{value:,.0f}"
            if abs(value) >= 10:
                return f"{value:.1f}"
            if abs(value) >= 1:
                return f"{value:.2f}"
            return f"{value:.4g}"
        return "" if value is None else str(value)

    body = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(columns)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(b, widths)) + " |" for b in body]
    return "\n".join(lines)


def goal_line(name: str, value: float, target: float, unit: str = "x", higher: bool = True) -> dict[str, Any]:
    """Print and return one goal check: value against target."""
    met = value >= target if higher else value <= target
    sign = ">=" if higher else "<="
    print(f"GOAL {name}: {value:.3f}{unit} (goal {sign} {target:g}{unit}) -> {'MET' if met else 'MISSED'}")
    return {"goal": name, "value": value, "target": target, "higher_is_better": higher, "met": met}


def write_json(path: str | Path | None, payload: dict[str, Any]) -> None:
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"\nresults written to {path}")


def ham_scan(n: int | None = None, seed: int = 0, root: Path = HAM10000):
    """HAM10000's DatasetScan, limited to a seeded random sample of ``n`` records (all when None).

    The sample keeps metadata order, so ingest sees the records as the reader lists them.
    """
    import random

    from mediret.datasets import read_dataset

    scan = read_dataset(root)
    if n is None or n >= len(scan.records):
        return scan
    keep = sorted(random.Random(seed).sample(range(len(scan.records)), n))
    return replace(scan, records=[scan.records[i] for i in keep], problems=[])


def rss_mib_now() -> float:
    """Current resident set size of this process, MiB."""
    return _proc_status_mib("VmRSS")


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (ru_maxrss is KiB on Linux)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def vm_hwm_mib() -> float:
    """Peak resident set size of this process's address space since exec, MiB (/proc VmHWM).

    Unlike ru_maxrss, it does not inherit the forking parent's RSS (which Linux carries
    into a child's ru_maxrss at exec).
    """
    return _proc_status_mib("VmHWM")


def _proc_status_mib(field: str) -> float:
    """A kB field of /proc/self/status in MiB; NaN where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")
