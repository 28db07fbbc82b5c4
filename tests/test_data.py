"""Labelled dataset readers, splits, label names, feature loading, augmentation and metrics."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import DATA, REPO, data_path, sine_sweep, white_noise

from edgetag.features import LOG_FLOOR, fbank, preset, windows
from train import metrics
from train.augment import AugmentConfig, add_noise, augment, gain, mean_power, mixup, spec_augment, time_shift
from train.data import Example, Source, in_validation, labels_of, load_features, read_audioset, read_speech_commands, split_examples
from train.labels import AUDIOSET_NAMES, KEYWORD_LABELS, tag_name


def read(text: str, head: str | None = None) -> list[Example]:
    return Source.parse(text, head).read()


def write(path: Path, seconds: float = 0.5, rate: int = 16000, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, white_noise(seconds, rate, seed), rate)
    return path


# ---------------------------------------------------------------------------------------------
# Readers


def test_manifest_csv_and_jsonl_with_labels_and_times(tmp_path):
    write(tmp_path / "a.wav")
    write(tmp_path / "sub" / "b.flac")
    (tmp_path / "m.csv").write_text("path,labels,start,end,speaker\na.wav,dog;bark,0.1,0.4,s1\nsub/b.flac,cat,,,s2\n")
    (tmp_path / "m.jsonl").write_text(json.dumps({"path": "a.wav", "label": "dog"}) + "\n\n" + json.dumps({"path": "sub/b.flac", "label": "cat"}) + "\n")
    rows = read(f"manifest:{tmp_path / 'm.csv'}", "keywords")
    assert rows[0].labels == ("dog", "bark") and rows[0].start == 0.1 and rows[0].end == 0.4 and rows[0].group == "s1"
    assert Path(rows[1].path) == tmp_path / "sub" / "b.flac" and rows[1].start is None
    assert [e.labels for e in read(str(tmp_path / "m.jsonl"))] == [("Dog",), ("Cat",)]  # tag heads: AudioSet names


def test_manifest_without_labels_is_an_error(tmp_path):
    write(tmp_path / "a.wav")
    (tmp_path / "m.csv").write_text("path\na.wav\n")
    with pytest.raises(ValueError, match="neither 'label' nor 'labels'"):
        read(str(tmp_path / "m.csv"))


def test_folder_tree_and_missing_path(tmp_path):
    for label in ("dog", "rain_drops"):
        write(tmp_path / label / "deep" / "x.wav")
    examples = read(str(tmp_path))
    assert sorted(e.labels for e in examples) == [("Dog",), ("rain drops",)]
    with pytest.raises(FileNotFoundError, match="nope"):
        read(str(tmp_path / "nope"))


def test_esc50_layout_and_folds(tmp_path):
    rows = [("1-100-A-0.wav", "1", "dog", "100"), ("4-200-A-10.wav", "4", "rain", "200"), ("4-200-B-10.wav", "4", "rain", "200")]
    (tmp_path / "meta").mkdir()
    with open(tmp_path / "meta" / "esc50.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "fold", "target", "category", "esc10", "src_file", "take"])
        for name, fold, category, src in rows:
            write(tmp_path / "audio" / name)
            w.writerow([name, fold, 0, category, "True", src, "A"])
    all_examples = read(str(tmp_path))
    assert [e.labels[0] for e in all_examples] == ["Dog", "Rain", "Rain"]
    fold4 = read(f"esc50:{tmp_path},folds=4")
    assert len(fold4) == 2 and {e.group for e in fold4} == {"200"}
    # clips of one source recording stay on one side of a hash split
    train, val = split_examples(all_examples, 50)
    assert not {e.group for e in train} & {e.group for e in val}


def test_speech_commands_folder_layout_with_and_without_lists(tmp_path):
    for word, speaker in (("yes", "aaa"), ("yes", "bbb"), ("cat", "aaa"), ("_silence_", "n1"), ("_background_noise_", "x")):
        write(tmp_path / word / f"{speaker}_nohash_0.wav")
    examples = read_speech_commands(tmp_path)
    assert sorted(e.labels[0] for e in examples) == ["_silence_", "_unknown_", "yes", "yes"]  # background noise left out
    assert all(e.split == "" for e in examples)
    (tmp_path / "validation_list.txt").write_text("yes/bbb_nohash_0.wav\n")
    (tmp_path / "testing_list.txt").write_text("cat/aaa_nohash_0.wav\n")
    train, val = split_examples(read(str(tmp_path), "keywords"))
    assert [Path(e.path).parent.name for e in val] == ["yes"] and len(train) == 2  # the test clip is in neither


def test_audioset_segments_with_local_audio(tmp_path):
    (tmp_path / "class_labels_indices.csv").write_text('index,mid,display_name\n0,/m/09x0r,"Speech"\n1,/m/0bt9lr,"Dog"\n')
    write(tmp_path / "audio" / "Yabcdefghijk.wav", seconds=1.0)
    write(tmp_path / "audio" / "zyxwvutsrqp_30.000.wav", seconds=1.0, seed=1)
    (tmp_path / "seg.csv").write_text(
        "# Segments csv created Sun Mar  5 10:54:31 2017\n# YTID, start_seconds, end_seconds, positive_labels\n"
        'abcdefghijk, 30.000, 40.000, "/m/09x0r,/m/0bt9lr"\nzyxwvutsrqp, 30.000, 31.000, "/m/0bt9lr"\nmissing0000, 0.000, 10.000, "/m/09x0r"\n'
    )
    with pytest.warns(UserWarning, match="1 segment"):
        examples = read_audioset(tmp_path / "seg.csv")
    assert [e.labels for e in examples] == [("Speech", "Dog"), ("Dog",)]
    assert examples[0].start is None  # a file holding only its segment is read from its start
    assert read(str(tmp_path / "seg.csv"))[1].labels == ("Dog",)  # detected from the header


def test_fsdd_recordings_without_manifest(tmp_path):
    write(tmp_path / "recordings" / "3_jackson_7.wav", rate=8000)
    assert read(f"fsdd:{tmp_path}", "keywords") == [Example(str(tmp_path / "recordings" / "3_jackson_7.wav"), ("3",), group="jackson")]


def test_split_option_gives_disjoint_sides_of_one_source(tmp_path):
    for label in ("a", "b"):
        for i in range(20):
            write(tmp_path / label / f"{label}{i}.wav", seconds=0.1)
    train = read(f"{tmp_path},split=train,percent=30")
    val = read(f"{tmp_path},split=val,percent=30")
    assert len(train) + len(val) == 40 and val and not {e.path for e in train} & {e.path for e in val}
    with pytest.raises(ValueError, match="split must be"):
        read(f"{tmp_path},split=test")


def test_groups_option_cuts_a_third_part_beside_the_split(tmp_path):
    """calibrate on one part, train on another, measure on the rest: no clip in two of them."""
    for i in range(60):
        write(tmp_path / "a" / f"speaker{i}.wav", seconds=0.1)
    val, train = read(f"{tmp_path},split=val,percent=50"), read(f"{tmp_path},split=train,percent=50")
    assert {e.path for e in read(f"{tmp_path},groups=0-50")} == {e.path for e in val}
    middle, rest = read(f"{tmp_path},groups=50-70"), read(f"{tmp_path},groups=70-100")
    assert middle and rest and sorted(e.path for e in middle + rest) == sorted(e.path for e in train)
    with pytest.raises(ValueError, match="groups must be LO-HI"):
        read(f"{tmp_path},groups=half")


def test_label_option_relabels_the_clips_it_selects(tmp_path):
    """Sounds as a keyword head's "no word": one label for every clip, after the split."""
    for label in ("dog", "rain"):
        for i in range(10):
            write(tmp_path / label / f"{label}{i}.wav", seconds=0.1)
    plain = read(f"{tmp_path},split=val,percent=40", "keywords")
    relabelled = read(f"{tmp_path},split=val,percent=40,label=_silence_", "keywords")
    assert [e.path for e in relabelled] == [e.path for e in plain] and {e.labels for e in relabelled} == {("_silence_",)}
    assert {e.labels for e in plain} == {("dog",), ("rain",)}


def test_a_source_names_its_head_or_takes_its_readers(tmp_path):
    for word in ("yes", "no"):
        write(tmp_path / "commands" / word / "spk_nohash_0.wav")
    write(tmp_path / "sounds" / "dog" / "a.wav")
    write(tmp_path / "noise" / "hum.wav")
    assert Source.parse(str(tmp_path / "commands")).head == "keywords"  # Speech Commands' layout: the keyword task
    assert Source.parse(str(tmp_path / "sounds")).head == "tags"
    assert Source.parse(f"keywords={tmp_path / 'sounds'}").head == "keywords"
    assert Source.parse(str(tmp_path / "sounds"), "keywords").head == "keywords"  # the head the caller reads it for
    with pytest.raises(ValueError, match="a tags source where a keywords source is needed"):
        Source.parse(f"tags={tmp_path / 'sounds'}", "keywords")
    with pytest.raises(ValueError, match="the esc50 reader takes no option fold"):
        Source.parse(f"esc50:{tmp_path},fold=4")
    # a folder of recordings without class folders: every file, unlabelled (noise, audio without words)
    noise = Source.parse(str(tmp_path / "noise"))
    assert noise.reader == "audio" and [(Path(e.path).name, e.labels) for e in noise.read()] == [("hum.wav", ())]
    assert read(f"{tmp_path / 'noise'},label=_silence_", "keywords")[0].labels == ("_silence_",)


def test_hash_split_is_stable_and_near_the_percentage():
    """The split of a speaker is the same in every process (Python's own hash() is salted per
    process, so a second interpreter with another PYTHONHASHSEED must agree) and near the share."""
    import os
    import subprocess
    import sys

    groups = [f"speaker{i}" for i in range(4000)]
    here = [in_validation(g, 20) for g in groups]
    assert 0.17 < sum(here) / len(groups) < 0.23
    code = "from train.data import in_validation; print(''.join('1' if in_validation(f'speaker{i}', 20) else '0' for i in range(4000)))"
    for seed in ("1", "2"):
        run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": seed})
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip() == "".join("1" if v else "0" for v in here)


def test_labels_order_puts_speech_commands_specials_last():
    examples = [Example("x", (label,)) for label in ("_silence_", "yes", "_unknown_", "no")]
    assert labels_of(examples) == ["no", "yes", "_unknown_", "_silence_"]


def test_real_speech_commands_split_is_speaker_disjoint_and_has_twelve_classes():
    data_path("speech_commands")
    train, val = split_examples(read(str(DATA / "speech_commands"), "keywords"), 20)
    assert set(labels_of(train)) == set(KEYWORD_LABELS)
    speakers = lambda xs: {e.group for e in xs if not e.labels[0] == "_silence_"}  # noqa: E731
    assert not speakers(train) & speakers(val)
    assert 0.1 < len(val) / (len(train) + len(val)) < 0.3


def test_audioset_names_exist_in_the_ontology_and_keep_dataset_classes_apart():
    indices = data_path("audioset/class_labels_indices.csv")
    with open(indices, newline="") as f:
        display = {row["display_name"] for row in csv.DictReader(f)}
    missing = {k: v for k, v in AUDIOSET_NAMES.items() if v not in display and v != tag_name(k) == k.replace("_", " ")}
    assert not {k: v for k, v in missing.items() if v[0].isupper()}
    for meta in ("esc50_other_folds/meta/esc50.csv",):
        with open(data_path(meta), newline="") as f:
            categories = {row["category"] for row in csv.DictReader(f)}
        assert len({tag_name(c) for c in categories}) == len(categories)  # no two ESC-50 classes merge
    mapped = [c for c in categories if tag_name(c) in display]
    assert len(mapped) >= 45


# ---------------------------------------------------------------------------------------------
# Features


def test_load_features_crops_times_and_skips_bad_files(tmp_path):
    good = write(tmp_path / "good.wav", seconds=1.0)
    (tmp_path / "bad.wav").write_bytes(b"RIFF not really")
    config = preset("ast")
    examples = [Example(str(good), ("a",)), Example(str(good), ("a",), start=0.25, end=0.75), Example(str(tmp_path / "bad.wav"), ("a",))]
    with pytest.warns(UserWarning, match="bad.wav"):
        feats = load_features(examples, config)
    assert feats[0].shape[0] == config.num_frames(16000) and feats[1].shape[0] == config.num_frames(8000)
    np.testing.assert_array_equal(feats[1].numpy(), fbank(sf.read(good, dtype="float32")[0][4000:12000], config))
    assert feats[2] is None


@pytest.mark.parametrize("T,frames,hop", [(10, 4, 2), (10, 12, 5), (10, 4, 3), (98, 98, 50), (500, 98, 50)])
def test_windows_cover_the_clip_and_pad_with_silence(T, frames, hop):
    x = np.random.default_rng(0).standard_normal((T, 3)).astype(np.float32)
    w = windows(x, frames, hop)
    assert w.shape[1:] == (frames, 3)
    assert (len(w) - 1) * hop + frames >= T and (len(w) - 2) * hop + frames < T or len(w) == 1
    for i, window in enumerate(w):
        real = x[i * hop : i * hop + frames]
        np.testing.assert_array_equal(window[: len(real)], real)
        assert (window[len(real) :] == np.float32(math.log(LOG_FLOOR))).all()


# ---------------------------------------------------------------------------------------------
# Augmentation


def test_gain_is_a_log_offset_and_mixing_in_power_matches_mixing_waveforms():
    config = preset("ast")
    a = sine_sweep(1.0)
    fa = torch.from_numpy(fbank(a, config)[None])
    audible = fa > math.log(LOG_FLOOR) + 1  # floored bins do not scale
    torch.testing.assert_close(gain(fa, torch.tensor([10.0]))[audible], torch.from_numpy(fbank(a * 10**0.5, config)[None])[audible], atol=1e-3, rtol=0)
    # the powers of uncorrelated signals add (the cross terms average out over frames): the mel
    # power of the mixed waveform is the sum of the mel powers
    a = white_noise(2.0, seed=1)
    fa, fb, mixed = (torch.from_numpy(fbank(x, config)).exp().mean(0) for x in (a, white_noise(2.0, seed=3) * 0.5, a + white_noise(2.0, seed=3) * 0.5))
    error = lambda estimate: ((estimate - mixed).abs() / mixed).median()  # noqa: E731
    assert error(torch.logaddexp(fa.log(), fb.log()).exp()) < 0.05 < error(torch.maximum(fa, fb))


def test_add_noise_hits_the_snr():
    x, noise = torch.randn(2, 50, 8), torch.randn(2, 50, 8) - 3
    for snr in (0.0, 10.0):
        mixed = add_noise(x, noise, torch.full((2,), snr))
        added = mean_power(mixed) - mean_power(x)
        torch.testing.assert_close(10 * torch.log10(mean_power(x) / added), torch.full((2,), snr), atol=1e-3, rtol=0)


def test_mixup_mixes_features_and_targets_alike():
    x, y = torch.randn(3, 10, 4), torch.eye(3)
    same, y_same = mixup(x, y, torch.tensor([1, 2, 0]), torch.ones(3))
    torch.testing.assert_close(same, x)
    torch.testing.assert_close(y_same, y)
    half, y_half = mixup(x, y, torch.tensor([1, 2, 0]), torch.full((3,), 0.5))
    torch.testing.assert_close(half.exp(), 0.5 * x.exp() + 0.5 * x[[1, 2, 0]].exp())
    torch.testing.assert_close(y_half.sum(1), torch.ones(3))


def test_time_shift_and_spec_augment():
    x = torch.randn(2, 20, 6)
    torch.testing.assert_close(time_shift(x, torch.tensor([3, -2])), torch.stack([x[0].roll(3, 0), x[1].roll(-2, 0)]))
    masked = spec_augment(torch.ones(50, 20, 6) + 1, 3, 5, torch.Generator().manual_seed(0))
    zero = masked == 0
    # at most one band of <= 3 bins and one span of <= 5 frames per clip
    assert (zero.all(dim=1).sum(1) <= 3).all() and (zero.all(dim=2).sum(1) <= 5).all() and zero.any()


def test_augment_off_is_identity_and_on_keeps_shapes():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 30, 16), torch.eye(4)[torch.arange(8) % 4]
    out, y_out = augment(x, y, AugmentConfig.off(), g)
    assert out is x and y_out is y
    out, y_out = augment(x, y, AugmentConfig(mixup=1.0, noise_prob=1.0), g, noise_bank=torch.randn(3, 120, 16))
    assert out.shape == x.shape and y_out.shape == y.shape and not torch.equal(out, x)
    torch.testing.assert_close(y_out.sum(1), y.sum(1))


# ---------------------------------------------------------------------------------------------
# Metrics


def test_accuracy_f1_and_average_precision_by_hand():
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    truth = np.array([0, 1, 1, 1])
    assert metrics.accuracy(scores, truth) == 0.75
    # class 0: tp 1 fp 1 fn 0 -> F1 2/3; class 1: tp 2 fp 0 fn 1 -> F1 0.8
    assert metrics.macro_f1(scores, truth) == pytest.approx((2 / 3 + 0.8) / 2)
    assert metrics.average_precision(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0], bool)) == pytest.approx((1 + 2 / 3) / 2)
    assert metrics.average_precision(np.array([0.5, 0.5, 0.1]), np.array([0, 1, 0], bool)) == pytest.approx(0.5)  # a tie shares a threshold
    assert math.isnan(metrics.average_precision(np.array([0.1, 0.2]), np.array([0, 0], bool)))
    assert np.nanmean(metrics.ap_per_class(np.array([[0.9, 0.1], [0.1, 0.9]]), np.eye(2))) == 1.0
