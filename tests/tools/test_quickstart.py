"""A shortened quickstart through the CLI on the real SmolLM2-135M-Instruct, run as `make
quickstart` runs it (train, merge, export q8_0, eval with the merged model and the GGUF), and
`finetune inference` on its result: --prompt, prompts on stdin, and a scripted --chat session."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[2]
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
    """The rows of the first `facts` facts."""
    wanted, lines = [], []
    for line in source.read_text().splitlines():
        fact = json.loads(line)["fact"]
        if fact not in wanted:
            wanted.append(fact)
        if len(wanted) > facts:
            break
        lines.append(line + "\n")
    target.write_text("".join(lines))
    return target


def questions(path: Path) -> list[tuple[str, str]]:
    """(the user's question, the key fact) of each row."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [(row["messages"][0]["content"], row["fact"]) for row in rows]


@pytest.fixture(scope="module")
def run(tmp_path_factory, smollm2_dir):
    """Train, merge and export a 4-fact quickstart once for this module."""
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
    gguf = finetune("export", str(path), "--format", "gguf", "--quant", "q8_0").stdout
    return path, heldout, Path(gguf.strip().splitlines()[-1])


def test_eval_shows_the_facts_learned_and_the_merge_and_gguf_agree(run):
    path, heldout, gguf = run
    result = finetune(
        "eval", str(path), "--data", str(heldout), "--merged", "--gguf", str(gguf), "--show", "2"
    )
    saved = json.loads((path.parent / "out" / "eval.json").read_text())
    base, tuned = saved["base"], saved["finetuned"]
    assert tuned["model"] == "merged"
    assert tuned["loss"] < base["loss"] / 2
    assert tuned["contains"] >= 0.5 > base["contains"]
    assert tuned["token_f1"] > base["token_f1"]
    assert saved["merged_agreement"]["ok"] and saved["gguf_agreement"]["ok"]
    assert saved["gguf_agreement"]["same_answers"] == saved["gguf_agreement"]["answers"] == 8
    assert "GGUF q8_0 vs fine-tuned model: 8/8 greedy answers identical" in result.stdout


def test_inference_prompt_uses_the_adapter(run):
    path, heldout, _ = run
    question, fact = questions(heldout)[0]
    adapter = finetune("inference", str(path), "--prompt", question, "--max-new-tokens", "32")
    base = finetune(
        "inference", str(path), "--base", "--prompt", question, "--max-new-tokens", "32"
    )
    assert fact.lower() in adapter.stdout.lower()
    assert fact.lower() not in base.stdout.lower()


def test_inference_reads_prompts_from_stdin(run):
    path, _, _ = run
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
    path, _, _ = run
    script = "The secret word is Ada.\nWhat is the secret word?\n/exit\n"
    result = finetune(
        "inference", str(path), "--base", "--chat", "--max-new-tokens", "32", stdin=script
    )
    replies = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(replies) == 2
    assert "Ada" in replies[1]
