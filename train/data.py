"""Audio sources for training: manifests, folder trees and the layouts of ../shared/data.

Pretraining needs only paths (`find_audio`, `CropDataset`). Fine-tuning reads labelled
`Example`s from a `Source` (a source spec parsed once), splits them by speaker or source
recording, and computes each clip's fbank once (`load_features`): augmentation then works on
log-mel features, which keeps a CPU epoch cheap.
"""

from __future__ import annotations

import csv
import hashlib
import inspect
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from edgetag import audio
from edgetag.audio import AUDIO_SUFFIXES
from edgetag.features import FbankConfig, fbank, normalize
from edgetag.spec import HEAD_KINDS, KEYWORDS, NOT_SPOTTED, SILENCE, TAGS
from train.labels import audioset_display_names, keyword_label, tag_name


def read_manifest(path: Path) -> list[dict]:
    """Rows of a CSV (with a header) or JSONL manifest; `path` entries relative to the manifest."""
    path = Path(path)
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    if rows and "path" not in rows[0]:
        raise ValueError(f"{path}: manifest has no 'path' column")
    for row in rows:
        row["path"] = str(path.parent / row["path"])  # an absolute path stays as it is
    return rows


def find_audio(sources) -> list[Path]:
    """Audio files from manifests (.csv/.jsonl) and folders (searched recursively), sorted."""
    files: set[Path] = set()
    for source in map(Path, sources):
        if source.is_dir():
            files.update(p for p in source.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
        elif source.suffix in (".csv", ".jsonl"):
            files.update(Path(row["path"]) for row in read_manifest(source))
        elif source.suffix.lower() in AUDIO_SUFFIXES:
            files.add(source)
        else:
            raise ValueError(f"{source}: neither a folder, a manifest (.csv/.jsonl) nor an audio file")
    return sorted(files)


class CropDataset(torch.utils.data.Dataset):
    """Normalised fbank crops of `frames` frames at a random offset (zero-padded when shorter).

    An unreadable file yields None with one warning; `collate` drops it and counts it.
    """

    def __init__(self, files: list[Path], config: FbankConfig, frames: int, seed: int = 0):
        self.files, self.config, self.frames, self.seed = files, config, frames, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        try:
            waveform = audio.load(self.files[index], self.config.sample_rate)
        except audio.AudioError as e:
            warnings.warn(f"skipping {e}", stacklevel=1)
            return None
        feats = torch.from_numpy(normalize(fbank(waveform, self.config), self.config))
        rng = np.random.default_rng((self.seed, self.epoch, index))
        extra = feats.shape[0] - self.frames
        if extra > 0:
            start = int(rng.integers(0, extra + 1))
            return feats[start : start + self.frames]
        return torch.nn.functional.pad(feats, (0, 0, 0, -extra))


def collate(items) -> tuple[torch.Tensor, int]:
    """Stack the readable crops; also return how many items were skipped."""
    good = [x for x in items if x is not None]
    batch = torch.stack(good) if good else torch.zeros(0)
    return batch, len(items) - len(good)


# ---------------------------------------------------------------------------------------------
# Labelled examples


@dataclass(frozen=True)
class Example:
    path: str
    labels: tuple[str, ...]
    start: float | None = None  # seconds into the file
    end: float | None = None
    group: str = ""  # speaker or source recording: a split never separates a group
    split: str = ""  # the dataset's own split (train / validation / test), when it has one


def _labels(row: dict) -> tuple[str, ...]:
    if row.get("labels"):
        return tuple(x.strip() for x in row["labels"].split(";") if x.strip())
    if row.get("label"):
        return (row["label"].strip(),)
    raise ValueError(f"{row['path']}: manifest row has neither 'label' nor 'labels'")


def _seconds(value) -> float | None:
    return None if value in (None, "") else float(value)


def read_labelled_manifest(path: Path) -> list[Example]:
    """CSV/JSONL with `path`, `label` or `labels` (';'-separated), optional `start`/`end`
    seconds, and a `speaker`/`group`/`src_file` column used to keep splits disjoint."""
    return [
        Example(row["path"], _labels(row), _seconds(row.get("start")), _seconds(row.get("end")),
                group=str(row.get("group") or row.get("speaker") or row.get("src_file") or Path(row["path"]).stem),
                split=row.get("split") or "")
        for row in read_manifest(path)
    ]


def read_folders(root: Path) -> list[Example]:
    """A folder per class: root/<label>/**/<clip>."""
    root = Path(root)
    return [Example(str(p), (p.relative_to(root).parts[0],), group=p.stem) for p in find_audio([root]) if p.parent != root]


def read_esc50(root: Path, folds: str = "") -> list[Example]:
    """ESC-50: root/meta/esc50.csv and root/audio/, optionally only some folds ("4", "1;2").
    A group is a source recording (`src_file`, else the clip); the folds keep sources together,
    so train on some folds and validate on another."""
    root = Path(root)
    with open(root / "meta" / "esc50.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    if folds:
        rows = [r for r in rows if r["fold"] in folds.split(";")]
    return [Example(str(root / "audio" / r["filename"]), (r["category"],), group=r.get("src_file") or r["filename"], split=f"fold{r['fold']}") for r in rows]


def read_urbansound8k(root: Path, folds: str = "") -> list[Example]:
    """UrbanSound8K: root/manifest.csv (path,label,fold,...), optionally only some folds ("1;2").
    A group is a freesound recording (the file name's first field): the official folds keep each
    recording in one fold, so train on some folds and validate on another."""
    root = Path(root)
    rows = read_manifest(root / "manifest.csv")
    if folds:
        rows = [r for r in rows if str(r["fold"]) in folds.split(";")]
    return [Example(r["path"], (r["label"],), group=Path(r["path"]).stem.split("-")[0], split=f"fold{r['fold']}") for r in rows]


def read_speech_commands(root: Path) -> list[Example]:
    """Speech Commands as the 12-class task. The original layout (a folder per word, files
    <speaker>_nohash_<n>.wav, validation_list.txt/testing_list.txt) or a manifest.csv with
    path,label,speaker (../shared/data). Without the lists, splits hash the speaker."""
    root = Path(root)
    if (root / "manifest.csv").is_file():
        return [Example(e.path, (keyword_label(e.labels[0]),), group=e.group, split=e.split) for e in read_labelled_manifest(root / "manifest.csv")]
    lists = {}
    for name, split in (("validation_list.txt", "validation"), ("testing_list.txt", "test")):
        if (root / name).is_file():
            lists.update({line.strip(): split for line in (root / name).read_text().splitlines() if line.strip()})
    examples = []
    for p in find_audio([root]):
        word = p.relative_to(root).parts[0]
        if p.parent == root or word == "_background_noise_":
            continue
        relative = p.relative_to(root).as_posix()
        split = lists.get(relative, "train") if lists else ""
        examples.append(Example(str(p), (keyword_label(word),), group=p.stem.split("_nohash_")[0], split=split))
    return examples


def read_audioset(segments: Path, audio_dir: Path | None = None, labels_csv: Path | None = None) -> list[Example]:
    """AudioSet segment CSV (`YTID, start_seconds, end_seconds, positive_labels`, '#' comments)
    with the clips in a local folder (default: audio/ beside the CSV), named by YTID (optionally
    prefixed 'Y' or suffixed with the start time). Labels become display names via
    class_labels_indices.csv (default: beside the CSV). Segments without a local file are
    counted and reported once."""
    segments = Path(segments)
    audio_dir = Path(audio_dir or segments.parent / "audio")
    names = audioset_display_names(labels_csv or segments.parent / "class_labels_indices.csv")
    by_id: dict[str, Path] = {}
    for p in find_audio([audio_dir]):
        by_id.setdefault(p.stem.removeprefix("Y").split("_")[0] if len(p.stem) > 11 else p.stem, p)
    examples, missing = [], 0
    with open(segments, newline="") as f:
        for row in csv.reader(line for line in f if not line.startswith("#")):
            if len(row) < 4:
                continue
            ytid, start, end = row[0].strip(), float(row[1]), float(row[2])
            mids = ",".join(row[3:]).strip().strip('"').split(",")
            path = by_id.get(ytid) or by_id.get(ytid[:11])
            if path is None:
                missing += 1
                continue
            # a file holding only the segment starts at 0; a whole video keeps the CSV's times
            whole = audio.info(path).duration > end - start + 1
            examples.append(Example(str(path), tuple(names.get(m.strip(), m.strip()) for m in mids if m.strip()),
                                    start if whole else None, end if whole else None, group=ytid))
    if missing:
        warnings.warn(f"{segments}: {missing} segment(s) have no audio file in {audio_dir}", stacklevel=2)
    return examples


def read_fsdd(root: Path) -> list[Example]:
    """Free Spoken Digit Dataset: manifest.csv, or recordings/<digit>_<speaker>_<take>.wav."""
    root = Path(root)
    if (root / "manifest.csv").is_file():
        return read_labelled_manifest(root / "manifest.csv")
    return [Example(str(p), (p.stem.split("_")[0],), group=p.stem.split("_")[1]) for p in find_audio([root])]


def read_audio(root: Path) -> list[Example]:
    """Every audio file under a folder (or one file), without labels: noise, audio without keywords."""
    return [Example(str(p), (), group=p.stem) for p in find_audio([root])]


@dataclass(frozen=True)
class Reader:
    read: Callable[..., list[Example]]
    head: str  # the head a source of this reader feeds unless it names one


READERS = {
    "manifest": Reader(read_labelled_manifest, TAGS),
    "folders": Reader(read_folders, TAGS),
    "audio": Reader(read_audio, TAGS),
    "esc50": Reader(read_esc50, TAGS),
    "urbansound8k": Reader(read_urbansound8k, TAGS),
    "speech_commands": Reader(read_speech_commands, KEYWORDS),  # the 12-class keyword task
    "audioset": Reader(read_audioset, TAGS),
    "fsdd": Reader(read_fsdd, TAGS),
}


def detect_reader(path: Path) -> str:
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() in AUDIO_SUFFIXES:
            return "audio"
        head = path.read_text(errors="replace")[:2000]
        return "audioset" if "positive_labels" in head or head.startswith("#") else "manifest"
    if (path / "meta" / "esc50.csv").is_file():
        return "esc50"
    if (path / "validation_list.txt").is_file() or (path / "yes").is_dir():
        return "speech_commands"
    if (path / "manifest.csv").is_file():
        return "manifest"
    return "folders" if any(p.is_dir() for p in path.iterdir()) else "audio"


@dataclass(frozen=True)
class Source:
    """A data source, parsed once from `[HEAD=][READER:]PATH[,key=value...]`.

    HEAD is the head its clips feed (`tags` or `keywords`; default: the reader's, `keywords` for
    Speech Commands' 12-class task, `tags` for the rest). READER is one of READERS, detected from
    the layout at PATH when left out. The options: the reader's own (esc50: `folds=4`; audioset:
    `audio=`, `labels_csv=`); `split=train|val` (with `percent=`, default 10) keeps one side of
    `split_examples`, so one source gives a head both its training and validation data;
    `groups=LO-HI` keeps the groups whose hash falls in [LO, HI) percent (the hash of `split`:
    `split=val,percent=50` is `groups=0-50`, so a third part can sit beside the two sides);
    `label=NAME` gives every clip that one label (ESC-50 sounds as a keyword head's `_silence_`).
    Tag heads name classes by AudioSet display names where they map (`tag_name`)."""

    path: Path
    reader: str
    head: str
    options: tuple[tuple[str, str], ...] = ()  # the reader's keyword arguments
    split: str | None = None
    percent: float = 10.0
    groups: tuple[float, float] | None = None
    label: str | None = None

    @classmethod
    def parse(cls, text: str, head: str | None = None) -> Source:
        """`head` is the head the caller reads the source for; a HEAD= in the text must agree."""
        named, sep, rest = text.partition("=")
        if sep and named in HEAD_KINDS:
            if head is not None and named != head:
                raise ValueError(f"{text}: a {named} source where a {head} source is needed")
            head, text = named, rest
        reader, sep, rest = text.partition(":")
        if not (sep and reader in READERS):
            reader, rest = "", text
        path, *pairs = rest.split(",")
        if any("=" not in pair for pair in pairs):
            raise ValueError(f"{text}: options are key=value, separated by commas")
        options = dict(pair.split("=", 1) for pair in pairs)
        split, percent, label = options.pop("split", None), options.pop("percent", "10"), options.pop("label", None)
        if split not in (None, "train", "val"):
            raise ValueError(f"{text}: split must be train or val, not {split!r}")
        try:
            percent = float(percent)
        except ValueError:
            raise ValueError(f"{text}: percent must be a number, not {percent!r}") from None
        groups = options.pop("groups", None)
        if groups is not None:
            try:
                lo, hi = map(float, groups.split("-"))
            except ValueError:
                raise ValueError(f"{text}: groups must be LO-HI percent, e.g. groups=50-60, not {groups!r}") from None
            groups = (lo, hi)
        if not Path(path).exists():
            raise FileNotFoundError(f"{path}: no such file or folder")
        reader = reader or detect_reader(Path(path))
        accepted = list(inspect.signature(READERS[reader].read).parameters)[1:]
        if set(options) - set(accepted):
            raise ValueError(f"{text}: the {reader} reader takes no option {', '.join(sorted(set(options) - set(accepted)))} "
                             f"(it takes: {', '.join(accepted + ['split', 'percent', 'groups', 'label'])})")
        return cls(Path(path), reader, head or READERS[reader].head, tuple(sorted(options.items())), split, percent, groups, label)

    def read(self) -> list[Example]:
        path = self.path / "manifest.csv" if self.path.is_dir() and self.reader == "manifest" else self.path
        examples = READERS[self.reader].read(path, **dict(self.options))
        if self.split is not None:
            examples = split_examples(examples, self.percent)[self.split == "val"]
        if self.groups is not None:
            lo, hi = self.groups
            examples = [e for e in examples if lo <= group_percentile(e.group) < hi]
        if self.label is not None:
            examples = [replace(e, labels=(self.label,)) for e in examples]
        if self.head == TAGS:
            examples = [replace(e, labels=tuple(map(tag_name, e.labels))) for e in examples]
        return examples


def group_percentile(group: str) -> float:
    """Where a group falls in [0, 100): stable across runs and machines, the group's SHA-1 decides
    (as Speech Commands does)."""
    return int(hashlib.sha1(group.encode()).hexdigest(), 16) % 10000 / 100


def in_validation(group: str, percent: float) -> bool:
    return group_percentile(group) < percent


def split_examples(examples: list[Example], percent: float = 10.0) -> tuple[list[Example], list[Example]]:
    """(train, validation): the dataset's own split when it has one, else by hashing the group."""
    if any(e.split in ("train", "validation") for e in examples):
        return [e for e in examples if e.split == "train"], [e for e in examples if e.split == "validation"]
    val = [in_validation(e.group, percent) for e in examples]
    return [e for e, v in zip(examples, val) if not v], [e for e, v in zip(examples, val) if v]


def labels_of(examples: list[Example]) -> list[str]:
    """Sorted class names; the keyword task's _unknown_ and _silence_ come last."""
    labels = {label for e in examples for label in e.labels}
    return sorted(labels, key=lambda x: (x in NOT_SPOTTED, x == SILENCE, x))


def load_clips(examples: list[Example], rate: int, description: str = "audio") -> list[np.ndarray | None]:
    """Each example's waveform at `rate` (its start/end honoured); None, with one warning, for a
    file that cannot be read."""
    from rich.progress import track

    out = []
    for e in track(examples, description=description, transient=True):
        try:
            waveform = audio.load(e.path, rate)
        except audio.AudioError as error:
            warnings.warn(f"skipping {error}", stacklevel=3)
            out.append(None)
            continue
        start = round((e.start or 0.0) * rate)
        out.append(waveform[start : len(waveform) if e.end is None else round(e.end * rate)])
    return out


def load_features(examples: list[Example], config: FbankConfig, description: str = "fbank") -> list[torch.Tensor | None]:
    """Each example's log-mel fbank [T, n_mels] (not normalised), computed once; None, with one
    warning, for a file that cannot be read (or shorter than one frame)."""
    return [torch.from_numpy(fbank(x, config)) if x is not None and len(x) >= config.frame_length else None
            for x in load_clips(examples, config.sample_rate, description)]
