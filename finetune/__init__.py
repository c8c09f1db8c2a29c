"""finetune: fine-tune Hugging Face causal language models with LoRA, QLoRA and DoRA.

The pipeline, one package per stage (each says what it owns and may import):

    cli.py          the verbs; argument plumbing only
    config/         the schema, YAML + overrides, Axolotl's keys, the README reference
    data/           sources, prompt strategies, chat templates, tokenize + mask, cache, packing
    model/          base model source and loading, the default model, PEFT adapters
    train/          train() as phases: trainer, arguments, batching, checkpoints, metrics
    merge/          fold the adapter into the base, shard by shard, and verify it
    inference.py    generation and chat
    machine.py      what this machine can run (precision, devices, refusals)
    errors.py       the FinetuneError tree; fs.py staged writes; dtypes.py; hub.py (the Hub,
                    and the guard that keeps bitsandbytes from fetching code from it)

Dependencies point one way, from the CLI down to config (tests/test_layout.py checks it).
"""

__version__ = "0.1.0"

from finetune.hub import no_hub_kernels_in_bitsandbytes  # noqa: E402

no_hub_kernels_in_bitsandbytes()  # before peft imports bitsandbytes: no code from the Hub
