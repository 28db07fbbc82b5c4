"""Augmented views of the training audio, for consistent distillation.

A teacher's soft targets are only right for the audio it heard. So the augmentation happens to
waveforms, before anyone listens: each training window is rendered as several views (view 0
clean; the others moved in time, at another gain, mixed with another clip or with background
noise at a random SNR), and the student and its teachers hear the same views. Teachers label
every view once (the expensive part), and the student then trains on them for as many epochs
as it likes (Beyer et al. 2022, "Knowledge distillation: a good teacher is patient and
consistent", with the views cached as EfficientAT caches its teacher's outputs).

Tag views come from windows of every clip on a hop grid; keyword clips (1 s each) keep the word
inside the window and are only ever mixed with sounds that hold no word, so the word's label
stays true. In running audio a word lands anywhere in the window that hears it, over whatever
sound is there: with `word_placement="anywhere"` a keyword view puts the span holding most of
the clip's energy (`core`) anywhere inside the window, and `word_background_prob` says how often
it is heard over background. A view's hard labels are those of every clip mixed into it.

Background does not change which word was said, but it does change what a keyword teacher
hears: the MLPerf model calls 45% of validation keywords `_unknown_` or `_silence_` at 0 dB over
environmental sound (92.5% right when clean), and a student taught that learns to miss words in
noise. With `teach_clean` the keyword teachers hear each keyword view as it was before its
background went in (moved and scaled alike: `Views.clean`), the student the noisy view: the
teacher-student learning of noise-robust speech recognition (Li et al., Interspeech 2014), where
a teacher on clean speech teaches a student on the same speech with noise added.

Keywords come from a few hundred speakers here (the MLPerf teacher heard 2,600). With `speed`, an
augmented keyword view plays its clip faster or slower (`played`: tempo and pitch together, as a
tape would), the speed perturbation of speech recognition (Ko et al., Interspeech 2015): voices
and speaking rates the data's speakers do not have, the same word. The teachers hear the view
as played, so their targets follow it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import soxr

from edgetag.spec import TAGS
from train.data import Example
from train.options import bounded, choose, setting

PLACEMENTS = ("center", "anywhere")


@dataclass
class ViewsConfig:
    views: int = setting(0, "Views of each window (view 0 is the clean window); 0: train on the clips themselves.")
    clip_hop: float = setting(1.0, "Seconds between the windows taken from a long clip.")
    clip_windows: int = setting(6, "At most this many windows of one clip (the loudest), so long clips do not crowd out short ones.")
    time_jitter: float = setting(0.2, "A view moves its window by up to this many seconds either way.")
    level_db: float = setting(6.0, "A view's gain is uniform in +-this many dB.")
    mix_prob: float = setting(0.4, "Probability that a tag view is mixed with a window of another clip.")
    mix_snr_db: tuple[float, float] = setting((-5.0, 10.0), "The clip's level over the clip mixed in, uniform in this range (dB).")
    background_prob: float = setting(0.6, "Probability of background sound in a tag view (--backgrounds).")
    background_snr_db: tuple[float, float] = setting((0.0, 20.0), "Signal over background, uniform in this range (dB).")
    word_placement: str = setting("center", "Where a keyword view puts its word: center (moved by --time-jitter), or anywhere (its --word-core lands anywhere in the window).")
    word_core: float = setting(0.95, "Share of a keyword clip's energy that --word-placement anywhere keeps inside the window.")
    word_background_prob: float = setting(0.6, "Probability of background sound in a keyword view (--backgrounds keywords=...).")
    teach_clean: bool = setting(False, "Keyword teachers hear each keyword view before its background was mixed in (the student hears it with the background).")
    speed: float = setting(0.0, "An augmented keyword view plays its clip at a speed uniform in 1 +- this (tempo and pitch together); 0: as recorded.")
    views_seed: int = setting(0, "Seed of the views.")

    def __post_init__(self):
        choose("--word-placement", self.word_placement, PLACEMENTS)
        bounded(self, ("word_core", 0 < self.word_core <= 1, "in (0, 1]"), ("background_prob", 0 <= self.background_prob <= 1, "in [0, 1]"),
                ("word_background_prob", 0 <= self.word_background_prob <= 1, "in [0, 1]"),
                ("speed", 0 <= self.speed < 0.5, "in [0, 0.5)"))


def power(x: np.ndarray) -> float:
    return float(np.mean(np.square(x), dtype=np.float64)) + 1e-12


def mix(x: np.ndarray, other: np.ndarray, snr_db: float) -> np.ndarray:
    """x plus `other` scaled to sit snr_db below it (mean power)."""
    return x + other * np.sqrt(power(x) / power(other) / 10 ** (snr_db / 10))


def shifted(x: np.ndarray, start: int, samples: int) -> np.ndarray:
    """x[start : start + samples], silence where that runs outside x (start may be negative)."""
    out = np.zeros(samples, np.float32)
    lo, hi = max(0, start), min(len(x), start + samples)
    if hi > lo:
        out[lo - start : hi - start] = x[lo:hi]
    return out


def played(x: np.ndarray, speed: float) -> np.ndarray:
    """x played `speed` times as fast: len(x) / speed samples, every frequency times `speed`."""
    # read as if recorded at speed x the rate, then resampled back to the rate
    return soxr.resample(x, speed, 1.0).astype(np.float32) if speed != 1 else x


def core(x: np.ndarray, share: float) -> tuple[int, int]:
    """[first, last) sample of the span holding the middle `share` of x's energy (its word, in a keyword clip)."""
    energy = np.cumsum(np.square(x, dtype=np.float64))
    if energy[-1] <= 0:
        return 0, len(x)
    tail = (1 - share) / 2 * energy[-1]
    return int(np.searchsorted(energy, tail, side="right")), int(np.searchsorted(energy, energy[-1] - tail)) + 1


def window_starts(x: np.ndarray, samples: int, hop: int, keep: int) -> list[int]:
    """Starts of the `keep` loudest windows on the hop grid (a clip shorter than one window: 0)."""
    starts = list(range(0, max(1, len(x) - samples + 1), hop))
    if len(starts) > keep:
        level = [power(x[s : s + samples]) for s in starts]
        starts = sorted(np.argsort(level)[::-1][:keep].tolist())
        starts = [s * hop for s in starts]
    return starts


@dataclass
class Views:
    """Rendered views: waveforms [n, samples] and the labels of what each holds."""

    audio: np.ndarray
    labels: list[tuple[str, ...]]
    source: list[int]  # the example each view was made from
    clean: np.ndarray | None = None  # keyword views as they were before background was mixed in (ViewsConfig.teach_clean)


def render(kind: str, examples: list[Example], clips: list[np.ndarray | None], backgrounds: list[np.ndarray],
           c: ViewsConfig, samples: int, rate: int) -> Views:
    """Every view of every window of `examples` (a head of `kind`); `backgrounds` are the sounds
    mixed in as noise (for keywords: audio that holds no word)."""
    rng = np.random.default_rng(c.views_seed)
    shift, hop = round(c.time_jitter * rate), round(c.clip_hop * rate)
    kept = [(i, x) for i, x in enumerate(clips) if x is not None and len(x)]
    background_prob = c.background_prob if kind == TAGS else c.word_background_prob
    anywhere = kind != TAGS and c.word_placement == "anywhere"
    keep_clean = kind != TAGS and c.teach_clean
    out, labels, source, clean = [], [], [], []
    for i, x in kept:
        starts = window_starts(x, samples, hop, c.clip_windows) if kind == TAGS else [(len(x) - samples) // 2]
        recorded = core(x, c.word_core) if anywhere else (0, 0)
        for start in starts:
            for v in range(c.views):
                labelled = set(examples[i].labels)
                if v == 0:
                    view = before = shifted(x, start, samples)
                else:
                    clip = played(x, rng.uniform(1 - c.speed, 1 + c.speed)) if kind != TAGS and c.speed else x
                    centre = start + (len(clip) - len(x)) // 2  # a keyword clip's one window, centred on the clip as played
                    first, last = core(clip, c.word_core) if anywhere and clip is not x else recorded
                    # where the view's window may start: with the word's core inside it (a core
                    # longer than the window: inside the core), or within the jitter of the clean window
                    lo, hi = sorted((last - samples, first)) if anywhere else (centre - shift, centre + shift)
                    view = before = shifted(clip, int(rng.integers(lo, hi + 1)), samples)
                    if kind == TAGS and rng.random() < c.mix_prob and len(kept) > 1:
                        j, other = kept[int(rng.integers(len(kept)))]
                        if j != i:
                            view = mix(view, shifted(other, int(rng.integers(0, max(1, len(other) - samples + 1))), samples), rng.uniform(*c.mix_snr_db))
                            labelled |= set(examples[j].labels)
                    if backgrounds and rng.random() < background_prob:
                        noise = backgrounds[int(rng.integers(len(backgrounds)))]
                        view = mix(view, shifted(noise, int(rng.integers(0, max(1, len(noise) - samples + 1))), samples), rng.uniform(*c.background_snr_db))
                    gain = 10 ** (rng.uniform(-c.level_db, c.level_db) / 20)
                    view, before = view * gain, before * gain
                out.append(unclipped(view))  # a mix never clips
                if keep_clean:
                    clean.append(unclipped(before))
                labels.append(tuple(sorted(labelled)))
                source.append(i)
    return Views(stacked(out, samples), labels, source, stacked(clean, samples) if keep_clean else None)


def stacked(views: list[np.ndarray], samples: int) -> np.ndarray:
    """[n, samples] float32, also when there are none."""
    return np.stack(views).astype(np.float32) if views else np.zeros((0, samples), np.float32)


def unclipped(x: np.ndarray) -> np.ndarray:
    """x scaled down to a peak of 1 if it goes over."""
    peak = np.abs(x).max()
    return x / peak if peak > 1 else x
