"""The streaming engine, post-processing and the `file`/`listen` commands: streaming equals
batched file processing for any block size, and live (from a file) equals `file`."""

import csv
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import REPO, make_dataset, make_model, make_spec

from edgetag.checkpoint import save
from edgetag.features import fbank, preset, windows
from edgetag.runtime import load_backend
from edgetag.spec import StreamConfig
from edgetag.stream import Engine, PostConfig, PostProcessor, process_blocks, process_file

HEADS = {"tags": ["a", "b", "c"], "keywords": ["yes", "no", "_unknown_", "_silence_"]}


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    torch.manual_seed(0)
    return save(tmp_path_factory.mktemp("m") / "random.safetensors", make_model("nano", HEADS, stream=(1.0, 0.25)))


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    """A nano model trained in seconds to tell a tone, noise and near-silence apart."""
    from train.augment import AugmentConfig
    from train.finetune import FinetuneConfig, finetune

    root = tmp_path_factory.mktemp("detector")
    data = make_dataset(root / "data", clips=12, seconds=1.0, silence=True)
    finetune(FinetuneConfig(train=[str(data)], out=str(root), size="nano", epochs=20, batch_size=8, lr=3e-3, stream=StreamConfig(0.5, 0.25),
                            val_percent=25, augment=AugmentConfig.off()), device="cpu")
    return root / "best.safetensors"


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """1 s near-silence, 2 s tone, 1 s near-silence, 2 s noise, 1 s near-silence."""
    rng = np.random.default_rng(5)
    quiet = lambda s: 1e-4 * rng.standard_normal(int(s * 16000))  # noqa: E731
    t = np.arange(32000) / 16000
    x = np.concatenate([quiet(1), 0.3 * np.sin(2 * np.pi * 1000 * t), quiet(1), 0.1 * rng.standard_normal(32000), quiet(1)])
    path = tmp_path_factory.mktemp("scene") / "scene.wav"
    sf.write(path, x.astype(np.float32), 16000)
    return path


def test_windows_match_the_offline_windows_exactly(random_model, real_clip):
    from edgetag import audio
    from edgetag.runtime import clip_probabilities

    backend = load_backend(random_model)
    hops = process_file(Engine(backend), real_clip).hops
    feats = fbank(audio.load(real_clip), backend.spec.fbank)
    assert len(hops) == len(windows(feats, backend.spec.window_frames, backend.spec.hop_frames))
    expected = clip_probabilities(backend, [feats])[0]  # what evaluation and distillation see
    for name in HEADS:
        np.testing.assert_allclose(np.stack([h.probabilities[name] for h in hops]), expected[name], atol=1e-5)


def chunks(x: np.ndarray, sizes):
    """`x` cut into consecutive blocks of the given sizes, until it is used up."""
    i = 0
    for n in sizes:
        if i >= len(x):
            return
        yield x[i : i + n]
        i += n


@pytest.mark.parametrize("seed", [0, 1])
def test_results_do_not_depend_on_the_block_size(random_model, seed):
    from edgetag import audio

    x = audio.load(REPO / "edgetag" / "assets" / "example.flac")
    engine = Engine(load_backend(random_model), PostConfig(tag_on=0.4, keyword_on=0.3, smoothing=0.5))
    reference = process_file(engine, REPO / "edgetag" / "assets" / "example.flac")
    rng = np.random.default_rng(seed)
    for sizes in ([1600] * 1000, [int(s) for s in rng.integers(1, 5000, 1000)], [len(x)]):
        got, want = process_blocks(engine, chunks(x, sizes)).events, reference.events
        assert [(e.kind, e.label, e.start, e.end) for e in got] == [(e.kind, e.label, e.start, e.end) for e in want]
        np.testing.assert_allclose([e.score for e in got], [e.score for e in want], atol=1e-5)


def test_replaying_the_hops_gives_the_engines_events(random_model):
    """Calibration replays hop probabilities through the post-processor: the same events as live."""
    engine = Engine(load_backend(random_model), PostConfig(tag_on=0.5, tag_off=0.45, keyword_on=0.0, smoothing=0.5, refractory=0.75))
    result = process_file(engine, REPO / "edgetag" / "assets" / "example.flac")
    probabilities = {name: np.stack([h.probabilities[name] for h in result.hops]) for name in HEADS}
    as_tuples = lambda events: [(e.kind, e.label, e.start, e.end, e.score) for e in events]  # noqa: E731
    assert {e.kind for e in result.events} == {"tag", "keyword"}
    assert as_tuples(engine.post.replay(probabilities)) == as_tuples(result.events)


def test_the_speech_gate_spots_keywords_only_where_the_model_hears_speech(tmp_path):
    """A model's speech gate (ModelSpec.speech_gate): its keywords spot only in hops whose own
    Speech tag reaches it, the same spots calibration's replay makes at that gate; tags are left
    alone, and PostConfig(speech_gate=0) turns the gate off."""
    from dataclasses import replace

    from edgetag.checkpoint import load_model
    from train.calibrate import replay

    torch.manual_seed(1)
    heads = {"tags": ["Speech", "Dog"], "keywords": ["yes", "no", "_unknown_", "_silence_"]}
    ungated_path = save(tmp_path / "ungated.safetensors", make_model("nano", heads, stream=(1.0, 0.25)))
    clip, post = REPO / "edgetag" / "assets" / "example.flac", dict(keyword_on=0.01, refractory=0.0)
    ungated = process_file(Engine(load_backend(ungated_path), PostConfig(**post)), clip)
    speech = np.array([h.probabilities["tags"][0] for h in ungated.hops])
    gate = float(np.median(speech))  # about half the hops pass
    model = load_model(ungated_path)
    model.spec = replace(model.spec, speech_gate=gate)
    gated_path = save(tmp_path / "gated.safetensors", model)
    engine = Engine(load_backend(gated_path), PostConfig(**post))
    gated = process_file(engine, clip)
    spots = lambda r: [(e.label, e.start) for e in r.events if e.kind == "keyword"]  # noqa: E731
    hop_at = {h.start: h for h in ungated.hops}
    assert spots(gated) == [s for s in spots(ungated) if hop_at[s[1]].probabilities["tags"][0] >= gate]
    assert 0 < len(spots(gated)) < len(spots(ungated))
    assert [e for e in gated.events if e.kind == "tag"] == [e for e in ungated.events if e.kind == "tag"]
    for a, b in zip(gated.hops, ungated.hops):  # hops report what the model said, ungated
        np.testing.assert_array_equal(a.probabilities["keywords"], b.probabilities["keywords"])
    stream = {name: np.stack([h.probabilities[name] for h in gated.hops]) for name in heads}
    labels = {label: 0.01 for label in ("yes", "no")}
    replayed = replay(engine.spec, PostConfig(**post), "keywords", labels, [stream], gate)[0]
    assert [(e.label, e.start) for e in replayed] == spots(gated)
    off = process_file(Engine(load_backend(gated_path), PostConfig(**post, speech_gate=0.0)), clip)
    assert spots(off) == spots(ungated)


def test_a_speech_gate_needs_a_speech_tag_and_a_probability():
    from edgetag.spec import ModelSpec, SpecError

    with pytest.raises(SpecError, match="no Speech tag"):
        make_spec(heads=HEADS, speech_gate=0.3)
    with pytest.raises(SpecError, match=r"speech_gate 1.5 is not in \[0, 1\)"):
        make_spec(heads={"tags": ["Speech"], "keywords": ["yes"]}, speech_gate=1.5)
    spec = make_spec(heads={"tags": ["Speech"], "keywords": ["yes", "_unknown_"]}, speech_gate=0.3)
    assert ModelSpec.from_dict(spec.to_dict()) == spec and "speech_gate" not in make_spec(heads=HEADS).to_dict()
    with pytest.raises(ValueError, match="no Speech tag to gate"):
        Engine(load_backend_of(make_spec(heads=HEADS)), PostConfig(speech_gate=0.2))


def load_backend_of(spec):
    from edgetag.model import AudioTransformer
    from edgetag.runtime import TorchBackend

    return TorchBackend(AudioTransformer(spec))


def test_short_input_gets_one_padded_window(random_model):
    engine = Engine(load_backend(random_model))
    assert engine.push(np.zeros(4000, np.float32)) == []
    hops, closing = engine.flush()
    assert len(hops) == 1 and hops[0].start == 0.0 and closing == []


def test_a_tag_still_on_at_the_end_closes_with_the_stream(detector, scene):
    """The scene ends in near-silence: that tag is still on when the audio stops, and flush()
    closes it after every hop's events, on no hop of its own, ending with the audio."""
    result = process_file(Engine(load_backend(detector), PostConfig(min_duration=0.75)), scene)
    last = result.events[-1]
    assert last.label == "silence" and last.start >= 6.0 and last.end <= result.seconds == pytest.approx(7.0)
    assert not any(last in hop.events for hop in result.hops)


def post(thresholds=None, hop=0.5, **kw):
    # 20 ms frames every 10 ms: a 1 s window spans exactly 1 s of audio, and events' ends read plainly
    spec = make_spec(heads={"tags": ["a", "b"], "keywords": ["yes", "_unknown_"]}, fbank=preset("ast", frame_length_ms=20.0), stream=(1.0, hop))
    assert (spec.window_seconds, spec.hop_seconds) == (1.0, hop)
    return PostProcessor(spec, PostConfig(**kw), thresholds)


def feed(p: PostProcessor, tags: list, keywords: list | None = None):
    """The events `update` reported hop by hop, and those `flush` closed at the end."""
    events = []
    for k, t in enumerate(tags):
        events += p.update(k, {"tags": np.array(t, float), "keywords": np.array((keywords or [[0.0, 1.0]] * len(tags))[k], float)})
    return events, p.flush(len(tags) - 1, 100.0)


def test_hysteresis_onset_offset_and_peak():
    events, closing = feed(post(tag_on=0.5, tag_off=0.3), [[0.1, 0], [0.6, 0], [0.4, 0], [0.9, 0], [0.2, 0], [0.0, 0.7]])
    assert [(e.label, e.start, e.end, e.score) for e in events] == [("a", 0.5, 0.5 * 3 + 1.0, 0.9)]
    assert [(e.label, e.start, e.end) for e in closing] == [("b", 2.5, 3.5)]


def test_minimum_duration_and_per_class_thresholds():
    events, closing = feed(post(tag_on=0.5, min_duration=2.0), [[0.6, 0], [0.0, 0], [0.6, 0], [0.6, 0], [0.6, 0], [0.0, 0]])
    assert [(e.start, e.end) for e in events + closing] == [(1.0, 3.0)]  # the one-hop blip (1.0 s long) is dropped
    events, closing = feed(post(tag_on=0.5, thresholds={"tags": {"a": 0.9}}), [[0.8, 0.8], [0.0, 0.0]])
    assert [e.label for e in events + closing] == ["b"]


def test_a_threshold_the_user_sets_overrides_the_calibrated_ones():
    """Left unset, tag_on/keyword_on give way to the model's calibrated thresholds (0.5/0.7 for
    classes without one); set, they apply to every class of their kind, and only of their kind."""
    spec = make_spec(heads={"tags": ["a", "b"], "keywords": ["yes", "_unknown_"]}, thresholds={"tags": {"a": 0.9}, "keywords": {"yes": 0.95}})
    on = lambda **kw: {name: list(v) for name, v in PostProcessor(spec, PostConfig(**kw)).on.items()}  # noqa: E731
    assert on() == {"tags": [0.9, 0.5], "keywords": [0.95, 0.7]}
    assert on(tag_on=0.3) == {"tags": [0.3, 0.3], "keywords": [0.95, 0.7]}
    assert on(keyword_on=0.6) == {"tags": [0.9, 0.5], "keywords": [0.6, 0.6]}


def test_smoothing_averages_hops():
    events, _ = feed(post(tag_on=0.5, smoothing=1.0), [[0.9, 0], [0.0, 0], [0.9, 0], [0.0, 0]])
    assert events == []  # each spike averages with its neighbour to 0.45
    events, closing = feed(post(tag_on=0.5, smoothing=0.0), [[0.9, 0], [0.0, 0]])
    assert len(events + closing) == 1


def test_a_model_smooths_its_own_keywords_only_and_the_user_overrides_it():
    """ModelSpec.keyword_smoothing averages the model's keyword probabilities over its hops (one
    hop of 0.9 between quiet ones: a mean of 0.3 over three, spotted by nobody at 0.5); its tags
    and a task's keywords stay hop by hop; PostConfig.smoothing sets every head's, 0 none."""
    from dataclasses import replace

    from edgetag.spec import HeadConfig

    spec = make_spec(heads={"tags": ["a", "b"], "keywords": ["yes", "_unknown_"]}, fbank=preset("ast", frame_length_ms=20.0), stream=(1.0, 0.5),
                     keyword_smoothing=1.5)
    spike, quiet = [0.9, 0.1], [0.0, 1.0]
    keywords, tags = [quiet, spike, quiet, quiet], [[0, 0], [0.9, 0], [0, 0], [0, 0]]
    spotted = lambda **kw: [(e.kind, e.label) for e in sum(feed(PostProcessor(spec, PostConfig(keyword_on=0.5, tag_on=0.5, **kw)), tags, keywords), [])]  # noqa: E731
    assert spotted() == [("tag", "a")]
    assert spotted(smoothing=0.0) == [("keyword", "yes"), ("tag", "a")]
    assert spotted(smoothing=1.5) == []
    assert PostProcessor(spec, PostConfig()).smooth == {"tags": 1, "keywords": 3}
    assert PostProcessor(spec, PostConfig(smoothing=1.0)).smooth == {"tags": 2, "keywords": 2}
    # a task's keyword head is the task's own: the base's smoothing is not calibrated for it
    task = replace(spec, heads={**spec.heads, "door": HeadConfig("keywords", ("ding", "_unknown_"))})
    assert PostProcessor(task, PostConfig(), tasks=("door",)).smooth == {"tags": 1, "keywords": 3, "door": 1}


def test_keyword_smoothing_is_seconds_saved_with_the_spec_and_only_the_base_s():
    from edgetag.spec import BASE, ModelSpec, SpecError, TaskConfig

    for bad in (-0.1, float("nan"), float("inf"), "long", True):
        with pytest.raises(SpecError, match="keyword_smoothing .* is not a number of seconds >= 0"):
            make_spec(heads=HEADS, keyword_smoothing=bad)
    spec = make_spec(heads=HEADS, keyword_smoothing=0.3)
    assert ModelSpec.from_dict(spec.to_dict()) == spec and "keyword_smoothing" not in make_spec(heads=HEADS).to_dict()
    from dataclasses import replace

    from edgetag.spec import HeadConfig

    spec = replace(spec, tasks={"door": TaskConfig(HeadConfig("tags", ("door",)))})
    assert spec.select((BASE,)).keyword_smoothing == 0.3 and spec.select(("door",)).keyword_smoothing == 0.0


def test_a_tag_that_flickers_while_its_windows_overlap_is_one_event():
    """1 s windows every 0.25 s. Off for one hop, the windows of the two on-hops overlap
    ([0, 1) and [0.5, 1.5)): one event, reported once no later window can reach its audio. Off for
    four hops, [0, 1) and [1.25, 2.25) do not overlap: two events."""
    events, closing = feed(post(tag_on=0.5, tag_off=0.3, hop=0.25), [[0.6, 0], [0.1, 0], [0.7, 0]] + [[0.1, 0]] * 5)
    assert [(e.start, e.end, e.score) for e in events] == [(0.0, 1.5, 0.7)] and closing == []
    events, closing = feed(post(tag_on=0.5, tag_off=0.3, hop=0.25), [[0.6, 0]] + [[0.1, 0]] * 4 + [[0.7, 0], [0.1, 0]])
    assert [(e.start, e.end) for e in events + closing] == [(0.0, 1.0), (1.25, 2.25)]


def test_small_hops_give_one_event_per_activity(detector, scene):
    """At a 0.05 s hop, twenty windows overlap each moment: no two events of one label overlap."""
    run = cli("file", scene, "--model", detector, "--json", "--hop", "0.05", "--tag-on", "0.5")
    rows = [json.loads(line) for line in run.stdout.splitlines()]
    assert run.returncode == 0 and rows
    for label in {r["label"] for r in rows}:
        spans = sorted((r["start"], r["end"]) for r in rows if r["label"] == label)
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:])), (label, spans)


def test_keywords_refractory_and_specials_never_spotted():
    kws = [[0.9, 0.1], [0.95, 0.05], [0.1, 0.9], [0.9, 0.1], [0.0, 1.0], [0.0, 1.0], [0.9, 0.1]]
    events, _ = feed(post(keyword_on=0.8, refractory=1.5), [[0, 0]] * len(kws), kws)
    assert [(e.label, e.start) for e in events] == [("yes", 0.0), ("yes", 1.5), ("yes", 3.0)]
    assert all(e.label != "_unknown_" for e in events)


def test_an_ancestor_tag_folds_into_the_specific_one_it_fires_with():
    """AudioSet's ontology in the head: Animal > Domestic animals, pets > Dog. Animal and Dog on
    together report Dog (with Dog's score); Animal on alone before Dog starts stays an event."""
    from edgetag.spec import HeadConfig

    labels = ["Animal", "Domestic animals, pets", "Dog", "Speech"]
    tags = HeadConfig("tags", labels, {"Dog": ["Domestic animals, pets"], "Domestic animals, pets": ["Animal"]})
    spec = make_spec(heads={"tags": tags}, fbank=preset("ast", frame_length_ms=20.0), stream=(1.0, 0.5))

    def events(hops, **kw):
        p = PostProcessor(spec, PostConfig(tag_on=0.5, tag_off=0.3, **kw))
        return sorted((e.label, e.start, e.score) for e in p.replay({"tags": np.array(hops, float)}))

    together = [[0.9, 0.8, 0.7, 0], [0.9, 0.8, 0.6, 0], [0, 0, 0, 0]]
    assert events(together) == [("Dog", 0.0, 0.7)]
    assert events(together, fold=False) == [("Animal", 0.0, 0.9), ("Dog", 0.0, 0.7), ("Domestic animals, pets", 0.0, 0.8)]
    # Animal was on a hop before Dog: not covered throughout, so it stays
    assert events([[0.9, 0, 0, 0], [0.9, 0, 0.7, 0], [0, 0, 0, 0]]) == [("Animal", 0.0, 0.9), ("Dog", 0.5, 0.7)]
    # Speech is no relative of Dog: folding leaves it alone
    assert ("Speech", 0.0, 0.9) in events([[0, 0, 0.7, 0.9], [0, 0, 0, 0]])


def test_classes_restrict_the_events_and_an_unknown_class_is_refused():
    events, closing = feed(post(tag_on=0.5, keyword_on=0.5, classes=("b",)), [[0.9, 0.9], [0, 0]], [[0.9, 0.1], [0, 1]])
    assert [e.label for e in events + closing] == ["b"]  # neither tag a nor keyword yes
    with pytest.raises(ValueError, match="no class 'c'"):
        post(classes=("c",))


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "edgetag", *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=120, **kw)


def test_file_json_csv_and_a_bad_file_in_the_batch(detector, scene, tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF....WAVEfmt garbage")
    copy = tmp_path / "copy.wav"
    copy.write_bytes(scene.read_bytes())
    run = cli("file", scene, bad, copy, "--model", detector, "--json", "--min-duration", "0.75")
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [f"edgetag: error: {bad}: " + run.stderr.split(f"{bad}: ")[1].strip()]
    rows = [json.loads(line) for line in run.stdout.splitlines()]
    assert rows and all(set(r) == {"file", "kind", "label", "start", "end", "score", "model"} for r in rows)
    per_file = len(rows) // 2
    # both copies processed: the bad file in between did not stop the batch
    assert [{**r, "file": ""} for r in rows[:per_file]] == [{**r, "file": ""} for r in rows[per_file:]]
    tone = [r for r in rows[:per_file] if r["label"] == "tone"]
    assert len(tone) == 1 and abs(tone[0]["start"] - 1.0) <= 0.5 and abs(tone[0]["end"] - 3.0) <= 0.5
    noise = [r for r in rows[:per_file] if r["label"] == "noise"]
    assert len(noise) == 1 and abs(noise[0]["start"] - 4.0) <= 0.5 and abs(noise[0]["end"] - 6.0) <= 0.5
    run = cli("file", scene, "--model", detector, "--csv", "--min-duration", "0.75")
    table = list(csv.DictReader(io.StringIO(run.stdout)))
    assert run.returncode == 0 and [r["label"] for r in table] == [r["label"] for r in rows[:per_file]]


def test_file_folders_globs_table_and_plot(detector, scene, tmp_path):
    run = cli("file", scene.parent, str(scene.parent / "*.wav"), "--model", detector, "--plot", tmp_path / "p.png")
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("scene.wav") == 1 and "tone" in run.stdout  # found twice, processed once
    assert (tmp_path / "p.png").stat().st_size > 10000
    run = cli("file", tmp_path / "*.nothing", "--model", detector)
    assert run.returncode == 2 and "no file matches" in run.stderr


def test_listen_from_a_file_equals_file(detector, scene):
    """The live path (real-time pacing, 100 ms blocks) gives the events `file` gives."""
    live = cli("listen", "--input", scene, "--model", detector, "--json")
    offline = cli("file", scene, "--model", detector, "--json")
    assert live.returncode == 0 and offline.returncode == 0, live.stderr
    lines = [json.loads(line) for line in live.stdout.splitlines()]
    summary = lines.pop()
    assert summary["kind"] == "summary" and summary["seconds"] == pytest.approx(7.0) and summary["hops"] == 27
    assert summary["peak_dbfs"] > -25 and summary["overflows"] == 0
    assert all("time" in r for r in lines)
    strip = lambda rows: [(r["kind"], r["label"], r["start"], r["end"], round(r["score"], 3)) for r in rows]  # noqa: E731
    assert strip(lines) == strip(json.loads(line) for line in offline.stdout.splitlines())


def test_listen_without_a_microphone_says_what_is_missing(detector):
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("PULSE")}
    env["PULSE_SERVER"] = "unix:/nonexistent"
    run = cli("listen", "--model", detector, "--duration", "1", env=env)
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1
    assert "input device" in run.stderr or "libportaudio2" in run.stderr


def test_missing_default_model_is_one_line(tmp_path, monkeypatch):
    """An install without the bundled model (a trimmed package) says to pass --model."""
    from typer.testing import CliRunner

    from edgetag import checkpoint, runtime
    from edgetag.cli import app

    monkeypatch.setattr(checkpoint, "DEFAULT_MODEL", tmp_path / "model.safetensors")
    monkeypatch.setattr(runtime, "DEFAULT_EXPORT", tmp_path / "export")
    result = CliRunner().invoke(app, ["file", str(REPO / "edgetag" / "assets" / "example.flac")])
    assert result.exit_code == 2 and "--model" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_bench_stream_figures_agree_with_each_other(random_model):
    """The printed figures are one measurement: the hop's share is the table's total median over
    the hop, the file's speed is its seconds over its time, and the listen RSS is of a process
    that loaded torch and a model (a figure read from the wrong process would be a few MiB)."""
    import re

    run = cli("bench", "stream", "--model", random_model, "--seconds", "4", "--repeats", "1", "--listen-seconds", "1")
    assert run.returncode == 0, run.stderr
    out = run.stdout
    stages = {m[1]: float(m[2]) for m in re.finditer(r"(fbank increment|encoder|post|total)\s*│\s*([\d.]+) ms", out)}
    assert set(stages) == {"fbank increment", "encoder", "post", "total"} and 0 < stages["encoder"] <= stages["total"]
    share, hop = map(float, re.search(r"a hop costs ([\d.]+)% of its ([\d.]+) s of audio", out).groups())
    assert hop == 0.25 and share == pytest.approx(100 * stages["total"] / 1000 / hop, rel=0.02, abs=0.01)
    for threads in ("1 thread", "2 threads"):
        audio_s, file_s, speed = map(float, re.search(rf"file, {threads}: ([\d.]+) s of audio in ([\d.]+) s = (\d+)x real time", out).groups())
        assert audio_s == 4 and audio_s / (file_s + 0.0005) - 1 <= speed <= audio_s / max(file_s - 0.0005, 1e-9) + 1  # printed to 1 ms and 1x
    rss = float(re.search(r"peak RSS (\d+) MiB", out)[1])
    assert 100 < rss < 4096


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_listen_ctrl_c_or_sigterm_ends_cleanly_with_a_summary(random_model, signame):
    """Ctrl-C, or SIGTERM as systemd and docker send it: the open events flushed, a summary, exit 0."""
    import signal
    import time

    run = subprocess.Popen([sys.executable, "-m", "edgetag", "listen", "--model", str(random_model), "--input", str(REPO / "edgetag" / "assets" / "example.flac"),
                            "--json", "--keyword-on", "0"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           # a runner started in the background ignores SIGINT, and children inherit that
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    first = run.stdout.readline()  # a keyword spot at the first hop: audio is flowing
    time.sleep(0.5)
    run.send_signal(getattr(signal, signame))
    out, err = run.communicate(timeout=30)
    out = first + out
    assert run.returncode == 0, err
    summary = json.loads(out.splitlines()[-1])
    assert summary["kind"] == "summary" and 0 < summary["seconds"] < 7.0


def test_listen_on_audio_that_breaks_mid_stream_is_one_line_and_a_summary(random_model, tmp_path):
    """A file whose audio is corrupt past its header: what was heard is summarised, then one
    error line naming the file, exit 2."""
    broken = tmp_path / "broken.flac"
    broken.write_bytes((REPO / "edgetag" / "assets" / "example.flac").read_bytes()[:30000])
    run = cli("listen", "--model", random_model, "--input", broken, "--json")
    assert run.returncode == 2 and json.loads(run.stdout.splitlines()[-1])["kind"] == "summary"
    assert run.stderr.strip().startswith(f"edgetag: error: {broken}: corrupt or truncated audio") and run.stderr.count("\n") == 1


def test_file_classes_restricts_the_output_and_names_an_unknown_class(detector, scene):
    every = {json.loads(line)["label"] for line in cli("file", scene, "--model", detector, "--json").stdout.splitlines()}
    assert {"tone", "noise"} <= every
    run = cli("file", scene, "--model", detector, "--json", "--classes", "tone")
    assert run.returncode == 0 and {json.loads(line)["label"] for line in run.stdout.splitlines()} == {"tone"}
    run = cli("file", scene, "--model", detector, "--classes", "bell")
    assert run.returncode == 2 and run.stderr.strip() == "edgetag: error: classes: the model has no class 'bell'"


def test_bench_listen_rss_is_listens_own(random_model):
    """The listen RSS figure is of the listen process alone, not the largest child this process
    ever had (the card once said 1707 MiB for every model: an earlier child's peak)."""
    from edgetag.bench import stream_benchmark

    subprocess.run([sys.executable, "-c", "x = b'x' * (900 * 2**20)"], check=True)  # a 900 MiB child first
    r = stream_benchmark(random_model, seconds=2, repeats=1, listen_seconds=1)
    assert 100 < r["listen_peak_rss_mib"] < 800


# ---------------------------------------------------------------------------------------------
# The energy gate


def quiet_then_loud(seconds_quiet: float = 8.0) -> np.ndarray:
    """Room tone at -60 dBFS, then 1 s of a tone at -10 dBFS, then room tone again for 3 s."""
    rng = np.random.default_rng(3)
    tone = lambda s: 10 ** (-60 / 20) * rng.standard_normal(int(s * 16000))  # noqa: E731
    t = np.arange(16000) / 16000
    return np.concatenate([tone(seconds_quiet), 0.3 * np.sin(2 * np.pi * 700 * t), tone(3.0)]).astype(np.float32)


def test_the_gate_skips_room_tone_and_runs_every_window_with_the_sound(random_model):
    from edgetag.stream import GateConfig

    x = quiet_then_loud()
    gate = GateConfig(margin_db=10.0, floor_seconds=5.0, warmup_seconds=2.0)
    hops = process_blocks(Engine(load_backend(random_model), gate=gate), chunks(x, [1600] * 10**4)).hops
    plain = process_blocks(Engine(load_backend(random_model)), chunks(x, [1600] * 10**4)).hops
    assert len(hops) == len(plain) and not any(h.skipped for h in plain)
    for h, p in zip(hops, plain):
        loud = h.start < 9.0 and h.end > 8.0  # the window holds some of the tone
        if loud or h.end <= 2.0:  # the tone, and the warm-up before any floor is known
            assert not h.skipped, (h.start, h.end)
            for head in h.probabilities:
                np.testing.assert_array_equal(h.probabilities[head], p.probabilities[head])
        elif h.start >= 2.5:  # room tone once the floor is known
            assert h.skipped and all(not v.any() for v in h.probabilities.values()), (h.start, h.end)


@pytest.mark.parametrize("seed", [0, 1])
def test_the_gate_decides_the_same_for_any_block_size(random_model, seed):
    from edgetag.stream import GateConfig

    x = quiet_then_loud()
    engine = Engine(load_backend(random_model), PostConfig(tag_on=0.4, keyword_on=0.3), gate=GateConfig(floor_seconds=4.0, warmup_seconds=1.0))
    reference = process_blocks(engine, [x])
    rng = np.random.default_rng(seed)
    for sizes in ([1600] * 10**4, [int(s) for s in rng.integers(1, 5000, 10**4)]):
        got = process_blocks(engine, chunks(x, sizes))
        assert [h.skipped for h in got.hops] == [h.skipped for h in reference.hops] and 0 < sum(h.skipped for h in got.hops) < len(got.hops)
        assert [(e.kind, e.label, e.start, e.end) for e in got.events] == [(e.kind, e.label, e.start, e.end) for e in reference.events]


def test_the_gate_refuses_mfcc_features_and_nonsense_settings(random_model):
    from edgetag.stream import Gate, GateConfig

    with pytest.raises(ValueError, match="MFCC"):
        Gate(GateConfig(), preset("ast", mfcc=True))
    with pytest.raises(ValueError, match="margin_db"):
        GateConfig(margin_db=0.0)


def test_file_and_listen_report_what_the_gate_skipped(random_model, tmp_path):
    path = tmp_path / "quiet.wav"
    sf.write(path, quiet_then_loud(seconds_quiet=6.0), 16000)  # the CLI's gate warms up for 5 s
    run = cli("file", path, "--model", random_model, "--gate", "10", "--json")
    assert run.returncode == 0, run.stderr
    skipped, total = map(int, __import__("re").search(r"the gate skipped (\d+) of (\d+) windows", run.stderr).groups())
    assert 0 < skipped < total
    run = cli("listen", "--input", path, "--model", random_model, "--gate", "10", "--json", "--duration", "12")
    summary = json.loads(run.stdout.splitlines()[-1])
    assert run.returncode == 0 and summary["skipped_hops"] == skipped and summary["hops"] == total
    run = cli("file", path, "--model", random_model, "--gate", "-3")
    assert run.returncode == 2 and run.stderr.strip() == "edgetag: error: --gate: -3.0 is not in [0, 100]"
