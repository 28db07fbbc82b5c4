"""Teacher import: Hugging Face AST parity against transformers itself; SSAST and MAE-AST key layouts."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO

from edgetag import load_model
from edgetag.features import preset
from edgetag.model import sincos_positions
from train.convert import ConvertError, conv_to_linear, convert, load_state, time_major_positions


@pytest.fixture(scope="module")
def hf_ast(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ASTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, max_length=200,
                                    id2label={i: f"sound {i}" for i in range(7)}, label2id={f"sound {i}": i for i in range(7)})
    model = transformers.ASTForAudioClassification(config).eval()
    with torch.no_grad():  # transformers initialises tokens and positions to zero: give them values to check
        model.audio_spectrogram_transformer.embeddings.position_embeddings.normal_()
        model.audio_spectrogram_transformer.embeddings.cls_token.normal_()
        model.audio_spectrogram_transformer.embeddings.distillation_token.normal_()
    folder = tmp_path_factory.mktemp("hf") / "ast"
    model.save_pretrained(folder)
    return model, folder


def test_hf_ast_logits_match_transformers(hf_ast, tmp_path):
    reference, folder = hf_ast
    out = convert("hf-ast", folder, tmp_path / "ast.safetensors")
    model = load_model(out)
    features = torch.randn(3, 200, 128)
    with torch.no_grad():
        expected = reference(features).logits
        got = model(features)["tags"]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert model.spec.heads["tags"].labels == tuple(f"sound {i}" for i in range(7))
    assert model.spec.fbank == preset("ast")
    assert model.spec.encoder.cls_tokens == 2 and model.spec.encoder.stride_time == 10
    assert model.spec.window_frames == 200  # the window is the model's fixed input length


def test_patch_and_position_permutation_equals_frequency_major_convolution():
    """A conv over [B, 1, F, T] flattened frequency-major, plus positions in that order, is
    edgetag's time-major patch embedding with permuted positions, token for token."""
    torch.manual_seed(0)
    from edgetag.model import Encoder
    from edgetag.spec import EncoderConfig

    config = EncoderConfig(width=32, depth=1, heads=2, positions="learned", stride_freq=10, stride_time=8, max_tokens=12 * 5)
    encoder = Encoder(config)
    weight, bias = torch.randn(32, 1, 16, 16), torch.randn(32)
    f, t = config.freq_patches, config.time_patches(48)
    pos = torch.randn(1, f * t, 32)
    with torch.no_grad():
        encoder.patch_embed.weight.copy_(conv_to_linear(weight))
        encoder.patch_embed.bias.copy_(bias)
        encoder.pos_embed.copy_(time_major_positions(pos, 0, f, t))
    x = torch.randn(2, 48, 128)
    conv = F.conv2d(x.transpose(1, 2)[:, None], weight, bias, stride=(10, 8)).flatten(2).transpose(1, 2) + pos  # [B, f*t, D]
    reference = conv.reshape(2, f, t, 32).transpose(1, 2).reshape(2, t * f, 32)  # time-major
    torch.testing.assert_close(encoder.embed(x), reference, atol=1e-4, rtol=0)


def ssast_state(cls: int = 2, finetuned: bool = True, D: int = 64, depth: int = 2, frames: int = 64) -> dict:
    torch.manual_seed(1)
    N = (128 // 16) * (frames // 16)
    s = {"module.p_input_fdim": torch.tensor(128), "module.p_input_tdim": torch.tensor(frames), "module.mask_embed": torch.randn(1, 1, D),
         "module.v.cls_token": torch.randn(1, 1, D), "module.v.pos_embed": torch.randn(1, cls + N, D),
         "module.v.patch_embed.proj.weight": torch.randn(D, 1, 16, 16), "module.v.patch_embed.proj.bias": torch.randn(D),
         "module.v.norm.weight": torch.randn(D), "module.v.norm.bias": torch.randn(D),
         "module.v.head.weight": torch.randn(1000, D), "module.v.head.bias": torch.randn(1000)}
    if cls == 2:
        s.update({"module.v.dist_token": torch.randn(1, 1, D), "module.v.head_dist.weight": torch.randn(1000, D), "module.v.head_dist.bias": torch.randn(1000)})
    for p in ("cpredlayer", "gpredlayer"):
        s.update({f"module.{p}.0.weight": torch.randn(D, D), f"module.{p}.0.bias": torch.randn(D), f"module.{p}.2.weight": torch.randn(256, D), f"module.{p}.2.bias": torch.randn(256)})
    for i in range(depth):
        b = f"module.v.blocks.{i}."
        for name, shape in (("norm1", (D,)), ("norm2", (D,)), ("attn.qkv", (3 * D, D)), ("attn.proj", (D, D)), ("mlp.fc1", (4 * D, D)), ("mlp.fc2", (D, 4 * D))):
            s[b + name + ".weight"] = torch.randn(*shape)
            s[b + name + ".bias"] = torch.randn(shape[0])
    if finetuned:
        s.update({"module.mlp_head.0.weight": torch.randn(D), "module.mlp_head.0.bias": torch.randn(D), "module.mlp_head.1.weight": torch.randn(5, D), "module.mlp_head.1.bias": torch.randn(5)})
    return s


@pytest.mark.parametrize("cls,finetuned", [(2, True), (2, False), (1, True)])
def test_ssast_every_key_used_and_every_shape_fits(tmp_path, cls, finetuned):
    state = ssast_state(cls, finetuned)
    torch.save(state, tmp_path / "ssast.pth")
    model = load_model(convert("ssast", tmp_path / "ssast.pth", tmp_path / "out.safetensors", labels=list("abcde")))
    assert model.spec.encoder.cls_tokens == cls and model.spec.encoder.max_tokens == cls + 32
    assert set(model.spec.heads) == ({"tags"} if finetuned else set()) and model.spec.window_frames == 64
    weights = model.state_dict()
    torch.testing.assert_close(weights["encoder.blocks.1.attn.qkv.weight"], state["module.v.blocks.1.attn.qkv.weight"])
    torch.testing.assert_close(weights["encoder.pos_embed"][:, :cls], state["module.v.pos_embed"][:, :cls])
    out = model(torch.randn(1, 64, 128))
    assert next(iter(out.values())).shape == (1, 5 if finetuned else 64)
    # a shorter input uses the first time steps of the (time-major) table
    assert next(iter(model(torch.randn(1, 32, 128)).values())).isfinite().all()


def test_ssast_left_over_or_misshapen_keys_are_errors(tmp_path):
    state = ssast_state()
    state["module.v.blocks.0.extra.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "extra.pth")
    with pytest.raises(ConvertError, match="not understood: v.blocks.0.extra.weight"):
        convert("ssast", tmp_path / "extra.pth", tmp_path / "x.safetensors")
    state = ssast_state()
    state["module.v.blocks.0.mlp.fc1.weight"] = torch.zeros(7, 64)
    torch.save(state, tmp_path / "shape.pth")
    with pytest.raises(ConvertError, match="do not fit"):
        convert("ssast", tmp_path / "shape.pth", tmp_path / "x.safetensors")


def mae_ast_checkpoint(D: int = 64, depth: int = 2, heads: int = 4):
    """A fairseq-layout MAE-AST state dict, and a reference encoder built from torch's own
    post-LN TransformerEncoderLayer with the same weights."""
    torch.manual_seed(2)
    layers = torch.nn.ModuleList(torch.nn.TransformerEncoderLayer(D, heads, 4 * D, dropout=0.0, activation="gelu", batch_first=True, norm_first=False) for _ in range(depth))
    proj, input_norm = torch.nn.Linear(256, D), torch.nn.LayerNorm(D)
    with torch.no_grad():
        for module in (*layers, input_norm):
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    s = {"post_extract_proj.weight": proj.weight, "post_extract_proj.bias": proj.bias, "layer_norm.weight": torch.ones(128), "layer_norm.bias": torch.zeros(128),
         "batch_norm.running_mean": torch.tensor([-3.0]), "batch_norm.running_var": torch.tensor([16.0]), "batch_norm.num_batches_tracked": torch.tensor(100),
         "encoder_mask_emb": torch.randn(D), "decoder_mask_emb": torch.randn(D), "enc_sine_pos_embed.pe": torch.randn(1, 48, D), "dec_sine_pos_embed.pe": torch.randn(1, 48, D),
         "encoder.layer_norm.weight": input_norm.weight, "encoder.layer_norm.bias": input_norm.bias,
         "decoder.layers.0.fc1.weight": torch.randn(4 * D, D), "final_proj_reconstruction.weight": torch.randn(256, D), "final_proj_classification.weight": torch.randn(256, D)}
    for i, layer in enumerate(layers):
        q, k, v = layer.self_attn.in_proj_weight.chunk(3)
        qb, kb, vb = layer.self_attn.in_proj_bias.chunk(3)
        p = f"encoder.layers.{i}."
        s.update({p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v,
                  p + "self_attn.q_proj.bias": qb, p + "self_attn.k_proj.bias": kb, p + "self_attn.v_proj.bias": vb,
                  p + "self_attn.out_proj.weight": layer.self_attn.out_proj.weight, p + "self_attn.out_proj.bias": layer.self_attn.out_proj.bias,
                  p + "self_attn_layer_norm.weight": layer.norm1.weight, p + "self_attn_layer_norm.bias": layer.norm1.bias,
                  p + "fc1.weight": layer.linear1.weight, p + "fc1.bias": layer.linear1.bias, p + "fc2.weight": layer.linear2.weight, p + "fc2.bias": layer.linear2.bias,
                  p + "final_layer_norm.weight": layer.norm2.weight, p + "final_layer_norm.bias": layer.norm2.bias})
    s = {k: v.detach().clone() for k, v in s.items()}

    def reference(features):  # features already normalised, [B, T, 128]
        from edgetag.model import patchify
        from edgetag.spec import EncoderConfig

        x = proj(patchify(features, EncoderConfig(tokens="patch"))) + sincos_positions(features.shape[1] // 16 * 8, D)
        x = input_norm(x)
        for layer in layers:
            x = layer(x)
        return x.mean(1)

    return {"model": s, "cfg": {"model": {"ast_kernel_size_chan": 16, "encoder_attention_heads": heads}}}, reference


def test_mae_ast_matches_a_post_ln_reference_and_takes_its_normalisation(tmp_path):
    ckpt, reference = mae_ast_checkpoint()
    torch.save(ckpt, tmp_path / "chunk_patch_75.pt")
    model = load_model(convert("mae-ast", tmp_path / "chunk_patch_75.pt", tmp_path / "mae.safetensors"))
    assert model.spec.encoder.norm_first is False and model.spec.encoder.positions == "sincos"
    fbank = model.spec.fbank
    assert fbank.window == "povey" and not fbank.htk_compat
    assert (fbank.norm_mean, fbank.norm_scale) == (-3.0, 2.0) and fbank.norm_std == pytest.approx((16 + 1e-5) ** 0.5)
    features = torch.randn(2, 96, 128)
    with torch.no_grad():
        torch.testing.assert_close(model(features)["embedding"], reference(features), atol=1e-4, rtol=0)


def test_mae_ast_needs_to_know_patch_or_frame(tmp_path):
    ckpt, _ = mae_ast_checkpoint()
    ckpt["cfg"] = {}
    torch.save(ckpt, tmp_path / "model.pt")
    with pytest.raises(ConvertError, match="--tokens"):
        convert("mae-ast", tmp_path / "model.pt", tmp_path / "x.safetensors")
    assert load_model(convert("mae-ast", tmp_path / "model.pt", tmp_path / "x.safetensors", tokens="frame")).spec.encoder.tokens == "frame"


class Payload:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_pickled_objects_are_refused_not_run(tmp_path, capsys):
    torch.save({"model": {}, "cfg": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ConvertError, match="weights_only"):
        load_state(tmp_path / "evil.pt")
    assert "unpickled!" not in capsys.readouterr().out


def test_convert_cli_errors_are_one_line(tmp_path):
    run = subprocess.run([sys.executable, "-m", "train.convert", "--from", "hf-ast", str(tmp_path / "missing"), "--out", str(tmp_path / "x.safetensors")],
                         cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.strip().startswith("train.convert: error:") and len(run.stderr.strip().splitlines()) == 1
