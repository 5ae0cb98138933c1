"""The project's toy LLaVA: its trainer (`toy.training`) and the trained model shipped in `toy/model/`."""

from shortlvlm_vllm.checkpoint.hub import SHIPPED_MODELS

TOY_MODEL_DIR = SHIPPED_MODELS["toy"]
