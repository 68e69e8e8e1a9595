"""Issue 12, items 2 and 3: the HF contract a transformers user relies on.

- forward(..., return_dict=False) and config.return_dict=False give tuples, as any transformers model;
- LLaDAMoEConfig with a small vocabulary works (the release's special ids are only defaults of the release's
  vocabulary), and ids that are set are checked against the vocabulary;
- the strict loader has an explicit opt-out, `strict=False`, named in its error;
- a converted repo works with `pipeline("text-generation", model=repo, trust_remote_code=True)`;
- loading the release layout (config, model, tokenizer the documented way) emits no warning, on every
  transformers version we declare.
"""

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoTokenizer
from transformers.utils import logging as hf_logging

from llada_moe_hf import LLaDAMoEConfig, LLaDAMoEForDiffusionLM, LLaDAMoEModel

from conftest import FIXTURE_DIR, REPO_ROOT, tiny_config


ASSET_DIR = REPO_ROOT / "llada_moe_hf" / "assets" / "tiny"
SORT_CHAT = [{"role": "user", "content": "sort 3 1 4 1 5"}]


# ------------------------------------------------------------------------------------------- return_dict=False


def small_model(**overrides):
    torch.manual_seed(0)
    return LLaDAMoEForDiffusionLM(tiny_config(**overrides)).eval()


def test_return_dict_false_gives_the_same_values_as_a_tuple():
    model = small_model()
    ids = torch.tensor([[1, 2, 3, 95, 95]])
    kwargs = dict(output_hidden_states=True, output_router_logits=True)
    with torch.no_grad():
        as_dict = model(ids, **kwargs)
        as_tuple = model(ids, return_dict=False, **kwargs)
    assert isinstance(as_tuple, tuple)
    expected = as_dict.to_tuple()  # (aux_loss, logits, hidden_states, router_logits): None fields dropped
    assert len(as_tuple) == len(expected) == 4
    torch.testing.assert_close(as_tuple[1], as_dict.logits, rtol=0, atol=0)
    torch.testing.assert_close(as_tuple[0], as_dict.aux_loss, rtol=0, atol=0)
    assert len(as_tuple[2]) == len(as_dict.hidden_states) and len(as_tuple[3]) == len(as_dict.router_logits)


def test_config_return_dict_false_gives_tuples_for_the_lm_and_the_body():
    model = small_model()
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        logits = model(ids).logits
        model.config.return_dict = False  # the body shares this config
        out = model(ids)
        body = model.model(ids)
        loss_first = model(ids, labels=ids, p_mask=torch.full((1,), 0.5))
        named = model(ids, return_dict=True)
    assert isinstance(out, tuple) and len(out) == 1
    torch.testing.assert_close(out[0], logits, rtol=0, atol=0)
    assert isinstance(body, tuple) and body[0].shape == (1, 3, model.config.hidden_size)
    assert isinstance(loss_first, tuple) and loss_first[0].dim() == 0  # (loss, logits), as HF models order them
    assert named.logits.shape == logits.shape  # an explicit return_dict=True wins over the config


def test_base_model_return_dict_false():
    model = LLaDAMoEModel(tiny_config()).eval()
    with torch.no_grad():
        out = model(torch.tensor([[1, 2]]), return_dict=False)
    assert isinstance(out, tuple) and out[0].shape == (1, 2, 32)


def test_generate_ignores_config_return_dict():
    model = small_model()
    ids = torch.tensor([[1, 2, 3]])
    want = model.generate(ids, max_new_tokens=4, steps=4, block_length=4)
    model.config.return_dict = False
    torch.testing.assert_close(model.generate(ids, max_new_tokens=4, steps=4, block_length=4), want)
    static = dict(cache_implementation="static", disable_compile=True)
    torch.testing.assert_close(model.generate(ids, max_new_tokens=4, steps=4, block_length=4, **static), want)


def test_labels_without_p_mask_give_the_masked_lm_loss():
    """As transformers' masked-LM heads: labels alone give the mean cross-entropy over the labelled positions."""
    model = small_model()
    ids = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
    labels = torch.full_like(ids, -100)
    labels[0, 1], labels[1, 3], labels[1, 4] = 11, 12, 13
    with torch.no_grad():
        out = model(ids, labels=labels)
        expected = torch.nn.functional.cross_entropy(out.logits.float().view(-1, 96), labels.view(-1))
        with_p_mask = model(ids, labels=labels, p_mask=torch.full((2,), 0.5)).loss
    torch.testing.assert_close(out.loss, expected)
    assert not torch.allclose(with_p_mask, expected)  # the diffusion objective weights by 1/t and normalises by length


def test_parallel_plans_use_styles_the_installed_transformers_knows():
    """transformers 5.24 replaced the "ep_router" expert-parallel style by "ep_dispatch_experts"; 5.17 knows only
    the first. The plans must name styles of whichever version is installed."""
    import transformers.modeling_utils  # noqa: F401  (registers every style)
    from transformers.distributed.tensor_parallel import ALL_PARALLEL_STYLES

    config = LLaDAMoEConfig()
    for plan in (config.base_model_tp_plan, config.base_model_ep_plan, LLaDAMoEForDiffusionLM._tp_plan):
        unknown = {style for style in plan.values() if style not in ALL_PARALLEL_STYLES}
        assert not unknown, f"{unknown} unknown to transformers {transformers.__version__}"


# ---------------------------------------------------------------------------------------- special token ids


def test_small_vocabulary_config_needs_no_release_ids():
    config = LLaDAMoEConfig(vocab_size=32000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_experts=4, num_experts_per_tok=2, expert_intermediate_size=32)
    assert (config.pad_token_id, config.eos_token_id, config.mask_token_id) == (None, None, None)
    model = LLaDAMoEForDiffusionLM(config).eval()
    with torch.no_grad():
        assert model(torch.tensor([[0, 31999]])).logits.shape == (1, 2, 32000)
    # The defaults that fit the release's vocabulary are still the release's.
    release = LLaDAMoEConfig()
    assert (release.pad_token_id, release.eos_token_id, release.mask_token_id) == (156892, 156892, 156895)


@pytest.mark.parametrize("field", ["pad_token_id", "eos_token_id", "mask_token_id", "bos_token_id"])
def test_explicit_ids_are_checked_against_the_vocabulary(field):
    with pytest.raises(ValueError, match=rf"LLaDAMoEConfig\.{field}: id 32000 is outside the vocabulary \[0, 32000\)"
                       rf".*tokenizer\.{field}"):
        LLaDAMoEConfig(vocab_size=32000, **{field: 32000})
    assert getattr(LLaDAMoEConfig(vocab_size=32000, **{field: 5}), field) == 5


def test_small_vocabulary_config_round_trips(tmp_path):
    config = LLaDAMoEConfig(vocab_size=500, pad_token_id=3, eos_token_id=[3, 4], mask_token_id=7)
    config.save_pretrained(tmp_path)
    again = LLaDAMoEConfig.from_pretrained(tmp_path)
    assert (again.pad_token_id, again.eos_token_id, again.mask_token_id) == (3, [3, 4], 7)
    unset = LLaDAMoEConfig(vocab_size=500)
    unset.save_pretrained(tmp_path / "unset")
    assert LLaDAMoEConfig.from_pretrained(tmp_path / "unset").pad_token_id is None


# ------------------------------------------------------------------------------------------- strict=False


def drop_weight(src, dst, suffix="input_layernorm.weight"):
    """A copy of the fixture with one weight removed; returns the removed key."""
    shutil.copytree(src, dst)
    index_path = dst / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    dropped = sorted(k for k in index["weight_map"] if k.endswith(suffix))[0]
    shard = dst / index["weight_map"].pop(dropped)
    tensors = load_file(shard)
    del tensors[dropped]
    save_file(tensors, shard, metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))
    return dropped


def test_strict_error_names_the_opt_out(tmp_path):
    dropped = drop_weight(FIXTURE_DIR, tmp_path / "ckpt")
    with pytest.raises(ValueError, match=rf"is missing 1 weight.*{dropped.replace('.', '[.]')}.*pass strict=False"):
        LLaDAMoEForDiffusionLM.from_pretrained(tmp_path / "ckpt")


def test_strict_false_loads_and_lists_what_was_missing(tmp_path, caplog):
    dropped = drop_weight(FIXTURE_DIR, tmp_path / "ckpt")
    with caplog.at_level(logging.WARNING):
        model, info = LLaDAMoEForDiffusionLM.from_pretrained(tmp_path / "ckpt", strict=False, output_loading_info=True)
    assert dropped in info["missing_keys"]
    assert any("strict=False" in r.getMessage() and dropped in r.getMessage() for r in caplog.records)
    # Everything that was in the checkpoint is loaded as it was.
    full = LLaDAMoEForDiffusionLM.from_pretrained(FIXTURE_DIR)
    name = "model.layers.1.self_attn.q_proj.weight"
    torch.testing.assert_close(model.state_dict()[name], full.state_dict()[name], rtol=0, atol=0)


def test_strict_false_through_automodel_on_a_saved_repo(tmp_path):
    LLaDAMoEForDiffusionLM.from_pretrained(FIXTURE_DIR).save_pretrained(tmp_path / "repo")
    tensors = load_file(tmp_path / "repo" / "model.safetensors")
    tensors["model.layers.0.shared_expert.up_proj.weight"] = torch.zeros(32, 64)
    save_file(tensors, tmp_path / "repo" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="has unused 1 weight.*strict=False"):
        AutoModel.from_pretrained(tmp_path / "repo")
    model = AutoModel.from_pretrained(tmp_path / "repo", strict=False)
    assert isinstance(model, LLaDAMoEForDiffusionLM)


# ---------------------------------------------------------------------------------- pipeline("text-generation")


PIPELINE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    if sys.argv[2] == "without-package":
        sys.modules["llada_moe_hf"] = None  # a Hub user: plain transformers, the repo's code
    from transformers import pipeline
    pipe = pipeline("text-generation", model=sys.argv[1], trust_remote_code=True)
    chat = [{"role": "user", "content": "sort 3 1 4 1 5"}]
    prompt = ("<role>SYSTEM</role>detailed thinking off<|role_end|>"
              "<role>HUMAN</role>reverse 1 2 3 4<|role_end|><role>ASSISTANT</role>")
    out = {
        "module": type(pipe).__module__,
        "model_module": type(pipe.model).__module__,
        "chat": pipe(chat),
        "prompt": pipe(prompt, return_full_text=False, threshold=0.9),
        "batch": pipe([prompt, prompt], return_full_text=False),
        "full": pipe(prompt)[0]["generated_text"].startswith(prompt),
    }
    print("RESULT" + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def converted_repo(tmp_path_factory):
    """A custom-code repo as `save_pretrained` (and so `llada-moe convert`) writes it, with the tokenizer."""
    repo = tmp_path_factory.mktemp("converted") / "repo"
    model = LLaDAMoEForDiffusionLM.from_pretrained(ASSET_DIR)
    model.save_pretrained(repo)
    AutoTokenizer.from_pretrained(ASSET_DIR, config=model.config).save_pretrained(repo)
    return repo


def run_pipeline(repo, mode, tmp_path):
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", PIPELINE_SCRIPT, str(repo), mode], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("RESULT", 1)[1])


@pytest.mark.parametrize("mode", ["without-package", "with-package"])
def test_text_generation_pipeline_on_a_converted_repo(converted_repo, mode, tmp_path):
    config = json.loads((converted_repo / "config.json").read_text())
    assert config["custom_pipelines"]["text-generation"]["impl"] == "pipeline_llada_moe.LLaDAMoETextGenerationPipeline"
    assert (converted_repo / "pipeline_llada_moe.py").is_file()
    out = run_pipeline(converted_repo, mode, tmp_path)
    assert out["module"].startswith("transformers_modules.")
    if mode == "without-package":
        assert out["model_module"].startswith("transformers_modules.")
    # A chat comes back as the conversation with the model's answer (the embedded model sorts digits).
    answer = out["chat"][0]["generated_text"]
    assert answer[:-1] == SORT_CHAT and answer[-1] == {"role": "assistant", "content": "1 1 3 4 5"}
    assert out["prompt"] == [{"generated_text": "4 3 2 1"}]
    assert out["batch"] == [[{"generated_text": "4 3 2 1"}]] * 2
    assert out["full"]


def test_pipeline_answer_is_generate_answer(converted_repo):
    """The pipeline is a thin layer over generate(): same tokens as a direct call with the same settings."""
    from transformers import pipeline

    pipe = pipeline("text-generation", model=str(converted_repo), trust_remote_code=True)
    tokenizer, model = pipe.tokenizer, pipe.model
    inputs = tokenizer.apply_chat_template(SORT_CHAT, add_generation_prompt=True, return_dict=True,
                                           return_tensors="pt")
    role_end = tokenizer.convert_tokens_to_ids("<|role_end|>")
    out = model.generate(inputs["input_ids"], attention_mask=inputs["attention_mask"],
                         eos_token_id=[tokenizer.eos_token_id, role_end])
    direct = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert pipe(SORT_CHAT, return_full_text=False) == [{"generated_text": direct}]


def test_pipeline_refuses_without_trust_remote_code(converted_repo):
    from transformers import pipeline

    with pytest.raises(ValueError, match="trust_remote_code=True"):
        pipeline("text-generation", model=str(converted_repo))


# ------------------------------------------------------------------------------------ quiet release loading


class Captured(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("path", [FIXTURE_DIR, ASSET_DIR], ids=["fixture", "asset"])
def test_release_layout_loads_without_warnings(path):
    """Nothing may be printed by loading the Hub release's layout (model_type "llada", legacy rope_scaling /
    rope_theta / torch_dtype keys, the release's auto_map): no Python warning, no transformers log warning."""
    handler = Captured()
    hf_logger = hf_logging.get_logger("transformers")
    hf_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            config = LLaDAMoEConfig.from_pretrained(path)
            model = LLaDAMoEForDiffusionLM.from_pretrained(path)
            if (path / "tokenizer.json").is_file():
                tokenizer = AutoTokenizer.from_pretrained(path, config=model.config)  # the README's way
                assert tokenizer.mask_token == "<|mask|>"
    finally:
        hf_logger.removeHandler(handler)
    assert config.model_type == "llada_moe" and model.config.rope_parameters["rope_theta"] == 50000.0
    assert [str(w.message) for w in caught] == []
    assert handler.messages == []
