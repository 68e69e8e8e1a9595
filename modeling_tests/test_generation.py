"""Issue 3: LLaDA diffusion sampling through generate(): exact to the reference, then the fast decoders."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.streamers import BaseStreamer

from llada_moe_hf import LLaDAMoEForDiffusionLM
from llada_moe_hf.generation_llada_moe import (
    BlockKVCache,
    DiffusionGenerationConfig,
    DiffusionGenerationOutput,
    num_transfer_tokens,
)

from conftest import FIXTURE_DIR


MASK = 363
EOS = 360


# The golden tests run the default experts implementation; the other tests use the eager one, which is
# faster for these tiny shapes on a CPU.
@pytest.fixture(scope="module")
def model():
    return LLaDAMoEForDiffusionLM.from_pretrained(FIXTURE_DIR, experts_implementation="eager").eval()


@pytest.fixture(scope="module")
def confident_model():
    """The fixture with a sharpened output layer: confident predictions, so threshold decoding commits several
    tokens per step (the random fixture alone is near-uniform over its 384 tokens)."""
    model = LLaDAMoEForDiffusionLM.from_pretrained(FIXTURE_DIR, experts_implementation="eager").eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
    return model


def golden_cases(golden_meta):
    return {case["prompt"].split(".")[0]: case for case in golden_meta["generate"]}


EXACT = dict(mask_token_id=MASK, stop_at_eos=False)


# ----------------------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("case", ["gen0", "gen1", "gen2", "gen3"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_golden_generation(golden, golden_meta, case, attn):
    model = LLaDAMoEForDiffusionLM.from_pretrained(FIXTURE_DIR, attn_implementation=attn).eval()
    spec = golden_cases(golden_meta)[case]
    kwargs = dict(spec["kwargs"])
    max_new_tokens = kwargs.pop("gen_length")
    out = model.generate(golden[spec["prompt"]], max_new_tokens=max_new_tokens, **kwargs, **EXACT)
    assert out.dtype == torch.long
    assert torch.equal(out, golden[spec["output"]]), (out.tolist(), golden[spec["output"]].tolist())


def test_golden_through_generation_config_and_alias(model, golden, golden_meta):
    spec = golden_cases(golden_meta)["gen2"]  # the guidance case
    kwargs = dict(spec["kwargs"])
    config = DiffusionGenerationConfig(max_new_tokens=kwargs.pop("gen_length"), **kwargs, **EXACT)
    assert torch.equal(model.generate(golden[spec["prompt"]], generation_config=config), golden[spec["output"]])
    alias = model.diffusion_generate(golden[spec["prompt"]], generation_config=config, alg="maskgit_plus")
    assert torch.equal(alias, golden[spec["output"]])


def test_num_transfer_tokens_schedule():
    schedule = num_transfer_tokens(torch.tensor([10, 3, 0]), 4)
    assert schedule.tolist() == [[3, 3, 2, 2], [1, 1, 1, 0], [0, 0, 0, 0]]


def test_return_dict_history_and_counts(model, golden):
    out = model.generate(
        golden["gen0.prompt"], max_new_tokens=16, steps=8, block_length=8, output_history=True,
        return_dict_in_generate=True, **EXACT,
    )
    assert isinstance(out, DiffusionGenerationOutput)
    assert out.nfe == 8 and len(out.history) == 8
    assert out.tokens_per_forward.tolist() == [2.0]
    prompt_length = golden["gen0.prompt"].shape[1]
    previous = None
    for step, state in enumerate(out.history):
        masks = (state[0, prompt_length:] == MASK).sum().item()
        assert masks == 16 - 2 * (step + 1)  # linear schedule: 2 tokens per step
        if previous is not None:  # committed tokens never change again
            kept = previous != MASK
            assert torch.equal(state[kept], previous[kept])
        previous = state
    assert torch.equal(out.history[-1], out.sequences)
    # Semi-autoregressive: the second block stays fully masked during the first block's 4 steps.
    assert (out.history[3][0, prompt_length + 8 :] == MASK).all()
    assert not (out.history[3][0, prompt_length : prompt_length + 8] == MASK).any()


def test_padded_batch_matches_single_rows(model, golden):
    kwargs = dict(max_new_tokens=16, steps=16, block_length=8, **EXACT)
    short, long = golden["gen1.prompt"], golden["gen0.prompt"]  # 7 and 10 tokens
    alone_short = model.generate(short, **kwargs)
    alone_long = model.generate(long, **kwargs)
    batch = torch.full((2, 10), EOS)
    mask = torch.zeros(2, 10, dtype=torch.long)
    batch[0, 3:], mask[0, 3:] = short[0], 1
    batch[1], mask[1] = long[0], 1
    out = model.generate(batch, attention_mask=mask, **kwargs)
    assert torch.equal(out[0, 3:], alone_short[0])
    assert torch.equal(out[1], alone_long[0])
    assert (out[0, :3] == EOS).all()  # padding is kept as padding


def test_infilling_fills_prompt_masks(model, golden):
    prompt = golden["gen0.prompt"].clone()
    prompt[0, 3] = MASK
    prompt[0, 6] = MASK
    out = model.generate(prompt, max_new_tokens=8, steps=8, block_length=8, **EXACT)
    assert not (out == MASK).any()
    keep = prompt != MASK
    assert torch.equal(out[:, :10][keep], prompt[keep])


# ----------------------------------------------------------------------------------------------- early stop


def test_early_stop_matches_full_run_up_to_first_stop_id(model, golden):
    prompt = golden["gen1.prompt"]
    kwargs = dict(max_new_tokens=24, steps=24, block_length=8, mask_token_id=MASK)
    full = model.generate(prompt, stop_at_eos=False, **kwargs)
    answer = full[0, 7:].tolist()
    # Use tokens that do occur in the random model's answer as the stop ids: the real eos and a second one.
    stop = answer[10]
    first = answer.index(stop)
    assert first < 16  # the stop is in the first two blocks, so the run ends early
    out = model.generate(prompt, stop_at_eos=True, eos_token_id=[EOS, stop], return_dict_in_generate=True, **kwargs)
    assert torch.equal(out.sequences[0, : 7 + first + 1], full[0, : 7 + first + 1])
    assert (out.sequences[0, 7 + first + 1 :] == EOS).all()  # the tail becomes the first stop id (eos)
    assert out.nfe == 8 * ((first // 8) + 1) < 24


def test_early_stop_batch_waits_for_every_row(model, golden):
    prompts = golden["gen3.prompt"]
    kwargs = dict(max_new_tokens=20, steps=10, block_length=10, mask_token_id=MASK)
    full = model.generate(prompts, stop_at_eos=False, **kwargs)
    stop = full[0, 6 + 2].item()  # occurs early in row 0
    out = model.generate(prompts, stop_at_eos=True, eos_token_id=stop, **kwargs)
    for row in range(2):
        answer = full[row, 6:].tolist()
        if stop in answer:
            cut = 6 + answer.index(stop) + 1
            assert torch.equal(out[row, :cut], full[row, :cut]) and (out[row, cut:] == stop).all()
        else:
            assert torch.equal(out[row], full[row])


# ----------------------------------------------------------------------------------------------- threshold


def test_threshold_that_nothing_clears_is_the_one_token_per_step_schedule(model, golden):
    exact = model.generate(golden["gen0.prompt"], max_new_tokens=16, steps=16, block_length=8, **EXACT)
    out = model.generate(
        golden["gen0.prompt"], max_new_tokens=16, block_length=8, threshold=1.0, return_dict_in_generate=True, **EXACT
    )
    assert out.nfe == 16
    assert torch.equal(out.sequences, exact)


def test_threshold_commits_exactly_what_clears_it(confident_model, golden):
    model, threshold, prompt = confident_model, 0.7, golden["gen0.prompt"]
    out = model.generate(
        prompt, max_new_tokens=16, block_length=8, threshold=threshold, output_history=True,
        return_dict_in_generate=True, **EXACT,
    )
    assert out.nfe < 16 and out.tokens_per_forward.item() > 1
    assert not (out.sequences == MASK).any()
    state = torch.cat([prompt, torch.full((1, 16), MASK)], dim=1)
    for after in out.history:
        block_start = 10 + 8 * ((state[0, 10:] == MASK).nonzero()[0].item() // 8)
        with torch.no_grad():
            logits = model(state).logits[0, block_start : block_start + 8]
        masked = state[0, block_start : block_start + 8] == MASK
        logits[:, MASK] = float("-inf")
        probs = logits.float().softmax(-1)
        conf, x0 = probs.max(-1)
        conf = torch.where(masked, conf, torch.tensor(float("-inf")))
        expected = masked & (conf >= threshold)
        expected[conf.argmax()] = True  # at least one token per step
        changed = after[0, block_start : block_start + 8] != state[0, block_start : block_start + 8]
        assert torch.equal(changed, expected)
        assert torch.equal(after[0, block_start : block_start + 8][changed], x0[changed])
        assert (after[0, block_start + 8 :] == state[0, block_start + 8 :]).all()  # later blocks untouched
        state = after


# ----------------------------------------------------------------------------------------------- caches


def record_forwards(model):
    calls = []

    def hook(module, args, kwargs):
        calls.append((kwargs["input_ids"].shape[1], kwargs.get("cache")))

    return calls, model.model.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("cache_mode", ["prefix", "dual"])
def test_cache_refreshed_per_block(model, golden, cache_mode):
    prompt = golden["gen0.prompt"]  # 10 tokens
    calls, handle = record_forwards(model)
    try:
        out = model.generate(
            prompt, max_new_tokens=24, steps=12, block_length=8, cache_mode=cache_mode,
            return_dict_in_generate=True, **EXACT,
        )
    finally:
        handle.remove()
    assert out.nfe == len(calls) == 12
    caches = {id(cache) for _, cache in calls}
    assert len(caches) == 1 and isinstance(calls[0][1], BlockKVCache)
    assert calls[0][1].refreshes == 3  # one full recording pass per block
    lengths = [length for length, _ in calls]
    for block in range(3):
        block_start = 10 + 8 * block
        rest = 34 - block_start if cache_mode == "prefix" else 8
        assert lengths[4 * block : 4 * block + 4] == [34, rest, rest, rest]
    assert not (out.sequences == MASK).any()


@pytest.mark.parametrize("cache_mode", ["prefix", "dual"])
def test_cache_with_one_step_per_block_is_exact(model, golden, cache_mode):
    # One step per block = only the full recording passes: the caches must then change nothing.
    for prompt, cfg in ((golden["gen0.prompt"], 0.0), (golden["gen3.prompt"], 0.0), (golden["gen2.prompt"], 1.5)):
        kwargs = dict(max_new_tokens=16, steps=2, block_length=8, cfg_scale=cfg, **EXACT)
        exact = model.generate(prompt, **kwargs)
        assert torch.equal(model.generate(prompt, cache_mode=cache_mode, **kwargs), exact)


def test_cached_step_logits_match_full_forward_on_fresh_cache(model, golden):
    # Right after recording, a cached pass over any window sees the same keys as a full pass: same logits.
    x = torch.cat([golden["gen0.prompt"], torch.full((1, 16), MASK)], dim=1)
    positions = torch.arange(26)[None]
    with torch.no_grad():
        full = model(x).logits
        for start, end in ((10, 26), (10, 18)):
            cache = BlockKVCache()
            cache.record()
            model(x, position_ids=positions, cache=cache)
            cache.use(start, end)
            part = model(x[:, start:end], position_ids=positions[:, start:end], cache=cache).logits
            torch.testing.assert_close(part, full[:, start:end], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cache_mode", ["none", "prefix", "dual"])
def test_threshold_with_caches_uses_fewer_forwards(confident_model, golden, cache_mode):
    prompts, mask = golden["gen3.prompt"], torch.ones(2, 6, dtype=torch.long)
    out = confident_model.generate(
        prompts, attention_mask=mask, max_new_tokens=32, block_length=8, threshold=0.5, cache_mode=cache_mode,
        return_dict_in_generate=True, **EXACT,
    )
    assert not (out.sequences == MASK).any()
    assert out.nfe < 32 and (out.tokens_per_forward > 1).all()


def test_cache_modes_agree_with_exact_on_padded_guided_batch(model, golden):
    batch = torch.full((2, 9), EOS)
    mask = torch.zeros(2, 9, dtype=torch.long)
    batch[0], mask[0] = golden["gen2.prompt"][0], 1
    batch[1, 3:], mask[1, 3:] = golden["gen3.prompt"][1], 1
    kwargs = dict(attention_mask=mask, max_new_tokens=16, steps=2, block_length=8, cfg_scale=0.5, **EXACT)
    exact = model.generate(batch, **kwargs)
    for cache_mode in ("prefix", "dual"):
        assert torch.equal(model.generate(batch, cache_mode=cache_mode, **kwargs), exact)


# ----------------------------------------------------------------------------------------------- sampling options


def test_seeded_sampling_is_repeatable(model, golden):
    prompt = golden["gen0.prompt"]
    kwargs = dict(max_new_tokens=16, steps=16, block_length=8, temperature=1.0, **EXACT)
    a = model.generate(prompt, seed=1, **kwargs)
    assert torch.equal(a, model.generate(prompt, seed=1, **kwargs))
    assert torch.equal(a, model.generate(prompt, generator=torch.Generator().manual_seed(1), **kwargs))
    assert not torch.equal(a, model.generate(prompt, seed=2, **kwargs))
    assert not (a == MASK).any()


def test_top_k_one_makes_sampling_deterministic(model, golden):
    kwargs = dict(max_new_tokens=16, steps=16, block_length=8, temperature=1.5, top_k=1, **EXACT)
    a = model.generate(golden["gen0.prompt"], seed=1, **kwargs)
    b = model.generate(golden["gen0.prompt"], seed=7, **kwargs)
    assert torch.equal(a, b)
    c = model.generate(golden["gen0.prompt"], seed=3, top_p=1e-6, **{k: v for k, v in kwargs.items() if k != "top_k"})
    assert torch.equal(a, c)  # a tiny nucleus keeps only the best token too


@pytest.mark.parametrize("remasking", ["random", "margin", "entropy"])
def test_other_remasking_strategies(model, golden, remasking):
    out = model.generate(
        golden["gen3.prompt"], max_new_tokens=16, steps=8, block_length=8, remasking=remasking, seed=0,
        output_history=True, return_dict_in_generate=True, **EXACT,
    )
    assert not (out.sequences == MASK).any()
    # Still the linear schedule: 2 tokens per step and row.
    masks = [(h[:, 6:] == MASK).sum(-1).tolist() for h in out.history]
    assert masks == [[16 - 2 * (i + 1)] * 2 for i in range(8)]


def test_bfloat16_generation(golden):
    model = LLaDAMoEForDiffusionLM.from_pretrained(FIXTURE_DIR, dtype=torch.bfloat16).eval()
    out = model.generate(golden["gen3.prompt"], max_new_tokens=20, steps=10, block_length=10, **EXACT)
    assert out.shape == (2, 26) and not (out == MASK).any()
    assert torch.equal(out[:, :6], golden["gen3.prompt"])


# ----------------------------------------------------------------------------------------------- streaming


class RecordingStreamer(BaseStreamer):
    def __init__(self):
        self.events = []

    def put(self, value):
        self.events.append(("put", value.clone()))

    def put_draft(self, value):
        self.events.append(("draft", value.clone()))

    def end(self):
        self.events.append(("end", None))


def test_streamer_protocol(model, golden):
    streamer = RecordingStreamer()
    prompt = golden["gen0.prompt"]
    out = model.generate(prompt, max_new_tokens=16, steps=8, block_length=8, streamer=streamer, **EXACT)
    kinds = [kind for kind, _ in streamer.events]
    assert kinds == ["put"] + (["draft"] * 4 + ["put"]) * 2 + ["end"]
    assert torch.equal(streamer.events[0][1], prompt)
    confirmed = torch.cat([value.reshape(-1) for kind, value in streamer.events[1:] if kind == "put"])
    assert torch.equal(confirmed, out[0, 10:])
    drafts = [value for kind, value in streamer.events if kind == "draft"]
    assert [(d == MASK).sum().item() for d in drafts] == [6, 4, 2, 0, 6, 4, 2, 0]


def test_streamer_refuses_batches(model, golden):
    with pytest.raises(ValueError, match="batch size 1"):
        model.generate(golden["gen3.prompt"], max_new_tokens=8, streamer=RecordingStreamer(), **EXACT)


# ----------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_new_tokens=20, block_length=8), "block_length=8 does not divide max_new_tokens=20"),
        (dict(max_new_tokens=24, block_length=8, steps=10), "steps=10 is not a multiple of the number of blocks"),
        (dict(max_new_tokens=600), "exceeds the model's max_position_embeddings"),
        (dict(remasking="lowest"), "`remasking` must be one of"),
        (dict(cache_mode="full"), "`cache_mode` must be one of"),
        (dict(threshold=1.5), "`threshold` must be in"),
        (dict(temperature=-1.0), "`temperature` must be"),
        (dict(steps=0), "`steps` must be a positive integer"),
        (dict(eos_token_id="eos"), "`eos_token_id` must be"),
        (dict(gen_length=16), "unexpected argument"),
        (dict(mask_token_id=400), "outside the vocabulary"),
    ],
)
def test_bad_arguments_raise_clear_errors(model, golden, kwargs, message):
    kwargs = {"mask_token_id": MASK, **kwargs}
    with pytest.raises(ValueError, match=message):
        model.generate(golden["gen0.prompt"], **kwargs)


def test_no_mask_id_known(model, golden):
    assert model.config.mask_token_id is None  # the fixture's config.json has none, like the release's
    with pytest.raises(ValueError, match="No mask token id is known: pass mask_token_id"):
        model.generate(golden["gen0.prompt"], max_new_tokens=8)


def test_bad_inputs_raise_clear_errors(model, golden):
    prompt = golden["gen0.prompt"]
    with pytest.raises(ValueError, match="2-D LongTensor"):
        model.generate(prompt[0], **EXACT)
    right_padded = torch.ones_like(prompt)
    right_padded[0, -2:] = 0
    with pytest.raises(ValueError, match="LEFT-padded"):
        model.generate(prompt, attention_mask=right_padded, **EXACT)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model.generate(prompt, attention_mask=torch.ones(1, 3, dtype=torch.long), **EXACT)
    infill = prompt.clone()
    infill[0, 2] = MASK
    with pytest.raises(ValueError, match="use cache_mode='none' for infilling"):
        model.generate(infill, cache_mode="dual", **EXACT)
    with pytest.raises(ValueError, match="Unknown Dream `alg`"):
        model.diffusion_generate(prompt, alg="beam", **EXACT)


# ----------------------------------------------------------------------------------------------- generation config


def test_generation_config_roundtrip(model, golden, golden_meta, tmp_path):
    config = DiffusionGenerationConfig(
        max_new_tokens=16, steps=8, block_length=16, cfg_scale=1.5, mask_token_id=MASK, eos_token_id=[EOS, 361],
        stop_at_eos=False, temperature=0.0,
    )
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "generation_config.json").read_text())
    assert saved["steps"] == 8 and saved["eos_token_id"] == [EOS, 361] and "threshold" not in saved
    loaded = DiffusionGenerationConfig.from_pretrained(tmp_path)
    assert loaded == config
    with pytest.raises(NotImplementedError):
        DiffusionGenerationConfig.from_model_config(model.config)
    with pytest.raises(ValueError, match="unknown parameter"):
        DiffusionGenerationConfig(stepz=3)

    # Saved with a model, it loads as our class and drives generate() (the gen2 golden case, guidance).
    model.generation_config = config
    try:
        model.save_pretrained(tmp_path / "repo")
    finally:
        model.generation_config = DiffusionGenerationConfig()
    reloaded = LLaDAMoEForDiffusionLM.from_pretrained(tmp_path / "repo")
    assert isinstance(reloaded.generation_config, DiffusionGenerationConfig)
    assert reloaded.generation_config.mask_token_id == MASK
    assert torch.equal(reloaded.generate(golden["gen2.prompt"]), golden["gen2.output"])
    # Keyword arguments beat the stored config.
    assert reloaded.generate(golden["gen2.prompt"], max_new_tokens=8, block_length=8, steps=4).shape == (1, 17)


def test_autoregressive_generation_config_file_loads(tmp_path):
    # A generation_config.json written by the base class (like the release's) loads; AR-only keys are ignored.
    GenerationConfig(bos_token_id=1, eos_token_id=EOS, pad_token_id=EOS, do_sample=True, max_length=64).save_pretrained(
        tmp_path
    )
    loaded = DiffusionGenerationConfig.from_pretrained(tmp_path)
    assert loaded.eos_token_id == EOS and loaded.max_length == 64 and not hasattr(loaded, "do_sample")


REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    sys.modules["llada_moe_hf"] = None  # only the repo's custom code may be used
    from transformers import AutoModel
    from safetensors.torch import load_file
    model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    assert type(model.generation_config).__name__ == "DiffusionGenerationConfig"
    golden = load_file(sys.argv[2])
    out = model.generate(golden["gen3.prompt"])
    assert torch.equal(out, golden["gen3.output"]), out.tolist()
    fast = model.generate(golden["gen3.prompt"], threshold=0.9, cache_mode="dual", return_dict_in_generate=True)
    print("OK", fast.nfe)
    """
)


def test_generate_from_hub_custom_code(model, tmp_path):
    model.generation_config = DiffusionGenerationConfig(
        max_new_tokens=20, steps=10, block_length=10, mask_token_id=MASK, stop_at_eos=False
    )
    try:
        model.save_pretrained(tmp_path / "repo")
    finally:
        model.generation_config = DiffusionGenerationConfig()
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(tmp_path / "repo"), str(FIXTURE_DIR / "golden.safetensors")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK" in proc.stdout
