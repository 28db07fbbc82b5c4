"""MFCC-grams against log-mel input, and TERA against MAE-AST against no pretraining, at equal
budgets (the MFCC-gram transformers of Gauy & Finger 2021, measured here).

    python -m train.input_study --data ../shared/data --out runs/inputs

For each input (log-mel: the `ast` preset; MFCC-gram: `mfcc-gram`, 128 MFCCs from 128 mel bins)
and each objective (none, MAE-AST, TERA), an encoder with frame tokens (two frames each, as the
MFCC-gram model reads frames) is pretrained for the same number of steps on every clip under
--data (labels unused), then fine-tuned with the same settings on two tasks:

- keywords: the 12-class Speech Commands task, 20% of the speakers held out;
- respiratory: a speech-health-like task, seven vocal sounds (cough, throat clearing, breathing,
  sneeze, snoring, laughter, speech) from ESC-50 (folds 1-3, 5 against fold 4: source-disjoint)
  and DCASE 2016 (20% of the clips held out).

Writes OUT/results.json and OUT/results.md (the table), and prints the table, with what each
input costs per hop (the streaming fbank of one 0.5 s hop; the encoder is the same size for both).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import typer

from edgetag.spec import SIZES
from train.options import choose, command, setting

INPUTS = {"log-mel": "ast", "MFCC-gram": "mfcc-gram"}  # name -> fbank preset
OBJECTIVES = ("none", "mae-ast", "tera")
RESPIRATORY = ("Cough", "Throat clearing", "Breathing", "Sneeze", "Snoring", "Laughter", "Speech")


@dataclass
class StudyConfig:
    data: str = setting("../shared/data", "The shared data folder.")
    out: str = setting("runs/inputs", "Folder for every run, results.json and results.md.")
    size: str = setting("nano", "Encoder size of every run.")
    steps: int = setting(400, "Pretraining steps of each (input, objective).")
    batch_size: int = setting(32, "Pretraining crops per step.")
    epochs: int = setting(12, "Fine-tuning epochs of each task.")
    seed: int = setting(0, "Seed of every run.")

    def __post_init__(self):  # before any manifest is written or run started
        choose("size", self.size, SIZES)
        for name, value in (("--steps", self.steps), ("--batch-size", self.batch_size), ("--epochs", self.epochs)):
            if value < 1:
                raise ValueError(f"{name}: {value} is not >= 1")


def respiratory_manifests(data: Path, out: Path) -> dict[str, Path]:
    """Training and validation manifests of the respiratory task, from ESC-50 and DCASE 2016."""
    from train.data import Source

    dcase = data / "dcase2016_task2"
    sides = {"train": [f"esc50:{data / 'esc50_other_folds'}", f"{dcase},split=train,percent=20"],
             "val": [f"esc50:{data / 'esc50'},folds=4", f"{dcase},split=val,percent=20"]}
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for side, sources in sides.items():
        examples = [e for s in sources for e in Source.parse(s, head="tags").read() if e.labels[0] in RESPIRATORY]
        paths[side] = out / f"respiratory_{side}.csv"
        with open(paths[side], "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "label", "group"])
            writer.writerows([Path(e.path).resolve(), e.labels[0], e.group] for e in examples)  # a manifest's relative paths are its folder's
    return paths


def tasks(data: Path, out: Path) -> dict[str, dict]:
    from train.study import keyword_task

    respiratory = respiratory_manifests(data, out)
    return {"keywords": keyword_task(data), "respiratory": {"train": [f"tags=manifest:{respiratory['train']}"], "val": [f"tags=manifest:{respiratory['val']}"]}}


def hop_seconds(preset_name: str, hop: float = 0.5, repeats: int = 200) -> float:
    """Median seconds of the streaming fbank for one hop of audio."""
    from edgetag.bench import hop_push_seconds
    from edgetag.features import preset

    config = preset(preset_name)
    audio = (np.random.default_rng(0).standard_normal(int(hop * config.sample_rate)) * 0.1).astype(np.float32)
    return hop_push_seconds(config, audio, audio, repeats)


def study(c: StudyConfig) -> dict:
    from train.finetune import gather
    from train.study import equal_budget_run

    data, out = Path(c.data), Path(c.out)
    task_sources = tasks(data, out)
    results = {"settings": {"size": c.size, "steps": c.steps, "batch_size": c.batch_size, "epochs": c.epochs, "tokens": "frame"}, "runs": [], "hop_seconds": {},
               "val_clips": {task: sum(map(len, gather(sources["val"]).values())) for task, sources in task_sources.items()}}
    for name, preset_name in INPUTS.items():
        results["hop_seconds"][name] = hop_seconds(preset_name)
        for objective in OBJECTIVES:
            # frame tokens, as the MFCC-gram model reads frames
            run = {"input": name, **equal_budget_run(out / f"{preset_name}-{objective}", data, task_sources, objective, size=c.size, tokens="frame",
                                                     preset=preset_name, steps=c.steps, batch_size=c.batch_size, epochs=c.epochs, seed=c.seed)}
            results["runs"].append(run)
            print(json.dumps(run))
    (out / "results.json").write_text(json.dumps(results, indent=1))
    table = render(results)
    (out / "results.md").write_text(table + "\n")
    print(table)
    return results


def render(results: dict) -> str:
    s = results["settings"]
    lines = [f"`{s['size']}` encoders with frame tokens; {s['steps']} pretraining steps of {s['batch_size']} 1 s crops; {s['epochs']} fine-tuning epochs. "
             "Validation accuracy (best epoch" + (f"; {', '.join(f'{n} {task} clips' for task, n in results['val_clips'].items())}" if "val_clips" in results else "") + "):", "",
             "| input | pretraining | keywords (12-way) | respiratory (7-way) | pretraining minutes |", "|---|---|---|---|---|"]
    for r in results["runs"]:
        lines.append(f"| {r['input']} | {r['objective']} | {100 * r['keywords']:.1f}% | {100 * r['respiratory']:.1f}% | {r['pretrain_minutes']:.1f} |")
    lines += ["", "Streaming fbank per 0.5 s hop: " + ", ".join(f"{name} {1e3 * t:.3f} ms" for name, t in results["hop_seconds"].items()) + "."]
    return "\n".join(lines)


main = command(StudyConfig, study)

if __name__ == "__main__":
    from edgetag.cli import run_guarded

    run_guarded(lambda: typer.run(main), __spec__.name)
