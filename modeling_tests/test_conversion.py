"""Issue 5: `llada-moe convert` on the tiny fixture: verified custom-code output, --to-original bit-exact, dInfer
input, safe destination handling, model cards."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from llada_moe_hf.chat import CHAT_TEMPLATE
from llada_moe_hf.conversion import convert as convert_module
from llada_moe_hf.conversion.convert import ConversionError, convert, main
from llada_moe_hf.conversion.verify import MANIFEST_NAME, VerificationError, check_manifest
from llada_moe_hf.generation_llada_moe import DiffusionGenerationConfig
from llada_moe_hf.model_cards import render_card, validate_card

from conftest import FIXTURE_DIR
from test_modeling import REMOTE_SCRIPT


MASK_ID, EOS_ID, ROLE_END_ID = 363, 360, 361


def fixture_tensors(directory=FIXTURE_DIR):
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        if not path.name.startswith("golden"):
            tensors.update(load_file(path))
    return tensors


def save_tiny_tokenizer(directory):
    """A word-level tokenizer over the fixture's 384 ids with the release's special tokens at the golden ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(384)}
    specials = {"<|endoftext|>": EOS_ID, "<|role_end|>": ROLE_END_ID, "<|mask|>": MASK_ID, "<unk>": 0}
    for token, i in specials.items():
        vocab = {k: v for k, v in vocab.items() if v != i}
        vocab[token] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="<unk>")
    fast.add_special_tokens({"additional_special_tokens": ["<|role_end|>", "<|mask|>"]})
    fast.save_pretrained(directory)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The fixture in the release layout plus a tokenizer without mask token or chat template."""
    src = tmp_path_factory.mktemp("src") / "LLaDA-MoE-tiny-Instruct"
    shutil.copytree(FIXTURE_DIR, src, ignore=shutil.ignore_patterns("golden*"))
    save_tiny_tokenizer(src)
    return src


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory):
    dst = tmp_path_factory.mktemp("out") / "tiny-converted"
    assert main([str(source), str(dst), "--max-shard-size", "300KB"]) == 0
    return dst


def test_converted_repo_layout(converted):
    names = {p.name for p in converted.iterdir()}
    for name in ("config.json", "configuration_llada_moe.py", "modeling_llada_moe.py", "generation_llada_moe.py",
                 "model.safetensors.index.json", "generation_config.json", "README.md", MANIFEST_NAME,
                 "tokenizer.json", "tokenizer_config.json"):
        assert name in names, name
    assert len([n for n in names if n.endswith(".safetensors")]) > 1  # --max-shard-size honoured
    assert not [n for n in converted.parent.iterdir() if n.name.startswith(".")]  # no temp dir left behind
    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "llada_moe"
    assert config["auto_map"]["AutoModel"] == "modeling_llada_moe.LLaDAMoEForDiffusionLM"
    assert config["mask_token_id"] == MASK_ID  # taken from the tokenizer
    # per-expert names by default, bit-identical to the source
    index = json.loads((converted / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index) == set(fixture_tensors())
    manifest = check_manifest(converted)
    assert manifest["conversion"]["tensors_identical_to_source"] == len(index)


def test_tokenizer_and_generation_config(converted):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(converted)
    assert tokenizer.mask_token == "<|mask|>" and tokenizer.mask_token_id == MASK_ID
    assert tokenizer.chat_template == CHAT_TEMPLATE  # the source had none
    generation = DiffusionGenerationConfig.from_pretrained(converted)
    assert generation.mask_token_id == MASK_ID
    assert generation.eos_token_id == [EOS_ID, ROLE_END_ID]
    assert (generation.steps, generation.max_new_tokens, generation.block_length) == (128, 128, 32)


def test_model_card_is_valid(converted):
    text = (converted / "README.md").read_text()
    card = validate_card(text)
    data = card.data.to_dict()
    assert data["license"] == "apache-2.0" and data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "text-generation"
    # The fixture is not the release's shape: the card names no base model and describes what was converted.
    assert "base_model" not in data and "conversational" in data["tags"]  # "Instruct" in SRC's name
    assert {"llada-moe", "diffusion", "moe", "custom_code"} <= set(data["tags"])
    assert "trust_remote_code=True" in card.text and "import llada_moe_hf" in card.text
    assert "`block_length` | `32`" in card.text and "2509.24389" in card.text
    assert "| hidden size | 64 |" in card.text and "16 per MoE layer, top-4" in card.text
    assert "7B" not in card.text and "instruct (chat)" in card.text


@pytest.mark.parametrize("kind", ["base", "instruct", "other", "lora"])
def test_card_templates_render_and_validate(kind):
    fields = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]) if kind == "lora" else {}
    text = render_card(kind, base_model="inclusionAI/LLaDA-MoE-7B-A1B-Base", repo_id="me/x", **fields)
    card = validate_card(text)
    assert card.data.library_name == ("peft" if kind == "lora" else "transformers")
    with pytest.raises(ValueError, match="missing tags"):
        validate_card(text.replace("- custom_code\n", ""))
    with pytest.raises(ValueError, match="Unknown model card kind"):
        render_card("adapter", base_model="x/y")


def test_fresh_process_reproduces_golden_logits(converted, tmp_path):
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(converted), str(FIXTURE_DIR / "golden.safetensors")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MAXERR" in proc.stdout


def test_to_original_is_bit_exact(converted, tmp_path):
    back = tmp_path / "original"
    with pytest.warns(UserWarning, match="configuration_lladamoe.py"):
        convert(str(converted), str(back), to_original=True)
    got, want = fixture_tensors(back), fixture_tensors()
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name
    config = json.loads((back / "config.json").read_text())
    fixture_config = json.loads((FIXTURE_DIR / "config.json").read_text())
    for key, value in fixture_config.items():
        if key != "transformers_version":
            assert config[key] == value, key
    assert "rope_parameters" not in config and "dtype" not in config and "mask_token_id" not in config
    assert not list(back.glob("*.py"))  # no llada_moe code: the release's files are not ours to ship


def test_dinfer_layout_converts_to_same_tensors(tmp_path):
    src = tmp_path / "dinfer"
    src.mkdir()
    tensors = fixture_tensors()
    fused = {k: v for k, v in tensors.items() if ".mlp.experts." not in k}
    for layer in range(2):
        p = f"model.layers.{layer}.mlp"
        fused[f"{p}.w1"] = torch.stack([torch.cat([tensors[f"{p}.experts.{e}.gate_proj.weight"],
                                                   tensors[f"{p}.experts.{e}.up_proj.weight"]]) for e in range(16)])
        fused[f"{p}.w2"] = torch.stack([tensors[f"{p}.experts.{e}.down_proj.weight"] for e in range(16)])
    save_file(fused, src / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((FIXTURE_DIR / "config.json").read_text())
    config["architectures"] = ["FusedLLaDAMoEModelLM"]
    config["auto_map"] = {"AutoConfig": "configuration_lladamoe.LLaDAConfig",
                          "AutoModelForCausalLM": "modeling_fused_olmoe.FusedLLaDAMoEModelLM"}
    (src / "config.json").write_text(json.dumps(config))
    dst = tmp_path / "from-dinfer"
    with pytest.warns(UserWarning, match="no tokenizer"):
        convert(str(src), str(dst))
    got = fixture_tensors(dst)
    assert got.keys() == tensors.keys()
    for name in tensors:
        assert torch.equal(got[name], tensors[name]), name
    assert json.loads((dst / MANIFEST_NAME).read_text())["conversion"]["source_layout"] == "dinfer"


def test_existing_destination_is_not_touched(source, tmp_path, capsys):
    dst = tmp_path / "taken"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert main([str(source), str(dst)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in dst.iterdir()] == ["keep.txt"] and (dst / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def corrupt_after_write(monkeypatch):
    """Perturb one tensor in the written files, as a faulty conversion would."""
    original = convert_module.write_checkpoint

    def faulty(model, out_dir, **kwargs):
        original(model, out_dir, **kwargs)
        shard = sorted(out_dir.glob("*.safetensors"))[0]
        tensors = load_file(shard)
        name = sorted(k for k in tensors if "self_attn.q_proj" in k)[0]
        tensors[name] = tensors[name] * 1.5
        save_file(tensors, shard, metadata={"format": "pt"})

    monkeypatch.setattr(convert_module, "write_checkpoint", faulty)


def test_verification_failure_leaves_no_destination(source, tmp_path, monkeypatch):
    corrupt_after_write(monkeypatch)
    dst = tmp_path / "never"
    with pytest.raises(VerificationError, match="differ from the source"):
        convert(str(source), str(dst))
    assert not dst.exists() and list(tmp_path.iterdir()) == []


def test_overwrite_keeps_old_until_verified_then_replaces(source, tmp_path, monkeypatch):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    # 1. a cast with a corrupted tensor: caught by the logits check in the fresh process; the old DST survives
    with monkeypatch.context() as patch:
        corrupt_after_write(patch)
        with pytest.raises(VerificationError, match="identical"):
            convert(str(source), str(dst), dtype="bfloat16", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["dst"] and (dst / "old.txt").read_text() == "old"
    # 2. the same conversion without the fault replaces it: bfloat16, fused experts, cast within tolerance
    convert(str(source), str(dst), dtype="bfloat16", overwrite=True, fused_experts=True)
    assert not (dst / "old.txt").exists() and [p.name for p in tmp_path.iterdir()] == ["dst"]
    tensors = load_file(dst / "model.safetensors")
    assert tensors["model.layers.0.mlp.experts.gate_up_proj"].shape == (16, 64, 64)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    report = json.loads((dst / MANIFEST_NAME).read_text())["conversion"]["verification"]
    assert report["cast_relative_max_error"] <= report["cast_tolerance"]["relative"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["{src}", "{tmp}/x", "--to-original", "--fused-experts"], "cannot be combined"),
        (["{tmp}/missing", "{tmp}/x"], "no such directory"),
        (["{src}", "{src}/inside"], "must not be SRC or inside it"),
        (["{src}"], "Give SRC and DST"),
    ],
)
def test_bad_arguments_are_explained(source, tmp_path, capsys, argv, message):
    argv = [a.format(src=source, tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_dense_llada_source_is_refused(tmp_path, capsys):
    (tmp_path / "dense").mkdir()
    (tmp_path / "dense" / "config.json").write_text(json.dumps({"model_type": "llada", "architectures": ["LLaDAModelLM"]}))
    save_file({"x": torch.zeros(1)}, tmp_path / "dense" / "model.safetensors")
    assert main([str(tmp_path / "dense"), str(tmp_path / "out")]) == 2
    assert "dense LLaDA" in capsys.readouterr().err


def test_script_entry_point(tmp_path):
    script = os.path.join(os.path.dirname(os.path.dirname(__file__)), "conversion", "convert.py")
    proc = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--to-original" in proc.stdout
