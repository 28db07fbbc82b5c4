"""The default models, reproduced end to end from the shared data folder.

    python -m pipeline.recipe default                                 # edgetag-default-16, the bundled model, beside default-15
    python -m pipeline.recipe default15 --out runs/d14 --previous runs/default-14  # edgetag-default-15, the model before it (the same student)
    python -m pipeline.recipe default14 --out runs/d14 --previous runs/default-6  # edgetag-default-14, the one before that
    python -m pipeline.recipe default --install                       # ... copied into edgetag/assets
    python -m pipeline.recipe default --stages init,student           # some stages
    python -m pipeline.recipe default7 --out runs/d7 --stages init,student  # a candidate after default-6, measured and not bundled
    python -m pipeline.recipe default8 --out runs/d8 --stages init,student,calibrate  # another (default9: one more)
    python -m pipeline.recipe default11 --out runs/d11 --stages init,mine,student,calibrate  # hard negatives mined by default-6 (default10: in the data's own mix)
    python -m pipeline.recipe default12 --out runs/d12 --stages init,mine,student,calibrate  # default10 with speed-perturbed keyword views (default13: 8 epochs)
    python -m pipeline.recipe default6 --out runs/d5 --previous runs/default-5  # edgetag-default-6, the model before it
    python -m pipeline.recipe default5 --out runs/d5                  # edgetag-default-5, the one before that
    python -m pipeline.recipe default4 --out runs/d4                  # edgetag-default-4
    python -m pipeline.recipe default3 --out runs/d3                  # edgetag-default-3
    python -m pipeline.recipe default2 --out runs/d2                  # edgetag-default-2, the first

Stages, each in its own folder under --out (default-16 to -4 and the candidates between them have no pretrain or teacher stage: the
student starts from EfficientAT's AudioSet weights and learns on augmented views that
third-party teachers label; default-3 had no init stage either, and learned from scratch):

0. init       a third-party model imported as the student's starting point (train.convert)
   mine       hard negatives: windows of keyword-free running audio where an earlier model
              spots a keyword, a keyword source for the student (train.mine)
1. pretrain   MAE-AST on every clip under --data, labels unused (train.pretrain)
2. teacher    the pretrained tiny encoder fine-tuned on both heads: tags (ESC-50 folds 1-3, 5 and
              DCASE 2016, named by AudioSet) and keywords (Speech Commands, 12 classes)
3. student    a small model distilled from the teacher and/or third-party teachers (train.distill)
4. scratch    baseline: the teacher's settings without pretraining
5. nokd       baseline: the student's settings without the teacher
   refit      the student's keyword head fitted again on hops of running audio built from
              training sources, its encoder frozen, or after it its top layers too (train.refit)
6. calibrate  per-keyword thresholds at <= 1 false alarm per hour on validation audio without
              keywords, or one keyword threshold from a running-audio scene; per-tag thresholds
              by F1 (train.calibrate); with the keyword threshold, a speech gate and a keyword
              smoothing chosen on that scene; at the hop the model will listen at, if not its own
7. export     ONNX fp32, int8 Q/DQ (TensorRT), dynamic int8 (CPUs) (deploy.export)
8. evaluate   every model on the validation sets, false alarms per hour on held-out audio,
              sizes and per-hop latency -> report.json
9. card       MODEL_CARD.md, written from report.json

A finished stage leaves `stage.json` (its settings, its duration, what it returned); a stage
whose folder holds one with the same settings is skipped, so an interrupted recipe continues
where it stopped and a changed setting reruns only what it touches. `--install` copies the
calibrated checkpoint, its export and the model card into edgetag/assets. Seeds are fixed; the
same machine and library versions give the same model.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from dataclasses import asdict, dataclass, field, is_dataclass, replace
from pathlib import Path

import numpy as np
import torch
import typer

from edgetag import checkpoint
from edgetag.spec import KEYWORDS, NOT_SPOTTED, TAGS, StreamConfig
from train.augment import AugmentConfig
from train.distill import DistillConfig
from train.finetune import FinetuneConfig
from train.pretrain import PretrainConfig
from train.refit import RefitConfig
from train.views import ViewsConfig

ASSETS = Path(checkpoint.__file__).parent / "assets"
BUNDLE_LIMIT = 20 * 2**20  # bytes in edgetag/assets for the model, its export and card


@dataclass
class Recipe:
    """Every setting of one bundled model. Paths are strings, as the stages record them."""

    model_id: str
    pretrain: PretrainConfig | None  # None: the student starts from a finished model (its --init)
    teacher: FinetuneConfig | None
    student: DistillConfig  # from the teacher stage's best.safetensors, and/or external teachers
    baselines: dict[str, FinetuneConfig | DistillConfig]
    calibrate: dict  # train.calibrate.calibrate's keywords, negatives, tags, target_per_hour; a running-audio scene; speech_gates and keyword_smoothings (s) to choose from; the hop (s) the model listens at, if not its training one
    export_calibration: list[str]  # audio for the int8 models' activation ranges
    evaluation: dict = field(default_factory=dict)  # tasks, held-out negatives, latency (see evaluate_stage)
    targets: dict = field(default_factory=dict)  # what the card checks: accuracy per task, running (per hour, recall), latency_ratio, bundle_mib
    tried: list[str] = field(default_factory=list)  # other settings earlier runs measured against the targets, for the card
    init: dict | None = None  # a third-party model imported as the student's --init: train.convert's from, src, audioset; out (a folder)
    mine: dict | None = None  # hard negatives for the student (train.mine): model, others, backgrounds, level, seed, repeat; out (a keyword source)
    refit: RefitConfig | None = None  # the student's keyword head refitted on running audio (train.refit), which the calibrate stage then takes


def default2(data: str = "../shared/data", out: str = "runs/default-2") -> Recipe:
    """edgetag-default-2: MAE-AST pretraining, a tiny teacher fine-tuned on 5.5 h of labelled
    audio, a mini student distilled from it (57 tag classes). default-3 is measured beside it."""
    d, o = Path(data), Path(out)
    speech_commands, noise = str(d / "speech_commands"), [str(d / "background_noise")]
    esc50_train, esc50_val = f"esc50:{d / 'esc50_other_folds'}", f"esc50:{d / 'esc50'},folds=4"  # source-disjoint
    dcase = str(d / "dcase2016_task2")
    dcase_train, dcase_val = f"{dcase},split=train,percent=20", f"{dcase},split=val,percent=20"  # 20% of the clips held out
    # Speech without keywords: digits and wake words, in three parts by speaker (FSDD) or clip
    # (wake words): half sets the thresholds, some train the keyword head's `_unknown_` (words
    # from other microphones than Speech Commands', FSDD's band-limited 8 kHz among them), and the
    # rest measures the false alarms.
    fsdd, wake_words = str(d / "fsdd"), str(d / "wake_words")
    calibration_speech = [f"{p},split=val,percent=50" for p in (fsdd, wake_words)]  # groups 0-50
    training_speech = [f"keywords={p},groups=50-60,label=_unknown_" for p in (fsdd, wake_words)]
    held_out_speech = [f"{fsdd},groups=60-100", f"{wake_words},groups=80-100"]
    keywords_val = f"{speech_commands},split=val,percent=20"  # 20% of the speakers
    common = dict(
        train=[f"tags={esc50_train}", f"tags={dcase_train}", f"keywords={speech_commands},split=train,percent=20",
               # Speech Commands alone never shows the keyword head a dog or a door: without these
               # (15% of ESC-50's training sources, as "no word") barks were spotted as "go"
               f"keywords={esc50_train},split=val,percent=15,label=_silence_", *training_speech],
        val=[f"tags={esc50_val}", f"tags={dcase_val}", f"keywords={keywords_val}"],
        noise=noise, stream=StreamConfig(window=1.0, hop=0.5), epochs=50, batch_size=64,
        # no mixup: two words mixed make no keyword
        augment=AugmentConfig(mixup=0.0),
    )
    teacher = FinetuneConfig(**common, out=str(o / "teacher"), init=str(o / "pretrain" / "encoder.safetensors"), lr=5e-4)
    # The student and its baseline: a mini epoch costs about a quarter of a tiny one on a CPU (and
    # the teacher's logits are cached), so they get twice the teacher's epochs. They also hear more
    # audio without keywords than the teacher did: with a tenth of the wake words and 15% of the
    # ESC-50 sources, "alexa" still scored as "stop" and footsteps as "up".
    more_negatives = [f"keywords={wake_words},groups=60-80,label=_unknown_", f"keywords={esc50_train},groups=15-50,label=_silence_"]
    small = {**common, "train": [*common["train"], *more_negatives], "size": "mini", "lr": 1e-3, "epochs": 100}
    student = DistillConfig(teacher=str(o / "teacher" / "best.safetensors"), temperature=2.0, alpha=0.5, student=FinetuneConfig(**small, out=str(o / "student")))
    return Recipe(
        model_id="edgetag-default-2",
        pretrain=PretrainConfig(data=[str(d)], out=str(o / "pretrain"), size="tiny", frames=192, batch_size=64, steps=5000,
                                lr=4e-4, warmup_steps=500, checkpoint_every=500,
                                num_workers=10),  # enough to feed a GPU; on a small CPU they take turns
        teacher=teacher,
        student=student,
        baselines={
            "scratch": FinetuneConfig(**common, out=str(o / "scratch"), size="tiny", lr=5e-4),
            "nokd": FinetuneConfig(**small, out=str(o / "nokd")),
        },
        calibrate={
            "keywords": [keywords_val],
            "negatives": [esc50_val, dcase_val, *calibration_speech],
            "tags": [esc50_val, dcase_val],
            "target_per_hour": 1.0,
        },
        export_calibration=[speech_commands, str(d / "esc50_other_folds")],
        evaluation={
            "keywords": {"data": keywords_val, "head": KEYWORDS},
            "esc50": {"data": esc50_val, "head": TAGS, "classes_from": esc50_train},
            "dcase": {"data": dcase_val, "head": TAGS, "classes_from": dcase_train},
            "held_out_negatives": held_out_speech,
            "latency": {"seconds": 30.0, "listen_seconds": 5.0},  # edgetag bench stream
        },
    )


def default3(data: str = "../shared/data", out: str = "runs/default", previous: str = "runs/default-2") -> Recipe:
    """edgetag-default-3: a mini model with a convolutional stem, taught from scratch by
    AudioSet-scale teachers on augmented views: EfficientAT mn04 for 531 tag classes (AudioSet's
    527 and four dataset classes it has no node for), the MLPerf Tiny model for keywords, hard
    labels for both; thresholds calibrated on running audio. `previous` holds edgetag-default-2
    (model.safetensors, export/), measured beside it: the README's `git archive` line extracts
    it from the last commit that bundled it."""
    d, o, teachers = Path(data), Path(out), Path(data).parent / "teachers"
    speech_commands, fsdd, wake_words = d / "speech_commands", d / "fsdd", d / "wake_words"
    esc50_train, esc50_val = f"esc50:{d / 'esc50_other_folds'}", f"esc50:{d / 'esc50'},folds=4"  # source-disjoint
    us8k_train, us8k_val = f"urbansound8k:{d / 'urbansound8k'},folds=1;2", f"urbansound8k:{d / 'urbansound8k'},folds=3"  # the official folds
    dcase = d / "dcase2016_task2"
    dcase_train, dcase_val = f"{dcase},split=train,percent=20", f"{dcase},split=val,percent=20"
    keywords_val = f"{speech_commands},split=val,percent=20"  # 20% of the speakers (and of v0.01's: one hash)
    # Speech that holds no keyword, by speaker (or clip) hash: a part to train on, the rest held out
    # for the running-audio benchmark. Arabic commands and v0.01's bed/cat/happy are new here.
    other_words = [f"keywords={d / 'speech_commands_v1_extra'},groups=20-50", f"keywords={d / 'arabic_speech_commands'},groups=0-15,label=_unknown_",
                   f"keywords={fsdd},groups=50-60,label=_unknown_", f"keywords={wake_words},groups=50-80,label=_unknown_"]
    # Sounds without a word, so the keyword head meets dogs and drills (`_silence_`: no keyword)
    sounds = [f"keywords={esc50_train},groups=0-50,label=_silence_", f"keywords={us8k_train},groups=0-50,label=_silence_"]
    student = FinetuneConfig(
        # a quarter of UrbanSound8K's recordings: its ten classes then have about as many windows
        # as an ESC-50 class (all of them gave "Engine" and "Siren" four times ESC-50's share,
        # and the tag head learned to answer them for anything: 18.9% on ESC-50 fold 4)
        # and for Speech a twentieth of Speech Commands' training speakers, about a busy class's
        # share (all of them made "Speech" the answer to every DCASE clip)
        train=[f"tags={esc50_train}", f"tags={us8k_train},groups=0-25", f"tags={dcase_train}", f"tags={speech_commands},groups=20-24,label=Speech",
               f"keywords={speech_commands},split=train,percent=20", *other_words, *sounds],
        val=[f"tags={esc50_val}", f"tags={dcase_val}", f"keywords={keywords_val}"],
        out=str(o / "student"), stream=StreamConfig(window=1.0, hop=0.5),
        # A conv stem rather than default-2's linear patches: 15 epochs of hard labels from scratch
        # (default2's nokd settings, one CPU thread each) gave validation tags 9.2% (mAP 0.167) /
        # keywords 51.0% with patches, 18.4% (0.246) / 55.9% with the stem, whose epochs cost
        # 1.45x. Conv tokens cannot be masked: this student starts from scratch, not from MAE-AST.
        size="mini", tokens="conv", epochs=12, batch_size=64, lr=1e-3, warmup_epochs=0.5, precision="bf16",
        # class-balanced tag draws: UrbanSound8K's Siren and Engine (three times an ESC-50 class's
        # clips) were the answer for 66 of 227 ESC-50 validation clips without them
        balance=True,
        # the views carry time jitter, gain, mixing and background; only SpecAugment's masks stay
        augment=AugmentConfig(mixup=0.0, noise_prob=0.0, gain_db=0.0, shift=0, freq_mask=16, time_mask=16),
    )
    # three views of every window, and mn04 beside the datasets' own (weak, clip-level) labels on
    # their classes: it says which 1 s windows of a 5 s clip hold the sound
    views = dict(audioset=str(d / "audioset"), views=ViewsConfig(views=3), tag_alpha=0.5, temperature=2.0, alpha=0.7,
                 backgrounds=[f"tags={d / 'background_noise'}", f"keywords={d / 'background_noise'}",
                              f"keywords={esc50_train},groups=50-100", f"keywords={us8k_train},groups=50-100"])
    student_settings = DistillConfig(tag_teacher=str(teachers / "efficientat_mn04_as" / "mn04_as_mAP_432.pt"),
                                     keyword_teacher=str(teachers / "mlperf_tiny_kws" / "kws_ref_model.tflite"), **views, student=student)
    arabic, v1 = d / "arabic_speech_commands", d / "speech_commands_v1_extra"

    def scene(keywords: str, others: list[str], backgrounds: list[str], seed: int) -> dict:
        return {"keywords": [keywords], "others": others, "backgrounds": backgrounds, "seed": seed, "repeat": 2}

    return Recipe(
        model_id="edgetag-default-3",
        pretrain=None,
        teacher=None,
        student=student_settings,
        # the same views and schedule, hard labels only: what the external teachers gave
        baselines={"nokd": DistillConfig(**views, student=replace(student, out=str(o / "nokd")))},
        # Running audio: words of validation speakers in validation sounds; the threshold is chosen
        # on one half (speakers, sources), the other half measures it.
        calibrate={"keywords": [], "negatives": [], "tags": [esc50_val, dcase_val], "target_per_hour": 2.0,
                   "scene": scene(f"{speech_commands},groups=0-10", [f"{fsdd},groups=0-50", f"{wake_words},groups=0-50", f"{arabic},groups=40-70", f"{v1},groups=0-10"],
                                  [f"{esc50_val},groups=0-50", f"{us8k_val},groups=0-50", dcase_val], seed=1)},
        export_calibration=[str(speech_commands), str(d / "esc50_other_folds")],
        evaluation={
            "keywords": {"data": keywords_val, "head": KEYWORDS},
            "esc50": {"data": esc50_val, "head": TAGS, "classes_from": esc50_train},
            "dcase": {"data": dcase_val, "head": TAGS, "classes_from": dcase_train},
            "urbansound8k": {"data": us8k_val, "head": TAGS, "classes_from": us8k_train},
            "held_out_negatives": [f"{fsdd},groups=60-100", f"{wake_words},groups=80-100"],
            "running": {**scene(f"{speech_commands},groups=10-20", [f"{fsdd},groups=60-100", f"{wake_words},groups=80-100", f"{arabic},groups=70-100", f"{v1},groups=10-20"],
                                [f"{esc50_val},groups=50-100", f"{us8k_val},groups=50-100"], seed=2), "gates": [0.1, 0.3]},
            "previous": previous,
            "peers": {"keywords": student_settings.keyword_teacher, "tags": student_settings.tag_teacher, "audioset": str(d / "audioset")},
            "latency": {"seconds": 30.0, "listen_seconds": 5.0},
        },
        # issue 14's targets (the maintainers measure them on held-out clips; these are our validation sets)
        targets={"accuracy": {"keywords": 0.91, "esc50": 0.65, "dcase": 0.90}, "running": (4.0, 0.75), "latency_ratio": 1.5, "bundle_mib": 20},
        tried=[
            "default-2's model continued on two views per window (its heads carried into the 531-class head, 8 epochs, lr 3e-4, "
            "mn04 on the other classes only): keywords 84.2%, ESC-50 30.8%, DCASE 64.7%; 27.4% of running keywords at 3.0 false alarms per hour",
            "linear 16x16 patches instead of the conv stem (hard labels from scratch, 15 epochs, default-2's baseline settings): "
            "validation tags 9.2% and keywords 51.0%, against 18.4% and 55.9% with the stem",
            "mn04's probabilities alone as the targets of the classes the datasets name: \"Music\" answered most UrbanSound8K clips",
        ],
    )


def default4(data: str = "../shared/data", out: str = "runs/default", previous: str = "runs/default-3") -> Recipe:
    """edgetag-default-4: EfficientAT's mn04 itself as the student's starting point, imported
    with its AudioSet weights (`init` stage: train.convert --from efficientat), then taught on
    default-3's views, data and teachers: mn04 (the original, on its own 32 kHz front end) and the
    datasets' labels for the tags, the MLPerf Tiny model and the hard labels for a new keyword
    head. `previous` holds edgetag-default-3 (model.safetensors, export/)."""
    r = default3(data, out, previous)
    o, c = Path(out), r.student
    init = {"from": "efficientat", "src": c.tag_teacher, "audioset": c.audioset, "out": str(o / "init")}
    # From AudioSet weights: a few epochs at a fine-tuning rate (default-3's 12 epochs at 1e-3
    # trained from scratch); fp32, as bf16 convolutions are slower than fp32 on CPUs without AVX512-BF16.
    student = replace(c.student, init=str(o / "init" / "model.safetensors"), encoder="mobilenet", size="mn04", tokens="patch",
                      epochs=4, lr=5e-4, warmup_epochs=0.5, precision="fp32")
    tried = ["default-4's settings without --cross, 5 epochs (the same init, views and teachers; 2026-12-02): keywords 90.2%, ESC-50 73.1%, DCASE 82.4%, "
             "UrbanSound8K 48.1%; 28.1% of running keywords at 0.0 false alarms per hour; but its tag head called a clean Speech Commands \"yes\" "
             "Siren (1.00; mn04: Speech 0.82), having never heard a keyword view, so --cross went in at the cost of those tag figures",
             "edgetag-default-3, a mini transformer with a conv stem from scratch on the same views and teachers (12 epochs, lr 1e-3): "
             "keywords 88.6%, ESC-50 34.8%, DCASE 73.5%, UrbanSound8K 35.1%; 24.4% of running keywords at 3.0 false alarms per hour "
             "(its card; measured again beside default-4 as its `previous`)",
             "default-3's baseline without the external teachers (hard labels only, its card): keywords 84.1%, ESC-50 36.1%, DCASE 64.7%",
             *r.tried]
    # issue 14's latency target is relative to default-2: timed beside the others
    latency = {**r.evaluation["latency"], "reference": str(Path(previous).parent / "default-2" / "model.safetensors")}
    # --cross: the tag head also learns mn04's word on the keyword views, and the keyword head the
    # MLPerf model's on the tag views. Without it (5 epochs, otherwise these settings) a clean
    # Speech Commands "yes" scored Siren 1.00 (mn04: Speech 0.82): the trunk learned keywords on
    # words mixed with street sounds while the tag head never heard a keyword view.
    # Keywords gated on the model's own Speech tag, the gate chosen with the threshold on the
    # calibration scene: ungated, default-4's keyword head reached 0.9 in more windows of
    # background sound alone than of other speech
    calibrate = {**r.calibrate, "speech_gates": [0.0, 0.1, 0.2, 0.3, 0.5]}
    # the same init, views and schedule on the datasets' labels alone: what the teachers add on top of mn04's weights
    nokd = replace(r.baselines["nokd"], student=replace(student, out=str(o / "nokd")))
    return replace(r, model_id="edgetag-default-4", init=init, student=replace(c, student=student, cross=0.5), baselines={"nokd": nokd}, tried=tried,
                   calibrate=calibrate, evaluation={**r.evaluation, "latency": latency})


def default5(data: str = "../shared/data", out: str = "runs/default", previous: str = "runs/default-4") -> Recipe:
    """edgetag-default-5: default-4 with its tag teacher trusted less where the labels know better.
    `previous` holds edgetag-default-4 (model.safetensors, export/)."""
    r = default4(data, out, previous)
    # On the tag classes the datasets name, the labels beat mn04 here (default-4's hard-label
    # baseline: UrbanSound8K 60.7% against the student's 41.9%, mn04 itself 36.4%), so mn04
    # speaks for a quarter there, not half; and --cross, which made the tag head hear keyword
    # views (a clean "yes" was Siren without it) at a cost of 6 points on ESC-50 and DCASE,
    # weighs half of default-4's.
    student = replace(r.student, tag_alpha=0.25, cross=0.25)
    tried = ["edgetag-default-4: default-5's student settings with --tag-alpha 0.5 and --cross 0.5 (its card)",
             "these settings with keyword views heard as words are in running audio (`--word-placement anywhere`: the span of 95% of a clip's "
             "energy anywhere in the window; background in 90% of them, `--word-background-prob 0.9`) and the MLPerf model at alpha 0.3 "
             "(2026-12-02, runs/d5a): keywords 89.7%, ESC-50 74.9%, DCASE 82.4%, UrbanSound8K 53.7%; 27.4% of running keywords at 0.0 false "
             "alarms per hour (36.6% at best within 4 per hour), its calibration unable to keep 2 per hour at any gate; its hard-label "
             "baseline on those views: keywords 86.5% and 37.0% of running keywords within 4 per hour, against 88.9% and 38.9% on "
             "default-4's views. In default-4's calibration scene its own keywords had reached 0.5 in some hop over them for 54% (58% for "
             "this one), falling from 87% right as centred clean clips to 43% over ESC-50 sound at 5 dB",
             *r.tried]
    return replace(r, model_id="edgetag-default-5", student=student, tried=tried)


def default6(data: str = "../shared/data", out: str = "runs/default", previous: str = "runs/default-5") -> Recipe:
    """edgetag-default-6, bundled before edgetag-default-14: default-5's student listening every
    0.25 s instead of every 0.5 s, calibrated at that hop. `previous` holds edgetag-default-5
    (model.safetensors, export/)."""
    r = default5(data, out, previous)
    # A 1 s window every 0.5 s holds a word of 0.6 s whole in only some hops, and never centred as
    # it was in training: at 0.25 s default-5's keywords in its evaluation scene reached 0.5 for
    # their own label in some hop over them for 74% (66% at 0.5 s). A hop costs the same; a
    # second of audio costs twice as many (MLPerf Tiny's model is run this way too).
    tried = ["edgetag-default-5: default-6's student listening every 0.5 s (its card; measured again beside default-6 as its `previous`)", *r.tried]
    return replace(r, model_id="edgetag-default-6", calibrate={**r.calibrate, "hop": 0.25}, tried=tried)


def more_other_speech(d: Path) -> list[str]:
    """Speech without keywords from speakers no scene or stage of default-6 uses, as `_unknown_`:
    the Arabic commands' groups 15-40 and v0.01's bed/cat/happy groups 50-100."""
    return [f"keywords={d / 'arabic_speech_commands'},groups=15-40,label=_unknown_", f"keywords={d / 'speech_commands_v1_extra'},groups=50-100"]


def default7(data: str = "../shared/data", out: str = "runs/default", previous: str = "runs/default-6") -> Recipe:
    """A candidate for edgetag-default-7, measured and not bundled (the README's default-model
    section has its figures): default-6 with its keyword teacher hearing the words without their
    background, and more other speech. `previous` holds edgetag-default-6 (model.safetensors, export/)."""
    r = default6(data, out, previous)
    # The MLPerf model called 45% of validation keywords _unknown_ or _silence_ at 0 dB over
    # ESC-50 and UrbanSound8K sound (28% at 5 dB; 92.5% right when clean), and at alpha 0.7 the
    # student learned that: default-6 said _unknown_ / _silence_ for 55% of them at 0 dB, and
    # its running-audio misses were mostly words it heard as no keyword.
    views = replace(r.student.views, teach_clean=True)
    # Other speech its keyword head hears as _unknown_: the Arabic commands' speakers in groups
    # 15-40 and v0.01's bed/cat/happy speakers in 50-100, which no scene or stage used (the
    # calibration scene's false alarms within 4 per hour were Arabic commands, 20 of 22 at 0.9)
    student = replace(r.student.student, train=[*r.student.student.train, *more_other_speech(Path(data))])
    tried = ["edgetag-default-6: these settings with the keyword teacher hearing the noisy views (its card; measured again here as `previous`)", *r.tried]
    return replace(r, model_id="edgetag-default-7", student=replace(r.student, views=views, student=student), tried=tried)


def default8(data: str = "../shared/data", out: str = "runs/default", previous: str = "runs/default-6") -> Recipe:
    """A candidate for edgetag-default-8, measured and not bundled (the README's default-model
    section has its figures): default-6 with its keyword teacher silent about keywords on the
    views that hold none. `previous` holds edgetag-default-6 (model.safetensors, export/)."""
    r = default6(data, out, previous)
    # The MLPerf model was trained on Speech Commands alone: it calls 20% of the Arabic commands
    # and 10% of the wake words the student learns as _unknown_ a keyword (keyword probability
    # 0.23 on average over Arabic commands), and at alpha 0.7 default-6 learned that; Arabic
    # commands made 13 of the 14 false alarms of its calibration scene at 0.93 (gated at 0.2).
    tried = ["edgetag-default-6: these settings with the keyword teacher's probabilities kept on every view (its card; measured again here as `previous`)", *r.tried]
    return replace(r, model_id="edgetag-default-8", student=replace(r.student, sure_negatives=True), tried=tried)


def default9(data: str = "../shared/data", out: str = "runs/default", previous: str = "runs/default-6") -> Recipe:
    """A candidate for edgetag-default-9, measured and not bundled (the README's default-model
    section has its figures): default8 with default7's other speech (more speakers of it) as
    _unknown_, which its keyword teacher now leaves to the labels. `previous` holds
    edgetag-default-6 (model.safetensors, export/)."""
    r = default8(data, out, previous)
    # default8's calibration-scene false alarms at 0.95 were Arabic commands of speakers it never heard (10 of 15)
    tried = ["default8: these settings without the extra other speech (the README)", *r.tried]
    student = replace(r.student.student, train=[*r.student.student.train, *more_other_speech(Path(data))])
    return replace(r, model_id="edgetag-default-9", student=replace(r.student, student=student), tried=tried)


def training_scene(d: Path) -> dict[str, list[str]]:
    """Other speech and background sound of running audio built from training speakers and
    sources alone (no scene's): the Arabic commands' groups 0-40 (the calibration scene's are
    40-70), v0.01's bed/cat/happy 20-100, the wake words and digits the student trains on, over
    ESC-50's training folds, UrbanSound8K folds 1-2 and the noise folder."""
    return {"others": [f"{d / 'arabic_speech_commands'},groups=0-40", f"{d / 'speech_commands_v1_extra'},groups=20-100",
                       f"{d / 'wake_words'},groups=50-80", f"{d / 'fsdd'},groups=50-60"],
            "backgrounds": [f"esc50:{d / 'esc50_other_folds'}", f"urbansound8k:{d / 'urbansound8k'},folds=1;2", str(d / "background_noise")]}


def default10(data: str = "../shared/data", out: str = "runs/default", previous: str = "runs/default-6") -> Recipe:
    """A candidate for edgetag-default-10, measured and not bundled (the README's default-model
    section has its figures): default9 that also hears, as no keyword, the windows of keyword-free
    running audio where edgetag-default-6 spotted one (train.mine). `previous` holds
    edgetag-default-6 (model.safetensors, export/), which mines them and is measured beside it."""
    r, d, o = default9(data, out, previous), Path(data), Path(out)
    # Speakers and sources of training alone (`training_scene`). default-6 still made 3.9 false
    # alarms per hour on its calibration scene at the grid's top (0.99), and 13 of its 14 at 0.93
    # were Arabic commands of speakers it never heard: its surest mistakes are what a threshold
    # cannot remove, so the next student hears windows like them.
    mine = {"model": str(Path(previous) / "model.safetensors"), "level": 0.5, "seed": 3, "repeat": 2, "out": str(o / "mine"), **training_scene(d)}
    tried = ["default9: these settings without the mined windows (the README)", *r.tried]
    student = replace(r.student.student, train=[*r.student.student.train, f"keywords={o / 'mine'}"])
    return replace(r, model_id="edgetag-default-10", mine=mine, student=replace(r.student, student=student), tried=tried)


def default11(data: str = "../shared/data", out: str = "runs/default", previous: str = "runs/default-6") -> Recipe:
    """A candidate for edgetag-default-11, measured and not bundled (the README's default-model
    section has its figures): default10 with half of its keyword head's draws holding a keyword.
    `previous` holds edgetag-default-6 (model.safetensors, export/)."""
    r = default10(data, out, previous)
    # Every negative source added since default-6 (other speech, the mined windows) also moved the
    # keyword head's prior: keywords were 27% of default-6's keyword clips and 14% of default10's,
    # whose validation keywords fell from 91.0% to 87.1%, the misses mostly heard as _unknown_.
    # Drawn half and half, the head keeps its prior whatever the number of negatives it hears.
    tried = ["default10: these settings with the keyword head's clips drawn in the data's own mix (14% keywords; the README)", *r.tried]
    return replace(r, model_id="edgetag-default-11", student=replace(r.student, student=replace(r.student.student, keyword_share=0.5)), tried=tried)


def default12(data: str = "../shared/data", out: str = "runs/default", previous: str = "runs/default-6") -> Recipe:
    """A candidate for edgetag-default-12 (the README's default-model section has its figures):
    default10 with its augmented keyword views played at 0.9-1.1x speed. `previous` holds
    edgetag-default-6 (model.safetensors, export/)."""
    r = default10(data, out, previous)
    # Keywords here come from a few hundred speakers; default10's validation keywords fell to
    # 87.1% (default-6: 91.0%), its misses heard as _unknown_, a word from a voice it has not
    # heard. Kaldi's speed perturbation range: new voices and rates, the same words (and other speech).
    tried = ["default10: these settings with the keyword views as recorded (the README)", *r.tried]
    return replace(r, model_id="edgetag-default-12", student=replace(r.student, views=replace(r.student.views, speed=0.1)), tried=tried)


def default13(data: str = "../shared/data", out: str = "runs/default", previous: str = "runs/default-6") -> Recipe:
    """A candidate for edgetag-default-13 (the README's default-model section has its figures):
    default10 taught for 8 epochs instead of 4. `previous` holds edgetag-default-6 (model.safetensors, export/)."""
    r = default10(data, out, previous)
    # A patient teacher (Beyer et al. 2022): default10's validation keywords were still rising
    # when its 4 epochs' cosine schedule ended (86.5% -> 87.1%); the views and targets are cached,
    # so a longer schedule costs the epochs alone.
    tried = ["default10: these settings for 4 epochs (the README)", *r.tried]
    return replace(r, model_id="edgetag-default-13", student=replace(r.student, student=replace(r.student.student, epochs=8)), tried=tried)


def default14(data: str = "../shared/data", out: str = "runs/default", previous: str = "runs/default-6") -> Recipe:
    """edgetag-default-14, bundled before edgetag-default-15: edgetag-default-6's recipe taught
    for 8 epochs instead of 4 (as default13 taught default10's), listening every 0.1 s.
    `previous` holds edgetag-default-6 (model.safetensors, export/)."""
    r = default6(data, out, previous)
    # default13 (default10 for 8 epochs) gained 1.8 points of validation keywords, 2.7 of ESC-50
    # and 3.0 of DCASE over default10's 4 epochs: a patient teacher (Beyer et al. 2022) on views
    # and targets that are cached, so the longer schedule costs the epochs alone
    tried = ["edgetag-default-6: these settings for 4 epochs, listening every 0.25 s (its card; measured again beside it as `previous`)", *r.tried]
    patient = lambda c: replace(c, student=replace(c.student, epochs=8))  # noqa: E731 (the hard-label baseline on the same schedule)
    # Listening every 0.1 s, as default-6 went from 0.5 s to 0.25 s: more windows hold the word
    # near the centre where the views put it. On the calibration scene this student, at 0.25 s,
    # kept its 2 false alarms per hour only at 0.998 (8.8% of the keywords); at 0.1 s its hop
    # probabilities replayed by `running.calibrate_spotting` kept them at 0.995 gated at 0.2 (15.6%).
    # A hop costs the same; a second of audio costs 2.5 times as many.
    return replace(r, model_id="edgetag-default-14", student=patient(r.student), baselines={name: patient(c) for name, c in r.baselines.items()},
                   calibrate={**r.calibrate, "hop": 0.1}, tried=tried)


def default15(data: str = "../shared/data", out: str = "runs/default", previous: str = "runs/default-14") -> Recipe:
    """edgetag-default-15, bundled before edgetag-default-16: edgetag-default-14's student (the same recipe up to
    the calibrate stage) spotting keywords from the mean of its last hops, over a span calibrated
    with the threshold and speech gate. `previous` holds edgetag-default-14 (model.safetensors, export/)."""
    r = default14(data, out, previous)
    # A word holds a keyword for several 0.1 s hops, a false alarm often for one: replayed on
    # default-14's calibration scene, the mean of three hops kept its 2 false alarms per hour at
    # 0.97 (22.5% of the keywords) where single hops needed 0.995 (15.6%). Which span, if any, is
    # the calibration scene's to say, as the gate is.
    # That scene's 46 minutes (two passes of its backgrounds) made one false alarm 1.3 per hour, so
    # a threshold within 2 per hour rested on the single surest alarm. Four passes (92 minutes: its
    # 160 keyword clips are all placed in the first 18, other words after them) let it rest on three.
    tried = ["edgetag-default-14: this student spotting from each hop alone, calibrated on two passes of the scene's backgrounds "
             "(its card; measured again beside it as `previous`)", *r.tried]
    calibrate = {**r.calibrate, "keyword_smoothings": [0.0, 0.2, 0.3, 0.5], "scene": {**r.calibrate["scene"], "repeat": 4}}
    return replace(r, model_id="edgetag-default-15", calibrate=calibrate, tried=tried)


def default16(data: str = "../shared/data", out: str = "runs/default", previous: str = "runs/default-15") -> Recipe:
    """edgetag-default-16, bundled before edgetag-default-17: edgetag-default-15's student (the same recipe up to
    the student stage) with its keyword head refitted on running audio of training speakers and
    sources (train.refit), then calibrated as default-15 was. `previous` holds edgetag-default-15
    (model.safetensors, export/)."""
    r, d, o = default15(data, out, previous), Path(data), Path(out)
    # default-15's keywords in its calibration scene reached 0.5 for their own label in some hop
    # over them for 66%: the head learned words centred in their window, and in running audio it
    # hears them anywhere in it, among other words, at 0-15 dB. Its encoder tells more than the
    # head makes of it: in probes on the embeddings of both scenes' hops, linear heads fitted on
    # training scenes' hops beside training clips spotted 15-21% of the calibration scene's
    # keywords within 2 false alarms per hour (default-15: 12.5%); with the clips held to their
    # labels alone, validation keywords were 90.2-91.6% (default-15: 91.9%), held to the head's
    # own answers too, 91.7-93.1%. The hop is the one it listens at.
    keyword_clips = [text for text in r.student.student.train if text.startswith(f"{KEYWORDS}=")]
    refit = RefitConfig(model=str(out_of(r.student) / "best.safetensors"), out=str(o / "refit"), keywords=[f"{d / 'speech_commands'},split=train,percent=20"],
                        clips=keyword_clips, hop=r.calibrate["hop"], **training_scene(d))
    tried = ["edgetag-default-15: this student's keyword head as distillation left it (its card; measured again beside it as `previous`)", *r.tried]
    return replace(r, model_id="edgetag-default-16", refit=refit, tried=tried)


def default(data: str = "../shared/data", out: str = "runs/default", previous: str = "runs/default-16") -> Recipe:
    """edgetag-default-17, the bundled model: edgetag-default-16's recipe with the refit reaching
    into the encoder: after the keyword head alone, the student's top three blocks learn with the
    heads on the same hops, the tag heads held to their answers before (train.refit --layers).
    `previous` holds edgetag-default-16 (model.safetensors, export/)."""
    r = default16(data, out, previous)
    # A head on a frozen embedding cannot separate what the embedding merged. In probes on the
    # inputs of the last three blocks over both scenes' hops (the same hops, scored as the recipe
    # scores), two passes of those blocks after default-16's head took the calibration scene's
    # keywords within 2 false alarms per hour from 15.6% to 21.9% with the tags held at about a
    # hundredth of this --hold (top-1 tag agreement 80% over the scenes' hops), and to 25.6% at
    # about this --hold (86%); validation keywords 92.1% and 91.6% (default-16: 93.1%).
    tried = ["edgetag-default-16: this student's refit of its keyword head alone (its card; measured again beside it as `previous`)", *r.tried]
    # One arrangement of the evaluation scene's clips left a threshold's figure to one or two
    # alarms: default-17 at its calibrated choice spotted 53.1%, 41.9% and 48.2% of the same
    # keywords in three arrangements (seeds 2, 3, 4), at 0, 3.0 and 4.5 false alarms per hour.
    evaluation = {**r.evaluation, "running": {**r.evaluation["running"], "arrangements": 3}}
    return replace(r, model_id="edgetag-default-17", refit=replace(r.refit, layers=3), evaluation=evaluation, tried=tried)


RECIPES = {"default": default, "default16": default16, "default15": default15, "default14": default14, "default6": default6, "default13": default13, "default12": default12, "default11": default11, "default10": default10, "default9": default9, "default8": default8, "default7": default7, "default5": default5, "default4": default4, "default3": default3, "default2": default2}


# ---------------------------------------------------------------------------------------------
# Stages


def plain(settings) -> dict:
    """Settings as stage.json stores them (dataclasses as dicts, tuples as lists)."""
    return json.loads(json.dumps(asdict(settings) if is_dataclass(settings) else settings))


def digest(folder: Path) -> str:
    """A finished stage's settings, hashed: downstream stages record it, so they rerun when it changes."""
    marker = folder / "stage.json"
    if not marker.is_file():
        raise ValueError(f"{folder}: not done yet; run its stage first")
    return hashlib.sha256(json.dumps(json.loads(marker.read_text())["settings"], sort_keys=True).encode()).hexdigest()[:16]


def run_stage(folder: Path, settings, work, after: tuple[Path, ...] = ()) -> dict:
    """Run `work()` unless `folder/stage.json` records these settings (and the same settings of
    the stages in `after`, which it builds on); returns what `work()` returned."""
    marker, settings = folder / "stage.json", plain(settings)
    if after:
        settings = {**settings, "after": {str(f): digest(f) for f in after}}
    if marker.is_file():
        done = json.loads(marker.read_text())
        if done["settings"] == settings:
            print(f"{folder}: done")
            return done["result"]
        print(f"{folder}: settings changed since the last run, running it again")
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result = work()
    marker.write_text(json.dumps({"settings": settings, "seconds": time.perf_counter() - start, "result": result,
                                  "torch": torch.__version__, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}, indent=1))
    return result


def pretrain_stage(c: PretrainConfig) -> dict:
    from train.pretrain import pretrain

    state = Path(c.out) / "last.pt"
    if state.is_file():  # continue an interrupted run, but only one with these very settings
        saved = torch.load(state, map_location="cpu", weights_only=True)["config"]
        if plain(saved) != plain(c):
            raise ValueError(f"{state}: written with other settings; remove {c.out} to pretrain again")
    rows = pretrain(c, resume=True)
    return {"steps": len(rows), "first_loss": rows[0]["loss"], "last_loss": rows[-1]["loss"], "train_seconds": rows[-1].get("seconds")}


def init_stage(c: dict) -> dict:
    from train.convert import convert

    path = convert(c["from"], Path(c["src"]), Path(c["out"]) / "model.safetensors", audioset=Path(c["audioset"]))
    return {"parameters": sum(p.numel() for p in checkpoint.load_model(path).parameters())}


def mine_stage(c: dict) -> dict:
    from train.mine import mine_sources

    return mine_sources(**c)


def refit_stage(c: RefitConfig) -> dict:
    from train.refit import refit

    return refit(c)


def finetune_stage(c: FinetuneConfig) -> dict:
    from train.evaluate import headline
    from train.finetune import finetune

    return headline(finetune(c))


def distill_stage(c: DistillConfig) -> dict:
    from train.distill import distill
    from train.evaluate import headline

    return headline(distill(c))


def thresholds_through(recipe: Recipe, backend, speech_gates: tuple[float, ...] = (0.0,), smoothings: tuple[float, ...] = (0.0,)) -> tuple[dict, dict, dict]:
    """The thresholds `recipe.calibrate` asks for, measured through `backend`, what they were
    measured on, and the running-audio result. With a "scene" the keyword threshold (one for
    every keyword) is the lowest that keeps false alarms within the target on a running-audio
    scene (train.running) of validation speakers and sounds, at the speech gate of
    `speech_gates` and keyword smoothing of `smoothings` that spot the most keywords there
    (`running.calibrate_spotting`)."""
    from train.calibrate import thresholds_of

    thresholds, calibration = thresholds_of(backend, **{k: v for k, v in recipe.calibrate.items() if k not in CHOICES})
    result = {}
    if "scene" in recipe.calibrate:
        from edgetag.stream import Engine, PostConfig
        from train import running

        engine, post = Engine(backend), PostConfig()
        head, scene = engine.spec.head_of(KEYWORDS), running.scene_of(**recipe.calibrate["scene"])
        probabilities = running.hop_probabilities(engine, scene)
        target = recipe.calibrate["target_per_hour"]
        (gate, smoothing), chosen, curves = running.calibrate_spotting(engine.spec, post, head, probabilities, scene, list(speech_gates), target, list(smoothings))
        thresholds[head] = {label: chosen["threshold"] for label in engine.spec.heads[head].labels if label not in NOT_SPOTTED}
        calibration[head] = result["scene"] = {
            "minutes": scene.seconds / 60, "keywords": len(scene.keywords), "other_words": len(scene.words) - len(scene.keywords),
            "speech_gate": gate, "keyword_smoothing": smoothing, "chosen": chosen, "curve": curves[gate, smoothing],
            "pairs": [{"speech_gate": g, "keyword_smoothing": s, **running.calibrate_threshold(points, target)} for (g, s), points in curves.items()]}
    return thresholds, calibration, result


# What recipe.calibrate chooses among besides thresholds (and the hop it listens at), not calibrate's own arguments
CHOICES = ("scene", "speech_gates", "keyword_smoothings", "hop")


def calibrate_stage(recipe: Recipe, ckpt: Path, out: Path) -> dict:
    """Thresholds, the speech gate and keyword smoothing measured through torch into a copy of
    the student, which also gets the model's id."""
    from edgetag.runtime import TorchBackend

    model = checkpoint.load_model(ckpt)
    model.spec = model.spec.with_stream(hop=recipe.calibrate.get("hop"))  # the hop it will listen at, calibrated at that hop
    choices = tuple(recipe.calibrate.get("speech_gates", (0.0,))), tuple(recipe.calibrate.get("keyword_smoothings", (0.0,)))
    thresholds, calibration, result = thresholds_through(recipe, TorchBackend(model, ckpt), *choices)
    scene = result.get("scene", {})
    model.spec = replace(model.spec, thresholds=thresholds, calibration=calibration, speech_gate=scene.get("speech_gate", 0.0),
                         keyword_smoothing=scene.get("keyword_smoothing", 0.0), provenance={**model.spec.provenance, "id": recipe.model_id})
    checkpoint.save(out, model)
    return {"thresholds": model.spec.thresholds, "negative_hours": calibration.get(KEYWORDS, {}).get("negative_hours"), **result}


def export_stage(recipe: Recipe, ckpt: Path, out: Path) -> dict:
    """The export, and each of its CPU files' own thresholds, measured through ONNX Runtime on
    that file as the checkpoint's were through torch."""
    from deploy.export import export
    from train.calibrate import calibrate_files

    report = export(ckpt, out, recipe.export_calibration)
    # each file's thresholds at the checkpoint's speech gate and smoothing: those are the model's, chosen once
    measure = lambda backend: thresholds_through(recipe, backend, (backend.spec.speech_gate,), (backend.spec.keyword_smoothing,))[:2]  # noqa: E731
    for name, (thresholds, _) in calibrate_files(out, measure).items():
        report[name] = {"thresholds": thresholds}
    return report


SHIPPED = ("student", "student, ONNX Runtime int8")  # the bundled checkpoint and its int8 export
PREVIOUS = ("previous", "previous, ONNX Runtime int8")  # the model this one replaces, in the same runs


def models_of(recipe: Recipe, out: Path) -> dict[str, str]:
    """Every model the evaluation compares, by the name the card gives it."""
    export_dir, previous = out / "export", recipe.evaluation.get("previous")
    return {**({"teacher": str(Path(recipe.teacher.out) / "best.safetensors")} if recipe.teacher else {}),
            **({f"start: {Path(recipe.init['src']).stem}": str(Path(recipe.init["out"]) / "model.safetensors")} if recipe.init else {}),
            SHIPPED[0]: str(out / "calibrate" / "model.safetensors"), SHIPPED[1]: str(export_dir / "model.int8.onnx"),
            **{f"baseline: {name}": str(out_of(c) / "best.safetensors") for name, c in recipe.baselines.items()},
            **({PREVIOUS[0]: str(Path(previous) / "model.safetensors"), PREVIOUS[1]: str(Path(previous) / "export" / "model.int8.onnx")} if previous else {})}


def peers_of(recipe: Recipe) -> dict:
    """The third-party teachers as peers: name -> (head kind, teacher)."""
    from train import teachers

    p = recipe.evaluation.get("peers", {})
    out = {}
    if "keywords" in p:
        out["MLPerf Tiny KWS (peer)"] = (KEYWORDS, teachers.KeywordTeacher(Path(p["keywords"])))
    if "tags" in p:
        out["EfficientAT mn04 (peer)"] = (TAGS, teachers.AudioSetTeacher(Path(p["tags"]), Path(p["audioset"]) / "class_labels_indices.csv"))
    return out


def running_stage(recipe: Recipe, models: dict[str, str], peers: dict, folder: Path) -> dict:
    """Keywords in running audio (train.running) for every keyword model: the recall / false-alarm
    curve over one threshold for all keywords, and the spots at each model's own thresholds."""
    from edgetag.runtime import load_backend
    from edgetag.spec import HeadConfig
    from edgetag.stream import Engine, PostConfig
    from train import running
    from train.evaluate import teacher_windows

    e = recipe.evaluation["running"]
    scene = running.scene_of(**{k: v for k, v in e.items() if k != "gates"})
    post, out = PostConfig(), {"minutes": scene.seconds / 60, "keywords": len(scene.keywords), "other_words": len(scene.words) - len(scene.keywords),
                               "arrangements": e.get("arrangements", 1), "models": {}}
    curves, marks = {}, {}
    for name, path in models.items():
        engine = Engine(load_backend(path))
        head, spec, own = engine.spec.head_of(KEYWORDS), engine.spec, engine.speech_gate
        probabilities = running.hop_probabilities(engine, scene)
        r = out["models"][name] = {"at_thresholds": running.score(spec, post, head, probabilities, scene, running.spot_thresholds(engine, head), own),
                                   "curve": running.curve(spec, post, head, probabilities, scene, own), "speech_gate": own,
                                   "keyword_smoothing": spec.keyword_smoothing}
        curves[name], marks[name] = r["curve"], r["at_thresholds"]
        if name == SHIPPED[0]:
            # the shipped model's curve at other speech gates (0: never gated) beside its own, and hop by hop if it smooths
            for gate in sorted({0.0, *e.get("gates", [])} - {own}) if spec.speech_tag else ():
                variant = f"{name}, never gated" if not gate else f"{name}, gated on its Speech tag >= {gate:g}"
                out["models"][variant] = {"curve": running.curve(spec, post, head, probabilities, scene, gate), "gate": gate}
            if spec.keyword_smoothing:
                out["models"][f"{name}, each hop alone"] = {"curve": running.curve(replace(spec, keyword_smoothing=0.0), post, head, probabilities, scene, own),
                                                            "gate": own, "smoothing": 0.0}
            student_spec = spec
    for name, (kind, teacher) in peers.items():
        if kind != KEYWORDS:
            continue
        # the peer on the student's hop grid: 1 s windows every 0.5 s, as it was run on clips
        rate, hop = scene.rate, round(student_spec.hop_seconds * scene.rate)
        windows = teacher_windows(scene.audio, rate, hop)
        spec = replace(student_spec, heads={KEYWORDS: HeadConfig(KEYWORDS, teacher.labels)}, thresholds={}, speech_gate=0.0, keyword_smoothing=0.0)
        probabilities = {KEYWORDS: np.concatenate([teacher(windows[i : i + 512]) for i in range(0, len(windows), 512)])}
        curves[name] = running.curve(spec, post, KEYWORDS, probabilities, scene)
        out["models"][name] = {"curve": curves[name]}
    running.plot_curves({**curves, **{n: m["curve"] for n, m in out["models"].items() if "gate" in m}}, folder / "running.png",
                        f"keywords in {scene.seconds / 60:.0f} min of running audio", marks)
    return out


def tasks_of(evaluation: dict) -> dict[str, dict]:
    """The validation tasks of a recipe's evaluation settings (name -> data, head, classes_from)."""
    return {name: spec for name, spec in evaluation.items() if isinstance(spec, dict) and "data" in spec}


def task_results(backend, tasks: dict[str, dict]) -> dict[str, dict]:
    """Each validation task (name -> data, head, classes_from) scored with one backend."""
    from train.data import Source
    from train.evaluate import evaluate

    out = {}
    for task, spec in tasks.items():
        if spec["head"] not in backend.spec.heads:  # an imported starting point has tags only
            continue
        kind = backend.spec.heads[spec["head"]].kind
        classes = sorted({label for x in Source.parse(spec["classes_from"], kind).read() for label in x.labels}) if "classes_from" in spec else None
        out[task] = evaluate(backend, Source.parse(spec["data"], kind).read(), spec["head"], classes)
    return out


def held_out_spotting(backend, evaluation: dict) -> dict:
    """Keyword spots on the validation keyword clips and false alarms on the held-out negatives."""
    from train.data import Source
    from train.evaluate import spotting

    positives = Source.parse(evaluation["keywords"]["data"], KEYWORDS).read()
    negatives = [x for text in evaluation["held_out_negatives"] for x in Source.parse(text, KEYWORDS).read()]
    return spotting(backend, positives, negatives)


def refresh_card(recipe: Recipe, name: str, card: Path = ASSETS / "MODEL_CARD.md") -> None:
    """After a runtime change that leaves the weights as they are: the installed card's int8
    export rows (validation, keyword clips) and its Latency section, measured again with the
    recipe's evaluation settings on the installed model. The rest of the card needs the full
    evaluate stage (every model and peer)."""
    from edgetag import bench
    from edgetag.runtime import load_backend
    from pipeline.model_card import cells, latency_section, replace_row, replace_section, spotting_table, validation_cell

    export = checkpoint.DEFAULT_EXPORT / "model.int8.onnx"
    backend = load_backend(export)
    results = task_results(backend, tasks_of(recipe.evaluation))
    text = replace_row(card.read_text(), SHIPPED[1], "| model | parameters |", lambda header: validation_cell(results, header))
    header, _, row = spotting_table({"models": {SHIPPED[1]: {"spotting": held_out_spotting(backend, recipe.evaluation)}}})
    text = replace_row(text, SHIPPED[1], header, dict(zip(cells(header), cells(row))).get)
    latency = {"latency": {SHIPPED[0]: bench.stream_benchmark(checkpoint.DEFAULT_MODEL, backend="torch"), SHIPPED[1]: bench.stream_benchmark(export, backend="onnx")}}
    card.write_text(replace_section(text, "Latency", [
        *latency_section(latency),
        f"This section and the `{SHIPPED[1]}` rows above were measured again on {time.strftime('%Y-%m-%d')} by `python -m pipeline.recipe {name} "
        "--refresh-card`, after runtime changes that left the weights as they were (int8 run one window per call, thresholds calibrated through "
        "the int8 file itself).", ""]))


def evaluate_stage(recipe: Recipe, models: dict[str, str], folder: Path) -> dict:
    """Every model and peer on every validation task; keywords in running audio; keyword clips
    spotted; latency of the shipped model and the one it replaces. Plots into `folder`."""
    import warnings

    from edgetag import bench
    from edgetag.runtime import load_backend
    from pipeline.model_card import plot_results
    from train.data import Source
    from train.evaluate import FIGURES, evaluate_teacher, plot_confusion

    e = recipe.evaluation
    tasks = tasks_of(e)
    report: dict = {"models": {}, "tasks": tasks}
    peers = peers_of(recipe)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        for name, path in models.items():
            backend = load_backend(path)
            entry = report["models"][name] = {"path": str(path), "backend": backend.name, "size_bytes": Path(path).stat().st_size}
            entry["classes"] = {head: len(h.labels) for head, h in backend.spec.heads.items()}
            if backend.name == "torch":
                entry["parameters"] = sum(p.numel() for p in backend.model.parameters())
            for task, r in task_results(backend, tasks).items():
                entry[task] = {k: r[k] for k in FIGURES} | {"classes": len(r["labels"])}
                if name == SHIPPED[0]:
                    plot_confusion(r["confusion"], r["labels"], folder / f"confusion_{task}.png", f"{recipe.model_id}: {task}")
        for name, (kind, teacher) in peers.items():
            entry = report["models"][name] = {"peer": True}
            for task, spec in tasks.items():
                if spec["head"] == kind:
                    examples = Source.parse(spec["data"], kind).read()
                    classes = sorted({label for x in Source.parse(spec.get("classes_from", spec["data"]), kind).read() for label in x.labels})
                    r = evaluate_teacher(teacher, examples, classes)
                    entry[task] = {k: r[k] for k in FIGURES} | {"classes": len(r["labels"])}
        for name in (*SHIPPED, *(PREVIOUS if PREVIOUS[0] in models else ())):
            report["models"][name]["spotting"] = held_out_spotting(load_backend(models[name]), e)
        if "running" in e:
            keyword_models = {n: p for n, p in models.items() if n == SHIPPED[0] or n == PREVIOUS[0] or n.startswith("baseline: ")}
            report["running"] = running_stage(recipe, keyword_models, peers, folder)
    latency = {name: models[name] for name in (*SHIPPED, *(PREVIOUS if PREVIOUS[0] in models else ()))}
    if "reference" in e["latency"]:  # the model the latency target names, timed in the same run
        from pipeline.model_card import LATENCY_REFERENCE

        latency[LATENCY_REFERENCE] = e["latency"]["reference"]
    report["latency"] = {name: bench.stream_benchmark(path, **{k: v for k, v in e["latency"].items() if k != "reference"}) for name, path in latency.items()}
    plot_results(report, folder / "models.png")
    return report


def install(calibrated: Path, export_dir: Path, card: Path, assets: Path = ASSETS) -> list[Path]:
    """Copy the shipped model into `assets` (edgetag/assets: the checkpoint, its export, the card)."""
    target = assets / checkpoint.DEFAULT_EXPORT.name
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    copies = [shutil.copy2(calibrated, assets / checkpoint.DEFAULT_MODEL.name), shutil.copy2(card, assets / "MODEL_CARD.md")]
    for old in assets.glob("*.png"):
        old.unlink()
    copies += [shutil.copy2(card.parent / name, assets / name) for name in re.findall(r"\]\(([\w.-]+\.png)\)", card.read_text())]
    copies += [shutil.copy2(p, target / p.name) for p in sorted(export_dir.iterdir()) if p.is_file() and p.name != "stage.json"]
    total = sum(Path(p).stat().st_size for p in copies)
    if total > BUNDLE_LIMIT:
        raise ValueError(f"the bundle is {total / 2**20:.1f} MiB, over the {BUNDLE_LIMIT / 2**20:.0f} MiB limit")
    return [Path(p) for p in copies]


def stages_of(recipe: Recipe) -> list[str]:
    first = [name for name in ("init", "mine", "pretrain", "teacher") if getattr(recipe, name) is not None]
    return [*first, "student", *recipe.baselines, *(["refit"] if recipe.refit else []), "calibrate", "export", "evaluate", "card"]


def out_of(c: FinetuneConfig | DistillConfig) -> Path:
    return Path(c.student.out if isinstance(c, DistillConfig) else c.out)


def baseline_stage(c: FinetuneConfig | DistillConfig) -> dict:
    return distill_stage(c) if isinstance(c, DistillConfig) else finetune_stage(c)


def run(recipe: Recipe, out: Path, stages: list[str] | None = None, install_to: Path | None = None) -> None:
    """Run `stages` (default: all) in order, each skipped when already done; then install into `install_to`."""
    stages = stages_of(recipe) if stages is None else stages
    unknown = set(stages) - set(stages_of(recipe))
    if unknown:
        raise ValueError(f"unknown stage(s) {', '.join(sorted(unknown))}; stages: {', '.join(stages_of(recipe))}")
    student = out_of(recipe.student)
    student_ckpt, calibrated, export_dir = student / "best.safetensors", out / "calibrate" / "model.safetensors", out / "export"
    teacher = (Path(recipe.teacher.out),) if recipe.teacher else ()
    init = (Path(recipe.init["out"]),) if recipe.init else ()
    mined = (Path(recipe.mine["out"]),) if recipe.mine else ()
    refitted = (Path(recipe.refit.out),) if recipe.refit else ()
    uncalibrated = refitted[0] / "model.safetensors" if refitted else student_ckpt  # what the calibrate stage takes
    models = models_of(recipe, out)
    baselines = tuple(out_of(c) for c in recipe.baselines.values())
    steps = {
        "init": lambda: run_stage(init[0], recipe.init, lambda: init_stage(recipe.init)),
        "mine": lambda: run_stage(mined[0], recipe.mine, lambda: mine_stage(recipe.mine)),
        "pretrain": lambda: run_stage(Path(recipe.pretrain.out), recipe.pretrain, lambda: pretrain_stage(recipe.pretrain)),
        "teacher": lambda: run_stage(teacher[0], recipe.teacher, lambda: finetune_stage(recipe.teacher), after=(Path(recipe.pretrain.out),)),
        "student": lambda: run_stage(student, recipe.student, lambda: distill_stage(recipe.student), after=(*init, *mined, *teacher)),
        **{name: (lambda c=c: run_stage(out_of(c), c, lambda: baseline_stage(c))) for name, c in recipe.baselines.items()},
        "refit": lambda: run_stage(refitted[0], recipe.refit, lambda: refit_stage(recipe.refit), after=(student,)),
        "calibrate": lambda: run_stage(calibrated.parent, {"ckpt": str(uncalibrated), "id": recipe.model_id, **recipe.calibrate},
                                       lambda: calibrate_stage(recipe, uncalibrated, calibrated), after=(student, *refitted)),
        "export": lambda: run_stage(export_dir, {"ckpt": str(calibrated), "calibration": recipe.export_calibration, "thresholds": recipe.calibrate},
                                    lambda: export_stage(recipe, calibrated, export_dir), after=(calibrated.parent,)),
        "evaluate": lambda: run_stage(out / "evaluate", {"evaluation": recipe.evaluation, "models": models},
                                      lambda: evaluate_stage(recipe, models, out / "evaluate"), after=(*teacher, export_dir, *baselines)),
        "card": lambda: write_card(recipe, out),
    }
    for name in stages:
        print(f"== {name}")
        steps[name]()
    if install_to is not None:
        for path in install(calibrated, export_dir, out / "MODEL_CARD.md", install_to):
            print(f"installed {path} ({path.stat().st_size / 2**20:.2f} MiB)")


def write_card(recipe: Recipe, out: Path) -> None:
    from pipeline.model_card import render

    report = json.loads((out / "evaluate" / "stage.json").read_text())
    stages = {name: json.loads((Path(folder) / "stage.json").read_text()) for name, folder in stage_folders(recipe, out).items()}
    bundle = [out / "calibrate" / "model.safetensors", *(p for p in (out / "export").iterdir() if p.is_file() and p.name != "stage.json")]
    text = render(recipe, report["result"], stages, checkpoint.read_spec(bundle[0]), sum(p.stat().st_size for p in bundle), teacher_only(recipe))
    (out / "MODEL_CARD.md").write_text(text)
    for plot in (out / "evaluate").glob("*.png"):  # the card shows them beside it
        shutil.copy2(plot, out / plot.name)
    print(f"{out / 'MODEL_CARD.md'}: written")


def teacher_only(recipe: Recipe) -> list[str]:
    """Tag classes no training clip is labelled with (nor with a narrower class): the teacher's word alone."""
    if not recipe.student.audioset:
        return []
    from train.data import Source
    from train.labels import audioset_vocabulary

    labels, parents = audioset_vocabulary(Path(recipe.student.audioset))
    seen = {label for text in recipe.student.student.train if (source := Source.parse(text)).head == TAGS for e in source.read() for label in e.labels}
    todo = list(seen)
    while todo:
        for parent in parents.get(todo.pop(), ()):
            if parent not in seen:
                seen.add(parent)
                todo.append(parent)
    return [label for label in labels if label not in seen]


def stage_folders(recipe: Recipe, out: Path) -> dict[str, str]:
    first = {**({"init": recipe.init["out"]} if recipe.init else {}), **({"mine": recipe.mine["out"]} if recipe.mine else {}),
             **{name: getattr(recipe, name).out for name in ("pretrain", "teacher") if getattr(recipe, name) is not None}}
    return {**first, "student": str(out_of(recipe.student)), **{name: str(out_of(c)) for name, c in recipe.baselines.items()},
            **({"refit": recipe.refit.out} if recipe.refit else {}), "calibrate": str(out / "calibrate"), "export": str(out / "export")}


def main(
    name: str = typer.Argument("default", help=f"The recipe: {', '.join(RECIPES)}."),
    data: str = typer.Option("../shared/data", help="The shared data folder (Speech Commands, ESC-50, DCASE 2016, FSDD, wake words, noise)."),
    out: str = typer.Option("runs/default", help="Where every stage writes its folder."),
    previous: str = typer.Option("", help="The folder of the model the recipe's replaces (model.safetensors, export/), measured beside it (default: runs/default-15 for default; runs/default-14 for default15; runs/default-6 for default14 to default7, which mine it in default10 to default13; runs/default-5 for default6; runs/default-4, runs/default-3, runs/default-2 for default5, default4, default3)."),
    stages: str = typer.Option("", help="Comma-separated stages to run, in order (default: all; see the module's docstring)."),
    install_assets: bool = typer.Option(False, "--install", help="Copy the calibrated model, its export and the card into edgetag/assets."),
    refresh: bool = typer.Option(False, "--refresh-card", help="Train nothing: measure the installed card's int8 rows and latency again (after a runtime change)."),
) -> None:
    if name not in RECIPES:
        raise typer.BadParameter(f"unknown recipe {name!r}; recipes: {', '.join(RECIPES)}")
    if not Path(data).is_dir():
        raise typer.BadParameter(f"{data}: no such folder (the shared data: Speech Commands, ESC-50, ...)")
    chosen = [s.strip() for s in stages.split(",") if s.strip()] or None
    recipe = RECIPES[name](data, out, *([previous] if previous else [])) if name != "default2" else RECIPES[name](data, out)
    if refresh:
        refresh_card(recipe, name)
        print(f"{ASSETS / 'MODEL_CARD.md'}: int8 rows and latency measured again")
        return
    run(recipe, Path(out), chosen, ASSETS if install_assets else None)


if __name__ == "__main__":
    from edgetag.cli import run_guarded

    run_guarded(lambda: typer.run(main), __spec__.name)
