"""Checkpoint layouts a conversion reads and writes.

- "release": the Hub release (inclusionAI/LLaDA-MoE-7B-A1B-*): model_type "llada", architectures
  ["LLaDAMoEModelLM"], per-expert tensors `mlp.experts.{e}.{gate,up,down}_proj.weight`, legacy config keys.
- "dinfer": dInfer's fused export (tools/transfer.py): architectures ["FusedLLaDAMoEModelLM"], `mlp.w1`
  [E, 2I, H] (gate rows then up rows) and `mlp.w2` [E, H, I].
- "llada_moe": this package's own layout (model_type "llada_moe"), experts per expert or fused.
"""

import json
from pathlib import Path

import torch
from safetensors import safe_open

from llada_moe_hf import LLaDAMoEConfig, LLaDAMoEForDiffusionLM
from llada_moe_hf.cli_common import check_weight_files
from llada_moe_hf.configuration_llada_moe import upgrade_legacy_config_dict


LAYOUTS = ("release", "dinfer", "llada_moe")
DINFER_ARCHITECTURE = "FusedLLaDAMoEModelLM"
# dInfer's fused expert tensors -> this package's fused parameters (identical layout, other names).
DINFER_KEY_MAPPING = {r"\.mlp\.w1$": ".mlp.experts.gate_up_proj", r"\.mlp\.w2$": ".mlp.experts.down_proj"}
RELEASE_ARCHITECTURES = ["LLaDAMoEModelLM"]
RELEASE_AUTO_MAP = {
    "AutoConfig": "configuration_lladamoe.LLaDAConfig",
    "AutoModel": "modeling_lladamoe.LLaDAMoEModelLM",
    "AutoModelForCausalLM": "modeling_lladamoe.LLaDAMoEModelLM",
}
RELEASE_CODE_FILES = ("configuration_lladamoe.py", "modeling_lladamoe.py")
# Keys of this package's config.json that the release's config.json does not have.
PACKAGE_ONLY_KEYS = ("rope_parameters", "mask_token_id", "dtype", "auto_map", "custom_pipelines")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_config_dict(src_dir: Path) -> dict:
    path = Path(src_dir) / "config.json"
    if not path.is_file():
        raise ValueError(f"{src_dir} has no config.json: it is not a Hugging Face model directory.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}).") from None


def weight_files(src_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint, from its index when sharded."""
    src_dir = Path(src_dir)
    index = src_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (src_dir / n).is_file()]
        if missing:
            raise ValueError(f"{index} lists shard(s) that are not in {src_dir}: {missing}. Download all shards.")
        return [src_dir / n for n in names]
    single = src_dir / "model.safetensors"
    return [single] if single.is_file() else []


def tensor_names(src_dir: Path) -> list[str]:
    names = []
    for path in weight_files(src_dir):
        with safe_open(str(path), framework="pt") as f:
            names.extend(f.keys())
    return names


def detect_layout(src_dir: Path) -> tuple[str, dict]:
    """(layout, config dict) of a checkpoint directory; a clear ValueError for anything else (a truncated or
    damaged weight file is named)."""
    config = read_config_dict(src_dir)
    architectures = config.get("architectures") or []
    model_type = config.get("model_type")
    files = weight_files(src_dir)
    if not files:
        raise ValueError(
            f"{src_dir} has no model.safetensors or model.safetensors.index.json; conversion reads safetensors "
            "checkpoints only (save a .bin checkpoint with safe_serialization first)."
        )
    check_weight_files(files)
    if DINFER_ARCHITECTURE in architectures or any(n.endswith(".mlp.w1") for n in tensor_names(src_dir)):
        return "dinfer", config
    if model_type == "llada":
        upgrade_legacy_config_dict(config)  # refuses dense LLaDA with a clear message
        return "release", config
    if model_type == LLaDAMoEConfig.model_type:
        return "llada_moe", config
    raise ValueError(
        f"{src_dir}/config.json says model_type {model_type!r}, architectures {architectures}: not a LLaDA-MoE "
        "checkpoint. Expected the Hub release (model_type 'llada', LLaDAMoEModelLM), dInfer's fused export "
        "(FusedLLaDAMoEModelLM) or this package's layout (model_type 'llada_moe')."
    )


def load_model(src_dir: Path, layout: str, config_dict: dict, dtype="auto", **loading) -> LLaDAMoEForDiffusionLM:
    """The checkpoint as a model (in its own dtype by default; `loading`: e.g. attn_implementation). Missing
    weights are refused (see from_pretrained)."""
    kwargs = dict(dtype=dtype, **loading)
    if layout == "dinfer":
        config_dict = dict(config_dict, architectures=RELEASE_ARCHITECTURES)
        config_dict.pop("auto_map", None)
        kwargs.update(config=LLaDAMoEConfig.from_dict(upgrade_legacy_config_dict(config_dict)),
                      key_mapping=DINFER_KEY_MAPPING)
    model, info = LLaDAMoEForDiffusionLM.from_pretrained(src_dir, output_loading_info=True, **kwargs)
    unexpected = sorted(k for k in info.get("unexpected_keys") or [] if "rotary_emb.inv_freq" not in k)
    if unexpected:
        raise ValueError(
            f"{src_dir} has {len(unexpected)} tensor(s) the model does not use: {unexpected[:10]}. Refusing to drop "
            "them silently: check that config.json matches the weights."
        )
    return model.eval()


def original_config_dict(config: LLaDAMoEConfig, source_config: dict | None = None) -> dict:
    """config.json in the release's format: model_type "llada", LLaDAMoEModelLM, the release's auto_map and the
    legacy keys rope_theta / partial_rotary_factor / rope_scaling / torch_dtype instead of rope_parameters / dtype.

    A release-layout source keeps its own config.json (only torch_dtype follows a cast), so that a round trip
    gives back the same keys and values."""
    dtype = str(config.dtype).replace("torch.", "") if config.dtype is not None else None
    if source_config is not None and source_config.get("model_type") == "llada":
        out = dict(source_config)
        out["torch_dtype"] = dtype or out.get("torch_dtype")
        return out
    out = config.to_dict()
    rope = dict(config.rope_parameters or {})
    for key in PACKAGE_ONLY_KEYS + ("transformers_version",):
        out.pop(key, None)
    out["rope_theta"] = rope.pop("rope_theta", 50000.0)
    out["partial_rotary_factor"] = rope.pop("partial_rotary_factor", 1)
    rope_type = rope.pop("rope_type", "default")
    out["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, **rope}
    out["torch_dtype"] = dtype
    out["model_type"] = "llada"
    out["architectures"] = list(RELEASE_ARCHITECTURES)
    out["auto_map"] = dict(RELEASE_AUTO_MAP)
    return dict(sorted(out.items()))
