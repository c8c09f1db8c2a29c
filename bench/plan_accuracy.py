"""`finetune plan` against real runs: predicted vs measured peak resident memory on this CPU.

    python bench/plan_accuracy.py [--markdown]

SmolLM2-135M-Instruct (the embedded default model), synthetic Alpaca rows (bench/make_data.py),
packed rows; LoRA, QLoRA (nf4) and DoRA, each with gradient checkpointing off and on, at
sequence_len 1024 and 2048. For each config: `finetune plan CONFIG --json` in its own process,
then `finetune train` for 2 optimizer steps on prepared data in its own process, whose peak
resident memory (ru_maxrss of the process, exact) is the measurement. Target (memory issue):
every prediction within ±15%.

The CPU heap excess (CPU_HEAP_BASE, CPU_HEAP_PER_HIDDEN in finetune/plan/estimate.py: two
numbers) was fitted by least squares on an earlier round of this bench; `--log FILE` keeps each
run's plan and measurement, to refit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(Path(__file__).parent))

from make_data import alpaca_rows, write_jsonl  # noqa: E402

PEAK = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[1:]).returncode
print("PEAK_KB", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(code)
"""

CONFIGS = [
    (adapter, checkpointing, length)
    for length in (1024, 2048)
    for adapter in ("lora", "qlora", "dora")
    for checkpointing in (False, True)
]


def write_config(folder: Path, data: Path, model: str, adapter, checkpointing, length) -> Path:
    import yaml

    values = {
        "base_model": model,
        "datasets": [{"path": str(data), "type": "alpaca"}],
        "dataset_prepared_path": str(folder.parent / "prepared"),
        "sequence_len": length,
        "sample_packing": True,
        "adapter": "qlora" if adapter == "qlora" else "lora",
        "lora_r": 16,
        "lora_alpha": 32,
        "lora_target_linear": True,
        "micro_batch_size": 1,
        "max_steps": 2,
        "bf16": False,
        "gradient_checkpointing": checkpointing,
        "save_steps": 1000,
        "output_dir": str(folder / "out"),
    }
    if adapter == "qlora":
        values["load_in_4bit"] = True
    if adapter == "dora":
        values["peft_use_dora"] = True
    folder.mkdir(parents=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def finetune(*args: str, peak: bool = False) -> tuple[str, float | None]:
    command = [sys.executable, "-m", "finetune", *args]
    if peak:
        command = [sys.executable, "-c", PEAK, *command]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{(result.stdout + result.stderr)[-3000:]}")
    if not peak:
        return result.stdout, None
    kb = int(result.stdout.rsplit("PEAK_KB", 1)[1].split()[0])
    return result.stdout, kb * 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--log", type=Path, help="Append each plan and measurement (JSON lines).")
    args = parser.parse_args()
    from finetune.model.default_model import ensure_default_model

    model = str(ensure_default_model(log=lambda m: None))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "alpaca.jsonl"
        write_jsonl(alpaca_rows(400, 200, seed=0), data)
        for adapter, checkpointing, length in CONFIGS:
            name = f"{adapter}-{'ckpt' if checkpointing else 'nockpt'}-{length}"
            config = write_config(tmp / name, data, model, adapter, checkpointing, length)
            finetune("preprocess", str(config))
            out, _ = finetune("plan", str(config), "--json")
            plan = json.loads(out[out.index("{") :])
            _, measured = finetune("train", str(config), peak=True)
            error = plan["peak_memory_bytes"] / measured - 1
            rows.append((adapter, checkpointing, length, plan["peak_memory_bytes"], measured))
            if args.log:
                with args.log.open("a") as handle:
                    handle.write(json.dumps({"config": name, "plan": plan, "measured": measured}))
                    handle.write("\n")
            print(
                f"{name}: predicted {plan['peak_memory_bytes'] / 1e9:.2f} GB, measured "
                f"{measured / 1e9:.2f} GB ({error:+.1%})",
                file=sys.stderr,
                flush=True,
            )
    worst = max(abs(p / m - 1) for *_, p, m in rows)
    if not args.markdown:
        print(json.dumps({"rows": rows, "worst_error": worst}))
        return
    lines = [
        "## Plan accuracy (`bench/plan_accuracy.py`)",
        "",
        "`finetune plan CONFIG --json` against the peak resident memory of `finetune train` "
        "(2 steps, ru_maxrss) for SmolLM2-135M-Instruct, packed synthetic Alpaca rows, LoRA r16 "
        f"on all linear layers, fp32, micro_batch_size 1; {platform.machine()}, "
        f"{os.cpu_count()} cores.",
        "",
        "| adapter | gradient checkpointing | sequence_len | predicted | measured | error |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for adapter, checkpointing, length, predicted, measured in rows:
        error = predicted / measured - 1
        lines.append(
            f"| {adapter} | {'on' if checkpointing else 'off'} | {length} | "
            f"{predicted / 1e9:.2f} GB | {measured / 1e9:.2f} GB | {error:+.1%} |"
        )
    lines += [
        "",
        f"Largest error: **{worst:.1%}** (target ±15%). The tensors are measured, not fitted. "
        "Runs without checkpointing keep freed memory in glibc's heap, whose excess over the "
        "tensors is two numbers (finetune/plan/estimate.py) fitted on an earlier round of "
        "those runs (2026-12-07, Intel Xeon without AVX512-BF16, large tensors in huge "
        "pages), so those rows are close to in-sample; left out of the fit one at a time, "
        "each was still predicted within 12%, except QLoRA at 2,048 tokens (19% under). "
        "Runs with checkpointing give freed memory back and have no fitted term. One model "
        "only: that the excess scales with other models' hidden size and depth is untested.",
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
