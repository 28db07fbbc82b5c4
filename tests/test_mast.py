"""MAST, the multiscale encoder (edgetag/mast.py): its stages pool the token grid as MViTv2's do,
its sizes are the paper's, and it runs through the engine like any encoder (export: test_deploy)."""

import numpy as np
import pytest
import torch
from conftest import assert_streaming_equals_offline, make_model, make_spec

from edgetag import checkpoint
from edgetag.mast import REL_TIME, MultiScaleEncoder, PoolingAttention, relative_index
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


def test_pretraining_refuses_a_mast_for_now():
    from train.pretrain import PretrainConfig

    with pytest.raises(ValueError, match="encoder must be one of transformer, mamba"):
        PretrainConfig(encoder="mast", size="mast-edge")
