"""Refitting the keyword head on running audio: hops are labelled by where the words' cores lie,
embedded exactly as the streaming engine hears them, and nothing but the keyword head changes."""

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import make_dataset, make_model, white_noise

from edgetag import audio, checkpoint
from edgetag.model import for_inference
from edgetag.runtime import load_backend
from edgetag.spec import KEYWORDS
from edgetag.stream import Engine
from train import running
from train.refit import IGNORED, RefitConfig, hop_embeddings, hop_labels, refit
from train.running import Placed, Scene

LABELS = ["yes", "no", "_unknown_", "_silence_"]


def test_a_hop_is_labelled_by_the_cores_its_window_holds():
    spec = make_model(heads={KEYWORDS: LABELS}, stream=(1.0, 0.1)).spec
    words = [Placed("yes", 2.0, 3.0, (2.3, 2.7)), Placed("", 6.0, 7.0, (6.2, 6.8)), Placed("", 10.0, 11.0, (10.1, 10.9)), Placed("no", 11.5, 12.5, (11.7, 12.0))]
    scene = Scene(np.zeros(16000 * 14, np.float32), words, 16000)
    hops = 120
    y = hop_labels(scene, spec, LABELS, hops)
    starts = np.arange(hops) * spec.hop_seconds
    ends = starts + spec.window_seconds
    for k in range(hops):
        held = {id(w): max(0.0, min(ends[k], w.core[1]) - max(starts[k], w.core[0])) / (w.core[1] - w.core[0]) for w in words}
        whole = [w.label for w in words if w.label and held[id(w)] >= 1]
        part = any(w.label and 0 < held[id(w)] < 1 for w in words)
        other = max((held[id(w)] for w in words if not w.label), default=0.0)
        expected = (LABELS.index(whole[0]) if whole else IGNORED if part else LABELS.index("_unknown_") if other >= 0.5
                    else IGNORED if other > 0 else LABELS.index("_silence_"))
        assert y[k] == expected, (k, starts[k])
    # every kind of hop is there: a window over a keyword's whole core beside part of another word says the keyword
    assert {LABELS[i] for i in y if i != IGNORED} == set(LABELS) and (y == IGNORED).any()
    assert y[round(11.1 / spec.hop_seconds)] == LABELS.index("no")  # [11.1, 12.1) holds "no" whole and 0.8 of the word before


def test_the_embedded_hops_are_the_ones_the_engine_answers(tmp_path):
    """The refit's hops, fbank made a block at a time, give the bundled model's keyword head the
    probabilities the streaming engine gives it, hop for hop (the tail's padded window aside)."""
    rate = 16000
    x = audio.load(checkpoint.DEFAULT_MODEL.parent / "example.flac", rate)
    scene = Scene(x[: 9 * rate], [], rate)
    model = checkpoint.load_model(checkpoint.DEFAULT_MODEL)
    spec = model.spec.with_stream(hop=0.1)
    e = hop_embeddings(for_inference(model), spec, scene, block_seconds=0.73)  # blocks off the hop grid
    engine = Engine(load_backend(checkpoint.DEFAULT_MODEL), hop=0.1)
    heard = running.hop_probabilities(engine, scene)[spec.head_of(KEYWORDS)]
    with torch.inference_mode():
        mine = model.heads[spec.head_of(KEYWORDS)](e).softmax(-1).numpy()
    assert len(heard) - len(e) in (0, 1)
    np.testing.assert_allclose(mine, heard[: len(e)], atol=1e-5)


def refit_small_model(tmp_path, layers: int) -> tuple[dict, dict]:
    """A refit of a small model over a scene of two made-up words that fits its hops; the state
    before and after."""
    words = make_dataset(tmp_path / "words", clips=12, seconds=0.8)
    (words / "tone").rename(words / "yes")
    (words / "noise").rename(words / "no")
    sf.write(tmp_path / "bed.wav", 0.003 * white_noise(120.0, seed=1), 16000)
    model = make_model(heads={"tags": ["Dog", "Speech"], KEYWORDS: LABELS}, stream=(1.0, 0.5))
    checkpoint.save(tmp_path / "model.safetensors", model)
    c = RefitConfig(model=str(tmp_path / "model.safetensors"), out=str(tmp_path / "refit"), keywords=[f"{tmp_path / 'words'}"],
                    backgrounds=[str(tmp_path / "bed.wav")], clips=[f"{tmp_path / 'words'}"], scenes=1, hop=0.1, epochs=3, batch_size=32, layers=layers)
    found = refit(c)
    assert found["scenes"][0]["keywords"] > 0 and found["hops"]["yes"] > 0 and found["hops"]["_silence_"] > 0
    assert found["losses"][-1] < found["losses"][0]
    after = checkpoint.load_model(tmp_path / "refit" / "model.safetensors")
    assert after.spec.provenance["refit"]["scenes"] == 1 and after.spec.provenance["refit"]["layers"] == layers
    assert after.spec.stream == model.spec.stream  # listens as it did
    return checkpoint.load_model(tmp_path / "model.safetensors").state_dict(), after.state_dict()


def test_a_refit_changes_the_keyword_head_alone_and_fits_its_hops(tmp_path):
    before, after = refit_small_model(tmp_path, layers=0)
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(f"heads.{KEYWORDS}.") for k in changed)


def test_a_refit_of_the_top_layer_moves_it_and_the_heads_alone(tmp_path):
    """--layers 1: the last block learns beside the heads; every weight below it stays byte for byte."""
    before, after = refit_small_model(tmp_path, layers=1)
    top = f"encoder.blocks.{make_model().spec.encoder.depth - 1}."
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith(top) for k in changed) and any(k.startswith(f"heads.{KEYWORDS}.") for k in changed)
    assert all(k.startswith((top, "encoder.norm.", "heads.")) for k in changed), sorted(changed)


@pytest.mark.parametrize("field, value, line", [("alpha", 1.5, "--alpha: 1.5 is not in [0, 1]"), ("scenes", 0, "--scenes: 0 is not a number of scenes"),
                                                ("snr_db", (15.0, 0.0), "--snr-db: 15 0 is not a range")])
def test_refit_settings_are_refused_before_any_audio_is_read(field, value, line):
    with pytest.raises(ValueError, match=line.replace("[", r"\[").replace("]", r"\]")):
        RefitConfig(model="m", out="o", keywords=["k"], backgrounds=["b"], **{field: value})
