"""EfficientAT's MobileNetV3 as an edgetag encoder: the import against the reference model, its
front end against EfficientAT's, streaming, and what the spec refuses it."""

import json

import numpy as np
import pytest
import torch

from edgetag import checkpoint
from edgetag.features import EFFICIENTAT_BANDS, EFFICIENTAT_HIGH, mel_banks, preset
from edgetag.spec import TAGS, EncoderConfig, HeadConfig, SpecError, TaskConfig
from tests.conftest import DATA, REPO, assert_streaming_equals_offline, make_model, make_spec

MN04 = EncoderConfig.named("mn04", encoder="mobilenet", n_mels=EFFICIENTAT_BANDS)
TEACHER = REPO.parent / "shared" / "teachers" / "efficientat_mn04_as" / "mn04_as_mAP_432.pt"


def fake_audioset(root, classes: int):
    """class_labels_indices.csv and ontology.json for `classes` made-up classes, the first the parent of the rest."""
    root.mkdir()
    mids = [f"/m/{i}" for i in range(classes)]
    (root / "class_labels_indices.csv").write_text("index,mid,display_name\n" + "".join(f'{i},{m},"Class {i}"\n' for i, m in enumerate(mids)))
    (root / "ontology.json").write_text(json.dumps([{"id": mids[0], "child_ids": mids[1:]}, *({"id": m, "child_ids": []} for m in mids[1:])]))
    return root


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """EfficientAT's model (train.teachers.MobileNetAT, the teachers' reference) with random
    weights and batch-norm statistics, saved as its checkpoints are, and its edgetag import."""
    from train.convert import convert
    from train.teachers import MobileNetAT

    torch.manual_seed(0)
    model = MobileNetAT(width=0.4, classes=5).train()
    with torch.no_grad():
        model(torch.randn(8, 1, EFFICIENTAT_BANDS, 98))
    tmp = tmp_path_factory.mktemp("efficientat")
    torch.save(model.state_dict(), tmp / "mn04.pt")
    path = convert("efficientat", tmp / "mn04.pt", tmp / "model.safetensors", audioset=fake_audioset(tmp / "audioset", 5))
    return model.eval(), path, tmp


def test_the_import_computes_the_reference_model_exactly(reference):
    model, path, _ = reference
    ours = checkpoint.load_model(path)
    assert ours.spec.encoder.encoder == "mobilenet" and ours.spec.fbank == preset("efficientat")
    assert ours.spec.heads[TAGS].labels == tuple(f"Class {i}" for i in range(5))
    assert ours.spec.heads[TAGS].parents["Class 3"] == ("Class 0",)
    x = torch.randn(3, 98, EFFICIENTAT_BANDS)
    with torch.no_grad():
        np.testing.assert_allclose(ours(x)[TAGS].numpy(), model(x.transpose(1, 2)[:, None]).numpy(), atol=1e-5)


def test_the_import_refuses_what_does_not_fit(reference, tmp_path):
    from train.convert import ConvertError, convert

    _, _, folder = reference
    with pytest.raises(ConvertError, match="not AudioSet's 4"):  # a head of 5 classes against 4 names
        convert("efficientat", folder / "mn04.pt", tmp_path / "x.safetensors", audioset=fake_audioset(tmp_path / "four", 4))
    with pytest.raises(ConvertError, match="needs --audioset"):
        convert("efficientat", folder / "mn04.pt", tmp_path / "x.safetensors")


def test_the_preset_has_efficientats_mel_bands_on_a_16_khz_grid():
    """A 512-point FFT at 16 kHz has the bins of EfficientAT's 1024-point FFT at 32 kHz below
    8 kHz; the preset's bands are its first 103 there, weight for weight, and none of its other
    bands ends below 8 kHz."""
    ours = mel_banks(EFFICIENTAT_BANDS, 512, 16000, 0.0, EFFICIENTAT_HIGH)  # [257 bins, 103]
    theirs = mel_banks(128, 1024, 32000, 0.0, 15000.0)  # [513 bins, 128]
    np.testing.assert_array_equal(ours, theirs[:257, :EFFICIENTAT_BANDS])
    assert not theirs[257:, :EFFICIENTAT_BANDS].any() and theirs[257:, EFFICIENTAT_BANDS].any()
    assert preset("efficientat").n_features == MN04.n_mels


def test_streaming_equals_offline(tmp_path):
    torch.manual_seed(0)
    model = make_model(MN04, {TAGS: ["a", "b"], "keywords": ["yes", "_unknown_"]}, fbank=preset("efficientat"), stream=(1.0, 0.25))
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 98, EFFICIENTAT_BANDS))  # batch-norm statistics that are not the identity
    assert_streaming_equals_offline(checkpoint.save(tmp_path / "model.safetensors", model.eval()))


def test_the_spec_refuses_what_a_mobilenet_lacks():
    with pytest.raises(ValueError, match="projects to 512, not width 256"):
        EncoderConfig.named("mn04", encoder="mobilenet", width=256)
    for blocks in ({"attention": "fta"}, {"adapter_dim": 8}):
        with pytest.raises(ValueError, match="no attention to factorise nor blocks"):
            EncoderConfig.named("mn04", encoder="mobilenet", **blocks)
    head = HeadConfig(TAGS, ("a",))
    with pytest.raises(SpecError, match="mobilenet blocks have no MLP"):
        make_spec(MN04, {TAGS: ["x"]}, fbank=preset("efficientat"), tasks={"new": TaskConfig(head, "conv", 8, 2)})


def test_a_linear_task_reads_the_embedding():
    model = make_model(MN04, {TAGS: ["x"]}, fbank=preset("efficientat"), tasks={"new": TaskConfig(HeadConfig(TAGS, ("a", "b")))}).eval()
    x = torch.randn(2, 98, EFFICIENTAT_BANDS)
    with torch.no_grad():
        out = model(x)
        np.testing.assert_allclose(out["new"].numpy(), model.tasks["new"].head(model.embedding(x)).numpy(), atol=1e-6)
        np.testing.assert_array_equal(model(x, ("new",))["new"].numpy(), out["new"].numpy())


def test_the_encoder_splits_between_any_two_blocks():
    """What enters block k, run on from block k, is the whole encoder's output: train.refit trains
    the blocks above k on the trunk's output, and a linear task's branch is what follows the last."""
    torch.manual_seed(0)
    model = make_model(MN04, {TAGS: ["x"]}, fbank=preset("efficientat")).eval()
    x = torch.randn(3, 98, EFFICIENTAT_BANDS)
    with torch.no_grad():
        whole = model.encoder(x)
        for k in range(model.encoder.split_layers + 1):
            torch.testing.assert_close(model.encoder.forward_from(model.encoder.forward_trunk(x, k), k), whole, rtol=0, atol=1e-6)


def test_pretraining_refuses_a_mobilenet():
    from train.pretrain import PretrainConfig

    with pytest.raises(ValueError, match="encoder must be one of transformer, mamba"):
        PretrainConfig(encoder="mobilenet", size="mn04")


def test_imported_mn04_hears_a_dog_as_its_reference_does(tmp_path):
    """The real mn04 (../shared/teachers) in edgetag, on the preset's 16 kHz features, against
    the teacher on its own 32 kHz front end (train.teachers): for a bark, both rank Dog among
    their three top classes (Animal and Domestic animals, its ancestors, beside it), and their
    top fives mostly agree."""
    if not TEACHER.is_file() or not (DATA / "audioset").is_dir():
        pytest.skip(f"needs {TEACHER} and {DATA / 'audioset'}")
    from edgetag import audio
    from edgetag.runtime import clip_probabilities, load_backend
    from edgetag.features import fbank
    from train.convert import convert
    from train.teachers import AudioSetTeacher

    clip = DATA / "esc50" / "audio" / "4-183992-A-0.flac"  # dog
    backend = load_backend(convert("efficientat", TEACHER, tmp_path / "mn04.safetensors", audioset=DATA / "audioset"))
    x = audio.load(clip)
    ours = clip_probabilities(backend, [fbank(x, backend.spec.fbank)])[0][TAGS].mean(0)
    theirs = AudioSetTeacher(TEACHER, DATA / "audioset" / "class_labels_indices.csv")(x[None, :16000 * 5])[0]
    labels = backend.spec.heads[TAGS].labels
    top = lambda p, k: {labels[i] for i in np.argsort(-p)[:k]}  # noqa: E731
    assert "Dog" in top(ours, 3) and "Dog" in top(theirs, 3)
    assert len(top(ours, 5) & top(theirs, 5)) >= 3, (top(ours, 5), top(theirs, 5))


def test_the_torch_backend_runs_a_folded_copy_and_leaves_the_model_as_it_was():
    """Batch norms folded into the convolutions (edgetag.model.for_inference) answer as the
    model does; the model keeps its batch norms, so training can go on."""
    from edgetag.model import for_inference
    from edgetag.runtime import TorchBackend

    torch.manual_seed(0)
    model = make_model(MN04, {TAGS: ["a", "b"]}, fbank=preset("efficientat")).train()
    with torch.no_grad():
        model(torch.randn(8, 98, EFFICIENTAT_BANDS))
    model.eval()
    x = np.random.default_rng(0).standard_normal((2, 98, EFFICIENTAT_BANDS)).astype(np.float32)
    with torch.no_grad():
        expected = model.probabilities(torch.from_numpy(x))[TAGS].numpy()
    np.testing.assert_allclose(TorchBackend(model).forward(x)[TAGS], expected, atol=1e-5)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in for_inference(model).modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 46
