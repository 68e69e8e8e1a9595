"""Issue 4: the masked-diffusion training objective (collator + loss) and its use with transformers.Trainer."""

import math
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments

from llada_moe_hf import LLaDAMoEForDiffusionLM
from llada_moe_hf.training_llada_moe import LLaDAMoEDataCollator, masked_diffusion_loss, tokenize_sft_example

from conftest import REPO_ROOT, tiny_config


MASK, PAD = 95, 90


def sft_collator(**kwargs):
    return LLaDAMoEDataCollator(mask_token_id=MASK, pad_token_id=PAD, mode="sft", **kwargs)


def random_sft_features(count, seed=0, low=3, high=20):
    g = torch.Generator().manual_seed(seed)
    features = []
    for _ in range(count):
        length = int(torch.randint(low, high, (1,), generator=g))
        ids = torch.randint(0, PAD, (length,), generator=g).tolist()
        features.append({"input_ids": ids, "prompt_length": int(torch.randint(0, length, (1,), generator=g))})
    return features


# ----------------------------------------------------------------------------------------------- the loss


def hand_loss(logits, clean, masked, p, normalizer):
    """The LLaDA formula written out with Python loops over a fixed mask."""
    total = 0.0
    for b in range(clean.shape[0]):
        row = 0.0
        for i in range(clean.shape[1]):
            if masked[b][i]:
                log_probs = logits[b, i].double().log_softmax(-1)
                row += -log_probs[clean[b, i]].item() / p[b]
        total += row / normalizer[b]
    return total / clean.shape[0]


def hand_load_balancing(router_logits, num_experts, top_k):
    """Switch-Transformer balance loss: E * sum_e (share of top-k slots routed to e) * (mean router prob of e)."""
    logits = torch.cat([layer.double() for layer in router_logits])
    probs = logits.softmax(-1)
    chosen = probs.topk(top_k, dim=-1).indices
    slot_share = torch.zeros(top_k, num_experts, dtype=torch.float64)
    for slot in range(top_k):
        for expert in chosen[:, slot].tolist():
            slot_share[slot, expert] += 1.0 / logits.shape[0]
    return num_experts * (slot_share * probs.mean(0)).sum().item()


def test_loss_equals_hand_computation_on_fixed_mask():
    torch.manual_seed(0)
    config = tiny_config()
    model = LLaDAMoEForDiffusionLM(config).eval()
    clean = torch.randint(0, PAD, (3, 10))
    masked = torch.zeros(3, 10, dtype=torch.bool)
    masked[0, [4, 5, 9]] = True
    masked[1, [1, 2, 3, 4, 5, 6, 7, 8]] = True
    masked[2, [7]] = True
    p = [0.3, 0.9, 0.05]
    normalizer = [6.0, 10.0, 3.0]
    noised = torch.where(masked, torch.full_like(clean, MASK), clean)
    labels = torch.where(masked, clean, torch.full_like(clean, -100))
    p_mask = torch.tensor(p)[:, None].expand(3, 10)
    with torch.no_grad():
        out = model(noised, labels=labels, p_mask=p_mask, loss_normalizer=torch.tensor(normalizer))
        want = hand_loss(out.logits, clean, masked.tolist(), p, normalizer)
        assert out.loss.item() == pytest.approx(want, rel=1e-5)
        # p_mask per sequence ([B]) is the same as per token
        per_sequence = model(noised, labels=labels, p_mask=torch.tensor(p), loss_normalizer=torch.tensor(normalizer))
        assert per_sequence.loss.item() == pytest.approx(want, rel=1e-5)
        # default normaliser: the sequence length (pre-training), i.e. sum / (B * L)
        pretrain = model(noised, labels=labels, p_mask=p_mask).loss.item()
        assert pretrain == pytest.approx(hand_loss(out.logits, clean, masked.tolist(), p, [10.0] * 3), rel=1e-5)

        # with the router loss: diffusion loss + router_aux_loss_coef * load-balancing loss
        routed = model(noised, labels=labels, p_mask=p_mask, loss_normalizer=torch.tensor(normalizer), output_router_logits=True)
    balance = hand_load_balancing(routed.router_logits, config.num_experts, config.num_experts_per_tok)
    assert routed.aux_loss.item() == pytest.approx(balance, rel=1e-5)
    assert routed.loss.item() == pytest.approx(want + config.router_aux_loss_coef * balance, rel=1e-5)


def test_collator_batch_gives_the_llada_sft_loss():
    """The model's loss on a collator batch is the SFT formula: 1/t weights, divided by the answer length."""
    torch.manual_seed(1)
    model = LLaDAMoEForDiffusionLM(tiny_config()).eval()
    features = random_sft_features(4, seed=3)
    batch = sft_collator(seed=5)(features)
    masked = batch["labels"] != -100
    clean = torch.where(masked, batch["labels"], batch["input_ids"])
    with torch.no_grad():
        out = model(**batch)
    answer_lengths = [batch["input_ids"].shape[1] - f["prompt_length"] for f in features]
    want = hand_loss(out.logits, clean, masked.tolist(), batch["p_mask"][:, 0].tolist(), answer_lengths)
    assert out.loss.item() == pytest.approx(want, rel=1e-5)


def test_no_masked_position_gives_zero_not_nan():
    model = LLaDAMoEForDiffusionLM(tiny_config()).train()
    ids = torch.randint(0, PAD, (2, 7))
    labels = torch.full_like(ids, -100)
    out = model(ids, labels=labels, p_mask=torch.full((2,), 1e-3), loss_normalizer=torch.zeros(2))
    assert out.loss.item() == 0.0
    out.loss.backward()  # connected to the graph, gradients all zero
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() and not g.any() for g in grads)
    # one row without masked tokens among rows with some: that row adds 0, the mean is over the batch
    labels[0, 3] = ids[0, 3]
    with torch.no_grad():
        both = model(ids, labels=labels, p_mask=torch.full((2,), 0.5), loss_normalizer=torch.full((2,), 4.0)).loss
        logits = model(ids).logits
    assert both.item() == pytest.approx(hand_loss(logits, ids, (labels != -100).tolist(), [0.5, 0.5], [4.0, 4.0]), rel=1e-5)


def test_labels_without_p_mask_give_the_plain_masked_lm_loss():
    # transformers' contract for a model with a masked-LM head (issue 12): labels alone give a loss, the mean
    # cross-entropy over the labelled positions (the LLaDA objective needs p_mask; the collator provides it).
    model = LLaDAMoEForDiffusionLM(tiny_config())
    ids = torch.randint(0, PAD, (1, 5))
    out = model(ids, labels=ids)
    assert out.loss.item() == pytest.approx(F.cross_entropy(out.logits[0].float(), ids[0]).item(), rel=1e-6)
    with pytest.raises(ValueError, match="do not match"):
        masked_diffusion_loss(torch.zeros(1, 5, 96), ids[:, :4], torch.ones(1))


# ----------------------------------------------------------------------------------------------- the collator


def test_sft_prompt_never_masked_and_batch_is_consistent():
    collator = sft_collator(seed=0)
    for round_ in range(25):
        features = random_sft_features(6, seed=round_)
        batch = collator(features)
        ids, labels, p_mask = batch["input_ids"], batch["labels"], batch["p_mask"]
        length = max(len(f["input_ids"]) for f in features)
        assert ids.shape == labels.shape == p_mask.shape == (6, length)
        assert "attention_mask" not in batch  # SFT: EOS padding is attended, as in LLaDA
        masked = labels != -100
        assert ((ids == MASK) == masked).all()
        for row, feature in enumerate(features):
            n, prompt = len(feature["input_ids"]), feature["prompt_length"]
            clean = torch.tensor(feature["input_ids"] + [PAD] * (length - n))
            assert (ids[row, :prompt] == clean[:prompt]).all(), "a prompt token was masked"
            assert not masked[row, :prompt].any()
            assert (labels[row][masked[row]] == clean[masked[row]]).all()
            assert (ids[row][~masked[row]] == clean[~masked[row]]).all()
            # EOS padding is response: maskable, and counted in the answer length
            assert batch["loss_normalizer"][row].item() == length - prompt
            p = p_mask[row, 0].item()
            assert 1e-3 <= p <= 1.0 and (p_mask[row] == p).all()


def test_padding_counts_as_response_in_sft():
    collator = sft_collator(seed=0)
    batch = collator([{"input_ids": [1, 2, 3], "prompt_length": 2}, {"input_ids": list(range(40)), "prompt_length": 1}] * 8)
    # rows 0, 2, ...: 37 EOS pads after a 1-token answer; some pads must be masked with the EOS as label
    pad_labels = batch["labels"][::2, 3:]
    assert (pad_labels[pad_labels != -100] == PAD).all() and (pad_labels == PAD).any()


def test_masking_rate_follows_t():
    collator = sft_collator(seed=7)
    batch = collator([{"input_ids": [1] * 4000, "prompt_length": 0} for _ in range(8)])
    rate = (batch["labels"] != -100).float().mean(dim=1)
    torch.testing.assert_close(rate, batch["p_mask"][:, 0], atol=0.04, rtol=0)
    t = batch["p_mask"][:, 0]
    assert t.max() - t.min() > 0.1  # one t per sequence, not per batch


def test_pretrain_mode_masks_every_real_token_and_hides_padding():
    collator = LLaDAMoEDataCollator(mask_token_id=MASK, pad_token_id=PAD, mode="pretrain", seed=0)
    batch = collator([{"input_ids": list(range(12))}, {"input_ids": list(range(5))}] * 20)
    assert (batch["attention_mask"][1::2, 5:] == 0).all() and (batch["attention_mask"][::2] == 1).all()
    assert (batch["labels"][1::2, 5:] == -100).all() and (batch["input_ids"][1::2, 5:] == PAD).all()
    assert batch["loss_normalizer"].tolist() == [12.0, 5.0] * 20
    assert (batch["labels"][:, 0] != -100).any()  # the first token is maskable too (no prompt)


def test_collator_randomness_is_seeded():
    features = random_sft_features(5, seed=11)
    first = sft_collator(seed=123)(features)
    again = sft_collator(seed=123)(features)
    other = sft_collator(seed=124)(features)
    for key in first:
        assert torch.equal(first[key], again[key])
    assert not torch.equal(first["input_ids"], other["input_ids"])


def test_max_length_truncates_the_response_only():
    batch = sft_collator(seed=0, max_length=6)([{"input_ids": list(range(10)), "prompt_length": 4}])
    assert batch["input_ids"].shape == (1, 6)
    assert batch["loss_normalizer"].tolist() == [2.0]


@pytest.mark.parametrize(
    "features, kwargs, match",
    [
        ([{"input_ids": [1, 2, 3]}], {}, "remove_unused_columns=False"),
        ([{"input_ids": [1, 2, 3], "prompt_length": 3}], {}, "no response token"),
        ([{"input_ids": list(range(8)), "prompt_length": 5}], {"max_length": 5}, "after truncation"),
        ([{"input_ids": [1, MASK, 3], "prompt_length": 1}], {}, "already contains mask_token_id"),
        ([{"prompt_length": 1}], {}, "no 'input_ids'"),
        ([], {}, "empty batch"),
    ],
)
def test_collator_bad_features(features, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sft_collator(**kwargs)(features)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mode="causal"), "mode"),
        (dict(eps=0.0), "eps"),
        (dict(eps=1.5), "eps"),
        (dict(pad_token_id=MASK), "both"),
        (dict(mask_token_id=None), "mask_token_id"),
        (dict(max_length=1), "max_length"),
    ],
)
def test_collator_bad_options(kwargs, match):
    values = dict(mask_token_id=MASK, pad_token_id=PAD)
    values.update(kwargs)
    with pytest.raises(ValueError, match=match):
        LLaDAMoEDataCollator(**values)


# ----------------------------------------------------------------------------------------------- tokenizer helper


@pytest.fixture(scope="module")
def tiny_tokenizer():
    sys.path.insert(0, str(REPO_ROOT / "examples"))
    from build_tiny_tokenizer import build_tokenizer

    return build_tokenizer()


def test_tokenize_sft_example_splits_prompt_and_answer(tiny_tokenizer):
    tok = tiny_tokenizer
    feature = tokenize_sft_example(tok, "sort 3 1 2", "1 2 3")
    ids, n = feature["input_ids"], feature["prompt_length"]
    prompt_only = tok.apply_chat_template([{"role": "user", "content": "sort 3 1 2"}], add_generation_prompt=True)
    prompt_only = prompt_only["input_ids"] if hasattr(prompt_only, "keys") else prompt_only
    assert ids[:n] == list(prompt_only)
    assert tok.convert_ids_to_tokens(ids[n:]) == ["1", "2", "3", "<|role_end|>", "<|endoftext|>"]
    with pytest.raises(ValueError, match="fills max_length"):
        tokenize_sft_example(tok, "sort 3 1 2", "1 2 3", max_length=n)
    template = tok.chat_template
    tok.chat_template = None
    try:
        with pytest.raises(ValueError, match="no chat template"):
            tokenize_sft_example(tok, "sort 1", "1")
        assert tokenize_sft_example(tok, "sort 3 1 2", "1 2 3", chat_template=template) == feature
    finally:
        tok.chat_template = template


# ----------------------------------------------------------------------------------------------- Trainer


def test_trainer_runs_unchanged_with_the_collator(tmp_path):
    torch.manual_seed(0)
    model = LLaDAMoEForDiffusionLM(tiny_config())
    features = random_sft_features(16, seed=2)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=2,
        learning_rate=1e-3,
        remove_unused_columns=False,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=features, data_collator=sft_collator(seed=0))
    # The model's loss is a per-batch mean: Trainer must divide it by the accumulation steps itself.
    assert trainer.model_accepts_loss_kwargs is False
    before = model.lm_head.weight.detach().clone()
    result = trainer.train()
    assert math.isfinite(result.training_loss) and result.training_loss > 0
    assert not torch.equal(before, model.lm_head.weight)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
