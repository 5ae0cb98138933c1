"""Qwen2-VL and Qwen2.5-VL: dynamic-resolution ViT (numbered vision blocks), patch merger, Qwen2 decoder with M-RoPE.

The hub checkpoints (Qwen/Qwen2-VL-2B-Instruct, Qwen/Qwen2.5-VL-3B-Instruct) store the decoder as
`model.layers.N` and the vision tower as `visual.blocks.N`; transformers >= 4.52 saves them as
`model.language_model.layers.N` and `model.visual.blocks.N`. vLLM and transformers load both, so
surgery matches both and only ever the decoder's layers. The hub config.json is flat (text fields at
the top level); transformers 5 writes them under `text_config`.
"""

from dataclasses import replace

from shortlvlm_vllm.adapters.base import ArchitectureAdapter

QWEN2_VL = ArchitectureAdapter(
    model_type="qwen2_vl",
    architectures=("Qwen2VLForConditionalGeneration",),
    layer_key_patterns=(
        r"^(model\.layers\.)(\d+)(\..+)$",  # hub layout (Qwen/Qwen2-VL-*)
        r"^(model\.language_model\.layers\.)(\d+)(\..+)$",  # transformers >= 4.52 save_pretrained
    ),
    text_config_paths=("", "text_config"),
    hub_key_renames=(
        (r"^model\.language_model\.", "model."),
        (r"^model\.visual\.", "visual."),
    ),
    layer_boundary_config_keys=("max_window_layers",),
    image_token_config_key="image_token_id",
    quantization_ignore=("re:.*lm_head", "re:.*visual.*"),
    side_path_architecture="ShortQwen2VLForConditionalGeneration",
    image_tokens="max_pixels",
)

QWEN2_5_VL = replace(QWEN2_VL, model_type="qwen2_5_vl", architectures=("Qwen2_5_VLForConditionalGeneration",),
                     side_path_architecture="ShortQwen2_5_VLForConditionalGeneration")
