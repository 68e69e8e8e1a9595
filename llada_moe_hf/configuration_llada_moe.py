# Copyright 2026 The llada-moe-hf authors. Licensed under the Apache License, Version 2.0.
"""LLaDA-MoE configuration.

This file travels to the Hub as custom code: keep it flat, with single-level relative imports only.
"""

from transformers.activations import ACT2FN
from transformers.configuration_utils import PreTrainedConfig
from transformers.utils import logging


logger = logging.get_logger(__name__)

# Names the Hub release (and this package) use in `architectures`; anything else saying "llada" is the
# dense LLaDA family, which this package must not hijack.
MOE_ARCHITECTURES = ("LLaDAMoEModelLM", "LLaDAMoEForDiffusionLM", "LLaDAMoEModel")
LEGACY_MODEL_TYPE = "llada"
RELEASE_VOCAB_SIZE = 157184
RELEASE_MASK_TOKEN_ID = 156895
RELEASE_EOS_TOKEN_ID = 156892  # <|endoftext|>, also the release's pad id


def expert_parallel_plan() -> dict:
    """The expert-parallel plan in the style names of the installed transformers. 5.24 sends each expert its tokens
    ("ep_dispatch_experts", which replaced "ep_router"); 5.17 has only "ep_router" (each rank keeps the router's
    choices of its own experts) with "moe_tp_experts" (the partial outputs are summed)."""
    import importlib.util

    from transformers.distributed.tensor_parallel import ALL_PARALLEL_STYLES

    if importlib.util.find_spec("transformers.distributed.expert_parallel") is not None:
        import transformers.distributed.expert_parallel  # noqa: F401  (registers its styles)
    experts = {"layers.*.mlp.experts.gate_up_proj": "grouped_gemm", "layers.*.mlp.experts.down_proj": "grouped_gemm"}
    if "ep_dispatch_experts" in ALL_PARALLEL_STYLES:
        return {**experts, "layers.*.mlp.experts": "ep_dispatch_experts"}
    return {"layers.*.mlp.gate": "ep_router", **experts, "layers.*.mlp.experts": "moe_tp_experts"}


class LLaDAMoEConfig(PreTrainedConfig):
    r"""
    Configuration of a LLaDA-MoE masked-diffusion language model (inclusionAI, arXiv 2509.24389).

    The defaults are those of `inclusionAI/LLaDA-MoE-7B-A1B-Base` / `-Instruct`. A `config.json` of the Hub
    release (`model_type: "llada"`, legacy `rope_theta` / `partial_rotary_factor` / `rope_scaling` /
    `torch_dtype` keys) loads unchanged; it is upgraded to `model_type: "llada_moe"` in memory.

    Fields honoured exactly as the original modeling code does:
        vocab_size, hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads (GQA),
        expert_intermediate_size, dense_intermediate_size (layers with `moe_layer_freq[i] == 0`),
        shared_expert_intermediate_size (a shared SwiGLU expert added to every MoE layer when set),
        num_experts, num_experts_per_tok, moe_router_enable_expert_bias (an `expert_bias` buffer added to
        the softmax probabilities before top-k; the biased values are the routing weights), qk_layernorm
        (per-head RMSNorm of q and k before RoPE), clip_qkv, rope_theta / partial_rotary_factor /
        rope_scaling (folded into `rope_parameters`), rms_norm_eps, attention_bias, hidden_act,
        pad_token_id (the embedding's `padding_idx`), tie_word_embeddings, router_aux_loss_coef (training).

    Fields stored but IGNORED, because the original code ignores them (reproduced for identical numbers):
        norm_topk_prob: the original hard-codes no renormalisation of the top-k weights (they sum to < 1).
        routed_scaling_factor: never applied.
        router_num_group, router_topk_group: no grouped routing.
        moe_router_score_function: the router always uses a softmax (a warning is logged for other values).

    Extra fields of this package:
        mask_token_id: the `<|mask|>` id used by diffusion sampling and training. The release's config.json
            does not carry it.

    Special token ids: with the release's vocabulary (157184) the ids left unset default to the release's
    (pad = eos = 156892 `<|endoftext|>`, mask = 156895 `<|mask|>`); with any other vocabulary they default to
    None (set them from your tokenizer). Ids that are set must lie inside the vocabulary.
    """

    model_type = "llada_moe"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {"num_local_experts": "num_experts"}

    # Column sharding by heads keeps whole heads on each rank (tp_size must divide both head counts, checked at
    # model build). qk-norm has one weight of size head_dim shared by all heads, so it runs on the local heads;
    # under training its gradient covers only those heads and is summed over the ranks.
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.q_norm": "replicated_with_grad_allreduce",
        "layers.*.self_attn.k_norm": "replicated_with_grad_allreduce",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.experts.gate_up_proj": "packed_colwise",
        "layers.*.mlp.experts.down_proj": "rowwise",
        "layers.*.mlp.experts": "moe_tp_experts",
    }
    base_model_ep_plan = expert_parallel_plan()

    vocab_size: int = 157184
    hidden_size: int = 2048
    dense_intermediate_size: int | None = 8192
    expert_intermediate_size: int = 1024
    shared_expert_intermediate_size: int | None = None
    num_hidden_layers: int = 16
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 8192
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-05
    use_cache: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    mask_token_id: int | None = None
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    attention_bias: bool = False
    attention_dropout: float | int = 0.0
    clip_qkv: float | None = None
    num_experts_per_tok: int = 8
    num_experts: int = 64
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.01
    norm_topk_prob: bool | None = False
    qk_layernorm: bool = True
    moe_layer_freq: list[int] | None = None
    moe_router_enable_expert_bias: bool | None = False
    moe_router_score_function: str | None = "softmax"
    routed_scaling_factor: float | int | None = 1
    router_num_group: int | None = None
    router_topk_group: int | None = None

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.moe_layer_freq is None:
            self.moe_layer_freq = [1] * self.num_hidden_layers
        if self.vocab_size == RELEASE_VOCAB_SIZE:
            # The release's ids only mean something in the release's vocabulary (its config.json has no mask id;
            # its tokenizer's <|mask|> is 156895). A smaller vocabulary must not inherit ids it does not have.
            for field, release_id in (
                ("pad_token_id", RELEASE_EOS_TOKEN_ID),
                ("eos_token_id", RELEASE_EOS_TOKEN_ID),
                ("mask_token_id", RELEASE_MASK_TOKEN_ID),
            ):
                if getattr(self, field) is None:
                    setattr(self, field, release_id)
        kwargs.setdefault("rope_theta", 50000.0)
        super().__post_init__(**kwargs)
        self.validate_llada_moe()

    @property
    def head_dim(self) -> int:
        # The original code has no `head_dim` key: it is hidden_size // num_attention_heads unless set apart
        # (transformers' tensor-parallel tests keep the head width while they change the head count).
        return self.__dict__.get("_head_dim") or self.hidden_size // self.num_attention_heads

    @head_dim.setter
    def head_dim(self, value: int | None):
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise ValueError(f"LLaDAMoEConfig.head_dim: must be a positive integer or None, got {value!r}.")
        self.__dict__["_head_dim"] = value

    def to_dict(self):
        output = super().to_dict()
        output.pop("_head_dim", None)
        if self.__dict__.get("_head_dim") not in (None, self.hidden_size // self.num_attention_heads):
            output["head_dim"] = self.head_dim  # only a width set apart is saved: the release's config has none
        return output

    def validate_llada_moe(self, token_ids: str = "all"):
        """Raise a ValueError naming the first inconsistent field. Called at config creation (every field) and at
        model build (`token_ids="pad"`: of the special ids only the embedding's padding index matters to the model;
        eos/bos/mask are checked where they are used, e.g. by `generate`, so that a config whose vocabulary was
        shrunk before `resize_token_embeddings` still builds, as in transformers)."""

        def fail(field, message):
            raise ValueError(f"LLaDAMoEConfig.{field}: {message}")

        for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_experts"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                fail(field, f"must be a positive integer, got {value!r} (the Hub release sets every structural field).")
        if self.hidden_size % self.num_attention_heads:
            fail(
                "hidden_size",
                f"{self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}; "
                "head_dim is hidden_size // num_attention_heads.",
            )
        if self.num_key_value_heads <= 0 or self.num_attention_heads % self.num_key_value_heads:
            fail(
                "num_key_value_heads",
                f"{self.num_key_value_heads} must divide num_attention_heads={self.num_attention_heads}.",
            )
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            fail(
                "num_experts_per_tok",
                f"top-k={self.num_experts_per_tok} must be between 1 and num_experts={self.num_experts}.",
            )
        if len(self.moe_layer_freq) != self.num_hidden_layers:
            fail(
                "moe_layer_freq",
                f"has {len(self.moe_layer_freq)} entries but num_hidden_layers={self.num_hidden_layers}; "
                "give one entry per layer (0 = dense MLP, 1 = MoE).",
            )
        if any(v not in (0, 1) for v in self.moe_layer_freq):
            fail("moe_layer_freq", f"entries must be 0 (dense) or 1 (MoE), got {self.moe_layer_freq}.")
        if 0 in self.moe_layer_freq and not (self.dense_intermediate_size or 0) > 0:
            fail("dense_intermediate_size", "must be a positive integer when some moe_layer_freq entry is 0.")
        if self.expert_intermediate_size is None or self.expert_intermediate_size <= 0:
            fail("expert_intermediate_size", f"must be a positive integer, got {self.expert_intermediate_size!r}.")
        if self.shared_expert_intermediate_size is not None and self.shared_expert_intermediate_size <= 0:
            fail("shared_expert_intermediate_size", "must be a positive integer or null (no shared expert).")
        if self.hidden_act not in ACT2FN:
            fail("hidden_act", f"unknown activation {self.hidden_act!r}; choose one of transformers' ACT2FN keys.")
        rope = self.rope_parameters or {}
        factor = rope.get("partial_rotary_factor", 1.0)
        if factor is None or not 0 < factor <= 1:
            fail("partial_rotary_factor", f"must be in (0, 1], got {factor!r}.")
        rotary_dim = int(self.head_dim * factor)
        if rotary_dim % 2 or rotary_dim == 0:
            fail("partial_rotary_factor", f"gives a rotary dimension of {rotary_dim}; it must be even and > 0.")
        if self.clip_qkv is not None and self.clip_qkv <= 0:
            fail("clip_qkv", f"must be positive or null, got {self.clip_qkv!r}.")
        fields = ("pad_token_id",) if token_ids == "pad" else ("pad_token_id", "bos_token_id", "eos_token_id", "mask_token_id")
        for field in fields:
            value = getattr(self, field, None)
            ids = value if isinstance(value, (list, tuple)) else [value]
            for token_id in ids:
                if token_id is not None and not 0 <= int(token_id) < self.vocab_size:
                    fail(
                        field,
                        f"id {token_id} is outside the vocabulary [0, {self.vocab_size}). Pass the id your "
                        f"tokenizer uses (e.g. tokenizer.{field}), or None.",
                    )
        self.validate_tensor_parallel_heads()
        if self.moe_router_score_function not in (None, "softmax"):
            logger.warning_once(
                f"moe_router_score_function={self.moe_router_score_function!r} is ignored: the original LLaDA-MoE "
                "code always routes with a softmax, and so does this package."
            )

    def validate_tensor_parallel_heads(self):
        """Under `DistributedConfig(tp_size=N)` the default plan shards q/k/v by heads: a tp_size that does not
        divide the head counts would cut heads in two and give wrong attention without any error."""
        distributed = getattr(self, "distributed_config", None)
        tp_size = getattr(distributed, "tp_size", None) or 1
        if tp_size <= 1 or distributed.tp_plan == {}:  # an empty plan shards nothing
            return
        if getattr(distributed, "enable_expert_parallel", False) and not hasattr(distributed, "ep_size"):
            return  # transformers < 5.19: the expert plan replaces the tensor plan, attention is not sharded
        override = distributed.tp_plan if isinstance(distributed.tp_plan, dict) else {}
        projections = [f"layers.*.self_attn.{name}_proj" for name in "qkv"]
        plan = self.base_model_tp_plan
        styles = {override.get(f"model.{key}", override.get(key, plan.get(key))) for key in projections}
        if "colwise" not in styles:
            return
        if self.num_attention_heads % tp_size or self.num_key_value_heads % tp_size:
            raise ValueError(
                f"LLaDAMoEConfig: tp_size={tp_size} does not divide num_attention_heads={self.num_attention_heads} "
                f"and num_key_value_heads={self.num_key_value_heads}; tensor parallelism gives each rank whole "
                "attention heads. Use a tp_size that divides both, or pass DistributedConfig(tp_plan=...) with "
                "'colwise_gather_output' for 'model.layers.*.self_attn.{q,k,v}_proj' and 'rowwise_split_input' for "
                "'model.layers.*.self_attn.o_proj' (slower: every rank then runs attention for all heads)."
            )

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        return upgrade_legacy_config_dict(config_dict), kwargs


def upgrade_legacy_config_dict(config_dict: dict) -> dict:
    """Turn the Hub release's config.json (model_type "llada") into this package's; refuse dense LLaDA."""
    if config_dict.get("model_type") != LEGACY_MODEL_TYPE:
        return config_dict
    architectures = config_dict.get("architectures") or []
    if not any(a in MOE_ARCHITECTURES for a in architectures) or not config_dict.get("num_experts"):
        raise ValueError(
            f"This checkpoint says model_type 'llada' with architectures {architectures} and no `num_experts`: it "
            "is a dense LLaDA model, not LLaDA-MoE. llada-moe-hf only loads LLaDA-MoE checkpoints; load dense "
            "LLaDA with its own code (AutoModel.from_pretrained(..., trust_remote_code=True))."
        )
    config_dict = dict(config_dict)
    config_dict["model_type"] = LLaDAMoEConfig.model_type
    # The release's auto_map points at files that are not shipped with this package; saving writes ours.
    config_dict.pop("auto_map", None)
    return config_dict


__all__ = ["LLaDAMoEConfig"]
