"""Third-party teachers, run exactly as their references run them, front ends included.

    ../shared/teachers/efficientat_mn04_as   EfficientAT MobileNetV3 mn04: 527 AudioSet classes
    ../shared/teachers/mlperf_tiny_kws       MLPerf Tiny DS-CNN (TFLite int8): the 12-class keyword task

Each teacher takes 16 kHz mono windows [n, samples] and returns probabilities [n, classes] in
`labels` order, so distillation, evaluation and the peer rows of the model card call them alike.
The weights are other people's (licences beside them) and are loaded from where the user keeps
them, never bundled. The TFLite runtime (`ai-edge-litert`) is a training dependency only.
"""

from __future__ import annotations

import csv
import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from edgetag.features import mel_banks
from edgetag.mobilenet import mobilenet_features
from edgetag.spec import SILENCE, UNKNOWN, divisible

RATE = 16000  # what every teacher here is given; mn04 resamples to its own 32 kHz
TEACHERS = Path(__file__).resolve().parents[1].parent / "shared" / "teachers"


def audioset_classes(csv_path: Path) -> list[tuple[str, str]]:
    """(mid, display name) of the 527 AudioSet classes, in class_labels_indices.csv order."""
    with open(csv_path, newline="") as f:
        return [(row["mid"], row["display_name"]) for row in csv.DictReader(f)]


# ---------------------------------------------------------------------------------------------
# TensorFlow's signal ops, in numpy (the two TFLite teachers were trained on their output)


def tf_stft_magnitude(x: np.ndarray, frame_length: int, frame_step: int, fft_length: int) -> np.ndarray:
    """|tf.signal.stft(x, ..., window_fn=hann_window (periodic), pad_end=False)|: frames start at
    0 and are zero-padded at their end to fft_length. x [..., samples] -> [..., frames, bins]."""
    n = 1 + (x.shape[-1] - frame_length) // frame_step
    if n < 1:
        raise ValueError(f"{x.shape[-1]} samples make no {frame_length}-sample frame")
    index = np.arange(frame_length)[None, :] + frame_step * np.arange(n)[:, None]  # [frames, frame_length]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(frame_length) / frame_length)
    return np.abs(np.fft.rfft(x[..., index] * window, n=fft_length)).astype(np.float32)


@lru_cache(maxsize=8)
def tf_mel_matrix(n_mels: int, n_bins: int, rate: int, low: float, high: float) -> np.ndarray:
    """tf.signal.linear_to_mel_weight_matrix: HTK-mel triangles over the bins above DC, [n_bins, n_mels]."""
    mel = lambda f: 1127.0 * np.log1p(np.asarray(f, np.float64) / 700.0)  # noqa: E731
    bins = mel(np.linspace(0.0, rate / 2, n_bins)[1:])[:, None]  # [n_bins - 1, 1]
    edges = np.linspace(mel(low), mel(high), n_mels + 2)
    left, center, right = edges[:-2], edges[1:-1], edges[2:]
    w = np.maximum(0.0, np.minimum((bins - left) / (center - left), (right - bins) / (right - center)))
    return np.pad(w, ((1, 0), (0, 0))).astype(np.float32)


@lru_cache(maxsize=8)
def tf_mfcc_matrix(n_mels: int) -> np.ndarray:
    """tf.signal.mfccs_from_log_mel_spectrograms: an unnormalised DCT-II (2 sum x cos) scaled by
    rsqrt(2 n_mels), so every coefficient, the first included, carries sqrt(2 / n_mels). [n_mels, n_mels]"""
    n, k = np.arange(n_mels)[:, None], np.arange(n_mels)[None, :]
    return (2 * np.cos(np.pi * k * (2 * n + 1) / (2 * n_mels)) / math.sqrt(2 * n_mels)).astype(np.float32)


class TFLiteModel:
    """One TFLite model, run example by example (the int8 models here take batch 1), quantising
    int8 inputs and outputs with the tensors' own scale and zero point."""

    def __init__(self, path: Path):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError as e:
            raise ImportError("the TFLite teachers need ai-edge-litert: pip install 'edgetag[train]'") from e
        self.interpreter = Interpreter(model_path=str(path), num_threads=1)
        self.interpreter.allocate_tensors()
        self.input, self.output = self.interpreter.get_input_details()[0], self.interpreter.get_output_details()[0]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x [n, *input shape without batch] -> [n, outputs] float."""
        scale, zero = self.input["quantization"]
        out = []
        for example in x:
            if self.input["dtype"] == np.int8:
                example = np.clip(np.round(example / scale + zero), -128, 127)
            self.interpreter.set_tensor(self.input["index"], example[None].astype(self.input["dtype"]))
            self.interpreter.invoke()
            out.append(self.interpreter.get_tensor(self.output["index"])[0])
        y = np.stack(out).astype(np.float32)
        scale, zero = self.output["quantization"]
        return (y - zero) * scale if self.output["dtype"] == np.int8 else y


# ---------------------------------------------------------------------------------------------
# MLPerf Tiny keyword spotting (mlcommons/tiny benchmark/training/keyword_spotting)


class KeywordTeacher:
    """The MLPerf Tiny DS-CNN on 1 s windows: 49 x 10 MFCCs of the window scaled to its largest
    sample. Labels renamed to edgetag's keyword labels."""

    labels = ("down", "go", "left", "no", "off", "on", "right", "stop", "up", "yes", SILENCE, UNKNOWN)
    samples = RATE

    def __init__(self, path: Path = TEACHERS / "mlperf_tiny_kws" / "kws_ref_model.tflite"):
        self.model = TFLiteModel(path)

    @staticmethod
    def features(x: np.ndarray) -> np.ndarray:
        """[n, 16000] -> [n, 49, 10, 1]. The reference divides by the maximum sample (not the
        absolute maximum): a clip whose peak is negative is scaled by its largest positive value."""
        peak = x.max(axis=-1, keepdims=True)
        x = x / np.where(peak > 0, peak, 1.0)
        spectrum = tf_stft_magnitude(x, 480, 320, 512)  # [n, 49, 257]
        log_mel = np.log(spectrum @ tf_mel_matrix(40, 257, RATE, 20.0, 4000.0) + 1e-6)
        return (log_mel @ tf_mfcc_matrix(40))[..., :10, None]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.model(self.features(_fit(x, self.samples)))


# ---------------------------------------------------------------------------------------------
# EfficientAT mn04 (fschmid56/EfficientAT models/mn, AudioSet, mAP 0.432)


class MobileNetAT(nn.Module):
    """EfficientAT's MobileNetV3 with the "mlp" head: [B, 1, 128 mels, T] -> 527 logits."""

    def __init__(self, width: float = 0.4, classes: int = 527):
        super().__init__()
        self.features, channels = mobilenet_features(width)
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(channels, divisible(1280 * width)), nn.Hardswish(), nn.Dropout(0.2),
                                        nn.Linear(divisible(1280 * width), classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class AudioSetTeacher:
    """EfficientAT mn04 on 16 kHz windows upsampled to its 32 kHz: sigmoid scores of the 527
    AudioSet classes (labels: class_labels_indices.csv order)."""

    rate = 32000

    def __init__(self, weights: Path = TEACHERS / "efficientat_mn04_as" / "mn04_as_mAP_432.pt",
                 classes_csv: Path = TEACHERS.parent / "data" / "audioset" / "class_labels_indices.csv", device: str = "cpu"):
        classes = audioset_classes(classes_csv)
        self.mids, self.labels = tuple(m for m, _ in classes), tuple(n for _, n in classes)
        self.model = MobileNetAT(classes=len(classes))
        self.model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        self.model.eval().to(device)
        self.device = device
        self.mel = torch.tensor(mel_banks(128, 1024, self.rate, 0.0, 15000.0).T, device=device)  # [128, 513], Kaldi's triangles and a zero Nyquist column
        self.window = torch.hann_window(800, periodic=False, device=device)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """32 kHz [n, samples] -> [n, 1, 128, frames] (models/preprocess.py AugmentMelSTFT, eval)."""
        x = x[:, 1:] - 0.97 * x[:, :-1]  # pre-emphasis as a valid conv1d: one sample shorter
        spec = torch.stft(x, 1024, hop_length=320, win_length=800, window=self.window, center=True, return_complex=True)
        mel = self.mel @ spec.abs().square()  # [n, 128, frames]
        return ((mel + 1e-5).log() + 4.5)[:, None] / 5

    @torch.inference_mode()
    def __call__(self, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
        import soxr

        up = np.stack([soxr.resample(w, RATE, self.rate) for w in np.asarray(x, np.float32)])
        out = [torch.sigmoid(self.model(self.features(torch.from_numpy(up[i:i + batch_size]).to(self.device)))).cpu() for i in range(0, len(up), batch_size)]
        return torch.cat(out).numpy()


def _fit(x: np.ndarray, samples: int) -> np.ndarray:
    """Windows cut or zero-padded at the end to `samples`, as the references pad short clips."""
    x = np.asarray(x, np.float32)
    if x.ndim == 1:
        x = x[None]
    return x[:, :samples] if x.shape[1] >= samples else np.pad(x, ((0, 0), (0, samples - x.shape[1])))
