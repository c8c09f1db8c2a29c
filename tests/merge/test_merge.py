"""finetune.merge against peft's own forward pass, on tiny models built in-process.

Each adapter is made by peft on a tiny base and its weights perturbed (peft starts B at zero, so
an untouched adapter would merge to the base). The reference is that peft model's logits; the
merged checkpoint must reproduce them when loaded with plain transformers.
"""

from __future__ import annotations

import copy
import errno
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, GPT2Config, LlamaConfig

import finetune.merge.run
from finetune.dtypes import keep_4bit_layers_in_compute_dtype
from finetune.errors import FinetuneError
from finetune.merge import MergeError, merge_adapter

PROMPTS = torch.tensor([[1, 5, 9, 14, 3, 77, 100, 2], [7, 7, 7, 8, 20, 50, 90, 127]])
# fp32 merge vs unmerged peft forward: only the summation order differs.
LOGIT_TOLERANCE = 1e-4


def llama_config(layers: int = 2, hidden: int = 64, tie: bool = True) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=128,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )


def gpt2_config() -> GPT2Config:
    return GPT2Config(
        vocab_size=128,
        n_positions=64,
        n_embd=64,
        n_layer=2,
        n_head=4,
        bos_token_id=1,
        eos_token_id=2,
    )


def save_base(config, folder: Path, **save_kwargs) -> Path:
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder, **save_kwargs)
    return folder


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory) -> Path:
    """A 2-layer Llama whose lm_head is tied to embed_tokens (like SmolLM2)."""
    return save_base(llama_config(), tmp_path_factory.mktemp("llama") / "base")


@pytest.fixture(scope="module")
def gpt2_base(tmp_path_factory) -> Path:
    """GPT-2 stores its linear layers as Conv1D (in, out): peft needs fan_in_fan_out."""
    return save_base(gpt2_config(), tmp_path_factory.mktemp("gpt2") / "base")


def train_adapter(
    base: Path, lora: LoraConfig, folder: Path, vocab_size: int | None = None, quantized=None
) -> torch.Tensor:
    """Save a peft adapter with random non-zero updates; return that peft model's logits."""
    model = AutoModelForCausalLM.from_pretrained(
        base, dtype=torch.float32, quantization_config=quantized
    )
    if vocab_size:  # tokens were added before training
        model.resize_token_embeddings(vocab_size, mean_resizing=False)
    model = get_peft_model(model, copy.deepcopy(lora))  # peft fills in the config it is given
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:  # lora_A/B, DoRA magnitudes, modules_to_save copies
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    model.eval()
    # On CPUs with AVX512-BF16, bitsandbytes would run a 4-bit layer in eval mode through a bf16
    # kernel (~2e-3 off in these logits); the reference is the computation training does.
    keep_4bit_layers_in_compute_dtype(model)
    with torch.no_grad():
        logits = model(PROMPTS).logits
    model.save_pretrained(folder)
    return logits


def merged_logits(folder: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(PROMPTS).logits


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def quiet(_message: str) -> None:
    pass


ADAPTERS = {
    "lora": LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    "rslora": LoraConfig(r=8, lora_alpha=4, target_modules="all-linear", use_rslora=True),
    "rank-and-alpha-patterns": LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules="all-linear",
        rank_pattern={"self_attn.q_proj": 2},
        alpha_pattern={"down_proj": 3},
    ),
    "dora": LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True),
    # The base ties lm_head to embed_tokens; each of these changes one of them, so the merged
    # model must untie them.
    "embedding-lora": LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
    "lm_head-lora": LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"]),
    "embed_tokens-saved": LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["embed_tokens"]
    ),
    "ensure_weight_tying": LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "embed_tokens"],
        modules_to_save=["lm_head"],
        ensure_weight_tying=True,
    ),
    "dora-embedding": LoraConfig(
        r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], use_dora=True
    ),
}


@pytest.mark.parametrize("kind", ADAPTERS)
def test_merged_llama_matches_peft(kind, llama_base, tmp_path):
    expected = train_adapter(llama_base, ADAPTERS[kind], tmp_path / "adapter")

    merge_adapter(llama_base, tmp_path / "adapter", tmp_path / "merged", verify=False, log=quiet)

    assert max_diff(merged_logits(tmp_path / "merged"), expected) <= LOGIT_TOLERANCE


def test_added_tokens_with_modules_to_save(llama_base, tmp_path):
    """Resized, trained embed_tokens and lm_head replace the base's, and vocab_size follows."""
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        modules_to_save=["embed_tokens", "lm_head"],
    )
    expected = train_adapter(llama_base, lora, tmp_path / "adapter", vocab_size=136)

    report = merge_adapter(
        llama_base, tmp_path / "adapter", tmp_path / "merged", verify=False, log=quiet
    )

    assert max_diff(merged_logits(tmp_path / "merged"), expected) <= LOGIT_TOLERANCE
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["vocab_size"] == 136
    assert config["tie_word_embeddings"] is False  # peft trained two separate copies
    assert report.tensors_replaced == 2


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_fan_in_fan_out_gpt2_matches_peft(dora, gpt2_base, tmp_path):
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["c_attn", "c_proj", "c_fc"],
        fan_in_fan_out=True,
        use_dora=dora,
        lora_bias=not dora,  # peft merges lora_B.bias into the layer's bias
    )
    expected = train_adapter(gpt2_base, lora, tmp_path / "adapter")

    merge_adapter(gpt2_base, tmp_path / "adapter", tmp_path / "merged", verify=False, log=quiet)

    assert max_diff(merged_logits(tmp_path / "merged"), expected) <= LOGIT_TOLERANCE


def test_pickled_bin_base(tmp_path):
    """A .bin base (read with weights_only) whose tied tensors share storage."""
    model = AutoModelForCausalLM.from_config(llama_config())
    (tmp_path / "base").mkdir()
    model.config.save_pretrained(tmp_path / "base")
    torch.save(model.state_dict(), tmp_path / "base" / "pytorch_model.bin")
    model.save_pretrained(tmp_path / "reference-base")  # peft's side loads the same weights
    expected = train_adapter(tmp_path / "reference-base", ADAPTERS["lora"], tmp_path / "adapter")

    merge_adapter(
        tmp_path / "base", tmp_path / "adapter", tmp_path / "merged", verify=False, log=quiet
    )

    assert max_diff(merged_logits(tmp_path / "merged"), expected) <= LOGIT_TOLERANCE
    assert (tmp_path / "merged" / "generation_config.json").is_file()  # created: base had none


def test_bf16_output_of_an_fp32_base(llama_base, tmp_path):
    expected = train_adapter(llama_base, ADAPTERS["dora"], tmp_path / "adapter")

    report = merge_adapter(
        llama_base, tmp_path / "adapter", tmp_path / "merged", dtype="bf16", verify=True, log=quiet
    )

    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    with safe_open(tmp_path / "merged" / "model.safetensors", framework="pt") as f:
        assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"BF16"}  # noqa: SIM118
    # Measured 1.8e-3 (every weight rounded to bf16 once), logits of magnitude ~1.3.
    assert max_diff(merged_logits(tmp_path / "merged"), expected) <= 1e-2
    assert report.max_abs_logit_diff <= 1e-2


LOAD_WITHOUT_PEFT = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
    with torch.no_grad():
        torch.save(model(torch.tensor(eval(sys.argv[2]))).logits, sys.argv[3])
    assert "peft" not in sys.modules, "loading the merged model imported peft"
    """
)


def test_sharded_base_merges_into_loadable_shards(tmp_path):
    base = save_base(llama_config(), tmp_path / "base", max_shard_size="100KB")
    assert len(list(base.glob("*.safetensors"))) > 2
    expected = train_adapter(base, ADAPTERS["dora"], tmp_path / "adapter")
    (tmp_path / "adapter" / "chat_template.jinja").write_text("{{ messages }}")

    report = merge_adapter(
        base, tmp_path / "adapter", tmp_path / "merged", max_shard_size="60KB", log=quiet
    )

    merged = tmp_path / "merged"
    index = json.loads((merged / "model.safetensors.index.json").read_text())
    tensor_bytes = 0
    for shard in sorted(merged.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                assert index["weight_map"][name] == shard.name
                tensor = f.get_tensor(name)
                tensor_bytes += tensor.numel() * tensor.element_size()
    assert index["metadata"]["total_size"] == tensor_bytes == report.total_size
    assert len(set(index["weight_map"].values())) == report.shards > 2
    assert (merged / "generation_config.json").is_file()
    assert (merged / "chat_template.jinja").read_text() == "{{ messages }}"
    assert report.max_abs_logit_diff is not None and report.max_abs_logit_diff <= LOGIT_TOLERANCE
    assert report.greedy_agreement == 1.0

    logits_file = tmp_path / "logits.pt"
    subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_PEFT, str(merged), str(PROMPTS.tolist()), logits_file],
        check=True,
    )
    assert max_diff(torch.load(logits_file), expected) <= LOGIT_TOLERANCE


# Quantized during training: Llama's 7 linear layers per block, GPT-2's 4 Conv1D layers per block
# (transposed to (out, in) first); never embeddings, lm_head or norms.
QLORA_CASES = {
    "llama": (
        llama_config(tie=False),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
        14,
    ),
    "gpt2-conv1d": (
        gpt2_config(),
        LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
        8,
    ),
}


@pytest.mark.parametrize("model", QLORA_CASES)
def test_qlora_nf4_roundtrip_reproduces_the_4bit_training_model(model, tmp_path):
    config, lora, quantized_weights = QLORA_CASES[model]
    base = save_base(config, tmp_path / "base")
    four_bit = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    expected = train_adapter(base, lora, tmp_path / "adapter", quantized=four_bit)

    report = merge_adapter(
        base,
        tmp_path / "adapter",
        tmp_path / "roundtrip",
        nf4_roundtrip=True,
        nf4_compute_dtype="fp32",
        nf4_double_quant=True,
        verify=False,
        log=quiet,
    )
    merge_adapter(base, tmp_path / "adapter", tmp_path / "plain", verify=False, log=quiet)

    assert report.tensors_nf4_roundtripped == quantized_weights
    with_roundtrip = max_diff(merged_logits(tmp_path / "roundtrip"), expected)
    without = max_diff(merged_logits(tmp_path / "plain"), expected)
    # Measured (both models): ~2e-7 with the round trip (fp32 summation order: the 4-bit layer
    # dequantizes and runs F.linear), ~0.066 without it (the nf4 error the adapter trained on).
    assert with_roundtrip <= LOGIT_TOLERANCE
    assert without > 100 * with_roundtrip
    config = json.loads((tmp_path / "roundtrip" / "config.json").read_text())
    assert "quantization_config" not in config


# ------------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def llama_adapter(llama_base, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("adapter") / "adapter"
    train_adapter(llama_base, ADAPTERS["lora"], folder)
    return folder


def test_refuses_non_empty_target_unless_forced(llama_base, llama_adapter, tmp_path):
    target = tmp_path / "merged"
    target.mkdir()
    (target / "notes.txt").write_text("mine")

    with pytest.raises(MergeError, match=f"{target}: folder is not empty"):
        merge_adapter(llama_base, llama_adapter, target, verify=False, log=quiet)
    assert (target / "notes.txt").read_text() == "mine"

    merge_adapter(llama_base, llama_adapter, target, force=True, verify=False, log=quiet)
    assert not (target / "notes.txt").exists()
    assert (target / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no staging left behind


def test_refuses_missing_adapter(llama_base, llama_adapter, tmp_path):
    assert issubclass(MergeError, FinetuneError)
    with pytest.raises(MergeError, match=f"{tmp_path / 'nowhere'}: adapter folder not found"):
        merge_adapter(llama_base, tmp_path / "nowhere", tmp_path / "merged", log=quiet)

    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "adapter_config.json").write_text(
        (llama_adapter / "adapter_config.json").read_text()
    )
    with pytest.raises(MergeError, match="has no adapter_model.safetensors"):
        merge_adapter(llama_base, config_only, tmp_path / "merged", log=quiet)
    assert not (tmp_path / "merged").exists()


def test_refuses_adapter_for_a_different_base(llama_adapter, tmp_path):
    one_layer = save_base(llama_config(layers=1), tmp_path / "one-layer")
    with pytest.raises(MergeError, match=r"'model\.layers\.1\..*different base model"):
        merge_adapter(one_layer, llama_adapter, tmp_path / "merged", log=quiet)

    narrower = save_base(llama_config(hidden=32), tmp_path / "narrower")
    with pytest.raises(
        MergeError, match=r"update of model\.layers\.0\..* has shape .*different base"
    ):
        merge_adapter(narrower, llama_adapter, tmp_path / "merged", log=quiet)
    assert not (tmp_path / "merged").exists()


def test_refuses_rank_that_disagrees_with_adapter_config(llama_base, llama_adapter, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(
        (llama_adapter / "adapter_model.safetensors").read_bytes()
    )
    config = json.loads((llama_adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))

    with pytest.raises(MergeError, match=r"model\.layers\.0\.\S+ has rank 4/4 .* says r=8"):
        merge_adapter(llama_base, adapter, tmp_path / "merged", log=quiet)


@pytest.mark.parametrize("existing", [False, True], ids=["new-target", "forced-over-old"])
def test_interrupted_merge_leaves_nothing_complete(existing, llama_adapter, tmp_path, monkeypatch):
    base = save_base(llama_config(), tmp_path / "base", max_shard_size="100KB")
    target = tmp_path / "merged"
    if existing:
        target.mkdir()
        (target / "model.safetensors").write_text("the previous merge")
    written = []

    def disk_fills_on_second_shard(tensors, filename, metadata=None):
        if written:
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        written.append(filename)
        real_save_file(tensors, filename, metadata=metadata)

    real_save_file = finetune.merge.run.save_file
    monkeypatch.setattr(finetune.merge.run, "save_file", disk_fills_on_second_shard)

    with pytest.raises(OSError, match="No space left"):
        merge_adapter(base, llama_adapter, target, force=True, verify=False, log=quiet)

    assert len(written) == 1  # the first shard was written before the failure
    assert not written[0].exists()  # ... and removed with its staging folder
    if existing:
        assert (target / "model.safetensors").read_text() == "the previous merge"
    else:
        assert not target.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"] + (["merged"] if existing else [])
