"""TI-CL's pieces and AAT's placement: frequency-time factorised attention (FTA) against full
attention under the equivalent -inf mask, the tokens a query can reach, convolutional adapters'
3x3 neighbourhood, AAT's block against its formula, and FTA/adapter models through checkpoints,
the streaming engine and fine-tuning."""

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_streaming_equals_offline, make_dataset, make_model

from edgetag import checkpoint
from edgetag.model import Attention, Block, ConvAdapter, factorised_attention
from edgetag.spec import EncoderConfig

HEADS = {"tags": ["a", "b", "c"], "keywords": ["yes", "no", "_unknown_", "_silence_"]}


def cross_mask(freq: int, time: int, cls: int) -> torch.Tensor:
    """[N, N] True where FTA lets query i see key j: the same frequency row or time column of
    the time-major grid, or a cls token on either side. Written from the paper's definition,
    independently of factorised_attention."""
    n = torch.arange(cls + time * freq) - cls
    f, t = n % freq, n // freq
    allowed = (f[:, None] == f[None, :]) | (t[:, None] == t[None, :])
    allowed[:cls, :] = allowed[:, :cls] = True
    return allowed


@pytest.mark.parametrize("freq, time, cls", [(8, 6, 0), (8, 62, 0), (12, 10, 2), (1, 49, 0), (8, 1, 1), (3, 4, 1)])
def test_fta_is_full_attention_under_the_cross_mask(freq, time, cls):
    """Row + column attention equals softmax attention with -inf outside each query's cross, to
    1e-5 in float32 (the masked form is the oracle), and so do its gradients (float64)."""
    g = torch.Generator().manual_seed(freq * 100 + time)
    q, k, v = torch.randn(3, 2, 3, cls + time * freq, 16, generator=g).unbind(0)
    mask = cross_mask(freq, time, cls)
    torch.testing.assert_close(factorised_attention(q, k, v, freq, cls), F.scaled_dot_product_attention(q, k, v, attn_mask=mask), rtol=0, atol=1e-5)

    q, k, v = (a.double().requires_grad_() for a in (q, k, v))
    fta = torch.autograd.grad(factorised_attention(q, k, v, freq, cls).square().sum(), (q, k, v))
    full = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, attn_mask=mask).square().sum(), (q, k, v))
    for a, b in zip(fta, full):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)


def test_a_token_outside_the_cross_never_reaches_the_query():
    """Through a whole FTA attention layer (projections included), the output at a patch depends
    on exactly the tokens of its row, its column and the cls token: the gradient of one output
    row with respect to every input token is nonzero there and exactly zero elsewhere."""
    torch.manual_seed(0)
    freq, time, cls = 4, 5, 1
    layer = Attention(32, 4, grid=(freq, cls))
    x = torch.randn(1, cls + freq * time, 32, requires_grad=True)
    for query in (0, 1, 7, 20):
        (grad,) = torch.autograd.grad(layer(x)[0, query].sum(), x)
        reached = grad[0].abs().sum(-1) > 0
        assert torch.equal(reached, cross_mask(freq, time, cls)[query]), query


def test_fta_with_one_frequency_row_is_full_attention():
    """Frame tokens (n_mels x 2) make a grid of one frequency row, where every token shares a
    row with every other: the FTA encoder is the full one, weights and outputs alike."""
    torch.manual_seed(0)
    full = make_model(EncoderConfig.named("nano", tokens="frame"), HEADS).eval()
    fta = make_model(EncoderConfig.named("nano", tokens="frame", attention="fta"), HEADS).eval()
    fta.load_state_dict(full.state_dict())  # FTA has no weights of its own: the same keys fit
    x = torch.randn(2, 100, 128)
    with torch.no_grad():
        for name, logits in full(x).items():
            torch.testing.assert_close(fta(x)[name], logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("tokens, cls", [("patch", 0), ("conv", 0), ("patch", 2)])
def test_fta_changes_what_a_grid_of_several_rows_computes(tokens, cls):
    """On a grid of several frequency rows (patches, a conv stem's cells, with or without cls
    tokens) the same weights give other outputs under FTA: it is not full attention in disguise."""
    torch.manual_seed(0)
    config = EncoderConfig.named("nano", tokens=tokens, cls_tokens=cls)
    full = make_model(config, HEADS).eval()
    fta = make_model(EncoderConfig.named("nano", tokens=tokens, cls_tokens=cls, attention="fta"), HEADS).eval()
    fta.load_state_dict(full.state_dict())
    x = torch.randn(2, 98, 128)
    with torch.no_grad():
        assert (fta(x)["tags"] - full(x)["tags"]).abs().max() > 1e-3


def test_conv_adapter_sees_the_3x3_neighbourhood_and_cls_only_itself():
    """A trained-looking conv adapter (random weights): the output at grid cell (t, f) depends on
    the cells within one step in time and frequency, and a cls token only on itself."""
    torch.manual_seed(0)
    freq, time, cls = 5, 6, 1
    adapter = ConvAdapter(16, 8, (freq, cls), dropout=0.0)
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_()
    x = torch.randn(1, cls + freq * time, 16, requires_grad=True)
    for t, f in ((0, 0), (2, 3), (5, 4)):
        (grad,) = torch.autograd.grad(adapter(x)[0, cls + t * freq + f].sum(), x)
        reached = {(int(n - cls) // freq, int(n - cls) % freq) if n >= cls else "cls" for n in torch.nonzero(grad[0].abs().sum(-1)).flatten()}
        assert reached == {(a, b) for a in range(t - 1, t + 2) for b in range(f - 1, f + 2) if 0 <= a < time and 0 <= b < freq}
    (grad,) = torch.autograd.grad(adapter(x)[0, 0].sum(), x)
    assert torch.nonzero(grad[0].abs().sum(-1)).flatten().tolist() == [0]


@pytest.mark.parametrize("adapter", ["mlp", "aat", "conv"])
def test_untrained_adapters_of_every_placement_leave_the_encoder_unchanged(adapter):
    """Every adapter's up projection starts at zero: an encoder's weights run with adapters added
    give its outputs exactly, and the only new keys are the adapters'."""
    torch.manual_seed(0)
    plain = make_model("nano", HEADS).eval()
    adapted = make_model(EncoderConfig.named("nano", adapter_dim=8, adapter=adapter), HEADS).eval()
    missing, unexpected = adapted.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(".adapter." in k or ".adapter_attn." in k for k in missing)
    assert any(".adapter_attn." in k for k in missing) == (adapter != "mlp")
    x = torch.randn(2, 98, 128)
    with torch.no_grad():
        for name, logits in plain(x).items():
            torch.testing.assert_close(adapted(x)[name], logits, rtol=0, atol=0)


def test_aat_block_is_its_formula():
    """AAT (Liang et al.): x + s(attn(LN1 x)) with s(h) = h + up(GELU(down h)) in sequence, then
    x + mlp(LN2 x) + up'(GELU(down'(LN2 x))) in parallel; worked out here from the parts."""
    torch.manual_seed(0)
    block = Block(32, 4, adapter_dim=8, adapter="aat").double().eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(2, 10, 32, dtype=torch.float64)

    def bottleneck(a, h):
        return F.linear(F.gelu(F.linear(h, a.down.weight, a.down.bias)), a.up.weight, a.up.bias)

    with torch.no_grad():
        a = block.attn(block.norm1(x))
        x1 = x + a + bottleneck(block.adapter_attn, a)
        h = block.norm2(x1)
        expected = x1 + block.mlp(h) + bottleneck(block.adapter, h)
        torch.testing.assert_close(block(x), expected, rtol=0, atol=1e-12)


def test_adapter_shares_of_the_encoder():
    """Trainable share under --mode adapter (heads included) at the mini size: ConvPass at
    d = 8 and AAT at its ratio 0.25 stay the small part of the model their papers claim
    (TI-CL: < 5%, AAT: about 7% on a 768-wide AST; our 128-wide encoder gives AAT more)."""
    from train.finetune import set_trainable

    shares = {}
    for adapter, dim in (("conv", 8), ("aat", 32), ("mlp", 32)):
        model = make_model(EncoderConfig.named("mini", adapter_dim=dim, adapter=adapter), HEADS)
        set_trainable(model, "adapter")
        shares[adapter] = sum(p.numel() for p in model.parameters() if p.requires_grad) / sum(p.numel() for p in model.parameters())
    assert shares["conv"] < 0.05 and shares["mlp"] < shares["aat"] < 0.2, shares


def test_grid_encoders_refuse_masked_pretraining_and_mamba():
    from train.objectives.mae import MAEAST

    for config in (EncoderConfig.named("nano", attention="fta"), EncoderConfig.named("nano", adapter_dim=8, adapter="conv")):
        with pytest.raises(ValueError, match="not their grid"):
            MAEAST(config)
    MAEAST(EncoderConfig.named("nano", adapter_dim=8, adapter="aat"))  # a bottleneck is token-wise: any subset will do
    with pytest.raises(ValueError, match="no attention to factorise"):
        EncoderConfig.named("nano", encoder="mamba", attention="fta")


@pytest.fixture(scope="module")
def ticl_model(tmp_path_factory):
    """FTA with conv adapters and cls tokens, adapter weights random so they count."""
    torch.manual_seed(0)
    model = make_model(EncoderConfig.named("nano", attention="fta", adapter_dim=8, adapter="conv", cls_tokens=1), HEADS, stream=(1.0, 0.25))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapter" in name:
                p.normal_(0, 0.1)
    return checkpoint.save(tmp_path_factory.mktemp("ticl") / "model.safetensors", model.eval())


def test_checkpoint_round_trip_keeps_attention_and_adapters(ticl_model, tmp_path):
    model = checkpoint.load_model(ticl_model)
    assert (model.spec.encoder.attention, model.spec.encoder.adapter) == ("fta", "conv")
    again = checkpoint.load_model(checkpoint.save(tmp_path / "again.safetensors", model))
    x = torch.randn(3, 98, 128)
    with torch.no_grad():
        for name, logits in model(x).items():
            assert torch.equal(again(x)[name], logits)


def test_streaming_equals_offline(ticl_model):
    """Per hop, for audio in blocks of any size, the engine's probabilities are the offline
    windows' (the bundled example): FTA and conv adapters stay inside one window."""
    assert_streaming_equals_offline(ticl_model)


@pytest.mark.parametrize("adapter", ["conv", "aat"])
def test_fta_and_adapters_fine_tune_from_a_full_attention_encoder(tmp_path, adapter):
    """An encoder trained with full attention fine-tunes under FTA with adapters (--mode adapter
    --attention fta): the encoder's own weights stay bit-identical, the adapters train, and the
    task is learnt (a tone, noise and near-silence)."""
    from train.augment import AugmentConfig
    from train.finetune import FinetuneConfig, finetune, is_adapter

    data = make_dataset(tmp_path / "data", clips=12, seconds=1.0, silence=True)
    config = dict(train=[str(data)], size="nano", batch_size=8, lr=3e-3, val_percent=25, augment=AugmentConfig.off())
    finetune(FinetuneConfig(out=str(tmp_path / "base"), epochs=2, **config), device="cpu")
    base = checkpoint.load_model(tmp_path / "base" / "best.safetensors")
    results = finetune(FinetuneConfig(out=str(tmp_path / "ft"), init=str(tmp_path / "base" / "best.safetensors"), mode="adapter", adapter=adapter,
                                      adapter_dim=8, attention="fta", epochs=15, **config), device="cpu")
    tuned = checkpoint.load_model(tmp_path / "ft" / "best.safetensors")
    assert (tuned.spec.encoder.attention, tuned.spec.encoder.adapter, tuned.spec.encoder.adapter_dim) == ("fta", adapter, 8)
    before = base.state_dict()
    for key, value in tuned.state_dict().items():
        if key.startswith("encoder.") and not is_adapter(key):
            assert torch.equal(value, before[key]), key
    assert all(v.abs().sum() > 0 for k, v in tuned.state_dict().items() if is_adapter(k) and ".up.weight" in k)
    assert results["tags"]["accuracy"] > 0.5  # three classes: a third by chance
