"""Encoder shapes, tokenisation, positions, heads and the checkpoint format."""

import pytest
import torch

from edgetag import checkpoint, load_model
from edgetag.features import preset
from edgetag.model import SIZES, AudioTransformer, EncoderConfig, HeadConfig, num_parameters, patchify, unpatchify


@pytest.mark.parametrize("tokens", ["patch", "frame"])
@pytest.mark.parametrize("frames", [16, 98, 100, 128, 1024])
def test_encoder_shapes_for_any_length(tokens, frames):
    config = EncoderConfig.named("nano", tokens=tokens)
    model = AudioTransformer(config).eval()
    x = torch.randn(2, frames, 128)
    tokens_expected = frames // config.patch_time * config.freq_patches
    assert config.num_tokens(frames) == tokens_expected
    with torch.no_grad():
        assert model.encoder(x).shape == (2, tokens_expected, config.width)
        out = model(x)
    assert set(out) == {"embedding"} and out["embedding"].shape == (2, config.width)
    assert torch.isfinite(out["embedding"]).all()


@pytest.mark.parametrize("tokens", ["patch", "frame"])
def test_patchify_is_time_major_and_invertible(tokens):
    config = EncoderConfig.named("nano", tokens=tokens)
    x = torch.randn(3, 64, 128)
    patches = patchify(x, config)
    assert patches.shape == (3, config.num_tokens(64), config.patch_dim)
    torch.testing.assert_close(unpatchify(patches, config), x)
    # token 1 is the next frequency band of the first time step (when there are several bands)
    if tokens == "patch":
        torch.testing.assert_close(patches[0, 1].view(16, 16), x[0, :16, 16:32])
        torch.testing.assert_close(patches[0, 8].view(16, 16), x[0, 16:32, :16])
    else:
        torch.testing.assert_close(patches[0, 1].view(2, 128), x[0, 2:4])


def test_longer_input_only_appends_tokens():
    # time-major tokens with 1-D positions: the first second encodes the same before any attention
    config = EncoderConfig.named("nano")
    encoder = AudioTransformer(config).encoder
    x = torch.randn(1, 160, 128)
    torch.testing.assert_close(encoder.embed(x[:, :96]), encoder.embed(x)[:, : config.num_tokens(96)])


def test_learned_positions_are_cropped_and_bounded():
    config = EncoderConfig.named("nano", positions="learned", max_tokens=64)
    encoder = AudioTransformer(config).encoder
    assert encoder(torch.randn(1, 128, 128)).shape[1] == 64
    with pytest.raises(ValueError, match="do not fit the learned position table"):
        encoder(torch.randn(1, 144, 128))


def test_post_ln_stack_normalises_its_input():
    config = EncoderConfig.named("nano", norm_first=False, norm_eps=1e-5)
    model = AudioTransformer(config)
    assert isinstance(model.encoder.norm_pre, torch.nn.LayerNorm) and isinstance(model.encoder.norm, torch.nn.Identity)
    out = model.encoder(torch.randn(2, 32, 128))
    # every post-LN block ends in a LayerNorm: unit variance per token
    torch.testing.assert_close(out.var(dim=-1, unbiased=False), torch.ones(2, out.shape[1]), atol=1e-3, rtol=0)


def test_named_sizes_match_ssast_parameter_counts():
    # SSAST README: tiny ~6M, small ~23M, base ~89M (theirs includes two cls tokens and unused heads)
    counts = {name: num_parameters(AudioTransformer(EncoderConfig.named(name))) / 1e6 for name in SIZES}
    assert 5 < counts["tiny"] < 6.5 and 20 < counts["small"] < 23.5 and 84 < counts["base"] < 89.5
    assert counts["nano"] < counts["mini"] < counts["tiny"]


def test_config_rejects_nonsense():
    with pytest.raises(ValueError, match="divisible"):
        EncoderConfig(width=100, heads=3)
    with pytest.raises(ValueError, match="tokens"):
        EncoderConfig(tokens="pixel")
    with pytest.raises(ValueError, match="unknown size"):
        EncoderConfig.named("huge")
    with pytest.raises(ValueError, match="unknown EncoderConfig options: colour"):
        EncoderConfig.from_dict({"colour": 1})


def test_every_parameter_gets_a_gradient():
    model = AudioTransformer(EncoderConfig.named("nano"), {"tags": HeadConfig("tags", ["a", "b"]), "keywords": HeadConfig("keywords", ["x", "y", "z"])})
    out = model(torch.randn(2, 64, 128))
    (out["tags"].sum() + out["keywords"].sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Checkpoints


def make_model():
    torch.manual_seed(0)
    heads = {"tags": HeadConfig("tags", ["Dog", "Rain"]), "keywords": HeadConfig("keywords", ["yes", "no", "_unknown_", "_silence_"])}
    return AudioTransformer(EncoderConfig.named("nano", tokens="frame"), heads).eval()


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    model, fbank_config = make_model(), preset("mae-ast", norm_mean=-5.0, norm_std=3.0)
    path = checkpoint.save(tmp_path / "m.safetensors", model, fbank_config, provenance={"stage": "test"}, thresholds={"tags": [0.4, 0.6]})
    loaded = load_model(path)
    x = torch.randn(3, 100, 128)
    with torch.no_grad():
        expected, got = model(x), loaded(x)
    assert set(got) == {"tags", "keywords"}
    for name in expected:
        assert torch.equal(expected[name], got[name])
    assert loaded.fbank == fbank_config
    assert loaded.config["heads"]["keywords"]["labels"] == ["yes", "no", "_unknown_", "_silence_"]
    assert loaded.config["provenance"] == {"stage": "test"} and loaded.config["thresholds"] == {"tags": [0.4, 0.6]}
    assert not loaded.training
    probs = loaded.probabilities(x)
    torch.testing.assert_close(probs["keywords"].sum(-1), torch.ones(3))
    assert ((probs["tags"] > 0) & (probs["tags"] < 1)).all()
    assert not list(tmp_path.glob("*.tmp"))  # written atomically


def test_bad_checkpoints_raise_checkpoint_error(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="no such checkpoint"):
        load_model(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(checkpoint.CheckpointError, match="not a safetensors file"):
        load_model(junk)
    from safetensors.torch import save_file

    bare = tmp_path / "bare.safetensors"
    save_file({"w": torch.zeros(2)}, bare)
    with pytest.raises(checkpoint.CheckpointError, match="without an edgetag config"):
        load_model(bare)
    # weights that do not fit their config
    path = checkpoint.save(tmp_path / "m.safetensors", make_model(), preset("ast"))
    config = checkpoint.read_config(path)
    config["encoder"]["width"] = 128
    from safetensors.torch import load_file

    save_file(load_file(path), tmp_path / "bad.safetensors", metadata={"edgetag": __import__("json").dumps(config)})
    with pytest.raises(checkpoint.CheckpointError, match="do not fit"):
        load_model(tmp_path / "bad.safetensors")


def test_runtime_never_imports_training_or_deploy_code():
    import ast
    from pathlib import Path

    for path in (Path(__file__).resolve().parents[1] / "edgetag").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] in ("train", "deploy") for n in names), f"{path.name} imports {names}"


def test_cached_positions_serve_inference_then_training():
    model = AudioTransformer(EncoderConfig.named("nano"))
    x = torch.randn(1, 48, 128)
    with torch.inference_mode():
        model(x)
    model(x)["embedding"].sum().backward()  # the table made under inference_mode works with autograd
    assert model.encoder.patch_embed.weight.grad is not None


def test_untrained_adapters_leave_the_encoder_unchanged():
    torch.manual_seed(0)
    plain = AudioTransformer(EncoderConfig.named("nano"))
    adapted = AudioTransformer(EncoderConfig.named("nano", adapter_dim=8))
    missing, unexpected = adapted.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(".adapter." in k for k in missing)
    x = torch.randn(2, 64, 128)
    torch.testing.assert_close(adapted(x)["embedding"], plain(x)["embedding"])


def test_cls_pooling_reads_the_cls_tokens_only():
    torch.manual_seed(0)
    model = AudioTransformer(EncoderConfig.named("nano", cls_tokens=2, pool="cls")).eval()
    x = torch.randn(1, 64, 128)
    tokens = model.encoder(x)
    assert tokens.shape[1] == 2 + model.encoder.config.num_tokens(64)
    torch.testing.assert_close(model(x)["embedding"], tokens[:, :2].mean(1))
    with pytest.raises(ValueError, match="cls_tokens"):
        EncoderConfig(pool="cls")


def test_overlapping_patches_count_and_values():
    config = EncoderConfig(stride_freq=10, stride_time=10)
    assert (config.freq_patches, config.time_patches(1024)) == (12, 101)  # AST's 1212 patches
    x = torch.randn(1, 40, 128)
    patches = patchify(x, config)  # time-major: the second token is the next frequency patch
    assert patches.shape == (1, config.num_tokens(40), 256)
    torch.testing.assert_close(patches[0, 1].reshape(16, 16), x[0, :16, 10:26])
    torch.testing.assert_close(patches[0, 12].reshape(16, 16), x[0, 10:26, :16])


def test_fresh_tag_heads_start_at_the_one_class_prior():
    torch.manual_seed(0)
    model = AudioTransformer(EncoderConfig.named("nano"), {"tags": HeadConfig("tags", list("abcdefghij"))})
    probs = model.probabilities(torch.randn(8, 64, 128))["tags"]
    assert abs(probs.mean().item() - 0.1) < 0.05  # 1 in 10, not 0.5
