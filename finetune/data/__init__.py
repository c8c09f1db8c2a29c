"""The data stage: dataset files -> tokenized, label-masked, cached samples -> batches.

`sources` reads rows; `strategies/` (one module per `type:`) renders each row as text plus
the character spans to train; `chat_templates` and `templates/` format conversations;
`tokenize` turns text and spans into `input_ids` and `labels`; `prepare` runs all of that per
dataset and `cache` stores the result; `summary` counts it; `packing` groups samples into
batches; `mask_view` shows the label mask.

May import: finetune.config, finetune.errors, finetune.fs, finetune.hub. Never the model,
train or merge stages.
"""
