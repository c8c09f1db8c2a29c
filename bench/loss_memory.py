"""Peak memory and time of the training loss alone: full logits vs the chunked loss.

One forward + backward of the loss over 4,096 trained tokens through a SmolLM2-135M-sized head
(hidden 576, vocabulary 49,152, tied to the embeddings, so frozen under LoRA), on CPU:

- `full_logits`: the previous path: the head's logits at the kept positions, then
  `F.cross_entropy` (what `FINETUNE_LOSS=full_logits` still runs);
- `chunked`: `linear_cross_entropy`, 128 MiB of fp32 logits per chunk (682 tokens here).

Each measurement runs in its own process, the two paths alternating; the peak is the rise of
the process's peak RSS (VmHWM, reset through /proc/self/clear_refs once the inputs exist) over
its RSS at that point. Wall and CPU time (all threads) of that forward + backward; on a shared
machine the CPU time is the steadier of the two. Prints a markdown table of medians.

    .venv/bin/python bench/loss_memory.py [--rounds 3] [--dtype fp32|bf16] [--train-head]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys

TOKENS, HIDDEN, VOCAB = 4096, 576, 49152
PATHS = ("full_logits", "chunked")

CHILD = """
import json, re, sys, time
import torch
import torch.nn.functional as F
from finetune.train.linear_cross_entropy import chunk_tokens_for, linear_cross_entropy

path, dtype, train_head = sys.argv[1], getattr(torch, sys.argv[2]), sys.argv[3] == "1"
tokens, hidden_size, vocab = (int(a) for a in sys.argv[4:7])
torch.manual_seed(0)
hidden = torch.randn(tokens, hidden_size, dtype=dtype).requires_grad_()
weight = (torch.randn(vocab, hidden_size) * 0.02).to(dtype).requires_grad_(train_head)
targets = torch.randint(0, vocab, (tokens,))

def status(key):
    return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024

open("/proc/self/clear_refs", "w").write("5")  # peak RSS := current RSS
start_rss = status("VmRSS")
start, start_cpu = time.perf_counter(), time.process_time()
if path == "full_logits":
    logits = F.linear(hidden, weight)
    loss = F.cross_entropy(logits.float(), targets, reduction="sum") / tokens
    del logits
else:
    loss = linear_cross_entropy(hidden, weight, targets) / tokens
loss.backward()
seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
print(json.dumps({
    "peak_bytes": status("VmHWM") - start_rss,
    "seconds": seconds,
    "cpu_seconds": cpu_seconds,
    "loss": loss.item(),
    "chunk_tokens": chunk_tokens_for(vocab),
}))
"""


def measure(path: str, dtype: str, train_head: bool) -> dict:
    command = [sys.executable, "-c", CHILD, path, dtype, str(int(train_head))]
    command += [str(TOKENS), str(HIDDEN), str(VOCAB)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--train-head", action="store_true", help="the head weight needs a grad")
    parser.add_argument("--markdown", action="store_true", help="(the report is markdown anyway)")
    args = parser.parse_args()
    dtype = {"fp32": "float32", "bf16": "bfloat16"}[args.dtype]
    load = os.getloadavg()[0]

    runs: dict[str, list[dict]] = {path: [] for path in PATHS}
    for _ in range(args.rounds):
        for path in PATHS:  # alternating: drift on a shared machine hits both paths alike
            runs[path].append(measure(path, dtype, args.train_head))
    losses = {path: runs[path][0]["loss"] for path in PATHS}

    print("## Loss memory (`bench/loss_memory.py`)")
    print()
    print(
        f"The loss alone, one forward + backward: {TOKENS} trained tokens through a head of "
        f"hidden {HIDDEN} x vocabulary {VOCAB} (SmolLM2-135M, tied), {args.dtype}, head "
        f"{'trained' if args.train_head else 'frozen (LoRA)'}; chunked: "
        f"{runs['chunked'][0]['chunk_tokens']} tokens per chunk. One process per measurement, "
        f"{args.rounds} alternating rounds, medians; {platform.machine()}, {os.cpu_count()} "
        f"cores, load average {load:.1f} at the start."
    )
    print()
    print("| loss path | peak RSS rise | wall time | CPU time |")
    print("|---|---:|---:|---:|")
    for path in PATHS:
        peak = statistics.median(r["peak_bytes"] for r in runs[path]) / 2**20
        seconds = statistics.median(r["seconds"] for r in runs[path])
        cpu = statistics.median(r["cpu_seconds"] for r in runs[path])
        print(f"| {path} | {peak:,.0f} MiB | {seconds:.2f} s | {cpu:.2f} s |")
    print()
    print(
        f"Losses on the same inputs: full_logits {losses['full_logits']:.6f}, chunked "
        f"{losses['chunked']:.6f}."
    )


if __name__ == "__main__":
    main()
