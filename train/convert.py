"""Import teachers into edgetag checkpoints: Hugging Face AST, SSAST, MAE-AST and EfficientAT weights.

    python -m train.convert --from hf-ast path/to/save_pretrained_folder --out ast.safetensors
    python -m train.convert --from ssast SSAST-Base-Patch-400.pth --out ssast.safetensors
    python -m train.convert --from mae-ast chunk_patch_75_12LayerEncoder.pt --out maeast.safetensors
    python -m train.convert --from efficientat mn04_as_mAP_432.pt --audioset ../shared/data/audioset --out mn04.safetensors

Each source gets the fbank recipe it was trained with (AST/SSAST: the "ast" preset with the
checkpoint's normalisation; MAE-AST: Kaldi defaults, normalised by its BatchNorm statistics; EfficientAT: the "efficientat"
preset, its 32 kHz front end on 16 kHz audio, and AudioSet's classes and ontology as its tag head).
AST and SSAST order tokens frequency-major; edgetag orders them time-major, so the position
rows are permuted on import (attention does not care about order; each token keeps its
position). Every source key is either used or on an explicit ignore list: a key left over or a
shape that does not fit is an error. Files are read with `weights_only=True` or safetensors.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import torch
import typer

from edgetag import checkpoint
from edgetag.features import preset
from edgetag.model import AudioTransformer
from edgetag.spec import KEYWORDS, MOBILENET_SIZES, TAGS, EncoderConfig, HeadConfig, ModelSpec, StreamConfig

SOURCES = ("hf-ast", "ssast", "mae-ast", "efficientat")


class ConvertError(Exception):
    pass


def load_state(path: Path) -> dict:
    """A state dict from safetensors or a torch file, never unpickling arbitrary objects."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickled objects beyond tensors and plain containers
        raise ConvertError(
            f"{path}: cannot be read with weights_only=True ({str(e).splitlines()[0]}); "
            "in a trusted environment, save just its state dict: torch.save(torch.load(f, weights_only=False)['model'], 'state.pt')"
        ) from e


def conv_to_linear(weight: torch.Tensor) -> torch.Tensor:
    """Conv2d patch weights [D, 1, freq, time] (over a [B, 1, F, T] input) -> the Linear weights
    [D, time * freq] that edgetag applies to time-major patch values."""
    return weight[:, 0].transpose(1, 2).reshape(weight.shape[0], -1)


def time_major_positions(pos: torch.Tensor, cls: int, freq_patches: int, time_patches: int) -> torch.Tensor:
    """[1, cls + f*t, D] with patches frequency-major -> the same rows, patches time-major."""
    head, grid = pos[:, :cls], pos[:, cls:]
    grid = grid.reshape(1, freq_patches, time_patches, -1).transpose(1, 2).reshape(1, freq_patches * time_patches, -1)  # [1, t*f, D]
    return torch.cat([head, grid], dim=1)


def _take(state: dict, key: str, used: set) -> torch.Tensor:
    if key not in state:
        raise ConvertError(f"missing key {key}")
    used.add(key)
    return state[key]


def _check_consumed(state: dict, used: set, ignore: str) -> None:
    left = [k for k in state if k not in used and not re.fullmatch(ignore, k)]
    if left:
        raise ConvertError(f"{len(left)} source key(s) not understood: {', '.join(sorted(left)[:5])}")


def _load_into(model: AudioTransformer, weights: dict) -> AudioTransformer:
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # a size mismatch
        raise ConvertError(f"weights do not fit: {str(e).splitlines()[1].strip()}") from e
    if missing or unexpected:
        raise ConvertError(f"weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def _vit_blocks(take, prefix: str, depth: int, names: dict) -> dict:
    """timm/HF pre-LN blocks -> edgetag names; `names` maps edgetag suffixes to source suffixes
    (a tuple means concatenate, as q, k, v -> qkv)."""
    out = {}
    for i in range(depth):
        for ours, theirs in names.items():
            for kind in ("weight", "bias"):
                parts = theirs if isinstance(theirs, tuple) else (theirs,)
                out[f"encoder.blocks.{i}.{ours}.{kind}"] = torch.cat([take(f"{prefix}{i}.{p}.{kind}") for p in parts])
    return out


def from_hf_ast(folder: Path, kind: str = TAGS) -> tuple[ModelSpec, dict]:
    """A transformers `ASTForAudioClassification` folder (config.json + model.safetensors or
    pytorch_model.bin) -> its spec and weights."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ConvertError(f"{folder}: not a save_pretrained folder (no config.json in it)")
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except ValueError as e:
        raise ConvertError(f"{folder / 'config.json'}: not valid JSON ({e})") from e
    weights_file = next((folder / name for name in ("model.safetensors", "pytorch_model.bin") if (folder / name).is_file()), None)
    if weights_file is None:
        raise ConvertError(f"{folder}: no model.safetensors or pytorch_model.bin")
    state, used = load_state(weights_file), set()
    take = lambda k: _take(state, k, used)  # noqa: E731
    D, p = cfg["hidden_size"], cfg.get("patch_size", 16)
    if p != 16:
        raise ConvertError(f"{folder}: patch_size {p} (edgetag patches are 16x16)")
    n_mels, frames = cfg.get("num_mel_bins", 128), cfg.get("max_length", 1024)
    encoder = EncoderConfig(
        n_mels=n_mels, tokens="patch", width=D, depth=cfg["num_hidden_layers"], heads=cfg["num_attention_heads"],
        mlp_ratio=cfg["intermediate_size"] / D, positions="learned", norm_first=True, norm_eps=cfg.get("layer_norm_eps", 1e-12),
        stride_freq=cfg.get("frequency_stride", 10), stride_time=cfg.get("time_stride", 10), cls_tokens=2, pool="cls",
    )
    f, t = encoder.freq_patches, encoder.time_patches(frames)
    encoder = replace(encoder, max_tokens=2 + f * t)  # the table holds exactly the cls rows and the grid
    labels = [cfg["id2label"][str(i)] for i in range(len(cfg["id2label"]))] if "id2label" in cfg else None
    e = "audio_spectrogram_transformer."
    weights = {
        "encoder.cls_token": torch.cat([take(e + "embeddings.cls_token"), take(e + "embeddings.distillation_token")], dim=1),
        "encoder.pos_embed": time_major_positions(take(e + "embeddings.position_embeddings"), 2, f, t),
        "encoder.patch_embed.weight": conv_to_linear(take(e + "embeddings.patch_embeddings.projection.weight")),
        "encoder.patch_embed.bias": take(e + "embeddings.patch_embeddings.projection.bias"),
        "encoder.norm.weight": take(e + "layernorm.weight"),
        "encoder.norm.bias": take(e + "layernorm.bias"),
        **_vit_blocks(take, e + "encoder.layer.", encoder.depth, {
            "norm1": "layernorm_before", "norm2": "layernorm_after",
            "attn.qkv": ("attention.attention.query", "attention.attention.key", "attention.attention.value"),
            "attn.proj": "attention.output.dense", "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense",
        }),
    }
    heads = {}
    if "classifier.dense.weight" in state:
        classes = state["classifier.dense.weight"].shape[0]
        heads[kind] = HeadConfig(kind, labels or [f"class_{i}" for i in range(classes)])
        weights.update({f"heads.{kind}.norm.{k}": take(f"classifier.layernorm.{k}") for k in ("weight", "bias")})
        weights.update({f"heads.{kind}.fc.{k}": take(f"classifier.dense.{k}") for k in ("weight", "bias")})
    _check_consumed(state, used, ignore="")
    fbank = preset("ast")
    preprocessor = folder / "preprocessor_config.json"
    if preprocessor.is_file():
        pre = json.loads(preprocessor.read_text())
        fbank = replace(fbank, norm_mean=pre.get("mean", fbank.norm_mean), norm_std=pre.get("std", fbank.norm_std))
    # learned positions fix the input length: the window is that many frames
    return ModelSpec(encoder, fbank, heads, StreamConfig.spanning(frames, fbank)), weights


def from_ssast(path: Path, kind: str = TAGS, labels: list[str] | None = None) -> tuple[ModelSpec, dict]:
    """An SSAST `.pth` (DataParallel state dict: module.v.*, pretrained or fine-tuned)."""
    state, used = load_state(path), set()
    state = {k.removeprefix("module."): v for k, v in state.items()}
    take = lambda k: _take(state, k, used)  # noqa: E731
    proj = take("v.patch_embed.proj.weight")
    D, _, fshape, tshape = proj.shape
    tokens = {(16, 16): "patch", (128, 2): "frame"}.get((fshape, tshape))
    if tokens is None:
        raise ConvertError(f"{path}: patch shape {fshape}x{tshape} (edgetag has 16x16 patches and 128x2 frames)")
    cls = 2 if "v.dist_token" in state else 1
    pos = take("v.pos_embed")
    n_mels = int(state["p_input_fdim"]) if "p_input_fdim" in state else 128
    depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("v.blocks."))
    hidden = state["v.blocks.0.mlp.fc1.weight"].shape[0]
    encoder = EncoderConfig(n_mels=n_mels, tokens=tokens, width=D, depth=depth, heads=max(1, D // 64), mlp_ratio=hidden / D,
                            positions="learned", max_tokens=pos.shape[1], cls_tokens=cls, pool="mean")
    f = encoder.freq_patches
    t = (pos.shape[1] - cls) // f
    tokens_cls = [take("v.cls_token")] + ([take("v.dist_token")] if cls == 2 else [])
    weights = {
        "encoder.cls_token": torch.cat(tokens_cls, dim=1),
        "encoder.pos_embed": time_major_positions(pos, cls, f, t),
        "encoder.patch_embed.weight": conv_to_linear(proj),
        "encoder.patch_embed.bias": take("v.patch_embed.proj.bias"),
        "encoder.norm.weight": take("v.norm.weight"),
        "encoder.norm.bias": take("v.norm.bias"),
        **_vit_blocks(take, "v.blocks.", depth, {n: n for n in ("norm1", "norm2", "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}),
    }
    heads = {}
    if "mlp_head.1.weight" in state:  # a fine-tuned model
        classes = state["mlp_head.1.weight"].shape[0]
        heads[kind] = HeadConfig(kind, labels or [f"class_{i}" for i in range(classes)])
        weights.update({f"heads.{kind}.norm.{k}": take(f"mlp_head.0.{k}") for k in ("weight", "bias")})
        weights.update({f"heads.{kind}.fc.{k}": take(f"mlp_head.1.{k}") for k in ("weight", "bias")})
    # pretraining-only parts: input size records, mask embedding, prediction heads, timm's ImageNet heads
    _check_consumed(state, used, ignore=r"p_input_[ft]dim|mask_embed|[cg]predlayer\..*|v\.head(_dist)?\..*")
    fbank = preset("ast")
    return ModelSpec(encoder, fbank, heads, StreamConfig.spanning(t * tshape, fbank)), weights


def from_mae_ast(path: Path, tokens: str = "", heads_hint: int = 0) -> tuple[ModelSpec, dict]:
    """A MAE-AST fairseq checkpoint (`ckpt["model"]`, post-LN encoder, sinusoidal positions,
    BatchNorm input statistics) -> the encoder alone (fine-tune it with train.finetune)."""
    ckpt = load_state(path)
    state = ckpt.get("model", ckpt)
    cfg = ((ckpt.get("cfg") or {}).get("model") or {}) if isinstance(ckpt.get("cfg"), dict) else {}
    used: set = set()
    take = lambda k: _take(state, k, used)  # noqa: E731
    proj = take("post_extract_proj.weight")
    D = proj.shape[0]
    if not tokens:  # 16x16 patches and 128x2 frames both flatten to 256 values: the config or the name decides
        chan = cfg.get("ast_kernel_size_chan")
        tokens = "frame" if chan == 128 or "frame" in Path(path).name else "patch" if chan == 16 or "patch" in Path(path).name else ""
    if tokens not in ("patch", "frame"):
        raise ConvertError(f"{path}: cannot tell patch from frame tokens; pass --tokens")
    depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layers."))
    heads = heads_hint or cfg.get("encoder_attention_heads") or max(1, D // 64)
    encoder = EncoderConfig(n_mels=128, tokens=tokens, width=D, depth=depth, heads=heads,
                            mlp_ratio=state["encoder.layers.0.fc1.weight"].shape[0] / D, positions="sincos",
                            norm_first=False, norm_eps=1e-5)
    weights = {
        "encoder.patch_embed.weight": proj,
        "encoder.patch_embed.bias": take("post_extract_proj.bias"),
        "encoder.norm_pre.weight": take("encoder.layer_norm.weight"),
        "encoder.norm_pre.bias": take("encoder.layer_norm.bias"),
    }
    for i in range(depth):
        src, dst = f"encoder.layers.{i}.", f"encoder.blocks.{i}."
        for kind in ("weight", "bias"):
            weights[dst + f"attn.qkv.{kind}"] = torch.cat([take(src + f"self_attn.{p}_proj.{kind}") for p in "qkv"])
            for ours, theirs in (("attn.proj", "self_attn.out_proj"), ("norm1", "self_attn_layer_norm"), ("mlp.fc1", "fc1"), ("mlp.fc2", "fc2"), ("norm2", "final_layer_norm")):
                weights[dst + f"{ours}.{kind}"] = take(src + f"{theirs}.{kind}")
    mean, var = float(take("batch_norm.running_mean")), float(take("batch_norm.running_var"))
    # decoder and pretraining heads, mask embeddings, the sinusoid buffers (recomputed), an unused input LayerNorm
    _check_consumed(state, used, ignore=r"decoder\..*|final_proj_.*|(encoder|decoder)_mask_emb|(enc|dec)_sine_pos_embed\..*|layer_norm\..*|batch_norm\.num_batches_tracked")
    # MAE-AST normalises inside the model: BatchNorm2d(1) without affine, then x 0.5
    return ModelSpec(encoder, preset("mae-ast", norm_mean=mean, norm_std=(var + 1e-5) ** 0.5, norm_scale=2.0)), weights


def from_efficientat(path: Path, audioset: Path | None) -> tuple[ModelSpec, dict]:
    """An EfficientAT MobileNetV3 AudioSet checkpoint (models/mn, "mlp" head; mn04 is width 0.4)
    -> a mobilenet encoder whose tag head is its last layer, labelled by `audioset`'s 527 classes."""
    if audioset is None:
        raise ConvertError("--from efficientat needs --audioset, the folder of class_labels_indices.csv and ontology.json")
    from train.labels import audioset_vocabulary

    state, used = load_state(path), set()
    take = lambda key: _take(state, key, used)  # noqa: E731
    labels, parents = audioset_vocabulary(Path(audioset))
    width_mult = next((v["width_mult"] for v in MOBILENET_SIZES.values() if v["width"] == take("classifier.2.weight").shape[0]), None)
    if width_mult is None:
        raise ConvertError(f"{path}: a projection of {state['classifier.2.weight'].shape[0]} is none of edgetag's mobilenet sizes")
    if take("classifier.5.weight").shape[0] != len(labels):
        raise ConvertError(f"{path}: {state['classifier.5.weight'].shape[0]} classes, not AudioSet's {len(labels)}")
    fbank = preset("efficientat")
    encoder = EncoderConfig(encoder="mobilenet", n_mels=fbank.n_mels, width=take("classifier.2.weight").shape[0], width_mult=width_mult, depth=15, heads=1)
    weights = {f"encoder.{k}": take(k) for k in state if k.startswith("features.")}
    for ours, theirs in (("encoder.project.0", "classifier.2"), ("heads.tags.fc", "classifier.5")):
        for kind in ("weight", "bias"):
            weights[f"{ours}.{kind}"] = take(f"{theirs}.{kind}")
    _check_consumed(state, used, ignore="")
    return ModelSpec(encoder, fbank, {TAGS: HeadConfig(TAGS, tuple(labels), parents)}, StreamConfig(window=1.0, hop=0.5)), weights


def convert(source: str, src: Path, out: Path, kind: str = TAGS, labels: list[str] | None = None, tokens: str = "", audioset: Path | None = None) -> Path:
    if source == "hf-ast":
        spec, weights = from_hf_ast(src, kind)
    elif source == "ssast":
        spec, weights = from_ssast(src, kind, labels)
    elif source == "mae-ast":
        spec, weights = from_mae_ast(src, tokens)
    elif source == "efficientat":
        spec, weights = from_efficientat(src, audioset)
    else:
        raise ConvertError(f"--from must be one of {', '.join(SOURCES)}, not {source!r}")
    spec = replace(spec, provenance={"stage": "import", "from": source, "source": Path(src).name})
    return checkpoint.save(out, _load_into(AudioTransformer(spec), weights))


def main(
    source: str = typer.Option(..., "--from", help="hf-ast, ssast, mae-ast or efficientat."),
    src: Path = typer.Argument(..., help="The source: a save_pretrained folder (hf-ast) or a .pth/.pt file."),
    out: Path = typer.Option(..., help="The edgetag checkpoint to write (.safetensors)."),
    head: str = typer.Option(TAGS, help=f"Kind of the imported classifier: {TAGS} (sigmoid) or {KEYWORDS} (softmax)."),
    labels: Path = typer.Option(None, help="A text file with one class name per line (SSAST heads carry none)."),
    tokens: str = typer.Option("", help="patch or frame, for MAE-AST files whose config does not say."),
    audioset: Path = typer.Option(None, help="efficientat: the folder of AudioSet's class_labels_indices.csv and ontology.json (the head's labels)."),
) -> None:
    try:
        names = [line.strip() for line in labels.read_text().splitlines() if line.strip()] if labels else None
        path = convert(source, src, out, head, names, tokens, audioset)
    except (ConvertError, OSError, ValueError) as e:
        typer.echo(f"train.convert: error: {e}", err=True)
        raise typer.Exit(2) from e
    model = checkpoint.load_model(path)
    heads = ", ".join(f"{n} ({len(h.labels)} classes)" for n, h in model.spec.heads.items()) or "none"
    print(f"{path}: {sum(p.numel() for p in model.parameters()):,} parameters, heads: {heads}")


if __name__ == "__main__":
    from edgetag.cli import run_guarded

    run_guarded(lambda: typer.run(main), __spec__.name)
