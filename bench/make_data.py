"""Seeded synthetic datasets for the benchmarks: alpaca rows and chat conversations whose
lengths follow a log-normal spread, like real instruction data.

    python bench/make_data.py --kind alpaca --rows 20000 --mean-tokens 200 --out /tmp/alpaca.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at "
    "which but have an they you were her she there been one all we their has would when if "
    "so no will can more about out up into do any then could time these two may first some "
    "other what its only new now such like model data train loss token layer weight learning "
    "rate batch memory speed river mountain harbor lantern copper orchard festival museum "
    "violin comet glacier meadow compass"
).split()


def _words(rng: np.random.Generator, count: int) -> str:
    return " ".join(rng.choice(WORDS, size=max(1, count)).tolist())


def _lengths(rng: np.random.Generator, rows: int, mean_tokens: float, sigma: float = 0.6):
    # A log-normal with the requested mean: mu = ln(mean) - sigma^2 / 2.
    mu = math.log(mean_tokens) - sigma**2 / 2
    return np.clip(rng.lognormal(mu, sigma, size=rows), 8, 20 * mean_tokens).astype(int)


def alpaca_rows(rows: int, mean_tokens: float, seed: int = 0) -> list[dict]:
    """Instruction rows; about 30% of the words are prompt, 70% response, a third with input."""
    rng = np.random.default_rng(seed)
    out = []
    for total in _lengths(rng, rows, mean_tokens):
        # The Alpaca template adds ~40 tokens; a word is ~1 token (calibrated on SmolLM2's).
        words = max(4, int((total - 40) / 1.0))
        prompt = max(2, int(words * 0.3))
        has_input = rng.random() < 0.33
        out.append(
            {
                "instruction": _words(rng, prompt // 2 if has_input else prompt),
                "input": _words(rng, prompt - prompt // 2) if has_input else "",
                "output": _words(rng, words - prompt),
            }
        )
    return out


def chat_rows(rows: int, mean_tokens: float, seed: int = 0) -> list[dict]:
    """Conversations of 1-4 user/assistant exchanges, some with a system message."""
    rng = np.random.default_rng(seed)
    out = []
    for total in _lengths(rng, rows, mean_tokens):
        turns = int(rng.integers(1, 5))
        words = max(4 * turns, int(total / 1.3))
        per_turn = words // (2 * turns)
        messages = []
        if rng.random() < 0.3:
            messages.append({"role": "system", "content": _words(rng, 8)})
        for _ in range(turns):
            messages.append({"role": "user", "content": _words(rng, max(1, per_turn // 2))})
            messages.append({"role": "assistant", "content": _words(rng, per_turn * 3 // 2)})
        out.append({"messages": messages})
    return out


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=["alpaca", "chat"], default="alpaca")
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--mean-tokens", type=float, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    make = alpaca_rows if args.kind == "alpaca" else chat_rows
    write_jsonl(make(args.rows, args.mean_tokens, args.seed), args.out)
    print(f"wrote {args.rows} {args.kind} rows to {args.out}")


if __name__ == "__main__":
    main()
