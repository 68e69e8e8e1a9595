"""Issue 3: `llada-moe generate` / `llada-moe chat`, the chat template, and TextDiffusionStreamer output."""

import io
import re
import shutil

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast, TextDiffusionStreamer

from llada_moe_hf import LLaDAMoEForDiffusionLM
from llada_moe_hf.chat import CHAT_TEMPLATE, encode_chat, mask_token_id, render_chat, stop_token_ids
from llada_moe_hf.cli import main

from conftest import FIXTURE_DIR


MASK, EOS, ROLE_END = 363, 360, 361
ROLE_WORDS = ["<role>", "</role>", "SYSTEM", "HUMAN", "ASSISTANT", "OBSERVATION", "detailed", "thinking", "off"]


def tiny_tokenizer():
    """A word-level tokenizer with the fixture's 384 ids: w0..w359 (the role words take ids 0..8), eos 360,
    <|role_end|> 361, [UNK] 362, <|mask|> 363."""
    vocab = {word: i for i, word in enumerate(ROLE_WORDS)}
    vocab.update({f"w{i}": i for i in range(len(ROLE_WORDS), 360)})
    vocab.update({"<|endoftext|>": EOS, "<|role_end|>": ROLE_END, "[UNK]": 362, "<|mask|>": MASK})
    vocab.update({f"x{i}": i for i in range(364, 384)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="[UNK]",
        mask_token="<|mask|>", additional_special_tokens=["<|role_end|>"],
    )
    tokenizer.add_tokens(["<role>", "</role>", "SYSTEM", "HUMAN", "ASSISTANT"])
    return tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-with-tokenizer")
    for path in FIXTURE_DIR.iterdir():
        if not path.name.startswith("golden"):
            shutil.copy(path, directory / path.name)
    tiny_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def model(model_dir):
    return LLaDAMoEForDiffusionLM.from_pretrained(model_dir, experts_implementation="eager").eval()


def test_tokenizer_helpers(model_dir, model):
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    assert len(tokenizer) == 384
    assert mask_token_id(tokenizer) == MASK
    assert stop_token_ids(tokenizer, model.config) == [EOS, ROLE_END]
    messages = [{"role": "user", "content": "w10 w11"}]
    tokenizer.chat_template = CHAT_TEMPLATE
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == render_chat(messages) == (
        "<role>SYSTEM</role>detailed thinking off<|role_end|><role>HUMAN</role>w10 w11<|role_end|><role>ASSISTANT</role>"
    )
    ids = encode_chat(tokenizer, messages)
    assert ids == [0, 2, 1, 6, 7, 8, ROLE_END, 0, 3, 1, 10, 11, ROLE_END, 0, 4, 1]


def test_chat_template_system_and_errors():
    text = render_chat(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "tool", "content": "42"},
        ],
        add_generation_prompt=False,
    )
    assert text == (
        "<role>SYSTEM</role>Be brief.\ndetailed thinking off<|role_end|><role>HUMAN</role>Hi<|role_end|>"
        "<role>ASSISTANT</role>Hello<|role_end|><role>OBSERVATION</role><tool_response>\n42\n</tool_response><|role_end|>"
    )
    with pytest.raises(ValueError, match="Unknown chat role"):
        render_chat([{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="string 'content'"):
        render_chat([{"role": "user"}])


def test_text_diffusion_streamer_prints_the_answer(model, model_dir, capsys):
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    prompt = torch.tensor([tokenizer.encode("w20 w21 w22 w23", add_special_tokens=False)])
    streamer = TextDiffusionStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    out = model.generate(prompt, max_new_tokens=16, steps=8, block_length=8, streamer=streamer, stop_at_eos=False,
                         mask_token_id=MASK)
    printed = capsys.readouterr().out
    assert "\0337" in printed  # drafts were shown (saved cursor) and then replaced
    final = re.sub(r"\0337.*?\0338\033\[J", "", printed, flags=re.S)  # confirmed text without the drafts
    assert final.strip() == tokenizer.decode(out[0, 4:], skip_special_tokens=True).strip()


def test_cli_generate_matches_generate(model, model_dir, capsys):
    rc = main(
        ["generate", str(model_dir), "--prompt", "w15 w16 w17", "--max-new-tokens", "16", "--block-length", "8",
         "--steps", "8", "--no-stop-at-eos", "--no-stream", "--stats"]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    expected = model.generate(torch.tensor([[15, 16, 17]]), max_new_tokens=16, steps=8, block_length=8,
                              stop_at_eos=False, mask_token_id=MASK)
    answer = expected[0, 3:].tolist()
    for i, token in enumerate(answer):  # the CLI cuts at the first stop id
        if token in (EOS, ROLE_END):
            answer = answer[:i]
            break
    assert captured.out.strip() == tokenizer.decode(answer, skip_special_tokens=True).strip()
    assert "8 forward passes" in captured.err


def test_cli_generate_streams_and_chats(model_dir, capsys):
    rc = main(
        ["generate", str(model_dir), "--prompt", "w5 w6", "--chat", "--max-new-tokens", "8", "--block-length", "4",
         "--threshold", "0.9", "--cache-mode", "dual", "--stream"]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert out.endswith("\n") and "\033" not in out  # streamed into a non-terminal: plain text, no drafts


def test_cli_generate_reports_bad_settings(model_dir, capsys):
    rc = main(["generate", str(model_dir), "--prompt", "w5", "--max-new-tokens", "10", "--block-length", "4",
               "--no-stream"])
    assert rc == 2
    assert "block_length=4 does not divide max_new_tokens=10" in capsys.readouterr().err


def test_cli_chat_session(model_dir, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("w10 w11\n/reset\nw12\n/exit\nnever read\n"))
    rc = main(["chat", str(model_dir), "--max-new-tokens", "8", "--block-length", "8", "--no-stream"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    lines = captured.out.splitlines()
    assert "[conversation reset]" in lines
    assert len(lines) == 3  # answer, reset notice, answer
