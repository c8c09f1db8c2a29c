"""Preprocessing end to end: sources, the cache (hits, misses, atomic writes), bad input."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from finetune.config import FinetuneConfig
from finetune.data import prepare as prepare_module
from finetune.data.chat_templates import ChatTemplateError
from finetune.data.prepare import DataRowError, prepare_datasets
from finetune.data.sources import DataSourceError
from finetune.data.tokenize import IGNORE_INDEX

ROOT = Path(__file__).parents[2]
SAMPLES = ROOT / "data" / "samples"
QUIET = {"log": lambda message: None}


def alpaca_file(folder: Path, rows: int = 6, name: str = "train.jsonl") -> Path:
    path = folder / name
    with open(path, "w") as handle:
        for i in range(rows):
            row = {"instruction": f"Count to {i}.", "input": "", "output": f"{i} {i + 1}"}
            handle.write(json.dumps(row) + "\n")
    return path


def make_config(tmp_path: Path, datasets: list[dict] | None = None, **options) -> FinetuneConfig:
    datasets = datasets or [{"path": str(alpaca_file(tmp_path)), "type": "alpaca"}]
    return FinetuneConfig(
        base_model="x",
        datasets=datasets,
        dataset_prepared_path=str(tmp_path / "prepared"),
        **options,
    )


def cache_dirs(tmp_path: Path) -> list[str]:
    prepared = tmp_path / "prepared"
    return sorted(p.name for p in prepared.iterdir() if p.is_dir()) if prepared.exists() else []


def test_second_run_uses_the_cache(tmp_path, smollm2_tokenizer):
    config = make_config(tmp_path)
    first = prepare_datasets(config, smollm2_tokenizer, **QUIET)
    second = prepare_datasets(config, smollm2_tokenizer, **QUIET)
    assert (first.from_cache, second.from_cache) == (False, True)
    assert first.path == second.path
    assert first.train["input_ids"] == second.train["input_ids"]


def _with_token(tokenizer):
    changed = copy.deepcopy(tokenizer)
    changed.add_tokens(["<new_token>"])
    return changed


# Each change must miss the cache: (what changes, a function giving the new config/tokenizer).
CHANGES = {
    "data file content": lambda tmp, tok: (
        make_config(tmp, [{"path": str(alpaca_file(tmp, rows=7)), "type": "alpaca"}]),
        tok,
    ),
    "type": lambda tmp, tok: (
        make_config(tmp, [{"path": str(tmp / "train.jsonl"), "type": "alpaca_chat"}]),
        tok,
    ),
    "type option": lambda tmp, tok: (
        make_config(
            tmp, [{"path": str(tmp / "train.jsonl"), "type": "alpaca", "split": "train[:3]"}]
        ),
        tok,
    ),
    "tokenizer": lambda tmp, tok: (make_config(tmp), _with_token(tok)),
    "chat_template": lambda tmp, tok: (make_config(tmp, chat_template="chatml"), tok),
    "sequence_len": lambda tmp, tok: (make_config(tmp, sequence_len=1024), tok),
    "train_on_inputs": lambda tmp, tok: (make_config(tmp, train_on_inputs=True), tok),
    "sample_packing": lambda tmp, tok: (make_config(tmp, sample_packing=True), tok),
    "seed": lambda tmp, tok: (make_config(tmp, seed=7), tok),
    "val_set_size": lambda tmp, tok: (make_config(tmp, val_set_size=2), tok),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_each_hashed_input_misses_the_cache(tmp_path, smollm2_tokenizer, change):
    prepare_datasets(make_config(tmp_path), smollm2_tokenizer, **QUIET)
    config, tokenizer = CHANGES[change](tmp_path, smollm2_tokenizer)
    prepared = prepare_datasets(config, tokenizer, **QUIET)
    assert not prepared.from_cache
    assert len(cache_dirs(tmp_path)) == 2


def test_chat_template_change_misses_for_chat_data(tmp_path, smollm2_tokenizer):
    datasets = [{"path": str(SAMPLES / "chat.jsonl"), "type": "chat_template"}]
    prepare_datasets(
        make_config(tmp_path, datasets, chat_template="chatml"), smollm2_tokenizer, **QUIET
    )
    again = prepare_datasets(
        make_config(tmp_path, datasets, chat_template="chatml"), smollm2_tokenizer, **QUIET
    )
    other = prepare_datasets(
        make_config(tmp_path, datasets, chat_template="qwen"), smollm2_tokenizer, **QUIET
    )
    assert again.from_cache and not other.from_cache


def test_interrupted_write_leaves_no_cache(tmp_path, smollm2_tokenizer, monkeypatch):
    config = make_config(tmp_path)

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module.datasets.Dataset, "save_to_disk", fail)
    with pytest.raises(KeyboardInterrupt):
        prepare_datasets(config, smollm2_tokenizer, **QUIET)
    monkeypatch.undo()
    assert cache_dirs(tmp_path) == []
    assert not prepare_datasets(config, smollm2_tokenizer, **QUIET).from_cache


def test_val_set_size_fraction_and_count(tmp_path, smollm2_tokenizer):
    path = alpaca_file(tmp_path, rows=20)
    datasets = [{"path": str(path), "type": "alpaca"}]
    by_fraction = prepare_datasets(
        make_config(tmp_path, datasets, val_set_size=0.25), smollm2_tokenizer, **QUIET
    )
    assert (len(by_fraction.train), len(by_fraction.eval)) == (15, 5)
    by_count = prepare_datasets(
        make_config(tmp_path, datasets, val_set_size=3), smollm2_tokenizer, **QUIET
    )
    assert (len(by_count.train), len(by_count.eval)) == (17, 3)
    train = {tuple(ids) for ids in by_count.train["input_ids"]}
    assert not train & {tuple(ids) for ids in by_count.eval["input_ids"]}


def test_several_datasets_and_test_datasets(tmp_path, smollm2_tokenizer):
    config = make_config(
        tmp_path,
        [
            {"path": str(SAMPLES / "alpaca.jsonl"), "type": "alpaca"},
            {"path": str(SAMPLES / "chat.jsonl"), "type": "chat_template"},
        ],
        chat_template="chatml",
        test_datasets=[{"path": str(SAMPLES / "qa.jsonl"), "type": "alpaca_chat.load_qa"}],
    )
    prepared = prepare_datasets(config, smollm2_tokenizer, **QUIET)
    assert len(prepared.train) == 6
    assert len(prepared.eval) == 2
    assert prepared.summary["rows_read"] == 8
    assert prepared.chat_template.startswith("{%- for message in messages")


def test_excess_length_strategies(tmp_path, smollm2_tokenizer):
    path = tmp_path / "long.jsonl"
    rows = [
        {"instruction": "Repeat.", "input": "", "output": "word " * 40},
        {"instruction": "Short.", "input": "", "output": "ok"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    datasets = [{"path": str(path), "type": "alpaca"}]
    dropped = prepare_datasets(
        make_config(tmp_path, datasets, sequence_len=48), smollm2_tokenizer, **QUIET
    )
    assert (len(dropped.train), dropped.summary["dropped_too_long"]) == (1, 1)
    truncated = prepare_datasets(
        make_config(tmp_path, datasets, sequence_len=48, excess_length_strategy="truncate"),
        smollm2_tokenizer,
        **QUIET,
    )
    assert sorted(truncated.train["length"]) == [sorted(truncated.train["length"])[0], 48]
    with pytest.raises(
        DataRowError, match=r"long.jsonl: row 1: \d+ tokens, longer than sequence_len 48"
    ):
        prepare_datasets(
            make_config(tmp_path, datasets, sequence_len=48, excess_length_strategy="raise"),
            smollm2_tokenizer,
            **QUIET,
        )


def test_completion_splits_long_texts_into_chunks(tmp_path, smollm2_tokenizer):
    path = tmp_path / "text.jsonl"
    text = " ".join(["river"] * 100)
    path.write_text(json.dumps({"text": text}))
    prepared = prepare_datasets(
        make_config(tmp_path, [{"path": str(path), "type": "completion"}], sequence_len=32),
        smollm2_tokenizer,
        **QUIET,
    )
    lengths = prepared.train["length"]
    expected = len(smollm2_tokenizer(text)["input_ids"]) + 1  # + EOS
    assert max(lengths) == 32 and sum(lengths) == expected
    assert prepared.summary["chunks_added"] == len(lengths) - 1


def test_rows_with_nothing_to_train_are_dropped_and_counted(tmp_path, smollm2_tokenizer):
    path = tmp_path / "chat.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    prepared = prepare_datasets(
        make_config(
            tmp_path, [{"path": str(path), "type": "chat_template"}], chat_template="chatml"
        ),
        smollm2_tokenizer,
        **QUIET,
    )
    assert len(prepared.train) == 1
    assert prepared.summary["dropped_nothing_to_train"] == 1


# --- bad input: a clear message naming the culprit, and no cache written ---------------------


def _write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


BAD_INPUTS = [
    # (file name, content, type, extra config, exception, message pattern)
    ("missing.jsonl", None, "alpaca", {}, DataSourceError, r"missing.jsonl: no such file"),
    (
        "broken.jsonl",
        '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": }\n',
        "alpaca",
        {},
        DataSourceError,
        r"broken.jsonl: line 2: invalid JSON",
    ),
    (
        "fields.jsonl",
        '{"question": "a", "reply": "b"}\n',
        "alpaca",
        {},
        DataRowError,
        r"fields.jsonl: row 1: missing field 'instruction', 'output' for type alpaca; "
        r"fields found: question, reply; expected: instruction, output \(optional: input\)",
    ),
    (
        "roles.jsonl",
        '{"messages": [{"role": "user", "content": "a"}]}\n'
        '{"messages": [{"role": "narrator", "content": "b"}]}\n',
        "chat_template",
        {"chat_template": "chatml"},
        DataRowError,
        r"roles.jsonl: row 2: message 0 has unknown role 'narrator'",
    ),
    ("empty.jsonl", "", "alpaca", {}, DataSourceError, r"empty.jsonl: file is empty"),
    (
        "garbage.jsonl",
        b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe",
        "alpaca",
        {},
        DataSourceError,
        r"garbage.jsonl: not UTF-8 text",
    ),
    (
        "nothing.jsonl",
        '{"messages": [{"role": "user", "content": "a"}]}\n',
        "chat_template",
        {"chat_template": "chatml"},
        DataRowError,
        r"no rows left to train on: 1 read, 0 longer than sequence_len 512, 1 with no trainable",
    ),
]


@pytest.mark.parametrize(
    ("name", "content", "kind", "extra", "error", "message"),
    BAD_INPUTS,
    ids=[case[0] for case in BAD_INPUTS],
)
def test_bad_input_names_the_culprit_and_writes_no_cache(
    tmp_path, smollm2_tokenizer, name, content, kind, extra, error, message
):
    path = tmp_path / name if content is None else _write(tmp_path, name, content)
    config = make_config(tmp_path, [{"path": str(path), "type": kind}], **extra)
    with pytest.raises(error, match=message):
        prepare_datasets(config, smollm2_tokenizer, **QUIET)
    assert cache_dirs(tmp_path) == []


def test_tokenizer_default_without_template_writes_no_cache(tmp_path, smollm2_tokenizer):
    tokenizer = copy.deepcopy(smollm2_tokenizer)
    tokenizer.chat_template = None
    datasets = [{"path": str(SAMPLES / "chat.jsonl"), "type": "chat_template"}]
    with pytest.raises(ChatTemplateError, match="tokenizer has no chat template"):
        prepare_datasets(make_config(tmp_path, datasets), tokenizer, **QUIET)
    assert cache_dirs(tmp_path) == []


# --- every sample format, through the real CLI -------------------------------------------

SAMPLE_DATASETS = {
    "alpaca.jsonl": {"type": "alpaca"},
    "alpaca.csv": {"type": "alpaca"},
    "alpaca.parquet": {"type": "alpaca:chatml"},
    "qa.jsonl": {"type": "alpaca_chat.load_qa"},
    "completion.txt": {"type": "completion"},
    "input_output.jsonl": {"type": "input_output"},
    "chat.jsonl": {"type": "chat_template"},
    "sharegpt.jsonl": {
        "type": "chat_template",
        "field_messages": "conversations",
        "message_property_mappings": {"role": "from", "content": "value"},
    },
    "quickstart_facts.jsonl": {"type": "chat_template"},
    "quickstart_heldout.jsonl": {"type": "chat_template"},
    "custom_format.jsonl": {
        "type": {
            "field_instruction": "task",
            "field_input": "word",
            "field_output": "result",
            "format": "{instruction}\nWord: {input}\nAnswer: ",
            "no_input_format": "{instruction}\nAnswer: ",
        }
    },
}


def test_every_sample_file_has_a_case():
    assert sorted(p.name for p in SAMPLES.iterdir()) == sorted(SAMPLE_DATASETS)


def test_preprocess_cli_on_every_sample(tmp_path, smollm2_dir):
    import yaml

    datasets = [
        {"path": str(SAMPLES / name), **options} for name, options in SAMPLE_DATASETS.items()
    ]
    config = tmp_path / "samples.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "base_model": str(smollm2_dir),
                "datasets": datasets,
                "dataset_prepared_path": str(tmp_path / "prepared"),
            }
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "finetune", "preprocess", str(config), "--debug"],
        capture_output=True,
        text=True,
        env={"NO_COLOR": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())},
    )
    assert result.returncode == 0, result.stderr
    for index, name in enumerate(SAMPLE_DATASETS):
        assert f"datasets[{index}] {SAMPLES / name}" in result.stdout
    assert "rows read 212, kept 212" in result.stdout
    assert "legend: each token is text(id, label)" in result.stdout  # the --debug mask view


def test_preprocess_cli_bad_file_exits_2_without_traceback(tmp_path, smollm2_dir):
    bad = _write(tmp_path, "bad.jsonl", '{"instruction": "a", "output": "b"}\nnot json\n')
    config = tmp_path / "bad.yaml"
    config.write_text(
        f"base_model: {smollm2_dir}\ndatasets:\n  - path: {bad}\n    type: alpaca\n"
        f"dataset_prepared_path: {tmp_path / 'prepared'}\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "finetune", "preprocess", str(config)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"{bad}: line 2: invalid JSON" in result.stderr
    assert cache_dirs(tmp_path) == []


def test_labels_never_train_the_first_token(tmp_path, smollm2_tokenizer):
    prepared = prepare_datasets(make_config(tmp_path), smollm2_tokenizer, **QUIET)
    for labels in prepared.train["labels"]:
        assert labels[0] == IGNORE_INDEX
        assert np.count_nonzero(np.array(labels) != IGNORE_INDEX) > 0
