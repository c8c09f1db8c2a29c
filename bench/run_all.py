"""`make bench`: run every benchmark in bench/ and rewrite bench/RESULTS.md.

A benchmark is a script here with a `--markdown` flag (helpers start with `_`; make_data.py
and this file are not benchmarks). Each prints its own section; this adds the machine.

    python bench/run_all.py [SCRIPT ...]

With script names, only those run and only their sections of RESULTS.md are replaced.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
SKIP = {"make_data.py", "run_all.py"}


def machine() -> str:
    import torch

    cpu = "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB RAM, {gpu}; Python "
        f"{platform.python_version()}, torch {torch.__version__}"
    )


def recorded_sections() -> dict[str, str]:
    """The sections of the current RESULTS.md, by the script named in their Command line."""
    results = HERE / "RESULTS.md"
    if not results.exists():
        return {}
    sections = {}
    for section in results.read_text().split("\n## ")[1:]:
        for script in HERE.glob("*.py"):
            if f"`python bench/{script.name} --markdown`" in section:
                sections[script.name] = "## " + section.rstrip("\n") + "\n"
    return sections


def main() -> None:
    scripts = sorted(
        p for p in HERE.glob("*.py") if p.name not in SKIP and not p.name.startswith("_")
    )
    only = {Path(name).name for name in sys.argv[1:]}
    unknown = only - {p.name for p in scripts}
    if unknown:
        sys.exit(f"not a benchmark in bench/: {', '.join(sorted(unknown))}")
    kept = recorded_sections() if only else {}
    sections = []
    for script in scripts:
        if only and script.name not in only:
            if script.name in kept:  # a script never recorded stays out until it is run
                sections.append(kept[script.name])
            continue
        started = time.perf_counter()
        print(f"running {script.name} ...", flush=True)
        result = subprocess.run(
            [sys.executable, str(script), "--markdown"], capture_output=True, text=True
        )
        if result.returncode:
            body = f"## {script.name}\n\nFAILED:\n\n```\n{result.stderr[-2000:]}\n```\n"
        else:
            body = result.stdout.strip() + "\n"
        took = time.perf_counter() - started
        sections.append(
            f"{body}\nCommand: `python bench/{script.name} --markdown` ({took:.0f} s)\n"
        )
    header = (
        "# Benchmark results\n\n"
        f"Written by `make bench` on {time.strftime('%Y-%m-%d')}.\n\n"
        f"Machine: {machine()}.\n"
    )
    if only:
        header += (
            f"\nRerun alone on that day, the other sections kept: {', '.join(sorted(only))}.\n"
        )
    (HERE / "RESULTS.md").write_text(header + "\n" + "\n".join(sections))
    print((HERE / "RESULTS.md").read_text())


if __name__ == "__main__":
    main()
