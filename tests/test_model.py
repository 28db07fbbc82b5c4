"""Encoder shapes, tokenisation, positions, heads and the checkpoint format."""

import json

import pytest
import torch
from conftest import make_model, make_spec

from edgetag import checkpoint, load_model
from edgetag.features import preset
from edgetag.model import num_parameters, patchify
from edgetag.spec import FORMAT_1, SIZES, EncoderConfig, HeadConfig, SpecError, StreamConfig


@pytest.mark.parametrize("tokens", ["patch", "frame"])
@pytest.mark.parametrize("frames", [16, 98, 100, 128, 1024])
def test_encoder_shapes_for_any_length(tokens, frames):
    config = EncoderConfig.named("nano", tokens=tokens)
    model = make_model(config).eval()
    x = torch.randn(2, frames, 128)
    tokens_expected = frames // config.patch_time * config.freq_patches
    assert config.num_tokens(frames) == tokens_expected
    with torch.no_grad():
        assert model.encoder(x).shape == (2, tokens_expected, config.width)
        out = model(x)
    assert set(out) == {"embedding"} and out["embedding"].shape == (2, config.width)
    assert torch.isfinite(out["embedding"]).all()


@pytest.mark.parametrize("tokens", ["patch", "frame"])
def test_patchify_is_time_major_and_keeps_every_value_once(tokens):
    config = EncoderConfig.named("nano", tokens=tokens)
    x = torch.randn(3, 64, 128)
    patches = patchify(x, config)
    assert patches.shape == (3, config.num_tokens(64), config.patch_dim)
    torch.testing.assert_close(patches.flatten(1).sort().values, x.flatten(1).sort().values)  # a permutation
    # token 1 is the next frequency band of the first time step (when there are several bands)
    if tokens == "patch":
        torch.testing.assert_close(patches[0, 1].view(16, 16), x[0, :16, 16:32])
        torch.testing.assert_close(patches[0, 8].view(16, 16), x[0, 16:32, :16])
    else:
        torch.testing.assert_close(patches[0, 1].view(2, 128), x[0, 2:4])


@pytest.mark.parametrize("frames", [16, 98, 100, 129])
def test_conv_tokens_are_a_time_major_grid_of_local_cells(frames):
    config = EncoderConfig.named("nano", tokens="conv")
    model = make_model(config).eval()
    t, f = -(-frames // 16), 128 // 16  # four stride-2 convolutions with padding: ceil halving
    assert (config.time_patches(frames), config.freq_patches, config.num_tokens(frames)) == (t, f, t * f)
    x = torch.randn(2, frames, 128)
    with torch.no_grad():
        assert model.encoder(x).shape == (2, t * f, config.width)
        stem = model.encoder.stem(x)
        # the first time step's tokens see frames 0-15 only (receptive field +-15 frames around
        # frame 0): changing later frames leaves them alone and changes the last time step's
        later = x.clone()
        later[:, 16:] += 1.0
        moved = model.encoder.stem(later)
    torch.testing.assert_close(moved[:, :f], stem[:, :f])
    if t > 1:
        assert not torch.allclose(moved[:, -f:], stem[:, -f:])


def test_conv_tokens_cannot_be_masked_for_pretraining():
    from train.pretrain import PretrainConfig

    with pytest.raises(ValueError, match="tokens must be one of patch, frame"):
        PretrainConfig(data=["x"], tokens="conv")
    with pytest.raises(ValueError, match="no patch strides"):
        EncoderConfig(tokens="conv", stride_time=8)


def test_longer_input_only_appends_tokens():
    # time-major tokens with 1-D positions: the first second encodes the same before any attention
    config = EncoderConfig.named("nano")
    encoder = make_model(config).encoder
    x = torch.randn(1, 160, 128)
    torch.testing.assert_close(encoder.embed(x[:, :96]), encoder.embed(x)[:, : config.num_tokens(96)])


def test_learned_positions_are_cropped_and_bounded():
    config = EncoderConfig.named("nano", positions="learned", max_tokens=64)
    encoder = make_model(config).encoder
    assert encoder(torch.randn(1, 128, 128)).shape[1] == 64
    with pytest.raises(ValueError, match="do not fit the learned position table"):
        encoder(torch.randn(1, 144, 128))


def test_post_ln_stack_normalises_its_input():
    config = EncoderConfig.named("nano", norm_first=False, norm_eps=1e-5)
    model = make_model(config)
    assert isinstance(model.encoder.norm_pre, torch.nn.LayerNorm) and isinstance(model.encoder.norm, torch.nn.Identity)
    out = model.encoder(torch.randn(2, 32, 128))
    # every post-LN block ends in a LayerNorm: unit variance per token
    torch.testing.assert_close(out.var(dim=-1, unbiased=False), torch.ones(2, out.shape[1]), atol=1e-3, rtol=0)


def test_named_sizes_match_ssast_parameter_counts():
    # SSAST README: tiny ~6M, small ~23M, base ~89M (theirs includes two cls tokens and unused heads)
    counts = {name: num_parameters(make_model(name)) / 1e6 for name in SIZES}
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


@pytest.mark.parametrize("tokens", ["patch", "conv"])
def test_every_parameter_gets_a_gradient(tokens):
    model = make_model(EncoderConfig.named("nano", tokens=tokens), {"tags": ["a", "b"], "keywords": ["x", "y", "z"]})
    out = model(torch.randn(2, 64, 128))
    (out["tags"].sum() + out["keywords"].sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_model(**spec):
    torch.manual_seed(0)
    heads = {"tags": HeadConfig("tags", ["Animal", "Dog", "Rain"], {"Dog": ["Animal"]}), "keywords": ["yes", "no", "_unknown_", "_silence_"]}
    return make_model(EncoderConfig.named("nano", tokens="frame"), heads, **spec).eval()


def test_conv_stem_statistics_travel_in_the_checkpoint(tmp_path):
    model = make_model(EncoderConfig.named("nano", tokens="conv"), {"keywords": ["yes", "no", "_unknown_"]})
    model.train()
    model(torch.randn(8, 100, 128) * 3 + 1)  # moves the batch-norm running statistics off their start
    model.eval()
    loaded = load_model(checkpoint.save(tmp_path / "m.safetensors", model)).eval()
    x = torch.randn(2, 100, 128)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)["keywords"], model(x)["keywords"], rtol=0, atol=0)
    assert loaded.spec.encoder.tokens == "conv"


def test_checkpoint_round_trip_gives_identical_outputs_and_spec(tmp_path):
    model = checkpoint_model(fbank=preset("mae-ast", norm_mean=-5.0, norm_std=3.0), stream=(0.5, 0.25), provenance={"stage": "test"},
                             thresholds={"tags": {"Rain": 0.4}, "keywords": {"yes": 0.9}})
    path = checkpoint.save(tmp_path / "m.safetensors", model)
    loaded = load_model(path)
    x = torch.randn(3, 100, 128)
    with torch.no_grad():
        expected, got = model(x), loaded(x)
    assert set(got) == {"tags", "keywords"}
    for name in expected:
        assert torch.equal(expected[name], got[name])
    assert loaded.spec == model.spec and loaded.spec.heads["tags"].parents == {"Dog": ("Animal",)} and loaded.spec.fbank == preset("mae-ast", norm_mean=-5.0, norm_std=3.0)
    assert (loaded.spec.window_frames, loaded.spec.hop_frames) == (48, 25)
    assert not loaded.training
    probs = loaded.probabilities(x)
    torch.testing.assert_close(probs["keywords"].sum(-1), torch.ones(3))
    assert ((probs["tags"] > 0) & (probs["tags"] < 1)).all()
    assert not list(tmp_path.glob("*.tmp"))  # written atomically


def test_format_1_checkpoints_still_load(tmp_path):
    """Format 1 kept thresholds for all heads in one dict and could leave out the stream."""
    from safetensors.torch import load_file, save_file

    model = checkpoint_model()
    path = checkpoint.save(tmp_path / "m.safetensors", model)
    old = {**model.spec.to_dict(), "format": FORMAT_1, "thresholds": {"Rain": 0.4, "yes": 0.9}}
    del old["stream"], old["calibration"]
    save_file(load_file(path), tmp_path / "old.safetensors", metadata={"edgetag": json.dumps(old)})
    spec = checkpoint.read_spec(tmp_path / "old.safetensors")
    assert spec.thresholds == {"tags": {"Rain": 0.4}, "keywords": {"yes": 0.9}} and spec.stream == StreamConfig()
    assert load_model(checkpoint.DEFAULT_MODEL).spec.thresholds["keywords"]["yes"] > 0.5  # the bundled model is format 1


def test_window_and_hop_become_frames_once_and_off_grid_hops_are_refused():
    spec = make_spec(stream=(1.0, 0.25))
    assert (spec.window_frames, spec.hop_frames, spec.hop_seconds) == (98, 25, 0.25)
    assert spec.window_seconds == pytest.approx(0.995)  # 98 frames of 25 ms every 10 ms
    assert spec.with_stream(hop=0.1).hop_frames == 10 and spec.with_stream(window=0.5).window_frames == 48
    with pytest.raises(SpecError, match="hop of 0.125 s is not a whole number of 10 ms frames"):
        spec.with_stream(hop=0.125)
    with pytest.raises(SpecError, match="window of 0.01 s makes 0 frames"):
        spec.with_stream(window=0.01)
    with pytest.raises(SpecError, match="not a whole number of samples"):
        spec.with_stream(window=1.00001)
    with pytest.raises(SpecError, match="name labels it does not have: Cat"):
        make_spec(heads={"tags": ["Dog"]}, thresholds={"tags": {"Cat": 0.5}})
    frames = StreamConfig.spanning(1024, spec.fbank)  # a model with a fixed input length
    assert make_spec(stream=(frames.window, frames.hop)).window_frames == 1024


def test_bad_checkpoints_raise_checkpoint_error(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="no such checkpoint"):
        load_model(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(checkpoint.CheckpointError, match="not a safetensors file"):
        load_model(junk)
    from safetensors.torch import load_file, save_file

    bare = tmp_path / "bare.safetensors"
    save_file({"w": torch.zeros(2)}, bare)
    with pytest.raises(checkpoint.CheckpointError, match="without an edgetag config"):
        load_model(bare)
    path = checkpoint.save(tmp_path / "m.safetensors", checkpoint_model())
    for change, reason in (({"encoder": {**checkpoint_model().spec.encoder.to_dict(), "width": 128}}, "do not fit"),  # weights that do not fit
                           ({"format": "edgetag/9"}, "unsupported format"), ({"colour": "red"}, "unknown spec entries: colour")):
        save_file(load_file(path), tmp_path / "bad.safetensors", metadata={"edgetag": json.dumps({**checkpoint_model().spec.to_dict(), **change})})
        with pytest.raises(checkpoint.CheckpointError, match=reason):
            load_model(tmp_path / "bad.safetensors")


FLOORS = {"edgetag": set(), "train": {"edgetag"}, "deploy": {"edgetag"}, "pipeline": {"edgetag", "train", "deploy"}}


@pytest.mark.parametrize("package", FLOORS)
def test_imports_only_run_down(package):
    """pipeline -> train, deploy -> edgetag: each package imports only the floors under it."""
    import ast
    from pathlib import Path

    others = set(FLOORS) - FLOORS[package] - {package}
    for path in (Path(__file__).resolve().parents[1] / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] in others for n in names), f"{package}/{path.name} imports {names}"


@pytest.mark.parametrize("encoder", ["transformer", "mamba"])
def test_the_encoder_splits_between_any_two_blocks(encoder):
    """What enters block k, run on from block k, is the whole encoder's output (train.refit trains
    the blocks above k on the trunk's output)."""
    torch.manual_seed(0)
    model = make_model(EncoderConfig.named("nano", encoder=encoder)).eval()
    x = torch.randn(2, 100, 128)
    with torch.no_grad():
        whole = model.encoder(x)
        for k in range(model.encoder.split_layers + 1):
            torch.testing.assert_close(model.encoder.forward_from(model.encoder.forward_trunk(x, k), k), whole, rtol=0, atol=1e-6)


def test_cached_positions_serve_inference_then_training():
    model = make_model("nano")
    x = torch.randn(1, 48, 128)
    with torch.inference_mode():
        model(x)
    model(x)["embedding"].sum().backward()  # the table made under inference_mode works with autograd
    assert model.encoder.patch_embed.weight.grad is not None


def test_untrained_adapters_leave_the_encoder_unchanged():
    torch.manual_seed(0)
    plain = make_model("nano")
    adapted = make_model(EncoderConfig.named("nano", adapter_dim=8))
    missing, unexpected = adapted.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(".adapter." in k for k in missing)
    x = torch.randn(2, 64, 128)
    torch.testing.assert_close(adapted(x)["embedding"], plain(x)["embedding"])


def test_cls_pooling_reads_the_cls_tokens_only():
    torch.manual_seed(0)
    model = make_model(EncoderConfig.named("nano", cls_tokens=2, pool="cls")).eval()
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
    model = make_model("nano", {"tags": list("abcdefghij")})
    probs = model.probabilities(torch.randn(8, 64, 128))["tags"]
    assert abs(probs.mean().item() - 0.1) < 0.05  # 1 in 10, not 0.5


def test_head_of_names_the_head_of_a_kind():
    spec = make_spec(heads={"events": HeadConfig("tags", ("a", "b")), "words": HeadConfig("keywords", ("yes", "no", "_unknown_", "_silence_"))})
    assert spec.head_of("tags") == "events" and spec.head_of("keywords") == "words"
    with pytest.raises(SpecError, match="no keywords head"):
        make_spec(heads={"events": HeadConfig("tags", ("a",))}).head_of("keywords")
