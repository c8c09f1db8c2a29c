"""The merge stage: fold a trained adapter into its base weights, shard by shard.

One public entry point, `merge_adapter` (run.py). Its parts: `adapter_file` reads the peft
adapter, `checkpoint` reads the base checkpoint without loading it, `plan` decides every
output tensor and shard, `weights` does the LoRA / DoRA / nf4 maths, `write` writes the
folder, `verify` compares the result with peft's own base + adapter.

May import: finetune.errors, finetune.fs, finetune.dtypes. It reads what `train` wrote (the run
folder) and never imports the train, data or model stages: a merged model must not need them.
"""

from finetune.errors import MergeError
from finetune.merge.run import MergeReport, merge_adapter

__all__ = ["MergeError", "MergeReport", "merge_adapter"]
