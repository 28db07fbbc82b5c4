"""Fine-tuning, distillation and evaluation end to end on small synthetic datasets."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, make_dataset, make_model

from edgetag import load_model
from edgetag.checkpoint import save
from edgetag.runtime import TorchBackend
from edgetag.spec import EncoderConfig, StreamConfig
from train.augment import AugmentConfig
from train.data import Source, split_examples
from train.distill import DistillConfig, TeacherTargets, distill
from train.evaluate import evaluate
from train.finetune import FinetuneConfig, build_model, finetune, random_crops, set_trainable


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("synthetic"))


def quick_config(dataset, out, **overrides) -> FinetuneConfig:
    base = dict(train=[str(dataset)], out=str(out), size="nano", epochs=4, batch_size=8, lr=3e-3, stream=StreamConfig(0.5, 0.25),
                val_percent=25, augment=AugmentConfig.off(), seed=0)
    return FinetuneConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft")
    results = finetune(quick_config(dataset, out), device="cpu")
    return out, results


def test_finetune_learns_and_saves_the_best_checkpoint(trained):
    out, results = trained
    assert results["tags"]["accuracy"] >= 0.85 and results["tags"]["n"] > 0
    model = load_model(out / "best.safetensors")
    assert model.spec.heads["tags"].labels == ("noise", "tone")
    assert model.spec.stream == StreamConfig(0.5, 0.25)
    assert model.spec.provenance["validation"]["tags"]["accuracy"] == results["tags"]["accuracy"]
    assert model.spec.provenance["config"]["augment"] == json.loads(json.dumps(AugmentConfig.off().__dict__))  # the settings, as a plain dict
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
    # all 32 clips, training ones included: a model that learned tells nearly all apart (a
    # constant answer would score 0.5 on these balanced classes)
    assert data["n"] == 32 and data["accuracy"] >= 0.9 and set(data["per_class"]) == {"noise", "tone"}
    assert sum(map(sum, data["confusion"])) == 32
    assert (tmp_path / "report.confusion.png").stat().st_size > 0
    assert "accuracy" in run.stdout and "noise" in run.stdout


def test_evaluate_matches_the_validation_figure(trained, dataset):
    out, results = trained
    _, val = split_examples(Source.parse(str(dataset)).read(), 25)
    again = evaluate(TorchBackend.load(out / "best.safetensors"), val, "tags")
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
        assert (tuned.spec.encoder.adapter_dim > 0) == (mode == "adapter")
    adapter_weights = [v for k, v in tuned.state_dict().items() if ".adapter.up." in k]
    assert any(v.abs().sum() > 0 for v in adapter_weights)  # the adapters did train


def test_a_grown_head_keeps_the_classes_it_shares_with_init(tmp_path):
    """--init with a head of other classes: shared classes keep their rows (by name, in any
    order), new ones start fresh at the one-in-N prior, and the encoder comes over whole."""
    from edgetag.spec import HeadConfig

    source = make_model("nano", {"tags": ["dog", "cat", "rain"], "keywords": ["yes", "no"]})
    with torch.no_grad():
        for p in source.parameters():
            p.normal_()
    save(tmp_path / "init.safetensors", source)
    heads = {"tags": HeadConfig("tags", ("wind", "rain", "dog", "siren", "bird")), "keywords": HeadConfig("keywords", ("yes", "no"))}
    model = build_model(FinetuneConfig(train=["x"], init=str(tmp_path / "init.safetensors")), heads, source.spec.fbank)
    old, new = source.heads["tags"].fc, model.heads["tags"].fc
    torch.testing.assert_close(new.weight[[1, 2]], old.weight[[2, 0]], rtol=0, atol=0)
    torch.testing.assert_close(new.bias[[1, 2]], old.bias[[2, 0]], rtol=0, atol=0)
    assert torch.all(new.bias[[0, 3, 4]] == -np.log(4)) and not torch.equal(new.weight[0], old.weight[1])
    torch.testing.assert_close(model.heads["tags"].norm.weight, source.heads["tags"].norm.weight, rtol=0, atol=0)
    for key, value in source.state_dict().items():
        if not key.startswith("heads.tags."):
            torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)


def test_balanced_epochs_draw_every_class_about_equally():
    """Class-balanced draws: 300 clips of one class and 100 of another are drawn about 1:1 (each
    clip's weight is its rarest class's share; the broad class every clip carries counts for
    nothing); without balance an epoch is a permutation of the clips."""
    from train.finetune import Task, epoch_order

    y = torch.zeros(400, 3)
    y[:300, 0], y[300:, 1], y[:, 2] = 1, 1, 1  # two classes and an ancestor of both
    task = Task("tags", ["a", "b", "any"], [torch.zeros(1)] * 400, y, [], torch.zeros(0))
    g = torch.Generator().manual_seed(0)
    assert sorted(epoch_order(task, False, g)) == list(range(400))
    draws = [i for _ in range(20) for i in epoch_order(task, True, g)]
    share_b = sum(i >= 300 for i in draws) / len(draws)
    assert 0.47 < share_b < 0.53  # 8000 draws: a standard error of 0.006


def test_keyword_share_sets_how_many_draws_hold_a_keyword():
    """900 clips without a keyword (_unknown_, _silence_) and 100 with one: drawn with
    keyword_share 0.5 about half the draws hold a keyword, and the negatives keep their own
    proportions (600 _unknown_ to 300 _silence_)."""
    from train.finetune import Task, epoch_order

    y = torch.zeros(1000, 4)
    y[:50, 0], y[50:100, 1], y[100:700, 2], y[700:, 3] = 1, 1, 1, 1
    task = Task("keywords", ["yes", "no", "_unknown_", "_silence_"], [torch.zeros(1)] * 1000, y, [], torch.zeros(0))
    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([i for _ in range(10) for i in epoch_order(task, False, g, keyword_share=0.5)])
    assert len(draws) == 10000 and 0.48 < (draws < 100).float().mean() < 0.52  # a standard error of 0.005
    unknown, silence = ((draws >= 100) & (draws < 700)).sum(), (draws >= 700).sum()
    assert 1.8 < unknown / silence < 2.2
    assert sorted(epoch_order(task, False, g)) == list(range(1000))  # 0: a permutation, the data's own mix


def test_set_trainable_shares():
    model = make_model(EncoderConfig.named("mini", adapter_dim=16), {"tags": ["a", "b"]})
    share = {}
    for mode in ("full", "linear", "adapter"):
        set_trainable(model, mode)
        share[mode] = sum(p.numel() for p in model.parameters() if p.requires_grad) / sum(p.numel() for p in model.parameters())
    assert share["full"] == 1 and share["linear"] < 0.01 and 0.01 < share["adapter"] < 0.1


def test_multitask_training_builds_both_heads(dataset, tmp_path):
    c = quick_config(dataset, tmp_path, train=[str(dataset), f"keywords={dataset}"], epochs=1)
    results = finetune(c, device="cpu")
    model = load_model(tmp_path / "best.safetensors")
    assert set(model.spec.heads) == set(results) == {"tags", "keywords"}
    assert model.spec.heads["keywords"].kind == "keywords"
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
    c = DistillConfig(teacher=str(out / "best.safetensors"), temperature=2.0, alpha=0.5, cache=str(tmp_path / "cache.safetensors"),
                      student=quick_config(dataset, tmp_path / "student", size="nano", epochs=2))
    results = distill(c, device="cpu")
    assert (tmp_path / "cache.safetensors").is_file()
    assert results["tags"]["accuracy"] == 1.0  # 6 validation clips, 3 of each class; the teacher gets them all
    losses = [float(line.split(",")[1]) for line in (tmp_path / "student" / "history.csv").read_text().splitlines()[1:]]
    assert losses[-1] < 0.5 * losses[0]  # the distillation loss falls under the teacher (measured 0.31 -> 0.07)
    student = load_model(tmp_path / "student" / "best.safetensors")
    assert student.spec.heads == load_model(out / "best.safetensors").spec.heads
    assert student.spec.provenance["stage"] == "distill" and student.spec.provenance["teacher"]["alpha"] == 0.5
    capsys.readouterr()
    distill(c, device="cpu")
    assert "teacher probabilities from" in capsys.readouterr().out


def test_distillation_loss_terms(tmp_path):
    path = save(tmp_path / "t.safetensors", make_model("nano", {"keywords": ["a", "b", "c"]}))
    teacher = TeacherTargets(DistillConfig(teacher=str(path), temperature=3.0, alpha=1.0))
    head = teacher.backend.spec.heads["keywords"]
    logits = torch.randn(4, 3)
    soft = (logits / 3.0).softmax(-1)
    hard = torch.eye(3)[[0, 1, 2, 0]]
    # a student that already matches the teacher has zero KL; alpha 0 is the hard-label loss alone
    assert teacher.loss(head, logits, torch.cat([hard, soft], 1)).abs() < 1e-6
    teacher.c.alpha = 0.0
    expected = torch.nn.functional.cross_entropy(logits, hard.argmax(1))
    torch.testing.assert_close(teacher.loss(head, logits, torch.cat([hard, soft], 1)), expected)


def test_keyword_soft_targets_are_the_teachers_softmax_at_temperature(tmp_path):
    """The teacher hands out probabilities; softmax(log p / T) is its softmax(logits / T)."""
    torch.manual_seed(0)
    model = make_model("nano", {"keywords": ["a", "b", "c"]}, stream=(0.5, 0.25))
    path = save(tmp_path / "t.safetensors", model)
    teacher = TeacherTargets(DistillConfig(teacher=str(path), temperature=3.0))
    clip = torch.randn(80, 128) - 4
    teacher.prepare([_task("keywords", [clip])], model.spec)
    window = clip[25:73]  # the second grid window (hop 25 frames, 48-frame windows)
    with torch.no_grad():
        logits = model(((window - model.spec.fbank.norm_mean) / (model.spec.fbank.norm_scale * model.spec.fbank.norm_std))[None])["keywords"]
    torch.testing.assert_close(teacher.soft_targets("keywords", [0], [25]), (logits / 3.0).softmax(-1), atol=1e-5, rtol=0)


def _task(head, clips):
    from train.finetune import Task

    return Task(head, ["a", "b", "c"], clips, torch.zeros(len(clips), 3), [], torch.zeros(0, 3))


def test_teacher_fits_the_students_windows_to_its_own(tmp_path):
    model = make_model(EncoderConfig.named("nano", positions="learned", max_tokens=48), {"tags": ["a"]}, stream=(1.0, 0.5))
    teacher = TeacherTargets(DistillConfig(teacher=str(save(tmp_path / "t.safetensors", model))))
    assert teacher.backend.spec.window_frames == 98
    assert teacher.window_probabilities("tags", torch.randn(3, 50, 128)).shape == (3, 1)


def test_the_commands_options_are_the_config_fields(dataset, tmp_path):
    """train.finetune's options are FinetuneConfig's fields, nested StreamConfig and AugmentConfig
    flattened; what the command line says lands in the config the checkpoint records."""
    import inspect
    from dataclasses import fields, is_dataclass

    from train import distill as distill_module
    from train import finetune as finetune_module
    from train.views import ViewsConfig

    def leaves(config) -> list[str]:
        return [n for f in fields(config) for n in (leaves(getattr(config, f.name)) if is_dataclass(getattr(config, f.name)) else [f.name])]

    assert list(inspect.signature(finetune_module.main).parameters) == leaves(FinetuneConfig()) == [
        *"train val out init encoder size tokens preset mode adapter adapter_dim attention task adapter_layers".split(), "window", "hop", *"loudness val_percent noise epochs batch_size lr weight_decay warmup_epochs".split(),
        *"mixup mixup_alpha noise_prob snr_db gain_db shift freq_mask time_mask".split(), "balance", "keyword_share", "precision", "seed"]
    assert list(inspect.signature(distill_module.main).parameters) == [
        *"teacher tag_teacher keyword_teacher audioset backgrounds".split(), *leaves(ViewsConfig()), "tag_alpha", "temperature", "alpha", "cross", "sure_negatives", "cache", *leaves(FinetuneConfig())]
    run = subprocess.run([sys.executable, "-m", "train.finetune", "--train", str(dataset), "--out", str(tmp_path), "--size", "nano", "--epochs", "1",
                          "--window", "0.5", "--hop", "0.25", "--mixup", "0", "--snr-db", "3", "9", "--val-percent", "25"], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    config = load_model(tmp_path / "best.safetensors").spec.provenance["config"]
    assert config["stream"] == {"window": 0.5, "hop": 0.25} and config["augment"]["mixup"] == 0 and config["augment"]["snr_db"] == [3, 9]


@pytest.mark.parametrize("args, message", [
    (["train.finetune", "--train", "/no/such/data"], "train.finetune: error: /no/such/data: no such file or folder"),
    (["train.finetune", "--train", "esc50:DATA,fold=4"], "train.finetune: error: esc50:DATA,fold=4: the esc50 reader takes no option fold"),
    (["train.finetune", "--train", "DATA", "--hop", "0.125"], "train.finetune: error: a hop of 0.125 s is not a whole number of 10 ms frames"),
    (["train.distill", "--teacher", "/no/such.safetensors", "--train", "DATA"], "train.distill: error: /no/such.safetensors: no such file or folder"),
    (["train.distill", "--train", "DATA"], "train.distill: error: give a --teacher, or --views N to learn from augmented views"),
    (["train.distill", "--train", "DATA", "--keyword-teacher", "k.tflite"], "train.distill: error: --tag-teacher and --keyword-teacher label augmented views: give --views N"),
    (["train.finetune", "--train", "DATA", "--mode", "half"], "train.finetune: error: mode must be one of full, linear, adapter, not 'half'"),
    (["train.pretrain", "--data", "DATA", "--method", "byol"], "train.pretrain: error: method must be one of mae-ast, ssast, tera, ss-mast, not 'byol'"),
    (["train.pretrain", "--data", "DATA", "--encoder", "rwkv"], "train.pretrain: error: encoder must be one of transformer, mamba, mast, not 'rwkv'"),
    (["train.pretrain", "--data", "DATA", "--size", "ssamba-tiny"], "train.pretrain: error: size must be one of nano, mini, tiny, small, base, not 'ssamba-tiny'"),
    (["train.finetune", "--train", "DATA", "--encoder", "mamba", "--mode", "adapter"], "train.finetune: error: mamba blocks are pre-LN and have no MLP to put adapters beside"),
    (["train.pretrain", "--data", "DATA", "--method", "tera", "--time-ratio", "1.5"], "train.pretrain: error: --time-ratio: 1.5 is not in [0, 1)"),
    (["train.pretrain", "--data", "DATA", "--method", "mae-ast", "--tokens", "conv"], "train.pretrain: error: tokens must be one of patch, frame, not 'conv'"),
    (["train.finetune", "--train", "DATA", "--precision", "fp16"], "train.finetune: error: precision must be one of fp32, bf16, not 'fp16'"),
    (["train.distill", "--train", "DATA", "--views", "1", "--tag-alpha", "2"], "train.distill: error: --tag-alpha: 2 is not in [0, 1]"),
    (["train.distill", "--train", "DATA", "--views", "1", "--alpha", "nan"], "train.distill: error: --alpha: nan is not in [0, 1]"),
    (["train.distill", "--train", "DATA", "--views", "1", "--cross", "-0.5"], "train.distill: error: --cross: -0.5 is not in [0, 1]"),
    (["train.distill", "--train", "DATA", "--views", "1", "--word-placement", "edge"], "train.distill: error: --word-placement must be one of center, anywhere, not 'edge'"),
    (["train.distill", "--train", "DATA", "--views", "1", "--word-core", "0"], "train.distill: error: --word-core: 0 is not in (0, 1]"),
    (["train.distill", "--train", "DATA", "--views", "1", "--word-background-prob", "1.5"], "train.distill: error: --word-background-prob: 1.5 is not in [0, 1]"),
    (["train.distill", "--train", "DATA", "--views", "1", "--background-prob", "-0.1"], "train.distill: error: --background-prob: -0.1 is not in [0, 1]"),
    (["train.distill", "--train", "DATA", "--views", "1", "--keyword-share", "1"], "train.distill: error: --keyword-share: 1 is not in [0, 1)"),
    (["train.distill", "--train", "DATA", "--views", "1", "--speed", "0.5"], "train.distill: error: --speed: 0.5 is not in [0, 0.5)"),
    (["train.distill", "--train", "DATA", "--views", "1", "--speed", "nan"], "train.distill: error: --speed: nan is not in [0, 0.5)"),
    (["train.input_study", "--size", "huge"], "train.input_study: error: size must be one of nano, mini, tiny, small, base, not 'huge'"),
    (["train.input_study", "--epochs", "0"], "train.input_study: error: --epochs: 0 is not >= 1"),
    (["train.bench_encoders", "--size", "huge"], "train.bench_encoders: error: --size: 'huge' is not one of nano, mini, tiny, small, base"),
    (["train.bench_encoders", "--tokens", "0"], "train.bench_encoders: error: --tokens: [0] are not all >= 1"),
    (["train.bench_encoders", "--device", "tpu"], "train.bench_encoders: error: --device: 'tpu' is not cpu or cuda"),
    (["train.bench_encoders", "--steps", "0"], "train.bench_encoders: error: --steps: 0 is not >= 1"),
    (["train.bench_encoders", "--stream-size", "huge"], "train.bench_encoders: error: --stream-size: 'huge' is not one of nano, mini, tiny, small, base"),
    (["train.bench_encoders", "--study-tokens", "conv"], "train.bench_encoders: error: --study-tokens: 'conv' is not frame or patch"),
    (["train.bench_encoders", "--batch8-max", "-1"], "train.bench_encoders: error: --batch8-max: -1 is not >= 0"),
    (["train.bench_encoders", "--attention", "--windows", "0"], "train.bench_encoders: error: --windows: [0.0] are not all in [0.1, 60] seconds"),
    (["train.bench_encoders", "--attention", "--study-tokens", "frame"], "train.bench_encoders: error: --study-tokens frame: a frame model's grid has one frequency row"),
    (["train.pretrain", "--data", "DATA", "--attention", "fta"], "train.pretrain: error: --attention fta: mae-ast's encoder sees a random quarter of the tokens"),
    (["train.pretrain", "--data", "DATA", "--method", "ss-mast", "--attention", "fta"], "train.pretrain: error: --attention fta: ss-mast's encoder sees the tokens patch-drop leaves"),
    (["train.pretrain", "--data", "DATA", "--method", "ss-mast", "--patch-drop", "1"], "train.pretrain: error: --patch-drop: 1 is not in [0, 1)"),
    (["train.pretrain", "--data", "DATA", "--method", "ss-mast", "--queue-size", "0"], "train.pretrain: error: --queue-size: 0 is not >= 1"),
    (["train.pretrain", "--data", "DATA", "--method", "ss-mast", "--temperature", "0"], "train.pretrain: error: --temperature: 0 is not > 0"),
    (["train.pretrain", "--data", "DATA", "--method", "ss-mast", "--crop-scale", "0"], "train.pretrain: error: --crop-scale: 0 is not in (0, 1]"),
    (["train.pretrain", "--data", "DATA", "--method", "ssast", "--attention", "sparse"], "train.pretrain: error: attention must be one of full, fta, not 'sparse'"),
    (["train.pretrain", "--data", "DATA", "--method", "ssast", "--encoder", "mamba", "--attention", "fta"], "train.pretrain: error: mamba blocks have no attention to factorise"),
    (["train.finetune", "--train", "DATA", "--mode", "adapter", "--adapter", "lora"], "train.finetune: error: adapter must be one of mlp, aat, conv, not 'lora'"),
    (["train.finetune", "--train", "DATA", "--mode", "adapter", "--adapter-dim", "0"], "train.finetune: error: --adapter-dim: 0 is not >= 1"),
    (["train.finetune", "--train", "DATA", "--attention", "axial"], "train.finetune: error: attention must be one of full, fta, not 'axial'"),
    (["train.finetune", "--train", "DATA", "--task", "door"], "train.finetune: error: --task door: needs --init, the model it adds to"),
    (["train.finetune", "--train", "DATA", "--task", "door", "--init", "m.safetensors"], "train.finetune: error: --task door: trains a task's own weights: --mode linear or adapter"),
    (["train.finetune", "--train", "DATA", "--task", "door", "--init", "m.safetensors", "--mode", "linear", "--attention", "fta"], "train.finetune: error: --task door: runs the base's attention"),
    (["train.finetune", "--train", "DATA", "--mode", "adapter", "--adapter-layers", "-1"], "train.finetune: error: --adapter-layers: -1 is not >= 0"),
    (["train.distill", "--train", "DATA", "--views", "1", "--task", "door", "--init", "m.safetensors", "--mode", "linear"], "train.distill: error: --task: distillation trains a whole student"),
    (["train.bench_fewshot", "--shots", "0"], "train.bench_fewshot: error: --shots: [0] are not all >= 1"),
    (["train.bench_fewshot", "--seeds", "0"], "train.bench_fewshot: error: --seeds: 0 is not >= 1"),
    (["train.bench_continual", "--init", "m.safetensors", "--methods", "lora"], "train.bench_continual: error: method must be one of conv, mlp, aat, linear, full, not 'lora'"),
    (["train.bench_continual", "--init", "m.safetensors", "--tasks", "mnist"], "train.bench_continual: error: task must be one of keywords, esc50, dcase, urbansound8k, not 'mnist'"),
    (["train.bench_continual", "--init", "m.safetensors", "--epochs", "0"], "train.bench_continual: error: --epochs: 0 is not >= 1"),
    (["train.bench_continual", "--init", "m.safetensors", "--seeds", "0", "--seeds", "-1"], "train.bench_continual: error: --seeds: [0, -1] are not all >= 0"),
    (["train.finetune", "--train", "DATA", "--seed", "-1"], "train.finetune: error: --seed: -1 is not >= 0"),
    (["train.bench_encoders", "--mast", "--attention"], "train.bench_encoders: error: --attention and --mast: choose one comparison"),
    (["train.bench_encoders", "--mast", "--study-tokens", "frame"], "train.bench_encoders: error: --study-tokens frame: a MAST has its own patch embedding; use patch with --mast"),
    (["train.bench_encoders", "--mast", "--mast-size", "mast-xl"], "train.bench_encoders: error: --mast-size: 'mast-xl' is not one of mast-t, mast-s, mast-edge"),
    (["train.pretrain", "--data", "DATA", "--encoder", "mast", "--size", "mast-edge", "--method", "ssast"],
     "train.pretrain: error: --method ssast: it predicts each token from the encoder's output at that token"),
    (["train.pretrain", "--data", "DATA", "--encoder", "mast", "--size", "mast-edge", "--tokens", "frame"],
     "train.pretrain: error: a MAST has its own patch embedding and pooling attention"),
    (["train.pretrain", "--data", "DATA", "--encoder", "mast"], "train.pretrain: error: size must be one of mast-t, mast-s, mast-edge, not 'tiny'"),
    (["train.finetune", "--train", "DATA", "--encoder", "mast", "--size", "tiny"], "train.finetune: error: size must be one of mast-t, mast-s, mast-edge, not 'tiny'"),
])
def test_training_commands_refuse_bad_input_in_one_line(args, message, dataset, tmp_path):
    args, message = [a.replace("DATA", str(dataset)) for a in args], message.replace("DATA", str(dataset))
    run = subprocess.run([sys.executable, "-m", *args, "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.strip().splitlines()[-1].startswith(message) and "Traceback" not in run.stderr


def test_tag_head_distillation_is_bce_against_the_teacher_weighted_with_the_labels():
    """Tags: (1 - alpha) BCE(hard) + alpha BCE(teacher's sigmoid), no temperature; a student at
    the teacher's logits with alpha 1 sits at the targets' entropy, the loss's floor."""
    from edgetag.spec import HeadConfig
    from train.distill import distillation_loss

    torch.manual_seed(0)
    head, logits = HeadConfig("tags", ["a", "b", "c"]), torch.randn(5, 3)
    hard, soft = (torch.rand(5, 3) > 0.5).float(), torch.rand(5, 3)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    expected = 0.3 * bce(logits, hard) + 0.7 * bce(logits, soft)
    torch.testing.assert_close(distillation_loss(head, logits, hard, soft, temperature=4.0, alpha=0.7), expected)
    floor = distillation_loss(head, soft.logit(), hard, soft, 4.0, 1.0)
    entropy = -(soft * soft.log() + (1 - soft) * (1 - soft).log()).mean()
    torch.testing.assert_close(floor, entropy)
    assert distillation_loss(head, soft.logit() + 0.5, hard, soft, 4.0, 1.0) > floor


@pytest.mark.parametrize("val_percent, side", [(100.0, "training"), (0.0, "validation")])
def test_a_head_left_without_clips_on_one_side_is_one_clear_error(dataset, tmp_path, val_percent, side):
    # every group held out (or none): the split leaves a side empty, which used to crash validation
    with pytest.raises(ValueError, match=f"tags: no readable {side} clips .*--val-percent {val_percent:g}"):
        finetune(quick_config(dataset, tmp_path, val_percent=val_percent), device="cpu")
