"""The running-audio keyword benchmark: scenes place words where they say, and spots are
counted against the placements (found, wrong, false alarm) at any threshold."""

import numpy as np
import pytest
import soundfile as sf
from conftest import make_spec, white_noise

from edgetag.stream import PostConfig
from train.calibrate import GRID
from train.data import Example
from train.running import Placed, Scene, best_within, calibrate_spotting, calibrate_threshold, compose, curve, heard, scene_of, score


def test_compose_places_each_word_once_inside_the_background(tmp_path):
    rate = 16000
    beds = []
    for i in range(3):
        sf.write(tmp_path / f"bed{i}.wav", 0.01 * white_noise(10.0, seed=i), rate)
        beds.append(Example(str(tmp_path / f"bed{i}.wav"), ()))
    words = []
    for i, label in enumerate(["yes", "no", "_silence_"]):
        sf.write(tmp_path / f"w{i}.wav", 0.3 * white_noise(1.0, seed=10 + i), rate)
        words.append(Example(str(tmp_path / f"w{i}.wav"), (label,)))
    sf.write(tmp_path / "other.wav", 0.3 * white_noise(1.0, seed=20), rate)
    scene = compose(words, [Example(str(tmp_path / "other.wav"), ())], beds, gap=(1.0, 2.0))
    assert scene.seconds == 30.0
    assert sorted(w.label for w in scene.words) == ["", "no", "yes"]  # _silence_ is no keyword to place
    for w in scene.words:
        assert 0 <= w.start < w.end <= scene.seconds
        loud = scene.audio[int(w.start * rate) : int(w.end * rate)]
        assert np.sqrt(np.mean(loud**2)) > 3 * 0.01  # the word is there, over the bed
    assert all(b.start >= a.end for a, b in zip(scene.words, scene.words[1:]))


def test_arrangements_are_scenes_of_the_same_clips_end_to_end(tmp_path):
    """Each arrangement is the scene its seed composes, its words shifted by the audio before it."""
    rate = 16000
    for i in range(2):
        sf.write(tmp_path / f"bed{i}.wav", 0.01 * white_noise(6.0, seed=i), rate)
    for i, label in enumerate(["yes", "no"]):
        (tmp_path / label).mkdir()
        sf.write(tmp_path / label / f"w{i}.wav", 0.3 * white_noise(1.0, seed=10 + i), rate)
    beds = [str(tmp_path / f"bed{i}.wav") for i in range(2)]
    args = dict(keywords=[f"keywords={tmp_path}"], others=[], backgrounds=beds, seed=3)
    parts = [scene_of(**{**args, "seed": seed}) for seed in (3, 4)]
    scene = scene_of(**args, arrangements=2)
    assert scene.seconds == parts[0].seconds + parts[1].seconds == 24.0
    np.testing.assert_array_equal(scene.audio, np.concatenate([p.audio for p in parts]))
    shifted = [*parts[0].words, *(Placed(w.label, w.start + 12.0, w.end + 12.0, (w.core[0] + 12.0, w.core[1] + 12.0)) for w in parts[1].words)]
    assert scene.words == shifted and len(scene.keywords) == 4
    assert [w.start for w in parts[0].words] != [w.start for w in parts[1].words]  # another arrangement, not a copy


def test_score_counts_found_wrong_and_false_alarms():
    spec = make_spec(heads={"keywords": ["yes", "no", "_unknown_"]}, stream=(1.0, 0.5))
    scene = Scene(np.zeros(16000 * 20, np.float32), [Placed("yes", 2.0, 3.0), Placed("no", 8.0, 9.0), Placed("", 14.0, 15.0)], 16000)
    hops = np.tile([0.0, 0.0, 1.0], (39, 1))
    hops[4] = [0.9, 0.05, 0.05]  # hop 4 (2.0-3.0 s): yes, found
    hops[16] = [0.8, 0.1, 0.1]  # hop 16 (8.0-9.0 s): yes where "no" was said: wrong
    hops[28] = [0.1, 0.85, 0.05]  # hop 28 (14-15 s): "no" over other speech: a false alarm
    r = score(spec, PostConfig(), "keywords", {"keywords": hops}, scene, 0.75)
    assert (r["found"], r["wrong_spots"], r["false_alarms"]) == (1, 1, 1)
    assert r["false_alarms_per_hour"] == 1 / (20 / 3600)
    points = curve(spec, PostConfig(), "keywords", {"keywords": hops}, scene)
    assert calibrate_threshold(points, 0.0)["threshold"] == 0.86  # above 0.85: no false alarm left
    assert calibrate_threshold(points, 1000.0)["threshold"] == 0.30
    per = score(spec, PostConfig(), "keywords", {"keywords": hops}, scene, {"yes": 0.95, "no": 0.5})
    assert (per["found"], per["false_alarms"]) == (0, 1)


def test_heard_counts_keywords_whose_own_label_reaches_the_level_over_them():
    spec = make_spec(heads={"keywords": ["yes", "no", "_unknown_"]}, stream=(1.0, 0.5))
    scene = Scene(np.zeros(16000 * 20, np.float32), [Placed("yes", 2.0, 3.0), Placed("no", 8.0, 9.0), Placed("", 14.0, 15.0)], 16000)
    hops = np.tile([0.0, 0.0, 1.0], (39, 1))
    hops[3] = [0.9, 0.05, 0.05]  # 1.5-2.5 s overlaps "yes"
    hops[16] = [0.6, 0.3, 0.1]  # over "no", but for "yes": "no" is not heard
    hops[28] = [0.1, 0.95, 0.05]  # "no" over other speech counts for no keyword
    assert heard(spec, "keywords", {"keywords": hops}, scene, 0.5) == 0.5
    assert heard(spec, "keywords", {"keywords": hops}, scene, 0.95) == 0.0


def test_compose_sets_each_word_at_its_snr_over_the_bed(tmp_path):
    rate = 16000
    sf.write(tmp_path / "bed.wav", 0.05 * white_noise(20.0, seed=1), rate)
    sf.write(tmp_path / "w.wav", 0.3 * white_noise(1.0, seed=2), rate)
    bed = sf.read(tmp_path / "bed.wav", dtype="float32")[0]
    scene = compose([Example(str(tmp_path / "w.wav"), ("yes",))], [], [Example(str(tmp_path / "bed.wav"), ())], snr_db=(12.0, 12.0))
    (w,) = scene.words
    span = slice(round(w.start * rate), round(w.end * rate))
    word = sf.read(tmp_path / "w.wav", dtype="float32")[0]
    residue = scene.audio[span] - word  # the bed as mixed under the word
    assert 10 * np.log10(np.mean(word.astype(np.float64) ** 2) / np.mean(residue.astype(np.float64) ** 2)) == pytest.approx(12.0, abs=0.05)
    assert np.corrcoef(residue, bed[span])[0, 1] > 0.99


def test_the_speech_gate_is_chosen_with_the_threshold_and_only_when_it_spots_more():
    """A false alarm over background (its Speech tag low) holds the ungated threshold above a
    real "no"; gating on Speech at 0.5 removes it and both keywords are found within the target.
    A gate that also silences the "no" (0.8) spots no more than none, so none is kept."""
    spec = make_spec(heads={"tags": ["Speech"], "keywords": ["yes", "no", "_unknown_"]}, stream=(1.0, 0.5))
    scene = Scene(np.zeros(16000 * 20, np.float32), [Placed("yes", 2.0, 3.0), Placed("no", 8.0, 9.0)], 16000)
    keywords, speech = np.tile([0.0, 0.0, 1.0], (39, 1)), np.zeros((39, 1))
    keywords[4], speech[4] = [0.9, 0.05, 0.05], 0.9  # "yes", clearly speech
    keywords[16], speech[16] = [0.1, 0.8, 0.1], 0.7  # "no"
    keywords[28], speech[28] = [0.05, 0.85, 0.1], 0.1  # "no" over background alone: a false alarm
    probabilities = {"tags": speech, "keywords": keywords}
    assert (score(spec, PostConfig(), "keywords", probabilities, scene, 0.5)["false_alarms"],
            score(spec, PostConfig(), "keywords", probabilities, scene, 0.5, speech_gate=0.5)["false_alarms"]) == (1, 0)
    (gate, _), chosen, curves = calibrate_spotting(spec, PostConfig(), "keywords", probabilities, scene, [0.0, 0.5, 0.8], 0.0)
    assert (gate, chosen["threshold"], chosen["found"]) == (0.5, 0.30, 2) and set(curves) == {(0.0, 0.0), (0.5, 0.0), (0.8, 0.0)}
    assert calibrate_threshold(curves[0.0, 0.0], 0.0)["found"] == 1  # ungated: 0.86, above the "no"
    (gate, _), chosen, _ = calibrate_spotting(spec, PostConfig(), "keywords", probabilities, scene, [0.8, 0.0], 0.0)
    assert (gate, chosen["found"]) == (0.0, 1)
    # where no gate keeps the target, the one closest to it: two false alarms at every
    # threshold ungated, one gated, so the gate wins though neither spots a keyword at the top
    keywords[34], speech[34] = [1.0, 0.0, 0.0], 0.8  # "yes" in speech that holds none: an alarm at any gate
    keywords[28] = [1.0, 0.0, 0.0]
    (gate, _), chosen, _ = calibrate_spotting(spec, PostConfig(), "keywords", probabilities, scene, [0.0, 0.5], 0.0)
    assert (gate, chosen["threshold"], chosen["false_alarms"], chosen["found"]) == (0.5, GRID[-1], 1, 0)


def test_keyword_smoothing_is_chosen_with_the_threshold_and_only_when_it_spots_more():
    """Words that hold 0.6 for three hops in a row and a false alarm of one hop at 0.95: hop by
    hop, every threshold that finds a word also spots the alarm. The mean of two hops (0.5 s at
    0.25 s hops) keeps the words at 0.6 and brings the alarm to 0.475, so both words are found
    with no alarm; three hops do as well, and the shorter span is kept."""
    spec = make_spec(heads={"keywords": ["yes", "no", "_unknown_"]}, stream=(1.0, 0.25))
    scene = Scene(np.zeros(16000 * 20, np.float32), [Placed("yes", 2.0, 3.0), Placed("no", 8.0, 9.0)], 16000)
    keywords = np.tile([0.0, 0.0, 1.0], (77, 1))
    keywords[8:11], keywords[32:35], keywords[60] = [0.6, 0.0, 0.4], [0.0, 0.6, 0.4], [0.95, 0.0, 0.05]
    probabilities = {"keywords": keywords}
    (gate, smoothing), chosen, curves = calibrate_spotting(spec, PostConfig(), "keywords", probabilities, scene, [0.0], 0.0, [0.0, 0.5, 0.75])
    assert calibrate_threshold(curves[0.0, 0.0], 0.0)["found"] == 0  # hop by hop the alarm's 0.95 tops the words' 0.6
    assert (gate, smoothing, chosen["found"], chosen["false_alarms"]) == (0.0, 0.5, 2, 0)
    assert calibrate_threshold(curves[0.0, 0.75], 0.0)["found"] == 2  # as many, with more smoothing: not chosen


@pytest.mark.parametrize("hop, smoothing, gate, refractory", [(0.25, 0.0, 0.0, 1.0), (0.1, 0.3, 0.4, 1.0), (0.1, 0.5, 0.0, 0.0)])
def test_a_curve_is_the_replay_at_every_threshold(hop, smoothing, gate, refractory):
    """`curve` sweeps the smoothed hops once; each of its points is what the post-processor's
    hop-by-hop replay (the engine's) spots at that threshold, gate and smoothing."""
    rng = np.random.default_rng(3)
    spec = make_spec(heads={"tags": ["Speech"], "keywords": ["yes", "no", "_unknown_", "_silence_"]}, stream=(1.0, hop), keyword_smoothing=smoothing)
    hops = round(60 / hop)
    scene = Scene(np.zeros(16000 * 61, np.float32), [Placed(label, t, t + 1.0) for t, label in zip(range(2, 58, 4), ["yes", "no"] * 7)], 16000)
    logits = rng.normal(0, 3, (hops, 4)).astype(np.float32)
    keywords = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    probabilities = {"tags": rng.random((hops, 1), np.float32), "keywords": keywords}
    post = PostConfig(refractory=refractory)
    points = curve(spec, post, "keywords", probabilities, scene, gate)
    replayed = [{"threshold": float(t), **score(spec, post, "keywords", probabilities, scene, float(t), gate)} for t in GRID]
    assert points == replayed and len({p["false_alarms"] for p in points}) > 5  # thresholds that change the answer


def test_best_within_takes_the_most_keywords_inside_the_false_alarm_budget():
    points = [{"threshold": t, "recall": r, "false_alarms_per_hour": f} for t, r, f in ((0.5, 0.9, 9.0), (0.6, 0.5, 3.0), (0.7, 0.5, 1.0), (0.8, 0.2, 0.0))]
    assert best_within(points, 4.0)["threshold"] == 0.6  # 0.7 finds no more: the lower threshold
    assert best_within(points, 0.0)["threshold"] == 0.8 and best_within(points[:1], 4.0) is None
