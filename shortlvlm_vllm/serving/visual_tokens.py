"""Visual-token pruning before the language model, the way VisionZip does it (Yang et al., CVPR 2025).

Training-free: of an image's N patch tokens at the vision tower's feature layer, keep a budget of K:
- dominant tokens: the patches the [CLS] query attends to most at the feature layer (attention summed
  over heads), in their original order;
- contextual tokens: the remaining patches, grouped around evenly spaced targets by the cosine
  similarity of their keys (the feature layer's keys, averaged over heads); each contextual token is
  its target plus the mean of the patches assigned to it (VisionZip's merge).
The split follows VisionZip's 54 dominant + 10 contextual of 64: a share of 10/64 contextual, at
least one as soon as K >= 2 so that the unselected patches are never simply dropped.

`short_lvlm.visual_token_selection: random` swaps the selection for a test arm: K patches drawn uniformly,
seeded per image by its pixels (`short_lvlm.visual_token_seed`, default 0), so a server gives the same
choice for the same image whatever it is batched with; it shows what VisionZip's choice is worth.

The same functions serve the vLLM class (vllm_plugin.llava) and the transformers reference, so the
two differ only in how the vision tower's attention and keys are obtained. K = N keeps every token
in its original order: callers skip the selection then, and the model is the stock one.

Qwen2-VL and Qwen2.5-VL (vllm_plugin.qwen_vl) have no [CLS] token, and an image's token count N varies with its
size: each image keeps min(K, N) of its merged tokens (after the patch merger), those that receive the most
attention in the vision tower's last block (received_attention: the softmax over the image's patches, averaged
over its queries, summed over all heads, then summed over each merge group's patches), in their original order.
Every kept token keeps its own M-RoPE position (t, h, w) and the text after the image keeps its own too: the
pruned prompt is the full prompt with the dropped tokens taken out (prompt_mrope_positions).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from shortlvlm_vllm.errors import ShortLVLMError

CONTEXTUAL_SHARE = 10 / 64
SUPPORTED_VISION_MODEL_TYPE = "clip_vision_model"
SUPPORTED_SELECT_STRATEGY = "default"
SELECTIONS = ("visionzip", "random")
QWEN_VL_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
# received_attention scores this many queries at a time: bounded memory for images of thousands of patches
QUERY_CHUNK = 1024


def split_budget(budget: int) -> tuple[int, int]:
    """(dominant, contextual) token counts for a budget of K tokens per image."""
    contextual = max(1, round(budget * CONTEXTUAL_SHARE)) if budget >= 2 else 0
    return budget - contextual, contextual


def image_token_count(config: Mapping) -> int:
    """N, the patch tokens per image a LLaVA config (config.json as a dict) gives the language model.

    Raises when the config is outside what the selection supports: a CLIP vision tower, one feature
    layer, and the "default" strategy (patch tokens, [CLS] dropped).
    """
    vision = config.get("vision_config") or {}
    if vision.get("model_type") != SUPPORTED_VISION_MODEL_TYPE:
        raise ShortLVLMError(
            f"visual-token pruning needs a CLIP vision tower (its [CLS] attention picks the tokens); this model's "
            f"vision tower is {vision.get('model_type')!r}. Drop --visual-tokens."
        )
    if not isinstance(config.get("vision_feature_layer", -2), int):
        raise ShortLVLMError("visual-token pruning needs a single vision_feature_layer, not a list.")
    strategy = config.get("vision_feature_select_strategy", SUPPORTED_SELECT_STRATEGY)
    if strategy != SUPPORTED_SELECT_STRATEGY:
        raise ShortLVLMError(
            f"visual-token pruning needs vision_feature_select_strategy 'default' (patch tokens only), "
            f"not {strategy!r}."
        )
    return (vision["image_size"] // vision["patch_size"]) ** 2


def fraction_token_count(checkpoint: Path, config: Mapping) -> int:
    """N, the tokens per image that a visual-token fraction of `checkpoint` (config.json as `config`) takes its share
    of, by the architecture's adapter: LLaVA's fixed count; for Qwen2-VL / Qwen2.5-VL, whose count grows with the
    image, the most merged tokens an image gets under the checkpoint's processor (its pixel limit), so that the
    largest images keep the fraction and smaller ones min(K, their N)."""
    from shortlvlm_vllm.adapters import adapter_for_config

    adapter = adapter_for_config(config, str(checkpoint))
    if adapter.image_tokens == "vision_grid":
        return image_token_count(config)
    if adapter.image_tokens == "max_pixels":
        return max_image_tokens(checkpoint, config)
    raise ShortLVLMError(f"visual-token pruning does not apply to model type {adapter.model_type!r}: drop the token "
                         f"fraction for it.")


def max_image_tokens(checkpoint: Path, config: Mapping) -> int:
    """The most merged tokens a Qwen2-VL / Qwen2.5-VL image gets: the image processor's pixel limit (`max_pixels`
    in the hub's preprocessor_config.json, `size.longest_edge` as transformers 5 writes processor_config.json) over
    the area of one merged patch."""
    checkpoint = Path(checkpoint)
    settings = {}
    if (checkpoint / "preprocessor_config.json").is_file():
        settings = json.loads((checkpoint / "preprocessor_config.json").read_text())
    elif (checkpoint / "processor_config.json").is_file():
        settings = json.loads((checkpoint / "processor_config.json").read_text()).get("image_processor") or {}
    max_pixels = settings.get("max_pixels") or (settings.get("size") or {}).get("longest_edge")
    if not max_pixels:
        raise ShortLVLMError(f"{checkpoint} has no image processor settings with a pixel limit (max_pixels), so the "
                             f"token count a visual-token fraction takes its share of is unknown.")
    vision = config.get("vision_config") or {}
    side = settings.get("patch_size", vision.get("patch_size")) * settings.get("merge_size",
                                                                               vision.get("spatial_merge_size"))
    return max(1, max_pixels // side**2)


def budget_limit(config: Mapping) -> int | None:
    """The most tokens a budget may name for this config.json: LLaVA's N; None for Qwen2-VL / Qwen2.5-VL, whose
    token count varies with the image's size (each image keeps min(K, its N), so any K >= 1 fits)."""
    if config.get("model_type") in QWEN_VL_MODEL_TYPES:
        return None
    return image_token_count(config)


def check_budget(budget: int, num_tokens: int | None) -> int:
    """K itself, once it is known to be between 1 and the image's N tokens (num_tokens None: no upper bound)."""
    if isinstance(budget, bool) or not isinstance(budget, int):
        raise ShortLVLMError(f"visual_tokens must be a whole number of tokens, got {budget!r}.")
    if budget < 1:
        most = "" if num_tokens is None else f" between 1 and {num_tokens} (the image's token count)"
        raise ShortLVLMError(f"visual_tokens {budget} leaves no image token: keep{most or ' at least 1'}.")
    if num_tokens is not None and budget > num_tokens:
        raise ShortLVLMError(
            f"visual_tokens {budget} is more than the {num_tokens} tokens an image has: "
            f"keep between 1 and {num_tokens}."
        )
    return budget


def configured_budget(config: Mapping) -> int | None:
    """The checked budget K from config.json's `short_lvlm.visual_tokens`, or None when none is set."""
    budget = (config.get("short_lvlm") or {}).get("visual_tokens")
    if budget is None:
        return None
    return check_budget(budget, budget_limit(config))


def configured_selection(config: Mapping) -> tuple[str, int]:
    """(selection, seed) from config.json's `short_lvlm`: "visionzip" (the default) or "random"."""
    section = config.get("short_lvlm") or {}
    selection = section.get("visual_token_selection", SELECTIONS[0])
    if selection not in SELECTIONS:
        raise ShortLVLMError(f"visual_token_selection {selection!r} is unknown; use one of {', '.join(SELECTIONS)}.")
    seed = section.get("visual_token_seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ShortLVLMError(f"visual_token_seed must be a whole number >= 0, got {seed!r}.")
    return selection, seed


def random_visual_tokens(features: torch.Tensor, pixel_values: torch.Tensor, budget: int, seed: int) -> torch.Tensor:
    """[B, K, C]: K of `features` [B, N, C] drawn uniformly per image, in their original order; each image's
    draw is seeded by `seed` and its pixels, so the same image always keeps the same tokens."""
    batch, num_tokens, _ = features.shape
    check_budget(budget, num_tokens)
    out = []
    for b in range(batch):
        digest = hashlib.sha256(seed.to_bytes(8, "little") + pixel_values[b].float().cpu().numpy().tobytes())
        generator = torch.Generator().manual_seed(int.from_bytes(digest.digest()[:8], "little"))
        keep = torch.randperm(num_tokens, generator=generator)[:budget].sort().values
        out.append(features[b, keep.to(features.device)])
    return torch.stack(out)


def cls_attention(query: torch.Tensor, key: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, N] float32: the [CLS] query's attention to each patch, summed over the `num_heads` heads given.

    query, key: [B, 1 + N, heads * head_dim] at the feature layer ([CLS] first), before the softmax. Under tensor
    parallelism a rank holds only some heads: the sum over every head is the sum of the ranks' results.
    """
    batch, length, width = query.shape
    head_dim = width // num_heads
    q_cls = query[:, :1].reshape(batch, 1, num_heads, head_dim).transpose(1, 2).float()
    k = key.reshape(batch, length, num_heads, head_dim).transpose(1, 2).float()
    probs = torch.softmax(q_cls @ k.transpose(-1, -2) * head_dim**-0.5, dim=-1)  # [B, H, 1, 1 + N]
    return probs.sum(dim=1)[:, 0, 1:].contiguous()


def key_sums(key: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, 1 + N, head_dim] float32: the feature layer's keys summed over the `num_heads` heads given (summed over
    ranks like cls_attention under tensor parallelism)."""
    batch, length, width = key.shape
    return key.reshape(batch, length, num_heads, width // num_heads).float().sum(dim=2)


def key_metric(key_sum: torch.Tensor, total_heads: int) -> torch.Tensor:
    """VisionZip's similarity metric: the keys averaged over all `total_heads` heads, from their sum (key_sums)."""
    return key_sum / total_heads


def select_visual_tokens(
    features: torch.Tensor, attention: torch.Tensor, keys: torch.Tensor, budget: int
) -> torch.Tensor:
    """[B, K, C]: dominant then contextual tokens of `features` [B, N, C].

    attention: [B, N] from cls_attention; keys: [B, N, d] (patch rows of key_metric).
    """
    batch, num_tokens, width = features.shape
    check_budget(budget, num_tokens)
    if budget == num_tokens:
        return features
    num_dominant, num_contextual = split_budget(budget)
    order = torch.arange(num_tokens, device=features.device)
    out = []
    for b in range(batch):
        dominant = attention[b].topk(num_dominant).indices.sort().values
        rest = order[~torch.isin(order, dominant)]
        tokens = [features[b, dominant]]
        if num_contextual:
            tokens.append(_merge_contextual(features[b, rest], keys[b, rest], num_contextual))
        out.append(torch.cat(tokens))
    return torch.stack(out)


def _merge_contextual(features: torch.Tensor, keys: torch.Tensor, count: int) -> torch.Tensor:
    """VisionZip's contextual tokens: evenly spaced targets, each plus the mean of its most similar others."""
    metric = keys.float() / keys.float().norm(dim=-1, keepdim=True)
    step = max(1, len(features) // count)
    targets = torch.arange(0, len(features), step, device=features.device)[:count]
    is_target = torch.zeros(len(features), dtype=torch.bool, device=features.device)
    is_target[targets] = True
    similarity = metric[~is_target] @ metric[targets].T  # [others, targets]
    assign = torch.nn.functional.one_hot(similarity.argmax(dim=1), len(targets)).to(features.dtype)
    counts = assign.sum(dim=0).clamp(min=1).unsqueeze(-1)
    return features[targets] + assign.T @ features[~is_target] / counts


def received_attention(query: torch.Tensor, key: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """[S] float32: the attention each patch receives in one vision block, within its own image (the segments
    `cu_seqlens` [images + 1] marks): softmax(q k^T / sqrt(d)) averaged over the image's queries and summed over
    the heads given.

    query, key: [S, heads, head_dim], after the rotary embedding. Under tensor parallelism a rank holds only some
    heads: the sum over every head is the sum of the ranks' results.
    """
    scale = query.shape[-1] ** -0.5
    received = torch.zeros(query.shape[0], dtype=torch.float32, device=query.device)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=False):
        keys = key[start:end].float().transpose(0, 1)  # [H, n, d]
        queries = query[start:end].float().transpose(0, 1)
        for first in range(0, end - start, QUERY_CHUNK):
            probs = torch.softmax(queries[:, first:first + QUERY_CHUNK] @ keys.transpose(-1, -2) * scale, dim=-1)
            received[start:end] += probs.sum(dim=(0, 1))
        received[start:end] /= end - start
    return received


def merge_group_scores(patch_scores: torch.Tensor, merge_unit: int) -> torch.Tensor:
    """[S / merge_unit]: each merged token's score, the sum over the `merge_unit` consecutive patches the patch
    merger folds into it."""
    return patch_scores.reshape(-1, merge_unit).sum(dim=-1)


def kept_token_count(budget: int, num_tokens: int) -> int:
    """How many of an image's `num_tokens` merged tokens a budget of K keeps: min(K, N)."""
    return min(budget, num_tokens)


def keep_most_attended(scores: torch.Tensor, budget: int) -> torch.Tensor:
    """Indices of the min(K, N) highest of one image's `scores` [N], in their original order (ties: the earlier)."""
    kept = kept_token_count(budget, len(scores))
    if kept == len(scores):
        return torch.arange(len(scores), device=scores.device)
    return torch.sort(scores, descending=True, stable=True).indices[:kept].sort().values


def merged_grid_positions(grid_thw: Sequence[int], merge_size: int) -> torch.Tensor:
    """[N, 3] long: the (t, h, w) M-RoPE offsets of an image's merged tokens in their order (row by row), counted
    from the image's first token; grid_thw is the image processor's patch grid."""
    t, h, w = (int(v) for v in grid_thw)
    grid = torch.meshgrid(torch.arange(t), torch.arange(h // merge_size), torch.arange(w // merge_size), indexing="ij")
    return torch.stack(grid, dim=-1).reshape(-1, 3)


def position_channels(grid_thw: Sequence[int], merge_size: int, kept: torch.Tensor) -> torch.Tensor:
    """[K, 4] long: the kept tokens' (t, h, w) offsets and, in every row, the image's extent: the offset the text
    after it continues from, the full grid's largest offset + 1 whatever is kept (vLLM's recompute_mrope_positions
    reads the rows this way)."""
    positions = merged_grid_positions(grid_thw, merge_size)
    extent = torch.full((len(kept), 1), int(positions.max()) + 1, dtype=torch.long)
    return torch.cat([positions[kept.cpu()], extent], dim=1)


def prompt_mrope_positions(num_tokens: int, images: Sequence[tuple[int, torch.Tensor]]) -> tuple[torch.Tensor, int]:
    """([3, num_tokens] long, delta): the M-RoPE positions of a prompt whose images hold only their kept tokens,
    and the offset decoding adds to a token's index (vLLM's mrope_position_delta).

    images: per image in prompt order, the index of its first placeholder and its position_channels. Text runs on
    one position per token; an image's tokens sit at the text position they start at plus their own offsets; the
    text after it continues at that start plus the image's extent, as in the full prompt.
    """
    pieces, start, position = [], 0, 0
    for offset, channels in images:
        pieces.append(torch.arange(offset - start).expand(3, -1) + position)
        position += offset - start
        pieces.append(channels[:, :3].T + position)
        position += int(channels[0, 3])
        start = offset + len(channels)
    pieces.append(torch.arange(num_tokens - start).expand(3, -1) + position)
    positions = torch.cat(pieces, dim=1)
    return positions, int(positions.max()) + 1 - num_tokens
