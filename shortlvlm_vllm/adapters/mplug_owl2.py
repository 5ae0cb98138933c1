"""mPLUG-Owl2 (the original X-PLUG layout, MAGAer13/mplug-owl2-llama2-7b): ViT + visual abstractor, and a Llama-2
decoder with modality-adaptive layers (text and image copies of the layer norms and key/value projections).

The decoder is `model.layers.N` (the ViT's and the abstractor's numbered layers sit under `model.vision_model` and
`model.visual_abstractor`, never matched); config.json is flat, a LlamaConfig with `visual_config`. The key and
value projections are not single weights (`self_attn.k_proj.multiway.{0,1}.weight`), so they are no compensation
roles: SCP's `inputs` target is refused for this architecture.
"""

from shortlvlm_vllm.adapters.base import ArchitectureAdapter

MPLUG_OWL2 = ArchitectureAdapter(
    model_type="mplug_owl2",
    architectures=("MPLUGOwl2LlamaForCausalLM",),
    layer_key_patterns=(r"^(model\.layers\.)(\d+)(\..+)$",),
    text_config_paths=("",),
    hub_key_renames=(),  # the reference model keeps the original names
    decoder_layers_module="model.layers",
    layer_weights=(
        ("q_proj", "self_attn.q_proj.weight"),
        ("o_proj", "self_attn.o_proj.weight"),
        ("gate_proj", "mlp.gate_proj.weight"),
        ("up_proj", "mlp.up_proj.weight"),
        ("down_proj", "mlp.down_proj.weight"),
    ),
    quantization_ignore=("re:.*lm_head", "re:.*vision_model.*", "re:.*visual_abstractor.*"),
    decoder_module_regex=r"^model\.layers\.\d+\.",
    awq_mappings=(("up_proj", ("down_proj",)),),
    side_path_architecture="MPLUGOwl2LlamaForCausalLM",  # its one class applies them
    # transformers 4.31 (the original's pin) saved each layer's rotary frequencies; the abstractor's sin-cos tables
    saved_buffers=(".rotary_emb.inv_freq", ".q_pos_embed", ".k_pos_embed"),
)
