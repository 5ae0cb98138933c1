"""Qwen-VL / Qwen-VL-Chat (the original remote-code layout, Qwen/Qwen-VL-Chat): ViT + resampler, and a Qwen-7B decoder.

The decoder is `transformer.h.N` (the ViT's numbered blocks sit under `transformer.visual.transformer.resblocks`,
never matched); config.json is flat, with the vision settings in `visual`. The query, key and value projections are
one fused weight (`attn.c_attn`), so they are no compensation roles: SCP's `inputs` target is refused for this
architecture. The MLP computes c_proj(w1(x) * silu(w2(x))): w2 is the gate, w1 the up projection.
"""

from shortlvlm_vllm.adapters.base import ArchitectureAdapter

QWEN = ArchitectureAdapter(
    model_type="qwen",
    architectures=("QWenLMHeadModel",),
    layer_key_patterns=(r"^(transformer\.h\.)(\d+)(\..+)$",),
    text_config_paths=("",),
    hub_key_renames=(),  # the reference model keeps the original names
    decoder_layers_module="transformer.h",
    image_token_config_key="image_pad_id",
    layer_weights=(
        ("o_proj", "attn.c_proj.weight"),
        ("gate_proj", "mlp.w2.weight"),
        ("up_proj", "mlp.w1.weight"),
        ("down_proj", "mlp.c_proj.weight"),
    ),
    layer_norms=(
        ("input_layernorm", "ln_1.weight"),
        ("post_attention_layernorm", "ln_2.weight"),
    ),
    quantization_ignore=("re:.*lm_head", "re:.*visual.*"),
    decoder_module_regex=r"^transformer\.h\.\d+\.",
    awq_mappings=(("ln_1", ("attn.c_attn",)), ("ln_2", ("mlp.w1", "mlp.w2")), ("mlp.w1", ("mlp.c_proj",))),
    side_path_architecture="QWenLMHeadModel",  # its one class applies them, at mlp.c_proj
)
