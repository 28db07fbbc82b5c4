"""Equal-budget runs: an encoder pretrained with one objective (or none) for a fixed number of
steps on every clip under the data folder (labels unused), then fine-tuned with the same
settings on each task. What `train.input_study` (inputs and objectives) and
`train.bench_encoders` (encoders) compare.
"""

from __future__ import annotations

import time
from pathlib import Path


def keyword_task(data: Path) -> dict[str, list[str]]:
    """The 12-class Speech Commands task, 20% of the speakers held out."""
    sc = data / "speech_commands"
    return {"train": [f"keywords={sc},split=train,percent=20"], "val": [f"keywords={sc},split=val,percent=20"]}


def esc50_task(data: Path) -> dict[str, list[str]]:
    """ESC-50, 50-way: folds 1-3 and 5 against fold 4 (source-disjoint)."""
    return {"train": [f"tags=esc50:{data / 'esc50_other_folds'}"], "val": [f"tags=esc50:{data / 'esc50'},folds=4"]}


def equal_budget_run(folder: Path, data: Path, tasks: dict[str, dict], objective: str, *, encoder: str = "transformer", attention: str = "full", size: str,
                     tokens: str, preset: str = "ast", steps: int, batch_size: int, epochs: int, seed: int = 0) -> dict:
    """Pretrain (unless `objective` is "none") on 1 s crops of everything under `data`, then
    fine-tune on each task under `attention` (MAE-AST and SS-MAST pretrain with full attention:
    their encoders see no whole grid, and FTA has no weights of its own);
    -> {"objective", "pretrain_minutes", "pretrain_loss", task: best validation accuracy}."""
    from train.finetune import FinetuneConfig, finetune
    from train.pretrain import SUBSET_METHODS, PretrainConfig, pretrain

    run: dict = {"objective": objective, "pretrain_minutes": 0.0}
    init = ""
    if objective != "none":
        start = time.perf_counter()
        # patches mask in chunks, frames at random (MAE-AST's recipes); the same steps and crops for every objective
        rows = pretrain(PretrainConfig(data=[str(data)], out=str(folder / "pretrain"), method=objective, encoder=encoder, size=size, tokens=tokens,
                                       attention="full" if objective in SUBSET_METHODS else attention,
                                       masking="chunk" if tokens == "patch" else "random", preset=preset, frames=98, batch_size=batch_size, steps=steps,
                                       lr=1e-3, warmup_steps=steps // 10, checkpoint_every=steps, num_workers=1, seed=seed))
        run.update(pretrain_minutes=(time.perf_counter() - start) / 60, pretrain_loss=[rows[0]["loss"], rows[-1]["loss"]])
        init = str(folder / "pretrain" / "encoder.safetensors")
    for task, sources in tasks.items():
        best = finetune(FinetuneConfig(**sources, out=str(folder / task), init=init, encoder=encoder, attention=attention, size=size, tokens=tokens, preset=preset,
                                       epochs=epochs, lr=1e-3, precision="bf16", seed=seed))
        run[task] = next(iter(best.values()))["accuracy"]
    return run
