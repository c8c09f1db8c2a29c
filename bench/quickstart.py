"""The quickstart, timed: `finetune train`, `merge`, `export --quant q8_0` and `eval` (base vs the
merged model on the held-out questions, the merge and the GGUF checked) on
examples/configs/quickstart.yaml, run from the repository root as `make quickstart` runs them
(setup excluded: on a fresh machine it adds the install and the one-time model conversion).

    python bench/quickstart.py [--markdown]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]
CONFIG = "examples/configs/quickstart.yaml"
RUN = ROOT / "outputs" / "quickstart"
GGUF = "outputs/quickstart/export/quickstart-q8_0.gguf"
FINETUNE = ["-m", "finetune"]
STEPS = {
    "train": [*FINETUNE, "train", CONFIG, "--force"],
    "merge": [*FINETUNE, "merge", CONFIG, "--force"],
    "export": [*FINETUNE, "export", CONFIG, "--format", "gguf", "--quant", "q8_0", "--force"],
    "eval": [
        *FINETUNE,
        "eval",
        CONFIG,
        "--data",
        "data/samples/quickstart_heldout.jsonl",
        "--merged",
        "--gguf",
        GGUF,
        "--show",
        "3",
    ],
}


def run() -> dict:
    seconds = {}
    for name, args in STEPS.items():
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, check=True
        )
        seconds[name] = round(time.perf_counter() - start, 1)
    saved = json.loads((RUN / "eval.json").read_text())
    base, tuned = saved["base"], saved["finetuned"]
    gguf = saved["gguf_agreement"]
    scores = {
        "base_loss": round(base["loss"], 3),
        "tuned_loss": round(tuned["loss"], 3),
        "base_contains": round(100 * base["contains"]),
        "tuned_contains": round(100 * tuned["contains"]),
        "base_exact": round(100 * base["exact_match"]),
        "tuned_exact": round(100 * tuned["exact_match"]),
        "merged_ok": saved["merged_agreement"]["ok"],
        "gguf_same": f"{gguf['same_answers']}/{gguf['answers']}",
    }
    return {"seconds": seconds, "total_s": round(sum(seconds.values()), 1), "scores": scores}


def markdown(r: dict) -> str:
    s, t = r["scores"], r["seconds"]
    return (
        "## Quickstart (`bench/quickstart.py`)\n\n"
        "`make quickstart` after setup: SmolLM2-135M-Instruct, 32 facts x 4 phrasings, LoRA r16, "
        "packed, 4 epochs; then merge, a q8_0 GGUF export and `finetune eval` on the 64 held-out "
        "questions (base vs merged; the merge and the GGUF checked).\n\n"
        "| train | merge | export | eval | total | held-out loss (base -> fine-tuned) | "
        "contains the answer | exact match | merge ok | GGUF = merged |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
        f"| {t['train']} s | {t['merge']} s | {t['export']} s | {t['eval']} s | "
        f"{r['total_s']} s | {s['base_loss']} -> {s['tuned_loss']} | "
        f"{s['base_contains']}% -> {s['tuned_contains']}% | {s['base_exact']}% -> "
        f"{s['tuned_exact']}% | {'yes' if s['merged_ok'] else 'NO'} | {s['gguf_same']} |\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    result = run()
    print(markdown(result) if args.markdown else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
