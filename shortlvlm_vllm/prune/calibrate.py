"""One calibration pass over the unpruned model: every statistic the localizers and SCP need.

Samples (prompt and reference answer teacher-forced) go through the model in batches, each sample
tokenized alone and padded on the right, so every real token sees exactly what it sees in a batch
of one. Hooks on the decoder layers see each layer's input and output; a wrapper around the model's
attention function sees each candidate layer's post-RoPE queries and keys and computes Token
Importance Scores from them in query chunks, so the model keeps running its own attention kernel
(SDPA) and no heads x T x T tensor is ever held. Statistics are read per sample from its own
length (padding never counts) and accumulated on the CPU as running sums, whichever devices the
layers run on; only SCP's pooled features (N x D per layer) grow with the number of samples.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from shortlvlm_vllm.adapters import ArchitectureAdapter
from shortlvlm_vllm.data.calibration import CalibrationSample, calibration_inputs
from shortlvlm_vllm.errors import ShortLVLMError
from shortlvlm_vllm.prune.localize import LayerStatistics

log = logging.getLogger(__name__)

TOKEN_SETS = ("tis", "all-tokens", "text-only", "visual-only")
# heads x query-chunk x keys scores at once: 8 MB of float32 stays in cache (measured 2.8x faster than 64 MB)
_CHUNK_ELEMENTS = 1 << 21


@dataclass(frozen=True)
class TokenLayout:
    """Positions in one sequence: V (image tokens) and T (text after the first image token).

    Tokens before the first image (system prompt, BOS) are outside the pool: they cannot attend
    to the image, and BOS is an attention sink that would dominate every score.
    """

    visual: torch.Tensor  # sorted positions
    text: torch.Tensor

    @classmethod
    def from_input_ids(cls, input_ids: torch.Tensor, image_token_id: int) -> TokenLayout:
        ids = input_ids.reshape(-1).cpu()
        is_image = ids == image_token_id
        if not bool(is_image.any()):
            raise ShortLVLMError("the sequence has no image tokens")
        first = int(is_image.nonzero()[0])
        positions = torch.arange(ids.numel())
        return cls(positions[is_image], positions[(positions > first) & ~is_image])

    @property
    def pool(self) -> torch.Tensor:
        return torch.cat([self.visual, self.text]).sort().values


def _valid_counts(positions: torch.Tensor, others: torch.Tensor, later: bool) -> torch.Tensor:
    """For each position, how many of `others` lie at or after it (later) or at or before it."""
    if later:
        return (others.numel() - torch.searchsorted(others, positions, right=False)).to(torch.float64)
    return torch.searchsorted(others, positions, right=True).to(torch.float64)


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num))


def tis_from_sums(
    layout: TokenLayout, col_from_v: torch.Tensor, col_from_t: torch.Tensor, row_to_v: torch.Tensor
) -> torch.Tensor:
    """TIS of every pool token (in layout.pool order) from attention sums, per SPEC.md section 2.

    col_from_v[k] / col_from_t[k]: sum of A[q, k] over visual / text queries q;
    row_to_v[q]: sum of A[q, i] over visual keys i. Means divide by causally valid entries.
    """
    v, t = layout.visual, layout.text
    v_intra = _safe_div(col_from_v[v], _valid_counts(v, v, later=True))
    v_cross = _safe_div(col_from_t[v], _valid_counts(v, t, later=True))
    t_cross = _safe_div(row_to_v[t], _valid_counts(t, v, later=False))
    t_intra = _safe_div(col_from_t[t], _valid_counts(t, t, later=True))
    scores = torch.empty(v.numel() + t.numel(), dtype=torch.float64)
    order = torch.cat([v, t]).argsort()
    scores[: v.numel()] = (v_intra + v_cross) / 2
    scores[v.numel():] = (t_cross + t_intra) / 2
    return scores[order]


def token_importance_chunked(
    query: torch.Tensor, key: torch.Tensor, scaling: float, layout: TokenLayout, chunk: int | None = None
) -> torch.Tensor:
    """TIS from one sequence's post-RoPE queries [H, T, d] and keys [H_kv, T, d], in query chunks.

    Scores are computed in the model's dtype and softmaxed in float32, as the model's own eager
    attention does. Only query rows from the first pool position on are computed: earlier rows
    feed no statistic. Sums over token sets are matrix products with 0/1 masks.
    """
    heads, length, _ = query.shape
    if key.shape[0] != heads:
        key = key.repeat_interleave(heads // key.shape[0], dim=0)
    chunk = chunk or max(1, _CHUNK_ELEMENTS // (heads * length))
    device = query.device
    is_v = torch.zeros(length, device=device)
    is_v[layout.visual.to(device)] = 1.0
    is_t = torch.zeros(length, device=device)
    is_t[layout.text.to(device)] = 1.0
    col_from_v = torch.zeros(length, device=device)
    col_from_t = torch.zeros(length, device=device)
    row_to_v = torch.zeros(length, device=device)
    key_t = key.transpose(1, 2)
    key_pos = torch.arange(length, device=device)
    for start in range(int(layout.visual[0]), length, chunk):
        stop = min(start + chunk, length)
        scores = torch.matmul(query[:, start:stop], key_t).float().mul_(scaling)
        scores.masked_fill_(key_pos[None, None, :] > key_pos[start:stop, None], float("-inf"))
        probs = scores.softmax(-1).mean(0)  # [rows, T], head-averaged
        col_from_v += is_v[start:stop] @ probs
        col_from_t += is_t[start:stop] @ probs
        row_to_v[start:stop] = probs @ is_v
    return tis_from_sums(layout, col_from_v.double().cpu(), col_from_t.double().cpu(), row_to_v.double().cpu())


def select_top_tokens(scores: torch.Tensor, pool: torch.Tensor, top_p: float) -> torch.Tensor:
    """Positions of the top-p fraction of the pool by TIS (at least one)."""
    k = max(1, round(top_p * pool.numel()))
    return pool[scores.topk(k).indices.sort().values]


@dataclass
class _Accumulator:
    num_layers: int
    candidates: list[int]
    num_samples: int
    hidden_size: int
    cosine_sums: dict[str, dict[int, float]] = field(default_factory=dict)
    angular_sum: torch.Tensor | None = None
    features: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.cosine_sums = {name: dict.fromkeys(self.candidates, 0.0) for name in TOKEN_SETS}
        self.angular_sum = torch.zeros(self.num_layers, self.num_layers, dtype=torch.float64)
        self.features = torch.zeros(self.num_layers, self.num_samples, self.hidden_size, dtype=torch.float32)

    def result(self, seen: int) -> LayerStatistics:
        angular = self.angular_sum / seen
        angular[torch.ones_like(angular, dtype=torch.bool).tril(-1)] = math.nan
        return LayerStatistics(
            num_layers=self.num_layers,
            num_samples=seen,
            cosine={name: {layer: s / seen for layer, s in sums.items()} for name, sums in self.cosine_sums.items()},
            angular=angular,
            features=self.features[:, :seen],
        )


class _SampleRecorder:
    """Hook state for one forward pass over a batch: layer inputs, TIS selections, last-token states.

    Row b of the batch is sample `index + b`, of `lengths[b]` real tokens (right padding after them).
    """

    def __init__(self, acc: _Accumulator, top_p: float) -> None:
        self.acc = acc
        self.top_p = top_p
        self.candidates = set(acc.candidates)
        self.layouts: list[TokenLayout] = []
        self.lengths: list[int] = []
        self.index = 0
        self.inputs: dict[int, torch.Tensor] = {}
        self.selected: dict[int, list[torch.Tensor]] = {}
        self.last_in = self.last_out = torch.zeros(0)

    def start(self, index: int, layouts: Sequence[TokenLayout], lengths: Sequence[int]) -> None:
        self.index, self.layouts, self.lengths = index, list(layouts), list(lengths)
        self.inputs.clear()
        self.selected.clear()
        self.last_in = torch.zeros(len(layouts), self.acc.num_layers, self.acc.hidden_size)
        self.last_out = torch.zeros_like(self.last_in)

    def on_attention(self, layer: int, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        if layer not in self.candidates:
            return
        self.selected[layer] = [
            select_top_tokens(token_importance_chunked(query[b, :, :n], key[b, :, :n], scaling, layout),
                              layout.pool, self.top_p)
            for b, (layout, n) in enumerate(zip(self.layouts, self.lengths, strict=True))]

    def on_layer_input(self, layer: int, hidden: torch.Tensor) -> None:
        self.inputs[layer] = hidden
        for b, n in enumerate(self.lengths):
            self.last_in[b, layer] = hidden[b, n - 1].float().cpu()

    def on_layer_output(self, layer: int, hidden: torch.Tensor) -> None:
        acc = self.acc
        # Under a device map the input may still be on the previous layer's device.
        inputs = self.inputs.pop(layer).to(hidden.device)
        selected = self.selected.pop(layer, None)
        for b, (layout, n) in enumerate(zip(self.layouts, self.lengths, strict=True)):
            x_out = hidden[b, :n].float()
            self.last_out[b, layer] = x_out[-1].cpu()
            acc.features[layer, self.index + b] = x_out[layout.pool.to(x_out.device)].mean(0).cpu()
            if layer not in self.candidates:
                continue
            cos = F.cosine_similarity(inputs[b, :n].float(), x_out, dim=-1).cpu().double()
            sums = acc.cosine_sums
            sums["all-tokens"][layer] += float(cos.mean())
            sums["text-only"][layer] += float(cos[layout.text].mean()) if layout.text.numel() else 0.0
            sums["visual-only"][layer] += float(cos[layout.visual].mean())
            sums["tis"][layer] += float(cos[selected[b]].mean())

    def finish(self) -> None:
        """Angular distance between every layer input and every later layer output (last token), per sample."""
        for last_in, last_out in zip(self.last_in, self.last_out, strict=True):
            cos = F.normalize(last_in.double(), dim=-1) @ F.normalize(last_out.double(), dim=-1).T
            self.acc.angular_sum += torch.arccos(cos.clamp(-1, 1)).triu() / math.pi


@contextlib.contextmanager
def layer_hooks(model, adapter: ArchitectureAdapter, recorder) -> Iterator[None]:
    """While inside, every forward pass calls `recorder.on_layer_input(layer, hidden)`, `recorder.on_attention(layer,
    query, key, scaling)` (post-RoPE, before the model's own attention kernel) and `recorder.on_layer_output(layer,
    hidden)` for each decoder layer; the model computes exactly what it computes without them."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    layers = adapter.decoder_layers(model)
    attention_index = {id(layer.self_attn): i for i, layer in enumerate(layers)}
    implementation = model.config.get_text_config()._attn_implementation or "sdpa"
    if implementation not in ALL_ATTENTION_FUNCTIONS:
        raise ShortLVLMError(
            f"calibration needs a registered attention implementation (sdpa), not {implementation!r}."
        )
    wrapped = ALL_ATTENTION_FUNCTIONS[implementation]
    previous_local = ALL_ATTENTION_FUNCTIONS._local_mapping.get(implementation)

    def attention(module, query, key, value, attention_mask, **kwargs):
        layer = attention_index.get(id(module))
        if layer is not None:
            recorder.on_attention(layer, query, key, kwargs.get("scaling") or module.scaling)
        return wrapped(module, query, key, value, attention_mask, **kwargs)

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(
            lambda mod, args, kwargs, i=i: recorder.on_layer_input(i, args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True,
        ))
        handles.append(layer.register_forward_hook(
            lambda mod, args, out, i=i: recorder.on_layer_output(i, out[0] if isinstance(out, tuple) else out)
        ))
    ALL_ATTENTION_FUNCTIONS[implementation] = attention
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        if previous_local is None:
            del ALL_ATTENTION_FUNCTIONS[implementation]
        else:
            ALL_ATTENTION_FUNCTIONS[implementation] = previous_local


# Inputs that run along the sequence (padded on the right); every other input is stacked along the batch.
_SEQUENCE_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")


def collate(inputs: Sequence[Mapping[str, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """One batch from per-sample processor outputs: sequences right-padded (input ids with `pad_token_id`, the
    attention mask and token types with 0), everything else (pixel values, image grids) concatenated."""
    if len(inputs) == 1:
        return dict(inputs[0])
    length = max(sample["input_ids"].shape[1] for sample in inputs)
    batch = {}
    for name in inputs[0]:
        if name in _SEQUENCE_INPUTS:
            fill = pad_token_id if name == "input_ids" else 0
            batch[name] = torch.cat([F.pad(sample[name], (0, length - sample[name].shape[1]), value=fill)
                                     for sample in inputs])
        else:
            batch[name] = torch.cat([sample[name] for sample in inputs])
    return batch


@torch.no_grad()
def run_calibration(
    model,
    processor,
    adapter: ArchitectureAdapter,
    samples: Sequence[CalibrationSample],
    candidates: Sequence[int],
    top_p: float = 0.10,
    batch_size: int = 1,
) -> LayerStatistics:
    """One pass over `samples`, `batch_size` at a time; returns the per-layer statistics of every localizer and SCP
    (the same for every batch size, to float rounding)."""
    if batch_size < 1:
        raise ShortLVLMError(f"the calibration batch size must be at least 1, not {batch_size}.")
    text_config = model.config.get_text_config()
    image_token_id = getattr(model.config, adapter.image_token_config_key)
    # Padding is masked and never read, but it must not be the image token: the model would count it as one.
    tokenizer = processor.tokenizer
    pad_token_id = next(t for t in (getattr(tokenizer, "pad_token_id", None), tokenizer.eos_token_id, 0, 1)
                        if t is not None and t != image_token_id)
    num_layers = len(adapter.decoder_layers(model))
    acc = _Accumulator(num_layers, sorted(candidates), len(samples), text_config.hidden_size)
    recorder = _SampleRecorder(acc, top_p)
    device = next(model.parameters()).device
    started = time.perf_counter()
    with layer_hooks(model, adapter, recorder), tqdm(total=len(samples), desc="calibrating", unit="sample",
                                                       disable=None) as bar:
        for first in range(0, len(samples), batch_size):
            batch = samples[first:first + batch_size]
            inputs = [calibration_inputs(processor, sample) for sample in batch]
            layouts = []
            for sample, sample_inputs in zip(batch, inputs, strict=True):
                try:
                    layouts.append(TokenLayout.from_input_ids(sample_inputs["input_ids"], image_token_id))
                except ShortLVLMError as exc:
                    raise ShortLVLMError(f"calibration sample {sample.id}: {exc}; check the chat template.") from None
            recorder.start(first, layouts, [sample_inputs["input_ids"].shape[1] for sample_inputs in inputs])
            model(**{name: value.to(device) for name, value in collate(inputs, pad_token_id).items()}, use_cache=False)
            recorder.finish()
            bar.update(len(batch))
    elapsed = time.perf_counter() - started
    log.info("calibrated on %d samples in %.1f s (%.2f samples/s, batches of %d)", len(samples), elapsed,
             len(samples) / elapsed, batch_size)
    return acc.result(len(samples))


STATISTICS_FILE = "statistics.pt"


def statistics_key(fingerprint: dict, calibration: dict, candidates: Sequence[int], top_p: float, dtype: str,
                   device: str) -> str:
    """What one calibration pass's statistics depend on: the source (its fingerprint), the calibration draw, the
    candidate layers, TIS's top-p and the numerics it ran in. Localizer, ratio and compensation are not among them:
    one pass gives every localizer's scores and every layer's SCP features."""
    import hashlib
    import json

    parts = {"source": fingerprint, "calibration": calibration, "candidates": sorted(candidates), "top_p": top_p,
             "dtype": dtype, "device": device}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_statistics(cache_dir: Path, key: str) -> LayerStatistics | None:
    """The statistics cached under `key`, or None."""
    path = cache_dir / key / STATISTICS_FILE
    if not path.is_file():
        return None
    saved = torch.load(path, weights_only=True)
    log.info("calibration statistics read from the cache (%s)", path)
    return LayerStatistics(num_layers=saved["num_layers"], num_samples=saved["num_samples"],
                           cosine={name: {int(k): v for k, v in s.items()} for name, s in saved["cosine"].items()},
                           angular=saved["angular"], features=saved["features"])


def save_statistics(cache_dir: Path, key: str, stats: LayerStatistics) -> None:
    """Cache the statistics under `key`, written to a temporary name and renamed (a killed run leaves no half file)."""
    path = cache_dir / key / STATISTICS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save({"num_layers": stats.num_layers, "num_samples": stats.num_samples, "cosine": stats.cosine,
                "angular": stats.angular, "features": stats.features.contiguous()}, partial)
    partial.replace(path)
