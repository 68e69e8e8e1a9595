"""Issue 13: the CPU experts implementation (`cpu_moe`) and the default (`auto`) against the eager loop."""

import os
import threading

import pytest
import torch

from conftest import FIXTURE_DIR, REPO_ROOT, tiny_config
from llada_moe_hf import LLaDAMoEConfig, LLaDAMoEForDiffusionLM
from llada_moe_hf import cpu_moe_llada_moe as cpu_moe
from llada_moe_hf.modeling_llada_moe import LLaDAMoEExperts


MASK = 363  # the fixture tokenizer's mask id
EAGER = LLaDAMoEExperts.forward.__wrapped__  # the class's own loop, whatever the config selects


def experts_module(num_experts=5, hidden=96, intermediate=40, dtype=torch.float32, seed=0):
    config = LLaDAMoEConfig(
        vocab_size=64, hidden_size=hidden, expert_intermediate_size=intermediate, num_experts=num_experts,
        num_experts_per_tok=min(3, num_experts), num_attention_heads=4, num_key_value_heads=4, pad_token_id=0,
        mask_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(seed)
    module = LLaDAMoEExperts(config)
    with torch.no_grad():
        module.gate_up_proj.normal_(0, 0.2)
        module.down_proj.normal_(0, 0.2)
    return module.to(dtype)


def routing(num_tokens, num_experts, top_k, case, seed=0):
    generator = torch.Generator().manual_seed(seed)
    if case == "random":
        index = torch.stack([torch.randperm(num_experts, generator=generator)[:top_k] for _ in range(num_tokens)])
    elif case == "idle_experts":  # only experts 1 and 3 of 5 get tokens
        index = torch.stack([torch.tensor([1, 3, 1][:top_k]).roll(t % 2) for t in range(num_tokens)])
        index[:, -1] = torch.where(index[:, 0] == 1, 3, 1)
        index = index[:, :top_k] if top_k <= 2 else torch.stack([index[:, 0], index[:, 1], index[:, 0]], 1)
    elif case == "one_expert":  # every token on expert 2 in every slot
        index = torch.full((num_tokens, top_k), 2)
    else:
        raise ValueError(case)
    weights = torch.rand(num_tokens, top_k, generator=generator)
    return index, weights


STRATEGY_NAMES = ["sorted_lanes", "padded", "grouped_mm"]


def run_strategy(name, module, hidden, index, weights):
    with torch.no_grad():
        return cpu_moe.STRATEGIES[name](module, hidden, index, weights)


@pytest.fixture(params=["kernel", "mkl"])
def products(request, monkeypatch):
    """The float32 products of sorted_lanes: the built kernel (cpu_kernel_llada_moe.py), or MKL alone (no
    compiler, LLADA_MOE_CPU_KERNEL=0)."""
    if request.param == "mkl":
        monkeypatch.setattr(cpu_moe, "load_kernel", lambda: None)
    elif cpu_moe.load_kernel() is None:
        if os.environ.get("LLADA_MOE_REQUIRE_KERNEL") == "1":
            pytest.fail("the CPU experts kernel did not build (see the warning above)")
        pytest.skip("no C++ compiler here: the CPU experts kernel cannot be built")
    return request.param


@pytest.fixture
def lanes_on_tiny_shapes(monkeypatch):
    """Lanes for any amount of work, and two torch threads: the lanes run even on test-sized shapes."""
    monkeypatch.setattr(cpu_moe, "LANE_MIN_WORK", 1)
    monkeypatch.setattr(cpu_moe, "TEAM_LANE_MIN_WORK", 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
@pytest.mark.parametrize("case", ["random", "idle_experts", "one_expert"])
@pytest.mark.parametrize("num_tokens", [1, 7, 40])
def test_strategies_equal_eager_on_odd_shapes(strategy, case, num_tokens, lanes_on_tiny_shapes, products):
    """E=5 experts, top-3, H=96, I=40: one token, idle experts, all tokens on one expert; two lanes where the
    strategy has them."""
    module = experts_module()
    hidden = torch.randn(num_tokens, 96)
    index, weights = routing(num_tokens, 5, 3, case)
    if case == "idle_experts":
        assert set(index.unique().tolist()) == {1, 3}
    with torch.no_grad():
        want = EAGER(module, hidden, index, weights)
    got = run_strategy(strategy, module, hidden, index, weights)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["random", "one_expert"])
def test_experts_over_the_kernels_rows_run_torchs_product(dtype, case, lanes_on_tiny_shapes, monkeypatch):
    """Experts with more rows than KERNEL_MAX_ROWS (here 5) are left by the kernel to torch's product, the
    others run the kernel, in one forward: every output row is written, and equals eager's."""
    kernel = cpu_moe.load_kernel()
    if kernel is None or dtype not in kernel.dtypes:
        if os.environ.get("LLADA_MOE_REQUIRE_KERNEL") == "1" and dtype == torch.float32:
            pytest.fail("the CPU experts kernel did not build")
        pytest.skip(f"no {dtype} kernel here")
    monkeypatch.setitem(cpu_moe.KERNEL_MAX_ROWS, dtype, 5)
    module = experts_module(dtype=dtype)
    hidden = torch.randn(13, 96, dtype=dtype)
    index, weights = routing(13, 5, 3, case)  # random: 2 to 13 rows an expert; one_expert: 39 rows
    weights = weights.to(dtype)
    with torch.no_grad():
        want = EAGER(module, hidden, index, weights).float()
    got = run_strategy("sorted_lanes", module, hidden, index, weights).float()
    atol = 1e-5 if dtype == torch.float32 else 2e-2 * want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=0, atol=atol)


@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
def test_strategies_equal_eager_in_bfloat16(strategy, lanes_on_tiny_shapes):
    module = experts_module(dtype=torch.bfloat16)
    hidden = torch.randn(33, 96, dtype=torch.bfloat16)
    index, weights = routing(33, 5, 3, "random")
    weights = weights.to(torch.bfloat16)
    with torch.no_grad():
        want = EAGER(module, hidden, index, weights).float()
    got = run_strategy(strategy, module, hidden, index, weights)
    assert got.dtype == torch.bfloat16
    # bf16 products round once per projection; the eager loop's own bf16 noise is this size
    torch.testing.assert_close(got.float(), want, rtol=0, atol=2e-2 * want.abs().max().item())


def test_sorted_lanes_is_the_eager_loop_bit_for_bit(monkeypatch):
    """Without the kernel: the same BLAS calls per expert, pairs added in the eager loop's order: identical
    float32 bits (one lane)."""
    monkeypatch.setattr(cpu_moe, "load_kernel", lambda: None)
    module = experts_module(num_experts=8, hidden=64, intermediate=32)
    hidden = torch.randn(50, 64)
    index, weights = routing(50, 8, 3, "random", seed=3)
    with torch.no_grad():
        want = EAGER(module, hidden, index, weights)
    got = run_strategy("sorted_lanes", module, hidden, index, weights)
    assert torch.equal(got, want)


def test_lanes_split_an_expert_and_run_on_workers(lanes_on_tiny_shapes, monkeypatch):
    """Without the kernel: all tokens on one expert, three lanes: the expert's rows are split, the Python workers
    run two of the ranges, and the main thread's torch thread count is restored afterwards."""
    monkeypatch.setattr(cpu_moe, "load_kernel", lambda: None)
    torch.set_num_threads(3)
    seen = []
    run = cpu_moe.run_experts

    def recording(*args):
        seen.append((threading.current_thread().name, args[-2], args[-1]))
        return run(*args)

    monkeypatch.setattr(cpu_moe, "run_experts", recording)
    module = experts_module()
    hidden = torch.randn(30, 96)
    index, weights = routing(30, 5, 3, "one_expert")
    with torch.no_grad():
        want = EAGER(module, hidden, index, weights)
    got = run_strategy("sorted_lanes", module, hidden, index, weights)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert sorted((lo, hi) for _, lo, hi in seen) == [(0, 30), (30, 60), (60, 90)]
    assert sum(name.startswith("llada-cpu-moe") for name, _, _ in seen) == 2
    assert torch.get_num_threads() == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_lanes_split_an_expert_on_torchs_openmp_team(dtype, lanes_on_tiny_shapes, monkeypatch):
    """With the kernel: all tokens on one expert, three lanes in one call per projection on torch's OpenMP team
    (no Python worker), each lane on its own OpenMP thread; the result equals eager."""
    kernel = cpu_moe.load_kernel()
    if kernel is None or dtype not in kernel.dtypes or not kernel.parallel:
        if os.environ.get("LLADA_MOE_REQUIRE_KERNEL") == "1" and dtype == torch.float32:
            pytest.fail("the CPU experts kernel did not build, or found no OpenMP runtime")
        pytest.skip(f"no {dtype} kernel with OpenMP lanes here")
    torch.set_num_threads(3)
    monkeypatch.setitem(cpu_moe.KERNEL_MAX_ROWS, dtype, 30)  # each lane's 30 rows of the expert: the kernel's
    calls = []
    lanes = cpu_moe.grouped_linear_lanes

    def recording(kernel, x, weights, offsets, bounds, max_rows, out):
        lane_thread = torch.full((len(bounds) - 1,), -1, dtype=torch.int64)
        calls.append((bounds, lane_thread, threading.current_thread().name))
        return lanes(kernel, x, weights, offsets, bounds, max_rows, out, lane_thread)

    monkeypatch.setattr(cpu_moe, "grouped_linear_lanes", recording)
    monkeypatch.setattr(cpu_moe._LANES, "run", lambda *a: pytest.fail("the Python workers ran"))
    module = experts_module(dtype=dtype)
    hidden = torch.randn(30, 96, dtype=dtype)
    index, weights = routing(30, 5, 3, "one_expert")
    weights = weights.to(dtype)
    with torch.no_grad():
        want = EAGER(module, hidden, index, weights).float()
    got = run_strategy("sorted_lanes", module, hidden, index, weights).float()
    atol = 1e-5 if dtype == torch.float32 else 2e-2 * want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=0, atol=atol)
    assert [bounds for bounds, _, _ in calls] == [[0, 30, 60, 90]] * 2  # gate_up, then down
    assert all(lane_thread.tolist() == [0, 1, 2] for _, lane_thread, _ in calls)
    assert {name for _, _, name in calls} == {threading.current_thread().name}
    assert torch.get_num_threads() == 3


def test_a_failing_lane_raises_and_restores_threads(lanes_on_tiny_shapes, monkeypatch):
    monkeypatch.setattr(cpu_moe, "load_kernel", lambda: None)  # the Python workers' lanes

    def broken(*args):
        if threading.current_thread().name.startswith("llada-cpu-moe"):
            raise RuntimeError("lane failed")
        return None

    monkeypatch.setattr(cpu_moe, "run_experts", broken)
    module = experts_module()
    index, weights = routing(40, 5, 3, "random")
    with pytest.raises(RuntimeError, match="lane failed"):
        run_strategy("sorted_lanes", module, torch.randn(40, 96), index, weights)
    assert torch.get_num_threads() == 2


FORKED_LANES = """
import multiprocessing, threading, torch
import test_cpu_moe as t
from llada_moe_hf import cpu_moe_llada_moe as cpu_moe

cpu_moe.LANE_MIN_WORK = cpu_moe.TEAM_LANE_MIN_WORK = 1
python_workers = cpu_moe.load_kernel() is None  # else the kernel's lanes on the OpenMP team
torch.set_num_threads(1)
module = t.experts_module()
index, weights = t.routing(40, 5, 3, "random")
hidden = torch.randn(40, 96)
want = t.run_strategy("sorted_lanes", module, hidden, index, weights)


def child(queue):
    torch.set_num_threads(4)
    got = t.run_strategy("sorted_lanes", module, hidden, index, weights)
    queue.put((threading.active_count(), got.tolist()))  # plain values: no shared memory to outlive the child


context = multiprocessing.get_context("fork")
queue = context.Queue()
process = context.Process(target=child, args=(queue,))
process.start()
threads, got = queue.get(timeout=100)
process.join(timeout=30)
assert process.exitcode == 0, process.exitcode
if python_workers:
    assert threads >= 4, threads  # the child's three lane workers and its main thread
torch.testing.assert_close(torch.tensor(got), want, rtol=0, atol=1e-5)
print("forked lanes ok")
"""


@pytest.mark.parametrize("kernel", ["1", "0"])
def test_lanes_run_in_a_forked_process(kernel):
    """A worker process forked from a single-threaded parent (a fork-started rank, a DataLoader worker) that then
    uses several threads runs its lanes (the kernel's on its OpenMP team; without the kernel, its own Python
    workers, which renew torch's thread pool before they start: _Lanes.pool) and gets the parent's numbers. Run
    in a new interpreter: a parent that has run OpenMP teams of 2+ threads (this test process has) cannot fork
    safely at all, with or without this package."""
    import subprocess
    import sys

    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([tests, str(REPO_ROOT)]))
    env["LLADA_MOE_CPU_KERNEL"] = kernel
    done = subprocess.run([sys.executable, "-c", FORKED_LANES], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and "forked lanes ok" in done.stdout, done.stderr[-3000:]


def test_expert_parallel_sentinel_is_skipped():
    """Id E marks a pair whose expert lives on another rank: it contributes nothing, as in the eager loop."""
    module = experts_module()
    hidden = torch.randn(9, 96)
    index, weights = routing(9, 5, 3, "random")
    index[::2, 1] = 5
    with torch.no_grad():
        want = EAGER(module, hidden, index, weights)
    for strategy in ("sorted_lanes", "padded"):
        torch.testing.assert_close(run_strategy(strategy, module, hidden, index, weights), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("lanes", [1, 2, 3, 5])
@pytest.mark.parametrize("seed", range(6))
def test_split_lanes_covers_every_row_once(lanes, seed):
    generator = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 40, (int(torch.randint(1, 20, (1,), generator=generator)),), generator=generator)
    counts[counts < 8] = 0  # idle experts
    counts = counts.tolist()
    ranges = cpu_moe.split_lanes(counts, lanes)
    rows = sum(counts)
    if not rows:
        assert ranges == []
        return
    assert 1 <= len(ranges) <= lanes
    assert ranges[0][0] == 0 and ranges[-1][1] == rows
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])) and all(lo < hi for lo, hi in ranges)


def test_split_lanes_balances_cost():
    # one busy expert and a few small ones: the busy one is split, the lanes' costs within one expert's of each other
    counts = [400] + [4] * 10
    ranges = cpu_moe.split_lanes(counts, 2)
    starts = [0]
    for count in counts:
        starts.append(starts[-1] + count)

    def cost(lo, hi):
        return (hi - lo) + cpu_moe.EXPERT_COST_ROWS * sum(1 for e in range(len(counts)) if starts[e] < hi and starts[e + 1] > lo)

    costs = [cost(lo, hi) for lo, hi in ranges]
    assert len(ranges) == 2 and ranges[0][1] < 400  # the busy expert is split
    assert max(costs) - min(costs) <= cpu_moe.EXPERT_COST_ROWS + 4
    costs = [cost(lo, hi) for lo, hi in cpu_moe.split_lanes([10] * 8, 2)]
    assert max(costs) - min(costs) <= cpu_moe.EXPERT_COST_ROWS + 10


def test_choose_strategy_by_size_dtype_and_padding():
    f32, bf16 = torch.float32, torch.bfloat16
    even = [12] * 64  # 96 tokens, top-8, evenly routed
    skewed = [96] * 8 + [0] * 56  # the same pairs on 8 experts
    assert cpu_moe.choose_strategy(even, 512, 256, f32) == "sorted_lanes"  # the mid-size model
    assert cpu_moe.choose_strategy([1] * 8 + [0] * 56, 2048, 1024, f32) == "sorted_lanes"  # release, one token
    assert cpu_moe.choose_strategy([24] * 8, 128, 128, f32) == "padded"  # the demo model
    assert cpu_moe.choose_strategy([512] * 8, 128, 128, f32) == "grouped_mm"  # many pairs: padding costs
    assert cpu_moe.choose_strategy([40, 1, 1, 1, 1, 1, 1, 1], 128, 128, f32) == "grouped_mm"  # 6.7x the rows
    # bfloat16 without its kernel (no compiler, no AVX512_BF16): oneDNN's batched products, or grouped_mm
    assert cpu_moe.choose_strategy(even, 512, 256, bf16) == "padded"
    assert cpu_moe.choose_strategy(skewed, 512, 256, bf16) == "grouped_mm"  # all 64 experts padded to 96: 8x
    assert cpu_moe.choose_strategy([0] * 8, 128, 128, bf16) == "grouped_mm"
    assert cpu_moe.choose_strategy(even, 512, 256, bf16, (f32,)) == "padded"
    # with a bfloat16 kernel: the sorted lanes for large experts, however routed; small ones as before
    both = (f32, bf16)
    assert cpu_moe.choose_strategy(even, 512, 256, bf16, both) == "sorted_lanes"
    assert cpu_moe.choose_strategy(skewed, 512, 256, bf16, both) == "sorted_lanes"
    assert cpu_moe.choose_strategy([24] * 8, 128, 128, bf16, both) == "padded"
    assert cpu_moe.choose_strategy([24] * 8, 128, 128, f32, both) == "padded"


# ----------------------------------------------------------------------------------------------- in the model


def test_auto_is_the_default_and_runs_cpu_moe_for_inference(monkeypatch):
    model = LLaDAMoEForDiffusionLM.from_pretrained(FIXTURE_DIR)
    assert model.config._experts_implementation == "auto"
    calls = []
    monkeypatch.setitem(cpu_moe.STRATEGIES, "padded",
                        lambda *a, **k: calls.append("cpu") or cpu_moe.padded_forward(*a, **k))
    monkeypatch.setattr(cpu_moe, "_grouped_mm_forward", lambda *a: calls.append("gmm") or cpu_moe.padded_forward(*a))
    ids = torch.randint(0, 360, (2, 7))
    with torch.no_grad():
        model(ids)
    assert calls == ["cpu", "cpu"]  # one per MoE layer
    calls.clear()
    model(ids).logits.sum().backward()  # autograd needs the graph: grouped_mm
    assert calls == ["gmm", "gmm"]


@pytest.fixture
def sorted_lanes_on_the_fixture(monkeypatch):
    """The tiny fixture's experts (64 x 32) are below LARGE_EXPERT (padded): run them as a large model's."""
    monkeypatch.setattr(cpu_moe, "LARGE_EXPERT", 1)
    monkeypatch.setattr(cpu_moe, "LANE_MIN_WORK", 1)
    monkeypatch.setattr(cpu_moe, "TEAM_LANE_MIN_WORK", 1)
    calls = []  # per call: whether the kernel ran it
    run, team = cpu_moe.run_experts, cpu_moe.run_kernel_lanes
    monkeypatch.setattr(cpu_moe, "run_experts", lambda *a: calls.append(a[8] is not None) or run(*a))
    monkeypatch.setattr(cpu_moe, "run_kernel_lanes", lambda *a: calls.append(True) or team(*a))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # two lanes
    yield calls
    torch.set_num_threads(threads)


def test_golden_logits_through_sorted_lanes(golden, products, sorted_lanes_on_the_fixture):
    model = LLaDAMoEForDiffusionLM.from_pretrained(FIXTURE_DIR).eval()
    with torch.no_grad():
        logits = model(golden["logits.input_ids"]).logits
    torch.testing.assert_close(logits, golden["logits.logits"], rtol=0, atol=1e-5)
    assert sorted_lanes_on_the_fixture and set(sorted_lanes_on_the_fixture) == {products == "kernel"}


def test_generation_through_the_kernel_gives_the_eager_tokens(golden, golden_meta, sorted_lanes_on_the_fixture):
    """The faster path gives the plain one's tokens: every golden generation case, kernel against eager experts."""
    if cpu_moe.load_kernel() is None:
        pytest.skip("no C++ compiler here: the CPU experts kernel cannot be built")
    for case in golden_meta["generate"]:
        kwargs = dict(case["kwargs"])
        length = kwargs.pop("gen_length")
        outputs = {}
        for experts in ("eager", "auto"):
            model = LLaDAMoEForDiffusionLM.from_pretrained(FIXTURE_DIR, experts_implementation=experts).eval()
            outputs[experts] = model.generate(golden[case["prompt"]], max_new_tokens=length, mask_token_id=MASK,
                                              stop_at_eos=False, **kwargs)  # fmt: skip
        assert torch.equal(outputs["auto"], outputs["eager"])
        assert torch.equal(outputs["auto"], golden[case["output"]])
    assert any(sorted_lanes_on_the_fixture)


def test_auto_in_bfloat16_pads_or_runs_grouped_mm(monkeypatch):
    """bfloat16: the batched (padded) products while padding at most triples the rows, else grouped_mm."""
    model = LLaDAMoEForDiffusionLM.from_pretrained(FIXTURE_DIR, dtype=torch.bfloat16)
    calls = []
    monkeypatch.setattr(cpu_moe, "_grouped_mm_forward", lambda *a: calls.append("gmm") or cpu_moe.padded_forward(*a))
    monkeypatch.setitem(cpu_moe.STRATEGIES, "padded",
                        lambda *a, **k: calls.append("pad") or cpu_moe.padded_forward(*a, **k))
    with torch.no_grad():
        model(torch.randint(0, 360, (1, 40)))
        assert calls == ["pad", "pad"]
        calls.clear()
        experts = model.model.layers[0].mlp.experts  # 16 experts, top-4
        index = torch.tensor([[0, 1, 2, 3]] * 40)  # every token on 4 experts: padding would be 4x the rows
        experts(torch.randn(40, 64, dtype=torch.bfloat16), index, torch.rand(40, 4, dtype=torch.bfloat16))
    assert calls == ["gmm"]


def test_training_through_cpu_moe_gives_eager_gradients():
    torch.manual_seed(0)
    config = tiny_config()
    grads = {}
    for impl in ("eager", "cpu_moe"):
        torch.manual_seed(0)
        model = LLaDAMoEForDiffusionLM(config)
        model.set_experts_implementation(impl)
        ids = torch.randint(0, 90, (2, 11))
        model(ids).logits.pow(2).mean().backward()
        grads[impl] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads["eager"].keys() == grads["cpu_moe"].keys() and any("experts" in n for n in grads["eager"])
    for name, grad in grads["eager"].items():
        torch.testing.assert_close(grads["cpu_moe"][name], grad, rtol=1e-4, atol=1e-6)


def test_auto_compiles_without_graph_breaks():
    """Under torch.compile `auto` and `cpu_moe` run grouped_mm: the forward is one graph."""
    model = LLaDAMoEForDiffusionLM.from_pretrained(FIXTURE_DIR).eval()
    ids = torch.randint(0, 360, (1, 9))
    with torch.no_grad():
        want = model(ids).logits
        for impl in ("auto", "cpu_moe"):
            model.set_experts_implementation(impl)
            torch._dynamo.reset()
            explained = torch._dynamo.explain(lambda x: model(x).logits)(ids)
            assert explained.graph_break_count == 0, explained.break_reasons
    torch.testing.assert_close(model(ids).logits.detach(), want, rtol=0, atol=1e-5)


def test_cpu_moe_on_another_device_says_what_to_use():
    module = experts_module().to("meta")
    index, weights = routing(4, 5, 3, "random")
    with pytest.raises(RuntimeError, match='runs on the CPU, but the model is on meta. Use "auto"'):
        with torch.no_grad():
            cpu_moe.cpu_moe_experts_forward(module, torch.randn(4, 96, device="meta"), index, weights)


def test_unknown_experts_implementation_lists_cpu_moe():
    model = LLaDAMoEForDiffusionLM(tiny_config())
    with pytest.raises(ValueError, match="cpu_moe"):
        model.set_experts_implementation("cpu-moe")


@pytest.fixture
def dense_kernel():
    kernel = cpu_moe.load_kernel()
    if kernel is None:
        if os.environ.get("LLADA_MOE_REQUIRE_KERNEL") == "1":
            pytest.fail("the CPU experts kernel did not build")
        pytest.skip("no C++ compiler here: the CPU experts kernel cannot be built")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield kernel
    torch.set_num_threads(threads)


def test_dense_linear_runs_the_kernel_for_few_float32_rows(dense_kernel, monkeypatch):
    """linear(): float32, CPU, inference, up to DENSE_KERNEL_MAX_ROWS rows, `auto`/`cpu_moe`: the kernel (in
    parts on two threads), torch's numbers within float rounding, bias included; otherwise the module itself."""
    calls = []  # the threads of each kernel call
    kernel_rows = cpu_moe.rows_linear
    monkeypatch.setattr(cpu_moe, "rows_linear", lambda *a: calls.append(a[-1]) or kernel_rows(*a))

    torch.manual_seed(0)
    module = torch.nn.Linear(96, 200, bias=True)
    x = torch.randn(2, 7, 96)
    with torch.no_grad():
        want = module(x)
        got = cpu_moe.linear(module, x, "auto")
        assert calls == [2] and got.shape == (2, 7, 200)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        strided = x.transpose(0, 1)  # not contiguous: copied into rows first
        torch.testing.assert_close(cpu_moe.linear(module, strided, "cpu_moe"), module(strided), rtol=1e-5, atol=1e-5)
        assert len(calls) == 2
        # the module's own product: eager/grouped_mm experts, too many rows, bfloat16, a hook
        too_many = torch.randn(cpu_moe.DENSE_KERNEL_MAX_ROWS[torch.float32] + 1, 96)
        for args in [(x, "eager"), (x, "grouped_mm"), (too_many, "auto")]:
            torch.testing.assert_close(cpu_moe.linear(module, *args), module(args[0]), rtol=0, atol=0)
        torch.testing.assert_close(cpu_moe.linear(module.to(torch.bfloat16), x.bfloat16()), module(x.bfloat16()),
                                   rtol=0, atol=0)  # fmt: skip
        module.float()
        handle = module.register_forward_hook(lambda m, i, o: o * 2)
        torch.testing.assert_close(cpu_moe.linear(module, x), module(x), rtol=0, atol=0)
        assert not calls[2:]
        handle.remove()
        # accelerate's hooks (device_map offload) replace the instance's forward and may leave the weight on the
        # meta device until it runs: the module's own forward runs
        from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

        class Doubles(ModelHook):
            def post_forward(self, module, output):
                return output * 2

        plain = module(x)
        add_hook_to_module(module, Doubles())
        torch.testing.assert_close(cpu_moe.linear(module, x), 2 * plain, rtol=0, atol=0)
        remove_hook_from_module(module)
        meta = torch.nn.Linear(96, 200, device="meta")
        with pytest.raises(RuntimeError, match="meta"):  # torch's own error, where the kernel would read no memory
            cpu_moe.linear(meta, x)
        assert len(calls) == 2
    got = cpu_moe.linear(module, x)  # autograd would record the product: the module runs
    assert got.requires_grad and len(calls) == 2


def test_dense_linear_golden_logits_and_eager_tokens(golden, golden_meta, dense_kernel, monkeypatch):
    """The model's attention and lm_head through the kernel (its rows limit set to 64, above the fixture's 3 x 21 rows):
    golden logits within 1e-5, and a golden generation gives the eager model's tokens."""
    monkeypatch.setitem(cpu_moe.DENSE_KERNEL_MAX_ROWS, torch.float32, 64)
    calls = []
    rows = cpu_moe.rows_linear
    monkeypatch.setattr(cpu_moe, "rows_linear", lambda *a: calls.append(1) or rows(*a))
    model = LLaDAMoEForDiffusionLM.from_pretrained(FIXTURE_DIR).eval()
    with torch.no_grad():
        logits = model(golden["logits.input_ids"]).logits
    torch.testing.assert_close(logits, golden["logits.logits"], rtol=0, atol=1e-5)
    layers = model.config.num_hidden_layers
    assert len(calls) == 4 * layers + 1  # q, k, v, o a layer, and the lm_head
    case = golden_meta["generate"][0]
    kwargs = dict(case["kwargs"])
    length = kwargs.pop("gen_length")
    eager = LLaDAMoEForDiffusionLM.from_pretrained(FIXTURE_DIR, experts_implementation="eager").eval()
    outputs = [m.generate(golden[case["prompt"]], max_new_tokens=length, mask_token_id=MASK, stop_at_eos=False,
                          **kwargs) for m in (model, eager)]  # fmt: skip
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], golden[case["output"]])
