"""Fine-tuning, distillation and evaluation end to end on small synthetic datasets."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, make_dataset
from edgetag import load_model
from edgetag.checkpoint import save
from edgetag.features import preset
from edgetag.model import AudioTransformer, EncoderConfig, HeadConfig
from edgetag.runtime import TorchBackend
from train.augment import AugmentConfig
from train.distill import Teacher
from train.evaluate import evaluate
from train.finetune import FinetuneConfig, finetune, parse_source, random_crops, set_trainable
from train.data import read_examples

@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("synthetic"))


def quick_config(dataset, out, **overrides) -> FinetuneConfig:
    base = dict(train=[str(dataset)], out=str(out), size="nano", epochs=4, batch_size=8, lr=3e-3, window=0.5, hop=0.25,
                val_percent=25, augment={**AugmentConfig.off().__dict__}, seed=0)
    return FinetuneConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft")
    results = finetune(quick_config(dataset, out), device="cpu")
    return out, results


def test_parse_source_picks_the_head():
    assert parse_source("../shared/data/speech_commands") == ("keywords", "../shared/data/speech_commands")
    assert parse_source("speech_commands:/x/y") == ("keywords", "speech_commands:/x/y")
    assert parse_source("esc50:/x/y,folds=4") == ("tags", "esc50:/x/y,folds=4")
    assert parse_source("keywords=/data/words") == ("keywords", "/data/words")


def test_finetune_learns_and_saves_the_best_checkpoint(trained):
    out, results = trained
    assert results["tags"]["accuracy"] >= 0.85 and results["tags"]["n"] > 0
    model = load_model(out / "best.safetensors")
    assert model.head_configs["tags"].labels == ("noise", "tone")
    assert model.config["stream"] == {"window": 0.5, "hop": 0.25}
    assert model.config["provenance"]["validation"]["tags"]["accuracy"] == results["tags"]["accuracy"]
    history = (out / "history.csv").read_text().splitlines()
    assert len(history) == 5 and (out / "curves.png").stat().st_size > 0
    first, last = (float(line.split(",")[1]) for line in (history[1], history[-1]))
    assert last < first  # the training loss falls


def test_evaluate_cli_writes_json_and_confusion(trained, dataset, tmp_path):
    out, results = trained
    report = tmp_path / "report.json"
    run = subprocess.run([sys.executable, "-m", "train.evaluate", "--ckpt", str(out / "best.safetensors"), "--data", str(dataset),
                          "--head", "tags", "--json", str(report)], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    data = json.loads(report.read_text())
    assert data["n"] == 32 and 0.5 <= data["accuracy"] <= 1 and set(data["per_class"]) == {"noise", "tone"}
    assert sum(map(sum, data["confusion"])) == 32
    assert (tmp_path / "report.confusion.png").stat().st_size > 0
    assert "accuracy" in run.stdout and "noise" in run.stdout


def test_evaluate_matches_the_validation_figure(trained, dataset):
    out, results = trained
    from train.data import split_examples

    _, val = split_examples(read_examples(str(dataset)), 25)
    again = evaluate(TorchBackend(out / "best.safetensors"), val, "tags")
    assert again["accuracy"] == results["tags"]["accuracy"] and again["n"] == results["tags"]["n"]


def test_linear_probe_and_adapters_leave_the_encoder_alone(trained, dataset, tmp_path):
    out, _ = trained
    start = load_model(out / "best.safetensors")
    for mode in ("linear", "adapter"):
        finetune(quick_config(dataset, tmp_path / mode, init=str(out / "best.safetensors"), mode=mode, epochs=1, lr=1e-2), device="cpu")
        tuned = load_model(tmp_path / mode / "best.safetensors")
        before, after = start.state_dict(), tuned.state_dict()
        for key, value in after.items():
            if key.startswith("encoder.") and ".adapter." not in key:
                torch.testing.assert_close(value, before[key], rtol=0, atol=0)
        assert (tuned.encoder.config.adapter_dim > 0) == (mode == "adapter")
    adapter_weights = [v for k, v in tuned.state_dict().items() if ".adapter.up." in k]
    assert any(v.abs().sum() > 0 for v in adapter_weights)  # the adapters did train


def test_set_trainable_shares():
    model = AudioTransformer(EncoderConfig.named("mini", adapter_dim=16), {"tags": HeadConfig("tags", ["a", "b"])})
    share = {}
    for mode in ("full", "linear", "adapter"):
        set_trainable(model, mode)
        share[mode] = sum(p.numel() for p in model.parameters() if p.requires_grad) / sum(p.numel() for p in model.parameters())
    assert share["full"] == 1 and share["linear"] < 0.01 and 0.01 < share["adapter"] < 0.1


def test_multitask_training_builds_both_heads(dataset, tmp_path):
    c = quick_config(dataset, tmp_path, train=[str(dataset), f"keywords={dataset}"], epochs=1)
    results = finetune(c, device="cpu")
    model = load_model(tmp_path / "best.safetensors")
    assert set(model.head_configs) == set(results) == {"tags", "keywords"}
    assert model.head_configs["keywords"].kind == "keywords"
    probs = model.probabilities(torch.zeros(2, 50, 128))
    torch.testing.assert_close(probs["keywords"].sum(-1), torch.ones(2))


def test_loud_crops_prefer_the_sound():
    quiet, loud = torch.full((100, 4), -15.0), torch.full((30, 4), 5.0)
    clip = torch.cat([quiet, loud, quiet])  # the sound sits at frames 100-130
    g = torch.Generator().manual_seed(0)
    _, uniform = random_crops([clip] * 200, list(range(200)), 40, g)
    _, biased = random_crops([clip] * 200, list(range(200)), 40, g, loudness=1.0)
    covers = lambda starts: np.mean([min(s + 40, 130) - max(s, 100) >= 20 for s in starts])  # noqa: E731  most of the sound inside
    assert covers(biased) > 0.9 and covers(uniform) < 0.3


def test_random_crops_land_on_the_grid():
    feats = [torch.randn(100, 4), torch.randn(30, 4)]
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        x, starts = random_crops(feats, [0, 1], 40, g, grid=15)
        assert x.shape == (2, 40, 4) and all(s % 15 == 0 for s in starts) and starts[1] == 0
        torch.testing.assert_close(x[0][: min(40, 100 - starts[0])], feats[0][starts[0] : starts[0] + 40])


def test_distillation_caches_the_teacher_and_trains_a_student(trained, dataset, tmp_path, capsys):
    out, _ = trained
    teacher = Teacher(out / "best.safetensors", temperature=2.0, alpha=0.5, cache=tmp_path / "cache.safetensors")
    c = quick_config(dataset, tmp_path / "student", size="nano", epochs=2)
    results = finetune(c, device="cpu", teacher=teacher)
    assert (tmp_path / "cache.safetensors").is_file() and "tags" in results
    student = load_model(tmp_path / "student" / "best.safetensors")
    assert student.head_configs == load_model(out / "best.safetensors").head_configs
    assert student.config["provenance"]["stage"] == "distill"
    capsys.readouterr()
    finetune(c, device="cpu", teacher=Teacher(out / "best.safetensors", cache=tmp_path / "cache.safetensors"))
    assert "teacher logits from" in capsys.readouterr().out


def test_distillation_loss_terms():
    fbank = preset("ast")
    model = AudioTransformer(EncoderConfig.named("nano"), {"keywords": HeadConfig("keywords", ["a", "b", "c"])})
    path = save(__import__("pathlib").Path(__import__("tempfile").mkdtemp()) / "t.safetensors", model, fbank)
    teacher = Teacher(path, temperature=3.0, alpha=1.0)
    logits = torch.randn(4, 3)
    soft = (logits / 3.0).softmax(-1)
    hard = torch.eye(3)[[0, 1, 2, 0]]
    # a student that already matches the teacher has zero KL; alpha 0 is the hard-label loss alone
    assert teacher.loss("keywords", logits, torch.cat([hard, soft], 1)).abs() < 1e-6
    teacher.alpha = 0.0
    expected = torch.nn.functional.cross_entropy(logits, hard.argmax(1))
    torch.testing.assert_close(teacher.loss("keywords", logits, torch.cat([hard, soft], 1)), expected)


def test_teacher_pads_short_windows_to_its_own(tmp_path):
    fbank = preset("ast")
    model = AudioTransformer(EncoderConfig.named("nano", positions="learned", max_tokens=48), {"tags": HeadConfig("tags", ["a"])})
    path = save(tmp_path / "t.safetensors", model, fbank, stream={"window": 1.0, "hop": 0.5})
    teacher = Teacher(path)
    assert teacher.frames == 98
    assert teacher.window_logits("tags", torch.randn(3, 50, 128)).shape == (3, 1)
