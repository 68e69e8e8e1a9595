# Copyright 2026 The llada-moe-hf authors. Licensed under the Apache License, Version 2.0.
"""`pipeline("text-generation", model=repo, trust_remote_code=True)` for LLaDA-MoE.

transformers' own text-generation pipeline loads an `AutoModelForCausalLM` and decodes left to right; LLaDA-MoE
is a masked-diffusion model with its own `generate()`. `save_pretrained` writes this file into the repo and
names it in config.json's `custom_pipelines`, so that `pipeline()` uses it (transformers' custom pipelines).
It takes what the text-generation pipeline takes (a prompt, a chat, or a list of them) and returns the same
`[{"generated_text": ...}]`. This file travels to the Hub as custom code: it imports transformers only.
"""

import torch
from transformers import Pipeline


class LLaDAMoEChat:
    """A conversation (a list of {"role", "content"} dicts), kept whole when the pipeline iterates over inputs."""

    def __init__(self, messages):
        if not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise ValueError("A chat must be a list of dicts with 'role' and 'content' keys.")
        self.messages = list(messages)


def is_chat(value) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(m, dict) for m in value)


class LLaDAMoETextGenerationPipeline(Pipeline):
    """Text generation with LLaDA diffusion sampling.

    Call parameters: `return_full_text` (default True: a prompt is followed by the answer, a chat gets the
    assistant's answer appended; False gives the answer alone), `skip_special_tokens` (default True), and
    every `generate()` parameter (`max_new_tokens`, `steps`, `block_length`, `threshold`, `cache_mode`,
    `temperature`, ...), which the model's `generation_config` supplies when not given. Without an
    `eos_token_id`, generation stops at the model's eos and, when the tokenizer has it, at `<|role_end|>`.
    """

    _load_tokenizer = True
    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _pipeline_calls_generate = False  # our generate() takes diffusion parameters, not a GenerationConfig's

    def __call__(self, text_inputs, **kwargs):
        if is_chat(text_inputs):
            text_inputs = LLaDAMoEChat(text_inputs)
        elif isinstance(text_inputs, (list, tuple)) and text_inputs and all(is_chat(c) for c in text_inputs):
            text_inputs = [LLaDAMoEChat(c) for c in text_inputs]
        return super().__call__(text_inputs, **kwargs)

    def _sanitize_parameters(self, return_full_text=None, skip_special_tokens=None, **generate_kwargs):
        postprocess = {}
        if return_full_text is not None:
            postprocess["return_full_text"] = return_full_text
        if skip_special_tokens is not None:
            postprocess["skip_special_tokens"] = skip_special_tokens
        return {}, generate_kwargs, postprocess

    def preprocess(self, prompt):
        if isinstance(prompt, LLaDAMoEChat):
            inputs = self.tokenizer.apply_chat_template(
                prompt.messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"
            )
        elif isinstance(prompt, str):
            inputs = self.tokenizer(prompt, return_tensors="pt")
        else:
            raise ValueError(f"Expected a prompt (str) or a chat (a list of role/content dicts), got {type(prompt)}.")
        return {"input_ids": inputs["input_ids"], "attention_mask": inputs.get("attention_mask"), "prompt": prompt}

    def _forward(self, model_inputs, **generate_kwargs):
        input_ids = model_inputs["input_ids"]
        if "eos_token_id" not in generate_kwargs and "generation_config" not in generate_kwargs:
            generate_kwargs["eos_token_id"] = self.stop_ids()
        sequences = self.model.generate(
            input_ids=input_ids, attention_mask=model_inputs["attention_mask"], **generate_kwargs
        )
        if not isinstance(sequences, torch.Tensor):  # return_dict_in_generate=True
            sequences = sequences.sequences
        return {"new_tokens": sequences[:, input_ids.shape[1] :], "prompt": model_inputs["prompt"]}

    def stop_ids(self):
        """The model's eos id(s), plus `<|role_end|>` (the end of a chat turn) when the tokenizer has it."""
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.model.config.eos_token_id
        ids = [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]
        role_end = self.tokenizer.convert_tokens_to_ids("<|role_end|>")
        if isinstance(role_end, int) and role_end != self.tokenizer.unk_token_id and role_end not in ids:
            ids.append(role_end)
        return ids or None

    def postprocess(self, model_outputs, return_full_text=True, skip_special_tokens=True):
        prompt = model_outputs["prompt"]
        results = []
        for tokens in model_outputs["new_tokens"]:
            text = self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)
            if not return_full_text:
                generated = text
            elif isinstance(prompt, LLaDAMoEChat):
                generated = prompt.messages + [{"role": "assistant", "content": text}]
            else:
                generated = prompt + text
            results.append({"generated_text": generated})
        return results


__all__ = ["LLaDAMoETextGenerationPipeline"]
