"""Resolving a model argument: a local directory, a model shipped with the package ("toy", "toy-v1"), or a Hugging Face
Hub id (the real loading path)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from shortlvlm_vllm.errors import ShortLVLMError

log = logging.getLogger(__name__)

# What a pruning run needs from a hub repository: weights, configs, tokenizer, templates.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py"]
# Models shipped inside the package, by the name commands accept for them (a local directory of that name wins).
# "toy" sees 81 mostly redundant tokens per image (synthetic version 2), "toy-v1" 9 (version 1).
SHIPPED_MODELS = {name: Path(__file__).resolve().parents[1] / "toy" / folder
                  for name, folder in (("toy", "model"), ("toy-v1", "model_v1"))}


def is_hub_id(text: str) -> bool:
    """"owner/name" as the hub spells repositories; anything else is a local path."""
    return text.count("/") == 1 and not text.startswith((".", "/", "~"))


def resolve_model_dir(source: str | Path, revision: str | None = None) -> tuple[Path, str | None]:
    """The local directory holding `source`, and the hub revision it came from (None if local)."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ShortLVLMError(f"{source} is a file; pass the checkpoint's directory.")
        return path, None
    text = str(source)
    if text in SHIPPED_MODELS:
        return SHIPPED_MODELS[text], None
    if not is_hub_id(text):
        raise ShortLVLMError(f"model {source} not found: no such directory, and it is not a hub id "
                             f"(or {', '.join(SHIPPED_MODELS)}, shipped with the package).")
    from huggingface_hub import snapshot_download

    log.info("fetching %s from the Hugging Face Hub", text)
    try:
        local = snapshot_download(text, revision=revision, allow_patterns=HUB_PATTERNS)
    except Exception as exc:  # the hub client raises many types; all mean "could not fetch"
        raise ShortLVLMError(
            f"model {source} not found: no such local directory, and fetching it from the "
            f"Hugging Face Hub failed ({type(exc).__name__}: {exc}). Check the id, your network "
            f"or HF_TOKEN, or pass a local directory."
        ) from exc
    local = Path(local)
    return local, local.name


def hub_cache_dir() -> Path:
    """Where the hub client keeps its downloads: no output may be written inside it."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def read_config(model_dir: Path) -> dict:
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ShortLVLMError(
            f"{model_dir} has no config.json: it is not a Hugging Face model checkpoint."
        )
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ShortLVLMError(f"{config_path} is not valid JSON: {exc}") from exc
