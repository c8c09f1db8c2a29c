"""The quickstart, timed: `finetune train`, `finetune merge` and the before/after scorecard on
examples/configs/quickstart.yaml, run from the repository root as `make quickstart` runs them
(setup excluded: on a fresh machine it adds the install and the one-time model conversion).

    python bench/quickstart.py [--markdown]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]
CONFIG = "examples/configs/quickstart.yaml"
STEPS = {
    "train": ["-m", "finetune", "train", CONFIG, "--force"],
    "merge": ["-m", "finetune", "merge", CONFIG, "--force"],
    "scorecard": [
        "tools/quickstart_scorecard.py",
        CONFIG,
        "--trained",
        "data/samples/quickstart_facts.jsonl",
    ],
}


def run() -> dict:
    seconds, output = {}, ""
    for name, args in STEPS.items():
        start = time.perf_counter()
        result = subprocess.run(
            [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, check=True
        )
        seconds[name] = round(time.perf_counter() - start, 1)
        output = result.stdout
    scores = {
        key: int(re.search(pattern + r"\s+(\d+)%", output).group(1))
        for key, pattern in (
            ("trained", r"trained questions answered correctly \(fine-tuned\):"),
            ("base_heldout", r"held-out questions, base model:"),
            ("tuned_heldout", r"held-out questions, fine-tuned:"),
            ("merged_agrees", r"merged model gives the adapter's greedy answer:"),
        )
    }
    return {"seconds": seconds, "total_s": round(sum(seconds.values()), 1), "scores": scores}


def markdown(r: dict) -> str:
    s, t = r["scores"], r["seconds"]
    return (
        "## Quickstart (`bench/quickstart.py`)\n\n"
        "`make quickstart` after setup: SmolLM2-135M-Instruct, 32 facts x 4 phrasings, LoRA r16, "
        "packed, 4 epochs; greedy answers scored by whether they contain the fact.\n\n"
        "| train | merge | scorecard | total | trained Qs right | held-out right (base -> "
        "fine-tuned) | merged = adapter |\n| --- | --- | --- | --- | --- | --- | --- |\n"
        f"| {t['train']} s | {t['merge']} s | {t['scorecard']} s | {r['total_s']} s | "
        f"{s['trained']}% | {s['base_heldout']}% -> {s['tuned_heldout']}% | "
        f"{s['merged_agrees']}% |\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    result = run()
    print(markdown(result) if args.markdown else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
