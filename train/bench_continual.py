"""The continual-learning benchmark: TI-CL's task-incremental protocol on this project's data.

    python -m train.bench_continual --data ../shared/data --init runs/pre/encoder.safetensors --out runs/continual

Four tasks in turn, keywords (Speech Commands, 12-way) -> ESC-50 (50-way) -> DCASE 2016 (11-way)
-> UrbanSound8K (10-way), learned on the MAE-AST-pretrained encoder --init by each method:

- `conv`, `mlp`, `aat`: each task a `train.finetune --task` with its own adapters of that placement
  (TI-CL's ConvPass, a bottleneck beside the MLP, AAT's) in every block of the frozen base;
- `linear`: each task a linear probe (`--task --mode linear`);
- `full`: full fine-tuning in sequence, each task from the encoder the previous one left, with a
  head of its own; an earlier task is scored with its head on the later encoder (which is what
  forgetting means here);

each under the attentions asked for (`fta`: the base runs under TI-CL's factorised attention
throughout; it has no weights of its own), once per seed (`--seeds`: the new weights' initial
values, the crops and the order of the batches). After every step every task learned so far is scored
on its validation clips (clip accuracy over the engine's windows): the accuracy matrix.

Writes OUT/results.json, OUT/results.md (per variant, averaged over the seeds: the final
accuracies, the forgetting, the trainable share and seconds per task; then every run's matrix)
and OUT/continual.png; the last line per variant: `continual <method>/<attention> mean <a>%
forgetting <f> points`, with the range of the seeds' means when there are several.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import typer

from edgetag.checkpoint import load_model, save
from edgetag.model import AudioTransformer, num_parameters
from edgetag.runtime import TorchBackend
from edgetag.spec import ATTENTIONS, StreamConfig
from train.augment import AugmentConfig
from train.data import Source, load_features
from train.evaluate import clip_scores, report, targets
from train.finetune import FinetuneConfig, finetune
from train.options import bounded, choose, command, setting

METHODS = ("conv", "mlp", "aat", "linear", "full")
TASKS = ("keywords", "esc50", "dcase", "urbansound8k")


def task_sequence(data: Path) -> dict[str, dict]:
    """name -> the task's training and validation sources, in the order they are learned."""
    sc, us8k = data / "speech_commands", data / "urbansound8k"
    dcase = data / "dcase2016_task2"
    return {
        "keywords": {"train": f"keywords={sc},groups=20-100", "val": f"keywords={sc},split=val,percent=20"},
        "esc50": {"train": f"tags=esc50:{data / 'esc50_other_folds'}", "val": f"tags=esc50:{data / 'esc50'},folds=4"},
        "dcase": {"train": f"tags={dcase},split=train,percent=20", "val": f"tags={dcase},split=val,percent=20"},
        "urbansound8k": {"train": f"tags=urbansound8k:{us8k},folds=1;2,groups=0-25", "val": f"tags=urbansound8k:{us8k},folds=3"},
    }


@dataclass
class ContinualConfig:
    data: str = setting("../shared/data", "The shared data folder.")
    init: str = setting("", "The MAE-AST-pretrained encoder every method starts from (train.pretrain's encoder.safetensors).", required=True)
    tasks: list[str] = setting(list(TASKS), f"The tasks, learned in this order (of {', '.join(TASKS)}).")
    methods: list[str] = setting(list(METHODS), f"Methods: {', '.join(METHODS)}.")
    attentions: list[str] = setting(["full", "fta"], "The base's attention: full, fta.")
    fta_methods: list[str] = setting(["conv"], "The methods run under fta too (each adds four trainings).")
    adapter_dim: int = setting(16, "Adapters' bottleneck width.")
    epochs: int = setting(5, "Epochs per task.")
    seeds: list[int] = setting([0], "Each variant runs once per seed (initial weights of what it trains, crops, batch order); tables give the mean over them.")
    lr: float = setting(1e-3, "Peak learning rate of adapters, heads and probes.")
    full_lr: float = setting(5e-4, "Peak learning rate of full fine-tuning.")
    out: str = setting("runs/continual", "Folder for the runs, results.json, results.md and continual.png.")

    def __post_init__(self):
        for m in (*self.methods, *self.fta_methods):
            choose("method", m, METHODS)
        for a in self.attentions:
            choose("attention", a, ATTENTIONS)
        for t in self.tasks:
            choose("task", t, TASKS)
        bounded(self, ("epochs", self.epochs >= 1, ">= 1"), ("adapter_dim", self.adapter_dim >= 1, ">= 1"))
        if any(seed < 0 for seed in self.seeds):  # each becomes a train.finetune --seed, which is >= 0
            raise ValueError(f"--seeds: {self.seeds} are not all >= 0")


def base_under(init: str, attention: str, out: Path) -> Path:
    """--init as a model under `attention` (FTA has no weights: the same tensors, another config)."""
    model = load_model(init)
    spec = replace(model.spec, encoder=replace(model.spec.encoder, attention=attention), stream=StreamConfig(1.0, 0.5), heads={}, speech_gate=0.0)
    converted = AudioTransformer(spec)
    converted.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("heads.")})
    return save(out / f"base-{attention}.safetensors", converted)


def score(model: AudioTransformer, output: str, val: tuple[list, torch.Tensor, list[str]]) -> float:
    """Clip accuracy of one output (a head, or a task) on a task's cached validation features."""
    feats, y, labels = val
    backend = TorchBackend(model, tasks=(output,)) if output in model.spec.tasks else TorchBackend(model)
    order = list(backend.spec.heads[output].labels)
    scores = clip_scores(backend, feats, output)[:, [order.index(label) for label in labels]]
    return float(report(scores, y, labels)["accuracy"])


def run_variant(c: ContinualConfig, method: str, attention: str, seed: int, tasks: dict, vals: dict, out: Path) -> dict:
    """The four tasks in turn by one method and seed: the accuracy matrix, trainable shares, seconds."""
    base = base_under(c.init, attention, out)
    base_params = num_parameters(load_model(base))
    previous, steps, matrix = str(base), [], []
    heads: dict[str, str] = {}  # full fine-tuning: each task's checkpoint, for its head
    for name, sources in tasks.items():
        folder = out / f"{method}-{attention}-seed{seed}" / name
        common = dict(train=[sources["train"]], val=[sources["val"]], out=str(folder), init=previous, epochs=c.epochs, batch_size=64,
                      stream=StreamConfig(1.0, 0.5), augment=AugmentConfig(mixup=0.0), warmup_epochs=0.5, seed=seed)
        if method == "full":
            config = FinetuneConfig(**common, mode="full", lr=c.full_lr)
        elif method == "linear":
            config = FinetuneConfig(**common, task=name, mode="linear", lr=c.lr)
        else:
            config = FinetuneConfig(**common, task=name, mode="adapter", adapter=method, adapter_dim=c.adapter_dim, lr=c.lr)
        start = time.perf_counter()
        finetune(config, device="cpu")
        seconds = time.perf_counter() - start
        previous = str(folder / "best.safetensors")
        model = load_model(previous)
        if method == "full":
            heads[name] = previous
            trainable = base_params + sum(p.numel() for p in model.heads.parameters())
            row = {}
            for seen, ckpt in heads.items():  # each earlier head on this encoder
                old = load_model(ckpt)
                old.encoder.load_state_dict(model.encoder.state_dict())
                row[seen] = score(old, next(iter(old.spec.heads)), vals[seen])
        else:
            trainable = sum(p.numel() for k, p in model.named_parameters() if k.startswith(f"tasks.{name}."))
            row = {seen: score(model, seen, vals[seen]) for seen in heads | {name: previous}}
            heads[name] = previous
        matrix.append(row)
        steps.append({"task": name, "seconds": seconds, "trainable": trainable, "trainable_share": trainable / base_params})
        print(f"{method}/{attention} seed {seed} after {name}: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in row.items()))
    return {"method": method, "attention": attention, "seed": seed, "matrix": matrix, "steps": steps, "base_parameters": base_params}


def bench(c: ContinualConfig) -> dict:
    data, out = Path(c.data), Path(c.out)
    out.mkdir(parents=True, exist_ok=True)
    every = task_sequence(data)
    tasks = {name: every[name] for name in c.tasks}
    fbank = load_model(c.init).spec.fbank
    vals = {}
    for name, sources in tasks.items():  # the validation clips' features, once for every variant
        examples = Source.parse(sources["val"]).read()
        feats = load_features(examples, fbank, description=f"{name} val")
        kept = [(e, f) for e, f in zip(examples, feats) if f is not None]
        labels = sorted({label for e, _ in kept for label in e.labels})
        vals[name] = ([f for _, f in kept], targets([e for e, _ in kept], labels), labels)
    runs = [(m, a, seed) for a in c.attentions for m in c.methods if a == "full" or m in c.fta_methods for seed in c.seeds]
    results = {"settings": asdict(c), "tasks": list(tasks), "variants": []}
    done = out / "results.json"
    if done.is_file():  # runs measured by an earlier run with these settings (but for the seeds) are kept
        earlier = json.loads(done.read_text())
        if without_seeds(earlier.get("settings", {})) == without_seeds(results["settings"]):
            results["variants"] = [v for v in earlier["variants"] if identity(v) in runs]
    for method, attention, seed in runs:
        if any(identity(v) == (method, attention, seed) for v in results["variants"]):
            continue
        results["variants"].append(run_variant(c, method, attention, seed, tasks, vals, out))
        done.write_text(json.dumps(results, indent=1))
    table = render(results)
    (out / "results.md").write_text(table + "\n")
    plot(results, out / "continual.png")
    print(table)
    for (method, attention), seeded in grouped(results["variants"]).items():
        final, finals, forgetting = over_seeds(seeded, results["tasks"])
        spread = f" ({len(seeded)} seeds: {100 * min(finals):.1f}-{100 * max(finals):.1f}%)" if len(seeded) > 1 else ""
        print(f"continual {method}/{attention} mean {100 * final:.1f}% forgetting {100 * forgetting:.1f} points{spread}")
    return results


def identity(v: dict) -> tuple[str, str, int]:
    """(method, attention, seed) of a measured run; runs recorded before seeds were an option had seed 0."""
    return v["method"], v["attention"], v.get("seed", 0)


def without_seeds(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if k != "seeds"}


def grouped(variants: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """(method, attention) -> its runs, one per seed, in the order they were measured."""
    out: dict[tuple[str, str], list[dict]] = {}
    for v in variants:
        out.setdefault((v["method"], v["attention"]), []).append(v)
    return out


def summary(v: dict, tasks: list[str]) -> tuple[float, float]:
    """The mean final accuracy over the tasks, and the mean drop of each earlier task from just
    after it was learned to the end."""
    last = v["matrix"][-1]
    final = float(np.mean([last[t] for t in tasks]))
    forgetting = float(np.mean([v["matrix"][i][t] - last[t] for i, t in enumerate(tasks[:-1])]))
    return final, forgetting


def over_seeds(seeded: list[dict], tasks: list[str]) -> tuple[float, list[float], float]:
    """A variant's mean final accuracy over its seeds, each seed's, and the mean forgetting."""
    finals, forgetting = zip(*(summary(v, tasks) for v in seeded))
    return float(np.mean(finals)), list(finals), float(np.mean(forgetting))


def render(results: dict) -> str:
    """The table of final accuracies (each cell the mean over the seeds; the mean column also gives
    the range of the seeds' means), then every run's accuracy matrix."""
    tasks = results["tasks"]
    lines = ["| method | attention | seeds | " + " | ".join(f"{t} (final)" for t in tasks) + " | mean | forgetting | trainable per task | seconds per task |",
             "|---|---|---|" + "---|" * (len(tasks) + 4)]
    for (method, attention), seeded in grouped(results["variants"]).items():
        final, finals, forgetting = over_seeds(seeded, tasks)
        share = np.mean([s["trainable_share"] for v in seeded for s in v["steps"]])
        seconds = np.mean([s["seconds"] for v in seeded for s in v["steps"]])
        spread = f" ({100 * min(finals):.1f}-{100 * max(finals):.1f})" if len(seeded) > 1 else ""
        lines.append(f"| {method} | {attention} | {len(seeded)} | " + " | ".join(f"{100 * np.mean([v['matrix'][-1][t] for v in seeded]):.1f}%" for t in tasks)
                     + f" | {100 * final:.1f}%{spread} | {100 * forgetting:.1f} points | {100 * share:.1f}% | {seconds:.0f} |")
    lines += ["", "Accuracy matrices (row: after learning that task; column: the task scored):", ""]
    for v in results["variants"]:
        lines += [f"{v['method']} / {v['attention']} / seed {identity(v)[2]}:", "", "| after | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
        for t, row in zip(tasks, v["matrix"]):
            lines.append(f"| {t} | " + " | ".join(f"{100 * row[s]:.1f}%" if s in row else "" for s in tasks) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = results["tasks"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (method, attention), seeded in grouped(results["variants"]).items():  # the mean over the seeds
        first = np.mean([[row[tasks[0]] for row in v["matrix"]] for v in seeded], axis=0)
        learned = np.mean([[np.mean(list(row.values())) for row in v["matrix"]] for v in seeded], axis=0)
        axes[0].plot(range(1, len(tasks) + 1), 100 * first, marker="o", label=f"{method} / {attention}")
        axes[1].plot(range(1, len(tasks) + 1), 100 * learned, marker="o", label=f"{method} / {attention}")
    for ax, title in zip(axes, (f"{tasks[0]} after each task", "mean over the tasks learned so far")):
        ax.set_xticks(range(1, len(tasks) + 1), tasks)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(title)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


main = command(ContinualConfig, bench)

if __name__ == "__main__":
    from edgetag.cli import run_guarded

    run_guarded(lambda: typer.run(main), __spec__.name)
