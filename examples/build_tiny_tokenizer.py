# Copyright 2026 The llada-moe-hf authors. Licensed under the Apache License, Version 2.0.
"""Build the word-level tokenizer of the embedded tiny LLaDA-MoE (llada_moe_hf/assets/tiny).

It has the release's special tokens (<|endoftext|> as eos and pad, <|mask|>, <|role_end|>, <role>, </role>)
and the release's Ling-style chat template, over a vocabulary of digits, the task words and the words the
chat template itself writes. Usage: python examples/build_tiny_tokenizer.py OUTPUT_DIR [--overwrite]
"""

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast


# Words the Ling chat template writes (role names, its fixed "detailed thinking off" line) and a default
# system prompt, so that any conversation made of task questions tokenizes without [UNK].
TEMPLATE_WORDS = ["SYSTEM", "HUMAN", "ASSISTANT", "OBSERVATION", "detailed", "thinking", "off"]
SYSTEM_WORDS = ["You", "are", "a", "helpful", "AI", "assistant", ".", ","]
TASK_WORDS = ["sort", "reverse"]
DIGITS = [str(d) for d in range(10)]
# The release's special tokens. Their ids differ from the 7B release (its vocabulary has 157184 entries);
# code must read them from the tokenizer / config, never hard-code them.
EOS, MASK, ROLE_END, ROLE_OPEN, ROLE_CLOSE, UNK = "<|endoftext|>", "<|mask|>", "<|role_end|>", "<role>", "</role>", "[UNK]"
SPECIAL_TOKENS = [EOS, MASK, ROLE_END, ROLE_OPEN, ROLE_CLOSE, UNK]


def load_chat_template() -> str:
    """The package's chat template (the release's Ling format)."""
    try:
        from llada_moe_hf.chat import CHAT_TEMPLATE
    except ImportError:  # until llada_moe_hf/chat.py exists: the same format, as documented for the release
        CHAT_TEMPLATE = (
            "<role>SYSTEM</role>"
            "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n{% endif %}"
            "detailed thinking off<|role_end|>"
            "{% for message in messages %}"
            "{% if message['role'] == 'user' %}<role>HUMAN</role>{{ message['content'] }}<|role_end|>"
            "{% elif message['role'] == 'assistant' %}<role>ASSISTANT</role>{{ message['content'] }}<|role_end|>"
            "{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}<role>ASSISTANT</role>{% endif %}"
        )
    return CHAT_TEMPLATE


def build_tokenizer() -> PreTrainedTokenizerFast:
    words = DIGITS + TASK_WORDS + TEMPLATE_WORDS + SYSTEM_WORDS
    vocab = {word: i for i, word in enumerate(words + SPECIAL_TOKENS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Words and punctuation; digits one per token even when written together ("314" -> 3 1 4).
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS,
        pad_token=EOS,
        mask_token=MASK,
        unk_token=UNK,
        additional_special_tokens=[ROLE_END, ROLE_OPEN, ROLE_CLOSE],
        model_max_length=512,
        padding_side="left",  # batched diffusion generation pads prompts on the left
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = load_chat_template()
    return tokenizer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", type=Path, help="directory to write the tokenizer files into")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT_DIR if it exists and is not empty")
    args = parser.parse_args(argv)
    out = args.output_dir
    if out.exists() and not out.is_dir():
        parser.error(f"{out} exists and is not a directory.")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        parser.error(f"{out} exists and is not empty; pass --overwrite to replace it.")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written beside OUTPUT_DIR, then moved in: an interrupted run leaves OUTPUT_DIR as it was.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        build_tokenizer().save_pretrained(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the result gets the user's usual permissions
        old = None
        if out.exists():  # kept until the new one is in place
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"tokenizer written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
