"""Refit the keyword head on running audio, the encoder frozen or its top layers with it.

    python -m train.refit --model runs/d14/student/best.safetensors --out runs/d14/refit --hop 0.1 \\
        --keywords ../shared/data/speech_commands,split=train,percent=20 \\
        --others ../shared/data/arabic_speech_commands,groups=0-40 \\
        --backgrounds esc50:../shared/data/esc50_other_folds \\
        --clips keywords=../shared/data/speech_commands,split=train,percent=20

A keyword head learns from 1 s clips with the word near the window's centre; in running audio it
answers every hop, the word anywhere in the window, over whatever sound is there, between other
words. Decoupling the classifier from the representation (Kang et al., ICLR 2020) lets the head
learn again on the audio it answers, at the cost of the head alone: scenes are composed from
training speakers and sources as `train.running` composes its benchmarks, the frozen encoder
embeds every hop once, and each hop is labelled by where the words' cores lie (`hop_labels`).
Each batch is half those hops and half the head's own training clips, whose targets are the head's
answers before the refit beside their labels (learning without forgetting, Li & Hoiem 2017): what
the teachers taught it on clean words stays. Every weight but the keyword head's stays as it was.

With --layers N the encoder's top N layers learn too, after the head (LP-FT, Kumar et al., ICLR
2022: a head that already fits lets the layers move less): what enters them is computed once per
hop (the trunk below stays as it was), the head is fitted alone on their embeddings, then layers
and heads learn together, the heads they also feed (tags) held on every hop and clip to their
answers before the refit (their divergence joins the loss), so what the keywords gain costs the
tags as little as it can. A head alone cannot separate what the frozen embedding has merged.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import typer

from edgetag import checkpoint
from edgetag.features import fbank, normalize, windows
from edgetag.model import AudioTransformer, for_inference
from edgetag.spec import KEYWORDS, SILENCE, UNKNOWN, ModelSpec
from edgetag.stream import StreamingFbank
from train.data import Source, load_clips
from train.options import bounded, command, setting
from train.running import Scene, scene_of
from train.views import shifted

IGNORED = -1  # a hop no label is true of


@dataclass
class RefitConfig:
    model: str = setting("", "The model whose keyword head is refitted (a checkpoint).", required=True)
    out: str = setting("", "Folder for model.safetensors, the model with its new keyword head.", required=True)
    keywords: list[str] = setting([], "Keyword clips of training speakers placed in the scenes (sources, train.data.Source); repeatable.", required=True)
    others: list[str] = setting([], "Speech without keywords placed in the scenes (sources); repeatable.")
    backgrounds: list[str] = setting([], "Background sound of the scenes (sources); repeatable.", required=True)
    clips: list[str] = setting([], "The keyword head's own training clips (sources), kept at its answers before the refit; repeatable.")
    scenes: int = setting(2, "Scenes composed (seeds --seed, --seed + 1, ...): every keyword clip is placed once in each.")
    seed: int = setting(0, "Seed of the first scene and of the fit.")
    snr_db: tuple[float, float] = setting((0.0, 15.0), "Each word's level over the background where it lands, uniform in this range (dB).")
    core: float = setting(0.9, "Share of a word clip's energy that makes its core (the span a hop must hold to hear the word).")
    hop: float = setting(0.0, "Seconds between the scenes' windows: the hop the model will listen at (0: its own).")
    epochs: int = setting(10, "Passes over the scenes' labelled hops.")
    lr: float = setting(1e-3, "Peak learning rate (one cycle).")
    batch_size: int = setting(256, "Hops plus clips per step, half each.")
    alpha: float = setting(0.7, "Weight of the head's answers before the refit in the clips' targets (the rest: their labels).")
    temperature: float = setting(2.0, "Temperature of those answers.")
    layers: int = setting(0, "Encoder layers refitted after the keyword head, counted from the top (0: the head alone); the other heads are held to their answers before.")
    layer_epochs: int = setting(2, "Passes over the hops with --layers, after --epochs of the head alone.")
    layer_lr: float = setting(3e-4, "Peak learning rate of those passes.")
    hold: float = setting(0.1, "Weight, in those passes, of the other heads' divergence from their answers before (summed over classes).")

    def __post_init__(self):
        bounded(self, ("scenes", self.scenes >= 1, "a number of scenes (1 or more)"), ("core", 0 < self.core <= 1, "in (0, 1]"),
                ("hop", self.hop >= 0, "a number of seconds >= 0"), ("epochs", self.epochs >= 1, "a number of epochs (1 or more)"),
                ("lr", self.lr > 0, "a positive learning rate"), ("batch_size", self.batch_size >= 2, "a batch of 2 or more"),
                ("alpha", 0 <= self.alpha <= 1, "in [0, 1]"), ("temperature", self.temperature > 0, "a positive temperature"),
                ("layers", self.layers >= 0, "a number of layers (0 or more)"),
                ("layer_epochs", self.layer_epochs >= 1, "a number of epochs (1 or more)"), ("layer_lr", self.layer_lr > 0, "a positive learning rate"),
                ("hold", self.hold >= 0, "a weight (0 or more)"))
        if not self.snr_db[0] <= self.snr_db[1]:
            raise ValueError(f"--snr-db: {self.snr_db[0]:g} {self.snr_db[1]:g} is not a range (low <= high)")
        if self.seed < 0:
            raise ValueError(f"--seed: {self.seed} is not a seed (0 or more)")


def hop_labels(scene: Scene, spec: ModelSpec, labels: list[str], hops: int) -> np.ndarray:
    """Per hop (window k * hop seconds on), the index in `labels` of what its window holds: the
    keyword whose core it holds whole; IGNORED where it holds part of a keyword's core (it may or
    may not hear the word); `_unknown_` where it holds at least half of another word's core,
    IGNORED where less; else `_silence_`."""
    starts = np.arange(hops) * spec.hop_seconds
    ends = starts + spec.window_seconds
    other, keyword_part, keyword = np.zeros(hops), np.zeros(hops, bool), np.full(hops, -1)
    for w in scene.words:
        a, b = w.core or (w.start, w.end)
        held = np.clip(np.minimum(ends, b) - np.maximum(starts, a), 0, None) / (b - a)  # share of the core in each window
        if w.label:
            keyword[held >= 1] = labels.index(w.label)
            keyword_part |= (held > 0) & (held < 1)
        else:
            other = np.maximum(other, held)
    out = np.full(hops, labels.index(SILENCE))
    out[other > 0] = IGNORED
    out[other >= 0.5] = labels.index(UNKNOWN)
    out[keyword_part] = IGNORED
    return np.where(keyword >= 0, keyword, out)


@torch.inference_mode()
def embed(runner: AudioTransformer, spec: ModelSpec, x: np.ndarray, batch_size: int = 256, stop: int | None = None) -> torch.Tensor:
    """Raw log-mel windows [n, frames, n_mels] -> the encoder's pooled embeddings [n, width], or
    what enters its layer `stop` [n, ...] in float16 (a scene's hops of it fill gigabytes)."""
    def one(features: torch.Tensor) -> torch.Tensor:
        return runner.embedding(features).float() if stop is None else runner.encoder.forward_trunk(features, stop).half()

    return torch.cat([one(torch.from_numpy(normalize(x[i : i + batch_size], spec.fbank))) for i in range(0, max(len(x), 1), batch_size)])


def hop_embeddings(runner: AudioTransformer, spec: ModelSpec, scene: Scene, block_seconds: float = 60.0, stop: int | None = None) -> torch.Tensor:
    """The embedding (or what enters layer `stop`, as `embed`) of every full window the streaming
    engine runs over `scene` [hops, ...], its fbank computed a block at a time (a whole scene's
    at once needs gigabytes)."""
    from rich.progress import track

    stream, block = StreamingFbank(spec.fbank), round(block_seconds * scene.rate)
    frames = np.zeros((0, spec.fbank.n_features), np.float32)
    out, hop, window = [], spec.hop_frames, spec.window_frames
    for i in track(range(0, len(scene.audio), block), description=f"embedding {scene.seconds / 3600:.1f} h of hops", transient=True):
        frames = np.concatenate([frames, stream.push(scene.audio[i : i + block])])
        ready = max(0, (len(frames) - window) // hop + 1)
        if ready:
            out.append(embed(runner, spec, windows(frames[: (ready - 1) * hop + window], window, hop), stop=stop))  # whole windows only: no padded tail
            frames = frames[ready * hop :]
    return torch.cat(out) if out else embed(runner, spec, np.zeros((0, window, spec.fbank.n_features), np.float32), stop=stop)


def centred_embeddings(runner: AudioTransformer, spec: ModelSpec, clips: list[np.ndarray | None], stop: int | None = None) -> torch.Tensor:
    """Each clip's centred window, embedded (as `embed`; as the keyword views hold their word)."""
    n = spec.window_samples
    centred = [fbank(shifted(x, (len(x) - n) // 2, n), spec.fbank) for x in clips]
    return embed(runner, spec, np.stack(centred) if centred else np.zeros((0, spec.window_frames, spec.fbank.n_features), np.float32), stop=stop)


def answers(model: AudioTransformer, names: list[str], x: torch.Tensor, stop: int | None) -> dict[str, torch.Tensor]:
    """Logits of the heads `names` from the embeddings `x`, or from what enters layer `stop`."""
    pooled = x if stop is None else model.pool(model.encoder.forward_from(x.float(), stop))
    return {name: model.heads[name](pooled) for name in names}


@torch.no_grad()
def pooled_from(model: AudioTransformer, x: torch.Tensor, stop: int, batch_size: int = 1024) -> torch.Tensor:
    """The embeddings [n, width] of what enters layer `stop` [n, ...]."""
    return torch.cat([model.pool(model.encoder.forward_from(x[i : i + batch_size].float(), stop)) for i in range(0, max(len(x), 1), batch_size)])


def drift(z: dict[str, torch.Tensor], before: dict[str, torch.Tensor]) -> torch.Tensor:
    """How far tag heads' answers moved: KL(before || now) of each class's sigmoid, summed over
    classes and heads, averaged over the batch."""
    total = torch.zeros(())
    for name, b in before.items():
        p = b.sigmoid()
        total = total + (F.binary_cross_entropy_with_logits(z[name], p, reduction="none") - F.binary_cross_entropy_with_logits(b, p, reduction="none")).sum(-1).mean()
    return total


def fit(model: AudioTransformer, head_name: str, hops: torch.Tensor, hop_y: torch.Tensor, clips: torch.Tensor, clip_y: torch.Tensor, c: RefitConfig,
        stop: int | None = None, embedded: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[float]:
    """Train the keyword head in place (and at `stop`, the layers from `stop` on and every head,
    the others held to their answers before by `drift` at weight --hold): each step half labelled hops
    (cross-entropy), half clips (their labels and, by alpha, the keyword head's answers before the
    refit at the temperature); returns the mean loss of every epoch. At `stop`, `embedded` holds
    the hops' and clips' embeddings as the layers stand (`pooled_from`), whose answers are the
    heads' before. The model stays in eval mode: batch norms keep their statistics."""
    g = torch.Generator().manual_seed(c.seed)
    T, half = c.temperature, c.batch_size // 2
    names = [head_name] if stop is None else list(model.heads)
    others = [n for n in names if n != head_name]
    hop_e, clip_e = (hops, clips) if stop is None else embedded
    with torch.no_grad():  # the answers before, of the heads the refit can move
        clip_before = answers(model, names, clip_e, None) if len(clips) else None
        hop_before = answers(model, others, hop_e, None)
    kept = (clip_before[head_name] / T).softmax(-1) if clip_before else None
    # Parameters below `stop` get no gradient (their output was computed before), so they never move
    params = list(model.heads[head_name].parameters()) if stop is None else [*model.encoder.parameters(), *model.heads.parameters()]
    steps = math.ceil(len(hops) / half)
    opt = torch.optim.AdamW(params, lr=c.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, c.lr, total_steps=c.epochs * steps, pct_start=0.1)
    losses = []
    for epoch in range(c.epochs):
        order, total = torch.randperm(len(hops), generator=g), 0.0
        for i in range(steps):
            b = order[i * half : (i + 1) * half]
            z = answers(model, names, hops[b], stop)
            loss = F.cross_entropy(z[head_name], hop_y[b]) + c.hold * drift(z, {n: v[b] for n, v in hop_before.items()})
            if kept is not None:
                d = torch.randint(len(clips), (half,), generator=g)
                z = answers(model, names, clips[d], stop)
                lwf = F.kl_div((z[head_name] / T).log_softmax(-1), kept[d], reduction="batchmean") * T**2
                loss = loss + (1 - c.alpha) * F.cross_entropy(z[head_name], clip_y[d]) + c.alpha * lwf + c.hold * drift(z, {n: clip_before[n][d] for n in others})
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
            total += loss.item()
        losses.append(total / steps)
        print(f"epoch {epoch + 1}/{c.epochs}: loss {losses[-1]:.4f}", flush=True)
    return losses


def refit(c: RefitConfig) -> dict:
    """The model at `c.model` with its keyword head (and top --layers) refitted on hops of running audio, written to
    OUT/model.safetensors; returns what it was fitted on and how it went."""
    start = time.perf_counter()
    model = checkpoint.load_model(c.model).eval()
    spec = model.spec.with_stream(hop=c.hop or None)
    head_name = spec.head_of(KEYWORDS)
    if c.layers and spec.tasks:
        raise ValueError(f"--layers: {c.model} holds tasks ({', '.join(spec.tasks)}), which read the layers a refit would change; refit the head alone (--layers 0)")
    if c.layers > model.encoder.split_layers:
        raise ValueError(f"--layers: {c.layers} is more than the {spec.encoder.encoder} encoder's {model.encoder.split_layers} layers a refit can reach")
    stop = model.encoder.split_layers - c.layers if c.layers else None
    labels = list(spec.heads[head_name].labels)
    runner = for_inference(model)
    hops, hop_y, scenes = [], [], []
    for s in range(c.scenes):
        scene = scene_of(c.keywords, c.others, c.backgrounds, seed=c.seed + s, snr_db=tuple(c.snr_db), core=c.core)
        e = hop_embeddings(runner, spec, scene, stop=stop)
        y = hop_labels(scene, spec, labels, len(e))
        hops.append(e[y != IGNORED])
        hop_y.append(torch.from_numpy(y[y != IGNORED]))
        scenes.append({"hours": scene.seconds / 3600, "keywords": len(scene.keywords), "other_words": len(scene.words) - len(scene.keywords),
                       "hops": len(y), "ignored": int((y == IGNORED).sum())})
        print(f"scene {s + 1}/{c.scenes}: {scenes[-1]['hours']:.2f} h, {scenes[-1]['keywords']} keywords, {scenes[-1]['other_words']} other words, "
              f"{len(y)} hops ({scenes[-1]['ignored']} left out)", flush=True)
    hops, hop_y = torch.cat(hops), torch.cat(hop_y)
    if not len(hops):
        raise ValueError("the scenes hold no hop to learn from: no readable keyword or background in --keywords, --backgrounds")
    examples = [e for text in c.clips for e in Source.parse(text, KEYWORDS).read()]
    read = [(e, x) for e, x in zip(examples, load_clips(examples, spec.fbank.sample_rate)) if x is not None and len(x) and e.labels and e.labels[0] in labels]
    clips = centred_embeddings(runner, spec, [x for _, x in read], stop=stop)
    clip_y = torch.tensor([labels.index(e.labels[0]) for e, _ in read], dtype=torch.long)
    del runner  # a mobilenet's runner is a copy
    if stop is None:
        losses = fit(model, head_name, hops, hop_y, clips, clip_y, c)
    else:
        hop_e, clip_e = pooled_from(model, hops, stop), pooled_from(model, clips, stop)
        losses = fit(model, head_name, hop_e, hop_y, clip_e, clip_y, c)  # the layers have not moved: the same embeddings give the heads' answers before
        losses += fit(model, head_name, hops, hop_y, clips, clip_y, replace(c, epochs=c.layer_epochs, lr=c.layer_lr), stop, embedded=(hop_e, clip_e))
    model.spec = replace(model.spec, provenance={**model.spec.provenance, "refit": asdict(c)})
    out = Path(c.out) / "model.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.save(out, model)
    counts = torch.bincount(hop_y, minlength=len(labels)).tolist()
    return {"scenes": scenes, "hops": dict(zip(labels, counts)), "clips": len(read), "losses": losses, "seconds": time.perf_counter() - start, "out": str(out)}


def run(c: RefitConfig) -> None:
    """Refit a model's keyword head on hops of running audio built from training sources."""
    found = refit(c)
    print(f"{sum(found['hops'].values())} labelled hops of {len(found['scenes'])} scenes and {found['clips']} clips: loss "
          f"{found['losses'][0]:.4f} -> {found['losses'][-1]:.4f} -> {found['out']}")


main = command(RefitConfig, run)

if __name__ == "__main__":
    from edgetag.cli import run_guarded

    run_guarded(lambda: typer.run(main), __spec__.name)
