"""Peak memory per process when two processes train a ~2 GB model: plain DDP (each process loads
the whole model) against DeepSpeed ZeRO-3 (the model is created partitioned while loading).

    python bench/zero3_load.py [--markdown]

Builds a 500M-parameter Llama-shaped model (fp32, ~2.0 GB) from its config, saves it, and runs
`finetune train` with `torchrun --nproc_per_node 2` for 2 steps of LoRA, once per mode, alternating
(DDP, ZeRO-3, DDP, ZeRO-3), sampling every process's resident memory to its peak. The target
(scale-out issue): the ZeRO-3 peak per process at most 0.65x the DDP one.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).parents[1]
SAMPLES = ROOT / "data" / "samples"


def build_model(folder: Path) -> float:
    """A random 500M-parameter Llama (fp32) with SmolLM2's tokenizer; its size in GB."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from finetune.model.default_model import ensure_default_model

    tokenizer = AutoTokenizer.from_pretrained(ensure_default_model(log=lambda m: None))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=1536,
        intermediate_size=4096,
        num_hidden_layers=16,
        num_attention_heads=12,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, max_shard_size="500MB")
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters()) * 4 / 1e9


def write_config(folder: Path, model: Path, deepspeed: str | None) -> Path:
    import yaml

    values = {
        "base_model": str(model),
        "datasets": [{"path": str(SAMPLES / "alpaca.jsonl"), "type": "alpaca"}],
        "adapter": "lora",
        "lora_target_modules": ["q_proj", "v_proj"],
        "sequence_len": 128,
        "micro_batch_size": 1,
        "max_steps": 2,
        "bf16": False,
        "save_steps": 1000,
        "output_dir": str(folder / "out"),
        "dataset_prepared_path": str(folder / "prepared"),
    }
    if deepspeed:
        values["deepspeed"] = deepspeed
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def run_two_processes(config: Path, cwd: Path) -> tuple[list[float], float]:
    """Peak RSS (GB) of each training process, and the wall time."""
    from finetune.train.launch import free_port

    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--master_port", str(free_port()), "-m", "finetune", "train", str(config)]
    started = time.perf_counter()
    launcher = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peaks: dict[int, int] = {}
    parent = psutil.Process(launcher.pid)
    while launcher.poll() is None:
        try:
            for child in parent.children(recursive=True):
                try:
                    rss = child.memory_info().rss
                except psutil.NoSuchProcess:
                    continue
                peaks[child.pid] = max(peaks.get(child.pid, 0), rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    output = launcher.stdout.read().decode(errors="replace")
    if launcher.returncode != 0:
        raise SystemExit(f"training failed:\n{output[-3000:]}")
    workers = sorted(peaks.values(), reverse=True)[:2]  # the two training processes
    return [w / 1e9 for w in workers], time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    results: dict[str, list] = {"ddp": [], "zero3": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        size = build_model(tmp / "model")
        for round_ in range(args.rounds):
            for mode in ("ddp", "zero3"):
                folder = tmp / f"{mode}-{round_}"
                folder.mkdir()
                config = write_config(folder, tmp / "model", "zero3" if mode == "zero3" else None)
                peaks, seconds = run_two_processes(config, folder)
                results[mode].append({"peaks": peaks, "seconds": seconds})
                print(mode, round_, json.dumps(results[mode][-1]), flush=True)
    ddp = max(p for r in results["ddp"] for p in r["peaks"])
    zero3 = max(p for r in results["zero3"] for p in r["peaks"])
    ratio = zero3 / ddp
    if not args.markdown:
        print(json.dumps({"model_gb": size, "ddp_peak_gb": ddp, "zero3_peak_gb": zero3}))
        return
    rows = [
        "## ZeRO-3 loading (`bench/zero3_load.py`)",
        "",
        f"Two processes (`torchrun --nproc_per_node 2`) train LoRA for 2 steps on a {size:.2f} GB "
        "fp32 Llama-shaped model (500M parameters); every process's resident memory sampled to "
        f"its peak; {args.rounds} alternating rounds per mode.",
        "",
        "| mode | peak RSS per process (GB), each run | wall time (s) |",
        "| --- | --- | --- |",
    ]
    for mode, label in (("ddp", "DDP (each process loads the model)"), ("zero3", "ZeRO-3")):
        peaks = "; ".join(", ".join(f"{p:.2f}" for p in r["peaks"]) for r in results[mode])
        times = ", ".join(f"{r['seconds']:.0f}" for r in results[mode])
        rows.append(f"| {label} | {peaks} | {times} |")
    rows += [
        "",
        f"Highest ZeRO-3 peak / highest DDP peak: **{ratio:.2f}x** (target ≤ 0.65x).",
        "",
        "Command: `python bench/zero3_load.py --markdown`",
    ]
    print("\n".join(rows))


if __name__ == "__main__":
    main()
