"""Nothing lost: every command that writes refuses an output that is its source, lies inside it or contains it, by
whatever path (links, the hub cache, files linked out of the source), and leaves the disk exactly as it was; and a
write killed at any moment leaves the old file (or directory) or the new one, never a part of either."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shortlvlm_vllm import files
from shortlvlm_vllm.cli import main
from shortlvlm_vllm.errors import ShortLVLMError
from shortlvlm_vllm.files import atomic_output_dir, check_apart, check_output_dir, write_atomic

REPO = Path(__file__).resolve().parents[1]


def disk(root: Path) -> dict[str, str]:
    """Every entry under `root` (hidden ones too): a file by the sha256 of its bytes, a link by its target."""
    state = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        if path.is_symlink():
            state[name] = "-> " + os.readlink(path)
        elif path.is_file():
            state[name] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            state[name] = "dir"
    return state


@pytest.fixture
def source(tiny_llava, tmp_path) -> Path:
    """An 8-layer checkpoint at tmp/DIR, with LINK -> DIR beside it."""
    shutil.copytree(tiny_llava, tmp_path / "DIR")
    (tmp_path / "LINK").symlink_to("DIR")
    return tmp_path / "DIR"


def _refused(capsys, argv: list[str], message: str, root: Path) -> None:
    before = disk(root)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert disk(root) == before  # the source's bytes, and nothing written anywhere


def test_the_issue_case_a_link_to_the_output_is_refused(source, tmp_path, capsys):
    """`shortlvlm prune LINK --drop-layers 3 -o DIR --overwrite`, LINK -> DIR, once replaced the source."""
    weights = hashlib.sha256((source / "model.safetensors").read_bytes()).hexdigest()
    _refused(capsys, ["prune", str(tmp_path / "LINK"), "--drop-layers", "3", "-o", str(source), "--overwrite"],
             "is the source", tmp_path)
    assert hashlib.sha256((source / "model.safetensors").read_bytes()).hexdigest() == weights
    assert json.loads((source / "config.json").read_text())["text_config"]["num_hidden_layers"] == 8


RELATIONS = {
    # name: (source argument, output argument, what the error says), relative to tmp/
    "same-path": ("DIR", "DIR", "is the source"),
    "same-path-spelled-otherwise": ("DIR", "LINK/../DIR", "is the source"),
    "output-is-a-link-to-the-source": ("DIR", "LINK", "is the source"),
    "source-is-a-link-to-the-output": ("LINK", "DIR", "is the source"),
    "output-inside": ("DIR", "DIR/pruned", "lies inside the source"),
    "output-inside-through-a-link": ("DIR", "LINK/pruned", "lies inside the source"),
    "output-deep-inside-through-a-link": ("LINK", "DIR/a/b", "lies inside the source"),
    "output-contains": ("DIR", ".", "contains the source"),
    "output-contains-through-a-link": ("LINK", "UP", "contains the source"),
}


@pytest.mark.parametrize("relation", RELATIONS)
def test_prune_refuses_every_relation_and_changes_nothing(source, tmp_path, capsys, relation):
    (tmp_path / "UP").symlink_to(tmp_path)
    src, out, message = RELATIONS[relation]
    _refused(capsys, ["prune", str(tmp_path / src), "--drop-layers", "3", "-o", str(tmp_path / out),
                      "--overwrite"], message, tmp_path)


def test_a_source_whose_files_link_into_the_output_is_refused(source, tmp_path, capsys):
    """Replacing OUT would change what the source's linked weights hold."""
    out = tmp_path / "OUT"
    assert main(["prune", str(source), "--drop-layers", "1", "-o", str(out)]) == 0
    linked = tmp_path / "LINKED"
    linked.mkdir()
    for entry in source.iterdir():
        shutil.copy(entry, linked / entry.name)
    (linked / "model.safetensors").unlink()
    (linked / "model.safetensors").symlink_to(out / "model.safetensors")
    (linked / "config.json").write_text((out / "config.json").read_text())
    _refused(capsys, ["prune", str(linked), "--drop-layers", "2", "-o", str(out), "--overwrite"], "is the source",
             tmp_path)


def test_output_inside_the_hub_cache_is_refused(source, tmp_path, capsys, monkeypatch):
    """A hub download lives in the cache; nothing may be written anywhere in it (other snapshots share its blobs)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--llava-hf--tiny" / "snapshots" / "0123abcd"
    shutil.copytree(source, snapshot)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    _refused(capsys, ["prune", str(snapshot), "--drop-layers", "3", "-o", str(cache / "pruned")],
             f"lies inside the source {cache}", tmp_path)


def test_a_bind_mount_of_the_source_is_refused_by_inode(tmp_path, monkeypatch):
    """Links are resolved; a second mount of the source is the same directory by device and inode."""
    src, mount = tmp_path / "src", tmp_path / "mnt"
    (src / "model").mkdir(parents=True)
    mount.mkdir()
    real_samefile = os.path.samefile
    monkeypatch.setattr(os.path, "samefile", lambda a, b: {Path(a), Path(b)} == {mount, src} or real_samefile(a, b))
    with pytest.raises(ShortLVLMError, match="is the source"):
        check_apart(mount, [src])
    with pytest.raises(ShortLVLMError, match="lies inside the source"):
        check_apart(mount / "out", [src])
    with pytest.raises(ShortLVLMError, match="contains the source"):
        check_apart(mount, [src / "model"])
    check_apart(tmp_path / "elsewhere", [src])


def test_quantize_refuses_before_it_needs_its_environment(source, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SHORTLVLM_QUANT_PYTHON", str(tmp_path / "no-python"))
    for src, out, message in (("LINK", "DIR", "is the source"), ("DIR", "LINK/q", "lies inside the source"),
                              ("LINK", ".", "contains the source")):
        _refused(capsys, ["quantize", str(tmp_path / src), "--method", "rtn", "-o", str(tmp_path / out),
                          "--overwrite"], message, tmp_path)


def test_matrix_refuses_an_output_overlapping_its_model_or_data(source, tmp_path, capsys):
    config = tmp_path / "matrix.yaml"
    config.write_text(f"model: {tmp_path / 'LINK'}\ngrid: {{ratio: [0.25]}}\n")
    for out, message in (("DIR", "is the source"), ("DIR/results", "lies inside the source"),
                         (".", "contains the source")):
        _refused(capsys, ["matrix", str(config), "-o", str(tmp_path / out)], message, tmp_path)
    (tmp_path / "pope").mkdir()
    config.write_text(f"model: {source}\ngrid: {{ratio: [0.25]}}\n"
                      f"benchmark: {{name: pope, data: {tmp_path / 'pope'}}}\n")
    _refused(capsys, ["matrix", str(config), "-o", str(tmp_path / "pope" / "m")], "lies inside the source", tmp_path)


def test_eval_and_bench_never_write_into_the_benchmark_data(tmp_path, capsys):
    data = tmp_path / "pope"
    data.mkdir()
    (data / "test-00000-of-00001.parquet").write_bytes(b"PAR1 not read")
    endpoint = ["--base-url", "http://127.0.0.1:9/v1", "--model", "m"]
    _refused(capsys, ["eval", "pope", *endpoint, "--data", str(data), "-o", str(data / "run")],
             "lies inside the source", tmp_path)
    _refused(capsys, ["eval", "pope", *endpoint, "--data", str(data), "-o", str(tmp_path)], "contains the source",
             tmp_path)
    _refused(capsys, ["bench", *endpoint, "--benchmark", "pope", "--data", str(data), "-o",
                      str(data / "speed.json")], "lies inside the source", tmp_path)


@pytest.mark.parametrize("verb", ["prune", "make-tiny-llava", "train-toy"])
def test_overwrite_replaces_only_an_earlier_output(tmp_path, capsys, verb):
    """--overwrite on a directory of other files (a home directory, a models folder) named by mistake is refused."""
    mine = tmp_path / "models"
    (mine / "other-model").mkdir(parents=True)
    (mine / "notes.txt").write_text("keep me")
    argv = {"prune": ["prune", "toy", "--drop-layers", "3", "-o", str(mine)],
            "make-tiny-llava": ["make-tiny-llava", str(mine)],
            "train-toy": ["train-toy", "-o", str(mine), "--max-steps", "1"]}[verb]
    _refused(capsys, [*argv, "--overwrite"], "is not an earlier output that --overwrite may replace", tmp_path)


def test_overwrite_replaces_an_earlier_checkpoint(source, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["prune", str(source), "--drop-layers", "3", "-o", str(out)]) == 0
    assert main(["prune", str(source), "--drop-layers", "1", "-o", str(out), "--overwrite"]) == 0
    assert json.loads((out / "config.json").read_text())["short_lvlm"]["pruned_layers"] == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["DIR", "LINK", "out"]  # no temporary sibling left


@pytest.mark.parametrize("verb", ["prune", "quantize"])
def test_zero_calibration_samples_say_at_least_one(source, tmp_path, capsys, verb):
    method = ["--ratio", "0.25"] if verb == "prune" else ["--method", "gptq"]
    _refused(capsys, [verb, str(source), *method, "--calib", "synthetic", "--num-samples", "0",
                      "-o", str(tmp_path / "out")], "--num-samples must be at least 1, not 0", tmp_path)


def test_check_output_dir_still_refuses_an_existing_output_and_a_file_parent(tmp_path):
    (tmp_path / "exists").mkdir()
    with pytest.raises(ShortLVLMError, match="already exists"):
        check_output_dir(tmp_path / "exists")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ShortLVLMError, match="is a file, not a directory"):
        check_output_dir(tmp_path / "file" / "out")


# --- writes that outlive a crash ---

def _child(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, stdout=subprocess.PIPE, text=True)


def _kill_when_ready(child: subprocess.Popen) -> None:
    assert child.stdout.readline().strip() == "ready"
    child.send_signal(signal.SIGKILL)
    child.wait()


HANG_AT_FSYNC = """
import os, sys, time
calls = int(sys.argv[1])
real = os.fsync
def fsync(fd):
    global calls
    calls -= 1
    if calls < 0:
        print("ready", flush=True)
        time.sleep(600)
    real(fd)
os.fsync = fsync
"""


def test_write_atomic_killed_at_random_moments_leaves_one_whole_version(tmp_path):
    path = tmp_path / "results.json"
    versions = [bytes([65 + i]) * (8 << 20) for i in range(2)]  # 8 MB each: a kill often lands inside a write
    path.write_bytes(versions[0])
    code = ("import itertools, sys\nfrom shortlvlm_vllm.files import write_atomic\nprint('ready', flush=True)\n"
            "for i in itertools.count():\n    write_atomic(sys.argv[1], bytes([65 + i % 2]) * (8 << 20))\n")
    rng = random.Random(0)
    for _ in range(6):
        child = _child(code, str(path))
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.6))
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert path.read_bytes() in versions
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "results.json"]
    assert all(name.startswith(".results.json.") and name.endswith(".tmp") for name in leftovers)


def test_write_atomic_killed_before_the_rename_keeps_the_old_file_and_mode(tmp_path):
    path = tmp_path / "scores.json"
    path.write_text("old")
    child = _child(HANG_AT_FSYNC + "from shortlvlm_vllm.files import write_atomic\nwrite_atomic(sys.argv[2], 'new')",
                   "0", str(path))
    _kill_when_ready(child)
    assert path.read_text() == "old"
    write_atomic(path, "new")
    assert path.read_text() == "new" and (path.stat().st_mode & 0o777) == (0o666 & ~files._umask())


def test_write_atomic_replaces_a_link_instead_of_writing_through_it(tmp_path):
    (tmp_path / "source.json").write_text("the source")
    (tmp_path / "out.json").symlink_to(tmp_path / "source.json")
    write_atomic(tmp_path / "out.json", "result")
    assert (tmp_path / "source.json").read_text() == "the source"
    assert (tmp_path / "out.json").read_text() == "result" and not (tmp_path / "out.json").is_symlink()


def test_matrix_tables_killed_midway_are_each_the_old_or_the_new(tmp_path):
    """results.json is renamed into place, then the kill lands while results.csv is being written."""
    code = HANG_AT_FSYNC + """
from shortlvlm_vllm.evaluation.matrix import Arm
from shortlvlm_vllm.evaluation.tables import write_tables
from tests.test_matrix import _result
write_tables([_result(Arm(0.0, "-", "-", "none"), sys.argv[3], (100.0,), "16-layers")],
             __import__("pathlib").Path(sys.argv[2]))
"""
    run = subprocess.run([sys.executable, "-c", code, "99", str(tmp_path), "1100"], cwd=REPO, check=True)
    assert run.returncode == 0
    old = {name: (tmp_path / name).read_bytes() for name in ("results.json", "results.csv", "results.md")}
    _kill_when_ready(_child(code, "1", str(tmp_path), "1110"))
    new = json.loads((tmp_path / "results.json").read_text())
    assert new["arms"][0]["accuracy"] == 0.75
    assert (tmp_path / "results.csv").read_bytes() == old["results.csv"]
    assert (tmp_path / "results.md").read_bytes() == old["results.md"]


def test_eval_scores_killed_midway_are_the_old_ones(tmp_path):
    """run.json and the records are written; the kill lands while scores.json is replaced."""
    code = HANG_AT_FSYNC + """
from shortlvlm_vllm.evaluation.client import run_benchmark
from tests.test_client import FAST, FakeServer, YesNo
with FakeServer() as server:
    run_benchmark(server.endpoint, YesNo(int(sys.argv[3])), sys.argv[2], config=FAST)
"""
    subprocess.run([sys.executable, "-c", code, "99", str(tmp_path), "4"], cwd=REPO, check=True)
    old = (tmp_path / "scores.json").read_bytes()
    assert json.loads(old)["items"] == 4
    _kill_when_ready(_child(code, "0", str(tmp_path), "6"))
    assert (tmp_path / "scores.json").read_bytes() == old


HANG_IN_WRITER = """
import sys, time
from shortlvlm_vllm.checkpoint import writer
real = writer.copy_side_files
def copy_side_files(src, dst):
    real(src, dst)
    print("ready", flush=True)
    time.sleep(600)
writer.copy_side_files = copy_side_files
"""


def test_a_checkpoint_replacement_killed_midway_leaves_the_old_checkpoint(source, tmp_path):
    """What prune, quantize, make-tiny-llava and the toy trainer write goes through the one checkpoint writer."""
    out = tmp_path / "out"
    assert main(["make-tiny-llava", str(out), "--layers", "2"]) == 0
    before = disk(out)
    _kill_when_ready(_child(HANG_IN_WRITER + "from shortlvlm_vllm.tiny_models import build_tiny_llava\n"
                            "build_tiny_llava(sys.argv[1], num_layers=3, overwrite=True)", str(out)))
    assert disk(out) == before
    with atomic_output_dir(out, overwrite=True, marker="config.json") as tmp:
        (tmp / "config.json").write_text("{}")
    assert disk(out) == {"config.json": hashlib.sha256(b"{}").hexdigest()}


def test_directories_are_swapped_in_one_step_on_linux(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    swapped = files._exchange(a, b)
    assert swapped is sys.platform.startswith("linux")
    assert ((a / "x").read_text(), (b / "x").read_text()) == (("b", "a") if swapped else ("a", "b"))


def test_without_the_exchange_the_output_is_replaced_by_two_renames(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("old")
    with atomic_output_dir(out, overwrite=True, marker="config.json") as tmp:
        (tmp / "config.json").write_text("new")
    assert (out / "config.json").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["out"]
