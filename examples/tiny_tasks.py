# Copyright 2026 The llada-moe-hf authors. Licensed under the Apache License, Version 2.0.
"""The tasks of the LoRA example (examples/finetune_lora.py) on the embedded tiny model.

The tiny model (llada_moe_hf/assets/tiny) knows two tasks, "sort 3 1 4 1 5" -> "1 1 3 4 5" and
"reverse 3 1 4 1 5" -> "5 1 4 1 3" (llada_moe_hf/demo.py). The example teaches it a NEW one with LoRA:
"AI 3 1 4 1 5" -> "1", the smallest digit. The tiny tokenizer has 33 words and none for "smallest", so the new
instruction borrows "AI", a word of its chat template's default system prompt that never appears in a question.
The bundled data mixes the new task with the old ones (a replay of what the model knows), all from the training
split: one question in 7 (a fixed hash, as in llada_moe_hf/demo.py) is held out and used only to measure accuracy.

    python examples/tiny_tasks.py      # rewrites examples/data/sft_tiny.jsonl (deterministic)
"""

import json
import random
import sys
from pathlib import Path

import torch

from llada_moe_hf.demo import (
    BLOCK_LENGTH,
    GEN_LENGTH,
    MAX_DIGITS,
    MIN_DIGITS,
    TASKS as OLD_TASKS,
    format_digits,
    is_held_out,
    parse_answer,
    task_answer,
)


NEW_TASK = "AI"
DATA_FILE = Path(__file__).parent / "data" / "sft_tiny.jsonl"
DATA_NEW, DATA_OLD, DATA_SEED = 400, 400, 0  # the bundled file: 400 new-task and 400 old-task examples


def answer(task: str, digits: list[int]) -> list[int]:
    return [min(digits)] if task == NEW_TASK else task_answer(task, digits)


def sample(rng: random.Random, tasks, held_out: bool) -> tuple[str, list[int]]:
    """(task, digits) from the training split (held_out=False) or the held-out split (held_out=True)."""
    while True:
        task = rng.choice(tasks)
        digits = [rng.randrange(10) for _ in range(rng.randint(MIN_DIGITS, MAX_DIGITS))]
        if is_held_out(task, digits) == held_out:
            return task, digits


def sft_rows(new: int, old: int, seed: int) -> list[dict]:
    """`new` examples of the new task and `old` of the known ones, shuffled, as {"prompt", "response"} rows."""
    rng = random.Random(seed)
    questions = [sample(rng, [NEW_TASK], False) for _ in range(new)]
    questions += [sample(rng, OLD_TASKS, False) for _ in range(old)]
    rng.shuffle(questions)
    return [{"prompt": f"{t} {format_digits(d)}", "response": format_digits(answer(t, d))} for t, d in questions]


def held_out_questions(tasks, count: int, seed: int = 1234) -> list[tuple[str, list[int]]]:
    rng = random.Random(seed)
    return [sample(rng, tasks, True) for _ in range(count)]


@torch.no_grad()
def accuracy(model, tokenizer, questions, batch_size: int = 128) -> float:
    """Exact-match accuracy of the answers to `questions` (the reference sampler: GEN_LENGTH tokens in blocks of
    BLOCK_LENGTH, one token per step, temperature 0, low-confidence remasking)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    stop_ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|role_end|>")]
    correct = 0
    for start in range(0, len(questions), batch_size):
        chunk = questions[start : start + batch_size]
        prompts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": f"{t} {format_digits(d)}"}], add_generation_prompt=True, tokenize=False
            )
            for t, d in chunk
        ]
        encoded = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        encoded = encoded.to(device)
        out = model.generate(
            input_ids=encoded["input_ids"],
            attention_mask=encoded["attention_mask"],
            max_new_tokens=GEN_LENGTH,
            block_length=BLOCK_LENGTH,
            steps=GEN_LENGTH,
            temperature=0.0,
            remasking="low_confidence",
            mask_token_id=tokenizer.mask_token_id,
            eos_token_id=stop_ids,
            pad_token_id=tokenizer.pad_token_id,
            stop_at_eos=False,
        )
        for (task, digits), row in zip(chunk, out[:, encoded["input_ids"].shape[1] :].cpu()):
            correct += parse_answer(tokenizer.decode(row, skip_special_tokens=True)) == answer(task, digits)
    model.train(was_training)
    return correct / len(questions)


def write_data(path: Path = DATA_FILE) -> None:
    lines = [json.dumps(row) for row in sft_rows(DATA_NEW, DATA_OLD, DATA_SEED)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(lines)} examples to {path}")


if __name__ == "__main__":
    write_data(Path(sys.argv[1]) if len(sys.argv) > 1 else DATA_FILE)
