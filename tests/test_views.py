"""Augmented views for distillation, and the running-audio keyword benchmark built on them."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import data_path, make_spec, white_noise

from train.data import Example
from train.views import ViewsConfig, core, mix, played, power, render, shifted, window_starts


def test_mix_sets_the_snr_and_shifted_pads_with_silence():
    x, noise = white_noise(1.0, seed=1), white_noise(1.0, seed=2) * 7
    mixed = mix(x, noise, 10.0)
    assert 10 * np.log10(power(x) / power(mixed - x)) == pytest.approx(10.0, abs=1e-6)
    y = np.arange(1, 11, dtype=np.float32)
    assert shifted(y, -3, 6).tolist() == [0, 0, 0, 1, 2, 3]
    assert shifted(y, 7, 6).tolist() == [8, 9, 10, 0, 0, 0]


def test_window_starts_keep_the_loudest_windows_in_time_order():
    x = np.zeros(50, np.float32)
    x[30:40], x[0:10], x[20:30] = 3, 2, 1  # windows of 10 on a hop of 10: loudest 30, then 0
    assert window_starts(x, 10, 10, keep=2) == [0, 30]
    assert window_starts(x[:5], 10, 10, keep=2) == [0]  # shorter than a window


def test_render_views_of_tags_and_keywords():
    rate, samples = 16000, 8000
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(3 * rate) / rate)).astype(np.float32)
    word = np.zeros(rate, np.float32)
    word[6000:10000] = white_noise(0.25, seed=3)
    c = ViewsConfig(views=3, clip_hop=0.5, clip_windows=2, mix_prob=1.0, background_prob=1.0)
    examples = [Example("a", ("Tone",)), Example("b", ("Hiss",))]
    views = render("tags", examples, [tone, white_noise(0.5, seed=4)], [white_noise(2.0, seed=5)], c, samples, rate)
    # the two loudest of the 3 s tone's five windows, the 0.5 s hiss's one, three views each
    assert views.audio.shape == (9, samples) and views.source == [0] * 6 + [1] * 3
    assert any(np.array_equal(views.audio[0], tone[s : s + samples]) for s in range(0, len(tone) - samples + 1, 8000))  # view 0: a clean grid window
    assert views.labels[0] == ("Tone",) and ("Hiss", "Tone") in views.labels[1:6]  # a mixed view names both clips
    assert np.abs(views.audio).max() <= 1.0
    kws = render("keywords", [Example("w", ("yes",))], [word], [white_noise(2.0, seed=6)], c, rate, rate)
    assert kws.labels == [("yes",)] * 3  # a keyword is mixed only with background, so it stays a keyword
    np.testing.assert_array_equal(kws.audio[0], word)


def pitch(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum) * rate / len(x))


def test_played_faster_is_shorter_and_higher():
    rate = 16000
    tone = np.sin(2 * np.pi * 1000 * np.arange(rate) / rate).astype(np.float32)
    for speed in (0.8, 1.15):
        y = played(tone, speed)
        assert abs(len(y) - rate / speed) <= 1 and pitch(y, rate) == pytest.approx(1000 * speed, abs=2)
    assert played(tone, 1.0) is tone


def test_speed_perturbed_keyword_views_keep_the_word_centred_and_leave_tags_alone():
    """With `speed`, each augmented keyword view plays its word at its own speed within the range
    (its pitch moves with it), still centred in the window; view 0 and tag views are as recorded."""
    rate = 16000
    t = np.arange(rate) / rate
    word = (np.sin(2 * np.pi * 1000 * t) * np.exp(-0.5 * ((t - 0.5) / 0.1) ** 2)).astype(np.float32)  # a 1 kHz burst mid-clip
    c = ViewsConfig(views=12, speed=0.2, time_jitter=0.0, level_db=0.0, word_background_prob=0.0)
    kws = render("keywords", [Example("w", ("yes",))], [word], [], c, rate, rate)
    pitches = [pitch(v, rate) for v in kws.audio]
    assert pitches[0] == pytest.approx(1000, abs=2) and np.array_equal(kws.audio[0], word)
    assert all(800 - 2 <= p <= 1200 + 2 for p in pitches[1:]) and np.ptp(pitches[1:]) > 100  # spread over the range
    centres = [np.average(np.arange(rate), weights=np.square(v)) for v in kws.audio]
    assert np.allclose(centres, rate / 2, atol=rate * 0.01)  # the word stays in the middle of the window
    tags = render("tags", [Example("a", ("Tone",))], [word], [], replace(c, mix_prob=0.0, background_prob=0.0), rate, rate)
    assert all(pitch(v, rate) == pytest.approx(1000, abs=2) for v in tags.audio)


def test_core_holds_the_middle_share_of_the_energy():
    x = np.zeros(1000, np.float32)
    x[400:600] = 1.0
    assert core(x, 1.0) == (400, 600)
    first, last = core(x, 0.9)
    assert abs(first - 410) <= 1 and last == 590 and np.square(x[first:last]).sum() >= 0.9 * np.square(x).sum()
    assert core(np.zeros(10, np.float32), 0.9) == (0, 10)  # silence: all of it


def test_words_land_anywhere_in_the_window_and_backgrounds_follow_each_kind():
    """With word_placement="anywhere" the augmented keyword views put the word's core at
    positions spread over the whole window (never cut), not within the jitter of the centre;
    word_background_prob alone decides how often a keyword view is heard over background."""
    rate, samples = 16000, 16000
    word = np.zeros(rate, np.float32)
    word[7000:9000] = white_noise(0.125, seed=3)  # a 0.125 s word in the middle of a 1 s clip
    c = ViewsConfig(views=41, word_placement="anywhere", word_core=1.0, level_db=0.0, word_background_prob=0.0, background_prob=1.0)
    kws = render("keywords", [Example("w", ("yes",))], [word], [white_noise(2.0, seed=6)], c, samples, rate)
    onsets = []
    for view in kws.audio[1:]:
        heard = np.flatnonzero(view)
        assert len(heard) == 2000  # the whole word, and nothing else: no background at word_background_prob 0
        onsets.append(heard[0])
    assert min(onsets) < 1500 and max(onsets) > samples - 2000 - 1500  # near both edges: beyond the 0.2 s jitter
    centred = render("keywords", [Example("w", ("yes",))], [word], [white_noise(2.0, seed=6)], replace(c, word_placement="center"), samples, rate)
    assert all(abs(np.flatnonzero(v)[0] - 7000) <= 0.2 * rate for v in centred.audio[1:])
    noisy = render("keywords", [Example("w", ("yes",))], [word], [white_noise(2.0, seed=6)], replace(c, word_background_prob=1.0, background_prob=0.0), samples, rate)
    assert all(np.count_nonzero(v) == samples for v in noisy.audio[1:])


def test_clean_views_are_the_keyword_views_without_their_background():
    """teach_clean keeps each keyword view as it was before its background went in: moved and
    scaled as the view was, the background at the drawn SNR under it; the views themselves are
    the same with or without it, and tag views keep no clean copy."""
    rate, samples = 16000, 16000
    word = np.zeros(rate, np.float32)
    word[6000:10000] = 0.05 * white_noise(0.25, seed=3)
    c = ViewsConfig(views=6, level_db=6.0, word_background_prob=1.0, background_snr_db=(3.0, 9.0), teach_clean=True)
    kws = render("keywords", [Example("w", ("yes",))], [word], [0.05 * white_noise(2.0, seed=6)], c, samples, rate)
    assert kws.clean.shape == kws.audio.shape
    np.testing.assert_array_equal(kws.clean[0], kws.audio[0])  # view 0 is clean anyway
    for view, clean in zip(kws.audio[1:], kws.clean[1:]):
        assert np.count_nonzero(clean) == 4000  # the word alone, wherever the jitter put it
        assert 3.0 - 1e-3 <= 10 * np.log10(power(clean) / power(view - clean)) <= 9.0 + 1e-3
    plain = render("keywords", [Example("w", ("yes",))], [word], [0.05 * white_noise(2.0, seed=6)], replace(c, teach_clean=False), samples, rate)
    np.testing.assert_array_equal(plain.audio, kws.audio)
    assert plain.clean is None
    quiet = render("keywords", [Example("w", ("yes",))], [word], [0.05 * white_noise(2.0, seed=6)], replace(c, word_background_prob=0.0), samples, rate)
    np.testing.assert_array_equal(quiet.clean, quiet.audio)
    assert render("tags", [Example("a", ("Hiss",))], [word], [white_noise(2.0, seed=6)], c, samples, rate).clean is None


def test_keyword_teacher_hears_the_word_without_its_background():
    """With teach_clean the MLPerf model labels a keyword view from the word before background
    was mixed in: every view of a "yes" (not moved, at other gains, 10 dB under Speech Commands'
    noise) gets the target of the clean clip, which the model scales to its peak; on the noisy
    views it is far less sure of "yes"."""
    from edgetag.spec import KEYWORDS, HeadConfig
    from train.distill import DistillConfig, ViewTargets
    from train.finetune import Task
    from train.labels import KEYWORD_LABELS

    mlperf = data_path("audioset").parent.parent / "teachers" / "mlperf_tiny_kws" / "kws_ref_model.tflite"
    if not mlperf.is_file():
        pytest.skip(f"teacher weights not available: {mlperf}")
    pytest.importorskip("ai_edge_litert", reason="the keyword teacher needs ai-edge-litert (the train extra)")
    yes = data_path("speech_commands/yes/0bac8a71_nohash_0.flac")
    views = ViewsConfig(views=4, time_jitter=0.0, word_background_prob=1.0, background_snr_db=(-10.0, -10.0), teach_clean=True)
    c = DistillConfig(keyword_teacher=str(mlperf), views=views, backgrounds=[f"keywords={data_path('background_noise')}"])
    heads = {KEYWORDS: HeadConfig(KEYWORDS, tuple(KEYWORD_LABELS))}
    spec = make_spec(heads=heads, stream=(1.0, 0.5))
    task = Task(KEYWORDS, list(KEYWORD_LABELS), [], torch.zeros(0), [], torch.zeros(0), [Example(str(yes), ("yes",))])
    clean = ViewTargets(c).render(task, spec, heads[KEYWORDS])["soft"]
    noisy = ViewTargets(replace(c, views=replace(views, teach_clean=False))).render(task, spec, heads[KEYWORDS])["soft"]
    torch.testing.assert_close(clean, clean[:1].expand_as(clean), atol=0.02, rtol=0)
    torch.testing.assert_close(clean[0], noisy[0])
    assert (noisy[1:, KEYWORD_LABELS.index("yes")] < clean[1:, KEYWORD_LABELS.index("yes")] - 0.1).all()


@pytest.mark.parametrize("bad", [dict(word_placement="edge"), dict(word_core=0.0), dict(word_background_prob=1.5), dict(background_prob=-0.1), dict(speed=0.5)])
def test_views_config_refuses_settings_out_of_range(bad):
    with pytest.raises(ValueError, match="word|background|speed"):
        ViewsConfig(**bad)


def test_views_are_labelled_consistently_and_cached(tmp_path, capsys):
    """Distillation on views with no external teacher: hard labels only, ontology ancestors
    included; a second run reads the cached views."""
    from conftest import make_dataset

    from edgetag.spec import StreamConfig
    from train.augment import AugmentConfig
    from train.distill import DistillConfig, ViewTargets, distill
    from train.finetune import FinetuneConfig

    data = make_dataset(tmp_path / "data", clips=6)
    c = DistillConfig(views=ViewsConfig(views=2), student=FinetuneConfig(train=[str(data)], out=str(tmp_path / "s"), size="nano", epochs=1, batch_size=8,
                                                                         stream=StreamConfig(0.5, 0.25), val_percent=25, augment=AugmentConfig.off()))
    results = distill(c, device="cpu")
    assert "tags" in results and (tmp_path / "s" / "views.safetensors").is_file()
    assert "rendered" in capsys.readouterr().out
    distill(c, device="cpu")
    assert "views from" in capsys.readouterr().out
    learn = ViewTargets(c)
    assert not learn.taught and learn.labels == {}  # no teacher, no imposed vocabulary


def test_tag_targets_are_the_datasets_on_their_classes_and_mn04s_elsewhere(tmp_path):
    """With mn04 as the tag teacher, on the classes the datasets name (Dog, Rain and their
    ancestors) the target is the clip's label (moved towards mn04's by tag_alpha); on every other AudioSet class it is mn04's. The tag loss is summed over classes and divided by the
    named ones."""
    from edgetag.spec import HeadConfig
    from train.data import load_clips
    from train.distill import DistillConfig, ViewTargets
    from train.finetune import Task

    teachers = data_path("audioset").parent.parent / "teachers" / "efficientat_mn04_as" / "mn04_as_mAP_432.pt"
    if not teachers.is_file():
        pytest.skip(f"teacher weights not available: {teachers}")
    dog, rain = data_path("esc50/audio/4-183992-A-0.flac"), data_path("esc50/audio/4-163264-A-10.flac")
    c = DistillConfig(tag_teacher=str(teachers), audioset=str(data_path("audioset")), views=ViewsConfig(views=1, clip_windows=1), alpha=0.25)
    learn = ViewTargets(c)
    head = HeadConfig("tags", learn.labels["tags"], learn.parents["tags"])
    spec = make_spec(heads={"tags": head}, stream=(1.0, 0.5))
    examples = [Example(str(dog), ("Dog",)), Example(str(rain), ("Rain",))]
    views = learn.render(Task("tags", list(head.labels), [], torch.zeros(0), [], torch.zeros(0), examples), spec, head)
    soft, hard = views["soft"], views["hard"]
    samples = (spec.window_frames - 1) * spec.fbank.frame_shift + spec.fbank.frame_length  # the same views again: same seed
    audio = render("tags", examples, load_clips(examples, spec.fbank.sample_rate), [], c.views, samples, spec.fbank.sample_rate).audio
    mn04 = learn.teach(head, "tags", audio, views["feats"].float())
    i = {label: k for k, label in enumerate(head.labels)}
    named = [i[x] for x in ("Dog", "Domestic animals, pets", "Animal", "Rain")] + sorted(head.ancestors()[i["Rain"]])
    assert hard[0, [i["Dog"], i["Domestic animals, pets"], i["Animal"]]].tolist() == [1, 1, 1] and hard[0].sum() == 3
    assert set(hard.any(0).nonzero().flatten().tolist()) == set(named)
    torch.testing.assert_close(soft[:, named], hard[:, named])
    unknown = mn04.isnan().any(0)  # the dataset classes AudioSet has no node for (train.labels.EXTRA_TAGS)
    others = [k for k in range(len(head.labels)) if k not in named and not unknown[k]]
    torch.testing.assert_close(soft[:, others], mn04[:, others])
    assert unknown.sum() == 4 and torch.equal(soft[:, unknown], hard[:, unknown])  # mn04 has no word: the label's
    assert soft[0, i["Rain"]] == 0 and soft[1, i["Dog"]] == 0 and mn04[:, others].max() > 0.1  # mn04 does speak where it may

    # tag_alpha moves the named classes' targets towards mn04 and leaves the others alone
    blended = ViewTargets(replace(c, tag_alpha=0.25)).render(Task("tags", list(head.labels), [], torch.zeros(0), [], torch.zeros(0), examples), spec, head)["soft"]
    torch.testing.assert_close(blended[:, named], 0.75 * hard[:, named] + 0.25 * mn04[:, named])
    torch.testing.assert_close(blended[:, others], soft[:, others])
    assert torch.equal(blended[:, unknown], hard[:, unknown])

    learn.soft["tags"], learn.taught["tags"], learn.named["tags"] = soft, True, len(set(named))
    logits = torch.randn(2, len(head.labels))
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, soft, reduction="sum") / 2 / len(set(named))
    torch.testing.assert_close(learn.loss(head, logits, torch.cat([hard, soft], 1)), expected)


def test_audioset_vocabulary_and_hierarchy():
    from train.labels import audioset_vocabulary

    labels, parents = audioset_vocabulary(data_path("audioset"))
    assert len(labels) == 527 and labels[0] == "Speech"
    assert parents["Dog"] == ("Domestic animals, pets",) and parents["Domestic animals, pets"] == ("Animal",)
    assert all(p in labels for ps in parents.values() for p in ps)


def test_urbansound8k_reader_keeps_folds_and_recordings_apart():
    from train.data import Source

    train = Source.parse(f"urbansound8k:{data_path('urbansound8k')},folds=1;2").read()
    val = Source.parse(f"urbansound8k:{data_path('urbansound8k')},folds=3").read()
    assert len(train) and len(val) and not {e.group for e in train} & {e.group for e in val}
    assert "Dog" in {e.labels[0] for e in train} and "Drill" in {e.labels[0] for e in val}  # AudioSet names


def test_cross_targets_teach_each_head_on_the_other_heads_views():
    """--cross: a keyword view also carries mn04's word for the tag head (NaN on the classes it
    lacks), appended to the view's targets; the tag head's loss on those rows is the BCE on the
    classes mn04 knows, scaled like its own loss and by --cross. Without --cross, no such targets."""
    from edgetag.spec import KEYWORDS, HeadConfig
    from train.distill import DistillConfig, ViewTargets
    from train.finetune import Task
    from train.labels import KEYWORD_LABELS

    teachers = data_path("audioset").parent.parent / "teachers"
    mn04, mlperf = teachers / "efficientat_mn04_as" / "mn04_as_mAP_432.pt", teachers / "mlperf_tiny_kws" / "kws_ref_model.tflite"
    if not (mn04.is_file() and mlperf.is_file()):
        pytest.skip(f"teacher weights not available: {mn04}, {mlperf}")
    pytest.importorskip("ai_edge_litert", reason="the keyword teacher needs ai-edge-litert (the train extra)")
    yes = data_path("speech_commands/yes/0bac8a71_nohash_0.flac")
    c = DistillConfig(tag_teacher=str(mn04), keyword_teacher=str(mlperf), audioset=str(data_path("audioset")), views=ViewsConfig(views=2), cross=0.5)
    learn = ViewTargets(c)
    heads = {"tags": HeadConfig("tags", learn.labels["tags"], learn.parents["tags"]), KEYWORDS: HeadConfig(KEYWORDS, tuple(KEYWORD_LABELS))}
    spec = make_spec(heads=heads, stream=(1.0, 0.5))
    task = Task(KEYWORDS, list(KEYWORD_LABELS), [], torch.zeros(0), [], torch.zeros(0), [Example(str(yes), ("yes",))])
    views = learn.render(task, spec, heads[KEYWORDS])
    said = views["cross:tags"]  # [2 views, 531]
    speech = heads["tags"].labels.index("Speech")
    assert said.shape == (2, 531) and said.isnan().any(0).sum() == 4 and said[0, speech] > 0.5  # mn04 hears speech in the clean view
    assert "cross:tags" not in ViewTargets(replace(c, cross=0.0)).render(task, spec, heads[KEYWORDS])

    task.train_y, learn.soft[KEYWORDS], learn.cross[KEYWORDS], learn.named["tags"] = views["hard"], views["soft"], {"tags": said}, 7
    y = learn.targets(task, [0, 1], [0, 0])
    assert y.shape == (2, 2 * 12 + 531)
    logits = torch.randn(2, 531)
    known = ~said[0].isnan()
    expected = 0.5 * torch.nn.functional.binary_cross_entropy_with_logits(logits[:, known], said[:, known], reduction="sum") / 2 / 7
    torch.testing.assert_close(learn.cross_loss(spec, KEYWORDS, {"tags": logits}, y), expected)


def test_sure_negatives_keep_only_the_teachers_split_between_no_keyword_classes():
    from edgetag.spec import KEYWORDS, HeadConfig
    from train.distill import without_keywords_on_negatives

    head = HeadConfig(KEYWORDS, ("down", "go", "_unknown_", "_silence_"))
    soft = torch.tensor([[0.3, 0.1, 0.5, 0.1], [0.6, 0.2, 0.1, 0.1], [0.5, 0.5, 0.0, 0.0]])
    hard = torch.tensor([[0.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    out = without_keywords_on_negatives(soft, hard, head)
    torch.testing.assert_close(out[0], torch.tensor([0.0, 0.0, 5 / 6, 1 / 6]))  # renormalised over the no-keyword classes
    torch.testing.assert_close(out[1], soft[1])  # a keyword's view keeps the teacher's whole answer
    torch.testing.assert_close(out[2], hard[2])  # a teacher that said only keywords: the label


def test_the_keyword_teacher_teaches_no_keyword_on_other_speech_with_sure_negatives(tmp_path):
    """The MLPerf model, trained on Speech Commands alone, calls some Arabic commands keywords;
    with sure_negatives the prepared targets of those `_unknown_` views hold no keyword, while
    the views of a real "yes" keep exactly what the teacher said."""
    from edgetag.spec import KEYWORDS, HeadConfig
    from train.data import Source
    from train.distill import DistillConfig, ViewTargets
    from train.finetune import FinetuneConfig, Task
    from train.labels import KEYWORD_LABELS

    mlperf = data_path("audioset").parent.parent / "teachers" / "mlperf_tiny_kws" / "kws_ref_model.tflite"
    if not mlperf.is_file():
        pytest.skip(f"teacher weights not available: {mlperf}")
    pytest.importorskip("ai_edge_litert", reason="the keyword teacher needs ai-edge-litert (the train extra)")
    arabic = Source.parse(f"{data_path('arabic_speech_commands')},groups=0-15,label=_unknown_", KEYWORDS).read()[:40]
    examples = [Example(str(data_path("speech_commands/yes/0bac8a71_nohash_0.flac")), ("yes",)), *arabic]
    heads = {KEYWORDS: HeadConfig(KEYWORDS, tuple(KEYWORD_LABELS))}
    spec = make_spec(heads=heads, stream=(1.0, 0.5))
    keywords = torch.tensor(heads[KEYWORDS].spotted)

    def prepared(sure: bool, out: str) -> torch.Tensor:
        c = DistillConfig(keyword_teacher=str(mlperf), views=ViewsConfig(views=2), sure_negatives=sure, student=FinetuneConfig(out=str(tmp_path / out)))
        learn = ViewTargets(c)
        learn.prepare([Task(KEYWORDS, list(KEYWORD_LABELS), [], torch.zeros(0), [], torch.zeros(0), examples)], spec)
        return learn.soft[KEYWORDS]

    taught, sure = prepared(False, "a"), prepared(True, "b")
    assert taught[2:, keywords].sum(1).max() > 0.3  # the teacher heard a keyword in some Arabic command
    assert sure[2:, keywords].abs().max() == 0
    torch.testing.assert_close(sure[2:].sum(1), torch.ones(len(sure) - 2))  # a distribution over _unknown_ and _silence_
    torch.testing.assert_close(sure[:2], taught[:2])
