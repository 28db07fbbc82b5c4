"""`edgetag learn` end to end: a task learned from a handful of clips, run by `edgetag file` and
`edgetag listen` beside the bundled model's own heads, which stay byte-identical."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import DATA, REPO, data_path, make_model

from edgetag.checkpoint import DEFAULT_MODEL, digests, read_spec, save
from edgetag.learn import builtin_negatives, loud, segments

RATE = 16000


def edgetag(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "edgetag", *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def beep_clip(rng, seconds=2.0, at=None, noise=0.01) -> np.ndarray:
    """Quiet noise with a 0.5 s beep near 2 kHz."""
    t = np.arange(int(seconds * RATE)) / RATE
    x = noise * rng.standard_normal(len(t))
    start = int((rng.uniform(0.2, seconds - 0.7) if at is None else at) * RATE)
    x[start : start + RATE // 2] += 0.3 * np.sin(2 * np.pi * rng.uniform(1800, 2200) * t[: RATE // 2])
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def beeps(tmp_path_factory):
    """Five beep clips, five noise clips, the task learned from them onto the bundled model, a
    6 s test clip with a beep at 3.0-3.5 s, and a random nano transformer to learn onto."""
    root = tmp_path_factory.mktemp("learn")
    rng = np.random.default_rng(0)
    for folder in ("beep", "other"):
        (root / folder).mkdir()
    for i in range(5):
        sf.write(root / "beep" / f"{i}.wav", beep_clip(rng), RATE)
        sf.write(root / "other" / f"{i}.wav", (0.05 * rng.standard_normal(2 * RATE)).astype(np.float32), RATE)
    test = 0.05 * np.random.default_rng(5).standard_normal(6 * RATE)
    test[3 * RATE : 3 * RATE + RATE // 2] += 0.3 * np.sin(2 * np.pi * 2000 * np.arange(RATE // 2) / RATE)
    sf.write(root / "test.wav", test.astype(np.float32), RATE)
    run = edgetag("learn", "beep", root / "beep", "--negatives", root / "other", "--into", root / "my.safetensors", "--steps", 80)
    assert run.returncode == 0, run.stderr
    save(root / "nano.safetensors", make_model("nano", {"tags": ["a", "b"]}))  # a transformer base, for its adapters
    return root, run.stdout


def test_learn_reports_what_it_trained(beeps):
    root, stdout = beeps
    lines = stdout.splitlines()
    # 2 s clips: of their 11 windows every 0.1 s, those within 10 dB of the loudest (the beep's)
    assert re.fullmatch(r"beep: beep 5 clips \((\d+) windows\); negatives: 5 clip\(s\)", lines[0]) and 5 * 3 <= int(re.search(r"\((\d+)", lines[0])[1]) <= 5 * 11
    assert lines[1].startswith("trained 513 parameters (a linear probe; 0.1% of the model's 991,807)")  # a mobilenet has no blocks to adapt: a 1-class head on its 512-d embedding
    assert lines[2].startswith("threshold beep ") and ": 5/5 of its clips, 0/5 other clips reach it" in lines[2]
    assert lines[-1] == f"{root / 'my.safetensors'}: written; run it with: edgetag listen --model {root / 'my.safetensors'}"


def test_the_learned_model_keeps_the_bundled_model_whole(beeps):
    root, _ = beeps
    learned, bundled = digests(root / "my.safetensors"), digests(DEFAULT_MODEL)
    assert set(learned) == {"base", "beep"} and learned["base"] == bundled["base"]
    task = read_spec(root / "my.safetensors").tasks["beep"]
    assert (task.adapter, task.layers, task.head.labels) == ("none", 0, ("beep",))
    assert 0.05 <= task.thresholds["beep"] <= 0.99 and task.provenance["stage"] == "learn"


def test_file_and_listen_report_the_new_sound_beside_the_built_in_tags(beeps):
    root, _ = beeps
    model = root / "my.safetensors"
    run = edgetag("file", root / "test.wav", "--model", model, "--json")
    assert run.returncode == 0, run.stderr
    events = [json.loads(line) for line in run.stdout.splitlines()]
    beep = [e for e in events if e.get("task") == "beep"]
    assert len(beep) == 1 and beep[0]["start"] <= 3.0 and beep[0]["end"] >= 3.5  # the one beep, found where it is
    # the base's events are those of the bundled model run alone
    base = edgetag("file", root / "test.wav", "--model", DEFAULT_MODEL, "--json")
    assert [e for e in events if "task" not in e] == [json.loads(line) for line in base.stdout.splitlines()]
    live = edgetag("listen", "--model", model, "--input", root / "test.wav", "--json")
    assert live.returncode == 0, live.stderr
    spotted = [json.loads(line) for line in live.stdout.splitlines() if '"task": "beep"' in line]
    assert [{k: e[k] for k in ("label", "start", "end", "score")} for e in spotted] == [{k: beep[0][k] for k in ("label", "start", "end", "score")}]


def test_on_a_transformer_the_task_gets_conv_adapters_in_its_last_blocks(beeps, tmp_path):
    """--adapter auto on a transformer base: TI-CL's conv adapters in the last 2 blocks, the base
    byte-identical."""
    root, _ = beeps
    run = edgetag("learn", "beep", root / "beep", "--negatives", root / "other", "--model", root / "nano.safetensors", "--into", tmp_path / "my.safetensors", "--steps", 20)
    assert run.returncode == 0, run.stderr
    assert "(conv adapters in the last 2 blocks; " in run.stdout.splitlines()[1]
    task = read_spec(tmp_path / "my.safetensors").tasks["beep"]
    assert (task.adapter, task.adapter_dim, task.layers) == ("conv", 16, 2)
    assert digests(tmp_path / "my.safetensors")["base"] == digests(root / "nano.safetensors")["base"]


def test_learning_adds_to_a_model_that_has_tasks(beeps, tmp_path):
    """A second task goes into the same file; the base and the first task stay as they were."""
    root, _ = beeps
    shutil.copy(root / "my.safetensors", tmp_path / "my.safetensors")
    run = edgetag("learn", "hiss", root / "other", "--into", tmp_path / "my.safetensors", "--steps", 20, "--adapter", "none")
    assert run.returncode == 0, run.stderr
    before, after = digests(root / "my.safetensors"), digests(tmp_path / "my.safetensors")
    assert after["base"] == before["base"] and after["beep"] == before["beep"] and set(after) == {"base", "beep", "hiss"}
    assert read_spec(tmp_path / "my.safetensors").tasks["hiss"].adapter == "none"


def test_an_unreadable_clip_is_named_and_the_rest_still_teach(beeps, tmp_path):
    root, _ = beeps
    shutil.copytree(root / "beep", tmp_path / "beep")
    (tmp_path / "beep" / "broken.wav").write_bytes(b"RIFF not audio")
    run = edgetag("learn", "beep", tmp_path / "beep", "--into", tmp_path / "out.safetensors", "--steps", 5)
    assert run.returncode == 2
    assert f"edgetag: error: {tmp_path / 'beep' / 'broken.wav'}: " in run.stderr and "Traceback" not in run.stderr
    assert read_spec(tmp_path / "out.safetensors").tasks["beep"].provenance["negatives"] == "built-in"


@pytest.mark.parametrize("args, message", [
    (["beep", "FEW", "--into", "OUT"], "edgetag: error: beep: 2 readable clip(s) of 2; edgetag learn needs at least 3 per class"),
    (["beep", "CLIPS", "--into", str(DEFAULT_MODEL)], f"edgetag: error: --into {DEFAULT_MODEL}: is the bundled model; write the task into a file of your own"),
    (["beep", "CLIPS", "--into", "MODEL"], "edgetag: error: beep: MODEL has a task of that name already; choose another"),
    (["tags", "CLIPS", "--into", "OUT"], "edgetag: error: tags: task name 'tags': use letters"),
    (["beep", "CLIPS", "--into", "OUT", "--adapter", "conv"], "edgetag: error: beep: task 'beep': mobilenet blocks have no MLP or attention to put adapters beside"),
    (["beep", "CLIPS", "--into", "OUT", "--model", "NANO", "--layers", "7"], "edgetag: error: beep: task 'beep': adapts 7 blocks of a 4-block encoder"),
    (["beep", "CLIPS", "--into", "MODEL", "--model", str(DEFAULT_MODEL)], "edgetag: error: --into MODEL: exists, so the task is added to it; leave out --model"),
    (["beep", "CLIPS", "--into", "OUT", "--negatives", "/no/such/folder"], "edgetag: error: --negatives: no readable audio in /no/such/folder (/no/such/folder: no such file"),
    (["beep", "CLIPS", "--into", "OUT", "--adapter-dim", "0"], "edgetag: error: --adapter-dim: 0 is not in [1, 1024]"),
])
def test_learn_refuses_bad_input_in_one_line(beeps, tmp_path, args, message):
    root, _ = beeps
    (tmp_path / "few").mkdir()
    for i in range(2):
        shutil.copy(root / "beep" / f"{i}.wav", tmp_path / "few")
    subs = {"FEW": tmp_path / "few", "CLIPS": root / "beep", "OUT": tmp_path / "out.safetensors", "MODEL": root / "my.safetensors", "NANO": root / "nano.safetensors"}
    args = [str(subs.get(a, a)) for a in args]
    message = message.replace("MODEL", str(root / "my.safetensors"))
    run = edgetag("learn", *args)
    assert run.returncode == 2 and run.stderr.strip().startswith(message) and "Traceback" not in run.stderr, run.stderr
    assert not (tmp_path / "out.safetensors").exists()


def test_a_class_is_the_loud_windows_of_its_clips():
    x = np.zeros(3 * RATE, np.float32)
    x[RATE : RATE + RATE // 2] = 0.3
    segs = segments(x, RATE, RATE // 10)
    assert segs.shape == (21, RATE)
    kept = loud(segs)
    assert 0 < len(kept) < len(segs) and all(np.abs(w).max() > 0 for w in kept)
    assert segments(x[:100], RATE, 10).shape == (1, RATE)  # a clip shorter than a window: one, padded


def test_builtin_negatives_are_quiet_or_noise_at_stated_levels():
    negatives = dict(builtin_negatives(RATE, seconds=1.0))
    assert len(negatives) == 9
    for label, x in negatives.items():
        rms = np.sqrt(np.mean(x.astype(np.float64) ** 2))
        level = float(label.split()[-1]) if " " in label else 1e-4
        assert abs(rms - level) / level < 0.05, label


@pytest.mark.slow
def test_learn_from_five_real_clips_per_class(tmp_path):
    """Five ESC-50 clips per class (of the folds other than 4) in a folder per class, with clips
    of other classes as negatives: the model finds held-out clips of the two classes (fold 4), and
    `edgetag listen` reports what `edgetag file` does."""
    import csv

    data_path("esc50_other_folds")
    data_path("esc50")
    classes = ("rooster", "vacuum_cleaner")

    def clips(folder: str, wanted, fold: str | None = None) -> dict[str, list[Path]]:
        out: dict[str, list[Path]] = {}
        with open(DATA / folder / "meta" / "esc50.csv") as f:
            for row in csv.DictReader(f):
                if (fold is None or row["fold"] == fold) and wanted(row["category"]):
                    out.setdefault(row["category"], []).append(DATA / folder / "audio" / row["filename"])
        return out

    train = clips("esc50_other_folds", lambda c: c in classes)
    others = [p for c, ps in sorted(clips("esc50_other_folds", lambda c: c not in classes).items()) for p in ps[:1]][:20]
    for label in classes:
        (tmp_path / "clips" / label).mkdir(parents=True)
        for p in train[label][:5]:
            shutil.copy(p, tmp_path / "clips" / label)
    (tmp_path / "negatives").mkdir()
    for p in others:
        shutil.copy(p, tmp_path / "negatives")
    run = edgetag("learn", "farm", tmp_path / "clips", "--negatives", tmp_path / "negatives", "--into", tmp_path / "farm.safetensors")
    assert run.returncode == 0, run.stderr
    assert read_spec(tmp_path / "farm.safetensors").tasks["farm"].head.labels == tuple(sorted(classes))

    held_out = clips("esc50", lambda c: c in classes, fold="4")
    files = [p for label in classes for p in held_out[label]]
    result = edgetag("file", *files, "--model", tmp_path / "farm.safetensors", "--task", "farm", "--json")
    assert result.returncode == 0, result.stderr
    found = {}
    for e in map(json.loads, result.stdout.splitlines()):
        found.setdefault(e["file"], set()).add(e["label"])
    truth = {str(p): label for label in classes for p in held_out[label]}
    right = sum(label in found.get(f, set()) for f, label in truth.items())
    wrong = sum(len(found.get(f, set()) - {label}) for f, label in truth.items())
    print(f"held-out clips: {right}/{len(truth)} found as their class, {wrong} tagged as the other")
    assert right >= 0.6 * len(truth) and wrong <= 0.25 * len(truth)
    live = edgetag("listen", "--model", tmp_path / "farm.safetensors", "--task", "farm", "--input", files[0], "--json")
    assert live.returncode == 0, live.stderr
    heard = [json.loads(line) for line in live.stdout.splitlines() if '"kind": "tag"' in line]
    filed = [json.loads(line) for line in edgetag("file", files[0], "--model", tmp_path / "farm.safetensors", "--task", "farm", "--json").stdout.splitlines()]
    key = lambda e: (e["label"], e["start"], e["end"], e["score"])  # noqa: E731
    assert sorted(map(key, heard)) == sorted(map(key, filed))


@pytest.mark.slow
def test_fewshot_benchmark_prints_its_figures(beeps, tmp_path):
    """The few-shot benchmark at its smallest: one draw of one and of three clips per class. On the
    bundled MobileNet, edgetag learn's task is a linear probe, so there is no baseline row; on a
    transformer base it learns conv adapters, beside a linear probe."""
    data_path("wake_words")
    data_path("arabic_speech_commands")

    def bench(out, *args):
        run = subprocess.run([sys.executable, "-m", "train.bench_fewshot", "--data", str(DATA), "--seeds", "1", "--steps", "5", "--test-clips", "3",
                              "--out", str(out), *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, run.stderr
        return run.stdout.strip().splitlines()[-2:], json.loads((out / "results.json").read_text()), (out / "results.md").read_text()

    last, results, table = bench(tmp_path / "bundled", "--shots", 1, "--shots", 3)
    assert re.fullmatch(r"fewshot wake_words 1-shot learn \d+\.\d% 3-shot learn \d+\.\d%", last[0])
    assert last[1].startswith("fewshot Arabic_commands 1-shot learn ")
    assert len(results["rows"]) == 2 * 2 and {r["test_clips"] for r in results["rows"]} == {9, 15}
    assert (tmp_path / "bundled" / "fewshot.png").stat().st_size > 0 and "| wake words | 3 | 9 | edgetag learn (a linear probe) |" in table

    last, results, table = bench(tmp_path / "nano", "--shots", 1, "--model", beeps[0] / "nano.safetensors")
    assert re.fullmatch(r"fewshot wake_words 1-shot learn \d+\.\d% probe \d+\.\d%", last[0])
    assert len(results["rows"]) == 2 * 2
    assert "| edgetag learn (conv adapters in the last 2 blocks) |" in table and "| wake words | 3 | 9 | linear probe |" in table
