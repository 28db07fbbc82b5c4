"""Audio sources for training: manifests, folder trees and the layouts of ../shared/data.

Pretraining needs only paths; labelled readers come with fine-tuning.
"""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import torch

from edgetag import audio
from edgetag.features import FbankConfig, fbank, normalize

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".oga", ".mp3", ".aiff", ".aif"}


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
        feats = normalize(fbank(waveform, self.config), self.config)
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
