"""The names a config may use for dataset formats and chat templates, with what each means.

The schema owns this vocabulary (the JSON Schema shows it as enums with descriptions, `validate`
suggests from it); the data stage implements it: every name here has a prompt strategy in
finetune/data/strategies/ or a template file in finetune/data/templates/, and a test checks
that the two agree.
"""

from __future__ import annotations

DATASET_TYPES = {
    "alpaca": "instruction/input/output rows in the Alpaca prompt (### Instruction: ...)",
    "alpaca:chatml": "instruction/input/output rows in ChatML turns",
    "alpaca_chat": "instruction/input/output rows as USER:/ASSISTANT: turns",
    "alpaca_chat.load_qa": "question/answer rows as USER:/ASSISTANT: turns",
    "chat_template": "conversations (a list of messages) rendered with a chat template",
    "completion": "raw text, every token trained (pretraining-style)",
    "input_output": "segments of text, each trained or not, concatenated as given",
}

CHAT_TEMPLATES = {
    "tokenizer_default": "the base model tokenizer's own chat template",
    "chatml": "ChatML (<|im_start|>role ... <|im_end|>), no default system message",
    "gemma": "Gemma (<start_of_turn>user/model ... <end_of_turn>)",
    "llama3": "Llama 3.x (<|start_header_id|>role<|end_header_id|> ... <|eot_id|>)",
    "mistral": "Mistral instruct ([INST] ... [/INST] ...</s>)",
    "phi_3": "Phi-3 (<|user|> ... <|end|>)",
    "qwen": "Qwen2 / Qwen2.5 (ChatML with Qwen's default system message)",
}
