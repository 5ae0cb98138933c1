"""LLaVA-1.5 (llava-hf layout): CLIP vision tower, MLP projector, Llama decoder."""

from shortlvlm_vllm.adapters.base import ArchitectureAdapter

LLAVA = ArchitectureAdapter(
    model_type="llava",
    architectures=("LlavaForConditionalGeneration",),
    layer_key_patterns=(
        r"^(language_model\.model\.layers\.)(\d+)(\..+)$",  # hub layout (llava-hf)
        r"^(model\.language_model\.layers\.)(\d+)(\..+)$",  # transformers >= 4.52 save_pretrained
    ),
    text_config_paths=("text_config",),
    hub_key_renames=(
        (r"^lm_head\.", "language_model.lm_head."),
        (r"^model\.language_model\.", "language_model.model."),
        (r"^model\.vision_tower\.", "vision_tower.vision_model."),
        (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
    ),
    quantization_ignore=("re:.*lm_head", "re:.*vision_tower.*", "re:.*multi_modal_projector.*"),
    side_path_architecture="ShortLlavaForConditionalGeneration",
    image_tokens="vision_grid",
)
