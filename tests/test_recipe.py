"""The recipe end to end on synthetic data with nano models: every stage runs, a second run
skips them all, a changed setting reruns only the stages that build on it, and install bundles a
model that loads and agrees across backends."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import make_dataset

from edgetag.checkpoint import load_model
from pipeline.recipe import Recipe, digest, run, stages_of
from train.augment import AugmentConfig
from train.distill import DistillConfig
from train.finetune import FinetuneConfig
from train.pretrain import PretrainConfig
from train.refit import RefitConfig

RATE = 16000


def make_commands(root: Path, speakers: int = 10) -> Path:
    """Speech Commands' layout: a folder per word, <speaker>_nohash_<n>.wav. "yes" and "no" are
    tones, "bed" (an unknown word) is noise, _silence_ is near silence."""
    rng = np.random.default_rng(1)
    t = np.arange(RATE) / RATE
    words = {"yes": lambda: 0.3 * np.sin(2 * np.pi * 700 * t), "no": lambda: 0.3 * np.sin(2 * np.pi * 2500 * t),
             "bed": lambda: 0.1 * rng.standard_normal(RATE), "_silence_": lambda: 1e-4 * rng.standard_normal(RATE)}
    for word, make in words.items():
        (root / word).mkdir(parents=True, exist_ok=True)
        for s in range(speakers):
            sf.write(root / word / f"spk{s:02d}_nohash_0.wav", make().astype(np.float32), RATE)
    return root


def small_recipe(data: Path, out: Path) -> Recipe:
    commands, sounds, negatives = str(data / "commands"), str(data / "sounds"), str(data / "negatives")
    common = dict(train=[f"tags={sounds}", f"keywords={commands}"], val_percent=25.0, epochs=2, batch_size=16,
                  augment=AugmentConfig(mixup=0.0))
    return Recipe(
        model_id="test-model",
        pretrain=PretrainConfig(data=[str(data)], out=str(out / "pretrain"), size="nano", frames=96, batch_size=8, steps=3,
                                warmup_steps=1, checkpoint_every=3, num_workers=0),
        teacher=FinetuneConfig(**common, out=str(out / "teacher"), init=str(out / "pretrain" / "encoder.safetensors"), lr=1e-3),
        student=DistillConfig(teacher=str(out / "teacher" / "best.safetensors"), temperature=2.0, alpha=0.5,
                              student=FinetuneConfig(**common, out=str(out / "student"), size="nano", lr=1e-3)),
        baselines={"scratch": FinetuneConfig(**common, out=str(out / "scratch"), size="nano", lr=1e-3)},
        calibrate={"keywords": [f"{commands},split=val,percent=25"], "negatives": [negatives], "tags": [f"{sounds},split=val,percent=25"],
                   "target_per_hour": 1.0},
        export_calibration=[commands],
        evaluation={
            "keywords": {"data": f"{commands},split=val,percent=25", "head": "keywords"},
            "esc50": {"data": f"{sounds},split=val,percent=25", "head": "tags", "classes_from": sounds},
            "dcase": {"data": f"{sounds},split=val,percent=25", "head": "tags", "classes_from": sounds},
            "held_out_negatives": [negatives],
            "latency": {"seconds": 2.0, "repeats": 1, "listen_seconds": 1.0},
        },
    )


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    data = root / "data"
    make_commands(data / "commands")
    make_dataset(data / "sounds", clips=12, seconds=1.0)
    (data / "negatives").mkdir()
    for i in range(3):
        sf.write(data / "negatives" / f"noise{i}.wav", (0.05 * np.random.default_rng(i).standard_normal(4 * RATE)).astype(np.float32), RATE)
    recipe, out = small_recipe(data, root / "runs"), root / "runs"
    torch.manual_seed(0)
    run(recipe, out, install_to=root / "assets")
    return recipe, out, root / "assets"


@pytest.mark.slow
def test_every_stage_leaves_its_marker_and_the_card_quotes_the_report(recipe_run):
    recipe, out, _ = recipe_run
    for folder in ("pretrain", "teacher", "student", "scratch", "calibrate", "export", "evaluate"):
        marker = json.loads((out / folder / "stage.json").read_text())
        assert marker["seconds"] > 0 and "settings" in marker
    report = json.loads((out / "evaluate" / "stage.json").read_text())["result"]
    assert set(report["models"]) == {"teacher", "student", "student, ONNX Runtime int8", "baseline: scratch"}
    card = (out / "MODEL_CARD.md").read_text()
    student = report["models"]["student"]
    assert f"{100 * student['keywords']['accuracy']:.1f}%" in card
    assert f"{student['spotting']['false_alarms_per_hour']:.2f}" in card
    assert "test-model" in card and "baseline: scratch" in card
    # the student's spotting was measured on the held-out negatives: 3 files of 4 s
    assert student["spotting"]["negative_hours"] == pytest.approx(12 / 3600, rel=0.01)


@pytest.mark.slow
def test_a_second_run_skips_every_stage(recipe_run, capsys):
    recipe, out, _ = recipe_run
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    stages = [s for s in stages_of(recipe) if s != "card"]
    run(recipe, out, stages)
    assert capsys.readouterr().out.count(": done") == len(stages)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == before


@pytest.mark.slow
def test_a_changed_setting_reruns_what_builds_on_it(recipe_run, capsys):
    recipe, out, _ = recipe_run
    teacher = (out / "teacher" / "best.safetensors").stat().st_mtime_ns
    export_digest = digest(out / "export")
    changed = replace(recipe, calibrate={**recipe.calibrate, "target_per_hour": 1000.0})
    run(changed, out, ["teacher", "student", "calibrate", "export"])
    printed = capsys.readouterr().out
    assert f"{out / 'teacher'}: done" in printed and f"{out / 'student'}: done" in printed
    assert printed.count("running it again") == 2  # calibrate, then export (its input changed)
    assert digest(out / "export") != export_digest
    assert (out / "teacher" / "best.safetensors").stat().st_mtime_ns == teacher
    run(recipe, out, ["calibrate", "export"])  # back, for the other tests


@pytest.mark.slow
def test_installed_model_loads_with_its_id_thresholds_and_onnx_parity(recipe_run):
    from edgetag.checkpoint import load_model
    from edgetag.runtime import OnnxBackend, TorchBackend

    _, out, assets = recipe_run
    model = load_model(assets / "model.safetensors")
    assert model.spec.model_id == "test-model"
    assert set(model.spec.thresholds["keywords"]) >= {"yes", "no"}
    assert (assets / "MODEL_CARD.md").is_file()
    torch_backend, onnx_backend = TorchBackend(model), OnnxBackend(assets / "export" / "model.onnx")
    x = torch.randn(3, onnx_backend.spec.window_frames, 128).numpy()
    for head, p in torch_backend(x).items():
        np.testing.assert_allclose(onnx_backend(x)[head], p, atol=1e-4)
    # the same model, with thresholds of its own: calibrated through ONNX Runtime on this file
    assert replace(onnx_backend.spec, thresholds={}, calibration={}) == replace(torch_backend.spec, thresholds={}, calibration={})
    for name in ("model.onnx", "model.int8.onnx"):
        backend = OnnxBackend(assets / "export" / name)
        assert set(backend.spec.thresholds["keywords"]) == set(model.spec.thresholds["keywords"]) and backend.spec.calibration["backend"] == "onnx"


def test_unknown_stage_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown stage"):
        run(small_recipe(tmp_path, tmp_path), tmp_path, ["pretrain", "polish"])


@pytest.mark.slow
def test_a_recipe_that_continues_a_model_on_views_with_running_audio(recipe_run, tmp_path):
    """default-3's shape: no pretraining or teacher stage; the student continues a finished
    model on augmented views (hard labels here: no third-party teacher on a CI machine) and
    hears the windows the previous model spotted keywords in where none was said (default10's
    mine stage); a keyword threshold chosen on a running-audio scene at a hop of its own; the
    previous model and the running-audio benchmark in the report and the card."""
    from train.views import ViewsConfig

    first, first_out, _ = recipe_run
    data, out = Path(first.pretrain.data[0]), tmp_path / "runs"
    previous = tmp_path / "previous"
    shutil.copytree(first_out / "export", previous / "export")
    shutil.copy2(first_out / "calibrate" / "model.safetensors", previous / "model.safetensors")
    commands, negatives = str(data / "commands"), str(data / "negatives")
    student = replace(first.student.student, out=str(out / "student"), init=str(previous / "model.safetensors"), epochs=1,
                      train=[*first.student.student.train, f"keywords={out / 'mine'}"])
    scene = {"keywords": [f"{commands},split=val,percent=25"], "others": [negatives], "backgrounds": [negatives], "seed": 1, "repeat": 2}
    # its own keywords said as other speech: the previous model spots them, and their windows are mined
    mine = {"model": str(previous / "model.safetensors"), "level": 0.5, "seed": 1, "repeat": 2, "out": str(out / "mine"), "others": [commands], "backgrounds": [negatives]}
    # and its keyword head refitted on running audio of its training clips before it is calibrated (default-16's refit stage)
    refit = RefitConfig(model=str(out / "student" / "best.safetensors"), out=str(out / "refit"), keywords=[f"{commands},split=train,percent=25"],
                        backgrounds=[negatives], clips=[f"keywords={commands}"], scenes=1, hop=0.25, epochs=1, batch_size=16)
    recipe = replace(first, model_id="test-model-3", pretrain=None, teacher=None, mine=mine, refit=refit,
                     student=DistillConfig(views=ViewsConfig(views=2), student=student),
                     baselines={"nokd": DistillConfig(views=ViewsConfig(views=1), student=replace(student, out=str(out / "nokd")))},
                     calibrate={**first.calibrate, "keywords": [], "negatives": [], "scene": scene, "hop": 0.25, "keyword_smoothings": [0.0, 0.5]},
                     evaluation={**first.evaluation, "running": {**scene, "gates": [0.5]}, "previous": str(previous)},
                     targets={"accuracy": {"keywords": 0.5}, "running": (1000.0, 0.0)}, tried=["a first idea: 1%", "a second: 2%"])
    assert stages_of(recipe) == ["mine", "student", "nokd", "refit", "calibrate", "export", "evaluate", "card"]
    run(recipe, out)
    mined = json.loads((out / "mine" / "stage.json").read_text())["result"]
    assert mined["clips"] == len((out / "mine" / "manifest.csv").read_text().splitlines()) - 1 > 0
    report = json.loads((out / "evaluate" / "stage.json").read_text())["result"]
    assert {"student", "baseline: nokd", "previous", "previous, ONNX Runtime int8"} <= set(report["models"])
    running = report["running"]
    assert running["keywords"] > 0 and set(running["models"]) >= {"student", "previous", "baseline: nokd"}
    calibrated = json.loads((out / "calibrate" / "stage.json").read_text())["result"]["scene"]
    model = load_model(out / "calibrate" / "model.safetensors")
    assert set(model.spec.thresholds["keywords"].values()) == {calibrated["chosen"]["threshold"]}  # one threshold, from the scene
    refitted, student = load_model(out / "refit" / "model.safetensors").state_dict(), load_model(out / "student" / "best.safetensors").state_dict()
    calibrated_weights = model.state_dict()
    assert all(torch.equal(calibrated_weights[k], refitted[k]) for k in refitted)  # the calibrate stage took the refitted head
    assert not torch.equal(refitted["heads.keywords.fc.weight"], student["heads.keywords.fc.weight"])
    assert len(calibrated["pairs"]) == 2 and model.spec.keyword_smoothing == calibrated["keyword_smoothing"]  # and the smoothing it was chosen with
    # it listens at the calibrated hop, not its training one, and so does its export
    manifest = json.loads((out / "export" / "manifest.json").read_text())
    assert model.spec.stream.hop == manifest["spec"]["stream"]["hop"] == 0.25 != load_model(out / "student" / "best.safetensors").spec.stream.hop
    assert manifest["spec"].get("keyword_smoothing", 0.0) == model.spec.keyword_smoothing
    card = (out / "MODEL_CARD.md").read_text()
    assert "## Keywords in running audio" in card and "## Targets" in card and (out / "running.png").is_file()
    assert f"hard negatives (`train.mine`): {mined['clips']} windows where `previous` spotted a keyword" in card
    assert "| refit | the student's keyword head fitted again (`train.refit`), its encoder frozen:" in card
    assert "- a first idea: 1%;\n- a second: 2%.\n" in card.split("## Targets")[1]  # what was tried, under the targets it missed
    assert f"{100 * report['models']['student']['keywords']['accuracy']:.1f}%" in card


def test_a_card_refresh_rewrites_only_the_rows_and_section_it_measured():
    """`--refresh-card` replaces one model's cells (matched by column header) and the Latency
    section; every other row, column and section stays as the recipe wrote it."""
    from pipeline.model_card import replace_row, replace_section, validation_cell

    card = "\n".join([
        "# Model card", "", "## Validation results", "",
        "| model | parameters | size | keywords: accuracy (12-way) | ESC-50: accuracy (50-way) | ESC-50: mAP | DCASE 2016: accuracy |",
        "|---|---|---|---|---|---|---|",
        "| student | 1.23M | 4.7 MiB | 85.2% | 33.9% | 0.378 | 73.5% |",
        "| student, ONNX Runtime int8 | (as student) | 1.6 MiB | 85.4% | 33.0% | 0.381 | 73.5% |",
        "", "## Latency", "", "old table", "", "## Known limits", "", "- small data", ""])
    results = {"keywords": {"accuracy": 0.852, "mAP": 0.9}, "esc50": {"accuracy": 0.33, "mAP": 0.3804}, "dcase": {"accuracy": 0.7353, "mAP": 0.7}}
    new = replace_row(card, "student, ONNX Runtime int8", "| model | parameters |", lambda header: validation_cell(results, header))
    new = replace_section(new, "Latency", ["## Latency", "", "new table", ""])
    lines = new.split("\n")
    assert lines[6] == "| student | 1.23M | 4.7 MiB | 85.2% | 33.9% | 0.378 | 73.5% |"
    assert lines[7] == "| student, ONNX Runtime int8 | (as student) | 1.6 MiB | 85.2% | 33.0% | 0.380 | 73.5% |"
    assert "new table" in new and "old table" not in new and new.endswith("## Known limits\n\n- small data\n")


def test_the_card_names_the_calibrated_choice_as_chosen():
    """Thresholds at the grid's fine top read as chosen (0.998, not a rounded 1.00), and a gate
    or smoothing of 0 reads as none, not as "keywords only where the Speech tag reaches 0"."""
    from pipeline.model_card import calibration_words

    def scene(gate: float, smoothing: float, threshold: float) -> dict:
        point = {"threshold": threshold, "recall": 0.088, "false_alarms_per_hour": 0.0}
        pairs = [{"speech_gate": g, "keyword_smoothing": s, **point} for g in (0.0, 0.2) for s in (0.0, 0.3)]
        return {"scene": {"minutes": 46.0, "keywords": 160, "other_words": 731, "speech_gate": gate, "keyword_smoothing": smoothing,
                          "chosen": point, "pairs": pairs}}

    plain = calibration_words({"target_per_hour": 2.0}, scene(0.0, 0.0, 0.998))
    assert "threshold (0.998)" in plain and "no speech gate" in plain and "reaches it" not in plain and "no smoothing tried spotted more" in plain
    chosen = calibration_words({"target_per_hour": 2.0}, scene(0.2, 0.3, 0.97))
    assert "threshold (0.97), a speech gate (0.2: keywords only where the Speech tag reaches it) and keyword probabilities averaged over 0.3 s" in chosen
    # a calibration from before keyword smoothing recorded gates alone: no smoothing to speak of
    legacy = scene(0.2, 0.0, 0.995)
    legacy["scene"]["gates"] = {"0": legacy["scene"]["chosen"], "0.2": legacy["scene"].pop("chosen")}
    legacy["scene"]["chosen"] = legacy["scene"]["gates"]["0.2"]
    del legacy["scene"]["pairs"], legacy["scene"]["keyword_smoothing"]
    words = calibration_words({"target_per_hour": 2.0}, legacy)
    assert "threshold (0.995), a speech gate (0.2" in words and "smoothing" not in words and "each hop" not in words