"""The model stage: where the base model comes from, loading it for training, adapters.

`source` resolves and checks `base_model` (Hub id, folder, `.gguf`, the default model);
`default_model` converts the embedded SmolLM2 into a checkpoint once; `load` builds the
tokenizer and the base model (dtype, quantization, attention); `adapters` attaches PEFT, whose
plain LoRA layers get `fused_lora`'s forward (the update added inside one addmm).

May import: finetune.config, finetune.machine, finetune.errors, finetune.fs, finetune.hub.
Never the data, train or merge stages.
"""
