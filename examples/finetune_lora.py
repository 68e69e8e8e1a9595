# Copyright 2026 The llada-moe-hf authors. Licensed under the Apache License, Version 2.0.
"""LoRA SFT of LLaDA-MoE with transformers.Trainer and PEFT (experts included), on a jsonl of prompt/response.

    # CPU, the embedded tiny model, bundled data (about a minute): teaches it a new task
    python examples/finetune_lora.py --output-dir /tmp/lora-tiny

    # GPU, the 7B (bf16 base, LoRA on attention + experts, gradient checkpointing):
    python examples/finetune_lora.py --model inclusionAI/LLaDA-MoE-7B-A1B-Instruct --data my.jsonl \\
        --output-dir lora-7b --epochs 3 --batch-size 4 --grad-accum 8 --max-length 1024 \\
        --lr 1e-4 --gradient-checkpointing

    # several processes: data parallel (a whole copy each), or FSDP2 with --fsdp (base weights sharded)
    torchrun --nproc-per-node 8 examples/finetune_lora.py --model ... --data my.jsonl --output-dir lora-7b --fsdp
    accelerate launch --multi_gpu --num_processes 8 examples/finetune_lora.py ... --fsdp

Each jsonl line is {"prompt": "...", "response": "..."}. Examples are formatted with the model's chat template
(the package's CHAT_TEMPLATE when the tokenizer has none) and noised by LLaDAMoEDataCollator in SFT mode: only
the response (with its end-of-turn, EOS and EOS padding) is masked, one ratio t per sequence, loss weighted by
1/t and normalised by the answer length. The Trainer writes checkpoints to OUTPUT_DIR/checkpoint-N; the final
adapter goes to OUTPUT_DIR/adapter (load it with PeftModel.from_pretrained(base, OUTPUT_DIR/"adapter")).

Without --model, the script uses the package's embedded tiny model (llada_moe_hf/assets/tiny), which knows
"sort 3 1 4 1 5" -> "1 1 3 4 5" and "reverse 3 1 4 1 5" -> "5 1 4 1 3". The bundled data
(examples/data/sft_tiny.jsonl, made by examples/tiny_tasks.py) teaches it a new task, "AI 3 1 4 1 5" -> "1" (the
smallest digit), mixed with examples of the tasks it knows; the script prints held-out accuracy on the known and
the new task before and after training (--eval-questions). If the embedded model is not installed, it builds a
TINY RANDOM model and a word-level tokenizer in OUTPUT_DIR/tiny-random-base: that run only shows the pipeline
works, it does not make a useful model.
"""

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer, Trainer, TrainingArguments

from llada_moe_hf import LLaDAMoEConfig, LLaDAMoEForDiffusionLM
from llada_moe_hf.distributed import (
    init_distributed, is_main_process, launched_distributed, make_distributed_config, run_on_main_process,
    silence_other_ranks, world_size,
)
from llada_moe_hf.lora import default_lora_config, get_lora_model
from llada_moe_hf.staging import normalize_permissions
from llada_moe_hf.training_llada_moe import LLaDAMoEDataCollator, tokenize_sft_example


HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))  # tiny_tasks.py, build_tiny_tokenizer.py
DEFAULT_DATA = HERE / "data" / "sft_tiny.jsonl"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="base model path or Hub repo id (default: the package's tiny model)")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="jsonl with prompt/response (default: %(default)s)")
    parser.add_argument("--output-dir", required=True, help="checkpoints and the final adapter go here")
    parser.add_argument("--overwrite-output-dir", action="store_true", help="allow a non-empty output dir")
    parser.add_argument("--epochs", type=float, default=None, help="default: 4 for the tiny model, 3 otherwise")
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps (-1: epochs)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--lr", type=float, default=None, help="default: 1e-3 for the tiny model, 1e-4 otherwise")
    parser.add_argument("--max-length", type=int, default=None, help="truncate responses beyond this many tokens")
    parser.add_argument("--r", type=int, default=16, help="LoRA rank (per expert on the expert targets)")
    parser.add_argument("--lora-alpha", type=int, default=32)
    parser.add_argument("--no-experts", action="store_true", help="LoRA on attention/MLP linears only")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--experts-implementation", default=None, help="auto (default), cpu_moe, eager, grouped_mm or fused_moe (CUDA)")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                        help="base weights dtype; auto = bfloat16 on a bf16-capable GPU, else float32")
    parser.add_argument("--save-steps", type=int, default=100)
    parser.add_argument("--eval-questions", type=int, default=None,
                        help="held-out questions per task for the tiny tasks' accuracy before and after training "
                        "(default: 128 for the tiny model on one process, 0 = off otherwise)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="load --model as custom code instead of with this package")
    parser.add_argument("--fsdp", action="store_true",
                        help="under torchrun / accelerate launch: FSDP2 shards the base model over the processes "
                        "(default: data parallel, a full copy per process)")
    return parser.parse_args(argv)


def setup_launch(args):
    """Under torchrun / accelerate launch: join the process group and keep every rank but 0 quiet."""
    if args.fsdp and not launched_distributed():
        raise SystemExit("--fsdp shards the model over several processes: launch with torchrun --nproc-per-node N "
                         "(or accelerate launch --multi_gpu --num_processes N).")
    if launched_distributed():
        init_distributed()
        silence_other_ranks()


def parallel_load_kwargs(args) -> dict:
    """from_pretrained arguments for --fsdp: transformers' FSDP2 shards the base weights over the processes; the
    LoRA weights added afterwards stay whole on each rank and Trainer averages their gradients."""
    if not args.fsdp:
        return {}
    import peft
    import transformers
    from packaging.version import Version

    # Trainer on a model sharded at load time (5.19 aborts); LoRA on FSDP2 weight shards (older PEFT fails).
    if Version(transformers.__version__) < Version("5.20") or Version(peft.__version__) < Version("0.21"):
        raise SystemExit(f"--fsdp needs transformers >= 5.20 and peft >= 0.21 (installed: {transformers.__version__}, "
                         f"{peft.__version__}): pip install -U 'transformers>=5.20' 'peft>=0.21', or train data "
                         "parallel without --fsdp.")
    return {"distributed_config": make_distributed_config(fsdp_size=world_size())}


def parallel_training_args(args) -> dict:
    """TrainingArguments for the launch (Trainer itself runs data parallel under torchrun)."""
    # Trainer cannot checkpoint the optimizer of a model sharded at load time: checkpoints hold the adapter.
    if args.fsdp:
        return {"save_only_model": True}
    # Data parallel: every LoRA weight gets a gradient at every step (the expert adapters act on the whole fused
    # weight), so DDP need not search for unused ones (Trainer's default, with a warning every run).
    return {"ddp_find_unused_parameters": False} if launched_distributed() else {}


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise SystemExit(f"--data {path}: no such file.")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise SystemExit(f"{path}:{number}: not valid JSON ({error}).")
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not isinstance(row.get("response"), str):
            raise SystemExit(f'{path}:{number}: each line must be {{"prompt": str, "response": str}}.')
        rows.append(row)
    if not rows:
        raise SystemExit(f"{path}: no examples.")
    return rows


def load_model_and_tokenizer(args, dtype):
    # The tokenizer is loaded with the model's config: without it AutoTokenizer reads config.json itself, whose
    # release model_type ("llada", with an auto_map) it does not know (a remote-code prompt, or warnings).
    if args.model:
        kwargs = dict(dtype=dtype, experts_implementation=args.experts_implementation, **parallel_load_kwargs(args))
        if args.trust_remote_code:
            model = AutoModel.from_pretrained(args.model, trust_remote_code=True, **kwargs)
        else:
            # The class, not AutoModel: it also loads the Hub release, whose model_type "llada" is no Auto key.
            model = LLaDAMoEForDiffusionLM.from_pretrained(args.model, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(args.model, config=model.config, trust_remote_code=False)
        return model, tokenizer, args.model
    from llada_moe_hf.demo import TINY_ASSET_DIR

    if (TINY_ASSET_DIR / "config.json").is_file():
        print(f"[tiny] using the package's embedded tiny model: {TINY_ASSET_DIR}")
        model = LLaDAMoEForDiffusionLM.from_pretrained(TINY_ASSET_DIR, dtype=dtype, **parallel_load_kwargs(args))
        tokenizer = AutoTokenizer.from_pretrained(TINY_ASSET_DIR, config=model.config, trust_remote_code=False)
        return model, tokenizer, str(TINY_ASSET_DIR)
    return build_tiny_random(args, dtype, Path(args.output_dir) / "tiny-random-base")


def build_tiny_random(args, dtype, folder: Path):
    """A TINY RANDOM LLaDA-MoE + word-level tokenizer (only to show the pipeline; not a useful model)."""
    from build_tiny_tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(args.seed)
    config = LLaDAMoEConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        expert_intermediate_size=64, dense_intermediate_size=128, num_experts=8, num_experts_per_tok=2,
        shared_expert_intermediate_size=64, moe_layer_freq=[1, 1], max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        mask_token_id=tokenizer.mask_token_id, initializer_range=0.2,
    )
    LLaDAMoEForDiffusionLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    print(f"[tiny] NOTE: built a TINY RANDOM model + tokenizer in {folder} (the embedded tiny model is not "
          "installed); this run shows the pipeline, not a useful model.")
    model = LLaDAMoEForDiffusionLM.from_pretrained(folder, dtype=dtype, **parallel_load_kwargs(args))
    return model, tokenizer, str(folder)


def chat_template_for(tokenizer):
    if getattr(tokenizer, "chat_template", None):
        return None
    from llada_moe_hf.chat import CHAT_TEMPLATE

    return CHAT_TEMPLATE


def check_output_dir(path: Path, overwrite: bool):
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise SystemExit(f"--output-dir {path} is not empty; pass --overwrite-output-dir to write into it anyway.")
    path.mkdir(parents=True, exist_ok=True)


def move_into_place(staging: Path, final: Path):
    normalize_permissions(staging)  # mkdtemp and save_pretrained create 0700 / 0600
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)


def pick_dtype(name):
    if name == "bfloat16" or (name == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float32


@torch.no_grad()
def eval_loss(model, batches):
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    losses = [model(**{k: v.to(device) for k, v in batch.items()}).loss.item() for batch in batches]
    model.train(was_training)
    return sum(losses) / len(losses)


def task_accuracies(model, tokenizer, count):
    """Held-out accuracy on the tiny model's known tasks and on the new task of the bundled data ({} if count=0)."""
    if not count:
        return {}
    from tiny_tasks import NEW_TASK, OLD_TASKS, accuracy, held_out_questions

    return {
        f"known tasks ({', '.join(OLD_TASKS)})": accuracy(model, tokenizer, held_out_questions(OLD_TASKS, count)),
        f"new task ({NEW_TASK} DIGITS -> the smallest digit)": accuracy(
            model, tokenizer, held_out_questions([NEW_TASK], count)
        ),
    }


def build_features(args, tokenizer):
    rows = read_jsonl(Path(args.data))
    template = chat_template_for(tokenizer)
    return [tokenize_sft_example(tokenizer, r["prompt"], r["response"], args.max_length, template) for r in rows]


def build_trainer(args, model, features, collator, output_dir, tiny, dtype):
    training_args = TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=args.epochs if args.epochs is not None else (4.0 if tiny else 3.0),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr if args.lr is not None else (1e-3 if tiny else 1e-4),
        lr_scheduler_type="cosine",
        warmup_steps=5 if tiny else 20,
        weight_decay=0.0,
        logging_steps=20,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=2,
        bf16=dtype == torch.bfloat16,
        remove_unused_columns=False,  # the collator needs "prompt_length"
        report_to=[],
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        # only when asked: the argument is deprecated (renamed) in recent transformers
        **({"gradient_checkpointing": True} if args.gradient_checkpointing else {}),
        **parallel_training_args(args),
    )
    return Trainer(model=model, args=training_args, train_dataset=features, data_collator=collator)


def save_adapter(model, output_dir: Path) -> Path:
    """Write the adapter beside its destination, then move it into place."""
    final = output_dir / "adapter"
    staging = Path(run_on_main_process(lambda: tempfile.mkdtemp(prefix=".adapter.", dir=output_dir)))
    # Every rank takes part (a sharded model gathers its tensors); rank 0 writes.
    model.save_pretrained(staging, is_main_process=is_main_process())
    run_on_main_process(lambda: move_into_place(staging, final))
    return final


def print_summary(base_name, loss, accuracy, count):
    print(f"base model: {base_name}")
    print(f"masked-diffusion loss on a fixed noised batch: before {loss['before']:.4f}, after {loss['after']:.4f}")
    if accuracy["before"]:
        print(f"held-out accuracy ({count} questions each, never trained on): before -> after")
        for name, before in accuracy["before"].items():
            print(f"  {name:<48} {100 * before:5.1f}% -> {100 * accuracy['after'][name]:5.1f}%")


def main(argv=None):
    args = parse_args(argv)
    setup_launch(args)
    output_dir = Path(args.output_dir)
    run_on_main_process(lambda: check_output_dir(output_dir, args.overwrite_output_dir))
    dtype = pick_dtype(args.dtype)
    model, tokenizer, base_name = load_model_and_tokenizer(args, dtype)
    tiny = args.model is None
    # Held-out accuracy of the tiny model's tasks by default on one process (every rank would repeat it).
    default_questions = 128 if tiny and not launched_distributed() else 0
    eval_questions = args.eval_questions if args.eval_questions is not None else default_questions

    features = build_features(args, tokenizer)
    config = model.config
    mask_id = config.mask_token_id if config.mask_token_id is not None else tokenizer.mask_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collator = LLaDAMoEDataCollator(mask_token_id=mask_id, pad_token_id=pad_id, mode="sft", max_length=args.max_length)
    # A fixed noised batch set (its own seed) to report the loss before and after training.
    eval_collator = LLaDAMoEDataCollator(
        mask_token_id=mask_id, pad_token_id=pad_id, max_length=args.max_length, seed=1234
    )
    eval_features = features[:64]
    eval_batches = [
        eval_collator(eval_features[i : i + args.batch_size]) for i in range(0, len(eval_features), args.batch_size)
    ]

    lora_config = default_lora_config(model, r=args.r, lora_alpha=args.lora_alpha, experts=not args.no_experts)
    model = get_lora_model(model, lora_config)
    model.print_trainable_parameters()
    trainer = build_trainer(args, model, features, collator, output_dir, tiny, dtype)

    loss = {"before": eval_loss(model, eval_batches)}
    accuracy = {"before": task_accuracies(model, tokenizer, eval_questions)}
    start = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - start
    loss["after"] = eval_loss(model, eval_batches)
    accuracy["after"] = task_accuracies(model, tokenizer, eval_questions)

    final = save_adapter(model, output_dir)
    print_summary(base_name, loss, accuracy, eval_questions)
    print(f"trained {trainer.state.global_step} steps in {elapsed:.1f} s; adapter saved to {final}")
    if not math.isfinite(loss["after"]):
        raise SystemExit("the loss is not finite after training.")
    return {"loss": loss, "accuracy": accuracy, "steps": trainer.state.global_step, "train_seconds": elapsed}


if __name__ == "__main__":
    main()
