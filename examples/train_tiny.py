# Copyright 2026 The llada-moe-hf authors. Licensed under the Apache License, Version 2.0.
"""Train the embedded tiny LLaDA-MoE (llada_moe_hf/assets/tiny) from scratch, reproducibly, on a CPU.

The task ("sort 3 1 4 1 5" / "reverse 3 1 4 1 5", see llada_moe_hf/demo.py) is formatted with the release's
chat template; each response is the answer, <|role_end|>, then <|endoftext|> padding up to the generation
length, as LLaDA SFT does. Training uses this package's own path: LLaDAMoEDataCollator (SFT mode: only the
response is noised, one t per sequence) and the masked-diffusion loss of LLaDAMoEForDiffusionLM.forward.

    python examples/train_tiny.py --output-dir /tmp/tiny            # ~10 min alone on 2 CPU cores (14-18 min shared)
    python examples/train_tiny.py --output-dir llada_moe_hf/assets/tiny --overwrite   # refresh the asset

The checkpoint is written in the Hub release's layout (model_type "llada", architectures ["LLaDAMoEModelLM"],
the release's auto_map and legacy keys, per-expert weight names), checked to reload with identical logits,
then moved into place.
"""

import argparse
import json
import math
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from llada_moe_hf import LLaDAMoEConfig, LLaDAMoEForDiffusionLM
from llada_moe_hf.demo import BLOCK_LENGTH, GEN_LENGTH, format_digits, question_text, sample_question, task_answer
from llada_moe_hf.generation_llada_moe import DiffusionGenerationConfig
from llada_moe_hf.training_llada_moe import LLaDAMoEDataCollator, tokenize_sft_example


sys.path.insert(0, str(Path(__file__).parent))
from build_tiny_tokenizer import ROLE_END, build_tokenizer  # noqa: E402


def tiny_config(tokenizer, **overrides) -> LLaDAMoEConfig:
    """The real architecture at a few MB: MoE in every layer, 8 experts top-2, qk-norm, bidirectional."""
    values = dict(
        vocab_size=len(tokenizer),
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        expert_intermediate_size=128,
        dense_intermediate_size=256,
        num_experts=8,
        num_experts_per_tok=2,
        moe_layer_freq=[1, 1, 1, 1],
        qk_layernorm=True,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        mask_token_id=tokenizer.mask_token_id,
        tie_word_embeddings=False,
    )
    values.update(overrides)
    return LLaDAMoEConfig(**values)


def encode_example(tokenizer, task, digits) -> dict:
    """Chat-formatted SFT example: prompt, answer, <|role_end|>, then <|endoftext|> up to GEN_LENGTH response
    tokens (what the sampler generates), so the model learns to fill the whole generation window."""
    example = tokenize_sft_example(tokenizer, question_text(task, digits), format_digits(task_answer(task, digits)))
    pad = example["prompt_length"] + GEN_LENGTH - len(example["input_ids"])
    example["input_ids"] = example["input_ids"] + [tokenizer.eos_token_id] * max(pad, 0)
    return example


def training_batches(tokenizer, collator, steps, batch_size, seed):
    """Deterministic stream of noised batches from the training split (held-out questions never appear)."""
    rng = random.Random(seed)
    for _ in range(steps):
        features = [encode_example(tokenizer, *sample_question(rng, held_out=False)) for _ in range(batch_size)]
        yield collator(features)


def learning_rate(step, steps, peak, warmup):
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train(model, tokenizer, args):
    collator = LLaDAMoEDataCollator(
        mask_token_id=model.config.mask_token_id, pad_token_id=model.config.pad_token_id, mode="sft", seed=args.seed
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    model.train()
    start, running = time.time(), None
    for step, batch in enumerate(training_batches(tokenizer, collator, args.steps, args.batch_size, args.seed)):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % args.log_every == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {running:.4f}  {time.time() - start:7.1f}s", flush=True)
    model.eval()
    return model


# The Hub release's config.json spelling (see modeling_tests/fixtures/llada-moe-tiny/config.json).
RELEASE_AUTO_MAP = {
    "AutoConfig": "configuration_lladamoe.LLaDAConfig",
    "AutoModel": "modeling_lladamoe.LLaDAMoEModelLM",
    "AutoModelForCausalLM": "modeling_lladamoe.LLaDAMoEModelLM",
}


def release_config_dict(saved: dict) -> dict:
    """Rewrite a config.json written by save_pretrained into the release's keys (model_type "llada", the
    release's architectures and auto_map, legacy rope_theta / partial_rotary_factor / rope_scaling / torch_dtype).
    `mask_token_id` is kept: the release's config has none, and this tiny vocabulary's <|mask|> is not 156895."""
    config = {k: v for k, v in saved.items() if k not in ("rope_parameters", "dtype", "auto_map")}
    rope = saved.get("rope_parameters") or {}
    config.update(
        model_type="llada",
        architectures=["LLaDAMoEModelLM"],
        auto_map=RELEASE_AUTO_MAP,
        rope_theta=rope.get("rope_theta", 50000.0),
        partial_rotary_factor=rope.get("partial_rotary_factor", 1),
        rope_scaling=None,
        torch_dtype=saved.get("dtype", "float32"),
    )
    return dict(sorted(config.items()))


def write_tokenizer_files(tokenizer, directory: Path):
    """save_pretrained, plus the release's spellings: the chat template inside tokenizer_config.json, the
    PreTrainedTokenizerFast class name and a special_tokens_map.json."""
    tokenizer.save_pretrained(directory)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["chat_template"] = tokenizer.chat_template
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (directory / "chat_template.jinja").unlink(missing_ok=True)
    special = {
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "mask_token": tokenizer.mask_token,
        "unk_token": tokenizer.unk_token,
        "additional_special_tokens": list(config.get("extra_special_tokens") or []),
    }
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def tiny_generation_config(tokenizer) -> DiffusionGenerationConfig:
    """generation_config.json: the task's generation window and the exact sampler; stop at <|role_end|> / eos."""
    return DiffusionGenerationConfig(
        max_new_tokens=GEN_LENGTH,
        block_length=BLOCK_LENGTH,
        steps=GEN_LENGTH,
        temperature=0.0,
        remasking="low_confidence",
        mask_token_id=tokenizer.mask_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(ROLE_END)],
        pad_token_id=tokenizer.pad_token_id,
    )


def save_release_layout(model, tokenizer, directory: Path):
    model.generation_config = tiny_generation_config(tokenizer)
    model.save_pretrained(directory)
    for code_file in directory.glob("*.py"):  # the release ships its own code; the demo adds ours
        code_file.unlink()
    config_path = directory / "config.json"
    config_path.write_text(json.dumps(release_config_dict(json.loads(config_path.read_text())), indent=2) + "\n")
    write_tokenizer_files(tokenizer, directory)


@torch.no_grad()
def verify_checkpoint(model, directory: Path, tokenizer):
    """The saved release-layout checkpoint must reload with every weight and give identical logits."""
    from safetensors import safe_open
    from transformers import PreTrainedTokenizerFast

    config = json.loads((directory / "config.json").read_text())
    if config["model_type"] != "llada" or config["architectures"] != ["LLaDAMoEModelLM"]:
        raise RuntimeError("config.json is not in the release's layout")
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    if "model.layers.0.mlp.experts.0.gate_proj.weight" not in keys:
        raise RuntimeError(f"expected per-expert weight names, got e.g. {sorted(keys)[:5]}")
    reloaded = LLaDAMoEForDiffusionLM.from_pretrained(directory).eval()
    batch = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    if not torch.equal(model(batch).logits, reloaded(batch).logits):
        raise RuntimeError("the reloaded checkpoint gives different logits")
    loaded_tokenizer = PreTrainedTokenizerFast.from_pretrained(directory)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "sort 3 1 4"}], add_generation_prompt=True, tokenize=False)
    if loaded_tokenizer(text)["input_ids"] != tokenizer(text)["input_ids"]:
        raise RuntimeError("the reloaded tokenizer tokenizes differently")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True, type=Path)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output-dir")
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--log-every", type=int, default=50)
    args = parser.parse_args(argv)
    if args.output_dir.exists() and any(args.output_dir.iterdir()) and not args.overwrite:
        parser.error(f"{args.output_dir} exists and is not empty; pass --overwrite to replace it.")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    tokenizer = build_tokenizer()
    model = LLaDAMoEForDiffusionLM(tiny_config(tokenizer))
    print(f"tiny LLaDA-MoE: {sum(p.numel() for p in model.parameters()):,} parameters", flush=True)
    train(model, tokenizer, args)

    # Write next to the destination, verify, then move into place.
    args.output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=args.output_dir.parent))
    try:
        save_release_layout(model, tokenizer, staging)
        verify_checkpoint(model, staging, tokenizer)
        if args.output_dir.exists():
            shutil.rmtree(args.output_dir)
        staging.chmod(0o755)  # mkdtemp makes it private; the checkpoint ships inside the package
        for path in staging.iterdir():
            path.chmod(0o644)
        staging.rename(args.output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"checkpoint written to {args.output_dir}")


if __name__ == "__main__":
    main()
