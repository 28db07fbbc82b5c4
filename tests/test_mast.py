"""MAST, the multiscale encoder (edgetag/mast.py): its stages pool the token grid as MViTv2's do,
its sizes are the paper's, and it runs through the engine like any encoder (export: test_deploy)."""

import numpy as np
import pytest
import torch
from conftest import assert_streaming_equals_offline, make_model, make_spec

from edgetag import checkpoint
from edgetag.mast import REL_TIME, MultiScaleEncoder, PoolingAttention, coarse_index, patchify, relative_index
from edgetag.model import num_parameters
from edgetag.spec import TAGS, EncoderConfig, HeadConfig, SpecError, TaskConfig, mast_grid

EDGE = EncoderConfig.named("mast-edge", encoder="mast", n_mels=128)


def grids(encoder: MultiScaleEncoder, frames: int) -> list[tuple[int, int]]:
    """The (time, frequency) token grid after the patch embedding and after each block."""
    x = encoder.patch_embed(torch.zeros(1, 1, frames, encoder.config.n_mels))
    grid, out = tuple(x.shape[2:]), []
    x = x.flatten(2).transpose(1, 2)
    out.append(grid)
    for block in encoder.blocks:
        x, grid = block(x, grid)
        assert x.shape[1] == grid[0] * grid[1]
        out.append(grid)
    return out


def test_each_stage_halves_the_grid_and_doubles_the_width():
    """1 s at 128 bands: 10 x 13 tokens of width 20, then 5 x 7 at 40, 3 x 4 at 80, 2 x 2 at 160;
    the grid halves in each stage's first block only."""
    encoder = MultiScaleEncoder(EDGE).eval()
    assert EDGE.stage_widths == (20, 40, 80, 160) and EDGE.stage_heads == (1, 2, 4, 8)
    assert mast_grid(128) == 13 and mast_grid(100) == 10
    got = grids(encoder, 100)
    assert got == [(10, 13), (10, 13), (5, 7), (5, 7), (3, 4), *[(3, 4)] * 4, (2, 2), (2, 2)]
    assert [b.mlp[0].in_features for b in encoder.blocks] == [20, 40, 40, 80, 80, 80, 80, 80, 160, 160]
    with torch.no_grad():
        assert encoder(torch.randn(3, 100, 128)).shape == (3, 4, 160)
        assert encoder(torch.randn(1, 300, 128)).shape == (1, 4 * 2, 160)  # 3 s: 30 -> 15 -> 8 -> 4 columns


def test_keys_and_values_are_pooled_to_a_coarser_grid_than_queries():
    """First stage: queries at full resolution, keys and values at stride 4; a stage's first block
    pools its queries by 2 and its keys and values by half the stride before."""
    encoder = MultiScaleEncoder(EDGE)
    strides = [(b.attn.pool_q.stride, b.attn.pool_k.stride, b.attn.pool_v.stride) for b in encoder.blocks]
    assert strides == [(1, 4, 4), (2, 2, 2), (1, 2, 2), (2, 1, 1), *[(1, 1, 1)] * 4, (2, 1, 1), (1, 1, 1)]
    attn = PoolingAttention(16, 32, 2, 1, 4, 12, 1e-6)
    q, grid = attn.pool_q(torch.randn(2, 2, 10 * 13, 16), (10, 13))
    k, k_grid = attn.pool_k(torch.randn(2, 2, 10 * 13, 16), (10, 13))
    assert (q.shape, grid, k.shape, k_grid) == ((2, 2, 130, 16), (10, 13), (2, 2, 12, 16), (3, 4))
    y, out_grid = attn(torch.randn(2, 130, 16), (10, 13))
    assert (y.shape, out_grid) == ((2, 130, 32), (10, 13))


def test_relative_positions_index_offsets_on_the_finer_grid():
    same = relative_index(5, 5, 8, torch.device("cpu"))
    assert (same == torch.arange(5)[:, None] - torch.arange(5)[None, :] + 8).all()
    coarse = relative_index(12, 3, 11, torch.device("cpu"))  # keys pooled by 4: key j sits at 4j on the query grid
    assert coarse[8, 2] == 11 + 8 - 8 and coarse[0, 2] == 11 - 8
    far = relative_index(200, 200, REL_TIME, torch.device("cpu"))
    assert far.min() == 0 and far.max() == 2 * REL_TIME  # beyond the table: its last rows


def test_the_sizes_are_the_papers():
    """MAST-T and MAST-S are MViTv2-T and -S on one input channel (24M and 35M with an image
    model's 1000-class head); the edge size is near the bundled model's 0.99M."""
    params = {size: num_parameters(MultiScaleEncoder(EncoderConfig.named(size, encoder="mast", n_mels=128))) for size in ("mast-t", "mast-s", "mast-edge")}
    assert 23.0e6 < params["mast-t"] < 23.8e6 and 33.7e6 < params["mast-s"] < 34.5e6
    assert 0.9e6 < params["mast-edge"] < 1.2e6


def test_the_spec_refuses_what_a_mast_is_not():
    with pytest.raises(ValueError, match="stages are a MAST's"):
        EncoderConfig(encoder="transformer", stages=(1, 1))
    with pytest.raises(ValueError, match="stages are a MAST's"):
        EncoderConfig(encoder="mast")
    with pytest.raises(ValueError, match=r"stages \(1, 2\) do not sum to depth 4"):
        EncoderConfig(encoder="mast", stages=(1, 2), depth=4, width=64, heads=2)
    with pytest.raises(ValueError, match="do not halve 3 times into whole heads"):
        EncoderConfig(encoder="mast", stages=(1, 1, 1, 1), depth=4, width=96, heads=4)
    with pytest.raises(ValueError, match="no fta, adapters"):
        EncoderConfig.named("mast-edge", encoder="mast", attention="fta")
    with pytest.raises(SpecError, match="mast blocks have no MLP or attention to put adapters beside"):
        make_spec(EDGE, {TAGS: ["x"]}, tasks={"new": TaskConfig(HeadConfig(TAGS, ("a",)), "conv", 8, 2)})
    assert EncoderConfig.from_dict(EDGE.to_dict() | {"stages": [1, 2, 5, 2]}) == EDGE  # a checkpoint's JSON list


def test_streaming_equals_offline(tmp_path):
    torch.manual_seed(0)
    model = make_model(EDGE, {TAGS: ["a", "b"], "keywords": ["yes", "_unknown_"]}, stream=(1.0, 0.25))
    assert_streaming_equals_offline(checkpoint.save(tmp_path / "model.safetensors", model.eval()))


def test_a_linear_task_reads_the_embedding_and_a_checkpoint_loads_back(tmp_path):
    torch.manual_seed(0)
    model = make_model(EDGE, {TAGS: ["x"]}, tasks={"new": TaskConfig(HeadConfig(TAGS, ("a", "b")))}).eval()
    x = torch.randn(2, 100, 128)
    loaded = checkpoint.load_model(checkpoint.save(tmp_path / "m.safetensors", model))
    with torch.no_grad():
        out = model(x)
        np.testing.assert_allclose(out["new"].numpy(), model.tasks["new"].head(model.embedding(x)).numpy(), atol=1e-6)
        np.testing.assert_array_equal(loaded(x)["new"].numpy(), out["new"].numpy())
    assert loaded.spec.encoder.stages == (1, 2, 5, 2)


# ---------------------------------------------------------------------------------------------
# Pretraining a MAST: MAE-AST with mask tokens in the first stage, SS-MAST with blanked tokens


def test_patchify_is_what_the_patch_embedding_reads():
    torch.manual_seed(0)
    encoder = MultiScaleEncoder(EDGE)
    x = torch.randn(2, 98, 128)
    tokens, grid = encoder.embed(x)
    assert grid == (mast_grid(98), mast_grid(128)) and tokens.shape[1] == grid[0] * grid[1]
    conv = encoder.patch_embed
    by_hand = patchify(x) @ conv.weight.flatten(1).T + conv.bias  # [B, N, 49] x [49, C]
    torch.testing.assert_close(by_hand, tokens, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("frames", [16, 98, 301])
def test_coarse_index_puts_each_token_in_its_last_stage_cell(frames):
    encoder = MultiScaleEncoder(EDGE)
    first, last = grids(encoder, frames)[0], grids(encoder, frames)[-1]
    index = coarse_index(first, len(EDGE.stages) - 1)
    assert index.shape == (first[0] * first[1],) and set(index.tolist()) == set(range(last[0] * last[1]))  # every cell holds a token
    t, f = torch.arange(len(index)) // first[1], torch.arange(len(index)) % first[1]
    assert torch.equal(index, (t // 8) * last[1] + f // 8)  # three halvings: cells of 8 x 8 tokens


def mae(masking="chunk", **settings):
    from train.objectives.mae import MultiScaleMAE

    torch.manual_seed(0)
    return MultiScaleMAE(EDGE, masking=masking, **settings)


@pytest.mark.parametrize("masking", ["chunk", "random"])
def test_mae_on_a_mast_hides_exactly_the_masked_patches(masking):
    """The masked tokens go in as the mask token, the rest as embedded; no output of the encoder
    changes when the input changes only under masked patches, and one does under a visible one."""
    from train.objectives.mae import num_masked

    model = mae(masking).eval()
    x = torch.randn(2, 98, 128)
    seen = []
    model.encoder.blocks[0].register_forward_hook(lambda m, i, o: seen.append(i[0]))
    torch.manual_seed(1)
    latent, mask, ids_restore = model.forward_encoder(x)
    n = mast_grid(98) * mast_grid(128)
    assert mask.shape == (2, n) and mask.sum(1).tolist() == [num_masked(n, 0.75)] * 2
    embedded, _ = model.encoder.embed(x)
    hidden = mask.bool()
    torch.testing.assert_close(seen[0][hidden], model.mask_token[0].expand(int(hidden.sum()), -1))
    torch.testing.assert_close(seen[0][~hidden], embedded[~hidden])

    patches = patchify(x)  # [B, N, 49]: change every value under masked patches only
    changed = torch.where(hidden[..., None], torch.randn_like(patches) * 10, patches)
    y = torch.nn.functional.fold(changed.transpose(1, 2), (98, 128), 7, padding=3, stride=10)[:, 0]  # back onto the plane
    y = torch.where(torch.nn.functional.fold(torch.ones_like(changed).transpose(1, 2), (98, 128), 7, padding=3, stride=10)[:, 0] > 0, y, x)
    noise = mask + torch.rand(mask.shape) * 0.5  # the same mask again
    with torch.no_grad():
        again, mask_again, _ = model.forward_encoder(y, noise)
        visible = x.clone()
        t, f = divmod(int((~hidden[0]).nonzero()[0]), mast_grid(128))
        visible[0, 10 * t, 10 * f] += 10  # the centre of a visible patch
        moved, _, _ = model.forward_encoder(visible, noise)
    assert torch.equal(mask_again, mask)
    torch.testing.assert_close(again, latent.detach(), rtol=0, atol=1e-5)
    assert not torch.allclose(moved[0], latent[0].detach(), atol=1e-3)

    reconstruction, contrastive = model.forward_decoder(latent, ids_restore)
    assert reconstruction.shape == contrastive.shape == (2, n, 49) and torch.equal(ids_restore[0], coarse_index((10, 13), 3))


def test_mae_on_a_mast_scores_masked_patches_only_and_trains_every_parameter():
    model = mae()
    x = torch.randn(2, 98, 128)
    _, mask, _ = model.forward_encoder(x)
    target = patchify(x)
    perfect_where_masked = torch.where(mask[..., None].bool(), target, torch.randn_like(target) * 100)
    loss, _ = mae(contrastive_weight=0.0).forward_loss(x, perfect_where_masked, perfect_where_masked, mask)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    loss, metrics, _ = model(x)
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing and set(metrics) == {"mse", "nce", "nce_acc"}


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.5])
def test_ss_mast_blanks_exactly_the_requested_count_in_place(ratio):
    from train.objectives.ssmast import SSMAST, SSMASTConfig, patch_blank

    x = torch.randn(3, 130, 8) + 5  # no token is zero to begin with
    blank = patch_blank(x, ratio, torch.Generator().manual_seed(0))
    zeroed = (blank == 0).all(-1)  # [B, N]
    assert blank.shape == x.shape and zeroed.sum(1).tolist() == [round(ratio * 130)] * 3
    assert (zeroed == zeroed[0]).all() and torch.equal(blank[~zeroed], x[~zeroed])  # one subset for the batch, the rest untouched

    torch.manual_seed(0)
    model = SSMAST(EDGE, SSMASTConfig(patch_drop=0.5, queue_size=16), steps=4)
    seen = []
    model.encoder.blocks[0].register_forward_hook(lambda m, i, o: seen.append((i[0] == 0).all(-1).sum(1)))
    model.teacher_encoder.blocks[0].register_forward_hook(lambda m, i, o: seen.append((i[0] == 0).all(-1).sum(1)))
    loss, metrics, _ = model(torch.randn(2, 98, 128))
    loss.backward()
    assert [s.tolist() for s in seen] == [[65, 65], [65, 65], [0, 0], [0, 0]]  # the student's two views blanked, the teacher's whole
    assert all(p.grad is None for p in model.teacher_encoder.parameters()) and model.encoder.patch_embed.weight.grad is not None


@pytest.mark.parametrize("method", ["ss-mast", "mae-ast"])
def test_pretrain_a_mast_resumes_and_edgetag_file_runs_it(tmp_path, method):
    """`python -m train.pretrain --encoder mast` trains and resumes; a model fine-tuned from its
    encoder runs in `edgetag file --model`, and the head-less encoder is refused in one line."""
    import json
    import subprocess
    import sys

    from conftest import REPO, make_dataset
    from test_pretrain import synthetic_corpus

    from train.augment import AugmentConfig
    from train.finetune import FinetuneConfig, finetune

    corpus = synthetic_corpus(tmp_path / "corpus", n=8)
    out = tmp_path / "pre"
    command = [sys.executable, "-m", "train.pretrain", "--data", str(corpus), "--out", str(out), "--encoder", "mast", "--size", "mast-edge", "--method", method,
               "--frames", "98", "--batch-size", "4", "--queue-size", "16", "--lr", "1e-3", "--warmup-steps", "1", "--checkpoint-every", "2", "--num-workers", "0"]
    done = subprocess.run([*command, "--steps", "2"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    done = subprocess.run([*command, "--steps", "4", "--resume"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["step"] == 4 and [r["step"] for r in state["rows"]] == [1, 2, 3, 4]
    encoder = checkpoint.load_model(out / "encoder.safetensors")
    assert encoder.spec.encoder == EDGE and encoder.spec.provenance["pretrain"]["method"] == method
    pretrained = {k: v for k, v in state["model"].items() if k.startswith("encoder.")}
    assert all(torch.equal(encoder.state_dict()[k], v) for k, v in pretrained.items())

    data = make_dataset(tmp_path / "data", clips=8, seconds=1.0, silence=True)
    finetune(FinetuneConfig(train=[str(data)], out=str(tmp_path / "ft"), init=str(out / "encoder.safetensors"), encoder="mast", size="mast-edge", epochs=2,
                            batch_size=8, val_percent=25, augment=AugmentConfig.off()), device="cpu")
    file = [sys.executable, "-m", "edgetag", "file", str(data / "tone" / "00.wav"), "--json", "--model"]
    run = subprocess.run([*file, str(tmp_path / "ft" / "best.safetensors")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
    assert run.stdout and all(json.loads(line)["file"].endswith("00.wav") for line in run.stdout.splitlines())
    run = subprocess.run([*file, str(out / "encoder.safetensors")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.strip() == f"edgetag: error: {out / 'encoder.safetensors'}: no heads to answer with " \
        "(a pretrained encoder: fine-tune it first, python -m train.finetune --init it)"
