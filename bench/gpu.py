"""GPU training throughput and memory: `finetune train` on a random ~1B-parameter Llama (the
shape of Llama-3.2-1B, bf16 where the GPU has it), once as LoRA and once as QLoRA (nf4).

Each run trains `--steps` optimizer steps after one warm-up step on packed rows of synthetic
Alpaca data (bench/make_data.py), LoRA r16 on all linear layers, on one GPU in its own process;
reports trained tokens/s (tokens whose label is trained) and the process's peak GPU memory
(allocated by tensors, and reserved by PyTorch's caching allocator).

    python bench/gpu.py [--steps 10] [--markdown]

Without a CUDA GPU it prints a short "not run" section instead (so `make bench` passes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from make_data import alpaca_rows, write_jsonl  # noqa: E402

TITLE = "## GPU training throughput and memory (`bench/gpu.py`)"
SEQUENCE_LEN = 2048

# Runs `finetune train` in this process and reports CUDA's peak memory counters afterwards.
MEASURED_TRAIN = """
import json, sys, torch
from finetune.config import load_config
from finetune.train import train

torch.cuda.reset_peak_memory_stats()
train(load_config(sys.argv[1]).config)
print(json.dumps({
    "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
    "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
}))
"""


def build_model(folder: Path) -> int:
    """A random Llama with Llama-3.2-1B's shape and SmolLM2's tokenizer; its parameter count."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from finetune.model.default_model import ensure_default_model

    tokenizer = AutoTokenizer.from_pretrained(ensure_default_model(log=lambda m: None))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    torch.manual_seed(0)
    with torch.device("cuda"):  # random init on the GPU: seconds instead of minutes
        model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    count = sum(p.numel() for p in model.parameters())
    del model
    torch.cuda.empty_cache()
    return count


def finetune_run(model: Path, data: Path, folder: Path, steps: int, **options) -> dict:
    folder.mkdir()
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
                "sample_packing": True,
                "micro_batch_size": 1,
                "lora_r": 16,
                "lora_alpha": 32,
                "lora_target_linear": True,
                "max_steps": steps + 1,
                "learning_rate": 1e-4,
                "logging_steps": 1,
                "save_steps": 10_000,
                "bf16": "auto",
            }
        )
    )
    script = folder / "measured_train.py"
    script.write_text(MEASURED_TRAIN)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, str(script), str(config)],
        env={**env, "CUDA_VISIBLE_DEVICES": env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]},
        capture_output=True,
        text=True,
    )
    if result.returncode:
        raise RuntimeError(f"{options} failed:\n{result.stderr[-3000:]}")
    memory = json.loads(result.stdout.strip().splitlines()[-1])
    lines = (folder / "out" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    after_warmup = [r for r in records if "tokens_per_second" in r][1:]
    tokens = sum(r["trained_tokens"] for r in after_warmup)
    seconds = sum(r["trained_tokens"] / r["tokens_per_second"] for r in after_warmup)
    return {
        "tokens_per_s": tokens / seconds,
        "peak_allocated_gib": round(memory["peak_allocated_gib"], 2),
        "peak_reserved_gib": round(memory["peak_reserved_gib"], 2),
        "wall_s": round(time.perf_counter() - started, 1),
    }


def run(steps: int, rows: int) -> dict:
    import torch

    results = {
        "gpu": torch.cuda.get_device_name(0),
        "bf16": torch.cuda.is_bf16_supported(),
        "steps": steps,
    }
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        results["parameters"] = build_model(model)
        data = write_jsonl(alpaca_rows(rows, 400, seed=0), Path(tmp) / "alpaca.jsonl")
        results["lora"] = finetune_run(model, data, Path(tmp) / "lora", steps, adapter="lora")
        results["qlora"] = finetune_run(
            model, data, Path(tmp) / "qlora", steps, adapter="qlora", load_in_4bit=True
        )
    return results


def markdown(r: dict) -> str:
    def row(label: str, name: str) -> str:
        x = r[name]
        return (
            f"| {label} | {x['tokens_per_s']:.0f} | {x['peak_allocated_gib']} | "
            f"{x['peak_reserved_gib']} | {x['wall_s']} |\n"
        )

    return (
        f"{TITLE}\n\n"
        f"{r['gpu']}; a random Llama with Llama-3.2-1B's shape ({r['parameters'] / 1e9:.2f}B "
        f"parameters), {'bf16' if r['bf16'] else 'fp16'}, LoRA r16 on all linear layers, packed "
        f"rows of {SEQUENCE_LEN} tokens of synthetic Alpaca data, {r['steps']} optimizer steps "
        "after one warm-up step, one GPU.\n\n"
        "| run | trained tokens/s | peak GPU memory allocated (GiB) | peak reserved (GiB) | "
        "wall (s) |\n"
        "| --- | --- | --- | --- | --- |\n" + row("LoRA", "lora") + row("QLoRA (nf4)", "qlora")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print(f"{TITLE}\n\nnot run: no CUDA GPU" if args.markdown else '{"not_run": "no CUDA GPU"}')
        return
    result = run(args.steps, args.rows)
    print(markdown(result) if args.markdown else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
