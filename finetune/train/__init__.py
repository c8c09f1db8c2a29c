"""The train stage: prepared data + base model + adapter -> the HF Trainer -> the run folder.

`run.train()` reads as its phases; `trainer` is the Trainer subclass (batches, loss,
reporting), `arguments` builds TrainingArguments and reporters, `batching` the batch plans
and collators, `checkpoints` the resume / interrupt / final-save policy, `metrics`
metrics.jsonl and loss.png, `loss` the kept-token loss (computed in chunks by
`linear_cross_entropy` from the head found by `output_head`), `attention_choice` decides the
attention and packing and `attention` is the per-sample attention for packed rows, `launch`
starts the processes.

May import: finetune.config, finetune.data, finetune.model, finetune.machine, finetune.errors,
finetune.fs. Never finetune.merge or the CLI.
"""

from finetune.train.run import TrainResult, train

__all__ = ["TrainResult", "train"]
