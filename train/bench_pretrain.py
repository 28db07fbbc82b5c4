"""MAE-AST against SSAST: one pretraining step each, same encoder, batch and input.

    python -m train.bench_pretrain --size tiny --frames 1024 --batch-size 8 --steps 10 --device cpu

A step is forward + backward + AdamW step. Peak memory: CUDA's max allocated bytes on a GPU; on
CPU, the process's peak RSS over the steps above its RSS before them (Linux: the peak is reset
through /proc/self/clear_refs first, since a high-water mark left by start-up would hide the
steps'; elsewhere ru_maxrss), each method in a fresh subprocess. Last line:
`speedup <x>x memory <y>x` (SSAST / MAE-AST). The paper reports about 3x and 2x.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import typer

from edgetag.bench import proc_status
from edgetag.model import num_parameters
from edgetag.spec import EncoderConfig
from train.pretrain import PretrainConfig, build_model

METHODS = ("mae-ast", "ssast")


def reset_peak_rss() -> int:
    """Reset the peak RSS to the current RSS where Linux allows it; returns the baseline to subtract."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return proc_status("VmRSS")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss() -> int:
    try:
        return proc_status("VmHWM")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(method: str, size: str, tokens: str, frames: int, batch_size: int, steps: int, device: str, threads: int = 0, encoder: str = "transformer") -> dict:
    """Median step time, and peak memory above what the model and optimizer hold at rest
    (activations, gradients, optimizer state), over one warm-up step and `steps` timed ones."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = EncoderConfig.named(size, encoder=encoder, tokens=tokens)
    # MAE-AST's released models: chunked masks for patches, random for frames
    masking = "chunk" if tokens == "patch" else "random"
    model = build_model(PretrainConfig(method=method, encoder=encoder, size=size, tokens=tokens, masking=masking)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    features = torch.randn(batch_size, frames, config.n_mels, device=device)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = reset_peak_rss()
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss, _, _ = model(features)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i:  # the first step is warm-up
            times.append(time.perf_counter() - start)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = peak_rss() - base
    return {"method": method, "params": num_parameters(model), "step_s": statistics.median(times), "peak_bytes": peak, "tokens": config.num_tokens(frames)}


def measure_in_subprocess(method: str, **kwargs) -> dict:
    """ru_maxrss is a process-lifetime high-water mark: on CPU each method gets its own process."""
    code = (
        "import json, sys; from train.bench_pretrain import measure; "
        f"print(json.dumps(measure({method!r}, **json.loads(sys.argv[1]))))"
    )
    out = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], capture_output=True, text=True)
    if out.returncode:  # killed for memory, say: one line, not a traceback of the parent
        raise RuntimeError(f"a {method} step ({', '.join(f'{k}={v}' for k, v in kwargs.items())}) failed: "
                           f"{(out.stderr.strip().splitlines() or [f'exit code {out.returncode}'])[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(
    size: str = typer.Option("tiny", help="Encoder size (edgetag.spec.SIZES)."),
    tokens: str = typer.Option("patch", help="patch or frame tokens."),
    frames: int = typer.Option(1024, help="Input frames (10 ms each)."),
    batch_size: int = typer.Option(8, "--batch-size"),
    steps: int = typer.Option(5, help="Timed steps (after one warm-up)."),
    device: str = typer.Option("cuda" if torch.cuda.is_available() else "cpu"),
    threads: int = typer.Option(0, help="torch threads on CPU (0: torch's default)."),
) -> None:
    from rich.console import Console
    from rich.table import Table

    args = dict(size=size, tokens=tokens, frames=frames, batch_size=batch_size, steps=steps, device=device, threads=threads)
    if device == "cpu":
        results = [measure_in_subprocess(m, **args) for m in METHODS]
        memory_how = "peak RSS above the model and optimizer at rest (ru_maxrss, a fresh process each)"
    else:
        results = [measure(m, **args) for m in METHODS]
        memory_how = "CUDA max allocated above the model and optimizer at rest"
    mae, ssast = results
    table = Table(title=f"pretraining step: {size} {tokens}, {frames} frames ({mae['tokens']} tokens), batch {batch_size}, {device}, 75% masked")
    for column in ("method", "params", "median step", "peak memory"):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(r["method"], f"{r['params'] / 1e6:.1f}M", f"{r['step_s'] * 1000:.0f} ms", f"{r['peak_bytes'] / 2**20:.0f} MiB")
    Console().print(table)
    print(f"memory: {memory_how}; torch threads: {threads or torch.get_num_threads()}")
    print(f"speedup {ssast['step_s'] / mae['step_s']:.2f}x memory {ssast['peak_bytes'] / max(mae['peak_bytes'], 1):.2f}x")


if __name__ == "__main__":
    from edgetag.cli import run_guarded

    run_guarded(lambda: typer.run(main), __spec__.name)
