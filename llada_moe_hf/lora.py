# Copyright 2026 The llada-moe-hf authors. Licensed under the Apache License, Version 2.0.
"""LoRA fine-tuning of LLaDA-MoE with PEFT, experts included.

Not Hub custom code (it imports peft): the adapter it produces loads with plain PEFT onto a base model loaded
from the package or as custom code (`trust_remote_code=True`).

The experts of a layer are two fused 3-D parameters (`mlp.experts.gate_up_proj [E, 2I, H]` and
`mlp.experts.down_proj [E, H, I]`), not `nn.Linear`s, so PEFT reaches them through `target_parameters`
(`lora.ParamWrapper`: rank `r` per expert, `W + scale * B @ A` materialised for the duration of each forward).
That path refuses `lora_dropout`, DoRA, `lora_bias` and `fan_in_fan_out`; `check_lora_config` says so up front.
The model is not a `GenerationMixin`, so `task_type` must stay None (a plain `PeftModel`): `PeftModel` still
forwards `generate()` to the base model.

    from llada_moe_hf.lora import get_lora_model
    model = get_lora_model(base_model)            # default_lora_config(base_model) unless a config is given
    model.print_trainable_parameters()
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model

from .staging import normalize_permissions


ATTENTION_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
# Dense-layer MLPs (moe_layer_freq == 0) and the shared expert: plain nn.Linear SwiGLU.
MLP_TARGET_MODULES = ("gate_proj", "up_proj", "down_proj")
EXPERT_TARGET_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
# Options PEFT's ParamWrapper (target_parameters) cannot honour, with the value that switches them off.
PARAMETER_LORA_UNSUPPORTED = {"lora_dropout": 0.0, "use_dora": False, "lora_bias": False, "fan_in_fan_out": False}
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def default_lora_config(
    model=None,
    *,
    r: int = 16,
    lora_alpha: int = 32,
    attention: bool = True,
    mlp: bool = True,
    experts: bool = True,
    **lora_kwargs,
) -> LoraConfig:
    """The package's default LoRA config for LLaDA-MoE.

    Targets the attention projections (q/k/v/o), the dense-layer and shared-expert MLPs (gate/up/down, where the
    model has them) and the routed experts through `target_parameters` (`mlp.experts.gate_up_proj`,
    `mlp.experts.down_proj`; rank `r` per expert). The router (`mlp.gate`), embeddings, norms and `lm_head` stay
    frozen. `lora_dropout` is 0 (required on expert targets) and `task_type` None (the model is not a
    `GenerationMixin`).

    Args:
        model: optional; when given, MLP targets are kept only if the model has dense layers or shared experts,
            and expert targets only if it has MoE layers.
        r, lora_alpha: rank (per expert on the expert targets) and alpha (scale = lora_alpha / r).
        attention, mlp, experts: switch each group of targets off.
        **lora_kwargs: any other `peft.LoraConfig` field (e.g. `use_rslora=True`, `init_lora_weights`).
            Options the expert path cannot honour raise a ValueError (see `check_lora_config`).
    """
    has_mlp = has_experts = True
    if model is not None:
        names = [name for name, _ in model.named_modules()]
        has_mlp = any(name.rsplit(".", 1)[-1] in MLP_TARGET_MODULES for name in names)
        has_experts = any(name.endswith("mlp.experts") for name in names)
    target_modules = list(ATTENTION_TARGET_MODULES) if attention else []
    if mlp and has_mlp:
        target_modules += list(MLP_TARGET_MODULES)
    target_parameters = list(EXPERT_TARGET_PARAMETERS) if experts and has_experts else []
    if not target_modules and not target_parameters:
        raise ValueError("default_lora_config: every target group is switched off; enable attention, mlp or experts.")
    lora_kwargs.setdefault("lora_dropout", 0.0)
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=target_modules or None,
        target_parameters=target_parameters or None,
        task_type=lora_kwargs.pop("task_type", None),
        **lora_kwargs,
    )
    check_lora_config(config)
    return config


def check_lora_config(config: LoraConfig, model=None) -> LoraConfig:
    """Raise a ValueError naming the option when `config` cannot work on LLaDA-MoE, before PEFT fails obscurely.

    * on expert targets (`target_parameters`) PEFT supports no `lora_dropout`, no DoRA, no `lora_bias` and no
      `fan_in_fan_out`;
    * `task_type` must be None: LLaDA-MoE is a masked-diffusion model, not a `GenerationMixin` causal LM;
    * with `model`, every `target_parameters` entry must name a parameter of the model.
    """
    if not isinstance(config, LoraConfig):
        raise ValueError(f"expected a peft.LoraConfig, got {type(config).__name__}.")
    if config.target_parameters:
        for option, off in PARAMETER_LORA_UNSUPPORTED.items():
            value = getattr(config, option, off)
            if value != off and value is not None:
                raise ValueError(
                    f"LoraConfig.{option}={value!r} is not supported on the expert targets "
                    f"(target_parameters={list(config.target_parameters)}): PEFT applies LoRA to the fused 3-D "
                    f"expert weights as a weight delta, which has no place for {option}. Set {option}={off!r}, or "
                    "drop the expert targets (default_lora_config(experts=False)) to use it on the linear layers."
                )
    task_type = getattr(config.task_type, "value", config.task_type)
    if task_type is not None:
        raise ValueError(
            f"LoraConfig.task_type={task_type!r}: LLaDA-MoE is a masked-diffusion model, not a causal LM "
            "(it has no prepare_inputs_for_generation). Use task_type=None; PeftModel still forwards generate()."
        )
    if model is not None and config.target_parameters:
        names = [name for name, _ in model.named_parameters()]
        for target in config.target_parameters:
            if not any(name == target or name.endswith("." + target) for name in names):
                raise ValueError(
                    f"target_parameters entry {target!r} matches no parameter of the model. LLaDA-MoE's experts "
                    f"are {list(EXPERT_TARGET_PARAMETERS)} (fused: there is no per-expert gate_proj/up_proj)."
                )
    return config


def get_lora_model(model, lora_config: LoraConfig | None = None, adapter_name: str = "default", **default_kwargs):
    """Wrap `model` in a `PeftModel` with `lora_config` (default: `default_lora_config(model, **default_kwargs)`).

    Checks the config first (`check_lora_config`) and makes the embedding output require grad, so that
    re-entrant gradient checkpointing (enabled before or after this call) still reaches the LoRA weights.
    """
    if lora_config is None:
        lora_config = default_lora_config(model, **default_kwargs)
    elif default_kwargs:
        raise ValueError(f"pass either lora_config or default_lora_config options, not both ({sorted(default_kwargs)}).")
    check_lora_config(lora_config, model)
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    return get_peft_model(model, lora_config, adapter_name=adapter_name)


# ----------------------------------------------------------------------------------------------- Hub


def render_adapter_card(
    base_model: str,
    adapter_config: dict | None = None,
    repo_id: str | None = None,
    *,
    training: str | None = None,
    description: str | None = None,
    tags=(),
    metadata: dict | None = None,
) -> str:
    """The README.md of an adapter repo, from the package's "lora" card template (llada_moe_hf.model_cards):
    YAML metadata with `base_model` (so the Hub links the adapter to its base), `library_name: peft`,
    `base_model_relation: adapter`, the LLaDA-MoE tags; then rank, targets and usage. Validated offline."""
    from .model_cards import render_card

    adapter_config = adapter_config or {}
    return render_card(
        "lora",
        base_model=base_model,
        repo_id=repo_id,
        r=adapter_config.get("r"),
        lora_alpha=adapter_config.get("lora_alpha"),
        target_modules=adapter_config.get("target_modules") or [],
        target_parameters=adapter_config.get("target_parameters") or [],
        training=training,
        description=description,
        tags=tags,
        metadata=metadata,
    )


def push_lora_adapter_to_hub(
    model: PeftModel,
    repo_id: str,
    *,
    base_model: str | None = None,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload LoRA adapter",
    endpoint: str | None = None,
    **card_kwargs,
):
    """Save the adapter of `model` with a model card whose metadata sets `base_model`, check the folder, and
    upload it to `repo_id` (created if missing). Returns the `CommitInfo`.

    `base_model` defaults to the adapter's `base_model_name_or_path`; a local path there is refused (the card
    must point at a Hub repo): pass `base_model="inclusionAI/LLaDA-MoE-7B-A1B-Instruct"` for instance.
    """
    from huggingface_hub import HfApi, ModelCard

    if not isinstance(model, PeftModel):
        raise ValueError(f"push_lora_adapter_to_hub expects a peft.PeftModel, got {type(model).__name__}.")
    adapter_name = model.active_adapter
    config = model.peft_config[adapter_name]
    base_model = base_model or config.base_model_name_or_path
    if not base_model or os.path.exists(base_model) or base_model.count("/") != 1:
        raise ValueError(
            f"base_model {base_model!r} is not a Hub repo id ('owner/name'); the card's base_model must point at "
            "the Hub. Pass base_model=, e.g. 'inclusionAI/LLaDA-MoE-7B-A1B-Instruct'."
        )
    api = HfApi(endpoint=endpoint, token=token)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "adapter"
        save_adapter_with_card(model, folder, base_model=base_model, repo_id=repo_id, **card_kwargs)
        card = ModelCard.load(folder / "README.md")
        if card.data.base_model != base_model:
            raise RuntimeError(f"the rendered card says base_model={card.data.base_model!r}, expected {base_model!r}.")
        step = "create the repository"
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            step = "upload the adapter"
            return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message)
        except Exception as err:  # network, auth, server: say what failed and what to do, not a raw httpx error
            raise AdapterPushError(
                f"Pushing the LoRA adapter to {repo_id} failed while trying to {step} on {api.endpoint}: "
                f"{type(err).__name__}: {err}. No file was uploaded (the upload is one commit). Check the network (and "
                "HF_ENDPOINT), and a token with write access (token=..., HF_TOKEN or `hf auth login`), then call "
                "push_lora_adapter_to_hub again; or save it with save_adapter_with_card(model, DIR, base_model=...) "
                f"and upload DIR later (`hf upload {repo_id} DIR`)."
            ) from err


class AdapterPushError(RuntimeError):
    """push_lora_adapter_to_hub could not reach the Hub or was refused; nothing was uploaded."""


def save_adapter_with_card(
    model: PeftModel, save_directory, *, base_model: str, repo_id: str | None = None, overwrite: bool = False, **card_kwargs
) -> Path:
    """Write the adapter (adapter_config.json, adapter_model.safetensors) and its README.md to `save_directory`.

    Written to a temporary folder next to it, checked (files present, config's base model set), then moved into
    place; an existing `save_directory` is replaced only with `overwrite=True`.
    """
    target = Path(save_directory)
    if target.exists() and not overwrite:
        raise ValueError(f"{target} exists; pass overwrite=True to replace it.")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(staging)
        missing = [name for name in ADAPTER_FILES if not (staging / name).is_file()]
        if missing:
            raise RuntimeError(f"saving the adapter did not write {missing} in {staging}.")
        adapter_config = json.loads((staging / "adapter_config.json").read_text())
        adapter_config["base_model_name_or_path"] = base_model
        (staging / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, sort_keys=True))
        card = render_adapter_card(base_model, adapter_config, repo_id=repo_id, **card_kwargs)
        (staging / "README.md").write_text(card, encoding="utf-8")
        normalize_permissions(staging)  # mkdtemp made it 0700: the adapter gets the umask's permissions
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target


__all__ = [
    "ATTENTION_TARGET_MODULES",
    "AdapterPushError",
    "EXPERT_TARGET_PARAMETERS",
    "MLP_TARGET_MODULES",
    "check_lora_config",
    "default_lora_config",
    "get_lora_model",
    "push_lora_adapter_to_hub",
    "render_adapter_card",
    "save_adapter_with_card",
]
