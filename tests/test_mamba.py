"""SSAMBA's Mamba encoder: the parallel scan against the recurrence it computes (values and
gradients), the bidirectional mixer's directions, sizes against the transformer's and the
paper's, and the model through checkpoints, the streaming engine, pretraining and `edgetag file`."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, assert_streaming_equals_offline, make_dataset, make_model

from edgetag import checkpoint
from edgetag.mamba import BiMamba, associative_scan, selective_scan, selective_scan_reference
from edgetag.model import Encoder, num_parameters
from edgetag.spec import MAMBA_SIZES, EncoderConfig

HEADS = {"tags": ["a", "b", "c"], "keywords": ["yes", "no", "_unknown_", "_silence_"]}


def scan_inputs(L: int, seed: int = 0, dtype=torch.float32, batch: int = 2, inner: int = 8, state: int = 4):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, L, inner, generator=g, dtype=dtype)
    dt = torch.nn.functional.softplus(torch.randn(batch, L, inner, generator=g, dtype=dtype))
    A = -4 * torch.rand(inner, state, generator=g, dtype=dtype)  # decays as Mamba's init gives them: exp(dt A) in (0, 1)
    B, C = torch.randn(batch, L, state, generator=g, dtype=dtype), torch.randn(batch, L, state, generator=g, dtype=dtype)
    D = torch.randn(inner, generator=g, dtype=dtype)
    return u, dt, A, B, C, D


@pytest.mark.parametrize("L", [1, 2, 3, 7, 48, 100, 257])
@pytest.mark.parametrize("chunk", [5, None, 4096])
def test_scan_computes_the_recurrence(L, chunk):
    """To float32 rounding (1e-5) for lengths that are not powers of two, whole or in chunks
    that carry the state across (chunk 5 splits every length above 5)."""
    args = scan_inputs(L)
    torch.testing.assert_close(selective_scan(*args, chunk=chunk), selective_scan_reference(*args), rtol=0, atol=1e-5)


def test_associative_scan_is_the_linear_recurrence():
    a, b = torch.rand(1, 13, 3), torch.randn(1, 13, 3)
    h, expected = torch.zeros(1, 3), []
    for t in range(13):
        h = a[:, t] * h + b[:, t]
        expected.append(h)
    torch.testing.assert_close(associative_scan(a, b), torch.stack(expected, dim=1))


@pytest.mark.parametrize("L, chunk", [(37, 4096), (37, 8)])
def test_scan_gradients_are_the_recurrences(L, chunk):
    """Every input's gradient equals the step-by-step reference's (float64, so the comparison
    is of the algorithms, not of their rounding)."""
    inputs = [x.requires_grad_() for x in scan_inputs(L, seed=1, dtype=torch.float64)]
    weights = torch.randn(2, L, 8, dtype=torch.float64)
    grads = torch.autograd.grad((selective_scan(*inputs, chunk=chunk) * weights).sum(), inputs)
    expected = torch.autograd.grad((selective_scan_reference(*inputs) * weights).sum(), inputs)
    for name, got, want in zip("u dt A B C D".split(), grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=name)


def test_scan_passes_gradcheck():
    inputs = tuple(x.requires_grad_() for x in scan_inputs(6, seed=2, dtype=torch.float64, batch=1, inner=2, state=2))
    assert torch.autograd.gradcheck(lambda *x: selective_scan(*x, chunk=4), inputs)


def test_cuda_kernel_matches_the_pytorch_scan():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU: mamba-ssm's kernel runs only there")
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn  # noqa: F401
    except Exception as e:
        pytest.skip(f"mamba-ssm's CUDA kernel is not importable: {e}")
    from edgetag import mamba

    args = [x.cuda() for x in scan_inputs(300, inner=64, state=16)]
    kernel = mamba.selective_scan(*args)
    kernel_free, mamba._cuda_scan = mamba._cuda_scan, None
    try:
        pytorch = mamba.selective_scan(*args)
    finally:
        mamba._cuda_scan = kernel_free
    torch.testing.assert_close(kernel, pytorch, rtol=0, atol=1e-4)


def test_forward_branch_is_causal_and_the_mixer_sees_both_ways():
    """The forward SSM's output at t depends on no input after t (exactly zero gradient); the
    mixer's first output depends on the last input, through the backward branch."""
    torch.manual_seed(0)
    mixer = BiMamba(16)
    x = torch.randn(1, 20, 16, requires_grad=True)
    inner = mixer.in_proj(x).chunk(2, dim=-1)[0]
    (past,) = torch.autograd.grad(mixer.forward_ssm(inner)[:, :15].sum(), x)
    assert past[:, 15:].abs().max() == 0 and past[:, :15].abs().min() > 0
    (first,) = torch.autograd.grad(mixer(x)[:, 0].sum(), x)
    assert first[:, -1].abs().max() > 0


def test_mamba_sizes_match_the_transformer_and_ssambas():
    for name in ("nano", "mini", "tiny", "small", "base"):
        mamba = num_parameters(Encoder(EncoderConfig.named(name, encoder="mamba")))
        transformer = num_parameters(Encoder(EncoderConfig.named(name)))
        assert abs(mamba / transformer - 1) < 0.05, name
    # SSAMBA's encoders: about 6.9M / 25M / 97M parameters (seed_systems.md), 24 layers each
    for name, millions in (("ssamba-tiny", 6.9), ("ssamba-small", 25), ("ssamba-base", 97)):
        assert MAMBA_SIZES[name]["depth"] == 24
        assert abs(num_parameters(Encoder(EncoderConfig.named(name, encoder="mamba"))) / 1e6 / millions - 1) < 0.05, name
    with pytest.raises(ValueError, match="unknown size 'ssamba-tiny'"):
        EncoderConfig.named("ssamba-tiny")
    with pytest.raises(ValueError, match="no MLP to put adapters beside"):
        EncoderConfig.named("nano", encoder="mamba", adapter_dim=8)
    with pytest.raises(ValueError, match="encoder must be one of transformer, mamba"):
        EncoderConfig(encoder="rwkv")


@pytest.fixture(scope="module")
def mamba_model(tmp_path_factory):
    torch.manual_seed(0)
    model = make_model(EncoderConfig.named("nano", encoder="mamba"), HEADS, stream=(1.0, 0.25))
    return checkpoint.save(tmp_path_factory.mktemp("mamba") / "model.safetensors", model)


def test_checkpoint_round_trip_is_bit_identical(mamba_model, tmp_path):
    model = checkpoint.load_model(mamba_model)
    again = checkpoint.load_model(checkpoint.save(tmp_path / "again.safetensors", model))
    assert again.spec.encoder.encoder == "mamba" and again.spec == model.spec
    x = torch.randn(3, 100, 128)
    with torch.no_grad():
        for name, logits in model(x).items():
            assert torch.equal(again(x)[name], logits)


def test_streaming_equals_offline(mamba_model):
    """Per hop, the engine's probabilities are the offline windows' (the bundled example)."""
    assert_streaming_equals_offline(mamba_model)


def test_pretrain_resume_finetune_and_edgetag_file(tmp_path):
    """`python -m train.pretrain --encoder mamba` trains and resumes; fine-tuning from its encoder
    gives a checkpoint `edgetag file --model` runs, with events (a tone, noise and near-silence)."""
    from test_pretrain import synthetic_corpus

    from train.augment import AugmentConfig
    from train.finetune import FinetuneConfig, finetune
    from train.pretrain import PretrainConfig, pretrain

    corpus = synthetic_corpus(tmp_path / "corpus", n=12)
    out = tmp_path / "pre"
    command = [sys.executable, "-m", "train.pretrain", "--data", str(corpus), "--out", str(out), "--encoder", "mamba", "--method", "ssast",
               "--size", "nano", "--frames", "64", "--batch-size", "4", "--lr", "1e-3", "--warmup-steps", "2", "--checkpoint-every", "4", "--num-workers", "0"]
    for steps in (4, 8):
        done = subprocess.run([*command, "--steps", str(steps), "--resume"], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["step"] == 8 and [r["step"] for r in state["rows"]] == list(range(1, 9))
    encoder = checkpoint.load_model(out / "encoder.safetensors")
    assert encoder.spec.encoder.encoder == "mamba" and encoder.spec.provenance["pretrain"]["encoder"] == "mamba"
    assert PretrainConfig(data=["x"], encoder="mamba", size="ssamba-tiny").encoder_config().depth == 24
    rows = pretrain(PretrainConfig(data=[str(corpus)], out=str(tmp_path / "mae"), encoder="mamba", method="mae-ast", size="nano", frames=64,
                                   batch_size=4, steps=2, warmup_steps=1, num_workers=0), device="cpu")
    assert len(rows) == 2 and np.isfinite(rows[-1]["loss"])  # MAE-style: the scan reads the visible tokens, in order

    data = make_dataset(tmp_path / "data", clips=12, seconds=1.0, silence=True)
    finetune(FinetuneConfig(train=[str(data)], out=str(tmp_path / "ft"), init=str(out / "encoder.safetensors"), epochs=20, batch_size=8, lr=3e-3,
                            val_percent=25, augment=AugmentConfig.off()), device="cpu")
    scene = tmp_path / "scene.wav"
    import soundfile as sf

    rng, t = np.random.default_rng(5), np.arange(32000) / 16000
    quiet = lambda s: 1e-4 * rng.standard_normal(int(s * 16000))  # noqa: E731
    sf.write(scene, np.concatenate([quiet(1), 0.3 * np.sin(2 * np.pi * 1000 * t), quiet(1), 0.1 * rng.standard_normal(32000), quiet(1)]).astype(np.float32), 16000)
    result = subprocess.run([sys.executable, "-m", "edgetag", "file", str(scene), "--model", str(tmp_path / "ft" / "best.safetensors"), "--json"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert events and all(e["file"] == str(scene) for e in events)
