"""Does `torch.compile` pay for a LoRA run on this machine? (issue 17: "measure; keep it only if
it pays"). Axolotl's `torch_compile: true` sets the HF Trainer's `torch_compile`, which compiles
the model (inductor) when training starts; this runs finetune's own training path twice in
fresh processes, once as it is and once with that one argument set, alternating, and reports
each run's whole-process wall time, its first step (where compiling happens) and its later
steps. The run: bench/peers.py's one-epoch config (150 Alpaca rows, SmolLM2-135M, LoRA r16 on
all linear layers, sequence_len 1024, micro_batch_size 4, packed), data prepared beforehand.

    python bench/torch_compile.py [--rounds 1] [--precision fp32|auto] [--markdown]
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

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from make_data import alpaca_rows, write_jsonl  # noqa: E402
from peers import OFFLINE, config  # noqa: E402

# Runs in a fresh process: finetune's train() with a step clock, TrainingArguments as finetune
# makes them, plus torch_compile=True when asked.
CHILD = """
import dataclasses, json, sys, time
import finetune.train.run as run
from finetune.config.load import load_config
from transformers import TrainerCallback

compiled = sys.argv[2] == "compiled"
if compiled:
    made = run.training_arguments
    def training_arguments(*args, **kwargs):  # __post_init__ must see it: replace, not set
        return dataclasses.replace(made(*args, **kwargs), torch_compile=True)
    run.training_arguments = training_arguments

steps = []
class Clock(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()
    def on_step_end(self, args, state, control, **kwargs):
        steps.append(time.perf_counter() - self.started)

result = run.train(load_config(sys.argv[1]).config, force=True, log=lambda m: None,
                   callbacks=[Clock()])
from torch._dynamo.utils import counters
graphs = counters["stats"]["unique_graphs"]
print(json.dumps({"steps": steps, "loss": result.final_loss, "graphs": graphs}))
"""


def one_run(cfg: Path, mode: str) -> dict:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(cfg), mode],
        capture_output=True,
        text=True,
        env={**os.environ, **OFFLINE},
        timeout=3600,
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{mode} run failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"seconds": seconds, **result}


def main() -> None:
    from finetune.model.default_model import ensure_default_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--precision", choices=("fp32", "auto"), default="fp32")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    model = ensure_default_model()
    runs: dict[str, list[dict]] = {"eager": [], "compiled": []}
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        data = write_jsonl(alpaca_rows(150, 200, seed=1), scratch / "epoch.jsonl")
        keys = {"bf16": "auto"} if args.precision == "auto" else {}
        cfg = config(scratch / "epoch.yaml", model, data, scratch / "work", **keys)
        prepared = subprocess.run(
            [sys.executable, "-m", "finetune", "preprocess", str(cfg)],
            capture_output=True,
            text=True,
            env={**os.environ, **OFFLINE},
        )
        if prepared.returncode != 0:
            raise RuntimeError(prepared.stderr[-3000:])
        for attempt in range(args.rounds):
            order = ("eager", "compiled") if attempt % 2 == 0 else ("compiled", "eager")
            for mode in order:
                result = one_run(cfg, mode)
                runs[mode].append(result)
                print(
                    f"{mode}: {result['seconds']:.1f} s, first step {result['steps'][0]:.1f} s, "
                    f"later steps {statistics.median(result['steps'][1:]):.1f} s, "
                    f"loss {result['loss']:.4f}, graphs compiled {result['graphs']}",
                    file=sys.stderr,
                    flush=True,
                )
    if not args.markdown:
        print(json.dumps(runs, indent=2))
        return
    lines = [
        "| run | wall time (s) | first step (s) | later steps, median (s) | final loss | graphs |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for mode, results in runs.items():
        for r in results:
            later = statistics.median(r["steps"][1:])
            lines.append(
                f"| {mode} | {r['seconds']:.0f} | {r['steps'][0]:.1f} | {later:.1f} | "
                f"{r['loss']:.4f} | {r['graphs']} |"
            )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
