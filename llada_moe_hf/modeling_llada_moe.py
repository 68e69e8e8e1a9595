# Copyright 2026 The llada-moe-hf authors. Licensed under the Apache License, Version 2.0.
"""LLaDA-MoE: a masked-diffusion language model with a sparse Mixture-of-Experts body (arXiv 2509.24389).

Numerics follow the original Hub modeling code exactly (see the config docstring for the fields it ignores);
the layout follows transformers 5.x MoE models (fused 3-D expert parameters, a router module, the attention
and experts interfaces). This file travels to the Hub as custom code: keep it flat, single-level relative
imports only, optional dependencies behind guards.
"""

import inspect
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter
from transformers.integrations import use_experts_implementation
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple, logging
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_llada_moe import LLaDAMoEConfig
from .cpu_moe_llada_moe import AUTO_NAME, linear  # importing registers "cpu_moe" and "auto"
from .fused_moe_llada_moe import register_fused_moe_experts  # noqa: F401  (importing registers "fused_moe")
from .generation_llada_moe import DiffusionGenerationConfig, DiffusionGenerationMixin
from .training_llada_moe import masked_diffusion_loss, router_load_balancing_loss


logger = logging.get_logger(__name__)

# The text-generation pipeline file that `save_pretrained` copies beside this one (transformers' custom pipelines).
PIPELINE_FILE = "pipeline_llada_moe.py"


def pipeline_config() -> dict:
    """config.json's `custom_pipelines`: `pipeline("text-generation", model=repo, trust_remote_code=True)` runs the
    diffusion `generate()` through `pipeline_llada_moe.LLaDAMoETextGenerationPipeline`."""
    return {
        "text-generation": {
            "impl": f"{PIPELINE_FILE[:-3]}.LLaDAMoETextGenerationPipeline",
            "pt": ["AutoModel"],
            "tf": [],
            "type": "text",
        }
    }


class LLaDAMoERMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        # The original casts back to the input dtype *before* the weight multiplies.
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self):
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class LLaDAMoERotaryEmbedding(nn.Module):
    inv_freq: torch.Tensor

    def __init__(self, config: LLaDAMoEConfig, device=None):
        super().__init__()
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.config = config
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        rope_init_fn: Callable = self.compute_default_rope_parameters
        if self.rope_type != "default":
            rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = rope_init_fn(config, device)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.original_inv_freq = inv_freq

    @staticmethod
    def compute_default_rope_parameters(config: LLaDAMoEConfig, device=None, **kwargs) -> tuple[torch.Tensor, float]:
        """Plain RoPE over the first `head_dim * partial_rotary_factor` dims of each head, in float32."""
        base = config.rope_parameters["rope_theta"]
        factor = config.rope_parameters.get("partial_rotary_factor", 1.0)
        dim = int(config.head_dim * factor)
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x, position_ids):
        inv_freq = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1).to(x.device)
        position_ids = position_ids[:, None, :].float()
        device_type = x.device.type if isinstance(x.device.type, str) and x.device.type != "mps" else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):
            freqs = (inv_freq.float() @ position_ids.float()).transpose(1, 2)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos = emb.cos() * self.attention_scaling
            sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    """Rotate-half RoPE on the first `cos.shape[-1]` dims; the rest of each head passes through (partial RoPE)."""
    rotary_dim = cos.shape[-1]
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    if rotary_dim == q.shape[-1]:  # full rotary (the released config): no split and concatenation copies
        return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)
    q_rot, q_pass = q[..., :rotary_dim], q[..., rotary_dim:]
    k_rot, k_pass = k[..., :rotary_dim], k[..., rotary_dim:]
    q_embed = torch.cat(((q_rot * cos) + (rotate_half(q_rot) * sin), q_pass), dim=-1)
    k_embed = torch.cat(((k_rot * cos) + (rotate_half(k_rot) * sin), k_pass), dim=-1)
    return q_embed, k_embed


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Unpack[TransformersKwargs],
):
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states)
    attn_output = attn_output.transpose(1, 2).contiguous()
    return attn_output, attn_weights


class LLaDAMoEAttention(nn.Module):
    """Bidirectional multi-head attention with per-head qk RMSNorm (before RoPE), GQA, partial RoPE and clip_qkv."""

    def __init__(self, config: LLaDAMoEConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        # A diffusion LM never attends causally; SDPA and flash read this attribute (default would be True).
        self.is_causal = False

        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.attention_bias)
        if config.qk_layernorm:
            # One weight of size head_dim shared by all heads, as in the original.
            self.q_norm = LLaDAMoERMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = LLaDAMoERMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)

        experts = self.config._experts_implementation  # `auto` on the CPU: few rows run the CPU kernel (linear)
        query_states = linear(self.q_proj, hidden_states, experts).view(hidden_shape)
        key_states = linear(self.k_proj, hidden_states, experts).view(hidden_shape)
        value_states = linear(self.v_proj, hidden_states, experts).view(hidden_shape)
        if self.config.qk_layernorm:
            query_states = self.q_norm(query_states)
            key_states = self.k_norm(key_states)
        if self.config.clip_qkv is not None:
            query_states = query_states.clamp(min=-self.config.clip_qkv, max=self.config.clip_qkv)
            key_states = key_states.clamp(min=-self.config.clip_qkv, max=self.config.clip_qkv)
            value_states = value_states.clamp(min=-self.config.clip_qkv, max=self.config.clip_qkv)

        query_states = query_states.transpose(1, 2)
        key_states = key_states.transpose(1, 2)
        value_states = value_states.transpose(1, 2)
        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)

        if cache is not None:
            # Diffusion decoding caches (cache_llada_moe.py) return the full key/value sequence.
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            is_causal=False,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        attn_output = linear(self.o_proj, attn_output, experts)
        return attn_output, attn_weights


class LLaDAMoEMLP(nn.Module):
    """SwiGLU MLP, used for dense layers and for the shared expert."""

    def __init__(self, config: LLaDAMoEConfig, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


@use_experts_implementation
class LLaDAMoEExperts(nn.Module):
    """All experts of a layer as two 3-D parameters: gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I].

    `forward` here is the eager implementation; `config._experts_implementation` selects another one: "auto"
    (the default: "cpu_moe" for a CPU forward, "grouped_mm" elsewhere), "cpu_moe", "grouped_mm", or "fused_moe"
    on CUDA. Implementations must read the weights through these attributes on every call: PEFT's LoRA on
    experts reparametrises them.
    """

    def __init__(self, config: LLaDAMoEConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.expert_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * self.intermediate_dim, self.hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        final_hidden_states = torch.zeros_like(hidden_states)
        with torch.no_grad():
            expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert_idx in expert_hit:
            expert_idx = expert_idx[0]
            if expert_idx == self.num_experts:  # expert-parallel sentinel
                continue
            top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
            current_state = hidden_states[token_idx]
            gate, up = F.linear(current_state, self.gate_up_proj[expert_idx]).chunk(2, dim=-1)
            current_hidden_states = F.linear(self.act_fn(gate) * up, self.down_proj[expert_idx])
            current_hidden_states = current_hidden_states * top_k_weights[token_idx, top_k_pos, None]
            final_hidden_states.index_add_(0, token_idx, current_hidden_states.to(final_hidden_states.dtype))
        return final_hidden_states


class LLaDAMoETopKRouter(nn.Module):
    """Softmax router exactly as the original: logits in the model dtype, softmax in float32, optional expert
    bias added to the probabilities before top-k (the biased values are the weights), no renormalisation, no
    routed scaling."""

    def __init__(self, config: LLaDAMoEConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.num_experts
        self.hidden_dim = config.hidden_size
        self.weight = nn.Parameter(torch.zeros(self.num_experts, self.hidden_dim))

    def forward(self, hidden_states: torch.Tensor, expert_bias: torch.Tensor | None = None):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        router_logits = F.linear(hidden_states, self.weight)
        routing_weights = F.softmax(router_logits, dim=-1, dtype=torch.float32)
        if expert_bias is not None:
            routing_weights = routing_weights + expert_bias
        top_k_weights, top_k_index = torch.topk(routing_weights, self.top_k, dim=-1)
        return router_logits, top_k_weights.to(hidden_states.dtype), top_k_index


class LLaDAMoESparseMoeBlock(nn.Module):
    def __init__(self, config: LLaDAMoEConfig):
        super().__init__()
        self.gate = LLaDAMoETopKRouter(config)
        self.experts = LLaDAMoEExperts(config)
        if config.moe_router_enable_expert_bias:
            # Persistent buffer, key `mlp.expert_bias` as in the original checkpoint layout.
            self.register_buffer("expert_bias", torch.zeros(config.num_experts))
        else:
            self.expert_bias = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        hidden_states = hidden_states.view(-1, hidden_dim)
        _, top_k_weights, top_k_index = self.gate(hidden_states, self.expert_bias)
        final_hidden_states = self.experts(hidden_states, top_k_index, top_k_weights)
        return final_hidden_states.reshape(batch_size, sequence_length, hidden_dim)


class LLaDAMoEDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: LLaDAMoEConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.is_moe = config.moe_layer_freq[layer_idx] != 0
        self.self_attn = LLaDAMoEAttention(config=config, layer_idx=layer_idx)
        self.mlp = LLaDAMoESparseMoeBlock(config) if self.is_moe else LLaDAMoEMLP(config, config.dense_intermediate_size)
        if self.is_moe and config.shared_expert_intermediate_size is not None:
            # Lives on the layer (key `layers.i.shared_expert.*`), added to the routed output.
            self.shared_expert = LLaDAMoEMLP(config, config.shared_expert_intermediate_size)
        else:
            self.shared_expert = None
        self.input_layernorm = LLaDAMoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LLaDAMoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + hidden_states

        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        mlp_output = self.mlp(hidden_states)
        if self.shared_expert is not None:
            mlp_output = mlp_output + self.shared_expert(hidden_states)
        return residual + mlp_output


class LLaDAMoEPreTrainedModel(PreTrainedModel):
    config_class = LLaDAMoEConfig
    config: LLaDAMoEConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LLaDAMoEDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_record_outputs = {
        "router_logits": OutputRecorder(LLaDAMoETopKRouter, index=0),
        "hidden_states": LLaDAMoEDecoderLayer,
        "attentions": LLaDAMoEAttention,
    }
    # Some exports persist the RoPE table; it is always recomputed.
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]

    def __init__(self, config: LLaDAMoEConfig, *args, **kwargs):
        config.validate_llada_moe(token_ids="pad")
        super().__init__(config, *args, **kwargs)

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        # Unset, the experts run "auto" (cpu_moe_llada_moe.py): the CPU path where it runs a CPU forward,
        # grouped_mm for training, under torch.compile and on other devices.
        return super().get_correct_experts_implementation(AUTO_NAME if requested_experts is None else requested_experts)

    @property
    def is_gradient_checkpointing(self) -> bool:
        # PEFT reads this name, which transformers 5.24 deprecates (with a FutureWarning on every LoRA wrap) in
        # favour of `is_activation_checkpointing`, a name 5.17 does not have.
        return any(getattr(m, "gradient_checkpointing", False) for m in self.modules())

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, LLaDAMoEExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, LLaDAMoETopKRouter):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, LLaDAMoESparseMoeBlock) and module.expert_bias is not None:
            init.zeros_(module.expert_bias)

    @classmethod
    def from_pretrained(cls, *args, strict: bool = True, **kwargs):
        """`PreTrainedModel.from_pretrained`, but strict by default: a checkpoint missing any weight is refused
        instead of being completed with random values, and one carrying weights the config does not use (e.g.
        shared-expert tensors with `shared_expert_intermediate_size: null`) is refused instead of being silently
        ignored. `strict=False` loads such a checkpoint as plain transformers does (missing weights randomly
        initialised, unused ones dropped) and logs a warning listing them."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        problems = loading_problems(info, cls.__name__)
        if problems and strict:
            raise ValueError(
                f"{problems} Check that the checkpoint is complete (all shards present) and that its config matches "
                "it (num_hidden_layers, num_experts, moe_layer_freq, shared_expert_intermediate_size, "
                "moe_router_enable_expert_bias, qk_layernorm, attention_bias, tie_word_embeddings). To load it "
                "anyway, with missing weights randomly initialised and unused ones dropped, pass strict=False."
            )
        if problems:
            logger.warning(f"strict=False: {problems} Loaded anyway: its outputs are not the checkpoint's.")
        return (model, info) if want_info else model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Write a repo that works as Hub custom code: our .py files beside the weights and an auto_map for
        AutoConfig, AutoModel and AutoModelForMaskedLM, plus the text-generation pipeline
        (`pipeline_llada_moe.py`, named in `custom_pipelines`). Experts are saved per expert (the release's names)
        unless `save_original_format=False`."""
        lm_class = "LLaDAMoEForDiffusionLM"
        module = type(self).__module__.rsplit(".", 1)[-1]
        self.config.auto_map = {
            "AutoConfig": f"{type(self.config).__module__.rsplit('.', 1)[-1]}.{type(self.config).__name__}",
            "AutoModel": f"{module}.{lm_class}",
            "AutoModelForMaskedLM": f"{module}.{lm_class}",
        }
        if type(self)._auto_class is None:
            type(self).register_for_auto_class("AutoModel")
        if type(self.config)._auto_class is None:
            type(self.config).register_for_auto_class("AutoConfig")
        pipeline_file = Path(__file__).with_name(PIPELINE_FILE)
        if pipeline_file.is_file():  # a Hub copy of this file saved before the pipeline existed has none
            self.config.custom_pipelines = pipeline_config()
        # transformers reverts only the conversions used at load time: a model loaded from fused (or dInfer-named)
        # weights would be saved that way. Reverting the registered mapping always gives the release's names.
        loaded_conversions = getattr(self, "_weight_conversions", None)
        self._weight_conversions = None
        try:
            result = super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            self._weight_conversions = loaded_conversions
        if pipeline_file.is_file() and kwargs.get("is_main_process", True):
            shutil.copyfile(pipeline_file, Path(save_directory) / PIPELINE_FILE)
        return result


def loading_problems(info: dict, class_name: str) -> str:
    """What strict loading refuses, as one sentence per kind ('' when the checkpoint matches the model)."""
    sentences = []
    for kind, verb, action in (
        ("missing_keys", "is missing", "Refusing to fill them with random values."),
        ("unexpected_keys", "has unused", "Refusing to ignore them."),
    ):
        keys = sorted(info.get(kind) or [])
        if keys:
            shown = ", ".join(keys[:20]) + (f", ... ({len(keys)} in all)" if len(keys) > 20 else "")
            sentences.append(f"The checkpoint {verb} {len(keys)} weight(s) for {class_name}: {shown}. {action}")
    return " ".join(sentences)


class LLaDAMoEModel(LLaDAMoEPreTrainedModel):
    def __init__(self, config: LLaDAMoEConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        # padding_idx as in the original: the pad (= eos) row gets no gradient when fine-tuning.
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [LLaDAMoEDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = LLaDAMoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LLaDAMoERotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoeModelOutputWithPast:
        r"""
        attention_mask (`torch.Tensor` of shape `(batch_size, kv_length)`, *optional*):
            1 for real tokens, 0 for padding. Attention is bidirectional; padding keys are masked out (the
            original Hub code ignored this mask). `kv_length` may exceed the query length when a diffusion
            decoding cache supplies the other keys.
        cache (*optional*):
            A cache whose `update(key, value, layer_idx)` returns the full key/value states; used by the
            prefix/dual-cache diffusion decoders (`BlockKVCache`). Pass `position_ids` with it. `past_key_values`
            is accepted as its older name (transformers < 5.24).
        """
        cache = _resolve_cache_argument(cache, past_key_values)
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            check_input_ids(input_ids, self.config.vocab_size)
            inputs_embeds = self.embed_tokens(input_ids)

        q_length = inputs_embeds.shape[1]
        if position_ids is None:
            past_seen = cache.get_seq_length() if isinstance(cache, Cache) else 0
            position_ids = torch.arange(q_length, device=inputs_embeds.device).unsqueeze(0) + past_seen

        mask = self._bidirectional_mask(inputs_embeds, attention_mask, cache)
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=mask,
                position_ids=position_ids,
                cache=cache,
                position_embeddings=position_embeddings,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        return MoeModelOutputWithPast(last_hidden_state=hidden_states, **{_OUTPUT_CACHE_FIELD: cache})

    def _bidirectional_mask(self, inputs_embeds, attention_mask, cache):
        if attention_mask is None or attention_mask.dim() == 4:
            return attention_mask
        if isinstance(cache, Cache):
            return create_bidirectional_mask(self.config, inputs_embeds, attention_mask, **{_MASK_CACHE_ARGUMENT: cache})
        kv_length = attention_mask.shape[-1]
        if kv_length == inputs_embeds.shape[1]:
            return create_bidirectional_mask(self.config, inputs_embeds, attention_mask)
        # Queries are a slice of a longer cached sequence: only the key length and batch size matter here.
        kv_shape = inputs_embeds[:, :1].expand(-1, kv_length, -1)
        return create_bidirectional_mask(self.config, inputs_embeds, attention_mask, encoder_hidden_states=kv_shape)


# transformers 5.24 renamed the cache argument and output field `past_key_values` to `cache` (the old name warns);
# 5.17 knows only `past_key_values`. Use whichever this version has.
_OUTPUT_CACHE_FIELD = "cache" if "cache" in MoeModelOutputWithPast.__dataclass_fields__ else "past_key_values"
_MASK_CACHE_ARGUMENT = (
    "cache" if "cache" in inspect.signature(create_bidirectional_mask).parameters else "past_key_values"
)


def _resolve_cache_argument(cache, past_key_values):
    if past_key_values is not None and cache is not None:
        raise ValueError("Pass the diffusion cache as `cache` or as `past_key_values`, not both.")
    return cache if cache is not None else past_key_values


def check_input_ids(input_ids: torch.Tensor, vocab_size: int):
    """Out-of-range ids give an unreadable device assert on CUDA; say what is wrong instead (skipped while
    compiling or capturing a CUDA graph, where a host sync is not allowed)."""
    if input_ids.numel() == 0 or torch.compiler.is_compiling():
        return
    if input_ids.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(
            f"input_ids contains id {bad}, outside the vocabulary [0, {vocab_size}). Check that the tokenizer "
            "matches the model and that padding uses a valid id (the pad/eos id)."
        )


class LLaDAMoEForDiffusionLM(LLaDAMoEPreTrainedModel, DiffusionGenerationMixin):
    """LLaDA-MoE body + `lm_head`. `forward` returns `.logits` for every position (no shift: a masked-diffusion
    model predicts each position's own token); with `labels` it returns the masked-diffusion loss."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}
    generation_config_class = DiffusionGenerationConfig
    # The loss is already a per-batch mean (normalised per sequence), not a sum over `num_items_in_batch`
    # tokens: Trainer must scale it for gradient accumulation itself.
    accepts_loss_kwargs = False

    def __init__(self, config: LLaDAMoEConfig):
        super().__init__(config)
        self.model = LLaDAMoEModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        p_mask: torch.Tensor | None = None,
        loss_normalizer: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoeCausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Clean tokens at the masked positions and -100 elsewhere (what `LLaDAMoEDataCollator` produces).
            The loss is the masked-diffusion objective: cross-entropy on masked positions weighted by `1 / p_mask`.
        p_mask (`torch.Tensor` of shape `(batch_size, sequence_length)` or `(batch_size,)`, *optional*):
            The masking probability t each position was noised with. Without it, `labels` give the plain masked-LM
            loss (mean cross-entropy over the labelled positions), as transformers' masked-LM heads do.
        loss_normalizer (`torch.Tensor` of shape `(batch_size,)`, *optional*):
            Per-sequence token count the weighted loss is divided by (the answer length in SFT); defaults to
            the sequence length.
        """
        output_router_logits = (
            output_router_logits if output_router_logits is not None else self.config.output_router_logits
        )
        outputs: MoeModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=_resolve_cache_argument(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            return_dict=True,  # the body's output is read by name here, whatever config.return_dict says
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = linear(self.lm_head, hidden_states[:, slice_indices, :], self.config._experts_implementation)

        loss = aux_loss = None
        if labels is not None:
            loss = masked_diffusion_loss(logits, labels, p_mask, loss_normalizer)
        if output_router_logits and outputs.router_logits:
            aux_loss = router_load_balancing_loss(
                outputs.router_logits, self.config.num_experts, self.config.num_experts_per_tok, attention_mask
            )
            if loss is not None:
                loss = loss + self.config.router_aux_loss_coef * aux_loss.to(loss.device)
        return MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            **{_OUTPUT_CACHE_FIELD: getattr(outputs, _OUTPUT_CACHE_FIELD)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
        )


# The name the Hub release's `architectures` uses.
LLaDAMoEModelLM = LLaDAMoEForDiffusionLM


def _per_expert_conversions():
    """Release layout (experts.{e}.gate_proj/up_proj/down_proj) <-> fused 3-D parameters, on load and save."""
    return [
        WeightConverter(
            source_patterns=["mlp.experts.*.gate_proj.weight", "mlp.experts.*.up_proj.weight"],
            target_patterns="mlp.experts.gate_up_proj",
            operations=[MergeModulelist(dim=0), Concatenate(dim=1)],
        ),
        WeightConverter(
            source_patterns="mlp.experts.*.down_proj.weight",
            target_patterns="mlp.experts.down_proj",
            operations=[MergeModulelist(dim=0)],
        ),
    ]


# Registered by class name and by our own model_type ("llada" is shared with dense LLaDA). overwrite=True:
# the package and a Hub copy of this file can both be imported in one process.
for _key in ("LLaDAMoEForDiffusionLM", "LLaDAMoEModel", LLaDAMoEConfig.model_type):
    register_checkpoint_conversion_mapping(_key, _per_expert_conversions(), overwrite=True)


__all__ = [
    "LLaDAMoEForDiffusionLM",
    "LLaDAMoEModel",
    "LLaDAMoEModelLM",
    "LLaDAMoEPreTrainedModel",
]
