"""Peak memory and wall time of `finetune merge` on a ~3.8 GB fp32 checkpoint.

Writes a Llama-style checkpoint with random weights in 500 MB safetensors shards (one shard in
memory at a time) and a rank-16 LoRA adapter on every linear layer, then times, each in a
subprocess under `/usr/bin/time -v`:

- the merge (`merge_adapter`, default settings, no verification);
- a plain read + write of the same files, done twice (the wall-time budget).

Targets: merge peak RSS < 1.25 GB, merge wall time <= the two plain passes. Needs ~8 GB free in
the work folder, removed afterwards unless --keep. Prints a markdown snippet.

    .venv/bin/python bench/merge_memory.py [--workdir /tmp] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SHARD_BYTES = 500 * 1000**2
RSS_TARGET_BYTES = 1.25 * 1000**3
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_RANK, LORA_ALPHA = 16, 32
# 18 blocks of a 1B-class shape, untied 32k vocabulary: 3.78 GB in fp32.
MODEL_SHAPE = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=18,
    num_attention_heads=16,
    num_key_value_heads=4,
    tie_word_embeddings=False,
)

MERGE = """
import sys
from finetune.merge import merge_adapter
merge_adapter(sys.argv[1], sys.argv[2], sys.argv[3], verify=False)
"""

READ_WRITE_TWICE = """
import sys
from pathlib import Path
source, target = Path(sys.argv[1]), Path(sys.argv[2])
for attempt in range(2):
    target.mkdir()
    for file in sorted(source.iterdir()):
        with open(file, "rb") as reader, open(target / file.name, "wb") as writer:
            while chunk := reader.read(64 * 1024**2):
                writer.write(chunk)
    for file in target.iterdir():
        file.unlink()
    target.rmdir()
"""


def write_base(folder: Path) -> int:
    """Save config.json and random fp32 shards; return the checkpoint's size in bytes."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**MODEL_SHAPE)
    config.save_pretrained(folder)
    with torch.device("meta"):
        shapes = {
            n: p.shape for n, p in AutoModelForCausalLM.from_config(config).named_parameters()
        }
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        if shards[-1] and size + shape.numel() * 4 > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += shape.numel() * 4
    weight_map = {}
    generator = torch.Generator().manual_seed(0)
    for index, names in enumerate(shards):
        file = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: random_weight(name, shapes[name], generator) for name in names}
        save_file(tensors, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    total = sum(shape.numel() * 4 for shape in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def random_weight(name: str, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    return torch.empty(shape).normal_(0, 0.02, generator=generator)


def write_adapter(folder: Path, shapes: dict[str, torch.Size]) -> None:
    """A peft-format LoRA adapter (r=16) on every linear layer of every block."""
    from peft import LoraConfig

    LoraConfig(
        r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=list(LORA_MODULES)
    ).save_pretrained(folder)
    generator = torch.Generator().manual_seed(1)
    tensors = {}
    for name, (out_features, in_features) in shapes.items():
        module = "base_model.model." + name.removesuffix(".weight")
        tensors[module + ".lora_A.weight"] = torch.randn(
            LORA_RANK, in_features, generator=generator
        )
        tensors[module + ".lora_B.weight"] = 0.01 * torch.randn(
            out_features, LORA_RANK, generator=generator
        )
    save_file(tensors, folder / "adapter_model.safetensors")


def linear_shapes(base: Path) -> dict[str, torch.Size]:
    index = json.loads((base / "model.safetensors.index.json").read_text())
    shapes = {}
    for name, file in index["weight_map"].items():
        if name.rsplit(".", 2)[-2] in LORA_MODULES:
            with safe_open(base / file, framework="pt") as f:
                shapes[name] = torch.Size(f.get_slice(name).get_shape())
    return shapes


def timed(script: str, *args: str | Path) -> tuple[float, int]:
    """Wall seconds and peak RSS bytes of `python -c script args` under /usr/bin/time -v."""
    os.sync()  # start each run without the previous one's writeback in flight
    result = subprocess.run(
        ["/usr/bin/time", "-v", sys.executable, "-c", script, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    if result.returncode != 0:
        sys.exit(f"benchmark step failed:\n{result.stdout}\n{result.stderr}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)[1])
    clock = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", result.stderr)[1]
    seconds = sum(float(part) * 60**i for i, part in enumerate(reversed(clock.split(":"))))
    return seconds, rss_kb * 1024


def check_one_weight(base: Path, adapter: Path, merged: Path) -> float:
    """Max |merged - (W + alpha/r * B @ A)| for one adapted weight: the merge really happened."""
    name = "model.layers.7.mlp.down_proj.weight"
    module = "base_model.model." + name.removesuffix(".weight")
    index = json.loads((base / "model.safetensors.index.json").read_text())
    merged_index = json.loads((merged / "model.safetensors.index.json").read_text())
    with safe_open(base / index["weight_map"][name], framework="pt") as f:
        weight = f.get_tensor(name)
    with safe_open(adapter / "adapter_model.safetensors", framework="pt") as f:
        delta = f.get_tensor(module + ".lora_B.weight") @ f.get_tensor(module + ".lora_A.weight")
    with safe_open(merged / merged_index["weight_map"][name], framework="pt") as f:
        result = f.get_tensor(name)
    return (result - (weight + LORA_ALPHA / LORA_RANK * delta)).abs().max().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=tempfile.gettempdir(), help="where to put ~8 GB")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument("--markdown", action="store_true", help="(the report is markdown anyway)")
    args = parser.parse_args()
    if not Path("/usr/bin/time").exists():
        sys.exit("needs GNU time: apt-get update && apt-get install -y time")
    load = os.getloadavg()[0]  # timings are only comparable on an otherwise idle machine
    work = Path(tempfile.mkdtemp(prefix="merge-bench-", dir=args.workdir))
    base, adapter, merged = work / "base", work / "adapter", work / "merged"
    try:
        print(f"writing the checkpoint to {base} ...", file=sys.stderr)
        total = write_base(base)
        write_adapter(adapter, linear_shapes(base))
        shards = len(list(base.glob("*.safetensors")))
        print("reading + writing the files twice ...", file=sys.stderr)
        copy_seconds, copy_rss = timed(READ_WRITE_TWICE, base, work / "copy")
        print("merging ...", file=sys.stderr)
        merge_seconds, merge_rss = timed(MERGE, base, adapter, merged)
        error = check_one_weight(base, adapter, merged)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    rss_ok = "yes" if merge_rss < RSS_TARGET_BYTES else "NO"
    time_ok = "yes" if merge_seconds <= copy_seconds else "NO"
    print(
        f"""
## Merge memory (`bench/merge_memory.py`)

{total / 1e9:.2f} GB fp32 Llama-style checkpoint ({MODEL_SHAPE["num_hidden_layers"]} layers, \
hidden {MODEL_SHAPE["hidden_size"]}) in {shards} shards of <= {SHARD_BYTES / 1e6:.0f} MB, LoRA \
r={LORA_RANK} on all {len(LORA_MODULES)} linear layers of every block; \
{platform.machine()}, {os.cpu_count()} cores, load average {load:.1f} at the start; \
`.venv/bin/python bench/merge_memory.py`.

| run | wall time | peak RSS | target |
|---|---|---|---|
| merge (`merge_adapter`, defaults, no verify) | {merge_seconds:.1f} s | \
{merge_rss / 1e9:.2f} GB | RSS < {RSS_TARGET_BYTES / 1e9:.2f} GB: {rss_ok}; \
time <= read+write x2: {time_ok} |
| read + write the files, twice | {copy_seconds:.1f} s | {copy_rss / 1e9:.2f} GB | |

Spot check: one merged weight differs from W + (alpha/r) B A by at most {error:.2g}.
"""
    )


if __name__ == "__main__":
    main()
