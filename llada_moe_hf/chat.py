# Copyright 2026 The llada-moe-hf authors. Licensed under the Apache License, Version 2.0.
"""The Ling-style chat format LLaDA-MoE-7B-A1B-Instruct was tuned with, and small helpers around it.

Format (what dInfer's benchmarks hard-code for LLaDA-MoE, and the Ling-2.0 template's structure):

    <role>SYSTEM</role>{system}\\ndetailed thinking off<|role_end|><role>HUMAN</role>{user}<|role_end|>
    <role>ASSISTANT</role>{answer}<|role_end|>...<role>ASSISTANT</role>

(without line breaks). The SYSTEM turn is always emitted; the system text and its "\\n" only when the first
message is a system message. Tool results go under `<role>OBSERVATION</role>` wrapped in `<tool_response>`.
The exact bytes of the release's `tokenizer_config.json` template were not available when this was written:
`ensure_chat_template` keeps a tokenizer's own template and only installs this one where none is set.

This module is not imported by the modeling code (it does not travel to the Hub as custom code).
"""

from __future__ import annotations


ROLE_END = "<|role_end|>"
MASK_TOKEN = "<|mask|>"
EOS_TOKEN = "<|endoftext|>"

CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system_text = messages[0]['content'] + '\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system_text = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- if tools -%}"
    "{{- raise_exception('This chat template does not support tools: format the tool descriptions into the system message.') -}}"
    "{%- endif -%}"
    "{{- '<role>SYSTEM</role>' + system_text + 'detailed thinking off<|role_end|>' -}}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- '<role>HUMAN</role>' + message['content'] + '<|role_end|>' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- '<role>ASSISTANT</role>' + message['content'] + '<|role_end|>' -}}"
    "{%- elif message['role'] == 'tool' -%}"
    "{{- '<role>OBSERVATION</role><tool_response>\\n' + message['content'] + '\\n</tool_response><|role_end|>' -}}"
    "{%- elif message['role'] == 'system' -%}"
    "{{- '<role>SYSTEM</role>' + message['content'] + '<|role_end|>' -}}"
    "{%- else -%}"
    "{{- raise_exception('Unknown chat role ' + message['role'] + ': use system, user, assistant or tool.') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<role>ASSISTANT</role>' -}}"
    "{%- endif -%}"
)

DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant."


def render_chat(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Render `messages` ([{"role": ..., "content": ...}]) with CHAT_TEMPLATE, without a tokenizer."""
    import jinja2

    def raise_exception(message):
        raise ValueError(message)

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    _check_messages(messages)
    return env.from_string(CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=add_generation_prompt)


def _check_messages(messages):
    if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
        raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts.")
    for m in messages:
        if "role" not in m or not isinstance(m.get("content"), str):
            raise ValueError(f"Each message needs a 'role' and a string 'content'; got {m!r}.")


def ensure_chat_template(tokenizer) -> bool:
    """Install CHAT_TEMPLATE on a tokenizer that has none. Returns True if it was installed."""
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = CHAT_TEMPLATE
    return True


def single_token_id(tokenizer, token: str) -> int | None:
    """The id of `token` if the tokenizer maps it to exactly one known id, else None."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == getattr(tokenizer, "unk_token_id", None):
        return None
    ids = tokenizer.encode(token, add_special_tokens=False)
    return token_id if ids == [token_id] else None


def stop_token_ids(tokenizer, model_config=None) -> list[int]:
    """Ids that end an answer: the model's eos id(s), the tokenizer's eos and `<|role_end|>` (end of turn).
    Not stopping at `<|role_end|>` costs accuracy on chat benchmarks (see the reference notes)."""
    ids: list[int] = []
    eos = getattr(model_config, "eos_token_id", None) if model_config is not None else None
    for value in (eos if isinstance(eos, (list, tuple)) else [eos]):
        if value is not None and value not in ids:
            ids.append(int(value))
    for value in (getattr(tokenizer, "eos_token_id", None), single_token_id(tokenizer, ROLE_END)):
        if value is not None and value not in ids:
            ids.append(int(value))
    return ids


def mask_token_id(tokenizer) -> int | None:
    """The `<|mask|>` id according to the tokenizer (its mask_token if declared, else the literal token)."""
    declared = getattr(tokenizer, "mask_token_id", None)
    if declared is not None:
        return int(declared)
    return single_token_id(tokenizer, MASK_TOKEN)


def encode_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of the rendered conversation (the tokenizer's template, or CHAT_TEMPLATE if it has none).
    No extra BOS/special tokens are added: the template is the whole prompt, as in the model card."""
    _check_messages(messages)
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    else:
        text = render_chat(messages, add_generation_prompt=add_generation_prompt)
    return tokenizer.encode(text, add_special_tokens=False)


def clean_response(text: str) -> str:
    """Cut an answer at the first end-of-turn/end-of-text marker and strip leftover mask tokens."""
    for marker in (ROLE_END, EOS_TOKEN):
        cut = text.find(marker)
        if cut != -1:
            text = text[:cut]
    return text.replace(MASK_TOKEN, "").strip()


__all__ = [
    "CHAT_TEMPLATE",
    "DEFAULT_SYSTEM_PROMPT",
    "ROLE_END",
    "clean_response",
    "encode_chat",
    "ensure_chat_template",
    "mask_token_id",
    "render_chat",
    "stop_token_ids",
]
