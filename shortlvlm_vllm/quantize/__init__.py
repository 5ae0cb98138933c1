"""W4A16 quantization through llm-compressor (run in its own environment), and dense copies of quantized
checkpoints."""
