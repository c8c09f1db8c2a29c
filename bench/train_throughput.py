"""Training throughput on SmolLM2-135M (LoRA r16, all linear layers), in one run:

1. `finetune train`, sample packing on (rows of `sequence_len` tokens);
2. `finetune train`, packing off (padded batches);
3. the same two with glibc's malloc left at its defaults (what keeping freed memory for the
   next step is worth to each);
4. `finetune train`, QLoRA, packed;
5. a hand-written baseline: HF Trainer + PEFT + DataCollatorForSeq2Seq padding, fp32 — what a
   user writes without a tool.

Same synthetic Alpaca data (bench/make_data.py), same number of optimizer steps after one
warm-up step; reports trained tokens/s (tokens whose label is trained), padding fraction and
packing efficiency, and peak RSS of each run. Packed and padded alternate `--pairs` times (the
machine's speed drifts), and the packed/padded ratio is the median of the pairs' ratios.

    python bench/train_throughput.py [--steps 8] [--pairs 3] [--markdown]
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

sys.path.insert(0, str(Path(__file__).parent))
from make_data import alpaca_rows, write_jsonl  # noqa: E402

SEQUENCE_LEN = 2048
PADDED_BATCH = 8  # samples per padded micro-batch: ~1,600 real tokens, like one packed row


def finetune_run(
    model: Path,
    data: Path,
    folder: Path,
    packed: bool,
    steps: int,
    bf16: str,
    env: dict | None = None,
    **options,
):
    config = folder / "config.yaml"
    config.write_text(
        json.dumps(
            {
                **options,
                "base_model": str(model),
                "datasets": [{"path": str(data), "type": "alpaca"}],
                "dataset_prepared_path": str(folder.parent / "prepared"),
                "output_dir": str(folder / "out"),
                "sequence_len": SEQUENCE_LEN,
                "sample_packing": packed,
                "micro_batch_size": 1 if packed else PADDED_BATCH,
                "adapter": "lora",
                "lora_r": 16,
                "lora_alpha": 32,
                "lora_target_linear": True,
                "max_steps": steps + 1,
                "learning_rate": 1e-4,
                "logging_steps": 1,
                "save_steps": 10_000,
                "bf16": bf16,
            }
        )
    )
    command = [sys.executable, "-m", "finetune", "train", str(config), "--force"]
    stdout, peak = run_measured(command, env)
    records = [json.loads(x) for x in (folder / "out" / "metrics.jsonl").read_text().splitlines()]
    steps_after_warmup = [r for r in records if "tokens_per_second" in r][1:]
    tokens = sum(r["trained_tokens"] for r in steps_after_warmup)
    seconds = sum(r["trained_tokens"] / r["tokens_per_second"] for r in steps_after_warmup)
    efficiency = None
    for line in stdout.splitlines():
        if line.startswith("packing:"):
            efficiency = float(line.rsplit("efficiency", 1)[1].split()[0])
    return {
        "tokens_per_s": tokens / seconds,  # like the baseline: all tokens / all time
        "packing_efficiency": efficiency,
        "peak_rss_gb": round(peak, 2),
    }


BASELINE = Path(__file__).parent / "_hf_trainer_baseline.py"


def baseline_run(model: Path, data: Path, folder: Path, steps: int) -> dict:
    command = [sys.executable, str(BASELINE), str(model), str(data), str(folder)]
    stdout, peak = run_measured([*command, str(steps), str(PADDED_BATCH)])
    return {**json.loads(stdout.strip().splitlines()[-1]), "peak_rss_gb": round(peak, 2)}


def padding_fraction(prepared: Path) -> float:
    """Pad tokens / token slots of the padded run's micro-batches (one epoch, seed 42)."""
    import datasets

    from finetune.data.packing import BatchPlan

    lengths = datasets.load_from_disk(str(next(prepared.glob("*/train"))))["length"]
    plan = BatchPlan(lengths, PADDED_BATCH, SEQUENCE_LEN, packed=False, seed=42)
    real = slots = 0
    for batch in plan:
        sizes = [lengths[i] for i in batch]
        real, slots = real + sum(sizes), slots + max(sizes) * len(sizes)
    return round(1 - real / slots, 3)


def run_measured(command: list[str], env: dict | None = None) -> tuple[str, float]:
    """Run a command; return its stdout and the peak RSS (GB) of it and its children."""
    import psutil

    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    watched = psutil.Process(process.pid)
    peak = 0
    while process.poll() is None:
        try:
            tree = [watched, *watched.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree))
        except psutil.Error:
            pass
        time.sleep(0.2)
    out, err = process.communicate()
    if process.returncode:
        raise RuntimeError(f"{command} failed:\n{err[-3000:]}")
    return out, peak / 1024**3


def run(steps: int, rows: int, pairs: int) -> dict:
    from finetune.machine import bf16_supported
    from finetune.model.default_model import ensure_default_model

    model = ensure_default_model()
    bf16 = "auto"
    results = {"bf16": bf16_supported(), "steps": steps, "pairs": pairs}
    # This machine's speed drifts by 20-30% within minutes, so packed and padded alternate
    # `pairs` times and the ratio is the median of the pairs' ratios.
    alternating = [
        (f"{name}#{i}", packed, {}, None)
        for i in range(pairs)
        for name, packed in (("packed", True), ("padded", False))
    ]
    runs = (
        *alternating,
        # Any MALLOC_* variable makes `train` leave glibc's allocator as it is; 0 = default.
        ("packed_glibc_defaults", True, {}, {"MALLOC_PERTURB_": "0"}),
        ("padded_glibc_defaults", False, {}, {"MALLOC_PERTURB_": "0"}),
        ("qlora_packed", True, {"adapter": "qlora", "load_in_4bit": True}, None),
    )
    with tempfile.TemporaryDirectory() as tmp:
        data = write_jsonl(alpaca_rows(rows, 200, seed=0), Path(tmp) / "alpaca.jsonl")
        for name, packed, options, env in runs:
            folder = Path(tmp) / name.replace("#", "_")
            folder.mkdir()
            start = time.perf_counter()
            results[name] = finetune_run(model, data, folder, packed, steps, bf16, env, **options)
            results[name]["wall_s"] = round(time.perf_counter() - start, 1)
        folder = Path(tmp) / "baseline"
        folder.mkdir()
        results["baseline"] = baseline_run(model, data, folder, steps)
        padding = padding_fraction(Path(tmp) / "prepared")
    ratios = [
        results[f"packed#{i}"]["tokens_per_s"] / results[f"padded#{i}"]["tokens_per_s"]
        for i in range(pairs)
    ]
    results["pair_ratios"] = [round(x, 2) for x in ratios]
    results["packed_over_padded"] = statistics.median(ratios)
    for name in ("packed", "padded"):
        runs_of = [results.pop(f"{name}#{i}") for i in range(pairs)]
        # The run with the median rate (the lower middle one for an even count), whole.
        results[name] = sorted(runs_of, key=lambda r: r["tokens_per_s"])[(pairs - 1) // 2]
        results[name]["all_tokens_per_s"] = [round(r["tokens_per_s"]) for r in runs_of]
    results["padded"]["padding_fraction"] = padding
    results["packed_over_baseline"] = (
        results["packed"]["tokens_per_s"] / results["baseline"]["tokens_per_s"]
    )
    return results


def markdown(r: dict) -> str:
    rate = {name: r[name]["tokens_per_s"] for name in r if isinstance(r[name], dict)}
    padding = f"padding {r['padded']['padding_fraction']:.0%} of slots"

    def row(label: str, name: str, density: str | None = None) -> str:
        density = density or str(r[name]["packing_efficiency"])
        return f"| {label} | {rate[name]:.0f} | {density} | {r[name]['peak_rss_gb']} |\n"

    def median_of(name: str) -> str:
        return ", ".join(map(str, r[name]["all_tokens_per_s"]))

    return (
        "## Training throughput (`bench/train_throughput.py`)\n\n"
        f"SmolLM2-135M-Instruct, LoRA r16 on all linear layers, synthetic Alpaca rows (~200 "
        f"tokens), sequence_len {SEQUENCE_LEN}, {r['steps']} optimizer steps after one warm-up "
        f"step; bf16 {'on' if r['bf16'] else 'off (no native bf16 on this CPU)'} for finetune, "
        "fp32 for the baseline. Trained tokens/s = tokens whose label is trained.\n\n"
        "| run | trained tokens/s | packing efficiency / padding | peak RSS (GB) |\n"
        "| --- | --- | --- | --- |\n"
        + row(
            f"finetune LoRA, packed (1 row of {SEQUENCE_LEN}); median of {median_of('packed')}",
            "packed",
        )
        + row(
            f"finetune LoRA, padded ({PADDED_BATCH} samples); median of {median_of('padded')}",
            "padded",
            padding,
        )
        + row("finetune LoRA, packed, glibc malloc left at its defaults", "packed_glibc_defaults")
        + row(
            "finetune LoRA, padded, glibc malloc left at its defaults",
            "padded_glibc_defaults",
            padding,
        )
        + row("finetune QLoRA (nf4), packed", "qlora_packed")
        + row(
            f"baseline: HF Trainer + PEFT + DataCollatorForSeq2Seq, fp32 ({PADDED_BATCH} samples)",
            "baseline",
            "—",
        )
        + "\n"
        + f"Packed / padded: **{r['packed_over_padded']:.2f}x** (target ≥ 2x), the median of the "
        f"{r['pairs']} alternating pairs' ratios {', '.join(map(str, r['pair_ratios']))}. "
        f"Packed / baseline: **{r['packed_over_baseline']:.2f}x** (target ≥ 2.5x). "
        "Keeping freed memory for the next step (what `train` does on CPU) vs glibc's defaults: "
        f"packed {rate['packed'] / rate['packed_glibc_defaults']:.2f}x, "
        f"padded {rate['padded'] / rate['padded_glibc_defaults']:.2f}x; "
        "packed / padded with glibc's defaults for both: "
        f"{rate['packed_glibc_defaults'] / rate['padded_glibc_defaults']:.2f}x.\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--pairs", type=int, default=3, help="packed/padded runs, alternating")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    result = run(args.steps, args.rows, args.pairs)
    print(markdown(result) if args.markdown else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
