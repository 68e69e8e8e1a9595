"""The decoder policies and sampler pieces on crafted logits, and the KV caches checked by value.

Each test here fails for a specific small bug: a threshold compared with `>` instead of `>=`, a margin or entropy
ranking turned around, a nucleus edge off by one token, a schedule remainder on the wrong steps, a KV cache that
does not write the fresh keys or values of its window."""

import math

import pytest
import torch

from llada_moe_hf import LLaDAMoEForDiffusionLM
from llada_moe_hf.decoding_llada_moe import (
    DECODERS,
    confidence_scores,
    denoise_window,
    filter_top_k_top_p,
    fixed_schedule_decoder,
    num_transfer_tokens,
    threshold_decoder,
)

from conftest import FIXTURE_DIR


MASK = 5  # in the crafted vocabularies below
FIXTURE_MASK = 363


def logits_from_probs(rows, vocab=8):
    """Logits whose softmax is (to float precision) the given leading probabilities, the rest spread evenly."""
    out = []
    for probs in rows:
        rest = (1.0 - sum(probs)) / (vocab - len(probs))
        out.append([math.log(p) for p in probs] + [math.log(rest)] * (vocab - len(probs)))
    return torch.tensor([out], dtype=torch.float32)


# ----------------------------------------------------------------------------------------------- threshold


def test_threshold_commits_a_confidence_exactly_at_the_threshold():
    logits = logits_from_probs([[0.9, 0.05], [0.6, 0.3], [0.5, 0.4]])  # argmax token 0 everywhere
    window = torch.full((1, 3), MASK)
    candidates = torch.ones(1, 3, dtype=torch.bool)
    confidence = logits.float().softmax(-1).max(-1).values[0]
    at = float(confidence[1])  # exactly the second position's confidence
    new, committed = denoise_window(window, logits, candidates, decoder="threshold", mask_id=MASK, threshold=at)
    assert new.tolist() == [[0, 0, MASK]] and committed.tolist() == [2]
    above = float(torch.nextafter(confidence[1], torch.tensor(1.0)))
    new, committed = denoise_window(window, logits, candidates, decoder="threshold", mask_id=MASK, threshold=above)
    assert new.tolist() == [[0, MASK, MASK]] and committed.tolist() == [1]


def test_threshold_commits_at_least_the_best_candidate_and_never_the_mask_token():
    # Position 1's most likely token is the mask token itself: its candidate becomes the runner-up (token 1).
    logits = torch.log(torch.tensor([[[0.2, 0.1, 0.1, 0.1, 0.1, 0.3, 0.05, 0.05],
                                      [0.05, 0.35, 0.05, 0.05, 0.05, 0.4, 0.025, 0.025]]]))
    window = torch.full((1, 2), MASK)
    new, committed = denoise_window(
        window, logits, torch.ones(1, 2, dtype=torch.bool), decoder="threshold", mask_id=MASK, threshold=0.99
    )
    assert new.tolist() == [[MASK, 1]] and committed.tolist() == [1]  # nothing clears 0.99: only the best
    # Not a candidate (already committed, or after the block): never chosen, even if most confident.
    # Confidences arrive with -inf at non-candidates (already committed, or after the block).
    select = threshold_decoder(torch.tensor([[float("-inf"), 0.2]]), torch.tensor([[False, True]]), threshold=0.5)
    assert select.tolist() == [[False, True]]


# ----------------------------------------------------------------------------------------------- rankings


def crafted_rankings():
    # Three masked positions built so that each strategy prefers a different one:
    #   A: p = (0.50, 0.45, ...): most likely top-1, tiny margin;
    #   B: p = (0.40, 0.05, ...): large margin;
    #   C: p = (0.49, 0.488, 0.022): lowest entropy (mass on three tokens), smallest margin.
    probs = [[0.50, 0.45, 0.01], [0.40, 0.05, 0.05], [0.49, 0.488, 0.022 - 5e-7]]
    return logits_from_probs(probs)


def independent_scores(logits, remasking):
    p = logits.double().softmax(-1)[0]
    top = p.topk(2, dim=-1).values
    return {
        "low_confidence": top[:, 0],
        "margin": top[:, 0] - top[:, 1],
        "entropy": (p * p.log()).sum(-1),  # negative entropy: larger = more confident
    }[remasking]


@pytest.mark.parametrize("remasking, expected", [("low_confidence", 0), ("margin", 1), ("entropy", 2)])
def test_each_remasking_strategy_commits_its_most_confident_position(remasking, expected):
    logits = crafted_rankings()
    assert int(independent_scores(logits, remasking).argmax()) == expected  # the crafted case is what it claims
    x0 = logits.argmax(-1)
    scores = confidence_scores(logits, x0, remasking, None, upcast=False)[0]
    assert torch.equal(scores.argsort(descending=True), independent_scores(logits, remasking).argsort(descending=True))
    new, committed = denoise_window(
        torch.full((1, 3), MASK), logits, torch.ones(1, 3, dtype=torch.bool), decoder="fixed", mask_id=MASK,
        remasking=remasking, counts=torch.tensor([1]), max_count=1,
    )
    assert [i for i, t in enumerate(new[0].tolist()) if t != MASK] == [expected]
    assert committed.tolist() == [1]


def test_random_remasking_ranks_by_the_given_uniform_numbers():
    logits = crafted_rankings()
    uniform = torch.tensor([[0.2, 0.1, 0.7]])
    new, _ = denoise_window(
        torch.full((1, 3), MASK), logits, torch.ones(1, 3, dtype=torch.bool), decoder="fixed", mask_id=MASK,
        remasking="random", remask_uniform=uniform, counts=torch.tensor([2]), max_count=2,
    )
    assert [t != MASK for t in new[0].tolist()] == [True, False, True]


# ----------------------------------------------------------------------------------------------- top-k / top-p


def test_top_p_edge_drops_the_token_whose_preceding_mass_reaches_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    probs = logits.softmax(-1)[0]
    edge = float((probs.cumsum(-1) - probs)[2])  # the mass before token 2, as the filter computes it
    kept = filter_top_k_top_p(logits, None, edge).isfinite()[0].tolist()
    assert kept == [True, True, False, False]
    just_above = float(torch.nextafter(torch.tensor(edge), torch.tensor(2.0)))
    assert filter_top_k_top_p(logits, None, just_above).isfinite()[0].tolist() == [True, True, True, False]
    assert filter_top_k_top_p(logits, 1, None).isfinite()[0].tolist() == [True, False, False, False]
    assert filter_top_k_top_p(logits, None, 1e-9).isfinite()[0].tolist() == [True, False, False, False]


# ----------------------------------------------------------------------------------------------- fixed schedule


def test_fixed_decoder_commits_each_rows_count():
    confidence = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.4, 0.2, 0.8, 0.6], [0.7, 0.1, 0.2, 0.3]])
    candidates = torch.ones(3, 4, dtype=torch.bool)
    select = fixed_schedule_decoder(confidence, candidates, counts=torch.tensor([2, 0, 1]), max_count=2)
    assert select.tolist() == [[False, True, True, False], [False] * 4, [True, False, False, False]]
    assert not fixed_schedule_decoder(confidence, candidates, counts=torch.zeros(3, dtype=torch.long),
                                      max_count=0).any()
    assert set(DECODERS) >= {"fixed", "threshold"}


def test_schedule_with_a_remainder_commits_more_on_the_first_steps():
    assert num_transfer_tokens(torch.tensor([10, 3, 0]), 4).tolist() == [[3, 3, 2, 2], [1, 1, 1, 0], [0, 0, 0, 0]]
    model = LLaDAMoEForDiffusionLM.from_pretrained(FIXTURE_DIR, experts_implementation="eager").eval()
    prompt = torch.tensor([[11, 12, 13, 14, 15]])
    out = model.generate(
        prompt, max_new_tokens=20, block_length=10, steps=8, mask_token_id=FIXTURE_MASK, stop_at_eos=False,
        output_history=True, return_dict_in_generate=True,
    )
    left = [int((h[0, 5:] == FIXTURE_MASK).sum()) for h in out.history]
    committed = [a - b for a, b in zip([20] + left, left)]
    assert committed == [3, 3, 2, 2] * 2


# ----------------------------------------------------------------------------------------------- replays


def replay_commits(model, out, prompt_length, block_length):
    """For each step of a generation history: the positions committed and the logits a full forward gives on
    the state before the step (the exact sampler's view)."""
    state = torch.cat([out.history[0][:, :prompt_length],
                       torch.full_like(out.history[0][:, prompt_length:], FIXTURE_MASK)], dim=1)
    for after in out.history:
        changed = after != state
        with torch.no_grad():
            logits = model(state).logits
        yield state, changed, logits
        state = after


@pytest.mark.parametrize("remasking", ["margin", "entropy"])
def test_margin_and_entropy_commit_the_positions_their_ranking_prefers(remasking):
    model = LLaDAMoEForDiffusionLM.from_pretrained(FIXTURE_DIR, experts_implementation="eager").eval()
    prompt = torch.tensor([[201, 17, 33, 96, 150, 4]])
    out = model.generate(
        prompt, max_new_tokens=16, block_length=8, steps=8, remasking=remasking, mask_token_id=FIXTURE_MASK,
        stop_at_eos=False, output_history=True, return_dict_in_generate=True,
    )
    for step, (state, changed, logits) in enumerate(replay_commits(model, out, 6, 8)):
        block_start = 6 + 8 * (step // 4)
        window = slice(block_start, block_start + 8)
        masked = state[0, window] == FIXTURE_MASK
        p = logits[0, window].double().softmax(-1)
        top = p.topk(2, -1).values
        score = top[:, 0] - top[:, 1] if remasking == "margin" else (p * p.log()).sum(-1)
        score = torch.where(masked, score, torch.tensor(float("-inf"), dtype=torch.float64))
        expected = torch.zeros(8, dtype=torch.bool)
        expected[score.topk(2).indices] = True
        assert torch.equal(changed[0, window], expected), step
        assert torch.equal(out.history[step][0, window][expected], logits[0, window].argmax(-1)[expected])


def test_random_remasking_commits_argmax_tokens_in_a_seeded_random_order():
    model = LLaDAMoEForDiffusionLM.from_pretrained(FIXTURE_DIR, experts_implementation="eager").eval()
    prompt = torch.tensor([[201, 17, 33, 96, 150, 4]])
    orders = []
    for seed in (0, 1, 0):
        out = model.generate(
            prompt, max_new_tokens=8, block_length=8, steps=4, remasking="random", seed=seed,
            mask_token_id=FIXTURE_MASK, stop_at_eos=False, output_history=True, return_dict_in_generate=True,
        )
        order = []
        for state, changed, logits in replay_commits(model, out, 6, 8):
            assert int(changed.sum()) == 2
            assert torch.equal(out.history[len(order)][changed], logits.argmax(-1)[changed])
            order.append(changed[0, 6:].nonzero().flatten().tolist())
        orders.append(order)
    assert orders[0] == orders[2] and orders[0] != orders[1]


def plain_infilling_loop(model, prompt, gen_length, block_length, steps):
    """The package's documented infilling on top of the reference loop, written plainly: every mask before the
    block end is a candidate; the first block's schedule also counts the prompt's masks."""
    x = torch.cat([prompt, torch.full((1, gen_length), FIXTURE_MASK)], dim=1)
    steps_per_block = steps // (gen_length // block_length)
    for block in range(gen_length // block_length):
        end = prompt.shape[1] + (block + 1) * block_length
        count = int((x[0, :end] == FIXTURE_MASK).sum()) if block == 0 else block_length
        schedule = [count // steps_per_block + (i < count % steps_per_block) for i in range(steps_per_block)]
        for k in schedule:
            with torch.no_grad():
                probs = model(x).logits[0].softmax(-1)
            x0 = probs.argmax(-1)
            confidence = probs.gather(-1, x0[:, None])[:, 0]
            confidence[end:] = float("-inf")
            confidence[x[0] != FIXTURE_MASK] = float("-inf")
            chosen = confidence.topk(k).indices
            x[0, chosen] = x0[chosen]
    return x


def test_infilling_matches_a_plain_loop():
    model = LLaDAMoEForDiffusionLM.from_pretrained(FIXTURE_DIR, experts_implementation="eager").eval()
    prompt = torch.tensor([[201, 17, FIXTURE_MASK, 96, 150, FIXTURE_MASK, 4]])
    out = model.generate(prompt, max_new_tokens=16, block_length=8, steps=8, mask_token_id=FIXTURE_MASK,
                         stop_at_eos=False)
    assert torch.equal(out, plain_infilling_loop(model, prompt, 16, 8, 8))


# ----------------------------------------------------------------------------------------------- caches by value


@pytest.fixture(scope="module")
def one_layer_model():
    """The fixture cut to its first layer. With one layer a position's keys and values depend only on its own
    token and position, so a cached step whose window holds every token changed since the cache was written
    sees exactly the keys and values of a full forward: the caches must then change no token."""
    model = LLaDAMoEForDiffusionLM.from_pretrained(FIXTURE_DIR, experts_implementation="eager").eval()
    model.model.layers = model.model.layers[:1]
    model.config.num_hidden_layers = 1
    return model


@pytest.mark.parametrize("cache_mode", ["prefix", "dual"])
@pytest.mark.parametrize("implementation", [None, "static"])
def test_cached_steps_equal_full_forwards_with_one_layer(one_layer_model, golden, cache_mode, implementation):
    extra = {} if implementation is None else dict(cache_implementation="static", disable_compile=True)
    for prompt, cfg in ((golden["gen0.prompt"], 0.0), (golden["gen3.prompt"], 0.0), (golden["gen2.prompt"], 1.0)):
        kwargs = dict(max_new_tokens=24, block_length=8, steps=12, cfg_scale=cfg, mask_token_id=FIXTURE_MASK,
                      stop_at_eos=False)  # 4 steps per block: 3 of them read the cache
        exact = one_layer_model.generate(prompt, **kwargs)
        assert torch.equal(one_layer_model.generate(prompt, cache_mode=cache_mode, **kwargs, **extra), exact)
        threshold = dict(kwargs, threshold=0.004)
        del threshold["steps"]
        assert torch.equal(one_layer_model.generate(prompt, cache_mode=cache_mode, **threshold, **extra),
                           one_layer_model.generate(prompt, **threshold))


def test_cached_window_logits_equal_full_forward_after_the_window_changes(one_layer_model, golden):
    """Directly on the cache: record a state, change tokens inside the window, run only the window."""
    from llada_moe_hf.cache_llada_moe import BlockKVCache

    x = torch.cat([golden["gen0.prompt"], torch.full((1, 16), FIXTURE_MASK)], dim=1)
    positions = torch.arange(26)[None]
    cache = BlockKVCache()
    with torch.no_grad():
        cache.record()
        one_layer_model(x, position_ids=positions, cache=cache)
        changed = x.clone()
        changed[0, 12:15] = torch.tensor([7, 8, 9])
        cache.use(10, 18)
        part = one_layer_model(changed[:, 10:18], position_ids=positions[:, 10:18], cache=cache).logits
        full = one_layer_model(changed).logits[:, 10:18]
    torch.testing.assert_close(part, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cache_mode", ["prefix", "dual"])
def test_caches_keep_the_trained_models_answers_with_several_steps_per_block(cache_mode):
    """The embedded trained model on held-out questions, 2 tokens per step (4 steps per block of 8, 3 of them
    cached): the approximate caches must keep the exact sampler's accuracy. A cache that does not write its
    window's fresh keys or values drops it to about 0."""
    from transformers import AutoTokenizer

    from llada_moe_hf.demo import TINY_ASSET_DIR, evaluate, held_out_questions

    tokenizer = AutoTokenizer.from_pretrained(TINY_ASSET_DIR, trust_remote_code=False)
    model = LLaDAMoEForDiffusionLM.from_pretrained(TINY_ASSET_DIR).eval()
    questions = held_out_questions(64)
    exact = evaluate(model, tokenizer, questions, batch_size=64, steps=8)
    cached = evaluate(model, tokenizer, questions, batch_size=64, steps=8, cache_mode=cache_mode)
    static = evaluate(model, tokenizer, questions, batch_size=64, steps=8, cache_mode=cache_mode,
                      cache_implementation="static", disable_compile=True)
    assert exact["accuracy"] >= 0.95
    assert cached["accuracy"] >= exact["accuracy"] - 0.03
    assert static["accuracy"] == cached["accuracy"]
