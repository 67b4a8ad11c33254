"""The logical axes of every parameter: what its shape is made of, for loading and for sharding
(mesh.RULES maps them onto the device mesh). No JAX here: the driver checks checkpoints with it."""

# Logical axes of every parameter any family has (a layer's weights are stacked behind "layers").
GLOBAL_AXES = {"embed": ("vocab", "embed"), "pos_embed": ("positions", "embed"), "final_norm": ("embed",),
               "final_norm_b": ("embed",)}
LAYER_AXES = {
    "attn_norm": ("embed",), "attn_norm_b": ("embed",),
    "q_w": ("embed", "heads"), "q_b": ("heads",),
    "k_w": ("embed", "kv"), "k_b": ("kv",),
    "v_w": ("embed", "kv"), "v_b": ("kv",),
    "q_norm": ("head_dim",), "k_norm": ("head_dim",),
    "o_w": ("heads", "embed"), "o_b": ("embed",),
    "attn_post_norm": ("embed",),
    "mlp_norm": ("embed",), "mlp_norm_b": ("embed",),
    "gate_w": ("embed", "mlp"), "gate_b": ("mlp",),
    "up_w": ("embed", "mlp"), "up_b": ("mlp",),
    "down_w": ("mlp", "embed"), "down_b": ("embed",),
    "mlp_post_norm": ("embed",),
}
