"""Self-supervised pretraining: MAE-AST (default), the SSAST baseline, TERA or SS-MAST, of a
transformer, a Mamba encoder (SSAMBA: SSAST's objective on bidirectional Mamba blocks) or a MAST
(the multiscale transformer: MAE-AST or SS-MAST).

    python -m train.pretrain --data ../shared/data --size tiny --frames 128 --steps 20000 --out runs/pre
    python -m train.pretrain --method tera --preset mfcc-gram --tokens frame ...   # MFCC-gram transformers
    python -m train.pretrain --encoder mamba --method ssast --size tiny ...          # SSAMBA
    python -m train.pretrain --method ss-mast --patch-drop 0.1 --queue-size 4096 ... # contrastive, a momentum teacher
    python -m train.pretrain --encoder mast --size mast-edge --method ss-mast ...    # SS-MAST on MAST
    torchrun --nproc-per-node 8 -m train.pretrain ...      # several GPUs (DistributedDataParallel)

Writes into --out: `last.pt` (the training state, for --resume, every --checkpoint-every steps,
atomically), `encoder.safetensors` (an edgetag checkpoint of the encoder, which fine-tuning
starts from), `loss.csv` and `loss.png`.
"""

from __future__ import annotations

import csv
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import typer

from edgetag import checkpoint
from edgetag.features import PRESETS, preset
from edgetag.model import AudioTransformer
from edgetag.spec import ATTENTIONS, TOKEN_ENCODERS, TOKENS, EncoderConfig, ModelSpec, sizes_of
from train.data import CropDataset, collate, find_audio
from train.objectives.mae import MAEAST, MASKINGS, MultiScaleMAE
from train.objectives.ssast import SSAST
from train.objectives.ssmast import SSMAST, SSMASTConfig
from train.objectives.tera import TERA, TeraConfig
from train.options import choose, command, setting

METHODS = ("mae-ast", "ssast", "tera", "ss-mast")
# Objectives whose encoder reads a subset of the tokens (MAE-AST's visible quarter, what SS-MAST's
# patch-drop leaves): not the whole grid FTA attends along, so they pretrain with full attention.
SUBSET_METHODS = ("mae-ast", "ss-mast")
MASKABLE_TOKENS = ("patch", "frame")  # a conv stem's tokens see their neighbours: hiding one hides nothing
ENCODERS = (*TOKEN_ENCODERS, "mast")
# SSAST and TERA predict each token from its own output, which a MAST's coarse last stage lacks
MAST_METHODS = ("mae-ast", "ss-mast")


@dataclass
class PretrainConfig:
    data: list[str] = setting([], "Folders, manifests (.csv/.jsonl with a path column) or files; repeatable.", required=True)
    out: str = setting("runs/pretrain", "Folder for the run: last.pt, encoder.safetensors, loss.csv, loss.png.")
    method: str = setting("mae-ast", f"Objective: {' or '.join(METHODS)}.")
    encoder: str = setting("transformer", f"Encoder: {', '.join(ENCODERS)} (SSAMBA's bidirectional Mamba; MAST, the multiscale transformer: --method {' or '.join(MAST_METHODS)}).")
    size: str = setting("tiny", "Encoder size: nano, mini, tiny, small, base (mamba: also ssamba-tiny/-small/-base, 24 layers; mast: mast-edge, mast-t, mast-s).")
    tokens: str = setting("patch", "patch (16x16), frame (2 frames) or conv (a convolutional stem; --method tera only) tokens.")
    attention: str = setting("full", "full, or fta (TI-CL's frequency-time factorised attention; not --method mae-ast, whose encoder sees no whole grid).")
    masking: str = setting("chunk", "MAE-AST's masks: chunk or random (SSAST always masks clusters).")
    mask_ratio: float = setting(0.75, "Share of the tokens masked.")
    decoder_depth: int = setting(2, "MAE-AST decoder layers.")
    tera: TeraConfig = setting(TeraConfig(), "TERA's alterations and loss (--method tera).")
    ssmast: SSMASTConfig = setting(SSMASTConfig(), "SS-MAST's views, patch-drop, queue and teacher (--method ss-mast).")
    frames: int = setting(1024, "Random crops of this many frames (10 ms each).")
    preset: str = setting("ast", "Fbank recipe (edgetag.features.PRESETS).")
    batch_size: int = setting(16, "Crops per step.")
    steps: int = setting(10000, "Optimizer steps.")
    lr: float = setting(1e-4, "Peak learning rate (AdamW).")
    weight_decay: float = setting(0.01, "AdamW weight decay.")
    warmup_steps: int = setting(1000, "Linear warm-up, then cosine decay to zero.")
    checkpoint_every: int = setting(1000, "Write last.pt and encoder.safetensors every this many steps.")
    num_workers: int = setting(2, "Data-loading processes.")
    seed: int = setting(0, "Seed of the crops, masks and initial weights.")
    compile: bool = setting(False, "torch.compile the model.")

    def __post_init__(self):
        # TERA alters the input and SS-MAST compares views instead of predicting hidden tokens, so any token kind suits them
        tokens = TOKENS if self.method in ("tera", "ss-mast") else MASKABLE_TOKENS
        for name, allowed in (("method", METHODS), ("encoder", ENCODERS), ("size", sizes_of(self.encoder)), ("tokens", tokens), ("masking", MASKINGS), ("preset", PRESETS),
                              ("attention", ATTENTIONS)):
            choose(name, getattr(self, name), allowed)
        if self.encoder == "mast" and self.method not in MAST_METHODS:
            raise ValueError(f"--method {self.method}: it predicts each token from the encoder's output at that token, and a MAST's last stage "
                             f"is coarser than its tokens; pretrain a MAST with --method {' or '.join(MAST_METHODS)}")
        if self.method in SUBSET_METHODS and self.attention == "fta":
            sees = "a random quarter of the tokens" if self.method == "mae-ast" else "the tokens patch-drop leaves"
            raise ValueError(f"--attention fta: {self.method}'s encoder sees {sees}, not the grid FTA attends along; "
                             "pretrain with full attention and fine-tune with --attention fta (FTA has no weights of its own)")
        self.encoder_config()  # a token shape that does not fit the preset's features fails here, before any data is read

    def encoder_config(self) -> EncoderConfig:
        return EncoderConfig.named(self.size, encoder=self.encoder, tokens=self.tokens, attention=self.attention, n_mels=preset(self.preset).n_features)


def build_model(c: PretrainConfig) -> torch.nn.Module:
    encoder = c.encoder_config()
    if c.method == "tera":
        return TERA(encoder, c.tera)
    if c.method == "ssast":
        return SSAST(encoder, mask_ratio=c.mask_ratio)
    if c.method == "ss-mast":
        return SSMAST(encoder, c.ssmast, steps=c.steps)
    mae = MultiScaleMAE if c.encoder == "mast" else MAEAST
    return mae(encoder, decoder_depth=c.decoder_depth, masking=c.masking, mask_ratio=c.mask_ratio)


def lr_at(step: int, c: PretrainConfig) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < c.warmup_steps:
        return c.lr * (step + 1) / c.warmup_steps
    progress = (step - c.warmup_steps) / max(1, c.steps - c.warmup_steps)
    return c.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def export_encoder(model: torch.nn.Module, c: PretrainConfig, step: int, path: Path) -> None:
    """The encoder alone, as an edgetag checkpoint (no heads: it returns the embedding)."""
    runtime = AudioTransformer(ModelSpec(model.encoder.config, preset(c.preset), provenance={"stage": "pretrain", "step": step, "pretrain": asdict(c)}))
    runtime.encoder.load_state_dict(model.encoder.state_dict())
    checkpoint.save(path, runtime)


def save_state(c: PretrainConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, rows: list[dict]) -> None:
    """OUT/last.pt to resume from, and OUT/encoder.safetensors to fine-tune from."""
    save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "rows": rows, "config": asdict(c)}, Path(c.out) / "last.pt")
    export_encoder(model, c, step, Path(c.out) / "encoder.safetensors")


def restore(c: PretrainConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: str) -> tuple[int, list[dict]]:
    """The step and logged rows of OUT/last.pt, its weights and optimizer state loaded."""
    state = torch.load(Path(c.out) / "last.pt", map_location=device, weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return state["step"], state["rows"]


def write_log(rows: list[dict], out: Path) -> None:
    with open(out / "loss.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[-1]))
        writer.writeheader()
        writer.writerows(rows)
    plot_losses(rows, out / "loss.png")


def plot_losses(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in rows]
    for key in ("loss", "mse", "nce", "l1"):
        if key in rows[0]:
            ax.plot(steps, [r[key] for r in rows], label=key)
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("pretraining loss")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def init_distributed() -> tuple[bool, int]:
    """(distributed, rank): one process per GPU under torchrun, else one process, rank 0."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False, 0
    torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return True, torch.distributed.get_rank()


def make_loader(c: PretrainConfig, distributed: bool) -> tuple[CropDataset, torch.utils.data.DistributedSampler | None, torch.utils.data.DataLoader]:
    files = find_audio(c.data)
    if not files:
        raise ValueError(f"no audio files found in {', '.join(c.data)}")
    dataset = CropDataset(files, preset(c.preset), c.frames, seed=c.seed)
    sampler = torch.utils.data.DistributedSampler(dataset, seed=c.seed) if distributed else None
    loader = torch.utils.data.DataLoader(dataset, c.batch_size, shuffle=sampler is None, sampler=sampler, generator=torch.Generator().manual_seed(c.seed),
                                         num_workers=c.num_workers, collate_fn=collate, drop_last=len(dataset) >= c.batch_size)
    return dataset, sampler, loader


def train_step(forward, model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor, lr: float, autocast) -> tuple[torch.Tensor, dict]:
    for group in optimizer.param_groups:
        group["lr"] = lr
    with autocast:
        loss, metrics, _ = forward(batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
    optimizer.step()
    return loss, metrics


def pretrain(c: PretrainConfig, resume: bool = False, device: str | None = None) -> list[dict]:
    """Self-supervised pretraining of an encoder on unlabelled audio (MAE-AST, the SSAST
    baseline, TERA or SS-MAST); returns the logged rows (step, loss, mse, nce or l1, ...). `resume` continues from
    OUT/last.pt."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    distributed, rank = init_distributed()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    Path(c.out).mkdir(parents=True, exist_ok=True)
    torch.manual_seed(c.seed + rank)
    dataset, sampler, loader = make_loader(c, distributed)
    model = build_model(c).to(device)
    # a momentum teacher (SS-MAST) follows the student by its own rule, never by gradients
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=c.lr, weight_decay=c.weight_decay, betas=(0.9, 0.98))
    step, rows = restore(c, model, optimizer, device) if resume and (Path(c.out) / "last.pt").exists() else (0, [])
    trained = torch.nn.parallel.DistributedDataParallel(model) if distributed else model
    forward = torch.compile(trained) if c.compile else trained
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else torch.autocast("cpu", enabled=False)

    model.train()
    # wall-clock seconds of training so far, carried across --resume so a run's cost stays on record
    elapsed, tick, skipped = (rows[-1]["seconds"] if rows else 0.0), time.perf_counter(), 0
    columns = [TextColumn("[bold]pretrain"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TextColumn("{task.fields[stats]}"), TimeRemainingColumn()]
    with Progress(*columns, disable=rank != 0) as progress, warnings.catch_warnings():
        warnings.simplefilter("always")
        task = progress.add_task("pretrain", total=c.steps, completed=step, stats="")
        epoch = step * c.batch_size // max(1, len(dataset))
        while step < c.steps:
            dataset.epoch = epoch
            if sampler is not None:
                sampler.set_epoch(epoch)
            readable = False
            for batch, n_skipped in loader:
                skipped += n_skipped
                if not len(batch):
                    continue
                readable = True
                start, lr = time.perf_counter(), lr_at(step, c)
                loss, metrics = train_step(forward, model, optimizer, batch.to(device, non_blocking=True), lr, autocast)
                if not torch.isfinite(loss):  # stop before a NaN encoder is saved over the last good checkpoint
                    raise ValueError(f"the loss became {loss.item()} at step {step + 1}; {c.out} keeps its last checkpoint")
                step += 1
                rows.append({"step": step, "loss": loss.item(), **{k: float(v) for k, v in metrics.items()}, "lr": lr, "seconds": elapsed + time.perf_counter() - tick})
                progress.update(task, completed=step, stats=f"loss {rows[-1]['loss']:.3f}  {len(batch) / (time.perf_counter() - start):.0f} clips/s  skipped {skipped}")
                if rank == 0 and (step % c.checkpoint_every == 0 or step == c.steps):
                    save_state(c, model, optimizer, step, rows)
                if step >= c.steps:
                    break
            if not readable:  # else a folder of unreadable files loops here for ever
                raise ValueError(f"none of the {len(dataset)} audio files under {', '.join(c.data)} is readable")
            epoch += 1
    if rank == 0:
        write_log(rows, Path(c.out))
        if skipped:
            print(f"skipped {skipped} unreadable clip(s)")
    if distributed:
        torch.distributed.destroy_process_group()
    return rows


def run(c: PretrainConfig, resume: bool = False) -> None:
    """Self-supervised pretraining of an encoder on unlabelled audio (MAE-AST, the SSAST
    baseline, TERA or SS-MAST); writes OUT/encoder.safetensors to fine-tune from."""
    rows = pretrain(c, resume=resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{c.out}: {len(rows)} steps, loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}")


main = command(PretrainConfig, run, resume=(bool, typer.Option(False, "--resume", help="Continue from OUT/last.pt.")))

if __name__ == "__main__":
    from edgetag.cli import run_guarded

    run_guarded(lambda: typer.run(main), __spec__.name)
