"""MODEL_CARD.md for a recipe's model, written from what its stages measured (pipeline.recipe).

Every figure comes from the evaluate stage's report or a stage marker; the words around them are
chosen by what was measured (a missed target says so, and by how much).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from edgetag.bench import cpu_name
from edgetag.spec import KEYWORDS
from train.running import best_within
from train.views import ViewsConfig

TASKS = {  # report key -> how the card names the task
    "keywords": "keywords: accuracy (12-way)",
    "esc50": "ESC-50: accuracy",
    "dcase": "DCASE 2016: accuracy",
    "urbansound8k": "UrbanSound8K fold 3: accuracy",
}

DATA = [
    ("Speech Commands v0.02 (12-class task)", "speech_commands/", "keywords: training (80% of speakers) and validation; the validation speakers' keywords make the running-audio scenes; tags: 5% of the training speakers' clips as Speech", "CC BY 4.0, Warden 2018"),
    ("Speech Commands v0.01 bed/cat/happy", "speech_commands_v1_extra/", "keywords: `_unknown_` (30% of speakers); other speech in the scenes (validation speakers)", "CC BY 4.0, Warden 2018"),
    ("Arabic Speech Commands", "arabic_speech_commands/", "keywords: `_unknown_` (15% of speakers); other speech in the scenes (other speakers)", "CC BY 4.0, Ghandoura et al. 2021"),
    ("ESC-50, folds 1-3 and 5", "esc50_other_folds/", "tags: training; keywords: half its sources as `_silence_` (no word), half mixed into keyword views", "CC BY-NC 3.0 (ESC-10 subset CC BY 3.0), Piczak 2015"),
    ("ESC-50, fold 4", "esc50/", "tags: validation and thresholds; background of the running-audio scenes", "as above"),
    ("UrbanSound8K folds 1-2 / 3", "urbansound8k/", "tags: training (a quarter of folds 1-2's recordings) / validation; keywords: as ESC-50; scene background (fold 3)", "CC BY-NC 3.0, Salamon et al. 2014"),
    ("DCASE 2016 task 2", "dcase2016_task2/", "tags: training and validation (20% of clips)", "DCASE 2016 challenge data, Lafay et al."),
    ("Speech Commands background noise", "background_noise/", "mixed into views", "CC BY 4.0"),
    ("Free Spoken Digit Dataset", "fsdd/", "keywords: `_unknown_` (one speaker); other speech in the scenes and held-out negatives (the rest)", "CC BY-SA 4.0, Jackson et al."),
    ("Picovoice wake words", "wake_words/", "keywords: `_unknown_` (30% of clips); other speech in the scenes and held-out negatives", "Apache-2.0, Picovoice"),
    ("EfficientAT mn04 (AudioSet, mAP 0.432)", "../teachers/efficientat_mn04_as/", "teacher of the tag head: alone on the AudioSet classes no dataset here names, beside the datasets' labels (by --tag-alpha) on those they name; peer", "MIT, Schmid et al. 2023"),
    ("MLPerf Tiny keyword model (DS-CNN)", "../teachers/mlperf_tiny_kws/", "teacher of the keyword head; peer", "Apache-2.0, MLCommons"),
]


LATENCY_REFERENCE = "latency reference"  # the latency row of the model a latency target is relative to (evaluation["latency"]["reference"])
TOKEN_WORDS = {"patch": "16x16 patch tokens", "frame": "frame tokens", "conv": "a convolutional stem"}
ENCODER_WORDS = {"transformer": "audio transformer", "mamba": "bidirectional Mamba encoder", "mobilenet": "convolutional network (EfficientAT's MobileNetV3)"}


def pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def points(x: float) -> str:
    """A shortfall in percentage points, with the digits that keep it from reading as 0.0."""
    return f"{100 * x:.1f}" if 100 * x >= 0.05 else f"{100 * x:.2g}"


def results_table(report: dict) -> list[str]:
    tasks = [t for t in TASKS if t in report["tasks"]]
    rows = ["| model | parameters | size | " + " | ".join(TASKS[t] for t in tasks) + " |", "|---|---|---|" + "---|" * len(tasks)]
    for name, m in report["models"].items():
        params = f"{m['parameters'] / 1e6:.2f}M" if "parameters" in m else ("(third party)" if m.get("peer") else "(as above)")
        size = f"{m['size_bytes'] / 2**20:.1f} MiB" if "size_bytes" in m else "–"
        cells = [f"{pct(m[t]['accuracy'])} ({m[t]['classes']}-way)" if t in m else "–" for t in tasks]
        rows.append(f"| {name} | {params} | {size} | " + " | ".join(cells) + " |")
    return rows


def spotting_table(report: dict) -> list[str]:
    rows = ["| model | false alarms / hour (held out) | false alarms | hours | keyword clips spotted | spotted as another keyword |",
            "|---|---|---|---|---|---|"]
    for name, m in report["models"].items():
        s = m.get("spotting")
        if s:
            rows.append(f"| {name} | {s['false_alarms_per_hour']:.2f} | {s['false_alarms']} | {s['negative_hours']:.2f} | {pct(s['recall'])} | {pct(s['wrong_spots'])} |")
    return rows


def running_table(running: dict, per_hour: float) -> list[str]:
    rows = ["| model | at its own thresholds: spotted | false alarms / hour | wrong keyword | best on the curve at <= "
            f"{per_hour:g} / hour: spotted (threshold) |", "|---|---|---|---|---|"]
    for name, m in running["models"].items():
        at, best = m.get("at_thresholds"), best_within(m["curve"], per_hour)
        own = f"{pct(at['recall'])} | {at['false_alarms_per_hour']:.1f} | {at['wrong_spots']}" if at else "– | – | –"
        if best is None:  # the grid's top threshold still makes more: say where it ends
            top = max(m["curve"], key=lambda p: p["threshold"])
            shown = f"none: at {top['threshold']:g}, {pct(top['recall'])} with {top['false_alarms_per_hour']:.1f} / hour"
        else:
            shown = f"{pct(best['recall'])} ({best['threshold']:g})"
        rows.append(f"| {name} | {own} | {shown} |")
    return rows


def chosen_on(student: dict) -> str:
    """What calibration chose for the shipped model's keywords, as the subject of "... chosen"."""
    chosen = ["threshold", *(["speech gate"] if student.get("speech_gate") else []), *(["keyword smoothing"] if student.get("keyword_smoothing") else [])]
    return f"{', '.join(chosen[:-1])} and {chosen[-1]} were" if len(chosen) > 1 else "threshold was"


def choice_words(gate: float, smoothing: float) -> str:
    """A (speech gate, keyword smoothing) pair in words."""
    gated = f"gated at {gate:g}" if gate else "never gated"
    return f"{gated}, {f'averaged over {smoothing:g} s' if smoothing else 'each hop alone'}"


def arranged(running: dict) -> str:
    n = running.get("arrangements", 1)
    return f"; {n} arrangements of the same clips end to end, each in another order, at other SNRs over other sounds" if n > 1 else ""


def running_limit(minutes: float, calibration: dict | None) -> list[str]:
    """How coarse the running-audio false-alarm rates are: one alarm per scene, per hour."""
    scenes = [*([(calibration["minutes"], "calibration")] if calibration else []), (minutes, "evaluation")]
    rates = " and ".join(f"{60 / m:.1f} per hour over the {name} scene's {m:.0f} minutes" for m, name in scenes)
    return [f"- The running-audio figures come from short scenes: one false alarm is {rates};",
            "  their keywords are a handful of validation speakers'."]


def pairs_of(scene: dict) -> list[dict]:
    """The calibration scene's (speech gate, keyword smoothing) points; a run from before keyword
    smoothing recorded its gates alone."""
    return scene.get("pairs") or [{"speech_gate": float(g), "keyword_smoothing": 0.0, **p} for g, p in scene.get("gates", {}).items()]


def smoothing_tried(pairs: list[dict]) -> bool:
    """Whether the calibration chose among keyword smoothings (not only among gates)."""
    return len({p["keyword_smoothing"] for p in pairs}) > 1


def pair_table(pairs: list[dict]) -> list[str]:
    """Calibration-scene points by speech gate (rows) and keyword smoothing (columns)."""
    smoothings = sorted({p["keyword_smoothing"] for p in pairs})
    rows = ["| speech gate | " + " | ".join(f"averaged over {s:g} s" if s else "each hop alone" for s in smoothings) + " |",
            "|---|" + "---|" * len(smoothings)]
    for gate in sorted({p["speech_gate"] for p in pairs}):
        cells = {p["keyword_smoothing"]: p for p in pairs if p["speech_gate"] == gate}
        rows.append(f"| {f'{gate:g}' if gate else 'none'} | " + " | ".join(
            f"{pct(c['recall'])} ({c['threshold']:g}, {c['false_alarms_per_hour']:.1f})" if (c := cells.get(s)) else "–" for s in smoothings) + " |")
    return rows


def gate_lines(running: dict, scene: dict, per_hour: float) -> list[str]:
    """The speech gate and keyword smoothing: how each pair did on the calibration scene, and
    the shipped model at its pair against its curves at others on this scene."""
    student, lines = running["models"]["student"], []
    pairs = pairs_of(scene)
    if len(pairs) > 1:
        what = "speech gate and keyword smoothing were" if smoothing_tried(pairs) else "speech gate was"
        lines += [f"The {what} chosen with the threshold on the calibration scene ({scene['minutes']:.0f} min): "
                  "each choice at its lowest threshold within the target (or the grid's top), the keywords it spots there (threshold, false alarms "
                  f"per hour). Chosen: {choice_words(scene['speech_gate'], scene.get('keyword_smoothing', 0.0))}.", "", *pair_table(pairs), ""]
    mine = best_within(student["curve"], per_hour)
    shipped = choice_words(student.get("speech_gate", 0), student.get("keyword_smoothing", 0))
    for name, m in running["models"].items():
        if "gate" not in m:
            continue
        other = best_within(m["curve"], per_hour)
        words = choice_words(m["gate"], m.get("smoothing", student.get("keyword_smoothing", 0)))
        theirs = f"{pct(other['recall'])} ({other['threshold']:g})" if other else "none within it"
        ours = f"{pct(mine['recall'])}" if mine else "none"
        lines.append(f"- {words.capitalize()}, the best of the curve within {per_hour:g} false alarms per hour here is {theirs}, against {ours} as "
                     f"shipped ({shipped}).")
    return lines


def latency_table(report: dict) -> list[str]:
    rows = ["| model (backend) | fbank increment | encoder | total (median / p95) | share of the hop's audio | file, 1 / 2 threads (x real time) | `listen` peak RSS |",
            "|---|---|---|---|---|---|---|"]
    for name, r in report["latency"].items():
        rows.append(f"| {name} ({r['backend']}) | {r['fbank_median_s'] * 1e3:.2f} ms | {r['encoder_median_s'] * 1e3:.2f} ms "
                    f"| {r['total_median_s'] * 1e3:.2f} / {r['total_p95_s'] * 1e3:.2f} ms | {100 * r['hop_share']:.2f}% "
                    f"| {r['file_1_x_realtime']:.0f}x / {r['file_2_x_realtime']:.0f}x | {r['listen_peak_rss_mib']:.0f} MiB |")
    return rows


def latency_section(report: dict) -> list[str]:
    return ["## Latency", "", f"`edgetag bench stream` on {cpu_name()}: one hop of audio pushed at a time, 1 thread.", "", *latency_table(report), ""]


def stage_table(stages: dict[str, dict]) -> list[str]:
    rows = ["| stage | what it made | minutes | on |", "|---|---|---|---|"]
    for name, s in stages.items():
        # a resumed pretraining run's marker times only its last leg; its loss log carries the whole
        seconds = s["result"]["train_seconds"] if name == "pretrain" else s["seconds"]
        rows.append(f"| {name} | {describe(name, s)} | {seconds / 60:.1f} | {s['device']}, torch {s['torch']} |")
    return rows


def calibration_words(settings: dict, result: dict) -> str:
    """What the calibrate stage chose, and on what."""
    scene = result.get("scene")
    if scene:
        where = f"a {scene['minutes']:.0f} min running-audio scene ({scene['keywords']} keywords, {scene['other_words']} other words)"
        pairs = pairs_of(scene)
        if len(pairs) > 1:
            chosen, target = scene["chosen"], settings["target_per_hour"]
            pair = (f"the choice spotting the most keywords within {target:g} false alarms per hour" if chosen["false_alarms_per_hour"] <= target else
                    f"no choice within {target:g} false alarms per hour, so the one closest to it ({chosen['false_alarms_per_hour']:.1f} per hour at the grid's top)")
            gate = (f"a speech gate ({scene['speech_gate']:g}: keywords only where the Speech tag reaches it)" if scene["speech_gate"] else
                    "no speech gate (no gate tried spotted more)")
            smoothing = (f" and keyword probabilities averaged over {scene['keyword_smoothing']:g} s of hops" if scene.get("keyword_smoothing") else
                         " and each hop's keyword probabilities alone (no smoothing tried spotted more)" if smoothing_tried(pairs) else "")
            return f"one keyword threshold ({chosen['threshold']:g}), {gate}{smoothing}, {pair} on {where}; tag thresholds by F1"
        return (f"one keyword threshold ({scene['chosen']['threshold']:g}), the lowest within {settings['target_per_hour']:g} false alarms per hour on "
                f"{where}; tag thresholds by F1")
    return f"thresholds at <= {settings['target_per_hour']:g} false alarm per hour on {result['negative_hours']:.2f} h of validation audio without keywords"


def describe(name: str, stage: dict) -> str:
    settings, result = stage["settings"], stage["result"]
    if name == "pretrain":
        return (f"MAE-AST, {settings['size']} encoder, {settings['steps']} steps of {settings['batch_size']} random {settings['frames'] * 10} ms crops, "
                f"{int(100 * settings['mask_ratio'])}% {settings['masking']} masking; loss {result['first_loss']:.2f} -> {result['last_loss']:.2f}")
    if name == "calibrate":
        at = f"; all at a hop of {settings['hop']:g} s, the one it listens at (not its training one)" if settings.get("hop") else ""
        return calibration_words(settings, result) + at
    if name == "export":
        fp32 = max(a["max_abs"] for a in result["fp32"].values())
        int8 = "; ".join(f"{h} {100 * a['top1']:.1f}%" for h, a in result["int8"].items())
        calibrated = ", fp32 and dynamic int8 each with thresholds calibrated through ONNX Runtime" if "model.int8.onnx" in result else ""
        return f"ONNX fp32 (max abs diff to torch {fp32:.1e}), dynamic int8 (top-1 agreement with fp32: {int8}), int8 Q/DQ for TensorRT{calibrated}"
    if name == "mine":
        return (f"hard negatives (`train.mine`): {result['clips']} windows where `{Path(settings['model']).parent.name}` spotted a keyword at >= {settings['level']:g} "
                f"in {result['hours']:.1f} h of training speakers' other speech ({result['words']} words) over training sounds, no keyword said "
                f"({result['over_words']} over words, {result['over_background']} over sound alone)")
    if name == "refit":
        scenes = result["scenes"]
        layers = settings.get("layers", 0)  # a stage recorded before --layers existed refitted the head alone
        after = (f"; then its top {layers} encoder layers with every head, {settings['layer_epochs']} epochs at lr {settings['layer_lr']:g}, "
                 f"the tag heads held to their answers before (weight {settings['hold']:g})") if layers else ""
        return (f"the student's keyword head fitted again (`train.refit`), its encoder {'below its top layers ' if layers else ''}frozen: {sum(result['hops'].values()):,} labelled hops "
                f"every {settings['hop']:g} s of {len(scenes)} running-audio scenes of training speakers and sources ({sum(x['hours'] for x in scenes):.1f} h, "
                f"{sum(x['keywords'] for x in scenes):,} keywords and {sum(x['other_words'] for x in scenes):,} other words at {settings['snr_db'][0]:g}-{settings['snr_db'][1]:g} dB), "
                f"beside {result['clips']:,} of its training clips held to its answers before (alpha={settings['alpha']:g}, T={settings['temperature']:g}), "
                f"{settings['epochs']} epochs, lr {settings['lr']:g}{after}; loss {result['losses'][0]:.3f} -> {result['losses'][-1]:.3f}")
    if name == "init":
        return f"`{Path(settings['src']).name}` imported (`train.convert --from {settings['from']}`): {result['parameters']:,} parameters, its AudioSet head and ontology"
    c = settings.get("student", settings)  # a distillation stage's settings hold its student's
    start = f"from `{c['init']}`" if c["init"] else f"a {c['size']} model with {TOKEN_WORDS[c.get('tokens', 'patch')]} from scratch"
    teachers = [t for t in (settings.get("teacher"), settings.get("tag_teacher"), settings.get("keyword_teacher")) if t]
    v = ViewsConfig(**settings.get("views", {}))  # a stage recorded before a views setting existed ran at its default
    speed = f", played at {1 - v.speed:g}-{1 + v.speed:g}x speed" if v.speed else ""
    words = f" (keyword views: the word {'anywhere in the window' if v.word_placement == 'anywhere' else 'centred'}{speed}, over background in {100 * v.word_background_prob:.0f}%)"
    weights = "".join(f", {name}={settings[key]:g}" for name, key in (("tag-alpha", "tag_alpha"), ("cross", "cross")) if settings.get(key))
    keyword_teachers = ((", keyword teachers hearing each keyword view without its background" if v.teach_clean else "")
                        + (", keyword teachers silent about keywords on the views that hold none" if settings.get("sure_negatives") else "")) if teachers else ""
    how = (f", {v.views} views per window{words}" if v.views else "") + (f", taught by {', '.join(f'`{Path(t).name}`' for t in teachers)} (T={settings['temperature']}, alpha={settings['alpha']}{weights}){keyword_teachers}"
                                                                          if teachers else ", hard labels only")
    best = "; ".join(f"{head} {pct(r.get('accuracy'))}" for head, r in result.items())
    share = f", {100 * c['keyword_share']:.0f}% of the keyword head's draws holding a keyword" if c.get("keyword_share") else ""
    return f"{start}{how}{share}, {c['epochs']} epochs, lr {c['lr']:g}; best validation accuracy {best}"


def plot_results(report: dict, path: Path) -> None:
    """Accuracy of every model and peer on every task, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in TASKS if t in report["tasks"]]
    names = list(report["models"])
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        m = report["models"][name]
        xs = [t + i * width for t, task in enumerate(tasks) if task in m]
        bars = ax.bar(xs, [100 * m[task]["accuracy"] for task in tasks if task in m], width, label=name)
        ax.bar_label(bars, fmt="%.0f", fontsize=6)
    ax.set_xticks([t + width * (len(names) - 1) / 2 for t in range(len(tasks))], [TASKS[t].split(":")[0] for t in tasks])
    ax.set_ylabel("validation accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def targets_table(recipe, report: dict, bundle_bytes: int | None) -> list[str]:
    """The targets the maintainers set for this model, each met or missed by how much."""
    t = getattr(recipe, "targets", None) or {}
    student, rows = report["models"]["student"], ["| target | measured | |", "|---|---|---|"]

    for task, goal in t.get("accuracy", {}).items():
        if task in student:
            got = student[task]["accuracy"]
            rows.append(f"| {TASKS[task]} >= {100 * goal:.0f}% | {pct(got)} | {'met' if got >= goal else f'missed by {points(goal - got)} points'} |")
    if "running" in t and "running" in report:
        per_hour, goal = t["running"]
        m = report["running"]["models"]["student"]["at_thresholds"]
        rows.append(f"| running audio: >= {100 * goal:.0f}% of keywords at <= {per_hour:g} false alarms / hour | {pct(m['recall'])} at "
                    f"{m['false_alarms_per_hour']:.1f} / hour | {'met' if m['recall'] >= goal and m['false_alarms_per_hour'] <= per_hour else 'missed'} |")
    lat = report.get("latency", {})
    reference = next((name for name in (LATENCY_REFERENCE, "previous") if name in lat), None)
    if "latency_ratio" in t and "student" in lat and reference:
        ratio = lat["student"]["total_median_s"] / lat[reference]["total_median_s"]
        whose = f"{lat[reference]['model']}'s" if reference == LATENCY_REFERENCE else "the previous model's"
        rows.append(f"| per-hop latency <= {t['latency_ratio']:g}x {whose} (torch, same run) | {ratio:.2f}x | {'met' if ratio <= t['latency_ratio'] else 'missed'} |")
    if bundle_bytes is not None and "bundle_mib" in t:
        rows.append(f"| bundle <= {t['bundle_mib']:g} MiB | {bundle_bytes / 2**20:.1f} MiB | {'met' if bundle_bytes <= t['bundle_mib'] * 2**20 else 'missed'} |")
    return rows if len(rows) > 2 else []


def render(recipe, report: dict, stages: dict[str, dict], spec, bundle_bytes: int | None = None, teacher_only: list[str] | None = None) -> str:
    """The card of `recipe`'s model, whose ModelSpec is `spec`, from its report and stage markers."""
    student = report["models"]["student"]
    e = recipe.evaluation
    tags, keywords = student["classes"].get("tags"), student["classes"].get(KEYWORDS)
    s = recipe.student
    init = getattr(recipe, "init", None)
    if init:
        origin = (f"It is EfficientAT's `{Path(init['src']).name}` ({student['parameters'] / 1e6:.2f}M parameters: a MobileNetV3 that its authors trained on "
                  f"AudioSet, imported with `train.convert --from {init['from']}`), fine-tuned on augmented views of the data that its teachers labelled: "
                  + ", ".join(f"`{Path(t).name}`" for t in (s.teacher, s.tag_teacher, s.keyword_teacher) if t) + " and the datasets' own labels.")
    elif recipe.pretrain is not None:
        origin = (f"It is a `{s.student.size}` encoder ({student['parameters'] / 1e6:.2f}M parameters) distilled from a `{recipe.pretrain.size}` teacher "
                  "that was pretrained the MAE-AST way on every clip of the training data (labels unused) and then fine-tuned on both tasks.")
    else:
        start = (f"It continues `{s.student.init}` ({student['parameters'] / 1e6:.2f}M parameters; that model came from a MAE-AST-pretrained "
                 "teacher, `python -m pipeline.recipe default2`), trained" if s.student.init else
                 f"It is a `{s.student.size}` encoder with {TOKEN_WORDS[s.student.tokens]} ({student['parameters'] / 1e6:.2f}M parameters), trained from scratch")
        origin = (f"{start} on augmented views of the data that its teachers labelled: "
                  + ", ".join(f"`{Path(t).name}`" for t in (s.teacher, s.tag_teacher, s.keyword_teacher) if t) + " and the datasets' own labels.")
    previous = "previous" in report["models"]
    lines = [
        f"# Model card: {recipe.model_id}",
        "",
        f"The model edgetag uses when no `--model` is given: one small {ENCODER_WORDS[spec.encoder.encoder]} that reads {spec.stream.window:g} s of",
        f"{spec.fbank.n_mels}-band log-mel fbank every {spec.stream.hop:g} s and feeds two heads from one encoder pass: **tags** ({tags} classes: the AudioSet",
        "ontology's classes by their display names, and dataset classes AudioSet has no node for) and **keywords**",
        f"({keywords} classes: the Speech Commands task, yes no up down left right on off stop go, `_unknown_`, `_silence_`).",
        "",
        origin,
        "Everything here was produced and measured by `python -m pipeline.recipe default` (`pipeline/recipe.py`);",
        "the figures below are copied from its report.",
        "",
        "## Files (edgetag/assets)",
        "",
        "| file | what |",
        "|---|---|",
        "| `model.safetensors` | the checkpoint: weights, fbank recipe, labels and their ontology, calibrated thresholds, provenance |",
        "| `export/model.onnx` | fp32 ONNX (opset 20, 1 s window, dynamic batch) |",
        "| `export/model.int8.onnx` | dynamic int8 for CPUs (`--backend onnx`) |",
        "| `export/model.int8.qdq.onnx` | int8 with Q/DQ nodes: the input for a TensorRT INT8 engine |",
        "| `export/manifest.json`, `export/reference.npz` | the config and reference outputs engines are checked against |",
        "",
        "## How it was made",
        "",
        *stage_table(stages),
        "",
        "Minutes are wall-clock on the machine that ran each stage (the recipe skips a stage whose folder",
        "already holds its marker with the same settings).",
        "",
        "## Data, teachers and licenses",
        "",
        "| data | folder (../shared/data) | used for | license |",
        "|---|---|---|---|",
        *(f"| {name} | `{folder}` | {use}{'; the starting weights of the student' if init and folder == '../teachers/efficientat_mn04_as/' else ''} | {lic} |"
          for name, folder, use, lic in DATA),
        "",
        "The ESC-50 and UrbanSound8K clips outside ESC-10 are CC BY-NC: check that a model trained on them suits your use.",
        "",
        "## Validation results",
        "",
        f"Clip accuracy with clip scores averaged over the {spec.stream.window:g} s windows every {spec.stream.hop:g} s (each model at its own hop), as the streaming engine sees",
        "them, among the classes of each task (the n-way in each cell; a model that lacks some of a task's classes",
        "competes among those it has). Peers run on the same windows; mn04 hears the 16 kHz audio upsampled to its 32 kHz.",
        "",
        *results_table(report),
        "",
        "![validation accuracy](models.png)",
        "",
        *(["- `student` vs `baseline: nokd` (the same views and schedule, hard labels only) is what the external teachers gave;"]
          if "baseline: nokd" in report["models"] else []),
        *(["- `previous` is the model this one replaces, measured in the same run;"] if previous else []),
        "- each is one run; best epochs were chosen on these validation sets, so every figure is somewhat optimistic.",
        "",
    ]
    if "running" in report:
        r = report["running"]
        per_hour = (getattr(recipe, "targets", None) or {}).get("running", (4.0, 0))[0]
        lines += [
            "## Keywords in running audio",
            "",
            f"A {r['minutes']:.0f} min scene (`train.running`{arranged(r)}): {r['keywords']} keywords of validation speakers and {r['other_words']} other",
            "spoken words (digits, wake words, bed/cat/happy, Arabic commands) dropped every 1-3 s into ESC-50 fold 4 and",
            "UrbanSound8K fold 3 sounds at 0-15 dB SNR, run through the streaming engine (1 s refractory period). The",
            f"{chosen_on(r['models'].get('student', {}))} chosen on another scene of "
            "other speakers and other sources. A spot that overlaps a keyword",
            "of its label finds it; one of another label there is a wrong keyword; any other spot is a false alarm.",
            "",
            *running_table(r, per_hour),
            "",
            "![recall against false alarms](running.png)",
            "",
        ]
        scene = stages.get("calibrate", {}).get("result", {}).get("scene")
        lines += [*(gate_lines(r, scene, per_hour) if scene else []), ""]
    lines += [
        "## Keyword clips at the calibrated thresholds",
        "",
        "Isolated clips as `edgetag file` reports them: false alarms on held-out audio without keywords",
        f"({', '.join(f'`{x}`' for x in e['held_out_negatives'])}); keyword clips: the validation clips of the ten keywords.",
        "",
        *spotting_table(report),
        "",
        *latency_section(report),
    ]
    targets = targets_table(recipe, report, bundle_bytes)
    if targets:
        lines += ["## Targets", "", *targets, ""]
        tried = getattr(recipe, "tried", None)
        if tried:
            lines += ["Tried before these settings, each measured by an earlier run on these validation sets (not measured again here):", "",
                      *(f"- {t};" if i < len(tried) - 1 else f"- {t}." for i, t in enumerate(tried)), ""]
    if teacher_only:
        lines += ["## Classes only the teacher taught", "",
                  f"{len(teacher_only)} of the {tags} tag classes have no clip labelled with them (or with a more specific class) in the",
                  "training data here: the model learned them from mn04's outputs alone, on these datasets' audio. Treat their",
                  "scores as the teacher's word.", "", "<details><summary>the classes</summary>", "", ", ".join(teacher_only), "", "</details>", ""]
    lines += [
        "## Known limits",
        "",
        "- Small data: a few thousand labelled clips per head; AudioSet-scale knowledge comes only through the teachers"
        + (" and mn04's weights." if init else "."),
        "- Keywords are English, from Speech Commands recording conditions (one word per clip); the scenes mix such",
        "  clips into other sounds, which is not the same as words inside running sentences.",
        *(running_limit(report["running"]["minutes"], stages.get("calibrate", {}).get("result", {}).get("scene")) if "running" in report else []),
        "- A 1 s window hears only part of long events; tags fold ancestors into the most specific tag firing with",
        "  them (`--all-tags` shows all).",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Parts of an installed card measured again (pipeline.recipe --refresh-card)

CARD_TASKS = {"keywords": "keywords", "ESC-50": "esc50", "DCASE 2016": "dcase", "UrbanSound8K fold 3": "urbansound8k"}


def replace_section(text: str, title: str, lines: list[str]) -> str:
    """`text` with its "## title" section (up to the next "## ") replaced by `lines`."""
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[:start] + "\n".join(lines) + (text[end:] if end >= 0 else "\n")


def cells(row: str) -> list[str]:
    """The cells of a markdown table row."""
    return [c.strip() for c in row.strip().strip("|").split("|")]


def replace_row(text: str, name: str, header_start: str, cell: Callable[[str], str | None]) -> str:
    """`text` with the cells of row `name` in the table whose header begins `header_start`
    replaced by `cell(column header)`, where that is not None."""
    lines = text.split("\n")
    top = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    row = next(i for i in range(top + 2, len(lines)) if lines[i].startswith(f"| {name} |"))
    new = [cell(h) for h in cells(lines[top])]
    lines[row] = "| " + " | ".join(c if n is None else n for n, c in zip(new, cells(lines[row]))) + " |"
    return "\n".join(lines)


def validation_cell(results: dict[str, dict], header: str) -> str | None:
    """A validation table cell, "<task>: accuracy ..." or "<task>: mAP", from evaluate results."""
    task, _, figure = header.partition(": ")
    r = results.get(CARD_TASKS.get(task))
    return None if r is None else f"{r['mAP']:.3f}" if figure.startswith("mAP") else pct(r["accuracy"])

