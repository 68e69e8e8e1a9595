"""End-to-end quality of the embedded tiny LLaDA-MoE (llada_moe_hf/assets/tiny) and the `llada-moe demo` command.

The model was trained by examples/train_tiny.py on "sort"/"reverse" digit questions; the questions here come
from the held-out split (a fixed hash of the question, see llada_moe_hf/demo.py), never generated in training.
Run with `-s` to see the figures (they are also in docs/readme/demo.md).
"""

import json
import re

import pytest
from safetensors import safe_open
from transformers import PreTrainedTokenizerFast

from llada_moe_hf import LLaDAMoEForDiffusionLM
from llada_moe_hf.demo import (
    TINY_ASSET_DIR,
    evaluate_samplers,
    format_table,
    held_out_questions,
    is_held_out,
    parse_answer,
    sample_question,
)


HELD_OUT = 200


@pytest.fixture(scope="module")
def tiny():
    model = LLaDAMoEForDiffusionLM.from_pretrained(TINY_ASSET_DIR).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(TINY_ASSET_DIR)
    return model, tokenizer


@pytest.fixture(scope="module")
def results(tiny):
    model, tokenizer = tiny
    results = evaluate_samplers(model, tokenizer, held_out_questions(HELD_OUT), batch_size=128)  # 1 thread: conftest
    print(f"\n{HELD_OUT} held-out questions, batches of 128, 1 CPU thread\n{format_table(results)}")
    return results


def test_exact_sampler_accuracy(results):
    exact = results["exact"]
    assert exact["accuracy"] >= 0.90, exact
    # The reference loop commits exactly one token per forward pass.
    assert exact["forwards_per_batch"] == 16 and exact["tokens_per_forward"] == pytest.approx(1.0)


def test_threshold_decoding_is_faster_at_the_same_quality(results):
    exact, fast = results["exact"], results["threshold 0.9"]
    assert fast["accuracy"] >= exact["accuracy"] - 0.02, (exact, fast)
    assert 2 * fast["forwards_per_batch"] <= exact["forwards_per_batch"], (exact, fast)


def test_dual_cache_keeps_quality(results):
    for base, cached in (("exact", "exact + dual cache"), ("threshold 0.9", "threshold 0.9 + dual cache")):
        assert results[cached]["accuracy"] >= results[base]["accuracy"] - 0.02, (base, results[base], results[cached])
    exact, fast = results["exact"], results["threshold 0.9 + dual cache"]
    assert fast["accuracy"] >= exact["accuracy"] - 0.02, (exact, fast)
    assert 2 * fast["forwards_per_batch"] <= exact["forwards_per_batch"], (exact, fast)


def test_held_out_split_is_disjoint_from_training():
    import random

    questions = held_out_questions(HELD_OUT)
    assert all(is_held_out(task, digits) for task, digits in questions)
    assert len({(t, tuple(d)) for t, d in questions}) > 0.9 * HELD_OUT  # not a handful repeated
    rng = random.Random(0)  # the training stream's generator (examples/train_tiny.py --seed 0)
    assert not any(is_held_out(*sample_question(rng, held_out=False)) for _ in range(5000))


def test_parse_answer():
    assert parse_answer("1 2 3") == [1, 2, 3]
    assert parse_answer("") is None and parse_answer("1 sort 2") is None and parse_answer("12 3") is None


def test_asset_is_in_the_release_layout(tiny):
    model, tokenizer = tiny
    config = json.loads((TINY_ASSET_DIR / "config.json").read_text())
    assert config["model_type"] == "llada" and config["architectures"] == ["LLaDAMoEModelLM"]
    assert config["auto_map"]["AutoModel"] == "modeling_lladamoe.LLaDAMoEModelLM"
    assert {"rope_theta", "partial_rotary_factor", "torch_dtype"} <= set(config) and "rope_parameters" not in config
    assert config["num_experts"] >= 8 and config["num_experts_per_tok"] < config["num_experts"]
    assert config["qk_layernorm"] is True and all(config["moe_layer_freq"])
    with safe_open(str(TINY_ASSET_DIR / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.mlp.experts.7.down_proj.weight" in keys and "model.layers.0.mlp.gate.weight" in keys
    assert not any("gate_up_proj" in k for k in keys)
    assert not list(TINY_ASSET_DIR.glob("*.py"))  # the release layout: our code is added by conversion
    # The release's special tokens, each a single id, and the chat template.
    for token in ("<|endoftext|>", "<|mask|>", "<|role_end|>", "<role>", "</role>"):
        assert len(tokenizer(token, add_special_tokens=False).input_ids) == 1, token
    assert tokenizer.mask_token == "<|mask|>" and model.config.mask_token_id == tokenizer.mask_token_id
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    assert model.config.eos_token_id == tokenizer.eos_token_id
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "sort 3 1"}], add_generation_prompt=True, tokenize=False)
    assert prompt == "<role>SYSTEM</role>detailed thinking off<|role_end|><role>HUMAN</role>sort 3 1<|role_end|><role>ASSISTANT</role>"
    assert tokenizer.unk_token_id not in tokenizer(prompt).input_ids


def test_demo_command_exits_zero(capfd):
    from llada_moe_hf.cli import main

    assert main(["demo", "--show", "1", "--eval", "32", "--batch-size", "32", "--sleep", "0"]) == 0
    out = capfd.readouterr().out  # the demo runs in a child process: capture at the file-descriptor level
    # Loaded as Hub custom code, in a process where the installed package is not imported.
    assert "from transformers_modules." in out and "llada_moe_hf imported: False" in out
    assert "\033" not in out and "<|mask|>" not in out  # not a terminal: the answers only, no drafts or escapes
    assert re.search(r"^A: [0-9 ]+$", out, flags=re.M)
    assert "correct" in out or "WRONG" in out
    for name in ("exact", "threshold 0.9 + dual cache"):
        assert f"| {name} |" in out


def test_demo_refuses_a_bad_model_dir(tmp_path):
    from llada_moe_hf.cli import main

    with pytest.raises(ValueError, match="config.json"):
        main(["demo", "--model", str(tmp_path)])
