"""The evaluate stage: judge a finished run against its base model, on held-out samples
formatted and masked exactly as training formatted and masked them.

One public entry point, `evaluate_run` (run.py), which logs the tables and writes
`output_dir/eval.json`. Its parts: `samples` gives the held-out samples (the run's eval split or
a --data file, prepared by the data stage) with their prompts and reference answers, `loss` the
token-weighted held-out loss (training's own kept-token loss), `answers` greedy answers and
their scores (exact match, contains, token F1), `agreement` compares models that must compute
the same thing (merged vs base + adapter, a GGUF file vs the fine-tuned model), `harness` runs
EleutherAI's lm-evaluation-harness when installed, `report` writes eval.json and the tables.

May import: finetune.config, finetune.data, finetune.model, finetune.inference (loading and stop
tokens), finetune.train.loss (the loss training reports), finetune.merge.verify (its
tolerances), finetune.runfolder, finetune.errors, finetune.fs, finetune.dtypes. It reads what
train, merge and export wrote and never writes anything but eval.json.
"""

from finetune.errors import EvaluationError
from finetune.evaluate.report import EVAL_FILE, EvalReport
from finetune.evaluate.run import evaluate_run

__all__ = ["EVAL_FILE", "EvalReport", "EvaluationError", "evaluate_run"]
