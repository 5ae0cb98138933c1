"""Resolving a model argument: a local directory, or a Hugging Face Hub id (real loading path)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from shortlvlm_vllm.errors import ShortLVLMError

log = logging.getLogger(__name__)

# What a pruning run needs from a hub repository: weights, configs, tokenizer, templates.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py"]


def resolve_model_dir(source: str | Path, revision: str | None = None) -> tuple[Path, str | None]:
    """The local directory holding `source`, and the hub revision it came from (None if local)."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ShortLVLMError(f"{source} is a file; pass the checkpoint's directory.")
        return path, None
    text = str(source)
    looks_like_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise ShortLVLMError(f"model {source} not found: no such directory, and it is not a hub id.")
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
