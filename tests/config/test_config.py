"""The config schema and its loading: every check names its key and says what to do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from finetune.config import FinetuneConfig, load_config
from finetune.config.load import parse_overrides
from finetune.config.paths import BUNDLED_DEEPSPEED
from finetune.errors import ConfigError
from finetune.machine import resolve_for_machine

FIXTURES = Path(__file__).parents[1] / "fixtures"
EXAMPLES = Path(__file__).parents[2] / "examples" / "configs"

MINIMAL = {
    "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "datasets": [{"path": "data.jsonl", "type": "alpaca"}],
}


def write(tmp_path: Path, config: dict | str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    return path


def problems_of(tmp_path: Path, changes: dict, overrides: list[str] | None = None) -> dict:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, {**MINIMAL, **changes}), overrides)
    return dict(caught.value.problems)


def test_minimal_config_fills_defaults(tmp_path):
    config = load_config(write(tmp_path, MINIMAL)).config
    assert config.lora_r == 8
    assert config.attn_implementation == "sdpa"
    assert config.eval_sample_packing is False
    assert config.datasets[0].roles_to_train == ["assistant"]


# Each row: the change to a valid config, the key the error must name, words it must contain.
CHECKS = [
    ({"adapter": "qlora"}, "adapter", "load_in_4bit: true"),
    (
        {"adapter": "lora", "load_in_4bit": True, "load_in_8bit": True},
        "load_in_8bit",
        "exclusive",
    ),
    ({"load_in_4bit": True}, "load_in_4bit", "set `adapter: lora`"),
    ({"load_in_8bit": True}, "load_in_8bit", "set `adapter: lora`"),
    ({"bf16": True, "fp16": True}, "fp16", "exclusive"),
    ({"warmup_steps": 10, "warmup_ratio": 0.1}, "warmup_ratio", "exclusive"),
    ({"save_steps": 10, "saves_per_epoch": 2}, "saves_per_epoch", "exclusive"),
    ({"val_set_size": 0.1, "eval_steps": 10, "evals_per_epoch": 2}, "evals_per_epoch", "exclusive"),
    (
        {"deepspeed": {"zero_optimization": {"stage": 2}}, "fsdp": ["full_shard"]},
        "fsdp",
        "exclusive",
    ),
    ({"early_stopping_patience": 3}, "early_stopping_patience", "nothing to evaluate"),
    ({"lora_target_modules": ["q_proj", "(unclosed"]}, "lora_target_modules", "'(unclosed'"),
    ({"lora_r": 0}, "lora_r", "greater than 0"),
    ({"lora_dropout": 1.0}, "lora_dropout", "less than 1"),
    ({"lora_dropout": -0.1}, "lora_dropout", "greater than or equal to 0"),
    ({"learning_rate": -1e-4}, "learning_rate", "greater than or equal to 0"),
    ({"sequence_len": 8}, "sequence_len", "greater than or equal to 16"),
    ({"deepspeed": "no/such/zero2.json"}, "deepspeed", "no/such/zero2.json not found"),
    ({"datasets": []}, "datasets", "add at least one entry"),
    ({"datasets": [{"type": "alpaca"}]}, "datasets[0].path", "required"),
    ({"datasets": [{"path": "x.jsonl"}]}, "datasets[0].type", "required"),
    ({"datasets": [{"path": "x.jsonl", "type": "alpaka"}]}, "datasets[0].type", "chat_template"),
    ({"optimizer": "adamw_fancy"}, "optimizer", "adamw_torch_fused"),
    ({"lr_scheduler": "cosinus"}, "lr_scheduler", "cosine"),
    ({"micro_batch_size": "two"}, "micro_batch_size", "integer"),
    ({"bf16": "maybe"}, "bf16", "'auto'"),
    ({"flash_attention": True, "attn_implementation": "eager"}, "attn_implementation", "keep only"),
]


@pytest.mark.parametrize(("changes", "key", "words"), CHECKS, ids=[c[1] for c in CHECKS])
def test_each_check_names_its_key(tmp_path, changes, key, words):
    problems = problems_of(tmp_path, changes)
    assert key in problems, problems
    assert words in problems[key]


def test_learning_rate_zero_is_allowed(tmp_path):
    assert load_config(write(tmp_path, {**MINIMAL, "learning_rate": 0})).config.learning_rate == 0


def test_every_problem_is_reported_at_once(tmp_path):
    problems = problems_of(
        tmp_path, {"lora_r": 0, "lora_alhpa": 8, "optimizer": "nope", "sequence_len": 1}
    )
    assert {"lora_r", "lora_alhpa", "optimizer", "sequence_len"} <= set(problems)


def test_every_combination_problem_is_reported_at_once(tmp_path):
    problems = problems_of(
        tmp_path,
        {"adapter": "qlora", "warmup_steps": 1, "warmup_ratio": 0.1, "early_stopping_patience": 2},
    )
    assert {"adapter", "warmup_ratio", "early_stopping_patience"} <= set(problems)


def test_error_lines_are_file_key_message(tmp_path):
    path = write(tmp_path, {**MINIMAL, "lora_r": 0})
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}: lora_r: should be greater than 0 (got 0)"


def test_misspelled_key_suggests_the_real_one(tmp_path):
    problems = problems_of(tmp_path, {"lora_alhpa": 32})
    assert problems == {"lora_alhpa": "unknown key; did you mean 'lora_alpha'?"}


def test_misspelled_dataset_key_suggests_the_real_one(tmp_path):
    datasets = [{"path": "x.jsonl", "type": "chat_template", "feild_messages": "conversations"}]
    problems = problems_of(tmp_path, {"datasets": datasets})
    assert problems == {"datasets[0].feild_messages": "unknown key; did you mean 'field_messages'?"}


def test_unknown_key_without_close_match(tmp_path):
    assert problems_of(tmp_path, {"zzz_qqq": 1}) == {"zzz_qqq": "unknown key"}


def test_unimplemented_axolotl_keys_are_one_warning(tmp_path):
    config = {**MINIMAL, "neftune_noise_alpha": 5, "torch_empty_cache_steps": 8}
    config["unsloth_rope"] = None
    config["datasets"] = [{**MINIMAL["datasets"][0], "shards": 4}]
    loaded = load_config(write(tmp_path, config))
    assert len(loaded.warnings) == 1
    assert "neftune_noise_alpha" in loaded.warnings[0]
    assert "torch_empty_cache_steps" in loaded.warnings[0]
    assert "datasets[0].shards" in loaded.warnings[0]
    assert "unsloth_rope" not in loaded.warnings[0]  # left empty: asks for nothing


def test_axolotl_internal_keys_are_accepted_quietly(tmp_path):
    config = {**MINIMAL, "strict": False, "tokenizer_type": "AutoTokenizer"}
    config["model_type"] = "AutoModelForCausalLM"
    assert load_config(write(tmp_path, config)).warnings == []


@pytest.mark.parametrize("name", ["axolotl_lora_8b.yml", "axolotl_qlora_1b.yml"])
def test_axolotl_documented_examples_validate(name):
    loaded = load_config(FIXTURES / name)
    assert len(loaded.warnings) <= 1
    assert loaded.config.adapter in ("lora", "qlora")


def test_axolotl_empty_values_mean_default():
    import torch

    config = load_config(FIXTURES / "axolotl_lora_8b.yml").config
    assert config.attn_implementation == "flash_attention_2"  # from `flash_attention: true`
    assert config.dataset_prepared_path == "last_run_prepared"  # `dataset_prepared_path:` empty
    assert config.fp16 is None  # `fp16:` empty: decided for the machine
    resolved = resolve_for_machine(config)
    assert resolved.fp16 is (torch.cuda.is_available() and not resolved.bf16)


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_validate_without_warnings(path):
    assert load_config(path).warnings == []


def test_yaml_syntax_error_names_line_and_column(tmp_path):
    path = write(tmp_path, "base_model: x\ndatasets:\n  - path: a\n   type: alpaca\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"{path}: line 4, column 4: invalid YAML")


def test_duplicate_key_is_an_error(tmp_path):
    path = write(tmp_path, "base_model: x\nlora_r: 8\nlora_r: 16\n")
    with pytest.raises(ConfigError, match="'lora_r' appears twice \\(lines 2 and 3\\)"):
        load_config(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: file: not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="file: is empty"):
        load_config(write(tmp_path, ""))
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_python_objects_in_yaml_are_refused(tmp_path):
    path = write(tmp_path, "base_model: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(path)


def test_deepspeed_file_and_inline_mapping(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    own = tmp_path / "my_zero2.json"
    own.write_text('{"zero_optimization": {"stage": 2}}')
    config = load_config(write(tmp_path, {**MINIMAL, "deepspeed": "my_zero2.json"}))
    assert config.config.deepspeed == str(own)
    inline = {"zero_optimization": {"stage": 3}}
    assert load_config(write(tmp_path, {**MINIMAL, "deepspeed": inline})).config.deepspeed == inline


def test_deepspeed_bad_json_names_the_file(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text('{"zero_optimization": {"stage": 2,}}')
    problems = problems_of(tmp_path, {"deepspeed": str(bad)})
    assert problems["deepspeed"].startswith(f"{bad} is not valid JSON (line 1, column 35")


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3", "zero3_offload"])
def test_shipped_deepspeed_configs_are_json(name):
    ds = json.loads((BUNDLED_DEEPSPEED / f"{name}.json").read_text())
    assert ds["train_micro_batch_size_per_gpu"] == "auto"


# --- command-line overrides --------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--learning-rate", "1e-4"], {"learning_rate": "1e-4"}),
        (["--learning_rate=1e-4"], {"learning_rate": "1e-4"}),
        (["--max-steps", "10"], {"max_steps": 10}),
        (["--sample-packing"], {"sample_packing": True}),
        (["--no-sample-packing"], {"sample_packing": False}),
        (["--sample-packing=false"], {"sample_packing": False}),
        (["--sample-packing", "--max-steps=3"], {"sample_packing": True, "max_steps": 3}),
        (
            ["--lora-target-modules", "[q_proj, v_proj]"],
            {"lora_target_modules": ["q_proj", "v_proj"]},
        ),
        (["--learning-rate", "-1"], {"learning_rate": -1}),
    ],
)
def test_override_syntax(args, expected):
    assert parse_overrides(args) == expected


def test_overrides_replace_file_values(tmp_path):
    path = write(tmp_path, {**MINIMAL, "learning_rate": 3e-4, "sample_packing": True})
    config = load_config(
        path, ["--learning-rate", "1e-4", "--no-sample-packing", "--max-steps=10"]
    ).config
    assert (config.learning_rate, config.sample_packing, config.max_steps) == (1e-4, False, 10)


def test_overrides_are_validated_like_the_file(tmp_path):
    problems = problems_of(tmp_path, {}, ["--lora-r", "0", "--adapter", "qlora"])
    assert "lora_r" in problems
    assert "adapter" in problems


def test_misspelled_override_suggests_the_option(tmp_path):
    problems = problems_of(tmp_path, {}, ["--lora-alhpa", "16"])
    assert problems == {"--lora-alhpa": "unknown option; did you mean --lora-alpha?"}


def test_stray_argument_is_an_error():
    with pytest.raises(ConfigError, match="unexpected argument"):
        parse_overrides(["extra.yaml"])


# --- resolution for this machine ---------------------------------------------------------


def test_bf16_auto_resolves_to_a_boolean(tmp_path):
    import torch

    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    config = resolve_for_machine(load_config(write(tmp_path, MINIMAL)).config)
    assert config.bf16 is (torch.cuda.is_bf16_supported() if torch.cuda.is_available() else native)


def test_bf16_auto_yields_to_fp16(tmp_path):
    config = load_config(write(tmp_path, {**MINIMAL, "fp16": True})).config
    assert resolve_for_machine(config).bf16 is False


def test_json_schema_has_every_key_with_a_description():
    schema = FinetuneConfig.model_json_schema()
    for name, prop in schema["properties"].items():
        assert prop.get("description"), name
        assert prop.get("section"), name


# --- Axolotl semantics ---------------------------------------------------------------------


def test_batch_size_sets_gradient_accumulation_as_axolotl_documents(tmp_path):
    config = load_config(write(tmp_path, {**MINIMAL, "batch_size": 32, "micro_batch_size": 4}))
    assert config.config.gradient_accumulation_steps == 8


def test_batch_size_must_divide_and_not_meet_gradient_accumulation(tmp_path):
    problems = problems_of(tmp_path, {"batch_size": 30, "micro_batch_size": 4})
    assert "not a multiple of micro_batch_size 4" in problems["batch_size"]
    problems = problems_of(tmp_path, {"batch_size": 32, "gradient_accumulation_steps": 2})
    assert "disagree" in problems["batch_size"]


def test_gradient_accumulation_defaults_to_one(tmp_path):
    assert load_config(write(tmp_path, MINIMAL)).config.gradient_accumulation_steps == 1


@pytest.mark.parametrize("key", ["eval_steps", "evals_per_epoch"])
def test_evaluation_without_eval_data_is_skipped_with_a_warning(tmp_path, key):
    loaded = load_config(write(tmp_path, {**MINIMAL, key: 4}))
    assert any(
        w.startswith(f"{key}: skipped: there is nothing to evaluate") for w in loaded.warnings
    )


def test_val_set_size_and_test_datasets_are_exclusive(tmp_path):
    test = [{"path": "eval.jsonl", "type": "alpaca"}]
    problems = problems_of(tmp_path, {"val_set_size": 0.1, "test_datasets": test})
    assert "exclusive" in problems["val_set_size"]


def test_run_name_follows_axolotl(tmp_path):
    both = {**MINIMAL, "wandb_project": "p", "wandb_name": "w", "mlflow_experiment_name": "e"}
    loaded = load_config(write(tmp_path, {**both, "mlflow_run_name": "m"}))
    assert loaded.config.run_name() == "w"
    assert any("MLflow run is named after wandb_name" in w for w in loaded.warnings)
    only_mlflow = {
        **MINIMAL,
        "wandb_name": "w",
        "mlflow_experiment_name": "e",
        "mlflow_run_name": "m",
    }
    assert load_config(write(tmp_path, only_mlflow)).config.run_name() == "m"


@pytest.mark.parametrize(
    ("changes", "key", "words"),
    [
        ({"rl": "dpo"}, "rl", "preference / RL training"),
        ({"processor_type": "AutoProcessor"}, "processor_type", "multimodal"),
        ({"gptq": True}, "gptq", "GPTQ"),
        ({"context_parallel_size": 2}, "context_parallel_size", "context (sequence) parallelism"),
        ({"plugins": ["axolotl.integrations.kd.KDPlugin"]}, "plugins", "KDPlugin"),
        ({"adapter": "dora"}, "adapter", "peft_use_dora: true"),
        ({"adapter": "llama-adapter"}, "adapter", "lora or qlora adapters"),
        ({"optimizer": "muon"}, "optimizer", "Axolotl's own optimizer"),
        ({"attn_implementation": "xformers"}, "attn_implementation", "does not offer"),
        ({"chat_template": "falcon_h1"}, "chat_template", "Axolotl chat template"),
        ({"chat_template": "chatmll"}, "chat_template", "did you mean 'chatml'?"),
        (
            {"datasets": [{"path": "x.jsonl", "type": "sharegpt"}]},
            "datasets[0].type",
            "message_property_mappings",
        ),
        (
            {"datasets": [{"path": "x.jsonl", "type": "alpacca"}]},
            "datasets[0].type",
            "did you mean 'alpaca'?",
        ),
    ],
)
def test_axolotl_features_we_lack_are_refused_by_name(tmp_path, changes, key, words):
    problems = problems_of(tmp_path, changes)
    assert words in problems[key], problems


def test_plugins_that_only_speed_up_are_ignored_with_a_warning(tmp_path):
    config = {
        **MINIMAL,
        "plugins": ["axolotl.integrations.liger.LigerPlugin"],
        "liger_rms_norm": True,
        "cut_cross_entropy": True,
    }
    warnings = load_config(write(tmp_path, config)).warnings
    assert any(
        "plugins" in w and "liger_rms_norm" in w and "cut_cross_entropy" in w for w in warnings
    )


def test_torch_compile_says_why_it_does_nothing(tmp_path):
    config = {**MINIMAL, "torch_compile": True, "torch_compile_backend": "inductor"}
    warnings = load_config(write(tmp_path, config)).warnings
    assert any("torch_compile" in w and "ignored Axolotl keys" in w for w in warnings)
    assert any(w.startswith("torch_compile: finetune trains eagerly") for w in warnings)
    off = load_config(write(tmp_path, {**MINIMAL, "torch_compile": False})).warnings
    assert not any("eagerly" in w for w in off)


def test_axolotl_typo_gets_a_suggestion(tmp_path):
    problems = problems_of(tmp_path, {"context_parapllel_size": 2})
    assert problems == {
        "context_parapllel_size": "unknown key; did you mean 'context_parallel_size'?"
    }


def test_bad_dataset_value_is_not_reported_as_missing_datasets(tmp_path):
    problems = problems_of(tmp_path, {"datasets": [{"path": "x.jsonl", "type": "alpaka"}]})
    assert "datasets" not in problems
    assert set(problems) == {"datasets[0].type"}


def test_aliases_become_the_canonical_type(tmp_path):
    datasets = [
        {"path": "a.jsonl", "type": "alpaca:chat"},
        {"path": "b.jsonl", "type": "chat_template.default"},
    ]
    config = load_config(write(tmp_path, {**MINIMAL, "datasets": datasets})).config
    assert [d.type for d in config.datasets] == ["alpaca_chat", "chat_template"]


# --- paths ---------------------------------------------------------------------------------


def test_relative_paths_fall_back_to_the_config_folder(tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "rows.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    (project / "template.jinja").write_text("{{ messages }}")
    config = {
        **MINIMAL,
        "datasets": [{"path": "data/rows.jsonl", "type": "alpaca"}],
        "chat_template_jinja": "template.jinja",
    }
    path = write(project, config)
    monkeypatch.chdir(tmp_path)  # another working directory
    loaded = load_config(path).config
    assert loaded.datasets[0].path == str(project / "data" / "rows.jsonl")
    assert loaded.chat_template_jinja == str(project / "template.jinja")
    assert loaded.base_model == MINIMAL["base_model"]  # a Hub id stays one


def test_working_directory_wins_over_the_config_folder(tmp_path, monkeypatch):
    (tmp_path / "rows.jsonl").write_text("{}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "rows.jsonl").write_text("{}\n")
    path = write(
        tmp_path / "sub", {**MINIMAL, "datasets": [{"path": "rows.jsonl", "type": "alpaca"}]}
    )
    monkeypatch.chdir(tmp_path)
    assert load_config(path).config.datasets[0].path == str(tmp_path / "rows.jsonl")


@pytest.mark.parametrize("name", ["zero3", "zero3.json", "deepspeed_configs/zero3.json"])
def test_bundled_deepspeed_configs_by_name_from_any_folder(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    config = load_config(write(tmp_path, {**MINIMAL, "deepspeed": name})).config
    assert config.deepspeed == str(BUNDLED_DEEPSPEED / "zero3.json")


def test_missing_deepspeed_config_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    problems = problems_of(tmp_path, {"deepspeed": "configs/ds.json"})
    assert f"looked in {tmp_path}" in problems["deepspeed"]
    assert "zero3_offload" in problems["deepspeed"]


# --- overrides without a value -------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--learning-rate", "--max-steps", "10"], "--learning-rate"),
        (["--max-steps"], "--max-steps"),
        (["--seed"], "--seed"),
        (["--learning-rate="], "--learning-rate"),
        (["--learning-rate", ""], "--learning-rate"),
    ],
)
def test_an_override_without_its_value_is_an_error(args, flag):
    with pytest.raises(ConfigError) as caught:
        parse_overrides(args)
    assert flag in dict(caught.value.problems)


def test_a_bare_flag_is_true_only_for_boolean_keys():
    assert parse_overrides(["--sample-packing", "--max-steps", "3"]) == {
        "sample_packing": True,
        "max_steps": 3,
    }


@pytest.mark.parametrize(
    ("machine", "expected"),
    [
        ({"cuda": True, "bf16": True}, (True, False)),
        ({"cuda": True, "bf16": False}, (False, True)),  # T4 / V100: fp16, as in Axolotl
        ({"cuda": False, "bf16": False}, (False, False)),  # a CPU cannot run fp16: fp32
        ({"cuda": False, "bf16": True}, (True, False)),  # AVX512-BF16 / AMX CPUs
    ],
)
def test_bf16_auto_falls_back_like_axolotl(tmp_path, machine, expected):
    config = load_config(write(tmp_path, MINIMAL)).config
    resolved = resolve_for_machine(config, tf32=False, **machine)
    assert (resolved.bf16, resolved.fp16) == expected


def test_explicit_fp16_false_is_kept_on_a_gpu_without_bf16(tmp_path):
    config = load_config(write(tmp_path, {**MINIMAL, "fp16": False})).config
    resolved = resolve_for_machine(config, cuda=True, bf16=False, tf32=False)
    assert (resolved.bf16, resolved.fp16) == (False, False)
