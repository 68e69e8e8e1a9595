"""Issue 7: the fused Triton experts implementation ("fused_moe") matches the eager experts, forward and backward.

On CPU the kernels run through Triton's interpreter (conftest sets TRITON_INTERPRET=1 before triton is imported),
so shapes stay tiny. GPU speed and bf16 accuracy at the real shape are measured by benchmarks/moe_layer.py.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from llada_moe_hf import LLaDAMoEForDiffusionLM
from llada_moe_hf import fused_moe_llada_moe as fused
from llada_moe_hf.modeling_llada_moe import LLaDAMoEExperts

from conftest import FIXTURE_DIR, tiny_config


pytestmark = pytest.mark.skipif(
    not fused.is_fused_moe_available(torch.device("cpu")), reason="needs triton with TRITON_INTERPRET=1"
)

TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


def make_experts(num_experts, hidden, inter, top_k, dtype=torch.float32, seed=0):
    config = tiny_config(
        hidden_size=hidden,
        expert_intermediate_size=inter,
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    config._experts_implementation = "eager"
    experts = LLaDAMoEExperts(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(experts.gate_up_proj.shape, generator=gen) / hidden**0.5)
        experts.down_proj.copy_(torch.randn(experts.down_proj.shape, generator=gen) / inter**0.5)
    return experts.to(dtype)


def random_routing(num_tokens, num_experts, top_k, seed, allowed=None):
    """Distinct experts per token drawn from `allowed` (all experts by default), softmax-like weights."""
    gen = torch.Generator().manual_seed(seed)
    allowed = torch.arange(num_experts) if allowed is None else torch.tensor(allowed)
    index = torch.stack([allowed[torch.randperm(len(allowed), generator=gen)[:top_k]] for _ in range(num_tokens)])
    weights = torch.rand(num_tokens, top_k, generator=gen)
    return index, weights


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def run_both(experts, hidden_states, index, weights, impls=("eager", fused.FUSED_MOE_NAME), grad_dtype=None):
    """Forward + backward through eager and fused_moe with the same upstream gradient; returns both results."""
    results = []
    grad_out = torch.randn(hidden_states.shape, generator=torch.Generator().manual_seed(7))
    grad_out = grad_out.to(grad_dtype or hidden_states.dtype).to(hidden_states.dtype)
    for impl in impls:
        experts.config._experts_implementation = impl
        experts.zero_grad(set_to_none=True)
        x = hidden_states.clone().requires_grad_(True)
        w = weights.clone().requires_grad_(True)
        out = experts(x, index, w)
        out.backward(grad_out)
        grads = {"x": x.grad, "weights": w.grad, "gate_up": experts.gate_up_proj.grad, "down": experts.down_proj.grad}
        grads = {name: grad.clone() for name, grad in grads.items()}
        results.append((out.detach(), grads))
    experts.config._experts_implementation = "eager"
    return results


CASES = {
    # name: (E, top_k, H, I, T, allowed experts)
    "odd_sizes": (5, 3, 96, 40, 11, None),
    "single_token": (5, 3, 96, 40, 1, None),
    "idle_experts": (8, 2, 32, 24, 6, [1, 6, 7]),  # five experts receive no token
    "one_expert_many_tiles": (4, 1, 32, 16, 37, [2]),  # every token on expert 2: 37 rows, three row tiles
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_eager_forward_backward_float32(case):
    num_experts, top_k, hidden, inter, num_tokens, allowed = CASES[case]
    experts = make_experts(num_experts, hidden, inter, top_k)
    index, weights = random_routing(num_tokens, num_experts, top_k, seed=num_tokens, allowed=allowed)
    x = torch.randn(num_tokens, hidden, generator=torch.Generator().manual_seed(1))
    (ref, ref_grads), (out, grads) = run_both(experts, x, index, weights)
    assert rel_err(out, ref) < 1e-5
    for name, ref_grad in ref_grads.items():
        assert grads[name] is not None and grads[name].shape == ref_grad.shape, name
        assert rel_err(grads[name], ref_grad) < 1e-5, (name, rel_err(grads[name], ref_grad))
    if allowed is not None:  # experts that saw no token get an exactly zero weight gradient
        idle = [e for e in range(num_experts) if e not in allowed]
        assert grads["gate_up"][idle].abs().max() == 0 and grads["down"][idle].abs().max() == 0


def norm_err(a, ref):
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_as_accurate_as_eager(dtype):
    """bf16/fp16 against a float64 evaluation of the same (rounded) inputs: fused_moe is within the dtype's
    tolerance and no less accurate than the eager experts in that dtype."""
    experts = make_experts(5, 96, 40, 3, dtype=dtype)
    index, weights = random_routing(9, 5, 3, seed=3)
    x = torch.randn(9, 96, generator=torch.Generator().manual_seed(2)).to(dtype)
    (eager, eager_grads), (out, grads) = run_both(experts, x, index, weights.to(dtype))
    [(exact, exact_grads)] = run_both(
        experts.double(), x.double(), index, weights.to(dtype).double(), impls=("eager",), grad_dtype=dtype
    )
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads.values())
    assert norm_err(out, exact) < TOLERANCE[dtype]
    assert norm_err(out, exact) <= 1.5 * norm_err(eager, exact)
    for name, exact_grad in exact_grads.items():
        assert norm_err(grads[name], exact_grad) < TOLERANCE[dtype], name
        assert norm_err(grads[name], exact_grad) <= 1.5 * norm_err(eager_grads[name], exact_grad), name


ALIGN_CASES = [  # (T, E, k, BLOCK_M, allowed experts)
    (13, 6, 3, 16, None),
    (1, 5, 3, 16, None),
    (150, 70, 4, 32, None),  # E_POW2 = 128: ten chunks of 64 pairs
    (37, 4, 1, 16, [2]),  # one expert, three row tiles, three idle experts
    (300, 8, 4, 16, None),  # 1200 pairs: past SINGLE_LAUNCH_MAX_PAIRS, so the default takes three launches
]


@pytest.mark.parametrize("single_launch", [True, False, None], ids=["one_launch", "three_launches", "auto"])
@pytest.mark.parametrize("num_tokens, num_experts, top_k, block_m, allowed", ALIGN_CASES)
def test_align_routing_kernel_matches_torch(num_tokens, num_experts, top_k, block_m, allowed, single_launch):
    """Both routing paths give the reference layout exactly, padding and the rows past the padded end included."""
    index, _ = random_routing(num_tokens, num_experts, top_k, seed=num_tokens, allowed=allowed)
    got = fused.align_routing(index, num_experts, block_m, single_launch=single_launch)
    want = fused.align_routing_reference(index, num_experts, block_m)
    for name, a, b in zip(("sorted_ids", "block_expert", "offsets", "pair_row"), got, want):
        assert a.shape == b.shape and torch.equal(a.long(), b.long()), name


def test_align_routing_layout():
    index, _ = random_routing(13, 6, 3, seed=5, allowed=[0, 2, 3, 5])
    block_m = 16
    sorted_ids, block_expert, offsets, pair_row = fused.align_routing(index, 6, block_m)
    num_pairs = index.numel()
    real = sorted_ids[sorted_ids < num_pairs]
    assert sorted(real.tolist()) == list(range(num_pairs))  # every pair exactly once
    assert torch.equal(sorted_ids[pair_row].long(), torch.arange(num_pairs))
    flat = index.reshape(-1)
    for tile, expert in enumerate(block_expert.tolist()):
        ids = sorted_ids[tile * block_m : (tile + 1) * block_m]
        ids = ids[ids < num_pairs].long()
        if expert == 6:  # past the padded end: nothing left
            assert ids.numel() == 0 and tile * block_m >= offsets[-1]
        else:
            assert (flat[ids] == expert).all()
    counts = torch.bincount(flat, minlength=6)
    assert torch.equal(offsets.long(), torch.cumsum((counts + block_m - 1) // block_m * block_m, 0))


def test_golden_logits_with_fused_moe(golden):
    model = LLaDAMoEForDiffusionLM.from_pretrained(FIXTURE_DIR, experts_implementation="fused_moe").eval()
    assert model.config._experts_implementation == "fused_moe"
    with torch.no_grad():
        logits = model(golden["logits.input_ids"]).logits
    torch.testing.assert_close(logits, golden["logits.logits"], rtol=0, atol=1e-5)


def test_set_experts_implementation_and_full_finetuning_gradients():
    torch.manual_seed(0)
    model = LLaDAMoEForDiffusionLM(tiny_config()).train()
    ids = torch.randint(0, 90, (2, 7))
    labels = torch.where(torch.rand(2, 7) < 0.5, ids, torch.full_like(ids, -100))
    labels[:, 0] = ids[:, 0]
    p_mask = torch.full((2, 7), 0.5)
    grads = {}
    for impl in ("eager", "fused_moe"):
        model.set_experts_implementation(impl)
        assert model.get_experts_implementation()[""] == impl
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels=labels, p_mask=p_mask).loss
        loss.backward()
        grads[impl] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (ref_loss, ref), (loss, got) = grads["eager"], grads["fused_moe"]
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    assert set(got) == set(ref)
    assert any("experts.gate_up_proj" in n for n in got) and any("mlp.gate.weight" in n for n in got)
    for name in ref:
        assert rel_err(got[name], ref[name]) < 1e-4, name


def test_lora_on_experts_trains_through_fused_moe():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = LLaDAMoEForDiffusionLM(tiny_config()).eval()
    lora = peft.LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=["q_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )
    model = peft.get_peft_model(base, lora)
    for name, param in model.named_parameters():  # non-zero B so the adapters change the output
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    ids = torch.randint(0, 90, (2, 6))
    results = {}
    for impl in ("eager", "fused_moe"):
        base.set_experts_implementation(impl)
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids).logits
        logits.float().pow(2).mean().backward()
        lora_grads = {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}
        results[impl] = (logits.detach(), lora_grads)
    (ref_logits, ref), (logits, got) = results["eager"], results["fused_moe"]
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)
    assert set(got) == set(ref) and any("experts" in n for n in got)
    for name in ref:
        assert rel_err(got[name], ref[name]) < 1e-4, name
    # Without the adapters' effect the output would be different: the LoRA weights really reach the kernels.
    with model.disable_adapter(), torch.no_grad():
        assert (model(input_ids=ids).logits - logits).abs().max() > 1e-4


UNAVAILABLE_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    if sys.argv[1] == "no-triton":
        sys.modules["triton"] = None  # import triton -> ImportError
    from llada_moe_hf import LLaDAMoEForDiffusionLM
    from llada_moe_hf import fused_moe_llada_moe as fused
    assert (fused.triton is None) == (sys.argv[1] == "no-triton")
    model = LLaDAMoEForDiffusionLM.from_pretrained(sys.argv[2], experts_implementation="fused_moe")
    try:
        model(torch.tensor([[1, 2, 3]]))
    except RuntimeError as err:
        print("ERROR:", err)
    """
)


@pytest.mark.parametrize("setting", ["no-triton", "no-interpreter"])
def test_clear_error_when_unavailable(setting):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run(
        [sys.executable, "-c", UNAVAILABLE_SCRIPT, setting, str(FIXTURE_DIR)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    message = proc.stdout.split("ERROR:", 1)[-1]
    assert 'experts_implementation="fused_moe" cannot run here' in message
    assert ("triton" in message) if setting == "no-triton" else ("CUDA" in message)
    assert "grouped_mm" in message  # says what to do instead


REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    sys.modules["llada_moe_hf"] = None  # Hub custom code only
    from transformers import AutoModel
    from safetensors.torch import load_file
    model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True, experts_implementation="fused_moe")
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    assert model.config._experts_implementation == "fused_moe"
    golden = load_file(sys.argv[2])
    with torch.no_grad():
        logits = model(golden["logits.input_ids"]).logits
    print("MAXERR", (logits - golden["logits.logits"]).abs().max().item())
    """
)


def test_fused_moe_from_hub_custom_code(tmp_path):
    LLaDAMoEForDiffusionLM.from_pretrained(FIXTURE_DIR).save_pretrained(tmp_path / "repo")
    for name in ("fused_moe_llada_moe.py", "fused_moe_configs_llada_moe.py"):
        assert (tmp_path / "repo" / name).exists()
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(tmp_path / "repo"), str(FIXTURE_DIR / "golden.safetensors")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(proc.stdout.split("MAXERR", 1)[1]) < 1e-5


KERNEL_RESOURCES = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_resources.py"


def run_kernel_resources(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the script compiles for real
    return subprocess.run(
        [sys.executable, str(KERNEL_RESOURCES), "--quick", "--check", *args],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_kernels_build_for_h100_without_spills():
    """The interpreter never compiles the kernels. Build every kernel for sm_90 with the committed H100 tiles
    (Triton's own compiler and ptxas, no GPU needed): each must compile, spill no registers and fit in shared
    memory."""
    proc = run_kernel_resources()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "0 problems" in proc.stdout
    built = [line for line in proc.stdout.splitlines() if line.startswith("H100/H200 (sm_90)")]
    kernels = " ".join(built)
    for name in ("gate_up", "gate_up +gate_up kept", "down", "align one launch", "align count", "swiglu backward"):
        assert name in kernels, name
    assert len(built) >= 20


def test_kernel_resources_catches_a_tile_that_does_not_fit():
    """The check fails on a tile whose pipeline needs more shared memory than an H100 block may have."""
    proc = run_kernel_resources("--candidate", "128,256,256,4,4")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "candidate 128,256,256,4,4" in proc.stdout and "bytes of shared memory (limit 232448)" in proc.stdout
