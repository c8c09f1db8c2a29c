"""The baseline of bench/train_throughput.py: what a user writes without a tool.

HF Trainer + PEFT LoRA (r16, all linear layers) + DataCollatorForSeq2Seq padding, fp32, the
Alpaca prompt masked. Prints trained tokens per second over the steps after the first.
STEPS 0: one epoch (bench/peers.py's whole-process wall time). PRECISION bf16: the HF
Trainer's bf16 mixed precision on the CPU (`bf16=True, use_cpu=True`), else fp32.

    python bench/_hf_trainer_baseline.py MODEL_DIR DATA.jsonl OUT_DIR STEPS BATCH [PRECISION]
"""

import json
import sys
import time

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def main() -> None:
    model_dir, data, out = sys.argv[1], sys.argv[2], sys.argv[3]
    steps, batch = int(sys.argv[4]), int(sys.argv[5])
    bf16 = len(sys.argv) > 6 and sys.argv[6] == "bf16"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def encode(row: dict) -> dict:
        prompt = tokenizer(PROMPT.format(**row))["input_ids"]
        response = tokenizer(row["output"])["input_ids"] + [tokenizer.eos_token_id]
        return {
            "input_ids": prompt + response,
            "attention_mask": [1] * (len(prompt) + len(response)),
            "labels": [-100] * len(prompt) + response,
        }

    with open(data) as handle:
        rows = [json.loads(line) for line in handle]
    dataset = Dataset.from_list([encode(row) for row in rows])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    times, tokens = [], []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.start)

    class CountingTrainer(Trainer):
        def compute_loss(self, model, inputs, **kwargs):
            tokens.append(int((inputs["labels"][:, 1:] != -100).sum()))
            return super().compute_loss(model, inputs, **kwargs)

    args = TrainingArguments(
        out,
        per_device_train_batch_size=batch,
        max_steps=steps + 1 if steps else -1,
        num_train_epochs=1,
        learning_rate=1e-4,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=42,
        disable_tqdm=True,
        bf16=bf16,
    )
    CountingTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
        callbacks=[Clock()],
    ).train()
    print(json.dumps({"tokens_per_s": sum(tokens[1:]) / sum(times[1:])}))


if __name__ == "__main__":
    main()
