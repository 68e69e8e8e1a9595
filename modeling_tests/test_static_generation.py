"""Issue 11: the static, compiled denoising step (`cache_implementation="static"`).

The static path must give the plain path's tokens in every mode (it runs the same plan, decoder policies and
cache manager, with fixed shapes and compiled pieces), compile without graph breaks, not recompile for a second
call or a new prompt length within its bucket, and read the device from the host only at block ends and every
`sync_interval` steps. Compiling costs tens of seconds per graph on a 2-core CPU: the compiled tests share one
module-scoped model, so that each graph is built once."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from llada_moe_hf import LLaDAMoEForDiffusionLM
from llada_moe_hf.demo import TINY_ASSET_DIR, chat_prompt
from llada_moe_hf.generation_llada_moe import (
    DiffusionGenerationConfig,
    DiffusionGenerationMixin,
    StepSettings,
    prompt_bucket_size,
    step_values,
)

from conftest import FIXTURE_DIR


MASK = 363


@pytest.fixture(scope="module")
def tiny():
    """The embedded trained model (release layout) and its tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(TINY_ASSET_DIR, trust_remote_code=False)
    model = LLaDAMoEForDiffusionLM.from_pretrained(TINY_ASSET_DIR).eval()
    return model, tokenizer


@pytest.fixture(scope="module")
def padded_batch(tiny):
    """Three held-out questions of different lengths, left-padded, as a tokenizer returns them."""
    _, tokenizer = tiny
    questions = [("sort", [3, 1, 4, 1]), ("reverse", [9, 8, 7, 6, 5, 4, 3, 2]), ("sort", [5, 5, 2, 0, 1, 7])]
    texts = [chat_prompt(tokenizer, *q) for q in questions]
    batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    assert len(set(batch.attention_mask.sum(-1).tolist())) > 1  # really padded
    return batch


def tiny_kwargs(tokenizer, **overrides):
    kwargs = dict(
        max_new_tokens=16,
        block_length=8,
        mask_token_id=tokenizer.mask_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|role_end|>")],
        pad_token_id=tokenizer.pad_token_id,
        return_dict_in_generate=True,
    )
    kwargs.update(overrides)
    return kwargs


# Every mode of the issue: exact, the caches with several steps per block, threshold, guidance, sampling.
MODES = {
    "exact": dict(steps=16, stop_at_eos=False),
    "exact, eos stop": dict(steps=16),
    "prefix": dict(steps=8, cache_mode="prefix"),
    "dual": dict(steps=8, cache_mode="dual"),
    "threshold": dict(threshold=0.9),
    "threshold + dual": dict(threshold=0.9, cache_mode="dual"),
    "threshold + prefix": dict(threshold=0.6, cache_mode="prefix"),
    "cfg": dict(steps=8, cfg_scale=1.0, stop_at_eos=False),
    "cfg + dual": dict(steps=8, cfg_scale=0.5, cache_mode="dual"),
    "temperature, top-k, top-p": dict(steps=16, temperature=0.9, top_k=4, top_p=0.9, seed=3),
    "temperature + threshold": dict(threshold=0.8, temperature=0.7, seed=11),
    "random remasking": dict(steps=8, remasking="random", seed=2),
    "margin remasking": dict(steps=8, remasking="margin"),
    "entropy remasking": dict(steps=8, remasking="entropy", cache_mode="dual"),
}


def assert_same_generation(a, b):
    assert torch.equal(a.sequences, b.sequences), (a.sequences.tolist(), b.sequences.tolist())
    assert a.nfe == b.nfe
    assert torch.equal(a.tokens_per_forward, b.tokens_per_forward)


@pytest.mark.parametrize("mode", list(MODES))
def test_static_path_gives_the_eager_tokens(tiny, padded_batch, mode):
    """The static path run without compiling (fixed shapes, bucketed padding, preallocated cache, device-side
    schedule and counters, host checks every sync_interval steps) against the plain path."""
    model, tokenizer = tiny
    kwargs = tiny_kwargs(tokenizer, **MODES[mode])
    eager = model.generate(**padded_batch, **kwargs)
    static = model.generate(**padded_batch, cache_implementation="static", disable_compile=True, **kwargs)
    assert_same_generation(static, eager)
    assert static.sequences.shape == (3, padded_batch.input_ids.shape[1] + 16)  # the bucket padding is removed


def test_static_path_with_prompt_masks_and_odd_lengths(tiny):
    """Infilling (window = whole sequence, per-row counts) and a prompt longer than one bucket step."""
    model, tokenizer = tiny
    prompt = tokenizer(chat_prompt(tokenizer, "sort", [3, 1, 4, 1, 5]), return_tensors="pt").input_ids
    prompt = torch.cat([prompt, prompt[:, :5]], dim=1)  # 21+ tokens: a bucket of 32
    infill = prompt.clone()
    infill[0, 2] = tokenizer.mask_token_id
    for ids, extra in ((infill, dict(steps=8)), (prompt, dict(steps=12, max_new_tokens=24))):
        kwargs = tiny_kwargs(tokenizer, **extra)
        eager = model.generate(ids, **kwargs)
        static = model.generate(ids, cache_implementation="static", disable_compile=True, **kwargs)
        assert_same_generation(static, eager)
        assert not (static.sequences == tokenizer.mask_token_id).any()


def test_prompt_bucket_sizes():
    assert [n + (-n % prompt_bucket_size(n, 64)) for n in (1, 3, 13, 17, 33, 64, 65, 500, 513)] == [
        1, 4, 16, 32, 64, 64, 128, 512, 576,
    ]
    assert prompt_bucket_size(100, 16) == 16


# ----------------------------------------------------------------------------------------------- compiled
# One module-scoped model for every compiled test, in this order: its graphs are built once and shared (shapes go
# dynamic after the second size), which keeps the compile time of the suite to about a minute.


@pytest.fixture(scope="module")
def compiled_model():
    return LLaDAMoEForDiffusionLM.from_pretrained(FIXTURE_DIR).eval()


@pytest.mark.parametrize("case", ["gen0", "gen1", "gen2", "gen3"])
def test_compiled_static_path_reproduces_the_golden_cases(compiled_model, golden, golden_meta, case):
    """The original sampler's outputs on the fixture, through the compiled static path (exact mode)."""
    spec = {c["prompt"].split(".")[0]: c for c in golden_meta["generate"]}[case]
    kwargs = dict(spec["kwargs"])
    max_new_tokens = kwargs.pop("gen_length")
    out = compiled_model.generate(
        golden[spec["prompt"]], max_new_tokens=max_new_tokens, mask_token_id=MASK, stop_at_eos=False,
        cache_implementation="static", **kwargs,
    )
    assert torch.equal(out, golden[spec["output"]]), (out.tolist(), golden[spec["output"]].tolist())


@pytest.fixture(scope="module")
def fixture_padded_batch(golden):
    """gen3's two prompts, the first one shortened by two tokens and left-padded."""
    prompts = golden["gen3.prompt"].clone()
    mask = torch.ones_like(prompts)
    prompts[0, 2:] = golden["gen3.prompt"][0, :-2].clone()
    prompts[0, :2], mask[0, :2] = 360, 0
    return {"input_ids": prompts, "attention_mask": mask}


COMPILED_MODES = {
    "exact": dict(steps=16, stop_at_eos=False),
    "dual": dict(steps=8, cache_mode="dual", stop_at_eos=False),
    "prefix": dict(steps=8, cache_mode="prefix", stop_at_eos=False),
    "threshold + dual": dict(threshold=0.003, cache_mode="dual"),
    "temperature, top-k, top-p": dict(steps=16, temperature=0.9, top_k=20, top_p=0.9, seed=3),
    "random remasking": dict(steps=8, remasking="random", seed=2),
}  # guidance is compiled by the gen2 golden case above


@pytest.mark.parametrize("mode", list(COMPILED_MODES))
def test_compiled_static_path_gives_the_eager_tokens(compiled_model, fixture_padded_batch, mode):
    """torch.compile(fullgraph=True) of the forward pieces and the decoding (a graph break would raise)."""
    kwargs = dict(max_new_tokens=16, block_length=8, mask_token_id=MASK, eos_token_id=[360, 17],
                  return_dict_in_generate=True, **COMPILED_MODES[mode])
    eager = compiled_model.generate(**fixture_padded_batch, **kwargs)
    static = compiled_model.generate(**fixture_padded_batch, cache_implementation="static", **kwargs)
    assert_same_generation(static, eager)


def test_compiled_step_does_not_recompile(compiled_model, golden):
    """A second call with the same shapes, and prompts of another length within the same bucket, reuse the
    compiled graphs (any recompilation raises here)."""
    model = compiled_model
    kwargs = dict(max_new_tokens=16, block_length=8, threshold=0.003, cache_mode="dual", mask_token_id=MASK,
                  stop_at_eos=False, cache_implementation="static", return_dict_in_generate=True)
    first = golden["gen3.prompt"]  # 2 x 6 tokens
    other = torch.cat([first, first[:, :1]], dim=1)  # 2 x 7 tokens: the same bucket of 8
    assert prompt_bucket_size(6, 64) == prompt_bucket_size(7, 64) == 8
    out = model.generate(first, **kwargs)  # compiles what this shape still lacks
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = model.generate(first, **kwargs)
        moved = model.generate(other, **kwargs)
    plain = {k: v for k, v in kwargs.items() if k != "cache_implementation"}
    assert_same_generation(out, model.generate(first, **plain))
    assert_same_generation(again, out)
    assert_same_generation(moved, model.generate(other, **plain))
    assert set(model._compiled_diffusion_steps[None]) == {"full", "window", "decode"}


def test_compiled_static_path_with_fused_moe(golden):
    """The fused Triton experts (run by Triton's interpreter here) enter the compiled graph as one opaque op, as
    they are captured in a CUDA graph on a GPU."""
    pytest.importorskip("triton", reason="fused_moe needs triton (the test extra installs it)")
    model = LLaDAMoEForDiffusionLM.from_pretrained(FIXTURE_DIR, experts_implementation="fused_moe").eval()
    kwargs = dict(max_new_tokens=8, block_length=8, steps=4, mask_token_id=MASK, stop_at_eos=False,
                  return_dict_in_generate=True)
    eager = model.generate(golden["gen0.prompt"], **kwargs)
    static = model.generate(golden["gen0.prompt"], cache_implementation="static", **kwargs)
    assert_same_generation(static, eager)


def test_compiled_static_path_gives_the_eager_tokens_in_bfloat16(golden):
    """bfloat16, where the last bit matters: eager rounds every intermediate to bfloat16, and the compiled step
    must too (inductor's emulate_precision_casts). Without it the fixture's exact-mode tokens differ (0.95 of
    them equal here; 0.85 on the 7B shape on an H200). prompt_bucket=1: no bucket padding, whose extra masked keys change
    the attention kernel's summation (a separate, documented source of bfloat16 differences)."""
    model = LLaDAMoEForDiffusionLM.from_pretrained(
        FIXTURE_DIR, dtype=torch.bfloat16, experts_implementation="grouped_mm"
    ).eval()
    kwargs = dict(max_new_tokens=16, block_length=8, steps=16, mask_token_id=MASK, stop_at_eos=False,
                  return_dict_in_generate=True)
    eager = model.generate(golden["gen3.prompt"], **kwargs)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    static = model.generate(golden["gen3.prompt"], cache_implementation="static", prompt_bucket=1, **kwargs)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # compiled, not the eager fallback
    assert_same_generation(static, eager)


def test_compile_options_emulate_eager_rounding():
    """The static step's inductor options: mode's own (CUDA graphs for "reduce-overhead", as mode= gives them)
    plus eager's rounding; torch validates them as torch.compile(options=...) does."""
    from torch import _inductor

    from llada_moe_hf.generation_llada_moe import _compile_options

    for mode in (None, "reduce-overhead"):
        options = _compile_options(mode)
        expected = dict(_inductor.list_mode_options(mode)) if mode else {}
        assert options == {**expected, "emulate_precision_casts": True}
        torch._TorchCompileInductorWrapper(None, options, None)  # raises on an unknown option
    assert _compile_options("reduce-overhead")["triton.cudagraphs"]


def _step_inputs(model, tokenizer, prompt, **overrides):
    """The arguments of one step of the static path, built the way the loop builds them."""
    kwargs = tiny_kwargs(tokenizer, cache_implementation="static", **overrides)
    config, derived = model._prepare_diffusion_config(None, kwargs)
    plan = model._diffusion_plan(config, prompt, derived)
    canvas, plan, _ = model._initial_canvas(prompt, None, plan, config, static=True)
    settings = StepSettings(
        decoder=plan.decoder, mask_id=plan.mask_id, sampling=False, top_k=None, nucleus=False,
        remasking="low_confidence", guidance=False, max_count=1,
    )
    return canvas, plan, settings, step_values(config, prompt.device)


@pytest.mark.parametrize("cache_mode", ["none", "dual"])
def test_step_pieces_have_no_graph_break(tiny, cache_mode):
    """torch._dynamo.explain: each piece of the step traces as one graph (no .item(), .tolist(), Python branch
    on device values)."""
    model, tokenizer = tiny
    prompt = tokenizer(chat_prompt(tokenizer, "reverse", [1, 2, 3, 4]), return_tensors="pt").input_ids
    canvas, plan, settings, values = _step_inputs(model, tokenizer, prompt, threshold=0.9, cache_mode=cache_mode)
    x = canvas["x"]
    start, end = plan.block(0)
    window_index = torch.arange(start, end)
    cache = None
    if cache_mode == "dual":
        cache = model._allocate_block_cache(1, x.shape[1], static=False)
        cache.use_positions(torch.arange(x.shape[1]), refresh=True)
        model._step_logits(x, torch.arange(x.shape[1]), window_index, canvas, cache, settings, values)
        cache.use_positions(window_index)
    query_index = window_index if cache_mode == "dual" else torch.arange(x.shape[1])
    with torch.no_grad():
        explained = torch._dynamo.explain(model._step_logits)(
            x, query_index, window_index, canvas, cache, settings, values
        )
        assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
        logits = model._step_logits(x, query_index, window_index, canvas, cache, settings, values)
        counters = {"committed": torch.zeros(1, dtype=torch.long), "active_steps": torch.zeros((), dtype=torch.long)}
        explained = torch._dynamo.explain(DiffusionGenerationMixin._step_decode)(
            x.clone(), window_index, torch.tensor(end), logits, counters, dict(values), settings
        )
        assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


# ----------------------------------------------------------------------------------------------- host reads


class HostReads:
    """Counts reads of tensor values by the host (`bool()`, `int()`, `float()`, `.item()`, `.tolist()`: each is
    a synchronisation on a GPU) made by the generation loop itself. The step pieces are excluded: compiled, they
    run as graphs (their eager forms call transformers' own checks)."""

    METHODS = ("__bool__", "__int__", "__float__", "item", "tolist")

    def __init__(self, monkeypatch, model):
        self.count, self.paused = 0, False
        for name in self.METHODS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(original))
        make_pieces = model._step_functions

        def pieces(config, device):
            return {key: self._paused(fn) for key, fn in make_pieces(config, device).items()}

        monkeypatch.setattr(model, "_step_functions", pieces)

    def _counting(self, original):
        def method(tensor, *args, **kwargs):
            self.count += not self.paused
            return original(tensor, *args, **kwargs)

        return method

    def _paused(self, fn):
        def run(*args):
            self.paused = True
            try:
                return fn(*args)
            finally:
                self.paused = False

        return run


def count_host_reads(monkeypatch, model, *args, **kwargs):
    with monkeypatch.context() as patch:
        reads = HostReads(patch, model)
        out = model.generate(*args, **kwargs)
    return reads.count, out


def test_fixed_schedule_reads_the_device_only_between_blocks(tiny, padded_batch, monkeypatch):
    """With the fixed schedule the host never reads the device inside a block: 8 steps a block cost no more
    reads than 2."""
    model, tokenizer = tiny
    kwargs = tiny_kwargs(tokenizer, cache_mode="dual", cache_implementation="static", disable_compile=True)
    many, out = count_host_reads(monkeypatch, model, **padded_batch, steps=16, **kwargs)
    few, _ = count_host_reads(monkeypatch, model, **padded_batch, steps=4, **kwargs)
    assert out.nfe == 16
    assert many == few


def test_threshold_reads_the_device_every_sync_interval_steps(golden, monkeypatch):
    # The random fixture is never confident: threshold decoding takes one step per token, 8 steps a block.
    model = LLaDAMoEForDiffusionLM.from_pretrained(FIXTURE_DIR, experts_implementation="eager").eval()
    prompts = golden["gen3.prompt"]
    kwargs = dict(max_new_tokens=16, block_length=8, threshold=0.5, mask_token_id=MASK, stop_at_eos=False,
                  return_dict_in_generate=True)
    eager_reads, eager = count_host_reads(monkeypatch, model, prompts, **kwargs)
    assert eager.nfe == 16
    static = dict(kwargs, cache_implementation="static", disable_compile=True)
    reads = {k: count_host_reads(monkeypatch, model, prompts, sync_interval=k, **static) for k in (1, 4, 8)}
    for _, out in reads.values():
        assert_same_generation(out, eager)
    # The plain path reads before every step (and once more per block to find it done): nfe + 2 checks.
    assert reads[1][0] == eager_reads
    checks = {k: reads[k][0] - (eager_reads - (eager.nfe + 2)) for k in reads}
    # The static path: after a block's first step, at most every k steps (fewer as the block nears its end).
    for k in (4, 8):
        assert checks[k] <= 2 * (2 + -(-8 // k)), checks
    assert checks[8] <= checks[4] < checks[1] == eager.nfe + 2


# ----------------------------------------------------------------------------------------------- config


def test_static_settings_are_generation_config_fields(tiny, tmp_path, padded_batch):
    model, tokenizer = tiny
    config = DiffusionGenerationConfig(cache_implementation="static", sync_interval=2, prompt_bucket=32,
                                       disable_compile=True)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "generation_config.json").read_text())
    assert saved["cache_implementation"] == "static" and saved["sync_interval"] == 2
    loaded = DiffusionGenerationConfig.from_pretrained(tmp_path)
    assert loaded.prompt_bucket == 32 and loaded.disable_compile is True
    kwargs = tiny_kwargs(tokenizer, threshold=0.9)
    out = model.generate(**padded_batch, generation_config=loaded, **kwargs)
    assert_same_generation(out, model.generate(**padded_batch, **kwargs))
    # transformers' name for its default cache selects the plain path.
    assert_same_generation(model.generate(**padded_batch, cache_implementation="dynamic", **kwargs), out)
    for bad, message in (
        (dict(cache_implementation="dynamic_static"), "`cache_implementation` must be .static."),
        (dict(sync_interval=0), "`sync_interval` must be a positive integer"),
        (dict(prompt_bucket=-64), "`prompt_bucket` must be a positive integer"),
        (dict(disable_compile="yes"), "`disable_compile` must be True or False"),
        (dict(decoder="beam"), "`decoder` must be one of"),
    ):
        with pytest.raises(ValueError, match=message):
            model.generate(**padded_batch, **kwargs, **bad)
    with pytest.raises(ValueError, match="decoder='threshold' needs a `threshold`"):
        model.generate(**padded_batch, **tiny_kwargs(tokenizer), decoder="threshold")
    eager_experts = LLaDAMoEForDiffusionLM.from_pretrained(FIXTURE_DIR, experts_implementation="eager")
    with pytest.raises(ValueError, match=r"experts_implementation='auto' \(the default, grouped_mm under compile\)"):
        eager_experts.generate(torch.tensor([[1, 2, 3]]), mask_token_id=MASK, cache_implementation="static")


def test_static_path_streams(tiny):
    model, tokenizer = tiny
    from test_generation import RecordingStreamer as Recorder

    prompt = tokenizer(chat_prompt(tokenizer, "sort", [9, 2, 7, 1]), return_tensors="pt").input_ids
    kwargs = tiny_kwargs(tokenizer, steps=8, stop_at_eos=False, return_dict_in_generate=False)
    streamer = Recorder()
    out = model.generate(prompt, streamer=streamer, cache_implementation="static", disable_compile=True, **kwargs)
    assert [kind for kind, _ in streamer.events] == ["put"] + (["draft"] * 4 + ["put"]) * 2 + ["end"]
    assert torch.equal(streamer.events[0][1], prompt)
    confirmed = torch.cat([v.reshape(-1) for kind, v in streamer.events[1:] if kind == "put"])
    assert torch.equal(confirmed, out[0, prompt.shape[1]:])


def test_static_buffers_are_reused_and_never_handed_out(tiny, padded_batch):
    """CUDA graphs are recorded against fixed addresses: the canvas, counters and KV cache of the static path stay
    the same tensors from call to call (same shapes), and what generate returns does not alias them."""
    model, tokenizer = tiny
    kwargs = tiny_kwargs(tokenizer, steps=8, cache_mode="dual", cache_implementation="static", disable_compile=True)
    first = model.generate(**padded_batch, **kwargs)
    buffers = model._diffusion_static_buffers
    pointers = [buffers["x"].data_ptr(), buffers["cache"].keys[0].data_ptr(), buffers["counters"]["committed"].data_ptr()]
    second = model.generate(**padded_batch, **kwargs)
    buffers = model._diffusion_static_buffers
    assert pointers == [buffers["x"].data_ptr(), buffers["cache"].keys[0].data_ptr(),
                        buffers["counters"]["committed"].data_ptr()]
    assert_same_generation(first, second)
    buffers["x"].fill_(0)
    assert not (second.sequences == 0).all()
