"""Checkpoint surgery: what the pruned checkpoint holds, equivalence, and bad input."""

from __future__ import annotations

import json
import re
import shutil
import tracemalloc
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from shortlvlm_vllm.adapters import adapter_for_config
from shortlvlm_vllm.chat import template_image_turn
from shortlvlm_vllm.checkpoint import safetensors_io
from shortlvlm_vllm.checkpoint.reader import open_checkpoint
from shortlvlm_vllm.checkpoint.safetensors_io import read_header
from shortlvlm_vllm.checkpoint.surgery import write_pruned_checkpoint
from shortlvlm_vllm.checkpoint.writer import INDEX_NAME
from shortlvlm_vllm.cli import main
from shortlvlm_vllm.errors import ShortLVLMError
from shortlvlm_vllm.prune.drift import pruned_view
from shortlvlm_vllm.tiny_models import build_tiny_llava
from tests.tiny_qwen_vl import build_tiny_qwen_vl

from .conftest import DROPPED, IMAGE_SIZES, random_image

LAYER = "language_model.model.layers.{}.{}"


def _raw(path: Path, name: str) -> bytes:
    header = read_header(path).tensors[name]
    with open(path, "rb") as f:
        f.seek(header.start)
        return f.read(header.end - header.start)


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_pruned_checkpoint_contents(tiny_llava, pruned_llava):
    config = json.loads((pruned_llava / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == 6
    assert config["vision_config"]["num_hidden_layers"] == 2  # the vision tower is untouched
    record = config["short_lvlm"]
    assert record["pruned_layers"] == DROPPED and record["source_num_layers"] == 8
    assert record["tool"] == "shortlvlm-vllm" and record["tool_version"]
    src, dst = tiny_llava / "model.safetensors", pruned_llava / "model.safetensors"
    dst_keys = set(read_header(dst).tensors)
    assert not any(k.startswith(LAYER.format(6, "")) for k in dst_keys)
    # old layer -> new layer, byte for byte; everything outside the decoder layers unchanged
    for old, new in {0: 0, 2: 2, 4: 3, 6: 4, 7: 5}.items():
        for part in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            assert _raw(src, LAYER.format(old, part)) == _raw(dst, LAYER.format(new, part))
    outside = [k for k in read_header(src).tensors if ".layers." not in k or "vision" in k]
    assert outside and all(_raw(src, k) == _raw(dst, k) for k in outside)
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json",
                 "chat_template.jinja", "generation_config.json"):
        assert (pruned_llava / name).read_bytes() == (tiny_llava / name).read_bytes()
    card = (pruned_llava / "README.md").read_text()
    assert "3, 5" in card and "2 of 8 decoder layers removed" in card


@torch.no_grad()
def _assert_pruned_equals_original_with_layers_skipped(original_dir: Path, pruned_dir: Path) -> None:
    """Logits of the pruned checkpoint == the original's with DROPPED skipped, on two image sizes."""
    processor = AutoProcessor.from_pretrained(original_dir)
    text = processor.apply_chat_template([template_image_turn("What is it?")], add_generation_prompt=True)
    original = AutoModelForImageTextToText.from_pretrained(original_dir, dtype=torch.float32).eval()
    pruned = AutoModelForImageTextToText.from_pretrained(pruned_dir, dtype=torch.float32).eval()
    adapter = adapter_for_config(original.config.to_dict())
    assert len(adapter.decoder_layers(pruned)) == len(adapter.decoder_layers(original)) - len(DROPPED)
    for seed, size in enumerate(IMAGE_SIZES):
        inputs = processor(images=random_image(seed, size), text=text, return_tensors="pt")
        full_logits = original(**inputs, use_cache=False).logits
        with pruned_view(original, adapter, DROPPED):
            skipped = original(**inputs, use_cache=False).logits
        logits = pruned(**inputs, use_cache=False).logits
        torch.testing.assert_close(logits, skipped, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(logits, full_logits, atol=1e-3)  # the layers did matter


def test_pruned_logits_equal_original_with_layers_skipped(tiny_vlm, tmp_path):
    pruned = write_pruned_checkpoint(open_checkpoint(tiny_vlm), tmp_path / "pruned", DROPPED)
    _assert_pruned_equals_original_with_layers_skipped(tiny_vlm, pruned)


def _flat_config(model_dir: Path) -> None:
    """Rewrite config.json flat, text fields at the top level, as the Qwen hub checkpoints store it."""
    config = json.loads((model_dir / "config.json").read_text())
    text = config.pop("text_config")
    text.pop("model_type")
    (model_dir / "config.json").write_text(json.dumps(text | config))


@pytest.mark.parametrize("config_form", ["nested", "flat"])
@pytest.mark.parametrize("hub_layout", [True, False], ids=["hub-keys", "transformers-keys"])
@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_surgery_on_both_key_layouts_and_config_forms(tmp_path, model_type, hub_layout, config_form):
    """Only decoder layers go (never the numbered vision blocks), in either key layout, and the config's
    layer count, layer_types and max_window_layers follow, wherever the config keeps them."""
    source = build_tiny_qwen_vl(tmp_path / "source", model_type, hub_layout=hub_layout)
    config = json.loads((source / "config.json").read_text())
    # sliding-window attention from layer 4 on: layers 0-3 full, 4-7 sliding (a 16-token window)
    config["text_config"] |= {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 4,
                              "layer_types": ["full_attention"] * 4 + ["sliding_attention"] * 4}
    (source / "config.json").write_text(json.dumps(config))
    if config_form == "flat":
        _flat_config(source)
    src = open_checkpoint(source)
    assert src.num_layers == 8 and src.hidden_size == 128
    out = write_pruned_checkpoint(src, tmp_path / "pruned", DROPPED)

    prefix = "model.layers." if hub_layout else "model.language_model.layers."
    visual = "visual.blocks." if hub_layout else "model.visual.blocks."
    src_file, dst_file = source / "model.safetensors", out / "model.safetensors"
    source_keys, pruned_keys = read_header(src_file).tensors, read_header(dst_file).tensors
    layers = {k.removeprefix(prefix).split(".")[0] for k in pruned_keys if k.startswith(prefix)}
    assert layers == set(map(str, range(6)))
    for name in (k for k in source_keys if not k.startswith(prefix)):  # vision blocks 0 and 1 among them
        assert _raw(src_file, name) == _raw(dst_file, name)
    assert {k for k in pruned_keys if k.startswith(visual)} == {k for k in source_keys if k.startswith(visual)}
    for old, new in {4: 3, 7: 5}.items():
        weight = "mlp.down_proj.weight"
        assert _raw(src_file, f"{prefix}{old}.{weight}") == _raw(dst_file, f"{prefix}{new}.{weight}")

    written = json.loads((out / "config.json").read_text())
    text = written["text_config"] if config_form == "nested" else written
    assert ("text_config" in written) == (config_form == "nested")  # a flat config is not given a text_config
    assert text["num_hidden_layers"] == 6 and text["max_window_layers"] == 3
    assert text["layer_types"] == ["full_attention"] * 3 + ["sliding_attention"] * 3
    assert written["vision_config"]["depth"] == 2
    _assert_pruned_equals_original_with_layers_skipped(source, out)


def test_sharded_source_and_layer_count_from_weights(tmp_path, tiny_llava, pruned_llava):
    sharded = build_tiny_llava(tmp_path / "sharded", max_shard_bytes=1_000_000)
    config = json.loads((sharded / "config.json").read_text())
    del config["text_config"]["num_hidden_layers"]  # as in llava-hf's own config.json
    config["text_config"]["layer_types"] = [f"full_attention_{i}" for i in range(8)]
    (sharded / "config.json").write_text(json.dumps(config))
    src = open_checkpoint(sharded)
    assert len(src.shards) > 2 and src.num_layers == 8
    out = write_pruned_checkpoint(src, tmp_path / "out", DROPPED)
    index = json.loads((out / INDEX_NAME).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == sorted(p.name for p in out.glob("*.safetensors"))
    assert index["metadata"]["total_size"] == sum(
        t.end - t.start for f in files for t in read_header(out / f).tensors.values()
    )
    new_config = json.loads((out / "config.json").read_text())["text_config"]
    assert new_config["num_hidden_layers"] == 6
    assert new_config["layer_types"] == [f"full_attention_{i}" for i in (0, 1, 2, 4, 6, 7)]
    # same tensors, same bytes as the single-shard route
    single = pruned_llava / "model.safetensors"
    for name in read_header(single).tensors:
        assert _raw(out / index["weight_map"][name], name) == _raw(single, name)


def test_streaming_peak_memory_is_far_below_model_size(tmp_path, tiny_llava, monkeypatch):
    monkeypatch.setattr(safetensors_io, "CHUNK_BYTES", 64 << 10)
    src = open_checkpoint(tiny_llava)
    model_bytes = (tiny_llava / "model.safetensors").stat().st_size
    tracemalloc.start()
    write_pruned_checkpoint(src, tmp_path / "out", DROPPED)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < model_bytes / 5, (peak, model_bytes)


def test_copy_without_copy_file_range_writes_the_same_bytes(tmp_path, tiny_llava, monkeypatch):
    """Where the kernel cannot copy between the files (another file system), the buffered copy writes the same."""
    src = open_checkpoint(tiny_llava)
    kernel = write_pruned_checkpoint(src, tmp_path / "kernel", DROPPED)

    def unsupported(*args):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(safetensors_io.os, "copy_file_range", unsupported)
    monkeypatch.setattr(safetensors_io, "CHUNK_BYTES", 64 << 10)
    buffered = write_pruned_checkpoint(src, tmp_path / "buffered", DROPPED)
    assert (buffered / "model.safetensors").read_bytes() == (kernel / "model.safetensors").read_bytes()


def test_replaced_tensors_are_written_and_checked(tmp_path, tiny_llava):
    src = open_checkpoint(tiny_llava)
    name = LAYER.format(4, "mlp.down_proj.weight")
    value = torch.full(src.tensor_info(name).shape, 0.5)
    out = write_pruned_checkpoint(src, tmp_path / "out", DROPPED, replaced={name: value})
    header = read_header(out / "model.safetensors")
    written = safetensors_io.load_tensor(header.tensors[LAYER.format(3, "mlp.down_proj.weight")])
    assert torch.equal(written, value)
    with pytest.raises(ShortLVLMError, match="layer 5 is being dropped"):
        write_pruned_checkpoint(src, tmp_path / "x", DROPPED, replaced={LAYER.format(5, "mlp.down_proj.weight"): value})
    with pytest.raises(ShortLVLMError, match="the source tensor is F32"):
        write_pruned_checkpoint(src, tmp_path / "x", DROPPED, replaced={name: value.half()})
    assert not (tmp_path / "x").exists()


def test_hub_id_is_fetched_through_snapshot_download(tmp_path, tiny_llava, monkeypatch):
    import huggingface_hub

    snapshot = shutil.copytree(tiny_llava, tmp_path / "0123abcd")
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision))
        if repo_id != "llava-hf/tiny":
            raise huggingface_hub.errors.RepositoryNotFoundError("404 not found")
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    src = open_checkpoint("llava-hf/tiny", revision="main")
    assert src.path == snapshot and src.revision == "0123abcd" and calls == [("llava-hf/tiny", "main")]
    out = write_pruned_checkpoint(src, tmp_path / "out", [1])
    record = json.loads((out / "config.json").read_text())["short_lvlm"]
    assert record["source"] == "llava-hf/tiny" and record["source_revision"] == "0123abcd"
    with pytest.raises(ShortLVLMError, match="fetching it from the Hugging Face Hub failed"):
        open_checkpoint("llava-hf/does-not-exist")


def test_cli_prune_and_overwrite(tmp_path, tiny_llava, capsys):
    out = tmp_path / "out"
    assert main(["prune", str(tiny_llava), "--drop-layers", "3,5", "-o", str(out)]) == 0
    assert "6 of 8 decoder layers" in capsys.readouterr().out
    assert main(["prune", str(tiny_llava), "--drop-layers", "1", "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["short_lvlm"]["pruned_layers"] == [3, 5]
    assert main(["prune", str(tiny_llava), "--drop-layers", "1", "-o", str(out), "--overwrite"]) == 0
    assert json.loads((out / "config.json").read_text())["short_lvlm"]["pruned_layers"] == [1]
    assert _leftovers(tmp_path) == []


def _not_vlm(tmp_path: Path, tiny_llava: Path) -> Path:
    model = shutil.copytree(tiny_llava, tmp_path / "llama")
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (model / "config.json").write_text(json.dumps(config))
    return model


def _truncated(tmp_path: Path, tiny_llava: Path) -> Path:
    model = shutil.copytree(tiny_llava, tmp_path / "truncated")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return model


def _corrupt_header(tmp_path: Path, tiny_llava: Path) -> Path:
    model = shutil.copytree(tiny_llava, tmp_path / "corrupt")
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:40] = b"\x00garbage" * 4
    weights.write_bytes(bytes(data))
    return model


@pytest.mark.parametrize(
    ("make_source", "drop", "message"),
    [
        (lambda tmp, tiny: tmp / "no-such-model", "3", "not found"),
        (_not_vlm, "3", "not a supported vision-language checkpoint.*Supported model types: llava, qwen2_vl"),
        (lambda tmp, tiny: tiny, "8", "layer 8 is out of range: the model has 8 decoder layers"),
        (lambda tmp, tiny: tiny, "-1", "layer -1 is out of range"),
        (lambda tmp, tiny: tiny, "3,3", "layer 3 is listed more than once"),
        (lambda tmp, tiny: tiny, "0,1,2,3,4,5,6,7", "cannot drop all 8 decoder layers"),
        (_truncated, "3", "model.safetensors is .*truncated"),
        (_corrupt_header, "3", "model.safetensors is corrupt"),
    ],
    ids=["missing", "not-vlm", "out-of-range", "negative", "repeated", "all-layers", "truncated", "corrupt"],
)
def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, tiny_llava, capsys, make_source, drop, message):
    source = make_source(tmp_path, tiny_llava)
    out = tmp_path / "out"
    assert main(["prune", str(source), "--drop-layers", drop, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert re.search(message, err), err
    assert not out.exists() and _leftovers(tmp_path) == []


def test_output_whose_parent_is_a_file(tmp_path, tiny_llava, capsys):
    (tmp_path / "afile").write_text("x")
    assert main(["prune", str(tiny_llava), "--drop-layers", "3", "-o", str(tmp_path / "afile" / "out")]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err


def test_drop_layers_that_are_not_numbers(tiny_llava, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["prune", str(tiny_llava), "--drop-layers", "3,x", "-o", str(tmp_path / "o")])
    assert exc.value.code == 2 and "comma-separated" in capsys.readouterr().err


def test_failure_half_way_leaves_nothing_behind(tmp_path, tiny_llava, monkeypatch):
    copied = []
    real_copy = safetensors_io._copy_range

    def failing_copy(info, out, on_bytes):
        if len(copied) == 10:
            raise OSError(28, "No space left on device")
        copied.append(info.name)
        real_copy(info, out, on_bytes)

    monkeypatch.setattr(safetensors_io, "_copy_range", failing_copy)
    with pytest.raises(OSError, match="No space left"):
        write_pruned_checkpoint(open_checkpoint(tiny_llava), tmp_path / "out", DROPPED)
    assert len(copied) == 10
    assert list(tmp_path.iterdir()) == []
    # and an existing output given --overwrite survives a failed replacement intact
    shutil.copytree(tiny_llava, tmp_path / "keep")
    with pytest.raises(OSError):
        write_pruned_checkpoint(open_checkpoint(tiny_llava), tmp_path / "keep", DROPPED, overwrite=True)
    assert (tmp_path / "keep" / "model.safetensors").read_bytes() == (tiny_llava / "model.safetensors").read_bytes()
    assert _leftovers(tmp_path) == []
