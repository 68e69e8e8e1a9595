import json
import os
os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton: fused_moe kernels run on CPU
import pathlib

import pytest
import torch
from safetensors.torch import load_file


FIXTURE_DIR = pathlib.Path(__file__).parent / "fixtures" / "llada-moe-tiny"
REPO_ROOT = pathlib.Path(__file__).parent.parent

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)  # tiny models gain nothing from 2 threads; 2 thrash when the 2 cores are busy


@pytest.fixture(scope="session")
def fixture_dir():
    return FIXTURE_DIR


@pytest.fixture(scope="session")
def golden():
    return load_file(FIXTURE_DIR / "golden.safetensors")


@pytest.fixture(scope="session")
def golden_meta():
    return json.loads((FIXTURE_DIR / "golden.json").read_text())


def tiny_config(**overrides):
    """A small random LLaDA-MoE config for branch tests (not the fixture)."""
    from llada_moe_hf import LLaDAMoEConfig

    values = dict(
        vocab_size=96,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        expert_intermediate_size=16,
        dense_intermediate_size=48,
        num_experts=8,
        num_experts_per_tok=3,
        max_position_embeddings=128,
        pad_token_id=90,
        eos_token_id=90,
        mask_token_id=95,
        moe_layer_freq=[1, 1],
    )
    values.update(overrides)
    return LLaDAMoEConfig(**values)
