"""Few-shot quality of `edgetag learn`: accuracy against the number of clips per class.

    python -m train.bench_fewshot --data ../shared/data --out runs/fewshot
    python -m train.bench_fewshot --data ../shared/data --shots 1 5 --seeds 1 --steps 50   # a quick look

Class sets the model never learned to tell apart. The bundled model heard them only as the
keyword head's `_unknown_`, from other speakers than those here (its recipe trained on wake-word
clips of hash groups 50-80 and Arabic speakers of groups 0-15): the wake words "alexa",
"computer" and "jarvis", and five Arabic commands. For each number of clips per class and each
seed: that many clips per class drawn from the training groups, a task learned on the frozen model
as `edgetag learn` learns it (its defaults: conv adapters on a transformer base, a linear probe on
a MobileNet; built-in negatives) and, where that is not a linear probe already, the baseline: a
linear probe on the model's frozen embedding through the same code (`--adapter none`). Each is
scored on clips of other speakers: a clip's class is the task's class whose probability peaks
highest over the clip's windows (the streaming engine's windows), among the set's classes.

Writes OUT/results.json, OUT/results.md and OUT/fewshot.png (accuracy against clips per class);
the last lines, one per set: `fewshot <set> <k>-shot learn <a>% probe <b>% ...` (no probe where
learn's task is one).
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import typer

from edgetag import audio
from edgetag.checkpoint import load_model
from edgetag.features import fbank
from edgetag.learn import LearnConfig, learn, resolve_adapter
from edgetag.runtime import TorchBackend, clip_probabilities
from train.data import Source
from train.options import bounded, command, setting

@dataclass
class FewShotConfig:
    data: str = setting("../shared/data", "The shared data folder (wake_words/, arabic_speech_commands/).")
    model: str = setting("", "The base checkpoint (default: the bundled model).")
    shots: list[int] = setting([1, 3, 5, 10, 20], "Clips per class.")
    seeds: int = setting(3, "Draws of the training clips per number of clips.")
    test_clips: int = setting(40, "Test clips per class, of other speakers.")
    steps: int = setting(300, "Training steps of each task (edgetag learn's --steps).")
    out: str = setting("runs/fewshot", "Folder for results.json, results.md and fewshot.png.")

    def __post_init__(self):
        bounded(self, ("seeds", self.seeds >= 1, ">= 1"), ("test_clips", self.test_clips >= 1, ">= 1"), ("steps", self.steps >= 1, ">= 1"))
        if not self.shots or min(self.shots) < 1:
            raise ValueError(f"--shots: {self.shots} are not all >= 1")


def class_sets(data: Path) -> dict[str, dict[str, list]]:
    """Per set, per class: (training pool, test clips) of groups the bundled model never heard."""
    arabic = Source.parse(f"tags={data / 'arabic_speech_commands'},groups=15-40").read()
    words = sorted({e.labels[0] for e in arabic})[:5]
    sets = {
        "wake words": (f"tags={data / 'wake_words'},groups=0-50", f"tags={data / 'wake_words'},groups=80-100", None),
        "Arabic commands": (f"tags={data / 'arabic_speech_commands'},groups=15-40", f"tags={data / 'arabic_speech_commands'},groups=70-100", words),
    }
    out = {}
    for name, (train, test, keep) in sets.items():
        pools = {side: Source.parse(text).read() for side, text in (("train", train), ("test", test))}
        labels = keep or sorted({e.labels[0] for e in pools["train"]})
        out[name] = {label: ([e.path for e in pools["train"] if e.labels[0] == label], sorted(e.path for e in pools["test"] if e.labels[0] == label))
                     for label in labels}
    return out


def accuracy(path: Path, name: str, labels: list[str], test: dict[str, list]) -> float:
    """Clip accuracy among `labels`: the class whose task probability peaks highest over the clip's windows."""
    backend = TorchBackend(load_model(path), tasks=(name,))
    clips = [(label, f) for label in labels for f in test[label]]
    probs = clip_probabilities(backend, [f for _, f in clips])
    order = list(backend.spec.heads[name].labels)
    guesses = [order[int(p[name].max(0).argmax())] for p in probs]
    return float(np.mean([g == label for (label, _), g in zip(clips, guesses)]))


def bench(c: FewShotConfig) -> dict:
    """Every (set, clips per class, seed, method): learn, score; results.json, results.md, the plot."""
    from rich.progress import track

    data, out = Path(c.data), Path(c.out)
    if not (data / "wake_words").is_dir() or not (data / "arabic_speech_commands").is_dir():
        raise FileNotFoundError(f"--data {data}: needs wake_words/ and arabic_speech_commands/ (../shared/data)")
    out.mkdir(parents=True, exist_ok=True)
    spec = load_model(c.model or None).spec
    methods = {"learn": "auto", "probe": "none"}  # edgetag learn's default, and its baseline where that differs
    if resolve_adapter("auto", spec) == "none":
        del methods["probe"]
    results: dict = {"settings": asdict(c), "model": spec.model_id, "rows": []}
    for set_name, classes in class_sets(data).items():
        test = {}
        for label, (_, files) in classes.items():
            test[label] = []
            for f in files[: c.test_clips]:
                test[label].append(fbank(audio.load(f, spec.fbank.sample_rate), spec.fbank))
        runs = [(k, seed, method) for k in c.shots for seed in range(c.seeds) for method in methods]
        for k, seed, method in track(runs, description=set_name):
            rng = np.random.default_rng(seed)
            chosen = {label: [pool[i] for i in rng.choice(len(pool), k, replace=False)] for label, (pool, _) in classes.items()}
            with tempfile.TemporaryDirectory() as tmp:
                into = Path(tmp) / "task.safetensors"
                config = LearnConfig(adapter=methods[method], steps=c.steps, seed=seed, min_clips=1)
                start = time.perf_counter()
                learned, _ = learn("fewshot", chosen, [], into, c.model or None, config)
                seconds = time.perf_counter() - start
                score = accuracy(into, "fewshot", list(classes), test)
            results["rows"].append({"set": set_name, "shots": k, "seed": seed, "method": method, "what": learned.task.kind, "accuracy": score, "seconds": seconds,
                                    "trainable": learned.trainable, "test_clips": sum(map(len, test.values())), "classes": list(classes)})
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(render(results) + "\n")
    plot(results, out / "fewshot.png")
    print(render(results))
    for line in summary(results):
        print(line)
    return results


def mean_accuracy(results: dict) -> dict[tuple[str, int, str], tuple[float, float]]:
    """(set, shots, method) -> (mean accuracy, its spread: the standard deviation over seeds)."""
    cells: dict = {}
    for r in results["rows"]:
        cells.setdefault((r["set"], r["shots"], r["method"]), []).append(r["accuracy"])
    return {key: (float(np.mean(v)), float(np.std(v))) for key, v in cells.items()}


def methods_of(results: dict) -> dict[str, str]:
    """method -> its name in the table and the plot, in the order they ran."""
    names = {}
    for r in results["rows"]:
        names.setdefault(r["method"], f"edgetag learn ({r['what']})" if r["method"] == "learn" else "linear probe")
    return names


def render(results: dict) -> str:
    means, rows, draws = mean_accuracy(results), results["rows"], results["settings"]["seeds"]
    sets = list(dict.fromkeys(r["set"] for r in rows))
    shots = sorted({r["shots"] for r in rows})
    lines = [f"Few-shot tasks on `{results['model']}`, {results['settings']['seeds']} draws each, {results['settings']['steps']} steps; "
             "accuracy among the set's classes on clips of other speakers" + (" (mean +- std over the draws):" if draws > 1 else ":"), "",
             "| set | classes | test clips | method | " + " | ".join(f"{k} per class" for k in shots) + " | seconds per task |",
             "|---|---|---|---|" + "---|" * len(shots) + "---|"]
    for s in sets:
        first = next(r for r in rows if r["set"] == s)
        for method, what in methods_of(results).items():
            cells = [f"{100 * means[(s, k, method)][0]:.1f}%" + (f" +- {100 * means[(s, k, method)][1]:.1f}" if draws > 1 else "") for k in shots]
            seconds = np.mean([r["seconds"] for r in rows if r["set"] == s and r["method"] == method])
            lines.append(f"| {s} | {len(first['classes'])} | {first['test_clips']} | {what} | " + " | ".join(cells) + f" | {seconds:.0f} |")
    return "\n".join(lines)


def summary(results: dict) -> list[str]:
    means = mean_accuracy(results)
    sets = list(dict.fromkeys(r["set"] for r in results["rows"]))
    shots = sorted({r["shots"] for r in results["rows"]})
    methods = methods_of(results)
    return [f"fewshot {s.replace(' ', '_')} " + " ".join(f"{k}-shot" + "".join(f" {m} {100 * means[(s, k, m)][0]:.1f}%" for m in methods) for k in shots)
            for s in sets]


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = mean_accuracy(results)
    sets = list(dict.fromkeys(r["set"] for r in results["rows"]))
    shots = sorted({r["shots"] for r in results["rows"]})
    fig, axes = plt.subplots(1, len(sets), figsize=(5 * len(sets), 4), squeeze=False)
    for ax, s in zip(axes[0], sets):
        for method, what in methods_of(results).items():
            m = np.array([means[(s, k, method)][0] for k in shots])
            sd = np.array([means[(s, k, method)][1] for k in shots])
            ax.errorbar(shots, 100 * m, yerr=100 * sd, marker="o", capsize=3, label=what)
        classes = len(next(r for r in results["rows"] if r["set"] == s)["classes"])
        ax.axhline(100 / classes, color="grey", linestyle=":", label="chance")
        ax.set_xscale("log")
        ax.set_xticks(shots, [str(k) for k in shots])
        ax.set_xlabel("clips per class")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{s} ({classes} classes)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


main = command(FewShotConfig, bench)

if __name__ == "__main__":
    from edgetag.cli import run_guarded

    run_guarded(lambda: typer.run(main), __spec__.name)
