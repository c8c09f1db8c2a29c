"""finetune against its peer, Axolotl 0.19, measured in the same run: the same data, the same
YAML file, the same machine, runs alternating between the two so that drift hits both.

    make bench-peers            # builds .venv-peers (Axolotl 0.19 on torch 2.13.0), runs this
    python bench/peers.py [--axolotl PATH] [--only preprocess,epoch,memory] [--markdown]

1. preprocess: 20,000 Alpaca rows, fresh cache, `finetune preprocess` vs `axolotl preprocess`.
2. epoch: whole-process wall time of one epoch of 150 Alpaca rows (SmolLM2-135M, LoRA r16 on
   all linear layers, sequence_len 1024, micro_batch_size 4, packed), data prepared beforehand;
   also the hand-written HF Trainer + PEFT padded baseline (bench/_hf_trainer_baseline.py).
3. memory: peak RSS of one training step of one packed row with gradient checkpointing, at
   growing sequence lengths, and the longest that stays within an 8 GB budget.

Both tools read the one config file (Axolotl's keys). On this CPU Axolotl needs `bf16: false`
and its LoRA kernels off; both sides get the offline variables. On CPU finetune sets glibc's
malloc for the run (finetune.machine.cpu_allocator_mode: keep freed memory, or give it back when
checkpointing) and asks PyTorch for huge pages (use_huge_pages_for_tensors). In the preprocess
and epoch runs Axolotl's processes get the same settings (a sitecustomize module on PYTHONPATH,
THP_MEM_ALLOC_ENABLE), so the allocator is not what is compared; in the memory
runs Axolotl runs as its users get it, and once more with finetune's setting, reported
separately. The baseline is left at the defaults: it is what a user writes without a tool.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from make_data import alpaca_rows, write_jsonl  # noqa: E402

from finetune.config.load import load_config  # noqa: E402
from finetune.machine import (  # noqa: E402
    _M_MMAP_THRESHOLD,
    _M_TRIM_THRESHOLD,
    cpu_allocator_mode,
    malloc_thresholds,
)
from finetune.model.default_model import ensure_default_model  # noqa: E402

SIDES = ("finetune", "axolotl")
OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "AXOLOTL_DO_NOT_TRACK": "1",
    "DO_NOT_TRACK": "1",
}
BUDGET_GB = 8.0
LADDER = (1024, 2048, 4096, 8192, 16384)  # 4x the compared length at most
COMPARED_AT = 4096
GB = 1e9

# Given to Axolotl's Python processes when asked: the malloc thresholds finetune sets for itself
# on CPU for the same config (finetune.machine.cpu_allocator_mode), by name in PEER_MALLOC.
SITECUSTOMIZE = """import ctypes, os
_mode = os.environ.get("PEER_MALLOC")
_mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
if _mode and _mallopt is not None:
    _mmap, _trim = {thresholds}[_mode]
    _mallopt({mmap_key}, _mmap)
    _mallopt({trim_key}, _trim)
"""


def config(path: Path, model: Path, data: Path, work: Path, **keys) -> Path:
    """One YAML file both tools read."""
    settings = {
        "base_model": str(model),
        "datasets": [{"path": str(data), "type": "alpaca", "ds_type": "json"}],
        "dataset_prepared_path": str(work / "prepared"),
        "output_dir": str(work / "out"),
        "sequence_len": 1024,
        "sample_packing": True,
        "adapter": "lora",
        "lora_r": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.0,
        "lora_target_linear": True,
        "lora_mlp_kernel": False,
        "lora_qkv_kernel": False,
        "lora_o_kernel": False,
        "micro_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "num_epochs": 1,
        "optimizer": "adamw_torch",
        "learning_rate": 0.0002,
        "bf16": False,
        "fp16": False,
        "tf32": False,
        "val_set_size": 0,
        "seed": 42,
        **keys,
    }
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path


class Runner:
    def __init__(self, axolotl: Path, scratch: Path):
        self.axolotl = axolotl
        site = scratch / "site"
        site.mkdir()
        thresholds = {mode: malloc_thresholds(mode) for mode in ("keep", "give back")}
        (site / "sitecustomize.py").write_text(
            SITECUSTOMIZE.format(
                thresholds=thresholds, mmap_key=_M_MMAP_THRESHOLD, trim_key=_M_TRIM_THRESHOLD
            )
        )
        self.env = {"finetune": {**OFFLINE}, "axolotl": {**OFFLINE, "PYTHONPATH": str(site)}}
        self.env["axolotl"]["PATH"] = f"{axolotl.parent}{os.pathsep}{os.environ['PATH']}"

    def command(self, side: str, verb: str, config_file: Path) -> list[str]:
        if side == "finetune":
            return [sys.executable, "-m", "finetune", verb, str(config_file)]
        extra = ["--launcher", "python"] if verb == "train" else []
        return [str(self.axolotl), verb, str(config_file), *extra]

    def run(
        self,
        side: str,
        verb: str,
        config_file: Path,
        kill_above_gb: float | None = None,
        same_allocator: bool = True,
    ):
        """`same_allocator`: Axolotl gets the allocator settings finetune picks for this config
        (malloc thresholds, PyTorch's huge pages); otherwise the defaults, what its users get."""
        env = dict(self.env[side])
        if side == "axolotl" and same_allocator:
            env["PEER_MALLOC"] = cpu_allocator_mode(load_config(config_file).config)
            env["THP_MEM_ALLOC_ENABLE"] = "1"  # as finetune's CLI sets (use_huge_pages_for_tensors)
        return measured(self.command(side, verb, config_file), env, kill_above_gb)


def measured(command: list[str], env: dict, kill_above_gb: float | None = None) -> dict:
    """Run a command; its wall time, the peak RSS of it and its children (sampled every 0.1 s),
    and whether it succeeded. Killed once the RSS passes `kill_above_gb`, if given."""
    import psutil

    started = time.perf_counter()
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **env},
    )
    output: list[str] = []
    import threading

    reader = threading.Thread(target=lambda: output.extend(process.stdout), daemon=True)
    reader.start()
    watched = psutil.Process(process.pid)
    peak, killed = 0, False
    while process.poll() is None:
        try:
            tree = [watched, *watched.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree))
        except psutil.Error:
            pass
        if kill_above_gb is not None and peak > kill_above_gb * GB:
            for child in watched.children(recursive=True):
                child.kill()
            process.kill()
            killed = True
            break
        time.sleep(0.1)
    process.wait()
    reader.join(timeout=10)
    seconds = time.perf_counter() - started
    ok = process.returncode == 0 and not killed
    if not ok and not killed:
        tail = "".join(output)[-3000:]
        print(f"FAILED ({process.returncode}): {' '.join(command)}\n{tail}", file=sys.stderr)
    return {"ok": ok, "killed": killed, "seconds": seconds, "peak_gb": peak / GB}


def preprocess(runner: Runner, model: Path, scratch: Path, rows: int, rounds: int) -> dict:
    data = write_jsonl(alpaca_rows(rows, 200, seed=0), scratch / "preprocess.jsonl")
    times: dict[str, list[float]] = {side: [] for side in SIDES}
    for attempt in range(rounds):
        order = SIDES if attempt % 2 == 0 else SIDES[::-1]
        for side in order:
            work = scratch / f"preprocess-{side}-{attempt}"  # a fresh cache every run
            cfg = config(work.with_suffix(".yaml"), model, data, work, sequence_len=2048)
            result = runner.run(side, "preprocess", cfg)
            if not result["ok"]:
                raise RuntimeError(f"{side} preprocess failed")
            times[side].append(result["seconds"])
            print(f"preprocess {side}: {result['seconds']:.1f} s", file=sys.stderr, flush=True)
    ratios = [f / a for f, a in zip(times["finetune"], times["axolotl"], strict=True)]
    return {"rows": rows, "seconds": times, "ratio": statistics.median(ratios)}


BASELINE = HERE / "_hf_trainer_baseline.py"


def epoch(
    runner: Runner, model: Path, scratch: Path, rows: int, rounds: int, precision: str = "fp32"
) -> dict:
    """`precision` fp32: `bf16: false` on both sides. auto: `bf16: auto` in the one YAML, as
    users write it; each tool decides (finetune: bf16 on a CPU with AVX512-BF16 or AMX; Axolotl:
    fp32 on any CPU, its TrainingArguments refuse bf16 without CUDA), and the baseline runs in
    fp32 and, where the CPU has bf16, once more with the HF Trainer's bf16 on the CPU."""
    from finetune.machine import bf16_supported

    data = write_jsonl(alpaca_rows(rows, 200, seed=1), scratch / "epoch.jsonl")
    keys = {"bf16": "auto"} if precision == "auto" else {}
    baselines = ["baseline"]
    if precision == "auto" and bf16_supported():
        baselines.append("baseline-bf16")
    configs = {}
    for side in SIDES:  # the data prepared beforehand, not timed
        work = scratch / f"epoch-{side}"
        configs[side] = config(work.with_suffix(".yaml"), model, data, work, **keys)
        if not runner.run(side, "preprocess", configs[side])["ok"]:
            raise RuntimeError(f"{side} preprocess failed")
    results: dict[str, list[dict]] = {side: [] for side in (*SIDES, *baselines)}
    for attempt in range(rounds):
        order = ("finetune", "axolotl", *baselines)
        order = order if attempt % 2 == 0 else order[::-1]
        for side in order:
            if side.startswith("baseline"):
                out = scratch / f"{side}-{attempt}"
                command = [sys.executable, str(BASELINE), str(model), str(data), str(out), "0", "4"]
                command += ["bf16"] if side == "baseline-bf16" else []
                result = measured(command, OFFLINE)
                result["precision"] = "bf16" if side == "baseline-bf16" else "fp32"
            else:
                work = scratch / f"epoch-{side}"
                cfg = config(
                    work.with_suffix(".yaml"),
                    model,
                    data,
                    work,
                    output_dir=str(work / f"out{attempt}"),
                    **keys,
                )
                result = runner.run(side, "train", cfg)
                result["precision"] = trained_precision(side, work / f"out{attempt}")
            if not result["ok"]:
                raise RuntimeError(f"{side} one-epoch run failed")
            results[side].append(result)
            print(
                f"epoch {side}: {result['seconds']:.1f} s, peak {result['peak_gb']:.2f} GB",
                file=sys.stderr,
                flush=True,
            )

    def ratios(other: str) -> list[float]:
        pairs = zip(results["finetune"], results[other], strict=True)
        return [f["seconds"] / o["seconds"] for f, o in pairs]

    return {
        "rows": rows,
        "precision": precision,
        "runs": results,
        "over_baseline": statistics.median(ratios("baseline")),
        "over_axolotl": statistics.median(ratios("axolotl")),
        **(
            {"over_baseline_bf16": statistics.median(ratios("baseline-bf16"))}
            if "baseline-bf16" in results
            else {}
        ),
    }


def trained_precision(side: str, output_dir: Path) -> str:
    """What the run trained in: finetune's run.json says; Axolotl trains in fp32 on a CPU
    (`bf16: true` fails there, `auto` resolves to false)."""
    if side != "finetune":
        return "fp32"
    record = json.loads((output_dir / "run.json").read_text())
    return record.get("compute_dtype") or "?"


def memory(runner: Runner, model: Path, scratch: Path) -> dict:
    data = write_jsonl(alpaca_rows(1000, 200, seed=2), scratch / "memory.jsonl")

    def step_config(name: str, length: int) -> Path:
        work = scratch / f"memory-{name}-{length}"
        return config(
            work.with_suffix(".yaml"),
            model,
            data,
            work,
            sequence_len=length,
            micro_batch_size=1,
            max_steps=1,
            gradient_checkpointing=True,
            save_strategy="no",
        )

    peaks: dict[str, dict[int, float | None]] = {side: {} for side in SIDES}
    same_allocator = None
    fits = {side: True for side in SIDES}
    for length in LADDER:
        for side in SIDES if length % 2048 == 0 else SIDES[::-1]:
            if not fits[side] and length != COMPARED_AT:
                continue
            # Past the budget a run is stopped, except at the length both sides are compared at.
            # Axolotl with glibc's defaults: what its users get (the allocator row below).
            limit = None if length == COMPARED_AT else BUDGET_GB
            result = runner.run(
                side, "train", step_config(side, length), kill_above_gb=limit, same_allocator=False
            )
            peaks[side][length] = result["peak_gb"] if result["ok"] else None
            fits[side] = fits[side] and result["ok"] and result["peak_gb"] <= BUDGET_GB
            shown = f"{result['peak_gb']:.2f} GB" if result["ok"] else "over budget / failed"
            print(f"memory {side} {length}: {shown}", file=sys.stderr, flush=True)
        if length == COMPARED_AT:  # how much of the difference is the allocator
            result = runner.run("axolotl", "train", step_config("axolotl-malloc", length))
            same_allocator = result["peak_gb"] if result["ok"] else None
            print(f"memory axolotl {length}, finetune's malloc: {same_allocator}", file=sys.stderr)
        if not any(fits.values()) and length >= COMPARED_AT:
            break
    longest = {
        side: max(
            (n for n, peak in peaks[side].items() if peak is not None and peak <= BUDGET_GB),
            default=0,
        )
        for side in SIDES
    }
    at = {side: peaks[side].get(COMPARED_AT) for side in SIDES}
    return {
        "peaks": peaks,
        "longest": longest,
        "longest_ratio": longest["finetune"] / longest["axolotl"] if longest["axolotl"] else None,
        "at_ratio": at["finetune"] / at["axolotl"] if at["finetune"] and at["axolotl"] else None,
        "axolotl_same_allocator": same_allocator,
    }


def markdown(r: dict) -> str:
    lines = [
        "## Peers: finetune against Axolotl 0.19 (`bench/peers.py`)",
        "",
        "Both tools read the same YAML file (Axolotl's keys: LoRA r16 alpha 32 on all linear "
        "layers, packed, AdamW, fp32: `bf16: false`, Axolotl's LoRA kernels off), on the same "
        "data and machine, runs alternating; Axolotl 0.19.0 and finetune on torch 2.13.0 (CPU). "
        "In the preprocess and one-epoch runs Axolotl's processes get the allocator settings "
        "finetune picks for the config (glibc malloc thresholds, PyTorch's huge pages). "
        "Peak RSS: the process and its children, sampled every 0.1 s.",
    ]
    if "preprocess" in r:
        p = r["preprocess"]
        lines += [
            "",
            f"### Preprocess: {p['rows']:,} Alpaca rows, sequence_len 2048, fresh cache, "
            "whole process",
            "",
            "| tool | runs (s) | median (s) |",
            "| --- | --- | --- |",
        ]
        for side in SIDES:
            runs = p["seconds"][side]
            shown = ", ".join(f"{t:.1f}" for t in runs)
            lines.append(f"| {side} | {shown} | {statistics.median(runs):.1f} |")
        lines += [
            "",
            f"finetune / Axolotl: **{p['ratio']:.2f}x** (median of paired runs; target ≤ 0.5x).",
        ]
    if "epoch" in r:
        e = r["epoch"]
        lines += [
            "",
            f"### One epoch, whole process: {e['rows']} Alpaca rows, sequence_len 1024, "
            "micro_batch_size 4, data prepared",
            "",
            *(
                [
                    "Precision as users write it: `bf16: auto` in the one YAML (`--precision "
                    "auto`); each row says what the run trained in. Axolotl cannot train in bf16 "
                    "on a CPU (its TrainingArguments refuse `bf16: true` without CUDA; `auto` "
                    "resolves to fp32).",
                    "",
                ]
                if e.get("precision") == "auto"
                else []
            ),
            "| run | wall time (s), each run | peak RSS (GB), each run |",
            "| --- | --- | --- |",
        ]
        names = {
            "finetune": "finetune train (packed)",
            "axolotl": "axolotl train --launcher python (packed)",
            "baseline": "HF Trainer + PEFT, padded batches of 4 (allocator defaults)",
            "baseline-bf16": "the same baseline with `bf16=True, use_cpu=True`",
        }
        for side, label in names.items():
            if side not in e["runs"]:
                continue
            runs = e["runs"][side]
            times = ", ".join(f"{x['seconds']:.0f}" for x in runs)
            peaks = ", ".join(f"{x['peak_gb']:.2f}" for x in runs)
            trained = "/".join(sorted({x.get("precision", "fp32") for x in runs}))
            lines.append(f"| {label}, {trained} | {times} | {peaks} |")
        lines += [
            "",
            f"finetune / baseline: **{e['over_baseline']:.2f}x** (target ≤ 0.4x); finetune / "
            f"Axolotl: **{e['over_axolotl']:.2f}x** (target ≤ 0.5x); medians of paired runs.",
        ]
        if "over_baseline_bf16" in e:
            lines[-1] += f" finetune / bf16 baseline: **{e['over_baseline_bf16']:.2f}x**."
    if "memory" in r:
        m = r["memory"]
        lengths = sorted({n for side in SIDES for n in m["peaks"][side]})
        lines += [
            "",
            "### Memory: one step of one packed row, gradient checkpointing on both sides",
            "",
            "| sequence_len | finetune peak RSS | Axolotl peak RSS |",
            "| --- | --- | --- |",
        ]

        def cell(side: str, n: int) -> str:
            if n not in m["peaks"][side]:
                return "not run"
            peak = m["peaks"][side][n]
            return f"> {BUDGET_GB:.0f} GB (stopped)" if peak is None else f"{peak:.2f} GB"

        for n in lengths:
            lines.append(f"| {n:,} | {cell('finetune', n)} | {cell('axolotl', n)} |")
        longest = m["longest"]
        ratio = f"{m['longest_ratio']:.1f}x" if m["longest_ratio"] else "n/a"
        at = f"{m['at_ratio']:.2f}x" if m["at_ratio"] else "n/a"
        same = m.get("axolotl_same_allocator")
        lines += [
            "",
            "Axolotl runs here with the allocator defaults, as its users get it; finetune "
            "gives freed memory back to the OS when checkpointing (finetune.machine."
            "cpu_allocator_mode) and asks for huge pages. Axolotl given the same settings, at "
            f"{COMPARED_AT:,} tokens: " + (f"{same:.2f} GB." if same else "failed."),
        ]
        lines += [
            "",
            f"Longest within {BUDGET_GB:.0f} GB (of the lengths tried, up to {LADDER[-1]:,}): "
            "finetune "
            f"{longest['finetune']:,}, Axolotl {longest['axolotl']:,}: **{ratio}** (target ≥ 4x). "
            f"Peak at {COMPARED_AT:,} tokens, finetune / Axolotl: **{at}** (target ≤ 0.5x).",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--axolotl", type=Path, default=REPO / ".venv-peers" / "bin" / "axolotl")
    parser.add_argument("--only", default="preprocess,epoch,memory")
    parser.add_argument("--rows", type=int, default=20000, help="preprocess rows")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epoch-rounds", type=int, default=2)
    parser.add_argument(
        "--precision",
        choices=("fp32", "auto"),
        default="fp32",
        help="epoch: bf16: false on both sides, or bf16: auto as users write it",
    )
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    if not args.axolotl.exists():
        sys.exit(f"{args.axolotl} not found: `make bench-peers` builds Axolotl in .venv-peers")
    model = ensure_default_model()
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        runner = Runner(args.axolotl, scratch)
        parts = args.only.split(",")
        if "preprocess" in parts:
            results["preprocess"] = preprocess(runner, model, scratch, args.rows, args.rounds)
        if "epoch" in parts:
            results["epoch"] = epoch(runner, model, scratch, 150, args.epoch_rounds, args.precision)
        if "memory" in parts:
            results["memory"] = memory(runner, model, scratch)
    print(markdown(results) if args.markdown else json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
