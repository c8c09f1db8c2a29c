"""Where rows come from: split slicing for every local source, globs, Hub ids."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from finetune.config import DatasetConfig
from finetune.data.sources import is_hub_dataset, load_rows, sample_rows
from finetune.errors import DataSourceError


def _rows(tmp_path: Path, count: int = 20, name: str = "rows.jsonl") -> Path:
    path = tmp_path / name
    path.write_text(
        "".join(
            json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(count)
        )
    )
    return path


def _dataset(path, **options) -> DatasetConfig:
    return DatasetConfig(path=str(path), type="alpaca", **options)


@pytest.mark.parametrize(
    ("split", "expected"),
    [
        ("train", [f"q{i}" for i in range(20)]),
        ("train[:10%]", ["q0", "q1"]),
        ("train[5:8]", ["q5", "q6", "q7"]),
        ("train[-2:]", ["q18", "q19"]),
        ("train[90%:]", ["q18", "q19"]),
    ],
)
def test_split_slices_a_local_file_as_hugging_face_does(tmp_path, split, expected):
    assert load_rows(_dataset(_rows(tmp_path), split=split))["instruction"] == expected


def test_split_slices_a_folder_of_files_and_a_saved_dataset(tmp_path):
    folder = tmp_path / "files"
    folder.mkdir()
    _rows(folder, 4, "a.jsonl")
    _rows(folder, 4, "b.jsonl")
    assert len(load_rows(_dataset(folder, split="train[:3]"))) == 3
    saved = tmp_path / "saved"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"instruction": ["x"] * 10, "output": ["y"] * 10}),
            "test": datasets.Dataset.from_dict({"instruction": ["t"] * 4, "output": ["u"] * 4}),
        }
    ).save_to_disk(str(saved))
    assert load_rows(_dataset(saved, split="test[:50%]"))["instruction"] == ["t", "t"]


def test_unknown_split_and_bad_slice_are_explained(tmp_path):
    path = _rows(tmp_path)
    with pytest.raises(DataSourceError, match="no split 'test' here; it has: train"):
        load_rows(_dataset(path, split="test"))
    with pytest.raises(DataSourceError, match="not a split name with an optional slice"):
        load_rows(_dataset(path, split="train[:x]"))


def test_data_files_take_globs(tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    _rows(folder, 3, "part-1.jsonl")
    _rows(folder, 2, "part-2.jsonl")
    (folder / "notes.txt").write_text("not data\n")
    rows = load_rows(_dataset(folder, data_files="part-*.jsonl"))
    assert len(rows) == 5


def test_a_hub_id_with_data_files_goes_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hub = _dataset("someone/some-data", data_files=["train/*.jsonl"])
    assert is_hub_dataset(hub)
    assert not is_hub_dataset(_dataset(_rows(tmp_path)))
    assert not is_hub_dataset(_dataset("data/missing.jsonl"))


def test_sample_rows_reads_the_first_and_last_row(tmp_path):
    sampled = sample_rows(_dataset(_rows(tmp_path, 5)))
    assert [row["instruction"] for _, row in sampled] == ["q0", "q4"]
    assert sampled[1][0].endswith("rows.jsonl: row 5")


def test_hub_dataset_cache_key_follows_the_resolved_revision(tmp_path, monkeypatch):
    """An unpinned Hub dataset is keyed on the commit its revision stands for (here read from
    the Hub cache, offline), so a new upstream commit misses the prepared-data cache."""
    import huggingface_hub.constants

    from finetune.data.sources import fingerprint

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    refs = tmp_path / "datasets--someone--their-data" / "refs"
    refs.mkdir(parents=True)
    dataset = _dataset("someone/their-data")
    (refs / "main").write_text("a" * 40)
    first = fingerprint(dataset)
    (refs / "main").write_text("b" * 40)
    assert fingerprint(dataset) != first
    pinned = _dataset("someone/their-data", revision="c" * 40)
    assert fingerprint(pinned) == fingerprint(pinned)
