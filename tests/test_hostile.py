"""Hostile and careless input, one catalogue: each row makes its inputs in a tmp folder (copies of
the bundled model and example, then damaged), runs an entry point as a user would, and checks the
outcome: the exit code, one stderr line with the reason (naming the file or option), no
traceback, and every input unchanged by hash. Bad audio files have their own table
(test_audio.BAD_FILES), bad option values theirs (test_cli); this one holds model files, outputs
and the training commands, and grows with new entry points."""

import hashlib
import json
import shutil
import subprocess
import sys

import pytest
from conftest import REPO

from edgetag.checkpoint import DEFAULT_EXPORT, DEFAULT_MODEL, METADATA_KEY

EXAMPLE = REPO / "edgetag" / "assets" / "example.flac"


def manifest(change):
    """An export whose manifest.json is the bundled one after `change(manifest) -> manifest | str`."""
    def make(tmp):
        shutil.copytree(DEFAULT_EXPORT, tmp / "export")
        path = tmp / "export" / "manifest.json"
        new = change(json.loads(path.read_text()))
        path.write_text(new if isinstance(new, str) else json.dumps(new))
    return make


def checkpoint(header=None, weights=None):
    """The bundled checkpoint with its header replaced (`header(spec dict) -> dict | str`) and/or
    its weights changed (`weights(dict) -> dict`), written with safetensors' numpy API."""
    def make(tmp):
        from safetensors import safe_open
        from safetensors.numpy import load_file, save_file

        with safe_open(str(DEFAULT_MODEL), "np") as f:
            spec = json.loads(f.metadata()[METADATA_KEY])
        tensors = load_file(str(DEFAULT_MODEL))
        new = header(spec) if header else spec
        save_file(weights(tensors) if weights else tensors, str(tmp / "model.safetensors"),
                  metadata={METADATA_KEY: new if isinstance(new, str) else json.dumps(new)})
    return make


def edit(d: dict, path: str, value=None, drop: bool = False) -> dict:
    *parents, key = path.split(".")
    node = d
    for p in parents:
        node = node[p]
    node.pop(key) if drop else node.__setitem__(key, value)
    return d


def flip_a_byte(tmp):
    shutil.copytree(DEFAULT_EXPORT, tmp / "export")
    data = bytearray((tmp / "export" / "model.int8.onnx").read_bytes())
    data[len(data) // 2] ^= 1
    (tmp / "export" / "model.int8.onnx").write_bytes(bytes(data))


def short_clip(tmp):
    import numpy as np
    import soundfile as sf

    sf.write(tmp / "short.wav", np.zeros(100, np.float32), 16000)


def random_bytes(tmp):
    (tmp / "model.safetensors").write_bytes(bytes(range(256)) * 64)


FILE_EXPORT = [sys.executable, "-m", "edgetag", "file", "{clip}", "--model", "{tmp}/export"]
FILE_CKPT = [sys.executable, "-m", "edgetag", "file", "{clip}", "--model", "{tmp}/model.safetensors"]
CASES = {
    # id: (command, setup, exit code, what the one stderr line holds)
    "manifest not JSON": (FILE_EXPORT, manifest(lambda m: "{nope"), 2, "{tmp}/export/manifest.json: not valid JSON"),
    "manifest a list": (FILE_EXPORT, manifest(lambda m: [m]), 2, "manifest.json: unsupported export format None"),
    "manifest without its spec": (FILE_EXPORT, manifest(lambda m: edit(m, "config", drop=True)), 2, "its spec does not describe a model (missing 'config')"),
    "spec without fbank": (FILE_EXPORT, manifest(lambda m: edit(m, "config.fbank", drop=True)), 2, "its spec does not describe a model (missing 'fbank')"),
    "spec heads not an object": (FILE_EXPORT, manifest(lambda m: edit(m, "config.heads", "tags")), 2, "its spec does not describe a model"),
    "negative window": (FILE_EXPORT, manifest(lambda m: edit(m, "config.stream", {"window": -1, "hop": 0.5})), 2, "a window of -1 s makes 0 frames"),
    "threshold not a number": (FILE_EXPORT, manifest(lambda m: edit(m, "config.thresholds", {"Dog": "high"})), 2, "'Dog' is 'high', not a probability"),
    "file threshold for no class": (FILE_EXPORT, manifest(lambda m: (m["files"]["model.int8.onnx"].update(thresholds={"tags": {"Unicorn": 0.5}}), m)[1]), 2,
                                    "model.int8.onnx: its thresholds in manifest.json do not fit the model"),
    "manifest without input": (FILE_EXPORT, manifest(lambda m: edit(m, "input", drop=True)), 2, "not an edgetag export manifest (missing 'input')"),
    "int8 file tampered": (FILE_EXPORT, flip_a_byte, 2, "model.int8.onnx: its sha256 differs from manifest.json's"),
    "checkpoint header not JSON": (FILE_CKPT, checkpoint(header=lambda s: "{nope"), 2, "model.safetensors: its config does not describe a model"),
    "checkpoint header a list": (FILE_CKPT, checkpoint(header=lambda s: "[1, 2]"), 2, "a spec is a JSON object, not a list"),
    "checkpoint threshold not a number": (FILE_CKPT, checkpoint(header=lambda s: edit(s, "thresholds.Dog", "high")), 2, "'Dog' is 'high', not a probability"),
    "checkpoint weights of another width": (FILE_CKPT, checkpoint(header=lambda s: edit(s, "encoder.width", 64)), 2,
                                            "weights do not fit the config (size mismatch for encoder."),
    "checkpoint missing a tensor": (FILE_CKPT, checkpoint(weights=lambda w: {k: v for k, v in w.items() if k != "heads.tags.fc.bias"}), 2,
                                    'weights do not fit the config (Missing key(s) in state_dict: "heads.tags.fc.bias"'),
    "checkpoint of random bytes": (FILE_CKPT, random_bytes, 2, "model.safetensors: not a safetensors file"),
    "a clip shorter than one frame": ([sys.executable, "-m", "edgetag", "file", "{tmp}/short.wav"], short_clip, 2,
                                      "{tmp}/short.wav: 6.2 ms of audio, shorter than one 25 ms frame: nothing to tag"),
    "events onto a full disk": (["sh", "-c", sys.executable + " -m edgetag file {clip} --json > /dev/full"], None, 2, "edgetag: error: No space left on device"),
    "a training command's help onto a full disk": (["sh", "-c", sys.executable + " -m train.evaluate --help > /dev/full"], None, 2,
                                                   "train.evaluate: error: No space left on device"),
    "evaluate report into a missing folder": ([sys.executable, "-m", "train.evaluate", "--data", "{clip}", "--head", "tags", "--json", "{tmp}/no/r.json"],
                                              None, 2, "train.evaluate: error: --json: {tmp}/no: no such folder"),
    "convert a file as a folder": ([sys.executable, "-m", "train.convert", "--from", "hf-ast", "{clip}", "--out", "{tmp}/x.safetensors"], None, 2,
                                   "train.convert: error: {clip}: not a save_pretrained folder"),
}


def digests(folder) -> dict:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", CASES)
def test_hostile_input_is_one_line_and_changes_nothing(case, tmp_path):
    command, setup, code, reason = CASES[case]
    clip = tmp_path / "clip.flac"
    shutil.copy(EXAMPLE, clip)
    if setup:
        setup(tmp_path)
    if command is FILE_CKPT:
        pytest.importorskip("torch", reason="checkpoints run through the torch backend")
    fill = lambda s: s.format(tmp=tmp_path, clip=clip)  # noqa: E731
    before = digests(tmp_path)
    run = subprocess.run(list(map(fill, command)), capture_output=True, text=True, cwd=REPO, timeout=120)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == code and "Traceback" not in run.stderr, run.stderr
    assert len(lines) == 1 and fill(reason) in lines[0], run.stderr
    assert digests(tmp_path) == before
