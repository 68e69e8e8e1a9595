"""Issue 2: the core model is faithful to the original, loads the release layout unchanged, and refuses bad input."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

from llada_moe_hf import LLaDAMoEConfig, LLaDAMoEForDiffusionLM, LLaDAMoEModel, LLaDAMoEModelLM

from conftest import FIXTURE_DIR, assert_bf16_logits_close, tiny_config
from reference_llada_moe import per_expert_state_dict, reference_logits


def load_fixture(**kwargs):
    return LLaDAMoEForDiffusionLM.from_pretrained(FIXTURE_DIR, **kwargs).eval()


# ----------------------------------------------------------------------------------------------- golden logits


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("experts", ["eager", "grouped_mm", "cpu_moe", "auto"])
def test_golden_logits(golden, attn, experts):
    model = load_fixture(attn_implementation=attn, experts_implementation=experts)
    assert model.config._attn_implementation == attn
    assert model.config._experts_implementation == experts
    with torch.no_grad():
        logits = model(golden["logits.input_ids"]).logits
    torch.testing.assert_close(logits, golden["logits.logits"], rtol=0, atol=1e-5)


def test_flex_attention_golden_and_padding(golden):
    model = load_fixture(attn_implementation="flex_attention")
    ids = golden["logits.input_ids"]
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, golden["logits.logits"], rtol=0, atol=1e-5)
        flex = model(ids, attention_mask=mask).logits
        model.set_attn_implementation("eager")
        eager = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(flex[0, 3:], eager[0, 3:], rtol=0, atol=1e-5)
    torch.testing.assert_close(flex[1:], eager[1:], rtol=0, atol=1e-5)


def test_release_layout_loads_unchanged(fixture_dir):
    config = json.loads((fixture_dir / "config.json").read_text())
    assert config["model_type"] == "llada" and config["architectures"] == ["LLaDAMoEModelLM"]
    model, info = LLaDAMoEForDiffusionLM.from_pretrained(fixture_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.config.model_type == "llada_moe"
    assert model.dtype == torch.float32  # the checkpoint's dtype (legacy torch_dtype key)
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.shape == (16, 64, 64) and experts.down_proj.shape == (16, 64, 32)
    # Fused correctly: gate rows first, then up rows, expert e at index e.
    shards = {}
    for name in ("model-00001-of-00003", "model-00002-of-00003", "model-00003-of-00003"):
        shards.update(load_file(fixture_dir / f"{name}.safetensors"))
    for e in (0, 7, 15):
        p = f"model.layers.0.mlp.experts.{e}."
        torch.testing.assert_close(experts.gate_up_proj[e, :32], shards[p + "gate_proj.weight"], rtol=0, atol=0)
        torch.testing.assert_close(experts.gate_up_proj[e, 32:], shards[p + "up_proj.weight"], rtol=0, atol=0)
        torch.testing.assert_close(experts.down_proj[e], shards[p + "down_proj.weight"], rtol=0, atol=0)
    assert LLaDAMoEModelLM is LLaDAMoEForDiffusionLM


def test_bfloat16_load(golden_bf16):
    """The default implementations (sdpa, auto experts: cpu_moe on the CPU) in bf16 against the original's bf16 sdpa logits, within the
    stated tolerance (test_bf16.py has the bit-exact checks of the original's op order)."""
    model = load_fixture(dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert model.config._attn_implementation == "sdpa" and model.config._experts_implementation == "auto"
    with torch.no_grad():
        logits = model(golden_bf16["logits.input_ids"]).logits
    assert_bf16_logits_close(logits, golden_bf16["logits_bf16_sdpa.logits"])


def test_checkpoint_dtype_is_kept(tmp_path):
    model = load_fixture(dtype=torch.bfloat16)
    model.save_pretrained(tmp_path)
    reloaded = LLaDAMoEForDiffusionLM.from_pretrained(tmp_path)
    assert reloaded.dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------- padding


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_padding_mask_left_and_right(golden, attn):
    model = load_fixture(attn_implementation=attn)
    ids = golden["logits.input_ids"][:2, :15]
    pad = model.config.pad_token_id
    with torch.no_grad():
        ref = model(ids).logits
        left = torch.cat([torch.full((2, 4), pad), ids], dim=1)
        right = torch.cat([ids, torch.full((2, 6), pad)], dim=1)
        left_mask = torch.cat([torch.zeros(2, 4), torch.ones(2, 15)], dim=1).long()
        right_mask = torch.cat([torch.ones(2, 15), torch.zeros(2, 6)], dim=1).long()
        # one batch mixing a left-padded and a right-padded row
        mixed = torch.stack([left[0, :], torch.cat([ids[1], torch.full((4,), pad)])])
        mixed_mask = torch.stack([left_mask[0], torch.cat([torch.ones(15), torch.zeros(4)]).long()])
        out_left = model(left, attention_mask=left_mask).logits[:, 4:]
        out_right = model(right, attention_mask=right_mask).logits[:, :15]
        out_mixed = model(mixed, attention_mask=mixed_mask).logits
        unmasked = model(left).logits[:, 4:]
    torch.testing.assert_close(out_left, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(out_right, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(out_mixed[0, 4:], ref[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(out_mixed[1, :15], ref[1], rtol=0, atol=1e-5)
    # Without the mask the pads are attended to (the original Hub bug), so the mask really matters here.
    assert (unmasked - ref).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------- auto classes


def test_auto_classes_and_save_layout(tmp_path, golden):
    model = load_fixture()
    model.save_pretrained(tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    for name in ("config.json", "configuration_llada_moe.py", "modeling_llada_moe.py", "model.safetensors"):
        assert name in files
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "llada_moe"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_llada_moe.LLaDAMoEConfig",
        "AutoModel": "modeling_llada_moe.LLaDAMoEForDiffusionLM",
        "AutoModelForMaskedLM": "modeling_llada_moe.LLaDAMoEForDiffusionLM",
    }
    keys = set(load_file(tmp_path / "model.safetensors"))
    assert "model.layers.1.mlp.experts.15.up_proj.weight" in keys  # release per-expert names by default
    assert not any(k.endswith("gate_up_proj") for k in keys)

    assert isinstance(AutoConfig.from_pretrained(tmp_path), LLaDAMoEConfig)
    for auto in (AutoModel, AutoModelForMaskedLM):
        loaded = auto.from_pretrained(tmp_path)
        assert type(loaded) is LLaDAMoEForDiffusionLM
        with torch.no_grad():
            torch.testing.assert_close(loaded(golden["logits.input_ids"]).logits, golden["logits.logits"], rtol=0, atol=1e-5)


def test_fused_save_roundtrip(tmp_path, golden):
    model = load_fixture()
    model.save_pretrained(tmp_path, save_original_format=False)
    keys = set(load_file(tmp_path / "model.safetensors"))
    assert "model.layers.0.mlp.experts.gate_up_proj" in keys
    reloaded = LLaDAMoEForDiffusionLM.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(golden["logits.input_ids"]).logits, golden["logits.logits"], rtol=0, atol=1e-5)
    # Saved again by default, a model loaded from fused weights writes the release's per-expert names.
    reloaded.save_pretrained(tmp_path / "resaved")
    keys = set(load_file(tmp_path / "resaved" / "model.safetensors"))
    assert "model.layers.0.mlp.experts.3.gate_proj.weight" in keys
    assert not any(k.endswith("gate_up_proj") for k in keys)


REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    sys.modules["llada_moe_hf"] = None  # the package must not be importable here
    from transformers import AutoModel
    from safetensors.torch import load_file
    model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    golden = load_file(sys.argv[2])
    with torch.no_grad():
        logits = model(golden["logits.input_ids"]).logits
    err = (logits - golden["logits.logits"]).abs().max().item()
    print("MAXERR", err)
    assert err < 1e-5, err
    """
)


def test_remote_code_in_fresh_process(tmp_path):
    load_fixture().save_pretrained(tmp_path / "repo")
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(tmp_path / "repo"), str(FIXTURE_DIR / "golden.safetensors")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MAXERR" in proc.stdout


def test_device_map_auto_places_whole_layers(golden, tmp_path):
    # No GPU here: a CPU budget too small for the model makes accelerate split it between CPU and disk.
    model = load_fixture(device_map="auto", max_memory={"cpu": 900_000, "disk": 10**9}, offload_folder=str(tmp_path))
    placement = model.hf_device_map
    assert len(set(placement.values())) > 1, placement
    # _no_split_modules: never a piece of a decoder layer on its own
    assert not any(re.match(r"model\.layers\.\d+\.", name) for name in placement), placement
    with torch.no_grad():
        torch.testing.assert_close(model(golden["logits.input_ids"]).logits, golden["logits.logits"], rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------- config branches


BRANCHES = {
    "released_shape": {},
    "gqa": dict(num_key_value_heads=2),
    "partial_rotary": dict(partial_rotary_factor=0.5),
    "rope_linear_scaling": dict(rope_scaling={"type": "linear", "factor": 2.0}),
    "clip_qkv": dict(clip_qkv=0.05),
    "no_qk_norm": dict(qk_layernorm=False),
    "dense_first_layer": dict(moe_layer_freq=[0, 1]),
    "shared_expert": dict(shared_expert_intermediate_size=24),
    "expert_bias": dict(moe_router_enable_expert_bias=True),
    "attention_bias": dict(attention_bias=True),
    "ignored_fields": dict(norm_topk_prob=True, routed_scaling_factor=2.5, router_num_group=2, router_topk_group=1),
}


@pytest.mark.parametrize("branch", sorted(BRANCHES))
def test_config_branch_matches_reference(branch):
    torch.manual_seed(0)
    config = tiny_config(**BRANCHES[branch])
    model = LLaDAMoEForDiffusionLM(config).eval()
    with torch.no_grad():
        # random norm weights / biases so that every parameter matters
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.1)
        for module in model.modules():
            if getattr(module, "expert_bias", None) is not None:
                module.expert_bias.copy_(torch.rand_like(module.expert_bias) * 0.2)
    ids = torch.randint(0, config.vocab_size, (2, 11))
    with torch.no_grad():
        got = model(ids).logits
        want = reference_logits(config, per_expert_state_dict(model), ids)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_branch_structure():
    model = LLaDAMoEForDiffusionLM(tiny_config(moe_layer_freq=[0, 1], shared_expert_intermediate_size=24))
    names = set(model.state_dict())
    assert "model.layers.0.mlp.gate_proj.weight" in names  # dense layer
    assert "model.layers.1.shared_expert.up_proj.weight" in names  # shared expert on MoE layers only
    assert "model.layers.0.shared_expert.up_proj.weight" not in names
    bias_model = LLaDAMoEForDiffusionLM(tiny_config(moe_router_enable_expert_bias=True))
    assert "model.layers.0.mlp.expert_bias" in bias_model.state_dict()


def test_ignored_fields_change_nothing():
    torch.manual_seed(0)
    base = LLaDAMoEForDiffusionLM(tiny_config()).eval()
    other = LLaDAMoEForDiffusionLM(tiny_config(**BRANCHES["ignored_fields"], moe_router_score_function="sigmoid")).eval()
    other.load_state_dict(base.state_dict())
    ids = torch.randint(0, 90, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(base(ids).logits, other(ids).logits, rtol=0, atol=0)


def test_experts_implementations_agree_on_branches():
    torch.manual_seed(1)
    config = tiny_config(num_key_value_heads=2, shared_expert_intermediate_size=24, moe_layer_freq=[1, 0])
    model = LLaDAMoEForDiffusionLM(config).eval()
    ids = torch.randint(0, 90, (2, 13))
    outs = {}
    for impl in ("eager", "grouped_mm", "cpu_moe"):
        model.set_experts_implementation(impl)
        with torch.no_grad():
            outs[impl] = model(ids).logits
    torch.testing.assert_close(outs["eager"], outs["grouped_mm"], rtol=0, atol=1e-5)
    torch.testing.assert_close(outs["eager"], outs["cpu_moe"], rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------- HF idioms


def test_output_router_logits():
    model = load_fixture()
    ids = torch.randint(0, 360, (2, 7))
    out = model(ids, output_router_logits=True)
    assert len(out.router_logits) == 2
    assert out.router_logits[0].shape == (14, 16)
    assert out.aux_loss is not None and torch.isfinite(out.aux_loss)
    assert model(ids).router_logits is None


def test_output_hidden_states_and_attentions():
    model = load_fixture(attn_implementation="eager")
    out = model(torch.randint(0, 360, (1, 5)), output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == 3 and len(out.attentions) == 2
    assert out.attentions[0].shape == (1, 4, 5, 5)


def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(0)
    model = LLaDAMoEForDiffusionLM(tiny_config()).train()
    ids = torch.randint(0, 90, (2, 9))

    def grads():
        model.zero_grad()
        model(ids).logits.pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.gradient_checkpointing_enable()
    assert model.model.layers[0].gradient_checkpointing
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(num_experts_per_tok=9), "num_experts_per_tok"),
        (dict(hidden_size=30), "hidden_size"),
        (dict(moe_layer_freq=[1, 1, 1]), "moe_layer_freq"),
        (dict(num_key_value_heads=3), "num_key_value_heads"),
        (dict(pad_token_id=96), "pad_token_id"),
        (dict(eos_token_id=[5, 200]), "eos_token_id"),
        (dict(mask_token_id=-1), "mask_token_id"),
        (dict(partial_rotary_factor=1.5), "partial_rotary_factor"),
        (dict(moe_layer_freq=[0, 1], dense_intermediate_size=None), "dense_intermediate_size"),
        (dict(hidden_act="nope"), "hidden_act"),
    ],
)
def test_inconsistent_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_mutated_config_is_checked_at_model_build():
    config = tiny_config()
    config.num_experts_per_tok = 20
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        LLaDAMoEModel(config)


def test_ids_outside_vocabulary():
    model = LLaDAMoEForDiffusionLM(tiny_config()).eval()
    with pytest.raises(ValueError, match="input_ids contains id 96"):
        model(torch.tensor([[1, 2, 96]]))
    with pytest.raises(ValueError, match="input_ids contains id -3"):
        model(torch.tensor([[1, -3]]))


def test_missing_weight_is_refused(tmp_path, fixture_dir):
    shutil.copytree(fixture_dir, tmp_path / "ckpt")
    shard = tmp_path / "ckpt" / "model-00002-of-00003.safetensors"
    tensors = load_file(shard)
    dropped = sorted(k for k in tensors if k.endswith("input_layernorm.weight"))[0]
    del tensors[dropped]
    save_file(tensors, shard, metadata={"format": "pt"})
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    del index["weight_map"][dropped]
    (tmp_path / "ckpt" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=dropped.replace(".", r"\.")):
        LLaDAMoEForDiffusionLM.from_pretrained(tmp_path / "ckpt")


def test_missing_expert_is_refused(tmp_path, fixture_dir):
    shutil.copytree(fixture_dir, tmp_path / "ckpt")
    index_path = tmp_path / "ckpt" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for shard_name in set(index["weight_map"].values()):
        shard = tmp_path / "ckpt" / shard_name
        tensors = load_file(shard)
        kept = {k: v for k, v in tensors.items() if not k.startswith("model.layers.1.mlp.experts.")}
        save_file(kept, shard, metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not k.startswith("model.layers.1.mlp.experts.")}
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.experts\.gate_up_proj"):
        LLaDAMoEForDiffusionLM.from_pretrained(tmp_path / "ckpt")


def test_unused_weights_are_refused(tmp_path, fixture_dir):
    shutil.copytree(fixture_dir, tmp_path / "ckpt")
    # A shared expert in the weights while the config says there is none: loading must not ignore it.
    shard = tmp_path / "ckpt" / "model-00003-of-00003.safetensors"
    tensors = load_file(shard)
    extra = "model.layers.0.shared_expert.up_proj.weight"
    tensors[extra] = torch.zeros(32, 64)
    save_file(tensors, shard, metadata={"format": "pt"})
    index_path = tmp_path / "ckpt" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"][extra] = shard.name
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="has unused 1 weight.*shared_expert"):
        LLaDAMoEForDiffusionLM.from_pretrained(tmp_path / "ckpt")


def test_dense_llada_is_not_hijacked(tmp_path):
    dense = {
        "model_type": "llada",
        "architectures": ["LLaDAModelLM"],
        "d_model": 4096,
        "n_layers": 32,
        "n_heads": 32,
        "vocab_size": 126464,
        "mlp_hidden_size": 12288,
    }
    (tmp_path / "config.json").write_text(json.dumps(dense))
    with pytest.raises(ValueError, match="dense LLaDA"):
        LLaDAMoEForDiffusionLM.from_pretrained(tmp_path)


def test_push_to_hub_writes_custom_code_repo(tmp_path, monkeypatch):
    import huggingface_hub.constants
    from fake_hub import fake_hub

    model = load_fixture()
    with fake_hub(token="hf_test") as hub:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.endpoint)
        # Downloads build their URL from this template, made from ENDPOINT at import time (push_to_hub reads the
        # repo's README.md first); with huggingface_hub < 2 a request to the real Hub closes the shared client.
        monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        # transformers >= 5.24 keeps one HfApi, made with the endpoint of its first use (maybe an earlier test).
        import transformers.utils.hub

        if hasattr(transformers.utils.hub, "_hf_api"):
            monkeypatch.setattr(transformers.utils.hub, "_hf_api", None)
        model.push_to_hub("me/llada-moe-tiny", token="hf_test")
        pushed = hub.files("me/llada-moe-tiny")
    for name in ("config.json", "configuration_llada_moe.py", "modeling_llada_moe.py", "model.safetensors"):
        assert name in pushed, sorted(pushed)
    config = json.loads(pushed["config.json"])
    assert config["model_type"] == "llada_moe" and "AutoModelForMaskedLM" in config["auto_map"]
    # What arrived is a working custom-code repo: load it in a fresh process without the package.
    repo = tmp_path / "pushed"
    repo.mkdir()
    for name, data in pushed.items():
        (repo / name).write_bytes(data)
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(repo), str(FIXTURE_DIR / "golden.safetensors")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
