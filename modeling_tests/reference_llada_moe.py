"""An independent, deliberately plain re-implementation of the original LLaDA-MoE forward pass, written from
shared/reference/llada_moe_facts.md section 5 (not from this package's modeling code). It works on a state
dict in the release's per-expert layout and evaluates every expert densely for every token, so it shares no
routing/grouping logic with the package. Used to check the config branches the fixture does not cover."""

import math

import torch
import torch.nn.functional as F


def rms_norm(x, weight, eps):
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def swiglu(x, gate_w, up_w, down_w):
    return (F.silu(x @ gate_w.T) * (x @ up_w.T)) @ down_w.T


def rope_tables(cfg, positions, dtype):
    rope = cfg.rope_parameters
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    rot = int(head_dim * rope.get("partial_rotary_factor", 1.0))
    inv_freq = 1.0 / (rope["rope_theta"] ** (torch.arange(0, rot, 2).float() / rot))
    if rope.get("rope_type", "default") == "linear":
        inv_freq = inv_freq / rope["factor"]
    angles = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype), rot


def apply_rope(x, cos, sin, rot):
    # x: [heads, seq, head_dim]
    xr, xp = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated = torch.cat([-xr[..., half:], xr[..., :half]], dim=-1)
    return torch.cat([xr * cos + rotated * sin, xp], dim=-1)


def reference_logits(cfg, sd, input_ids, attention_mask=None):
    """input_ids [B, S]; returns logits [B, S, V]. Batch rows are processed one by one."""
    outs = []
    for b in range(input_ids.shape[0]):
        keep = None if attention_mask is None else attention_mask[b].bool()
        outs.append(_one_sequence(cfg, sd, input_ids[b], keep))
    return torch.stack(outs)


def _one_sequence(cfg, sd, ids, key_keep):
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = cfg.hidden_size // heads
    eps = cfg.rms_norm_eps
    seq = ids.shape[0]
    h = sd["model.embed_tokens.weight"][ids]
    cos, sin, rot = rope_tables(cfg, torch.arange(seq), h.dtype)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        x = rms_norm(h, sd[p + "input_layernorm.weight"], eps)

        def proj(name):
            w = sd[p + f"self_attn.{name}.weight"]
            y = x @ w.T
            if cfg.attention_bias:
                y = y + sd[p + f"self_attn.{name}.bias"]
            return y

        q, k, v = proj("q_proj"), proj("k_proj"), proj("v_proj")
        q = q.view(seq, heads, head_dim)
        k = k.view(seq, kv_heads, head_dim)
        v = v.view(seq, kv_heads, head_dim)
        if cfg.qk_layernorm:
            q = rms_norm(q, sd[p + "self_attn.q_norm.weight"], eps)
            k = rms_norm(k, sd[p + "self_attn.k_norm.weight"], eps)
        if cfg.clip_qkv is not None:
            q, k, v = (t.clamp(-cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        q, k = apply_rope(q, cos, sin, rot), apply_rope(k, cos, sin, rot)
        group = heads // kv_heads
        k = k.repeat_interleave(group, dim=0)
        v = v.repeat_interleave(group, dim=0)
        scores = q @ k.transpose(1, 2) / math.sqrt(head_dim)  # bidirectional: no causal mask
        if key_keep is not None:
            scores = scores.masked_fill(~key_keep[None, None, :], float("-inf"))
        attn = torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v
        o = attn.transpose(0, 1).reshape(seq, heads * head_dim) @ sd[p + "self_attn.o_proj.weight"].T
        if cfg.attention_bias:
            o = o + sd[p + "self_attn.o_proj.bias"]
        h = h + o

        x = rms_norm(h, sd[p + "post_attention_layernorm.weight"], eps)
        if cfg.moe_layer_freq[i] == 0:
            m = swiglu(x, sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"], sd[p + "mlp.down_proj.weight"])
        else:
            probs = torch.softmax((x @ sd[p + "mlp.gate.weight"].T).float(), dim=-1)
            if cfg.moe_router_enable_expert_bias:
                probs = probs + sd[p + "mlp.expert_bias"]
            top_w, top_i = probs.topk(cfg.num_experts_per_tok, dim=-1)  # no renormalisation, no scaling
            m = torch.zeros_like(x)
            for e in range(cfg.num_experts):
                pe = p + f"mlp.experts.{e}."
                y = swiglu(x, sd[pe + "gate_proj.weight"], sd[pe + "up_proj.weight"], sd[pe + "down_proj.weight"])
                weight = (top_w * (top_i == e)).sum(-1, keepdim=True).to(x.dtype)
                m = m + y * weight
            if cfg.shared_expert_intermediate_size is not None:
                m = m + swiglu(
                    x,
                    sd[p + "shared_expert.gate_proj.weight"],
                    sd[p + "shared_expert.up_proj.weight"],
                    sd[p + "shared_expert.down_proj.weight"],
                )
        h = h + m
    h = rms_norm(h, sd["model.norm.weight"], eps)
    return h @ sd["lm_head.weight"].T


def per_expert_state_dict(model):
    """The package model's weights in the release's per-expert layout (for the reference)."""
    sd = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            inter = tensor.shape[1] // 2
            for e in range(tensor.shape[0]):
                sd[f"{prefix}{e}.gate_proj.weight"] = tensor[e, :inter]
                sd[f"{prefix}{e}.up_proj.weight"] = tensor[e, inter:]
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for e in range(tensor.shape[0]):
                sd[f"{prefix}{e}.down_proj.weight"] = tensor[e]
        else:
            sd[name] = tensor
    return sd
