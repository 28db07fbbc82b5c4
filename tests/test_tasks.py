"""Tasks on a frozen base (TI-CL's task-incremental learning): a task is its adapters on the base,
runs the same whatever else runs beside it, and adding one changes no byte of the base or of
another task."""

import json
import re
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import REPO, make_dataset, make_spec

from edgetag.checkpoint import digests, load_model, read_spec, save
from edgetag.model import AudioTransformer
from edgetag.runtime import BackendError, TorchBackend, load_backend
from edgetag.spec import BASE, EncoderConfig, HeadConfig, ModelSpec, SpecError, TaskConfig
from train.augment import AugmentConfig
from train.finetune import FinetuneConfig, finetune

BASE_ENCODER = EncoderConfig.named("nano", tokens="conv")  # a conv stem: batch norms that must not drift


def with_tasks(encoder=BASE_ENCODER, **tasks) -> AudioTransformer:
    """A model with random base weights and these tasks, every task weight random too (fresh
    adapters are the identity, which would hide a task that ran the wrong adapters)."""
    torch.manual_seed(0)
    model = AudioTransformer(replace(make_spec(encoder, {"tags": ["a", "b"], "keywords": ["yes", "no", "_unknown_"]}), tasks=tasks)).eval()
    with torch.no_grad():
        for p in model.tasks.parameters():
            p.normal_(0, 0.1)
    return model


def task(adapter="conv", dim=8, layers=2, kind="tags", labels=("door", "kettle")) -> TaskConfig:
    return TaskConfig(HeadConfig(kind, labels), adapter, dim, layers) if adapter != "none" else TaskConfig(HeadConfig(kind, labels))


def as_plain_model(model: AudioTransformer, name: str) -> AudioTransformer:
    """The oracle: the base with the task's adapters in its own blocks (fresh, zero-output
    adapters in the blocks the task leaves alone) and the task's head as its only head."""
    t = model.spec.tasks[name]
    encoder = replace(model.spec.encoder, adapter=t.adapter, adapter_dim=t.adapter_dim) if t.adapter != "none" else model.spec.encoder
    plain = AudioTransformer(ModelSpec(encoder, model.spec.fbank, {name: t.head}, model.spec.stream)).eval()
    state = {k: v for k, v in model.state_dict().items() if k.startswith("encoder.")}
    for key, value in model.tasks[name].state_dict().items():
        _, block, rest = key.split(".", 2) if key.startswith("blocks.") else (None, None, key)
        state[f"encoder.blocks.{block}.{rest}" if block else f"heads.{name}.{rest.removeprefix('head.')}"] = value
    missing, unexpected = plain.load_state_dict(state, strict=False)
    assert not unexpected and all(".adapter" in k for k in missing)
    return plain


@pytest.mark.parametrize("adapter, layers, encoder", [
    ("conv", 2, BASE_ENCODER), ("conv", 4, BASE_ENCODER), ("aat", 1, BASE_ENCODER), ("mlp", 3, BASE_ENCODER), ("none", 0, BASE_ENCODER),
    ("conv", 2, EncoderConfig.named("nano", attention="fta", cls_tokens=1)),  # FTA and a cls token: the grid the adapters convolve over
])
def test_a_task_is_its_adapters_on_the_base(adapter, layers, encoder):
    model = with_tasks(encoder, door=task(adapter, 8, layers))
    x = torch.randn(3, model.spec.window_frames, 128)
    with torch.no_grad():
        got, expected = model(x, ("door",))["door"], as_plain_model(model, "door")(x)["door"]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_an_output_is_the_same_whatever_else_runs_beside_it():
    """The base's blocks run once for every output; no head or task sees another's adapters."""
    model = with_tasks(door=task("conv", 8, 2), shout=task("aat", 4, 3, kind="keywords", labels=("hey", "_unknown_")), probe=task("none"))
    x = torch.randn(2, model.spec.window_frames, 128)
    with torch.no_grad():
        together = model(x)
        assert list(together) == ["tags", "keywords", "door", "shout", "probe"]
        for name in together:
            assert torch.equal(model(x, (name,))[name], together[name]), name
        plain = AudioTransformer(replace(model.spec, tasks={})).eval()
        plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("tasks.")})
        for name, logits in plain(x).items():
            assert torch.equal(logits, together[name])


def test_select_serves_the_chosen_tasks_as_heads_with_their_thresholds():
    spec = with_tasks(door=replace(task(), thresholds={"door": 0.8}), probe=task("none")).spec
    assert list(spec.select().heads) == ["tags", "keywords", "door", "probe"]
    chosen = spec.select(("door",))
    assert list(chosen.heads) == ["door"] and chosen.thresholds == {"door": {"door": 0.8}} and not chosen.tasks
    assert list(spec.select((BASE, "probe")).heads) == ["tags", "keywords", "probe"]
    with pytest.raises(SpecError, match="no task 'bell'; this model has base, door, probe"):
        spec.select(("bell",))
    assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


@pytest.mark.parametrize("name, config, message", [
    ("tags", task(), "task name 'tags': use letters"),
    ("base", task(), "task name 'base'"),
    ("a.b", task(), "task name 'a.b'"),
    ("door", task(layers=5), "task 'door': adapts 5 blocks of a 4-block encoder"),
    ("door", replace(task(), thresholds={"bell": 0.5}), "thresholds for task 'door' name labels it does not have: bell"),
])
def test_a_task_that_cannot_run_on_its_base_is_refused(name, config, message):
    with pytest.raises(SpecError, match=message.replace(".", r"\.")):
        replace(make_spec(BASE_ENCODER, {"tags": ["a"]}), tasks={name: config})


def test_task_configs_refuse_adapters_without_a_place():
    with pytest.raises(ValueError, match="a linear task"):
        TaskConfig(HeadConfig("tags", ("a",)), "none", 8, 0)
    with pytest.raises(ValueError, match="needs adapter_dim >= 1 and layers >= 1"):
        TaskConfig(HeadConfig("tags", ("a",)), "conv", 8, 0)
    with pytest.raises(SpecError, match="mamba blocks have no MLP"):
        replace(make_spec(EncoderConfig.named("nano", encoder="mamba"), {"tags": ["a"]}), tasks={"door": task()})


# ---------------------------------------------------------------------------------------------
# Adding tasks with train.finetune --task


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    """A base, then task "sound" (conv adapters in the last two blocks) added to it, then task
    "probe" (a linear probe) added to that: the three checkpoints."""
    root = tmp_path_factory.mktemp("tasks")
    data = make_dataset(root / "data", clips=16)
    torch.manual_seed(0)
    base = AudioTransformer(make_spec(BASE_ENCODER, {"tags": ["a", "b"]}, stream=(0.5, 0.25)))
    save(root / "base.safetensors", base)
    common = dict(train=[str(data)], size="nano", epochs=10, batch_size=4, lr=3e-3, stream=base.spec.stream, val_percent=25, augment=AugmentConfig.off())
    finetune(FinetuneConfig(**common, init=str(root / "base.safetensors"), out=str(root / "sound"), task="sound", mode="adapter", adapter="conv",
                            adapter_dim=8, adapter_layers=2), device="cpu")
    finetune(FinetuneConfig(**common, init=str(root / "sound" / "best.safetensors"), out=str(root / "probe"), task="probe", mode="linear"), device="cpu")
    return root / "base.safetensors", root / "sound" / "best.safetensors", root / "probe" / "best.safetensors"


def test_adding_a_task_changes_no_byte_of_the_base_or_of_other_tasks(grown):
    base, one, two = (digests(p) for p in grown)
    assert set(one) == {"base", "sound"} and set(two) == {"base", "sound", "probe"}
    assert base["base"] == one["base"] == two["base"]
    assert one["sound"] == two["sound"]
    spec = read_spec(grown[2])
    assert spec.tasks["sound"].layers == 2 and spec.tasks["probe"].adapter == "none"
    assert spec.provenance == read_spec(grown[0]).provenance  # the run's record went to the task
    assert spec.tasks["probe"].provenance["stage"] == "finetune" and spec.tasks["probe"].provenance["config"]["task"] == "probe"


def test_a_task_learns_its_head(grown):
    """Tone against noise through adapters on a random base, and through a linear probe: each
    task trained, its adapters too."""
    spec = read_spec(grown[2])
    assert spec.tasks["sound"].provenance["validation"]["sound"]["accuracy"] >= 0.8
    assert spec.tasks["probe"].provenance["validation"]["probe"]["accuracy"] >= 0.8
    ups = [v for k, v in load_model(grown[2]).state_dict().items() if k.startswith("tasks.sound.blocks.") and ".up.weight" in k]
    assert len(ups) == 4 and all(v.abs().sum() > 0 for v in ups)  # two blocks, an adapter beside attention and one beside the MLP


def test_file_task_gives_the_task_run_on_its_own(grown, tmp_path):
    """`edgetag file --task` reports the events of the task alone; run beside the base and the
    other task, its events are the same."""
    import soundfile as sf

    rng = np.random.default_rng(1)
    t = np.arange(16000 * 3) / 16000
    clip = np.concatenate([0.1 * rng.standard_normal(len(t)), 0.3 * np.sin(2 * np.pi * 1000 * t)]).astype(np.float32)
    sf.write(tmp_path / "clip.wav", clip, 16000)

    def events(*args):
        run = subprocess.run([sys.executable, "-m", "edgetag", "file", str(tmp_path / "clip.wav"), "--model", str(grown[2]), "--json", "--tag-on", "0.3", *args],
                             cwd=REPO, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        return [json.loads(line) for line in run.stdout.splitlines()]

    alone, beside = events("--task", "sound"), events()
    assert alone and {e["task"] for e in alone} == {"sound"} and {e["label"] for e in alone} <= {"noise", "tone"}
    assert [e for e in beside if e.get("task") == "sound"] == alone
    assert {e.get("task") for e in beside} > {"sound"}  # the base's events (no task) and the probe's ran too
    run = subprocess.run([sys.executable, "-m", "edgetag", "file", str(tmp_path / "clip.wav"), "--model", str(grown[2]), "--task", "bell"],
                         cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.strip() == f"edgetag: error: {grown[2]}: no task 'bell'; this model has base, sound, probe"


def test_task_backends_agree_and_skip_what_they_do_not_run(grown):
    model = load_model(grown[2])
    x = np.random.default_rng(0).standard_normal((4, model.spec.window_frames, 128)).astype(np.float32)
    every = TorchBackend(model).forward(x)
    sound = load_backend(grown[2], "torch", tasks=("sound",))
    assert list(sound.spec.heads) == ["sound"]
    np.testing.assert_array_equal(sound.forward(x)["sound"], every["sound"])
    with pytest.raises(BackendError, match="no task 'bell'"):
        load_backend(grown[2], "torch", tasks=("bell",))


def test_tasks_export_to_onnx_and_run_by_name(grown, tmp_path):
    pytest.importorskip("onnxscript")
    from deploy.export import export

    export(grown[2], tmp_path / "export", calibration=[str(REPO / "edgetag" / "assets" / "example.flac")], calibration_windows_count=8)
    model = load_model(grown[2])
    x = np.random.default_rng(0).standard_normal((3, model.spec.window_frames, 128)).astype(np.float32)
    expected = TorchBackend(model).forward(x)
    onnx = load_backend(tmp_path / "export" / "model.onnx", tasks=("probe", "sound"))
    assert list(onnx.spec.heads) == ["probe", "sound"]
    got = onnx.forward(x)
    assert list(got) == ["sound", "probe"]  # the file's order
    for name in got:
        np.testing.assert_allclose(got[name], expected[name], atol=1e-5)


def test_bench_tasks_prints_what_each_task_adds(grown):
    run = subprocess.run([sys.executable, "-m", "edgetag", "bench", "tasks", "--model", str(grown[2]), "--backend", "torch", "--seconds", "3", "--repeats", "1"],
                         cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    from edgetag.bench import task_costs

    r = task_costs(grown[2], "torch", seconds=3, repeats=1)
    assert list(r["rows"]) == ["base", "base + sound", "base + probe", "base + every task"]
    assert r["tasks"] == {"sound": {"adapter": "conv", "layers": 2, "adapter_dim": 8}, "probe": {"adapter": "none", "layers": 0, "adapter_dim": 0}}
    assert all(row["encoder_median_s"] > 0 for row in r["rows"].values())
    assert re.search(r"every task beside the base: \d+\.\d\dx the base's encoder time per hop\n$", run.stdout)
    none = subprocess.run([sys.executable, "-m", "edgetag", "bench", "tasks", "--model", str(grown[0])], cwd=REPO, capture_output=True, text=True)
    assert none.returncode == 2 and none.stderr.strip() == f"edgetag: error: {grown[0]}: has no tasks (add some with edgetag learn or train.finetune --task)"
    bad = subprocess.run([sys.executable, "-m", "edgetag", "bench", "tasks", "--model", str(grown[2]), "--repeats", "0"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip() == "edgetag: error: --repeats: 0 is not in [1, 100]"


def test_a_task_name_is_added_once(grown, tmp_path):
    with pytest.raises(ValueError, match="has that task already; choose another name"):
        finetune(FinetuneConfig(train=[str(grown[0].parent / "data")], init=str(grown[2]), out=str(tmp_path), task="sound", mode="linear", epochs=1), device="cpu")


@pytest.mark.slow
def test_continual_benchmark_keeps_every_task_with_tasks_and_forgets_with_full_fine_tuning(tmp_path):
    """Two tasks in turn on an encoder: linear probes as tasks score exactly what they scored
    when learned; full fine-tuning in sequence moves the first task's encoder."""
    from conftest import DATA, data_path

    data_path("dcase2016_task2")
    data_path("urbansound8k")
    torch.manual_seed(0)
    save(tmp_path / "encoder.safetensors", AudioTransformer(make_spec(EncoderConfig.named("nano"), {})))
    run = subprocess.run([sys.executable, "-m", "train.bench_continual", "--data", str(DATA), "--init", str(tmp_path / "encoder.safetensors"),
                          "--tasks", "dcase", "--tasks", "urbansound8k", "--methods", "linear", "--methods", "full", "--attentions", "full",
                          "--epochs", "1", "--out", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    linear, full = results["variants"]
    assert [list(row) for row in linear["matrix"]] == [["dcase"], ["dcase", "urbansound8k"]]
    assert linear["matrix"][1]["dcase"] == linear["matrix"][0]["dcase"]  # a frozen base: the same clips, the same answers
    assert full["steps"][0]["trainable_share"] > 1 > linear["steps"][0]["trainable_share"]
    assert run.stdout.strip().splitlines()[-1].startswith("continual full/full mean ")
    assert (tmp_path / "out" / "continual.png").stat().st_size > 0


def test_the_continual_table_averages_the_seeds_and_keeps_runs_recorded_before_seeds():
    """Each cell is the mean over a variant's seeds and the mean column gives their range; a run
    recorded without a seed was seed 0."""
    from train.bench_continual import grouped, identity, render

    def run(method, final, **seed):
        matrix = [{"a": 0.5}, {"a": final, "b": final}]
        return {"method": method, "attention": "full", "matrix": matrix, "steps": [{"trainable_share": 0.1, "seconds": 2.0}] * 2, **seed}

    results = {"tasks": ["a", "b"], "variants": [run("conv", 0.2), run("conv", 0.4, seed=1), run("linear", 0.3, seed=0)]}
    assert identity(results["variants"][0]) == ("conv", "full", 0)
    assert [len(v) for v in grouped(results["variants"]).values()] == [2, 1]
    table = render(results).splitlines()
    assert table[2] == "| conv | full | 2 | 30.0% | 30.0% | 30.0% (20.0-40.0) | 20.0 points | 10.0% | 2 |"
    assert table[3] == "| linear | full | 1 | 30.0% | 30.0% | 30.0% | 20.0 points | 10.0% | 2 |"
