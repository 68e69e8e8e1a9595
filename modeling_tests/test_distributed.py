"""Issue 14: several processes (two CPU processes, gloo) against one, on the golden fixture.

One group of two processes (`distributed_workers.run_checks`) runs every sharded check, since starting processes
is most of the cost; `llada-moe generate` runs under a real `torchrun`. transformers 5.17-5.24 differ in what they
offer (see `llada_moe_hf.distributed.make_distributed_config`); a check the installed version cannot run is
skipped with the version it needs.
"""

import io
import os
import shutil
import subprocess
import sys

import peft
import pytest
import torch
import transformers
from packaging.version import Version
from peft import PeftModel
from transformers.distributed import DistributedConfig

import distributed_workers as workers
from conftest import FIXTURE_DIR, REPO_ROOT, tiny_config
from test_cli_generate import tiny_tokenizer
from llada_moe_hf import LLaDAMoEConfig, LLaDAMoEForDiffusionLM
from llada_moe_hf import fused_moe_llada_moe as fused
from llada_moe_hf.cli import main
from llada_moe_hf.demo import TINY_ASSET_DIR
from llada_moe_hf.distributed import make_distributed_config
from llada_moe_hf.lora import get_lora_model


FIELDS = DistributedConfig.__dataclass_fields__
HAS_EP_SIZE = "ep_size" in FIELDS  # transformers >= 5.19: ep_size, token dispatch (all-to-all), native FSDP2 in Trainer
HAS_EP_IMPLEMENTATION = "ep_implementation" in FIELDS  # >= 5.23: ep_implementation="all_reduce" / "all_to_all"
VERSION = transformers.__version__
PEFT_LORA_ON_SHARDS = Version(peft.__version__) >= Version("0.21")  # older PEFT runs LoRA on the FSDP2 weight shard
TRAINER_FSDP2 = Version(VERSION) >= Version("5.20")  # Trainer on a model sharded at load time (5.19 aborts)

CHECKS = ["custom_code_tp", "tp", "tp_grads", "finetune_ddp"]
if HAS_EP_IMPLEMENTATION or not HAS_EP_SIZE:  # < 5.19: the only expert parallelism is the all-reduce one
    CHECKS.append("ep_all_reduce")
if HAS_EP_SIZE:
    CHECKS.append("ep_all_to_all")
if fused.is_fused_moe_available(torch.device("cpu")):  # Triton's interpreter (conftest sets TRITON_INTERPRET=1)
    CHECKS.append("tp_fused_moe")
    if HAS_EP_IMPLEMENTATION or not HAS_EP_SIZE:
        CHECKS.append("ep_fused_moe")
if PEFT_LORA_ON_SHARDS:
    CHECKS.append("fsdp_lora_grads")
    if TRAINER_FSDP2:
        CHECKS.append("finetune_fsdp")
CHECKS.append("chat_cli")  # last: it leaves rank 1 silenced
UNAVAILABLE = f"transformers {VERSION} / peft {peft.__version__} cannot run it (see CHECKS)"


@pytest.fixture(scope="module")
def cli_model_dir(tmp_path_factory):
    """The fixture's weights with a word-level tokenizer (its vocabulary of 384 splits over 2 ranks)."""
    directory = tmp_path_factory.mktemp("cli-model")
    for path in FIXTURE_DIR.iterdir():
        if not path.name.startswith("golden"):
            shutil.copy(path, directory / path.name)
    tiny_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def group(tmp_path_factory, cli_model_dir):
    """Runs every check in one group of two processes; returns the folder of their results."""
    tmp = tmp_path_factory.mktemp("distributed")
    repo = tmp / "custom-code-repo"
    LLaDAMoEForDiffusionLM.from_pretrained(FIXTURE_DIR).save_pretrained(repo)
    out = tmp / "results"
    out.mkdir()
    env = {"HF_MODULES_CACHE": str(tmp / "modules"), "TOKENIZERS_PARALLELISM": "false"}
    try:
        workers.spawn(workers.run_checks, 2, str(out), CHECKS, str(repo), str(cli_model_dir), env=env)
    except Exception as error:  # a process died (abort, signal): the checks it did not finish report it
        (out / "crash.txt").write_text(f"{type(error).__name__}: {error}")
    return out


def result(out, name, rank=0):
    if name not in CHECKS:
        pytest.skip(f"{name}: {UNAVAILABLE}")
    error = out / f"{name}.{rank}.err"
    if error.exists():
        pytest.fail(f"{name} failed on rank {rank}:\n{error.read_text()}")
    path = out / f"{name}.{rank}.pt"
    if not path.exists():
        crash = (out / "crash.txt").read_text() if (out / "crash.txt").exists() else "no result"
        started = (out / f"{name}.{rank}.started").exists()
        pytest.fail(f"{name} on rank {rank}: {'the process died during it' if started else 'never ran'} ({crash})")
    return torch.load(path, weights_only=False)


def assert_golden_logits(logits, golden):
    torch.testing.assert_close(logits, golden["logits.logits"], rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------ inference


@pytest.mark.slow  # shares one 2-process group (about 30 s on 2 cores)
@pytest.mark.parametrize("rank", [0, 1])
def test_tensor_parallel_logits_and_generation(group, golden, rank):
    res = result(group, "tp", rank)
    assert_golden_logits(res["logits"], golden)
    assert torch.equal(res["generated"], golden["gen0.output"])  # the original sampler, token for token
    # Whole heads per rank (4 heads of 16 -> 2 per rank), qk-norm weight whole, o_proj split on its input.
    assert res["placements"]["q_proj"] == "(Shard(dim=0),)" and res["local_shapes"]["q_proj"] == (32, 64)
    assert res["placements"]["o_proj"] == "(Shard(dim=1),)" and res["local_shapes"]["o_proj"] == (64, 32)
    assert res["local_shapes"]["q_norm"] == (16,)
    assert res["local_shapes"]["gate_up_proj"] == (16, 32, 64)  # every expert, half its width


@pytest.mark.slow  # shares one 2-process group (about 30 s on 2 cores)
@pytest.mark.parametrize("name, implementation", [("ep_all_reduce", "AllReduceEP"), ("ep_all_to_all", "AllToAllEP")])
def test_tensor_and_expert_parallel_logits(group, golden, name, implementation):
    for rank in (0, 1):
        res = result(group, name, rank)
        assert_golden_logits(res["logits"], golden)
        assert torch.equal(res["generated"], golden["gen0.output"])
        assert res["num_local_experts"] == 8 and res["local_shapes"]["gate_up_proj"] == (8, 64, 64)  # 8 whole experts
        if HAS_EP_IMPLEMENTATION:
            assert res["ep_implementation"] == implementation


@pytest.mark.slow  # shares one 2-process group (about 30 s on 2 cores)
@pytest.mark.parametrize("name", ["tp_fused_moe", "ep_fused_moe"])
def test_fused_moe_sharded_logits(group, golden, name):
    """experts_implementation="fused_moe" (Triton interpreter) under TP, and under TP+EP where the experts get the
    skipped-route id (all_reduce; the only expert parallelism before transformers 5.19)."""
    for rank in (0, 1):
        res = result(group, name, rank)
        assert_golden_logits(res["logits"], golden)
        if name == "ep_fused_moe":
            assert res["num_local_experts"] == 8
            if HAS_EP_IMPLEMENTATION:
                assert res["ep_implementation"] == "AllReduceEP"


@pytest.mark.slow  # shares one 2-process group (about 30 s on 2 cores)
def test_custom_code_tensor_parallel(group, golden):
    """A converted repo loaded with plain transformers (trust_remote_code, the package never imported)."""
    for rank in (0, 1):
        res = result(group, "custom_code_tp", rank)
        assert res["module"].startswith("transformers_modules.")
        assert not res["package_imported"]
        assert res["q_proj_local"] == (32, 64)
        assert_golden_logits(res["logits"], golden)


# ------------------------------------------------------------------------------------------- training


@pytest.mark.slow  # shares one 2-process group (about 30 s on 2 cores)
def test_tensor_parallel_gradients(group):
    """Every parameter's gradient under TP equals one process's, the shared qk-norm weights included (each rank
    sees only its heads: without the gradient all-reduce of the plan they would be partial)."""
    model = LLaDAMoEForDiffusionLM.from_pretrained(FIXTURE_DIR).train()
    loss = model(**workers.training_batch()).loss
    loss.backward()
    for rank in (0, 1):
        res = result(group, "tp_grads", rank)
        torch.testing.assert_close(res["loss"], loss.detach(), rtol=1e-6, atol=1e-6)
        assert res["grads"].keys() == dict(model.named_parameters()).keys()
        for name, param in model.named_parameters():
            torch.testing.assert_close(res["grads"][name], param.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert any("q_norm" in name for name in res["grads"])


@pytest.mark.slow  # shares one 2-process group (about 30 s on 2 cores)
def test_fsdp2_lora_gradients(group):
    """FSDP2 over 2 ranks, LoRA on attention and experts, each rank on half the batch: the averaged LoRA gradients
    equal one process's on the whole batch."""
    model = get_lora_model(LLaDAMoEForDiffusionLM.from_pretrained(FIXTURE_DIR))
    workers.set_lora_weights(model)
    model.train()
    model(**workers.training_batch()).loss.backward()
    expected = {workers.lora_key(n): p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert any("experts" in name for name in expected)
    res = result(group, "fsdp_lora_grads", 0)
    sharded, total = res["sharded_params"]
    assert sharded == total  # every base weight is an FSDP shard
    assert res["grads"].keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(res["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow  # shares one 2-process group (about 30 s on 2 cores)
@pytest.mark.parametrize("mode", ["finetune_ddp", "finetune_fsdp"])
def test_finetune_script_checkpoints_reload_on_one_process(group, tmp_path, mode):
    """examples/finetune_lora.py under a 2-process launch (data parallel, then FSDP2): the adapter and a checkpoint
    load on one process, and the final adapter gives the loss the sharded run measured."""
    res = result(group, mode, 0)
    folder = group / mode.replace("_", "-")
    assert torch.isfinite(torch.tensor(res["after"]))
    sys.path.insert(0, str(REPO_ROOT / "examples"))
    import finetune_lora

    for adapter, check_loss in ((folder / "adapter", True), (folder / "checkpoint-1", False)):
        base = LLaDAMoEForDiffusionLM.from_pretrained(TINY_ASSET_DIR)
        model = PeftModel.from_pretrained(base, adapter)
        if check_loss:
            assert finetune_lora.eval_loss(model, res["eval_batches"]) == pytest.approx(res["after"], abs=1e-5)
    assert not list(folder.glob(".adapter.*"))  # no staging folder left


@pytest.mark.slow  # shares one 2-process group (about 30 s on 2 cores)
def test_chat_reads_on_rank_zero_and_prints_once(group, cli_model_dir, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO(workers.CHAT_INPUT))
    assert main(["chat", str(cli_model_dir), *workers.CHAT_ARGS]) == 0
    expected = capsys.readouterr().out  # one process
    assert expected.count("[conversation reset]") == 1 and len(expected.splitlines()) == 3
    main_rank, other = result(group, "chat_cli", 0), result(group, "chat_cli", 1)
    assert main_rank["code"] == other["code"] == 0
    assert main_rank["stdout"] == expected
    assert main_rank["stdin_left"] == ""
    assert not main_rank["fd1_is_devnull"] and other["fd1_is_devnull"] and other["fd2_is_devnull"]


# ----------------------------------------------------------------------------------- command line, torchrun


def torchrun(*args, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", str(workers.free_port()), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.mark.slow  # a real torchrun (about 15 s on 2 cores)
def test_generate_under_torchrun_prints_once(cli_model_dir, capsys):
    args = ["generate", str(cli_model_dir), "--chat", "--prompt", "w10 w11 w12", "--max-new-tokens", "16",
            "--block-length", "8", "--no-stream", "--stats"]
    assert main(args) == 0
    expected = capsys.readouterr().out  # one process
    assert len(expected.splitlines()) == 1
    run = torchrun("-m", "llada_moe_hf.cli", *args, "--ep-size", "2")
    assert run.returncode == 0, run.stderr
    assert run.stdout == expected  # rank 0 alone prints, the same answer as one process
    assert run.stderr.count("forward passes") == 1  # --stats once
    assert run.stderr.count("Loading weights: 100%") == 1  # rank 1's progress bar is silenced


def test_cli_refuses_bad_sizes(capsys):
    with pytest.raises(SystemExit, match="torchrun --nproc-per-node 2"):
        main(["generate", str(TINY_ASSET_DIR), "--prompt", "x", "--tp-size", "2"])


# --------------------------------------------------------------------------------- plans and configs


def test_plan_shards_attention_by_heads():
    plan = LLaDAMoEConfig.base_model_tp_plan
    assert {plan[f"layers.*.self_attn.{p}_proj"] for p in "qkv"} == {"colwise"}
    assert plan["layers.*.self_attn.o_proj"] == "rowwise"
    assert plan["layers.*.self_attn.q_norm"] == plan["layers.*.self_attn.k_norm"] == "replicated_with_grad_allreduce"


def test_tp_size_must_divide_heads():
    config = tiny_config(num_attention_heads=4, num_key_value_heads=2)
    config.distributed_config = DistributedConfig(tp_size=4)
    with pytest.raises(ValueError, match="tp_size=4 does not divide"):
        LLaDAMoEForDiffusionLM(config)
    gathered = {f"model.layers.*.self_attn.{p}_proj": "colwise_gather_output" for p in "qkv"}
    config.distributed_config = DistributedConfig(tp_size=4, tp_plan=gathered)
    LLaDAMoEForDiffusionLM(config)  # heads gathered on every rank: any tp_size works
    config.distributed_config = DistributedConfig(tp_size=2)
    LLaDAMoEForDiffusionLM(config)


def test_make_distributed_config_for_this_transformers():
    assert make_distributed_config(tp_size=2).tp_size == 2
    assert make_distributed_config(fsdp_size=2).fsdp_size == 2
    if HAS_EP_IMPLEMENTATION:
        config = make_distributed_config(tp_size=2, ep_size=2, ep_implementation="all_reduce")
        assert (config.ep_size, config.ep_implementation) == (2, "all_reduce")
    elif HAS_EP_SIZE:
        assert make_distributed_config(tp_size=2, ep_size=2).ep_size == 2
        with pytest.raises(ValueError, match="needs transformers >= 5.23"):
            make_distributed_config(tp_size=2, ep_size=2, ep_implementation="all_reduce")
    else:
        assert make_distributed_config(tp_size=2, ep_size=2).enable_expert_parallel
        with pytest.raises(ValueError, match="ep_size == tp_size"):
            make_distributed_config(tp_size=2, ep_size=2, ep_implementation="all_to_all")
    with pytest.raises(ValueError, match="ep_implementation must be one of"):
        make_distributed_config(tp_size=2, ep_size=2, ep_implementation="nccl")
    with pytest.raises(ValueError, match="tp_size must be a positive integer"):
        make_distributed_config(tp_size=0)


# ------------------------------------------------------------------------------- fused_moe with expert parallelism


@pytest.mark.parametrize("flagged", [True, False], ids=["flagged", "fewer-experts-than-config"])
@pytest.mark.parametrize(
    "local_experts, num_tokens, top_k, owned",
    [
        (4, 9, 3, range(4)),  # rank 0 of 2: global experts 0-3 of 8 here, routes to 4-7 skipped
        (5, 11, 3, range(5, 10)),  # rank 1 of 2, odd sizes
        (4, 6, 2, []),  # this rank owns none of the chosen experts: every route skipped
    ],
)
def test_fused_moe_skips_routes_to_other_ranks(local_experts, num_tokens, top_k, owned, flagged):
    """Under expert parallelism a route to another rank's expert reaches the experts as the id `num_experts` with
    weight 0 (transformers' sentinel). fused_moe skips those routes: output and all four gradients equal the eager
    experts' on the same routing (Triton interpreter on CPU)."""
    from test_fused_moe import make_experts, random_routing, rel_err, run_both

    if not fused.is_fused_moe_available(torch.device("cpu")):
        pytest.skip("needs triton with TRITON_INTERPRET=1")
    hidden, inter = 32, 24
    experts = make_experts(local_experts, hidden, inter, top_k)
    if flagged:  # what transformers >= 5.19 sets on experts sharded by its expert-parallel plan
        experts._is_expert_parallel = True
    else:  # transformers < 5.19 sets no flag: the module holds fewer experts than the config counts
        experts.config.num_experts = 2 * local_experts
    global_experts = 2 * local_experts
    allowed = [e for e in range(global_experts) if e not in owned] if not owned else None
    index, weights = random_routing(num_tokens, global_experts, top_k, seed=num_tokens, allowed=allowed)
    owned = torch.tensor(list(owned), dtype=torch.long)
    on_rank = torch.isin(index, owned)
    local_index = torch.where(on_rank, index - (owned.min() if len(owned) else 0), local_experts)
    local_weights = weights.masked_fill(~on_rank, 0.0)
    assert (local_index == local_experts).any()
    x = torch.randn(num_tokens, hidden, generator=torch.Generator().manual_seed(1))
    if not on_rank.any():  # the eager experts return a constant zero here (no graph): compare with zeros
        [(out, grads)] = run_both(experts, x, local_index, local_weights, impls=(fused.FUSED_MOE_NAME,))
        assert out.abs().max() == 0
        assert all(grad is not None and grad.abs().max() == 0 for grad in grads.values())
        return
    (ref, ref_grads), (out, grads) = run_both(experts, x, local_index, local_weights)
    assert rel_err(out, ref) < 1e-5
    for name, ref_grad in ref_grads.items():
        assert torch.isfinite(grads[name]).all(), name
        torch.testing.assert_close(grads[name], ref_grad, rtol=1e-5, atol=1e-6, msg=name)


def test_cli_sizes_under_torchrun_are_checked(monkeypatch):
    """What `generate` / `chat` accept under a 2-process torchrun (the environment is enough: no group is needed)."""
    import argparse

    from llada_moe_hf.distributed import cli_distributed_config

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    args = argparse.Namespace(tp_size=None, ep_size=1, device="auto")
    assert cli_distributed_config(args).tp_size == 2  # tensor parallel over every process by default
    args.ep_size = 2
    assert cli_distributed_config(args).tp_size == 2
    for bad, message in ((dict(tp_size=3), "--tp-size 3 but torchrun started 2"), (dict(ep_size=4), "--ep-size 4"),
                         (dict(device="cuda:1"), "--device cuda:1 under torchrun")):
        with pytest.raises(SystemExit, match=message):
            cli_distributed_config(argparse.Namespace(**{**vars(args), **bad}))
