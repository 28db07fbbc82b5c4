"""Hard-negative mining: the windows a model spots a keyword in, where none was said, come out as
clips that give the model the same answer, labelled by what the window holds."""

import csv

import numpy as np
import pytest
import soundfile as sf
from conftest import white_noise

from edgetag import audio, checkpoint
from edgetag.features import fbank
from edgetag.runtime import load_backend
from edgetag.spec import KEYWORDS
from edgetag.stream import Engine
from train.data import Example, Source
from train.mine import mine, runs_over
from train.running import Placed, Scene, compose


def test_runs_over_finds_every_stretch_at_the_level():
    score = np.array([0.9, 0.1, 0.5, 0.7, 0.2, 0.2, 0.6])
    assert runs_over(score, 0.5) == [(0, 1), (2, 4), (6, 7)]
    assert runs_over(score, 0.95) == []
    assert runs_over(np.zeros(0), 0.5) == []


def test_mined_windows_are_the_false_alarms_as_the_model_heard_them(tmp_path):
    """The bundled model spots "yes" in its example; placed in a scene as speech that holds no
    keyword, the window it was surest in comes out as a clip labelled `_unknown_`, and that clip
    alone gives the model the score the stream gave it."""
    rate = 16000
    example = audio.load(checkpoint.DEFAULT_MODEL.parent / "example.flac", rate)
    sf.write(tmp_path / "yes.wav", example[round(4.8 * rate) : round(6.8 * rate)], rate)  # the word, not the dog
    sf.write(tmp_path / "bed.wav", 0.003 * white_noise(40.0, seed=1), rate)
    scene = compose([], [Example(str(tmp_path / "yes.wav"), ())], [Example(str(tmp_path / "bed.wav"), ())], snr_db=(20.0, 20.0), gap=(10.0, 10.0))
    (word,) = scene.words
    backend = load_backend(checkpoint.DEFAULT_MODEL)
    found = mine(Engine(backend), scene, 0.5, tmp_path / "mined")
    with open(tmp_path / "mined" / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert found["clips"] == len(rows) >= 1 and found["over_words"] == sum(r["label"] == "_unknown_" for r in rows) >= 1
    spec = backend.spec
    spotted = np.array(spec.heads[spec.head_of(KEYWORDS)].spotted)
    for r in rows:
        start = float(r["start_s"])
        over_word = start < word.end and start + spec.window_seconds > word.start
        assert r["label"] == ("_unknown_" if over_word else "_silence_")
        clip = audio.load(tmp_path / "mined" / r["path"], rate)
        assert len(clip) == spec.window_samples == 15920  # one 1 s window's frames span 0.995 s
        np.testing.assert_allclose(clip, scene.audio[round(start * rate) :][: len(clip)], atol=1 / 2**15)  # 16-bit FLAC
        heard = backend(fbank(clip, spec.fbank)[None])[spec.head_of(KEYWORDS)][0, spotted].max()
        assert heard >= 0.5 and heard == pytest.approx(float(r["score"]), abs=0.02)
    # a source a student can train on: the keyword head's no-keyword labels
    examples = Source.parse(f"keywords={tmp_path / 'mined'}").read()
    assert sorted(e.labels[0] for e in examples) == sorted(r["label"] for r in rows)


def test_a_scene_with_keywords_is_refused(tmp_path):
    scene = Scene(np.zeros(16000 * 5, np.float32), [Placed("yes", 1.0, 2.0)], 16000)
    with pytest.raises(ValueError, match="holds keywords"):
        mine(Engine(load_backend(checkpoint.DEFAULT_MODEL)), scene, 0.5, tmp_path / "mined")
