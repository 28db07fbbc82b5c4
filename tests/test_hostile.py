"""Hostile and careless input, one catalogue: each row makes its inputs in a tmp folder (copies of
the bundled model and example, then damaged), runs an entry point as a user would, and checks the
outcome: the exit code, one stderr line with the reason (naming the file or option), no
traceback, and every input unchanged by hash; a bad file in a batch leaves the others' results
as they were. Bad audio comes from test_audio.BAD_FILES (where the library's own errors are
checked too). New entry points and options get their rows here."""

import contextlib
import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from typing import NamedTuple

import pytest
from conftest import REPO
from test_audio import BAD_FILES

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


class Case(NamedTuple):
    args: list[str]  # after `python -m`; {clip}: a copy of the example, {tmp}: the case's folder
    code: int
    line: str | tuple[str, ...]  # what the one stderr line holds (each of them)
    setup: Callable | None = None  # makes the case's inputs in {tmp}
    needs: tuple[str, ...] = ()  # modules the case needs (skipped without them)
    goes_on: bool = False  # the batch goes on: {clip}'s events are printed all the same
    stdout: str | None = None  # where stdout goes (/dev/full: a full disk); None: captured


def bad_audio(case: str) -> Case:
    """test_audio.BAD_FILES through `edgetag file`, the bad file first in a batch with the example."""
    make, reason = BAD_FILES[case]
    return Case(["edgetag", "file", "{tmp}/bad.wav", "{clip}", "--json"], 2, ("edgetag: error: {tmp}/bad.wav: ", reason),
                setup=lambda tmp: make(tmp / "bad.wav"), goes_on=True)


def two_songs(tmp):
    """Audio named like images: song.png, song_song.png."""
    import numpy as np
    import soundfile as sf

    for name in ("song.png", "song_song.png"):
        sf.write(tmp / name, np.zeros(8000, np.float32), 16000, format="WAV")


FILE = ["edgetag", "file", "{clip}"]
FILE_EXPORT = [*FILE, "--model", "{tmp}/export"]
FILE_CKPT = [*FILE, "--model", "{tmp}/model.safetensors"]
ERROR = "edgetag: error: "
CASES = {
    # audio
    **{f"audio: {case}": bad_audio(case) for case in BAD_FILES if case != "directory"},
    "audio: a clip shorter than one frame": Case(["edgetag", "file", "{tmp}/short.wav"], 2, ERROR + "{tmp}/short.wav: 6.2 ms of audio, shorter than one 25 ms frame: nothing to tag",
                                                 setup=short_clip),
    # option values: never rounded to the nearest frame, never the model's own instead
    "--hop off the frame grid": Case([*FILE, "--hop", "0.125"], 2, ERROR + "a hop of 0.125 s is not a whole number of 10 ms frames (12.5 of them)"),
    "--hop under a frame": Case([*FILE, "--hop", "0.005"], 2, ERROR + "a hop of 0.005 s is not a whole number of 10 ms frames (0.5 of them)"),
    "--hop 0": Case([*FILE, "--hop", "0"], 2, ERROR + "--hop: 0.0 is not in (0, 60]"),
    "--hop 1e9": Case([*FILE, "--hop", "1e9"], 2, ERROR + "--hop: 1000000000.0 is not in (0, 60]"),
    "listen --block 0": Case(["edgetag", "listen", "--input", "{clip}", "--block", "0"], 2, ERROR + "--block: 0.0 is not in (0, 10]"),
    "listen --duration nan": Case(["edgetag", "listen", "--input", "{clip}", "--duration", "nan"], 2, ERROR + "--duration: nan is not in (0, 1e+09]"),
    "--window inf": Case([*FILE, "--window", "inf"], 2, ERROR + "--window: inf is not in (0, 60]"),
    "--tag-on 2": Case([*FILE, "--tag-on", "2"], 2, ERROR + "--tag-on: 2.0 is not in [0, 1]"),
    "--keyword-on -1": Case([*FILE, "--keyword-on", "-1"], 2, ERROR + "--keyword-on: -1.0 is not in [0, 1]"),
    "--speech-gate 2": Case([*FILE, "--speech-gate", "2"], 2, ERROR + "--speech-gate: 2.0 is not in [0, 1]"),
    "--refractory -1": Case([*FILE, "--refractory", "-1"], 2, ERROR + "--refractory: -1.0 is not in [0, 3600]"),
    "--smoothing nan": Case([*FILE, "--smoothing", "nan"], 2, ERROR + "--smoothing: nan is not in [0, 3600]"),
    "--threads 0": Case([*FILE, "--threads", "0"], 2, ERROR + "--threads: 0 is not in [1, 1024]"),
    "--gate nan": Case([*FILE, "--gate", "nan"], 2, ERROR + "--gate: nan is not in [0, 100]"),
    "--window under a token": Case([*FILE, "--window", "0.05", "--backend", "torch"], 2, ERROR + "a window of 0.05 s makes 3 frames, fewer than one token (16 frames)",
                                   needs=("torch",)),
    "--window on a fixed-length export": Case([*FILE, "--window", "2"], 2, ERROR + "the onnx model takes 1 s windows only (its input length is fixed)"),
    "--classes unknown": Case([*FILE, "--classes", "Doggo"], 2, ERROR + "classes: the model has no class 'Doggo'"),
    "bench --hours 0": Case(["edgetag", "bench", "--hours", "0"], 2, ERROR + "--hours: 0.0 is not in (0, 1000]"),
    "bench --gate-minutes 0.5": Case(["edgetag", "bench", "--gate-minutes", "0.5"], 2, ERROR + "--gate-minutes: 0.5 is not in [1, 600]"),
    "bench --runs 0": Case(["edgetag", "bench", "--runs", "0"], 2, ERROR + "--runs: 0 is not in [1, 100]"),
    "bench --data missing": Case(["edgetag", "bench", "--data", "{tmp}/none"], 2, ERROR + "--data: {tmp}/none: no such folder"),
    # outputs: refused before any work, never over an input or each other
    "--json with --csv": Case([*FILE, "--json", "--csv"], 2, ERROR + "--json and --csv: choose one output format"),
    "--plot over its input": Case(["edgetag", "file", "{tmp}/song.png", "--plot", "{tmp}/song.png"], 2, ERROR + "--plot: {tmp}/song.png is one of the inputs; plot elsewhere",
                                  setup=two_songs, needs=("matplotlib",)),
    "--plot over another input": Case(["edgetag", "file", "{tmp}/song.png", "{tmp}/song_song.png", "--plot", "{tmp}/song.png"], 2,
                                      ERROR + "--plot: {tmp}/song_song.png is one of the inputs; plot elsewhere", setup=two_songs, needs=("matplotlib",)),
    "--plot in no image format": Case([*FILE, "--plot", "{tmp}/plot.flac"], 2, ERROR + "--plot: {tmp}/plot.flac: not an image format matplotlib writes", needs=("matplotlib",)),
    "--plot into a missing folder": Case([*FILE, "--plot", "{tmp}/no/such/plot.png"], 2, ERROR + "--plot: {tmp}/no/such: no such folder", needs=("matplotlib",)),
    "fbank over its input": Case(["edgetag", "fbank", "{clip}", "-o", "{clip}"], 2, ERROR + "{clip}: is the input; write the features elsewhere"),
    "events onto a full disk": Case(["edgetag", "file", "{clip}", "--json"], 2, ERROR + "No space left on device", stdout="/dev/full"),
    # model files
    "manifest not JSON": Case(FILE_EXPORT, 2, ERROR + "{tmp}/export/manifest.json: not valid JSON", setup=manifest(lambda m: "{nope")),
    "manifest a list": Case(FILE_EXPORT, 2, "manifest.json: unsupported export format None", setup=manifest(lambda m: [m])),
    "manifest without its spec": Case(FILE_EXPORT, 2, "its spec does not describe a model (missing 'spec')", setup=manifest(lambda m: edit(m, "spec", drop=True))),
    "spec without fbank": Case(FILE_EXPORT, 2, "its spec does not describe a model (missing 'fbank')", setup=manifest(lambda m: edit(m, "spec.fbank", drop=True))),
    "spec heads not an object": Case(FILE_EXPORT, 2, "its spec does not describe a model", setup=manifest(lambda m: edit(m, "spec.heads", "tags"))),
    "negative window": Case(FILE_EXPORT, 2, "a window of -1 s makes 0 frames", setup=manifest(lambda m: edit(m, "spec.stream", {"window": -1, "hop": 0.5}))),
    "threshold not a number": Case(FILE_EXPORT, 2, "'Dog' is 'high', not a probability", setup=manifest(lambda m: edit(m, "spec.thresholds", {"tags": {"Dog": "high"}}))),
    "file threshold for no class": Case(FILE_EXPORT, 2, "model.int8.onnx: its thresholds in manifest.json do not fit the model",
                                        setup=manifest(lambda m: (m["files"]["model.int8.onnx"].update(thresholds={"tags": {"Unicorn": 0.5}}), m)[1])),
    "manifest without input": Case(FILE_EXPORT, 2, "not an edgetag export manifest (missing 'input')", setup=manifest(lambda m: edit(m, "input", drop=True))),
    "int8 file tampered": Case(FILE_EXPORT, 2, "model.int8.onnx: its sha256 differs from manifest.json's", setup=flip_a_byte),
    "checkpoint header not JSON": Case(FILE_CKPT, 2, "model.safetensors: its config does not describe a model", setup=checkpoint(header=lambda s: "{nope"), needs=("torch",)),
    "checkpoint speech gate not a probability": Case(FILE_CKPT, 2, "speech_gate 1.5 is not in [0, 1)", setup=checkpoint(header=lambda s: edit(s, "speech_gate", 1.5)),
                                                     needs=("torch",)),
    "checkpoint keyword smoothing not seconds": Case(FILE_CKPT, 2, "keyword_smoothing 'long' is not a number of seconds >= 0",
                                                     setup=checkpoint(header=lambda s: edit(s, "keyword_smoothing", "long")), needs=("torch",)),
    "manifest keyword smoothing negative": Case(FILE_EXPORT, 2, "keyword_smoothing -0.3 is not a number of seconds >= 0",
                                                setup=manifest(lambda m: edit(m, "spec.keyword_smoothing", -0.3))),
    "checkpoint header a list": Case(FILE_CKPT, 2, "a spec is a JSON object, not a list", setup=checkpoint(header=lambda s: "[1, 2]"), needs=("torch",)),
    "checkpoint threshold not a number": Case(FILE_CKPT, 2, "'Dog' is 'high', not a probability", setup=checkpoint(header=lambda s: edit(s, "thresholds.tags.Dog", "high")),
                                              needs=("torch",)),
    "checkpoint weights of another width": Case(FILE_CKPT, 2, "weights do not fit the config (size mismatch for encoder.",
                                                setup=checkpoint(header=lambda s: edit(edit(s, "encoder.width", 640), "encoder.width_mult", 0.5)), needs=("torch",)),
    "checkpoint missing a tensor": Case(FILE_CKPT, 2, 'weights do not fit the config (Missing key(s) in state_dict: "heads.tags.fc.bias"',
                                        setup=checkpoint(weights=lambda w: {k: v for k, v in w.items() if k != "heads.tags.fc.bias"}), needs=("torch",)),
    "checkpoint of an encoder without heads": Case(FILE_CKPT, 2, "{tmp}/model.safetensors: no heads to answer with (a pretrained encoder: fine-tune it first",
                                                   setup=checkpoint(header=lambda s: {k: v for k, v in s.items() if k not in ("heads", "thresholds", "calibration", "speech_gate")},
                                                                    weights=lambda w: {k: v for k, v in w.items() if not k.startswith("heads.")}), needs=("torch",)),
    "checkpoint of random bytes": Case(FILE_CKPT, 2, "model.safetensors: not a safetensors file", setup=random_bytes, needs=("torch",)),
    # training commands
    "evaluate report into a missing folder": Case(["train.evaluate", "--data", "{clip}", "--head", "tags", "--json", "{tmp}/no/r.json"], 2,
                                                  "train.evaluate: error: --json: {tmp}/no: no such folder"),
    "evaluate on a folder without a labelled clip": Case(["train.evaluate", "--data", "{tmp}/empty", "--head", "tags"], 2,
                                                         "train.evaluate: error: no readable clip has a label of the 'tags' head",
                                                         setup=lambda tmp: (tmp / "empty").mkdir()),
    "running-audio benchmark on a missing source": Case(["train.running", "--keywords", "{tmp}/none", "--backgrounds", "{tmp}"], 2,
                                                        "train.running: error: {tmp}/none: no such file or folder"),
    "running-audio gate that is not a probability": Case(["train.running", "--keywords", "{tmp}", "--backgrounds", "{tmp}", "--gate", "0.2", "--gate", "1.5"], 2,
                                                         "train.running: error: --gate: 0.2, 1.5 are not all in [0, 1)"),
    "running-audio SNR range upside down": Case(["train.running", "--keywords", "{tmp}", "--backgrounds", "{tmp}", "--snr", "15", "0"], 2,
                                                "train.running: error: --snr: 15 0 is not a range (low <= high)"),
    "running-audio scene of no passes": Case(["train.running", "--keywords", "{tmp}", "--backgrounds", "{tmp}", "--repeat", "0"], 2,
                                             "train.running: error: --repeat: 0 is not a number of passes (1 or more)"),
    "running audio in no arrangement": Case(["train.running", "--keywords", "{tmp}", "--backgrounds", "{tmp}", "--arrangements", "0"], 2,
                                            "train.running: error: --arrangements: 0 is not a number of scenes (1 or more)"),
    "running-audio hop of zero": Case(["train.running", "--keywords", "{tmp}", "--backgrounds", "{tmp}", "--hop", "0"], 2,
                                      "train.running: error: --hop: 0 is not a positive number of seconds"),
    "running-audio hop off the frame grid": Case(["train.running", "--keywords", "{tmp}", "--backgrounds", "{tmp}", "--hop", "0.333"], 2,
                                                 "train.running: error: a hop of 0.333 s is not a whole number of 10 ms frames"),
    "mining at a level that is not a probability": Case(["train.mine", "--model", "{tmp}/model.safetensors", "--out", "{tmp}/mined", "--backgrounds", "{tmp}", "--level", "1"], 2,
                                                        "train.mine: error: --level: 1 is not in (0, 1)", checkpoint()),
    "mining a scene of no passes": Case(["train.mine", "--model", "{tmp}/model.safetensors", "--out", "{tmp}/mined", "--backgrounds", "{tmp}", "--repeat", "0"], 2,
                                        "train.mine: error: --repeat: 0 is not a number of passes (1 or more)", checkpoint()),
    "mining over a missing background": Case(["train.mine", "--model", "{tmp}/model.safetensors", "--out", "{tmp}/mined", "--backgrounds", "{tmp}/none"], 2,
                                             "train.mine: error: {tmp}/none: no such file or folder", checkpoint()),
    "mining at a hop off the frame grid": Case(["train.mine", "--model", "{tmp}/model.safetensors", "--out", "{tmp}/mined", "--backgrounds", "{tmp}", "--hop", "0.333"], 2,
                                               "train.mine: error: a hop of 0.333 s is not a whole number of 10 ms frames", checkpoint()),
    "refit holding its clips to more than all of its answers": Case(["train.refit", "--model", "{tmp}/model.safetensors", "--out", "{tmp}/refit", "--keywords", "{tmp}",
                                                                     "--backgrounds", "{tmp}", "--alpha", "1.5"], 2, "train.refit: error: --alpha: 1.5 is not in [0, 1]", checkpoint()),
    "refit of more layers than the encoder has": Case(["train.refit", "--model", "{tmp}/model.safetensors", "--out", "{tmp}/refit", "--keywords", "{tmp}",
                                                      "--backgrounds", "{tmp}", "--layers", "99"], 2, "train.refit: error: --layers: 99 is more than the", checkpoint()),
    "refit over a missing background": Case(["train.refit", "--model", "{tmp}/model.safetensors", "--out", "{tmp}/refit", "--keywords", "{tmp}", "--backgrounds", "{tmp}/none"], 2,
                                            "train.refit: error: {tmp}/none: no such file or folder", checkpoint()),
    "convert a file as a folder": Case(["train.convert", "--from", "hf-ast", "{clip}", "--out", "{tmp}/x.safetensors"], 2,
                                       "train.convert: error: {clip}: not a save_pretrained folder"),
    "convert EfficientAT weights without their class names": Case(["train.convert", "--from", "efficientat", "{clip}", "--out", "{tmp}/x.safetensors"], 2,
                                                                  "train.convert: error: --from efficientat needs --audioset"),
    "convert audio as EfficientAT weights": Case(["train.convert", "--from", "efficientat", "{clip}", "--audioset", "{tmp}", "--out", "{tmp}/x.safetensors"], 2,
                                                 ("train.convert: error: {clip}: cannot be read with weights_only=True",)),
    "a training command's help onto a full disk": Case(["train.evaluate", "--help"], 2, "train.evaluate: error: No space left on device", stdout="/dev/full"),
}


def digests(folder) -> dict:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", CASES)
def test_hostile_input_is_one_line_and_changes_nothing(case, tmp_path):
    c = CASES[case]
    for module in c.needs:
        pytest.importorskip(module)
    clip = tmp_path / "clip.flac"
    shutil.copy(EXAMPLE, clip)
    if c.setup:
        c.setup(tmp_path)
    fill = lambda s: s.format(tmp=tmp_path, clip=clip)  # noqa: E731
    before = digests(tmp_path)
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(open(c.stdout, "w")) if c.stdout else subprocess.PIPE
        run = subprocess.run([sys.executable, "-m", *map(fill, c.args)], stdout=out, stderr=subprocess.PIPE, text=True, cwd=REPO, timeout=120)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == c.code and "Traceback" not in run.stderr, run.stderr
    assert len(lines) == 1 and all(fill(part) in lines[0] for part in (c.line if isinstance(c.line, tuple) else (c.line,))), run.stderr
    assert digests(tmp_path) == before
    if c.goes_on:
        assert [json.loads(row)["label"] for row in run.stdout.splitlines() if json.loads(row)["kind"] == "keyword"] == ["yes"]
