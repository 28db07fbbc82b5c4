"""Encoders compared in one run: the transformer and SSAMBA's bidirectional Mamba at equal width
and parameter count (the named sizes); with --attention, full attention and TI-CL's
frequency-time factorised attention (FTA) in the same transformer.

    python -m train.bench_encoders --quick                            # under 5 minutes, no data needed
    python -m train.bench_encoders --data ../shared/data --out runs/encoders
    python -m train.bench_encoders --attention --quick                # FTA against full attention
    python -m train.bench_encoders --attention --data ../shared/data --out runs/fta
    python -m train.bench_encoders --mast --out runs/mast                      # MAST against the transformer

1. Inference: the encoder's blocks on N tokens (N from 100, one second of patches, to 16k and
   beyond), batch 1 and 8: median seconds and peak memory (peak RSS above the process's RSS
   before the pass, a fresh process each; CUDA's max allocated on a GPU). With --attention: the
   whole encoder on one window of 1, 5 and 10 s (--windows; 16x16 patches, 8 frequency rows, and AST's
   overlapping stride-10 patches, 12 rows), batch 1 and 8, full against FTA.
2. Streaming: the engine's per-hop latency at the 1 s window, torch and ONNX Runtime int8.
3. Pretraining: one step (forward, backward, AdamW) of each objective on 10 s crops (not with
   --attention: MAE-AST's encoder sees no whole grid, and FTA has no weights of its own).
4. Unless --quick: each encoder pretrained by each objective (or not at all) at an equal budget,
   then fine-tuned on the keyword and ESC-50 validation splits (`train.study`). With
   --attention: from scratch and from MAE-AST (pretrained with full attention), fine-tuned
   under each attention, patch tokens (a frame model's grid has one row: FTA is full there).

With --mast, MAST (`--mast-size`) against the transformer (`--size`, 16x16 patches) at about
equal parameters: one pass of the whole encoder per window of 1, 5 and 10 s (--windows), batch 1
and 8, with its FLOPs (torch's FlopCounterMode: matrix products, convolutions, attention), the
per-hop latency, one pretraining step of MAE-AST and of SS-MAST on each, and (with --data) each
from scratch, MAE-AST- and SS-MAST-pretrained at an equal budget, fine-tuned on both tasks.

Writes OUT/results.json and OUT/results.md. Last line, transformer / Mamba at batch 1:
`crossover_tokens <n> speedup_at_16k <x>x memory_at_16k <y>x`, n being the fewest measured tokens
from which on the Mamba is faster at every count measured; with --attention, full / FTA at
batch 1 on 16x16 patches: `fta_speedup_1s <x>x fta_speedup_10s <y>x`; with --mast, transformer
/ MAST at batch 1 on 1 s: `mast_speedup_1s <x>x mast_flops_ratio_1s <y>x`.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import typer

from edgetag.spec import TOKEN_ENCODERS
from train.options import command, setting

OBJECTIVES = ("none", "ssast", "mae-ast")  # SSAMBA's objective, and MAE-AST's (visible tokens only)
MAST_OBJECTIVES = ("none", "mae-ast", "ss-mast")  # MAST's own objective, and MAE-AST's
ENCODER_VARIANTS = {encoder: {"encoder": encoder} for encoder in TOKEN_ENCODERS}
ATTENTION_VARIANTS = {"full": {}, "fta": {"attention": "fta"}}
MAST_ENCODERS = ("transformer", "mast")
# 16x16 patches (8 frequency rows of 128 mels), and the stride-10 patches AST and SSAST
# fine-tune with (12 rows, TI-CL's grid)
GRIDS = {"patch": {}, "overlapping": {"stride_freq": 10, "stride_time": 10}}


@dataclass
class BenchConfig:
    quick: bool = setting(False, "Finish in under 5 minutes on a 2-core CPU: mini encoders, batch 8 up to 2k tokens, no fine-tuning.")
    attention: bool = setting(False, "Compare full attention with TI-CL's FTA in the transformer instead of the encoders (windows of 1, 5 and 10 s).")
    mast: bool = setting(False, "Compare MAST (--mast-size) with the transformer (--size) per window instead of the encoders: time, memory, FLOPs, per-hop latency.")
    mast_size: str = setting("mast-edge", "MAST's size with --mast (mast-edge: about mini's parameters; mast-t: about small's).")
    size: str = setting("", "Named size of both encoders (equal width, parameters within 5%); default tiny, mini with --quick.")
    windows: list[float] = setting([1.0, 5.0, 10.0], "Window lengths in seconds of the --attention sweep (batch 1 and 8).")
    tokens: list[int] = setting([100, 250, 500, 1000, 2000, 4000, 8000, 16000], "Token counts of the inference sweep (batch 1; batch 8 up to --batch8-max).")
    batch8_max: int = setting(0, "Largest token count measured at batch 8; default all, 2000 with --quick.")
    data: str = setting("", "The shared data folder, for the fine-tuning comparison (skipped without it or with --quick).")
    out: str = setting("runs/encoders", "Folder for results.json, results.md and the study's runs.")
    stream_size: str = setting("mini", "Encoder size of the per-hop latency (the default model's); ONNX export of a 19-layer Mamba took over 10 minutes.")
    study_size: str = setting("nano", "Encoder size of the pretraining and fine-tuning runs (with --mast: --size and --mast-size).")
    study_tokens: str = setting("", "Tokens of the pretraining and fine-tuning runs: frame (two frames each: a 1-D sequence over time, as a scan reads best) or patch; default frame, patch with --attention or --mast.")
    steps: int = setting(400, "Pretraining steps of each (encoder, objective).")
    batch_size: int = setting(32, "Pretraining crops per step.")
    epochs: int = setting(12, "Fine-tuning epochs of each task.")
    device: str = setting("", "cpu or cuda (default: cuda when available).")

    def __post_init__(self):
        from edgetag.spec import MAST_SIZES, SIZES

        if self.attention and self.mast:
            raise ValueError("--attention and --mast: choose one comparison")
        if self.mast_size not in MAST_SIZES:
            raise ValueError(f"--mast-size: {self.mast_size!r} is not one of {', '.join(MAST_SIZES)}")
        if not self.tokens or min(self.tokens) < 1:
            raise ValueError(f"--tokens: {self.tokens} are not all >= 1")
        if not self.windows or not all(0.1 <= w <= 60 for w in self.windows):
            raise ValueError(f"--windows: {self.windows} are not all in [0.1, 60] seconds")
        for name, value in (("size", self.encoder_size), ("stream_size", self.stream_size), ("study_size", self.study_size)):
            if value not in SIZES:
                raise ValueError(f"--{name.replace('_', '-')}: {value!r} is not one of {', '.join(SIZES)}")
        if self.batch8_max < 0:
            raise ValueError(f"--batch8-max: {self.batch8_max} is not >= 0")
        for name in ("steps", "batch_size", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}: {getattr(self, name)} is not >= 1")
        if self.study_tokens not in ("", "frame", "patch"):
            raise ValueError(f"--study-tokens: {self.study_tokens!r} is not frame or patch")
        if self.attention and self.study_tokens == "frame":
            raise ValueError("--study-tokens frame: a frame model's grid has one frequency row, where FTA is full attention; use patch with --attention")
        if self.mast and self.study_tokens == "frame":
            raise ValueError("--study-tokens frame: a MAST has its own patch embedding; use patch with --mast")
        if self.device not in ("", "cpu", "cuda"):
            raise ValueError(f"--device: {self.device!r} is not cpu or cuda")

    @property
    def encoder_size(self) -> str:
        return self.size or ("mini" if self.quick or self.mast else "tiny")

    @property
    def tokens_of_study(self) -> str:
        return self.study_tokens or ("patch" if self.attention or self.mast else "frame")

    @property
    def batch8_limit(self) -> int:
        return self.batch8_max or (2000 if self.quick else max(self.tokens))


# ---------------------------------------------------------------------------------------------
# 1. Inference over token counts


def inference(encoder: str, size: str, tokens: int, batch: int, device: str) -> dict:
    """Median seconds and peak bytes of the blocks on `tokens` random tokens (no grad); run it in
    a process of its own (`in_subprocess`): peak RSS is a process's high-water mark."""
    import torch

    from edgetag.model import Encoder, num_parameters
    from edgetag.spec import EncoderConfig

    torch.manual_seed(0)
    model = Encoder(EncoderConfig.named(size, encoder=encoder)).to(device).eval()
    x = torch.randn(batch, tokens, model.config.width, device=device)
    measured = timed(lambda: model.forward_blocks(x + model.positions(tokens)), tokens * batch, device)
    return {"encoder": encoder, "size": size, "tokens": tokens, "batch": batch, "params": num_parameters(model), **measured, "threads": torch.get_num_threads()}


def window_pass(attention: str, grid: str, size: str, seconds: float, batch: int, device: str) -> dict:
    """Median seconds and peak bytes of the whole encoder (tokens embedded, blocks, norm) on
    `batch` windows of `seconds` of log-mel frames, in a process of its own; with the keys each
    patch query scores (full: every token; FTA: its row and its column)."""
    import torch

    from edgetag.features import preset
    from edgetag.model import Encoder, num_parameters
    from edgetag.spec import EncoderConfig

    torch.manual_seed(0)
    fbank = preset("ast")
    config = EncoderConfig.named(size, attention=attention, **GRIDS[grid])
    frames = fbank.num_frames(round(seconds * fbank.sample_rate))
    rows, columns = config.freq_patches, config.time_patches(frames)
    model = Encoder(config).to(device).eval()
    x = torch.randn(batch, frames, config.n_mels, device=device)
    measured = timed(lambda: model(x), rows * columns * batch, device)
    return {"attention": attention, "grid": grid, "size": size, "window_s": seconds, "batch": batch, "tokens": rows * columns, "freq_rows": rows,
            "keys_per_query": rows * columns if attention == "full" else rows + columns - 1, "params": num_parameters(model), **measured,
            "threads": torch.get_num_threads()}


def mast_pass(encoder: str, size: str, seconds: float, batch: int, device: str) -> dict:
    """Median seconds, peak bytes and FLOPs per window of the whole encoder (MAST, or the
    transformer on 16x16 patches) on `batch` windows of `seconds`, in a process of its own."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from edgetag.features import preset
    from edgetag.model import new_encoder, num_parameters
    from edgetag.spec import EncoderConfig

    torch.manual_seed(0)
    fbank = preset("ast")
    config = EncoderConfig.named(size, encoder=encoder, n_mels=fbank.n_features)
    frames = fbank.num_frames(round(seconds * fbank.sample_rate))
    model = new_encoder(config).to(device).eval()
    x = torch.randn(batch, frames, config.n_mels, device=device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        last = model(x).shape[1]
    tokens = config.num_tokens(frames)
    measured = timed(lambda: model(x), tokens * batch, device)
    return {"encoder": encoder, "size": size, "window_s": seconds, "batch": batch, "tokens": tokens, "last_tokens": last, "params": num_parameters(model),
            "flops": counter.get_total_flops() / batch, **measured, "threads": torch.get_num_threads()}


def timed(run, work: int, device: str) -> dict:
    """{"seconds": median of `run()`, "peak_bytes": its peak memory above the start}, no grad;
    a warm-up and three repeats unless `work` (tokens x batch) makes a pass take seconds."""
    import torch

    from train.bench_pretrain import peak_rss, reset_peak_rss

    cuda = device == "cuda"
    repeats = 3 if work <= 8000 else 1  # the long passes take seconds each: one, after no warm-up
    with torch.inference_mode():
        if repeats > 1:
            run()  # warm-up
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = reset_peak_rss()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() - base if cuda else peak_rss() - base
    return {"seconds": statistics.median(times), "peak_bytes": max(peak, 0)}


def in_subprocess(function: str, **kwargs) -> dict:
    """train.bench_encoders.<function>(**kwargs) in a fresh process; its JSON result, or the
    error's last line (an out-of-memory kill, say) under "error"."""
    code = f"import json, sys; from train import bench_encoders as b; print(json.dumps(b.{function}(**json.loads(sys.argv[1]))))"
    done = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], capture_output=True, text=True)
    if done.returncode:
        lines = done.stderr.strip().splitlines()
        return {**kwargs, "error": lines[-1] if lines else f"exit code {done.returncode}"}
    return json.loads(done.stdout.splitlines()[-1])


def crossover(rows: list[dict]) -> int | None:
    """The fewest tokens from which on the Mamba is faster at every measured count (batch 1)."""
    times = {(r["encoder"], r["tokens"]): r["seconds"] for r in rows if r["batch"] == 1 and "seconds" in r}
    counts = sorted({n for _, n in times})
    faster = [n for n in counts if ("mamba", n) in times and ("transformer", n) in times and times["mamba", n] < times["transformer", n]]
    for i, n in enumerate(counts):
        if all(m in faster for m in counts[i:]):
            return n
    return None


# ---------------------------------------------------------------------------------------------
# 2. Streaming, 3. pretraining steps


def streaming(size: str, folder: Path, variants: dict[str, dict]) -> list[dict]:
    """Per-hop latency of an untrained model of each variant (EncoderConfig overrides; the cost
    does not depend on the weights), 1 s windows every 0.5 s: torch, and ONNX Runtime on its
    int8 export (made by `python -m deploy.export`, as a user makes one: train/ does not import
    deploy/)."""
    import torch

    from edgetag import checkpoint
    from edgetag.bench import EXAMPLE, hop_latency
    from edgetag.features import preset
    from edgetag.model import AudioTransformer
    from edgetag.spec import EncoderConfig, HeadConfig, ModelSpec, StreamConfig

    rows = []
    for name, overrides in variants.items():
        torch.manual_seed(0)
        named = {k: v for k, v in overrides.items() if k != "size"}  # a variant may bring its own size (MAST's)
        spec = ModelSpec(EncoderConfig.named(overrides.get("size", size), **named), preset("ast"), {"tags": HeadConfig("tags", [f"class {i}" for i in range(50)])},
                         StreamConfig(1.0, 0.5))
        path = checkpoint.save(folder / f"{name}.safetensors", AudioTransformer(spec).eval())
        exported = subprocess.run([sys.executable, "-m", "deploy.export", "--ckpt", str(path), "--out", str(folder / f"{name}-export"),
                                   "--calibration", str(EXAMPLE), "--calibration-windows", "32"], capture_output=True, text=True)
        if exported.returncode:
            raise RuntimeError(f"deploy.export of the {name} model: {(exported.stderr.strip().splitlines() or ['failed'])[-1]}")
        for backend, model in (("torch", path), ("onnx", folder / f"{name}-export")):
            r = hop_latency(str(model), backend, seconds=20.0, repeats=2)
            rows.append({"variant": name, "backend": backend, "encoder_ms": 1e3 * r["encoder_median_s"], "total_ms": 1e3 * r["total_median_s"]})
    return rows


def pretraining_steps(variants: dict[str, dict], methods: tuple[str, ...], device: str) -> list[dict]:
    """One pretraining step of each objective on each variant ({"encoder", "size"}; 10 s crops,
    batch 8, MAE-AST and SSAST masking 75%, SS-MAST dropping 10%), each in a fresh process
    (`train.bench_pretrain.measure`)."""
    from train.bench_pretrain import measure_in_subprocess

    return [{"encoder": name, **measure_in_subprocess(method, tokens="patch", frames=1024, batch_size=8, steps=2, device=device, **v)}
            for name, v in variants.items() for method in methods]


# ---------------------------------------------------------------------------------------------
# 4. Fine-tuning at an equal budget


def study(c: BenchConfig, variants: dict[str, dict], objectives: tuple[str, ...]) -> list[dict]:
    """The runs, each kept in OUT/study.json as it finishes: a run already there with the same
    settings is not trained again (the study takes an hour on a CPU; the timings above are
    measured afresh every time)."""
    from train.study import equal_budget_run, esc50_task, keyword_task

    data, out = Path(c.data), Path(c.out)
    tasks = {"keywords": keyword_task(data), "esc50": esc50_task(data)}
    settings = {"data": str(data.resolve()), "size": c.study_size, "tokens": c.tokens_of_study, "steps": c.steps, "batch_size": c.batch_size, "epochs": c.epochs,
                **({"variants": variants} if c.mast else {})}
    path = out / "study.json"
    done = json.loads(path.read_text()) if path.is_file() else {}
    runs = done.get("runs", []) if done.get("settings") == settings else []
    for r in runs:  # the encoder studies written before runs were keyed by variant: their variant is the encoder
        r.setdefault("variant", r.get("encoder"))
    for name, overrides in variants.items():
        for objective in objectives:
            if any(r["variant"] == name and r["objective"] == objective for r in runs):
                continue
            start = time.perf_counter()
            settings_of = {"size": c.study_size, **overrides}  # a variant may bring its own size (MAST's study)
            run = {"variant": name, **equal_budget_run(out / f"{name}-{objective}", data, tasks, objective, tokens=c.tokens_of_study,
                                                       steps=c.steps, batch_size=c.batch_size, epochs=c.epochs, **settings_of)}
            run["minutes"] = (time.perf_counter() - start) / 60
            runs.append(run)
            path.write_text(json.dumps({"settings": settings, "runs": runs}, indent=1))
            print(json.dumps(run), flush=True)
    return runs


# ---------------------------------------------------------------------------------------------


def bench(c: BenchConfig) -> dict:
    import torch

    from edgetag.bench import cpu_name

    device = c.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(c.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"settings": {**vars(c), "size": c.encoder_size, "batch8_max": c.batch8_limit, "study_tokens": c.tokens_of_study, "device": device,
                                  "cpu": cpu_name()}}
    variants = ATTENTION_VARIANTS if c.attention else ENCODER_VARIANTS
    if c.mast:
        variants = {"transformer": {"encoder": "transformer", "size": c.encoder_size}, "mast": {"encoder": "mast", "size": c.mast_size}}
        results["mast"] = []
        for seconds in sorted(c.windows):
            for batch in (1, 8):
                for encoder in MAST_ENCODERS:
                    row = in_subprocess("mast_pass", encoder=encoder, size=variants[encoder]["size"], seconds=seconds, batch=batch, device=device)
                    results["mast"].append(row)
                    print(_mast_line(row), flush=True)
    elif c.attention:
        results["windows"] = []
        for grid in GRIDS:
            for seconds in sorted(c.windows):
                for batch in (1, 8):
                    for attention in ATTENTION_VARIANTS:
                        row = in_subprocess("window_pass", attention=attention, grid=grid, size=c.encoder_size, seconds=seconds, batch=batch, device=device)
                        results["windows"].append(row)
                        print(_window_line(row), flush=True)
    else:
        results["inference"] = []
        for tokens in sorted(c.tokens):
            for batch in (1, 8):
                if batch == 8 and tokens > c.batch8_limit:
                    continue
                for encoder in TOKEN_ENCODERS:
                    row = in_subprocess("inference", encoder=encoder, size=c.encoder_size, tokens=tokens, batch=batch, device=device)
                    results["inference"].append(row)
                    print(_inference_line(row), flush=True)
    with tempfile.TemporaryDirectory() as folder:
        results["streaming"] = streaming(c.stream_size, Path(folder), variants)
    if c.mast:
        results["pretraining"] = pretraining_steps(variants, ("mae-ast", "ss-mast"), device)
    elif not c.attention:
        results["pretraining"] = pretraining_steps({e: {"encoder": e, "size": c.encoder_size} for e in TOKEN_ENCODERS}, ("ssast", "mae-ast"), device)
    if c.data and not c.quick:
        results["study"] = study(c, variants, MAST_OBJECTIVES if c.mast else ("none", "mae-ast") if c.attention else OBJECTIVES)
    results["summary"] = mast_summary(results["mast"]) if c.mast else fta_summary(results["windows"]) if c.attention else summary(results["inference"])
    (out / "results.json").write_text(json.dumps(results, indent=1))
    table = render(results)
    (out / "results.md").write_text(table + "\n")
    print(table)
    s = results["summary"]
    if c.mast:
        print(f"mast_speedup_1s {s['mast_speedup_1s']:.2f}x mast_flops_ratio_1s {s['mast_flops_ratio_1s']:.2f}x")
    elif c.attention:
        print(f"fta_speedup_1s {s['fta_speedup_1s']:.2f}x fta_speedup_10s {s['fta_speedup_10s']:.2f}x")
    else:
        print(f"crossover_tokens {s['crossover_tokens']} speedup_at_16k {s['speedup_at_16k']:.2f}x memory_at_16k {s['memory_at_16k']:.2f}x")
    return results


def summary(rows: list[dict]) -> dict:
    at = {(r["encoder"], r["batch"]): r for r in rows if r["tokens"] == 16000 and "seconds" in r}
    t, m = at.get(("transformer", 1)), at.get(("mamba", 1))
    nan = float("nan")
    return {"crossover_tokens": crossover(rows), "speedup_at_16k": t["seconds"] / m["seconds"] if t and m else nan,
            "memory_at_16k": t["peak_bytes"] / max(m["peak_bytes"], 1) if t and m else nan}


def fta_summary(rows: list[dict]) -> dict:
    """Full / FTA seconds per window at batch 1 on 16x16 patches, at 1 s and at 10 s."""
    at = {(r["attention"], r["window_s"]): r["seconds"] for r in rows if r["grid"] == "patch" and r["batch"] == 1 and "seconds" in r}
    ratio = lambda s: at["full", s] / at["fta", s] if ("full", s) in at and ("fta", s) in at else float("nan")  # noqa: E731
    return {"fta_speedup_1s": ratio(1.0), "fta_speedup_10s": ratio(10.0)}


def mast_summary(rows: list[dict]) -> dict:
    """Transformer / MAST at batch 1 on 1 s windows: seconds and FLOPs per window."""
    at = {r["encoder"]: r for r in rows if r["window_s"] == 1.0 and r["batch"] == 1 and "seconds" in r}
    ratio = lambda key: at["transformer"][key] / at["mast"][key] if len(at) == 2 else float("nan")  # noqa: E731
    return {"mast_speedup_1s": ratio("seconds"), "mast_flops_ratio_1s": ratio("flops")}


def _mast_line(r: dict) -> str:
    where = f"{r['encoder']:<11} {r['window_s']:>4g} s batch {r['batch']}"
    if "error" in r:
        return f"{where}: failed: {r['error']}"
    return f"{where}: {r['tokens']:>5} -> {r['last_tokens']:>4} tokens, {r['flops'] / 1e6:8.1f} MFLOPs: {1e3 * r['seconds']:9.1f} ms {r['peak_bytes'] / 2**20:8.1f} MiB"


def _window_line(r: dict) -> str:
    where = f"{r['attention']:<4} {r['grid']:<11} {r['window_s']:>4g} s batch {r['batch']}"
    if "error" in r:
        return f"{where}: failed: {r['error']}"
    return f"{where}: {r['tokens']:>5} tokens, {r['keys_per_query']:>5} keys per query: {1e3 * r['seconds']:9.1f} ms {r['peak_bytes'] / 2**20:8.1f} MiB"


def _inference_line(r: dict) -> str:
    if "error" in r:
        return f"{r['encoder']:<11} {r['tokens']:>6} tokens batch {r['batch']}: failed: {r['error']}"
    return f"{r['encoder']:<11} {r['tokens']:>6} tokens batch {r['batch']}: {1e3 * r['seconds']:9.1f} ms {r['peak_bytes'] / 2**20:8.1f} MiB"


def render(results: dict) -> str:
    s = results["settings"]
    lines = render_mast(results) if "mast" in results else render_windows(results) if "windows" in results else render_inference(results)
    what = "attention" if "windows" in results else "encoder"
    sizes = f"`{s['size']}` and `{s['mast_size']}`" if "mast" in results else f"`{s.get('stream_size', s['size'])}`"
    lines += ["", f"Per-hop streaming latency, {sizes} encoders (1 s window every 0.5 s, 1 thread, median):", "",
              f"| {what} | backend | encoder | total per hop |", "|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['backend']} | {r['encoder_ms']:.2f} ms | {r['total_ms']:.2f} ms |" for r in results["streaming"]]
    if "pretraining" in results:
        lines += ["", "One pretraining step (10 s crops, batch 8; MAE-AST and SSAST mask 75% of the tokens, SS-MAST drops 10%; forward, backward, AdamW):", "",
                  "| encoder | objective | median step | peak memory |", "|---|---|---|---|"]
        lines += [f"| {r['encoder']} | {r['method']} | {1e3 * r['step_s']:.0f} ms | {r['peak_bytes'] / 2**20:.0f} MiB |" for r in results["pretraining"]]
    if "study" in results:
        pretrained = " (MAE-AST pretrains with full attention; FTA fine-tunes its weights)" if what == "attention" else ""
        sizes = f"`{s['size']}` transformer and `{s['mast_size']}` MAST" if "mast" in results else f"`{s['study_size']}` encoders"
        lines += ["", f"Fine-tuning at an equal budget: {sizes}, {s['study_tokens']} tokens, {s['steps']} pretraining steps of {s['batch_size']} 1 s crops, "
                  f"{s['epochs']} fine-tuning epochs{pretrained}; best validation accuracy:", "",
                  f"| {what} | pretraining | keywords (12-way) | ESC-50 fold 4 (50-way) | pretraining minutes | minutes in all |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['variant']} | {r['objective']} | {100 * r['keywords']:.1f}% | {100 * r['esc50']:.1f}% | {r['pretrain_minutes']:.1f} | {r['minutes']:.1f} |"
                  for r in results["study"]]
    return "\n".join(lines)


def _ms(r: dict) -> str:
    return f"{1e3 * r['seconds']:.1f} ms" if "seconds" in r else "failed"


def _mib(r: dict) -> str:
    return f"{r['peak_bytes'] / 2**20:.0f} MiB" if "peak_bytes" in r else "–"


def _ratio(a: dict, b: dict, key: str) -> str:
    """a / b, or "–" where either was not measured or (memory) is under 1 MiB: RSS peaks that small are allocator noise."""
    if key not in a or key not in b or (key == "peak_bytes" and min(a[key], b[key]) < 2**20):
        return "–"
    return f"{a[key] / max(b[key], 1e-12):.2f}x"


def render_inference(results: dict) -> list[str]:
    s, inference = results["settings"], results["inference"]
    params = {r["encoder"]: r["params"] for r in inference if "params" in r}
    lines = [f"Encoders at equal width and parameters: `{s['size']}` ({', '.join(f'{e} {n / 1e6:.2f}M' for e, n in params.items())}), "
             f"{s['device']} ({s['cpu']}, {inference[0].get('threads', '?')} threads).", "",
             "| tokens | batch | transformer | Mamba | time ratio (transformer / Mamba) | transformer memory | Mamba memory | memory ratio |",
             "|---|---|---|---|---|---|---|---|"]
    cell = {(r["encoder"], r["tokens"], r["batch"]): r for r in inference}
    for tokens, batch in sorted({(r["tokens"], r["batch"]) for r in inference}, key=lambda k: (k[1], k[0])):
        t, m = cell.get(("transformer", tokens, batch), {}), cell.get(("mamba", tokens, batch), {})
        lines.append(f"| {tokens} | {batch} | {_ms(t)} | {_ms(m)} | {_ratio(t, m, 'seconds')} | {_mib(t)} | {_mib(m)} | {_ratio(t, m, 'peak_bytes')} |")
    return lines


def render_mast(results: dict) -> list[str]:
    s, rows = results["settings"], results["mast"]
    params = {r["encoder"]: r["params"] for r in rows if "params" in r}
    lines = [f"MAST `{s['mast_size']}` ({params.get('mast', 0) / 1e6:.2f}M parameters) against the transformer `{s['size']}` "
             f"({params.get('transformer', 0) / 1e6:.2f}M, 16x16 patches), one pass of the whole encoder per window, {s['device']} "
             f"({s['cpu']}, {rows[0].get('threads', '?')} threads). Tokens: the transformer's; MAST's first stage -> last stage.", "",
             "| window | batch | tokens (transformer / MAST) | MFLOPs per window (transformer / MAST) | transformer | MAST | speedup (transformer / MAST) | "
             "transformer memory | MAST memory |", "|---|---|---|---|---|---|---|---|---|"]
    cell = {(r["encoder"], r["window_s"], r["batch"]): r for r in rows}
    for seconds, batch in sorted({(r["window_s"], r["batch"]) for r in rows}, key=lambda k: (k[1], k[0])):
        t, m = cell.get(("transformer", seconds, batch), {}), cell.get(("mast", seconds, batch), {})
        tokens = f"{t.get('tokens', '–')} / {m.get('tokens', '–')} -> {m.get('last_tokens', '–')}"
        flops = f"{t['flops'] / 1e6:.1f} / {m['flops'] / 1e6:.1f}" if "flops" in t and "flops" in m else "–"
        lines.append(f"| {seconds:g} s | {batch} | {tokens} | {flops} | {_ms(t)} | {_ms(m)} | {_ratio(t, m, 'seconds')} | {_mib(t)} | {_mib(m)} |")
    return lines


def render_windows(results: dict) -> list[str]:
    s, rows = results["settings"], results["windows"]
    params = next((r["params"] for r in rows if "params" in r), 0)
    lines = [f"Full attention against FTA in one encoder, `{s['size']}` ({params / 1e6:.2f}M parameters either way), one pass per window (tokens embedded, "
             f"blocks, norm), {s['device']} ({s['cpu']}, {rows[0].get('threads', '?')} threads).", "",
             "| patches | window | tokens | keys per query (full / FTA) | batch | full | FTA | speedup (full / FTA) | full memory | FTA memory | memory ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    cell = {(r["attention"], r["grid"], r["window_s"], r["batch"]): r for r in rows}
    for grid, seconds, batch in sorted({(r["grid"], r["window_s"], r["batch"]) for r in rows}, key=lambda k: (list(GRIDS).index(k[0]), k[2], k[1])):
        full, fta = cell.get(("full", grid, seconds, batch), {}), cell.get(("fta", grid, seconds, batch), {})
        keys = f"{full.get('keys_per_query', '–')} / {fta.get('keys_per_query', '–')}"
        lines.append(f"| {grid} ({full.get('freq_rows', fta.get('freq_rows', '?'))} rows) | {seconds:g} s | {full.get('tokens', fta.get('tokens', '–'))} | {keys} | {batch} | "
                     f"{_ms(full)} | {_ms(fta)} | {_ratio(full, fta, 'seconds')} | {_mib(full)} | {_mib(fta)} | {_ratio(full, fta, 'peak_bytes')} |")
    return lines


main = command(BenchConfig, bench)

if __name__ == "__main__":
    from edgetag.cli import run_guarded

    run_guarded(lambda: typer.run(main), __spec__.name)
