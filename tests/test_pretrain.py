"""MAE-AST masking and losses, the SSAST baseline, TERA's alterations, and short pretraining runs."""

import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import DATA, REPO, data_path, sine_sweep, white_noise

from edgetag import load_model
from edgetag.model import patchify
from edgetag.spec import EncoderConfig
from train.objectives.mae import MAEAST, chunk_noise, info_nce, num_masked, random_masking
from train.objectives.ssast import SSAST
from train.objectives.tera import TERA, TeraConfig, alter, cells, time_spans
from train.pretrain import PretrainConfig, pretrain


@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.9])
def test_random_masking_masks_exactly_and_ids_restore_restores(ratio):
    torch.manual_seed(0)
    x = torch.randn(4, 48, 8)
    visible, mask, ids_restore = random_masking(x, ratio)
    keep = max(1, int(48 * (1 - ratio)))
    assert visible.shape == (4, keep, 8)
    assert (mask.sum(dim=1) == 48 - keep).all() and ((mask == 0) | (mask == 1)).all()
    # the visible tokens are the unmasked ones, in their order (a Mamba encoder scans them); ids_restore undoes the shuffle
    for b in range(4):
        torch.testing.assert_close(visible[b], x[b][mask[b] == 0], rtol=0, atol=0)
    full = torch.cat([visible, torch.zeros(4, 48 - keep, 8)], dim=1)
    restored = torch.gather(full, 1, ids_restore[:, :, None].expand(-1, -1, 8))
    torch.testing.assert_close(restored[mask == 0], x[mask == 0])


def test_masks_differ_per_clip():
    _, mask, _ = random_masking(torch.randn(2, 64, 4), 0.75)
    assert not torch.equal(mask[0], mask[1])
    chunks = chunk_noise(2, 16, 8, 96) >= 1
    assert not torch.equal(chunks[0], chunks[1])


def isolated_cells(grid: torch.Tensor) -> int:
    """Masked cells with no masked neighbour along time or frequency."""
    padded = torch.nn.functional.pad(grid.float()[None, None], (1, 1, 1, 1))[0, 0]
    neighbours = padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:]
    return int((grid & (neighbours == 0)).sum())


@pytest.mark.parametrize("time_patches, freq_patches", [(64, 8), (200, 1)])
def test_chunk_masks_form_contiguous_blocks(time_patches, freq_patches):
    torch.manual_seed(0)
    n = time_patches * freq_patches
    count = n // 4  # sparse, so blocks are told apart from scattered cells
    noise = chunk_noise(8, time_patches, freq_patches, count)
    masks = noise >= 1
    assert (masks.sum(dim=1) == count).all()
    for m in masks:
        # only the trimmed last chunk may leave a lone cell; a random mask leaves dozens
        assert isolated_cells(m.view(time_patches, freq_patches)) <= 1
    scattered = torch.zeros(n, dtype=torch.bool)
    scattered[torch.randperm(n)[:count]] = True
    assert isolated_cells(scattered.view(time_patches, freq_patches)) > 10
    # the noise hands the same machinery the masked tokens last
    _, mask, _ = random_masking(torch.randn(8, n, 2), 1 - (n - count) / n, noise)
    assert torch.equal(mask.bool(), masks)


def test_num_masked_matches_mae_ast_keep_rule():
    assert num_masked(512, 0.75) == 384 and num_masked(3, 0.75) == 2 and num_masked(1, 0.75) == 0


def test_info_nce_rewards_matching_pairs():
    target = torch.randn(2, 6, 16)
    good, accuracy = info_nce(target * 5, target)
    bad, _ = info_nce(torch.randn(2, 6, 16), target)
    assert good < bad and accuracy == 1.0


@pytest.mark.parametrize("masking", ["random", "chunk"])
@pytest.mark.parametrize("tokens, encoder", [("patch", "transformer"), ("frame", "transformer"), ("patch", "mamba")])
def test_mae_encoder_sees_only_visible_tokens(masking, tokens, encoder):
    config = EncoderConfig.named("nano", encoder=encoder, tokens=tokens)
    model = MAEAST(config, masking=masking)
    features = torch.randn(2, 96, 128)
    n = config.num_tokens(96)
    seen = []
    model.encoder.blocks[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    latent, mask, ids_restore = model.forward_encoder(features)
    assert seen == [n - num_masked(n, 0.75)] and latent.shape == (2, seen[0], config.width)
    reconstruction, contrastive = model.forward_decoder(latent, ids_restore)
    assert reconstruction.shape == contrastive.shape == (2, n, config.patch_dim)


def test_mae_loss_only_counts_masked_tokens():
    config = EncoderConfig.named("nano")
    model = MAEAST(config, contrastive_weight=0.0)
    features = torch.randn(2, 64, 128)
    target = patchify(features, config)
    _, mask, _ = model.forward_encoder(features)
    perfect_where_masked = torch.where(mask[:, :, None].bool(), target, torch.randn_like(target) * 100)
    loss, metrics = model.forward_loss(features, perfect_where_masked, perfect_where_masked, mask)
    assert loss.item() == pytest.approx(0.0, abs=1e-6) and set(metrics) == {"mse"}


def test_mae_every_parameter_gets_a_gradient():
    model = MAEAST(EncoderConfig.named("nano"))
    loss, metrics, _ = model(torch.randn(2, 64, 128))
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing and set(metrics) == {"mse", "nce", "nce_acc"}


def test_ssast_runs_the_full_encoder_twice_per_step():
    config = EncoderConfig.named("nano")
    model = SSAST(config)
    calls = []
    model.encoder.blocks[0].register_forward_hook(lambda m, i, o: calls.append(i[0].shape[1]))
    loss, metrics, mask = model(torch.randn(2, 64, 128))
    assert calls == [config.num_tokens(64)] * 2  # all tokens, two passes
    assert (mask.sum(dim=1) == num_masked(config.num_tokens(64), 0.75)).all()
    loss.backward()
    assert model.mask_embed.grad.abs().sum() > 0 and set(metrics) == {"mse", "nce", "nce_acc"}


# ---------------------------------------------------------------------------------------------
# Short runs


def synthetic_corpus(folder, n=24):
    """Tones, chirps and noise bursts: structure a masked model can learn to fill in."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        kind = i % 3
        if kind == 0:
            t = np.arange(16000) / 16000
            x = 0.3 * np.sin(2 * np.pi * rng.uniform(200, 3000) * t)
        elif kind == 1:
            x = sine_sweep(1.0) * 0.5
        else:
            x = white_noise(1.0, seed=i) * np.repeat(rng.uniform(0, 1, 10) > 0.5, 1600)
        sf.write(folder / f"clip{i}.wav", x.astype(np.float32), 16000)
    return folder


def run(tmp_path, data, steps, **overrides):
    settings = dict(size="nano", frames=64, batch_size=8, lr=1e-3, warmup_steps=5, checkpoint_every=10, num_workers=0, seed=0)
    config = PretrainConfig(data=[str(d) for d in data], out=str(tmp_path / "run"), steps=steps, **{**settings, **overrides})
    return config, pretrain(config, device="cpu")


def loss_fell(rows, window=5):
    first = np.mean([r["loss"] for r in rows[:window]])
    last = np.mean([r["loss"] for r in rows[-window:]])
    return last < 0.8 * first


# ---------------------------------------------------------------------------------------------
# TERA


@pytest.mark.parametrize("frames", [50, 98, 333])
@pytest.mark.parametrize("ratio", [0.15, 0.4])
def test_time_spans_cover_the_requested_share_in_spans(frames, ratio):
    mask = time_spans(16, frames, ratio, 7, torch.Generator().manual_seed(frames))
    assert (mask.sum(1) == round(ratio * frames)).all()
    # in runs of frames, not scattered ones: far fewer runs than masked frames
    runs = (mask[:, 1:] & ~mask[:, :-1]).sum(1) + mask[:, 0]
    assert (runs <= -(-round(ratio * frames) // 7) + 2).all() and not torch.equal(mask[0], mask[1])


def test_alterations_zero_time_spans_and_one_band_and_leave_the_rest():
    x = torch.randn(8, 98, 40) + 3.0  # no zeros of its own
    c = TeraConfig(time_ratio=0.2, freq_width=8, noise_prob=0.0)
    altered_x, altered = alter(x, c, torch.Generator().manual_seed(0))
    torch.testing.assert_close(altered_x[~altered], x[~altered])
    assert (altered_x[altered] == 0).all()
    frames_hit = altered.all(2)  # whole frames: the time spans
    assert (frames_hit.sum(1) >= round(0.2 * 98)).all()
    bands = (altered & ~frames_hit[:, :, None]).any(1)  # [B, F]: the band, outside the spans
    assert (bands.sum(1) <= 8).all() and bands.any()
    for row in bands:  # one contiguous band per clip
        hit = row.nonzero().flatten()
        assert len(hit) == 0 or hit[-1] - hit[0] + 1 == len(hit)
    noisy_x, noisy = alter(x, TeraConfig(time_ratio=0.0, freq_width=0, noise_prob=1.0, noise_std=0.5), torch.Generator().manual_seed(0))
    assert noisy.all() and 0.4 < (noisy_x - x).std() < 0.6


@pytest.mark.parametrize("tokens", ["patch", "frame", "conv"])
def test_tera_loss_counts_only_altered_values_unless_told(tokens):
    config = EncoderConfig.named("nano", tokens=tokens)
    x = torch.randn(2, 98, 128)
    model = TERA(config, TeraConfig(noise_prob=0.0))
    _, altered = alter(x, model.tera, torch.Generator().manual_seed(1))
    target = cells(x, config)
    assert target.shape == (2, config.num_tokens(98), config.patch_dim)
    kept = cells(altered.float(), config) == 0  # values the alterations left alone
    prediction = target.clone()
    prediction[~kept] += 1.0  # off by one wherever the input was altered
    loss, _ = model.forward_loss(x, prediction, altered)
    torch.testing.assert_close(loss, torch.tensor(1.0))
    prediction[kept] += 5.0  # errors where nothing was altered do not count...
    torch.testing.assert_close(model.forward_loss(x, prediction, altered)[0], torch.tensor(1.0))
    model.tera = TeraConfig(noise_prob=0.0, loss_on="all")  # ... unless the loss is on all values
    assert model.forward_loss(x, prediction, altered)[0] > 2.0


def test_mfcc_grams_go_from_tera_pretraining_to_edgetag_file(tmp_path):
    """The MFCC-gram system end to end on real clips, at toy sizes: TERA on 128-MFCC frames,
    keyword fine-tuning from its encoder, `edgetag file` on the result; the checkpoint carries
    the MFCC recipe, so nothing downstream is told what the features are."""
    import json
    import subprocess
    import sys

    from train.finetune import FinetuneConfig, finetune

    sc = data_path("speech_commands")
    config, rows = run(tmp_path, [sc / "yes", sc / "no"], steps=20, method="tera", preset="mfcc-gram", tokens="frame", frames=98)
    assert len(rows) == 20 and all(np.isfinite(r["l1"]) for r in rows)
    encoder = tmp_path / "run" / "encoder.safetensors"
    finetune(FinetuneConfig(train=[f"keywords={sc},groups=20-30"], init=str(encoder), out=str(tmp_path / "ft"), epochs=1, batch_size=16, val_percent=25), device="cpu")
    model = load_model(tmp_path / "ft" / "best.safetensors")
    assert model.spec.fbank.mfcc and model.spec.fbank.n_ceps == model.spec.encoder.n_mels == 128 and model.spec.encoder.tokens == "frame"
    clip = sorted((sc / "yes").glob("*.flac"))[0]
    result = subprocess.run([sys.executable, "-m", "edgetag", "file", str(clip), "--model", str(tmp_path / "ft" / "best.safetensors"), "--json"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert all(json.loads(line)["file"] == str(clip) for line in result.stdout.splitlines())


@pytest.mark.parametrize("method", ["mae-ast", "ssast", "tera"])
def test_short_pretraining_on_synthetic_audio_lowers_the_loss(tmp_path, method):
    torch.manual_seed(0)
    corpus = synthetic_corpus(tmp_path / "corpus")
    (corpus / "broken.wav").write_text("not audio")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config, rows = run(tmp_path, [corpus], steps=40, method=method)
    assert len(rows) == 40 and loss_fell(rows)
    assert any("broken.wav" in str(w.message) for w in caught)  # skipped with a warning, not a crash
    out = tmp_path / "run"
    assert {p.name for p in out.iterdir()} >= {"last.pt", "encoder.safetensors", "loss.csv", "loss.png"}
    encoder = load_model(out / "encoder.safetensors")
    assert encoder.spec.provenance["step"] == 40 and encoder.spec.heads == {}
    assert encoder(torch.randn(1, 64, 128))["embedding"].shape == (1, 64)


def test_resume_continues_where_it_stopped(tmp_path):
    corpus = synthetic_corpus(tmp_path / "corpus", n=12)
    config, rows = run(tmp_path, [corpus], steps=10)
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["step"] == 10
    config.steps = 20
    rows = pretrain(config, resume=True, device="cpu")
    assert [r["step"] for r in rows] == list(range(1, 21))
    seconds = [r["seconds"] for r in rows]  # training time keeps counting across the resume
    assert all(a < b for a, b in zip(seconds, seconds[1:]))


@pytest.mark.slow
def test_short_pretraining_on_real_clips_lowers_the_loss(tmp_path):
    data_path("speech_commands/manifest.csv")
    torch.manual_seed(0)
    _, rows = run(tmp_path, [DATA / "speech_commands" / "yes", DATA / "esc50" / "audio"], steps=60, frames=96)
    assert loss_fell(rows)


def test_pretraining_benchmark_shows_mae_asts_memory_saving():
    """MAE-AST's encoder reads the ~25% unmasked tokens, SSAST's all of them: on 10 s inputs the
    benchmark's peak memory (each method in its own process) must show it. Measured 245 vs 569 MB
    (0.43x) for mini, 1024 frames, batch 8; 0.7 leaves room for allocator differences, and a
    MAE-AST that encoded every token would sit at or above SSAST."""
    from train.bench_pretrain import measure_in_subprocess

    results = {m: measure_in_subprocess(m, size="mini", tokens="patch", frames=1024, batch_size=8, steps=1, device="cpu") for m in ("mae-ast", "ssast")}
    assert {r["tokens"] for r in results.values()} == {512}  # 8 frequency x 64 time patches of 16 x 16
    assert 0 < results["mae-ast"]["peak_bytes"] < 0.7 * results["ssast"]["peak_bytes"]
    assert results["mae-ast"]["params"] > results["ssast"]["params"]  # a decoder of its own vs two MLP heads


def test_pretraining_on_nothing_readable_stops_with_one_line(tmp_path):
    """A folder whose audio files are all unreadable (text, NaN samples) is one line and exit 2,
    not a loop that warns for ever; an empty folder is refused before any work."""
    import subprocess
    import sys

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.wav").write_text("not audio\n" * 50)
    sf.write(bad / "b.wav", np.full(16000, np.nan, np.float32), 16000, subtype="FLOAT")
    (tmp_path / "empty").mkdir()
    for folder, message in ((bad, "none of the 2 audio files"), (tmp_path / "empty", "no audio files found")):
        run = subprocess.run([sys.executable, "-m", "train.pretrain", "--data", str(folder), "--out", str(tmp_path / "out"), "--size", "nano",
                              "--steps", "2", "--batch-size", "2", "--num-workers", "0"], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr, run.stderr
        assert run.stderr.strip().splitlines()[-1].startswith("train.pretrain: error:")
    assert not (tmp_path / "out" / "encoder.safetensors").exists()


def test_the_respiratory_task_is_source_disjoint_and_holds_its_seven_sounds(tmp_path):
    from train.data import read_labelled_manifest
    from train.input_study import RESPIRATORY, respiratory_manifests

    data_path("dcase2016_task2/manifest.csv")
    paths = respiratory_manifests(DATA, tmp_path)
    train, val = (read_labelled_manifest(paths[side]) for side in ("train", "val"))
    assert {e.labels[0] for e in train} == {e.labels[0] for e in val} == set(RESPIRATORY)
    assert not {e.group for e in train} & {e.group for e in val}  # no source recording on both sides
    assert all(Path(e.path).is_absolute() and Path(e.path).is_file() for e in train + val)
