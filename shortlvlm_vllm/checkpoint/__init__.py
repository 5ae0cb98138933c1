"""Checkpoints on disk: resolving a model argument, reading headers, streaming safetensors, the one writer,
layer surgery, quantization-config rewriting, the `short_lvlm` record and its model card."""
