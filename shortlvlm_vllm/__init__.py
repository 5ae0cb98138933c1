"""Short-LVLM: training-free layer pruning of vision-language models, served with vLLM."""

__version__ = "0.1.0"
