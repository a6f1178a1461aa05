"""Model shapes from the published configs (per layer; a rank holds heads / TP of them)."""

from __future__ import annotations

import json

# GLM-5 (glm_moe_dsa): 78 layers, 64 attention heads (8 per rank at TP8, 64 with DP attention),
# kv_lora_rank 512, qk_rope 64, index_topk 2048. The post-attention v-bmm and o_proj only need
# consistent shapes: v_head_dim 128 (DeepSeek-V3.2's).
GLM5 = dict(layers=78, heads=64, kv_lora_rank=512, rope_dim=64, topk=2048, v_head_dim=128)
# Kimi-K2: 61 layers, 64 heads, kv_lora_rank 512, qk_rope 64, v_head_dim 128, hidden 7168.
KIMI_K2 = dict(layers=61, heads=64, kv_lora_rank=512, rope_dim=64, v_head_dim=128, hidden=7168)

_CONFIG_KEYS = (("layers", "num_hidden_layers"), ("heads", "num_attention_heads"), ("kv_lora_rank", "kv_lora_rank"),
                ("rope_dim", "qk_rope_head_dim"), ("topk", "index_topk"), ("v_head_dim", "v_head_dim"),
                ("hidden", "hidden_size"))


def model_shapes(defaults: dict, config_path: str | None = None) -> dict:
    """``defaults`` overridden by a model's ``config.json`` where it names the same quantities."""
    shapes = dict(defaults)
    if config_path:
        with open(config_path) as fh:
            cfg = json.load(fh)
        for key, name in _CONFIG_KEYS:
            if name in cfg:
                shapes[key] = cfg[name]
    return shapes
