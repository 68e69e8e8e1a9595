"""Render the README.md model cards of converted checkpoints and LoRA adapters.

The templates (`model.md` for converted checkpoints of every kind, `lora.md` for adapters, beside this file) are
Jinja Markdown files rendered by huggingface_hub's `ModelCard.from_template`; the YAML metadata is a
`ModelCardData`.

    from llada_moe_hf.model_cards import render_card
    text = render_card("lora", base_model="inclusionAI/LLaDA-MoE-7B-A1B-Instruct", repo_id="me/my-adapter",
                       r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"])
"""

from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData


TEMPLATE_DIR = Path(__file__).parent
# kind -> (template file, library_name). Adapters are PEFT repositories, which the Hub recognises by library_name.
# "other": a checkpoint not known to be a base or a chat model (a fine-tune, a small test model).
CARD_KINDS = {"base": ("model.md", "transformers"), "instruct": ("model.md", "transformers"),
              "other": ("model.md", "transformers"), "lora": ("lora.md", "peft")}
REQUIRED_TAGS = ("llada-moe", "diffusion", "moe", "custom_code")
EXTRA_TAGS = {"base": (), "instruct": ("conversational",), "other": (), "lora": ("lora", "peft")}
# What a card says about the model when the caller does not describe it: the release.
RELEASE_SUMMARY = "LLaDA-MoE-7B-A1B (7B parameters, about 1.4B active per token)"

# The original model card's sampler (arXiv 2509.24389 release): 128 new tokens in 4 blocks of 32, one token per step.
DEFAULT_SAMPLER = {
    "steps": 128,
    "max_new_tokens": 128,
    "block_length": 32,
    "temperature": 0.0,
    "cfg_scale": 0.0,
    "remasking": "low_confidence",
}

# Template variables and their defaults. `base_model` (card metadata) is required for adapters only.
DEFAULT_FIELDS = {
    "repo_id": None,  # defaults to base_model for usage snippets
    "model_name": None,  # defaults to the last part of repo_id
    "source": None,
    "source_layout": "the release's layout",
    "dtype": "bfloat16",
    "expert_layout": "experts stored per expert (the release's tensor names)",
    "verification": "logits compared with the source checkpoint on a fixed batch",
    "mask_token": "<|mask|>",
    "mask_token_id": 156895,
    "eos_token_id": 156892,
    "role_end_id": None,
    "sampler": None,
    "sampler_source": None,  # where the sampler defaults came from, e.g. "kept from the source checkpoint"
    "model_summary": None,  # e.g. "LLaDA-MoE-7B-A1B-Instruct (7.36B parameters, 1.44B active per token)"
    "architecture": None,  # {"parameters": ..., "layers": ...}: the "Model" table
    # LoRA adapters
    "r": None,
    "lora_alpha": None,
    "target_modules": None,
    "target_parameters": None,
    "training": None,
    "description": None,
}


def card_metadata(kind: str, base_model: str | None, *, tags=(), license: str = "apache-2.0", **extra) -> ModelCardData:
    """The YAML metadata of a card: license, library, pipeline, base model (when known; required for adapters)
    and the LLaDA-MoE tags."""
    _check_kind(kind)
    if base_model is not None and not isinstance(base_model, str) or (kind == "lora" and not base_model):
        raise ValueError("base_model must be the Hub id of the model this card derives from, e.g. "
                         "'inclusionAI/LLaDA-MoE-7B-A1B-Base'.")
    all_tags = list(dict.fromkeys([*REQUIRED_TAGS, *EXTRA_TAGS[kind], *tags]))
    relation = {"base_model_relation": "adapter"} if kind == "lora" else {}
    optional = {"base_model": base_model} if base_model else {}
    return ModelCardData(
        license=license,
        library_name=CARD_KINDS[kind][1],
        pipeline_tag="text-generation",
        tags=all_tags,
        **optional,
        **relation,
        **extra,
    )


def build_card(kind: str, *, base_model: str | None = None, tags=(), metadata: dict | None = None,
               **fields) -> ModelCard:
    """Render the `kind` template ("base", "instruct", "other" or "lora") into a `ModelCard`.

    `fields` fill the template (see DEFAULT_FIELDS: repo_id, model_name, source, dtype, sampler, mask_token_id, ...,
    and for adapters r, lora_alpha, target_modules, target_parameters, training, description); `metadata` adds YAML
    keys (e.g. {"language": ["en", "zh"]}).
    """
    unknown = set(fields) - set(DEFAULT_FIELDS)
    if unknown:
        raise ValueError(f"Unknown model card field(s) {sorted(unknown)}; known fields: {sorted(DEFAULT_FIELDS)}.")
    _check_kind(kind)
    values = {**DEFAULT_FIELDS, **fields}
    values["repo_id"] = values["repo_id"] or base_model
    if not values["repo_id"]:
        raise ValueError("A card needs repo_id (the repository it goes to) or base_model.")
    values["model_name"] = values["model_name"] or values["repo_id"].rstrip("/").split("/")[-1]
    values["source"] = values["source"] or base_model
    values["sampler"] = dict(values["sampler"] or DEFAULT_SAMPLER)
    values["model_summary"] = values["model_summary"] or RELEASE_SUMMARY
    values["architecture"] = dict(values["architecture"] or {"parameters": "7B, about 1.4B active per token",
                                                             "layers": 16, "experts": "64 per MoE layer, top-8"})
    values["kind"] = kind
    for key in ("target_modules", "target_parameters"):
        if isinstance(values[key], (list, tuple, set)):
            values[key] = ", ".join(f"`{name}`" for name in sorted(values[key])) or "none"
        elif values[key] is None:
            values[key] = "none"
    data = card_metadata(kind, base_model, tags=tags, **(metadata or {}))
    template_path = TEMPLATE_DIR / CARD_KINDS[kind][0]
    # base_model is read from the card data by from_template; the template variables are passed alongside.
    return ModelCard.from_template(data, template_path=template_path, **values)


def render_card(kind: str, **fields) -> str:
    """`build_card(kind, **fields)` as the README.md text, checked with `validate_card`."""
    text = str(build_card(kind, **fields))
    validate_card(text)
    return text


def validate_card(text: str) -> ModelCard:
    """Offline validation of a card's metadata with huggingface_hub: the YAML header must parse into a
    `ModelCardData` (strict: malformed metadata raises) and carry the fields the Hub needs for this model.

    `ModelCard.validate()` asks the Hub's /api/validate-yaml endpoint and needs the network; this check does not.
    """
    if not text.startswith("---\n"):
        raise ValueError("The model card must start with a YAML metadata block ('---' line).")
    card = ModelCard(text, ignore_metadata_errors=False)
    data = card.data.to_dict()
    problems = []
    required = [("license", None), ("library_name", None), ("pipeline_tag", "text-generation")]
    if data.get("library_name") == "peft":
        required.append(("base_model", None))  # an adapter is nothing without its base model
    for key, want in required:
        if not data.get(key):
            problems.append(f"missing `{key}`")
        elif want is not None and data[key] != want:
            problems.append(f"`{key}` is {data[key]!r}, expected {want!r}")
    missing_tags = [t for t in REQUIRED_TAGS if t not in (data.get("tags") or [])]
    if missing_tags:
        problems.append(f"missing tags {missing_tags}")
    if "2509.24389" not in card.text:
        problems.append("no citation of arXiv 2509.24389")
    if "{{" in card.text or "{%" in card.text:
        problems.append("unrendered template markup left in the text")
    if problems:
        raise ValueError("Invalid model card: " + "; ".join(problems) + ".")
    return card


def _check_kind(kind):
    if kind not in CARD_KINDS:
        raise ValueError(f"Unknown model card kind {kind!r}; choose one of {sorted(CARD_KINDS)}.")
