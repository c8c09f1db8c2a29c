"""Alpaca-style instruction rows: `alpaca`, `alpaca:chatml`, `alpaca_chat`,
`alpaca_chat.load_qa`, and the user-defined `type: {field_instruction: ..., format: ...}`.

The prompt texts are Axolotl's, byte for byte (its AlpacaPrompter and AlpacaChatPrompter):
the prompt is masked, the response and the EOS token are trained.
"""

from __future__ import annotations

from dataclasses import dataclass

from finetune.data.strategies import Context, Rendered, RowError, register

SYSTEM = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request."
)
SYSTEM_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request."
)
# Axolotl's AlpacaChatPrompter keeps a trailing blank line in these two system prompts.
QA_SYSTEM = (
    "Below is an instruction from a USER that describes a task, paired with an input that "
    "provides further context. The ASSISTANT writes a response that concisely and appropriately "
    "completes the request.\n\n"
)
QA_SYSTEM_NO_INPUT = (
    "Below is an instruction from a USER that describes a task. The ASSISTANT writes a response "
    "that appropriately and concisely completes the request.\n\n"
)


@dataclass(frozen=True)
class PromptStyle:
    system_format: str
    turn_format: str
    turn_no_input_format: str
    system: str = SYSTEM
    system_no_input: str = SYSTEM_NO_INPUT

    def prompt(self, instruction: str, input_text: str | None, system: str | None = None) -> str:
        if input_text:
            head = system if system is not None else self.system
            turn = self.turn_format.format(instruction=instruction, input=input_text)
        else:
            head = system if system is not None else self.system_no_input
            turn = self.turn_no_input_format.format(instruction=instruction)
        return (self.system_format.format(system=head) if head else "") + turn


INSTRUCT = PromptStyle(
    system_format="{system}\n\n",
    turn_format="### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
    turn_no_input_format="### Instruction:\n{instruction}\n\n### Response:\n",
)
CHATML = PromptStyle(
    system_format="<|im_start|>system\n{system}<|im_end|>\n",
    turn_format="<|im_start|>user\n{instruction}\n{input}<|im_end|>\n<|im_start|>assistant\n",
    turn_no_input_format="<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n",
)
CHAT = PromptStyle(
    system_format="SYSTEM: {system}\n",
    turn_format="USER: {instruction}\n{input}\nASSISTANT:",
    turn_no_input_format="USER: {instruction}\nASSISTANT:",
)
# Axolotl's `alpaca:phi` (its AlpacaPrompter "phi" style), byte for byte: the input follows
# `<|end|>` without a newline and no newline follows `<|assistant|>`, exactly as Axolotl writes it.
PHI = PromptStyle(
    system_format="<|system|>\n{system}<|end|>\n",
    turn_format="<|user|>\n{instruction}<|end|>{input}<|assistant|>",
    turn_no_input_format="<|user|>\n{instruction}<|end|>\n<|assistant|>\n",
)
CHAT_QA = PromptStyle(
    system_format=CHAT.system_format,
    turn_format=CHAT.turn_format,
    turn_no_input_format=CHAT.turn_no_input_format,
    system=QA_SYSTEM,
    system_no_input=QA_SYSTEM_NO_INPUT,
)


def _text(row: dict, name: str, required: bool = True) -> str:
    value = row.get(name)
    if value is None:
        if required:
            raise RowError(f"field {name!r} is empty")
        return ""
    if not isinstance(value, str):
        raise RowError(f"field {name!r} should be text, got {type(value).__name__}")
    return value


def prompt_and_response(prompt: str, response: str, ctx: Context) -> Rendered:
    """Prompt masked (unless train_on_inputs), response and EOS trained."""
    start = 0 if ctx.config.train_on_inputs else len(prompt)
    return Rendered(prompt + response, [(start, len(prompt) + len(response))], eos="trained")


def _style_strategy(style: PromptStyle, instruction: str, input_name: str | None, output: str):
    def fields(_dataset) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return (instruction, output), ((input_name,) if input_name else ())

    def render(row: dict, ctx: Context) -> Rendered:
        input_text = _text(row, input_name, required=False) if input_name else None
        prompt = style.prompt(_text(row, instruction), input_text)
        return prompt_and_response(prompt, _text(row, output), ctx)

    def prompt(text: str, ctx: Context) -> tuple[str, bool]:
        return style.prompt(text, None), True

    return fields, render, prompt


# Every alpaca-style type and its prompt style (export writes the same prompts from here).
STYLES = {
    "alpaca": INSTRUCT,
    "alpaca:chatml": CHATML,
    "alpaca_chat": CHAT,
    "alpaca:phi": PHI,
    "alpaca_chat.load_qa": CHAT_QA,
}
for _name, _style in STYLES.items():
    _fields = (
        ("question", None, "answer") if _style is CHAT_QA else ("instruction", "input", "output")
    )
    register(_name, *_style_strategy(_style, *_fields))


def _user_defined_fields(dataset) -> tuple[tuple[str, ...], tuple[str, ...]]:
    fmt = dataset.type
    return (fmt.field_instruction, fmt.field_output), (fmt.field_input, fmt.field_system)


def _user_defined_render(row: dict, ctx: Context) -> Rendered:
    fmt = ctx.dataset.type
    instruction = _text(row, fmt.field_instruction)
    input_text = _text(row, fmt.field_input, required=False)
    system = _text(row, fmt.field_system, required=False) or fmt.system_prompt
    try:
        if input_text:
            turn = fmt.format.format(instruction=instruction, input=input_text)
        else:
            turn = fmt.no_input_format.format(instruction=instruction)
    except (KeyError, IndexError) as exc:
        raise RowError(
            f"type.format: unknown placeholder {exc}; use {{instruction}} and {{input}}"
        ) from None
    prompt = (fmt.system_format.format(system=system) if system else "") + turn
    return prompt_and_response(prompt, _text(row, fmt.field_output), ctx)


def _user_defined_prompt(text: str, ctx: Context) -> tuple[str, bool]:
    fmt = ctx.dataset.type
    row = {fmt.field_instruction: text, fmt.field_output: ""}
    return _user_defined_render(row, ctx).text, True


register("user_defined", _user_defined_fields, _user_defined_render, _user_defined_prompt)
