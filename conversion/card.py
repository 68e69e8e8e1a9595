"""The model card of a converted checkpoint: what was converted (size, shape, kind, source), as measured on the
loaded model, never the release's description by default."""

from pathlib import Path

from llada_moe_hf import LLaDAMoEConfig


BASE_MODELS = {"base": "inclusionAI/LLaDA-MoE-7B-A1B-Base", "instruct": "inclusionAI/LLaDA-MoE-7B-A1B-Instruct"}
# The released checkpoints' shape (LLaDAMoEConfig's defaults): a checkpoint of this shape is the release or a
# fine-tune of it, so its card may name the release as base model.
RELEASE_SHAPE = ("vocab_size", "hidden_size", "num_hidden_layers", "num_experts", "num_experts_per_tok",
                 "expert_intermediate_size")
SAMPLER_KEYS = ("max_new_tokens", "max_length", "steps", "block_length", "temperature", "top_k", "top_p",
                "cfg_scale", "remasking", "threshold", "cache_mode", "stop_at_eos")
LAYOUT_NAMES = {"release": "the release's layout", "dinfer": "dInfer's fused layout",
                "llada_moe": "llada-moe-hf layout"}


def card_kind(card: str, src: str) -> str:
    """The card's kind: as asked, else from SRC's name ("instruct"/"chat" or "base"), else "other"."""
    if card != "auto":
        return card
    name = Path(src.rstrip("/")).name.lower()
    if "instruct" in name or "chat" in name:
        return "instruct"
    return "base" if "base" in name else "other"


def has_release_shape(config) -> bool:
    release = LLaDAMoEConfig()
    return all(getattr(config, key, None) == getattr(release, key) for key in RELEASE_SHAPE)


def default_base_model(kind: str, config, src_repo: str | None) -> str | None:
    """The card's base_model when --base-model is not given: the Hub id it was converted from, else the release
    of that kind if the checkpoint has the release's shape, else none (the card then names no base model)."""
    if src_repo:
        return src_repo
    if kind in BASE_MODELS and has_release_shape(config):
        return BASE_MODELS[kind]
    return None


def human_count(count: int) -> str:
    for threshold, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= threshold:
            return f"{count / threshold:.3g}{suffix}"
    return str(count)


def parameter_counts(model) -> tuple[int, int]:
    """(all parameters, parameters used per token): a token runs num_experts_per_tok of num_experts experts."""
    total = sum(p.numel() for p in model.parameters())
    config = model.config
    unused_share = 1 - config.num_experts_per_tok / config.num_experts
    routed = sum(p.numel() for name, p in model.named_parameters() if ".mlp.experts." in name)
    return total, round(total - routed * unused_share)


def describe_model(model, kind: str) -> tuple[str, dict]:
    """(one-line summary, the card's "Model" table) of the converted model."""
    config = model.config
    total, active = parameter_counts(model)
    sizes = f"{human_count(total)} parameters, {human_count(active)} active per token"
    if has_release_shape(config):
        name = {"base": "LLaDA-MoE-7B-A1B-Base", "instruct": "LLaDA-MoE-7B-A1B-Instruct"}.get(kind, "LLaDA-MoE-7B-A1B")
        summary = f"{name} ({sizes})" + ("" if kind in ("base", "instruct") else ", or a fine-tune of it")
    else:
        summary = f"a LLaDA-MoE checkpoint of {sizes}"
    moe_layers = sum(1 for flag in (config.moe_layer_freq or []) if flag) if isinstance(config.moe_layer_freq, list) \
        else config.num_hidden_layers
    experts = (f"{config.num_experts} per MoE layer, top-{config.num_experts_per_tok}, "
               f"width {config.expert_intermediate_size}")
    if config.shared_expert_intermediate_size:
        experts += f", plus a shared expert of width {config.shared_expert_intermediate_size}"
    table = {
        "parameters": f"{total:,} ({sizes})",
        "layers": f"{config.num_hidden_layers} ({moe_layers} MoE, {config.num_hidden_layers - moe_layers} dense)",
        "hidden size": config.hidden_size,
        "attention heads": f"{config.num_attention_heads} ({config.num_key_value_heads} key/value)",
        "experts": experts,
        "vocabulary": f"{config.vocab_size:,}",
        "positions": f"{config.max_position_embeddings:,}",
        "kind": {"base": "base (pre-trained)", "instruct": "instruct (chat)"}.get(kind, "not stated"),
    }
    return summary, table


def write_card(out_dir: Path, kind: str, *, model, base_model: str | None, repo_id: str, source: str, layout: str,
               dtype: str, fused: bool, settings: dict, sampler_source: str, token_ids: dict, verification: str):
    from llada_moe_hf.model_cards import render_card

    summary, table = describe_model(model, kind)
    sampler = {k: settings[k] for k in SAMPLER_KEYS if settings.get(k) is not None}
    eos = settings.get("eos_token_id")
    text = render_card(
        kind, base_model=base_model, repo_id=repo_id, source=source, dtype=dtype, sampler=sampler,
        sampler_source=sampler_source, model_summary=summary, architecture=table,
        source_layout=LAYOUT_NAMES[layout],
        expert_layout="experts fused (gate_up_proj, down_proj)" if fused
        else "experts stored per expert (the release's tensor names)",
        mask_token_id=settings.get("mask_token_id"), eos_token_id=(eos[0] if isinstance(eos, list) else eos),
        role_end_id=token_ids.get("role_end"), verification=verification,
    )
    (out_dir / "README.md").write_text(text)
