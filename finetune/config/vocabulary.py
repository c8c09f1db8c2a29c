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
    "alpaca:phi": "instruction/input/output rows in Phi-3 turns (<|user|> ... <|end|>)",
    "alpaca_chat.load_qa": "question/answer rows as USER:/ASSISTANT: turns",
    "chat_template": "conversations (a list of messages) rendered with a chat template",
    "completion": "raw text, every token trained (pretraining-style)",
    "input_output": "segments of text, each trained or not, concatenated as given",
}

CHAT_TEMPLATES = {
    "tokenizer_default": "the base model tokenizer's own chat template",
    "chatml": "ChatML (<|im_start|>role ... <|im_end|>), no default system message",
    "qwen_25": "Qwen2 / Qwen2.5: ChatML with Qwen's default system message",
    "qwen3": "Qwen3: ChatML; answers keep their <think> reasoning after the last user turn",
    "llama3": "Llama 3 (<|start_header_id|>role<|end_header_id|> ... <|eot_id|>)",
    "llama3_1": "Llama 3.1 / 3.2 / 3.3: Llama 3 with the knowledge-cutoff and date header",
    "mistral_v2v3": "Mistral 7B v0.2/v0.3, Mixtral: [INST] ... [/INST] answer</s>",
    "mistral_v3_tekken": "Mistral NeMo: [INST]...[/INST]answer</s> (Tekken spacing)",
    "mistral_v7_tekken": "Mistral Small 3: [SYSTEM_PROMPT]...[/SYSTEM_PROMPT][INST]...[/INST]",
    "gemma": "Gemma / Gemma 2 (<start_of_turn>user/model ... <end_of_turn>)",
    "gemma3": "Gemma 3: the system message opens the first user turn",
    "phi_3": "Phi-3 / Phi-3.5 (<|user|> ... <|end|>)",
    "phi_4": "Phi-4 (<|im_start|>role<|im_sep|> ... <|im_end|>)",
}

# Other names Axolotl accepts for the same formats; the config keeps the name on the right.
DATASET_TYPE_ALIASES = {"alpaca:chat": "alpaca_chat", "chat_template.default": "chat_template"}

# Other names for the same templates (older finetune names and Axolotl's).
CHAT_TEMPLATE_ALIASES = {"qwen": "qwen_25", "mistral": "mistral_v2v3", "phi_35": "phi_3"}
