# Copyright 2026 The llada-moe-hf authors. Licensed under the Apache License, Version 2.0.
"""Data of the local lm-eval tasks for the embedded tiny model (`llada_moe_tiny_digits*.yaml` beside this file).

Held-out questions of the tiny model's task (never trained on; see llada_moe_hf/demo.py): "sort 3 1 4 1 5" ->
"1 1 3 4 5", "reverse 3 1 4 1 5" -> "5 1 4 1 3". Built in memory (no download), the same on every run.
Each document has the question, the answer, and four distinct choices for the likelihood task: the answer,
the other task's answer, the digits as given, and the digits sorted in descending order, in a fixed shuffled
order (`gold` is the answer's index).
"""

import random

from llada_moe_hf.demo import format_digits, held_out_questions, question_text, task_answer


NUM_DOCUMENTS = 200
SEED = 1234  # the held-out questions of the demo's quality test


def _choices(task: str, digits: list[int]) -> list[str]:
    other = "reverse" if task == "sort" else "sort"
    candidates = [task_answer(task, digits), task_answer(other, digits), digits, sorted(digits, reverse=True)]
    return [format_digits(c) for c in candidates]


def documents(count: int = NUM_DOCUMENTS, seed: int = SEED) -> list[dict]:
    """`count` documents whose four choices are distinct (questions where two coincide are skipped)."""
    docs, drawn = [], 0
    while len(docs) < count:
        drawn = 2 * drawn + count  # draw more questions until enough have four distinct choices
        docs = []
        for task, digits in held_out_questions(drawn, seed=seed):
            choices = _choices(task, digits)
            if len(set(choices)) < 4:
                continue
            answer = choices[0]
            random.Random(f"{seed}:{question_text(task, digits)}").shuffle(choices)
            docs.append(
                {
                    "question": question_text(task, digits),
                    "answer": answer,
                    "choices": choices,
                    "gold": choices.index(answer),
                }
            )
            if len(docs) == count:
                break
    return docs


def load_digits(**kwargs):
    """lm-eval `custom_dataset`: a DatasetDict with a "test" split. lm-eval passes the run's metadata (model
    arguments) as keyword arguments; they do not change the data."""
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(documents())})
