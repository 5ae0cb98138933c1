"""The project's toy LLaVAs: their trainer (`toy.training`), the trained model shipped in `toy/model/` (81 tokens per
image, synthetic version 2) and the first one in `toy/model_v1/` (9 tokens per image, version 1)."""

from shortlvlm_vllm.checkpoint.hub import SHIPPED_MODELS

TOY_MODEL_DIR = SHIPPED_MODELS["toy"]
TOY_V1_MODEL_DIR = SHIPPED_MODELS["toy-v1"]
