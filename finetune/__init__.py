"""finetune: fine-tune Hugging Face causal language models with LoRA, QLoRA and DoRA."""

__version__ = "0.1.0"
