"""Preprocessing speed: 20,000 Alpaca rows of ~200 tokens, end to end through the CLI.

Wall time includes start-up (imports, tokenizer load), reading, formatting, tokenizing,
masking and writing the cache, as a user would see it. Target on the 2-core CPU machine: < 12 s.

    python bench/preprocess.py [--rows 20000] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from make_data import alpaca_rows, write_jsonl  # noqa: E402

from finetune.model.default_model import ensure_default_model  # noqa: E402


def run(rows: int, runs: int = 3) -> dict:
    model = ensure_default_model()
    with tempfile.TemporaryDirectory() as tmp:
        data = write_jsonl(alpaca_rows(rows, 200, seed=0), Path(tmp) / "alpaca.jsonl")
        config = Path(tmp) / "config.yaml"
        times = []
        for attempt in range(runs):
            prepared = Path(tmp) / f"prepared-{attempt}"  # a fresh cache every run
            config.write_text(
                f"base_model: {model}\ndatasets:\n  - path: {data}\n    type: alpaca\n"
                f"sequence_len: 2048\ndataset_prepared_path: {prepared}\n"
            )
            start = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "finetune", "preprocess", str(config)],
                check=True,
                capture_output=True,
            )
            times.append(time.perf_counter() - start)
        summary = json.loads(next(prepared.glob("*/summary.json")).read_text())
    tokens = summary["train"]["tokens"]
    best = min(times)
    return {
        "rows": rows,
        "tokens": tokens,
        "wall_s": [round(t, 2) for t in times],
        "best_s": round(best, 2),
        "tokens_per_s": round(tokens / best),
    }


def markdown(result: dict) -> str:
    return (
        "## Preprocessing (`bench/preprocess.py`)\n\n"
        f"{result['rows']} Alpaca rows, {result['tokens']} tokens (SmolLM2 tokenizer), "
        "`finetune preprocess` end to end with a fresh cache, wall time including start-up.\n\n"
        "| runs (s) | best (s) | tokens/s (best) |\n| --- | --- | --- |\n"
        f"| {', '.join(map(str, result['wall_s']))} | {result['best_s']} | "
        f"{result['tokens_per_s']:,} |\n\n"
        "No competitor figure here: Axolotl's preprocess time is to be measured in the same run "
        "(`make bench-peers`, not built yet), never typed in.\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    result = run(args.rows, args.runs)
    print(markdown(result) if args.markdown else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
