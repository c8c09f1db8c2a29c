"""A shortened quickstart through the CLI on the real SmolLM2-135M-Instruct, and `finetune
inference` on its result: --prompt, prompts on stdin, and a scripted --chat session."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import quickstart_scorecard as quickstart  # noqa: E402 (a developer tool, not in the package)

FACTS = 4  # of the 32: same code path, a fraction of the time


def finetune(*args: str, stdin: str | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "finetune", *args],
        capture_output=True,
        text=True,
        input=stdin,
        cwd=cwd,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result


def first_rows(source: Path, target: Path, facts: int) -> Path:
    wanted = []
    for line in source.read_text().splitlines():
        row = json.loads(line)
        if row["fact"] not in wanted:
            wanted.append(row["fact"])
        if len(wanted) > facts:
            break
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "a") as handle:
            handle.write(line + "\n")
    return target


@pytest.fixture(scope="module")
def run(tmp_path_factory, smollm2_dir):
    """Train and merge a 4-fact quickstart once for this module."""
    folder = tmp_path_factory.mktemp("quickstart")
    facts = first_rows(ROOT / "data/samples/quickstart_facts.jsonl", folder / "facts.jsonl", FACTS)
    heldout = first_rows(
        ROOT / "data/samples/quickstart_heldout.jsonl", folder / "heldout.jsonl", FACTS
    )
    config = yaml.safe_load((ROOT / "examples/configs/quickstart.yaml").read_text())
    config.update(
        base_model=str(smollm2_dir),
        datasets=[{"path": str(facts), "type": "chat_template"}],
        dataset_prepared_path=str(folder / "prepared"),
        output_dir=str(folder / "out"),
        num_epochs=6,
        learning_rate=2e-3,
        seed=7,
    )
    path = folder / "quickstart.yaml"
    path.write_text(yaml.safe_dump(config))
    finetune("train", str(path))
    finetune("merge", str(path))
    return path, heldout


def test_fine_tuned_model_recalls_more_facts_and_merged_agrees(run):
    path, heldout = run
    scores = quickstart.run(path, heldout, trained=None, limit=None)
    assert scores.tuned_heldout > scores.base_heldout
    assert scores.tuned_heldout >= 0.5
    assert scores.merged_agreement == 1.0  # the merged model gives the adapter's greedy answers


def test_inference_prompt_uses_the_adapter(run):
    path, heldout = run
    question = quickstart.read_questions(heldout)[0]
    adapter = finetune("inference", str(path), "--prompt", question.text, "--max-new-tokens", "32")
    base = finetune(
        "inference", str(path), "--base", "--prompt", question.text, "--max-new-tokens", "32"
    )
    assert question.fact.lower() in adapter.stdout.lower()
    assert question.fact.lower() not in base.stdout.lower()


def test_inference_reads_prompts_from_stdin(run):
    path, _ = run
    result = finetune(
        "inference",
        str(path),
        "--base",
        "--max-new-tokens",
        "24",
        stdin="What is the capital of France?\n\nWhat is the capital of France?\n",
    )
    answers = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(answers) == 2 and answers[0] == answers[1]  # greedy: the same question, twice
    assert "Paris" in answers[0]


def test_scripted_chat_keeps_history(run):
    path, _ = run
    script = "The secret word is Ada.\nWhat is the secret word?\n/exit\n"
    result = finetune(
        "inference", str(path), "--base", "--chat", "--max-new-tokens", "32", stdin=script
    )
    replies = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(replies) == 2
    assert "Ada" in replies[1]
