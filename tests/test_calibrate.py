"""Threshold calibration: false alarms counted by the engine's own post-processor; thresholds land in the checkpoint."""

import numpy as np
from conftest import make_spec

from edgetag import load_model
from edgetag.stream import PostConfig
from train.calibrate import GRID, calibrate, calibrate_keywords, replay


def test_keyword_thresholds_keep_false_alarms_under_the_target():
    rng = np.random.default_rng(0)
    spec = make_spec(heads={"keywords": ["yes", "no", "_unknown_", "_silence_"]}, stream=(1.0, 0.25))
    negatives = [{"keywords": np.abs(rng.normal(0, 0.2, (14400, 4))).clip(0, 1)}]  # one hour of 0.25 s hops
    negatives[0]["keywords"][::1000, 0] = 0.8  # 15 loud "yes" false alarms an hour at 0.8
    positives = {"yes": [{"keywords": np.array([[0.95, 0.0, 0.05, 0.0]])}], "no": [{"keywords": np.array([[0.1, 0.6, 0.3, 0.0]])}]}
    post = PostConfig(refractory=1.0)
    result = calibrate_keywords(spec, post, "keywords", negatives, 1.0, positives, target_per_hour=1.0)
    assert result["negative_hours"] == 1.0 and set(result["classes"]) == {"yes", "no"}
    yes = result["classes"]["yes"]
    assert yes["threshold"] > 0.8 and yes["false_alarms_per_hour"] <= 1.0 and yes["recall"] == 1.0
    # the lowest grid point within the target: one step down is over it (bisection found the edge)
    below = float(GRID[list(GRID).index(yes["threshold"]) - 1])
    assert len(replay(spec, post, "keywords", {"yes": below}, negatives)[0]) > 1


def test_refractory_period_counts_as_the_engine_counts():
    spec = make_spec(heads={"keywords": ["yes", "_unknown_"]}, stream=(1.0, 0.25))
    p = np.array([0.9, 0.9, 0.1, 0.9, 0.1, 0.1, 0.9])
    stream = {"keywords": np.stack([p, 1 - p], 1)}
    spots = lambda refractory, t: len(replay(spec, PostConfig(refractory=refractory), "keywords", {"yes": t}, [stream])[0])  # noqa: E731
    assert spots(0.25, 0.5) == 4 and spots(0.75, 0.5) == 3 and spots(0.25, 0.95) == 0


def test_tag_thresholds_are_written_into_a_checkpoint_the_engine_reads(tmp_path):
    from conftest import make_dataset

    from edgetag.spec import StreamConfig
    from train.augment import AugmentConfig
    from train.finetune import FinetuneConfig, finetune

    data = make_dataset(tmp_path / "data", clips=8, seconds=1.0)
    finetune(FinetuneConfig(train=[str(data)], out=str(tmp_path / "ft"), size="nano", epochs=3, batch_size=8, lr=3e-3, stream=StreamConfig(0.5, 0.25),
                            val_percent=25, augment=AugmentConfig.off()), device="cpu")
    report = calibrate(tmp_path / "ft" / "best.safetensors", tmp_path / "cal.safetensors", [], [], [str(data)])
    thresholds = load_model(tmp_path / "cal.safetensors").spec.thresholds
    assert set(thresholds) == {"tags"} and set(thresholds["tags"]) == {"noise", "tone"} == set(report["tags"])
    assert all(0.3 <= t < 1.0 for t in thresholds["tags"].values())
    from edgetag.runtime import load_backend
    from edgetag.stream import Engine

    engine = Engine(load_backend(tmp_path / "cal.safetensors"))
    assert list(engine.post.on["tags"]) == [thresholds["tags"][label] for label in ("noise", "tone")]


def test_spotting_counts_what_edgetag_file_reports(tmp_path):
    """The card's false alarms per hour are the keyword events `edgetag file` prints for the
    same audio, with the same thresholds; keyword clips count as spotted only as their keyword."""
    import json
    import subprocess
    import sys

    import soundfile as sf
    import torch
    from conftest import REPO, make_model, white_noise

    from edgetag.checkpoint import save
    from edgetag.runtime import load_backend
    from train.data import Example
    from train.evaluate import spotting

    torch.manual_seed(0)
    model = make_model("nano", {"keywords": ["yes", "no", "_unknown_", "_silence_"]}, stream=(1.0, 0.25),
                       thresholds={"keywords": {"yes": 0.3, "no": 0.3}})  # low: an untrained model spots often
    path = save(tmp_path / "m.safetensors", model)
    negatives = []
    for i in range(3):
        negatives.append(tmp_path / f"noise{i}.wav")
        sf.write(negatives[-1], white_noise(3.0 + i, seed=i), 16000)
    result = spotting(load_backend(path), [Example(str(negatives[0]), ("yes",))], [Example(str(p), ()) for p in negatives])
    run = subprocess.run([sys.executable, "-m", "edgetag", "file", *map(str, negatives), "--model", str(path), "--json"],
                         cwd=REPO, capture_output=True, text=True)
    printed = [json.loads(line) for line in run.stdout.splitlines()]
    assert result["false_alarms"] == sum(e["kind"] == "keyword" for e in printed) > 0
    assert result["negative_hours"] == 12.0 / 3600
    first = [e["label"] for e in printed if e["kind"] == "keyword" and e["file"] == str(negatives[0])]
    assert result["per_keyword"]["yes"]["recall"] == float("yes" in first)
    assert result["per_keyword"]["yes"]["wrong"] == float(any(label != "yes" for label in first))
