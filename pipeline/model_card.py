"""MODEL_CARD.md for a recipe's model, written from what its stages measured (pipeline.recipe)."""

from __future__ import annotations

import platform
from pathlib import Path

from edgetag.model import KEYWORDS
from train.labels import COMMAND_WORDS

DATA = [
    ("Speech Commands v0.02 (12-class task)", "speech_commands/", "keywords: training and speaker-disjoint validation (20% of speakers)",
     "CC BY 4.0, Warden 2018"),
    ("ESC-50, folds 1-3 and 5", "esc50_other_folds/", "tags: training; keywords: 15% of its sources (the student: 50%) as audio without a word (`_silence_`)",
     "CC BY-NC 3.0 (ESC-10 subset CC BY 3.0), Piczak 2015"),
    ("ESC-50, fold 4", "esc50/", "tags: validation (source-disjoint); keyword calibration negatives", "as above"),
    ("DCASE 2016 task 2", "dcase2016_task2/", "tags: training and validation (20% of clips)", "DCASE 2016 challenge data, Lafay et al."),
    ("Speech Commands background noise", "background_noise/", "noise augmentation", "CC BY 4.0"),
    ("Free Spoken Digit Dataset", "fsdd/", "keywords: two of the six speakers set thresholds, one is `_unknown_` in training, three measure false alarms", "CC BY-SA 4.0, Jackson et al."),
    ("Picovoice wake words", "wake_words/", "keywords: half of the clips set thresholds, 10% (the student: 30%) are `_unknown_` in training, 20% measure false alarms", "Apache-2.0, Picovoice"),
]


def pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def results_table(report: dict) -> list[str]:
    rows = ["| model | parameters | size | keywords: accuracy (12-way) | ESC-50: accuracy (50-way) | ESC-50: mAP | DCASE 2016: accuracy |",
            "|---|---|---|---|---|---|---|"]
    for name, m in report["models"].items():
        params = f"{m['parameters'] / 1e6:.2f}M" if "parameters" in m else "(as student)"
        rows.append(f"| {name} | {params} | {m['size_bytes'] / 2**20:.1f} MiB | {pct(m['keywords']['accuracy'])} | {pct(m['esc50']['accuracy'])} "
                    f"| {m['esc50']['mAP']:.3f} | {pct(m['dcase']['accuracy'])} |")
    return rows


def spotting_table(report: dict) -> list[str]:
    rows = ["| model | false alarms / hour (held out) | false alarms | hours | keyword clips spotted | spotted as another keyword |",
            "|---|---|---|---|---|---|"]
    for name, m in report["models"].items():
        s = m.get("spotting")
        if s:
            rows.append(f"| {name} | {s['false_alarms_per_hour']:.2f} | {s['false_alarms']} | {s['negative_hours']:.2f} | {pct(s['recall'])} | {pct(s['wrong_spots'])} |")
    return rows


def keyword_table(report: dict, thresholds: dict[str, float]) -> list[str]:
    per = report["models"]["student"]["spotting"]["per_keyword"]
    rows = ["| keyword | threshold | clips | spotted | as another keyword |", "|---|---|---|---|---|"]
    for label in thresholds:
        if label in per:
            rows.append(f"| {label} | {thresholds[label]:.2f} | {per[label]['clips']} | {pct(per[label]['recall'])} | {pct(per[label]['wrong'])} |")
    return rows


def latency_table(report: dict) -> list[str]:
    rows = ["| backend | fbank increment | encoder | total (median / p95) | share of the hop's audio | file, 2 threads | `listen` peak RSS |",
            "|---|---|---|---|---|---|---|"]
    for name, r in report["latency"].items():
        rows.append(f"| {name} ({r['backend']}) | {r['fbank_median_s'] * 1e3:.2f} ms | {r['encoder_median_s'] * 1e3:.2f} ms "
                    f"| {r['total_median_s'] * 1e3:.2f} / {r['total_p95_s'] * 1e3:.2f} ms | {100 * r['hop_share']:.2f}% "
                    f"| {r['file_x_realtime']:.0f}x real time | {r['listen_peak_rss_mib']:.0f} MiB |")
    return rows


def stage_table(stages: dict[str, dict]) -> list[str]:
    rows = ["| stage | what it made | minutes | on |", "|---|---|---|---|"]
    for name, s in stages.items():
        # a resumed pretraining run's marker times only its last leg; its loss log carries the whole
        seconds = s["result"]["train_seconds"] if name == "pretrain" else s["seconds"]
        rows.append(f"| {name} | {describe(name, s)} | {seconds / 60:.1f} | {s['device']}, torch {s['torch']} |")
    return rows


def describe(name: str, stage: dict) -> str:
    settings, result = stage["settings"], stage["result"]
    if name == "pretrain":
        return (f"MAE-AST, {settings['size']} encoder, {settings['steps']} steps of {settings['batch_size']} random {settings['frames'] * 10} ms crops, "
                f"{int(100 * settings['mask_ratio'])}% {settings['masking']} masking; loss {result['first_loss']:.2f} -> {result['last_loss']:.2f}")
    if name in ("teacher", "student", "scratch", "nokd"):
        c = settings.get("student", settings)  # a distillation stage's settings hold its student's
        start = f"the encoder of `{c['init']}`" if c["init"] else f"a {c['size']} model from scratch"
        kd = f", distilled (T={settings['temperature']}, alpha={settings['alpha']})" if "teacher" in settings else ""
        best = "; ".join(f"{head} {pct(r.get('accuracy'))}" for head, r in result.items())
        return f"{start}{kd}, {c['epochs']} epochs, lr {c['lr']:g}; best validation accuracy {best}"
    if name == "calibrate":
        return f"thresholds at <= {settings['target_per_hour']:g} false alarm per hour on {result['negative_hours']:.2f} h of validation audio without keywords"
    if name == "export":
        fp32 = max(a["max_abs"] for a in result["fp32"].values())
        int8 = "; ".join(f"{h} {100 * a['top1']:.1f}%" for h, a in result["int8"].items())
        return f"ONNX fp32 (max abs diff to torch {fp32:.1e}), dynamic int8 (top-1 agreement with fp32: {int8}), int8 Q/DQ for TensorRT"
    return ""


def spotting_limits(spotting: dict, target: float) -> list[str]:
    # said in words because the tables alone read like a working spotter
    if spotting["false_alarms_per_hour"] <= target:
        return []
    return [f"- **The keyword spotter misses its target.** On held-out audio it makes {spotting['false_alarms_per_hour']:.1f} false alarms",
            f"  per hour (target {target:g}), and the thresholds that hold the validation negatives to {target:g} per hour",
            f"  spot only {pct(spotting['recall'])} of the keyword clips: spoken non-keywords (digits, wake words) score",
            "  as keywords. Do not rely on keyword spots from this model yet."]


def steep_thresholds(thresholds: dict, steep: float = 0.96) -> list[str]:
    # a threshold near 1 turns a keyword's spot into a matter of where the hop grid falls
    high = [f"{label} ({t:.2f})" for label, t in thresholds.items() if label in COMMAND_WORDS and t >= steep]
    if not high:
        return []
    return [f"- Keyword thresholds at {steep:g} or more: {', '.join(high)}. A word that scores just",
            "  above one in a file may fall below it live, where the hops fall elsewhere on the word."]


def plot_results(report: dict, path: Path) -> None:
    """Accuracy of every model on every task, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = {"keywords": "keywords (12-way)", "esc50": "ESC-50 (50-way)", "dcase": "DCASE 2016"}
    names = list(report["models"])
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [100 * report["models"][name][task]["accuracy"] for task in tasks]
        bars = ax.bar([t + i * width for t in range(len(tasks))], values, width, label=name)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks([t + width * (len(names) - 1) / 2 for t in range(len(tasks))], list(tasks.values()))
    ax.set_ylabel("validation accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render(recipe, report: dict, stages: dict[str, dict]) -> str:
    student = report["models"]["student"]
    thresholds = stages["calibrate"]["result"]["thresholds"].get(KEYWORDS, {})  # the keyword head's
    e = recipe.evaluation
    lines = [
        f"# Model card: {recipe.model_id}",
        "",
        "The model edgetag uses when no `--model` is given: one small audio transformer that reads 1 s of",
        f"128-bin log-mel fbank every 0.5 s and feeds two heads from one encoder pass: **tags** ({student['classes']['tags']} sound",
        "event classes from ESC-50 and DCASE 2016 task 2, named by their AudioSet display names where",
        "the ontology has them) and **keywords** (the 12-class Speech Commands task: yes, no, up, down,",
        "left, right, on, off, stop, go, `_unknown_`, `_silence_`).",
        "",
        f"It is a `{recipe.student.student.size}` encoder ({student['parameters'] / 1e6:.2f}M parameters, 16x16 patch tokens) distilled from a",
        f"`{recipe.pretrain.size}` teacher that was pretrained the MAE-AST way on every clip of the training data (labels unused)",
        "and then fine-tuned on both tasks. Everything here was produced and measured by",
        "`python -m pipeline.recipe default` (`pipeline/recipe.py`); the figures below are copied from its report.",
        "",
        "## Files (edgetag/assets)",
        "",
        "| file | what |",
        "|---|---|",
        "| `model.safetensors` | the checkpoint: weights, fbank recipe, labels, calibrated thresholds, provenance |",
        "| `export/model.onnx` | fp32 ONNX (opset 20, 1 s window, dynamic batch) |",
        "| `export/model.int8.onnx` | dynamic int8 for CPUs (`--backend onnx`) |",
        "| `export/model.int8.qdq.onnx` | int8 with Q/DQ nodes: the input for a TensorRT INT8 engine |",
        "| `export/manifest.json`, `export/reference.npz` | the config and reference outputs engines are checked against |",
        "",
        "## How it was made",
        "",
        *stage_table(stages),
        "",
        "Minutes are wall-clock on the machine that ran each stage (stages may run on different machines: the",
        "recipe skips a stage whose folder already holds its marker with the same settings).",
        "",
        "## Data and licenses",
        "",
        "| data | folder | used for | license |",
        "|---|---|---|---|",
        *(f"| {name} | `{folder}` | {use} | {lic} |" for name, folder, use, lic in DATA),
        "",
        "Pretraining saw the audio of every folder, validation clips included, without labels. The ESC-50 clips",
        "outside the CC BY ESC-10 subset are CC BY-NC: check that a model trained on them suits your use.",
        "",
        "## Validation results",
        "",
        "Clip accuracy with clip scores averaged over the 1 s windows, as the streaming engine sees them;",
        f"keywords on the {student['keywords']['n']} clips of the speaker-disjoint Speech Commands validation split, ESC-50 on",
        f"the {student['esc50']['n']} fold-4 clips (source-disjoint from training), DCASE on {student['dcase']['n']} held-out clips.",
        "",
        *results_table(report),
        "",
        "- teacher vs `baseline: scratch` (same settings, no pretraining) is what MAE-AST pretraining gave;",
        "- student vs `baseline: nokd` (same settings, hard labels only) is what distillation gave;",
        "- each is one run; best epochs were chosen on these validation sets (there is no separate test",
        "  split in the data), so every figure is somewhat optimistic.",
        "",
        "## Keyword spotting at the calibrated thresholds",
        "",
        "Spots as `edgetag file` and `edgetag listen` report them (the streaming engine, 1 s refractory period).",
        "False alarms: every spot on held-out audio without keywords (FSDD digits and wake words the",
        "thresholds never saw). Keyword clips: the validation clips of the ten keywords.",
        "",
        *spotting_table(report),
        "",
        *keyword_table(report, thresholds),
        "",
        "## Latency",
        "",
        f"`edgetag bench stream` on {cpu_name()}: one hop of audio pushed at a time, 1 thread.",
        "",
        *latency_table(report),
        "",
        "## Known limits",
        "",
        "- Small data: about 2,500 Speech Commands clips (and 800 clips of other words and sounds as",
        "  non-keywords; 1,600 for the student) and 1,700 tag clips for training, and minutes of pretraining.",
        "  Accuracy is far below the published MAE-AST figures (6-layer encoders pretrained on AudioSet",
        "  and LibriSpeech: 95.0-97.8% on Speech Commands, 88.0-88.6% on ESC-50).",
        "- The keyword threshold targets at most one false alarm per hour, measured on well under an hour of",
        "  audio: the held-out figure above carries a wide margin of error, and audio unlike the negatives",
        "  (music, TV, conversations) is untested.",
        *spotting_limits(student["spotting"], stages["calibrate"]["settings"]["target_per_hour"]),
        *steep_thresholds(thresholds),
        "- Keywords are English, from the Speech Commands recording conditions (laptop and phone",
        "  microphones, one word per clip); words spoken in running speech are harder.",
        f"- Tags are one label per clip in training; overlapping sounds and sounds outside the {student['classes']['tags']} classes",
        "  get no reliable answer. A 1 s window hears only part of long events.",
        "- ESC-50 folds 1-3 and 5 come from an 8-bit copy (noise floor about -53 dBFS).",
        "",
        f"Held-out negatives: {', '.join(f'`{s}`' for s in e['held_out_negatives'])}.",
        "",
    ]
    return "\n".join(lines)
