"""Self-supervised pretraining: MAE-AST (default) or the SSAST baseline.

    python -m train.pretrain --data ../shared/data --size tiny --frames 128 --steps 20000 --out runs/pre
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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import typer

from edgetag import checkpoint
from edgetag.features import preset
from edgetag.model import AudioTransformer, EncoderConfig
from train.data import CropDataset, collate, find_audio


@dataclass
class PretrainConfig:
    data: list[str] = field(default_factory=list)
    out: str = "runs/pretrain"
    method: str = "mae-ast"  # or "ssast"
    size: str = "tiny"
    tokens: str = "patch"
    masking: str = "chunk"  # MAE-AST: chunk or random; SSAST always clusters
    mask_ratio: float = 0.75
    decoder_depth: int = 2
    frames: int = 1024
    preset: str = "ast"
    batch_size: int = 16
    steps: int = 10000
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 1000
    checkpoint_every: int = 1000
    num_workers: int = 2
    seed: int = 0
    compile: bool = False


def build_model(c: PretrainConfig) -> torch.nn.Module:
    encoder = EncoderConfig.named(c.size, tokens=c.tokens)
    if c.method == "mae-ast":
        from train.mae import MAEAST

        return MAEAST(encoder, decoder_depth=c.decoder_depth, masking=c.masking, mask_ratio=c.mask_ratio)
    if c.method == "ssast":
        from train.ssast import SSAST

        return SSAST(encoder, mask_ratio=c.mask_ratio)
    raise ValueError(f"method must be mae-ast or ssast, not {c.method!r}")


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
    runtime = AudioTransformer(model.encoder.config)
    runtime.encoder.load_state_dict(model.encoder.state_dict())
    checkpoint.save(path, runtime, preset(c.preset), provenance={"stage": "pretrain", "step": step, "pretrain": asdict(c)})


def plot_losses(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in rows]
    for key in ("loss", "mse", "nce"):
        if key in rows[0]:
            ax.plot(steps, [r[key] for r in rows], label=key)
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("pretraining loss")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pretrain(c: PretrainConfig, resume: bool = False, device: str | None = None) -> list[dict]:
    """Run pretraining; returns the logged rows (step, loss, mse, nce, ...)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank = torch.distributed.get_rank()
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    else:
        rank = 0
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(c.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(c.seed + rank)

    files = find_audio(c.data)
    if not files:
        raise ValueError(f"no audio files found in {', '.join(c.data)}")
    dataset = CropDataset(files, preset(c.preset), c.frames, seed=c.seed)
    sampler = torch.utils.data.DistributedSampler(dataset, seed=c.seed) if distributed else None
    generator = torch.Generator().manual_seed(c.seed)
    loader = torch.utils.data.DataLoader(
        dataset, c.batch_size, shuffle=sampler is None, sampler=sampler, generator=generator,
        num_workers=c.num_workers, collate_fn=collate, drop_last=len(dataset) >= c.batch_size,
    )

    model = build_model(c).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=c.weight_decay, betas=(0.9, 0.98))
    step, rows, skipped = 0, [], 0
    state_path = out / "last.pt"
    if resume and state_path.exists():
        state = torch.load(state_path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, rows = state["step"], state["rows"]
    trained = torch.nn.parallel.DistributedDataParallel(model) if distributed else model
    forward = torch.compile(trained) if c.compile else trained
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else torch.autocast("cpu", enabled=False)

    def save_state():
        if rank == 0:
            save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "rows": rows, "config": asdict(c)}, state_path)
            export_encoder(model, c, step, out / "encoder.safetensors")

    model.train()
    # wall-clock seconds of training so far, carried across --resume so a run's cost stays on record
    elapsed, tick = (rows[-1].get("seconds", 0.0) if rows else 0.0), time.perf_counter()
    columns = [TextColumn("[bold]pretrain"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TextColumn("{task.fields[stats]}"), TimeRemainingColumn()]
    with Progress(*columns, disable=rank != 0) as progress:
        task = progress.add_task("pretrain", total=c.steps, completed=step, stats="")
        epoch = step * c.batch_size // max(1, len(dataset))
        while step < c.steps:
            dataset.epoch = epoch
            if sampler is not None:
                sampler.set_epoch(epoch)
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                for batch, n_skipped in loader:
                    skipped += n_skipped
                    if len(batch) == 0:
                        continue
                    start = time.perf_counter()
                    lr = lr_at(step, c)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    with autocast:
                        loss, metrics, _ = forward(batch.to(device, non_blocking=True))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
                    optimizer.step()
                    step += 1
                    row = {"step": step, "loss": loss.item(), **{k: float(v) for k, v in metrics.items()}, "lr": lr,
                           "seconds": elapsed + time.perf_counter() - tick}
                    rows.append(row)
                    clips_per_s = len(batch) / (time.perf_counter() - start)
                    progress.update(task, completed=step, stats=f"loss {row['loss']:.3f}  {clips_per_s:.0f} clips/s  skipped {skipped}")
                    if step % c.checkpoint_every == 0 or step == c.steps:
                        save_state()
                    if step >= c.steps:
                        break
            epoch += 1

    if rank == 0:
        with open(out / "loss.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[-1]))
            writer.writeheader()
            writer.writerows(rows)
        plot_losses(rows, out / "loss.png")
        if skipped:
            print(f"skipped {skipped} unreadable clip(s)")
    if distributed:
        torch.distributed.destroy_process_group()
    return rows


def main(
    data: list[str] = typer.Option(..., help="Folders, manifests (.csv/.jsonl with a path column) or files; repeatable."),
    out: str = typer.Option("runs/pretrain"),
    method: str = typer.Option("mae-ast", help="mae-ast or ssast."),
    size: str = typer.Option("tiny"),
    tokens: str = typer.Option("patch", help="patch (16x16) or frame (128x2)."),
    masking: str = typer.Option("chunk", help="random or chunk (MAE-AST)."),
    mask_ratio: float = typer.Option(0.75),
    frames: int = typer.Option(1024, help="Random crops of this many frames (10 ms each)."),
    preset_name: str = typer.Option("ast", "--preset", help="Fbank recipe."),
    batch_size: int = typer.Option(16, "--batch-size"),
    steps: int = typer.Option(10000),
    lr: float = typer.Option(1e-4),
    warmup_steps: int = typer.Option(1000),
    checkpoint_every: int = typer.Option(1000),
    num_workers: int = typer.Option(2),
    seed: int = typer.Option(0),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the model."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/last.pt."),
) -> None:
    config = PretrainConfig(
        data=data, out=out, method=method, size=size, tokens=tokens, masking=masking, mask_ratio=mask_ratio,
        frames=frames, preset=preset_name, batch_size=batch_size, steps=steps, lr=lr, warmup_steps=warmup_steps,
        checkpoint_every=checkpoint_every, num_workers=num_workers, seed=seed, compile=compile,
    )
    rows = pretrain(config, resume=resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{out}: {len(rows)} steps, loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}")


if __name__ == "__main__":
    typer.run(main)
