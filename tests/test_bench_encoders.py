"""`python -m train.bench_encoders`: which encoder is faster where, read off the measured rows,
and the command end to end (slow: it exports and times four models; --attention and --mast: two)."""

import re
import subprocess
import sys

import pytest
from conftest import REPO

from train.bench_encoders import crossover, fta_summary, mast_summary, render, summary


def rows(times: dict[int, tuple[float, float]], batch: int = 1) -> list[dict]:
    """Inference rows from {tokens: (transformer seconds, Mamba seconds)}, memory 10x the seconds."""
    return [{"encoder": e, "tokens": n, "batch": batch, "seconds": s, "peak_bytes": int(10 * s * 2**20), "params": 1000}
            for n, pair in times.items() for e, s in zip(("transformer", "mamba"), pair)]


def test_crossover_is_the_count_from_which_the_mamba_stays_faster():
    assert crossover(rows({100: (1, 5), 1000: (3, 4), 4000: (9, 6), 16000: (90, 20)})) == 4000
    # faster once at 1000, slower again at 4000: the crossing is where it stays ahead
    assert crossover(rows({100: (1, 5), 1000: (5, 4), 4000: (9, 10), 16000: (90, 20)})) == 16000
    assert crossover(rows({100: (1, 5), 16000: (90, 100)})) is None
    # batch 8 rows and failed rows do not count
    assert crossover(rows({100: (1, 5), 16000: (90, 20)}) + rows({100: (9, 1)}, batch=8) + [{"encoder": "mamba", "tokens": 50, "batch": 1, "error": "killed"}]) == 16000


def test_summary_and_table_give_transformer_over_mamba_at_16k():
    measured = rows({100: (1, 5), 16000: (90, 20)})
    s = summary(measured)
    assert s == {"crossover_tokens": 16000, "speedup_at_16k": 4.5, "memory_at_16k": pytest.approx(4.5, rel=1e-3)}
    table = render({"settings": {"size": "nano", "device": "cpu", "cpu": "x"}, "inference": measured, "streaming": [], "pretraining": []})
    assert "| 16000 | 1 | 90000.0 ms | 20000.0 ms | 4.50x |" in table


@pytest.mark.slow
def test_the_command_prints_its_table_and_last_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "train.bench_encoders", "--size", "nano", "--tokens", "64", "--tokens", "128", "--batch8-max", "64", "--stream-size", "nano",
                           "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert re.fullmatch(r"crossover_tokens (\d+|None) speedup_at_16k nanx memory_at_16k nanx", lines[-1])  # no 16k row asked for
    for needle in ("| 64 | 1 |", "| 128 | 1 |", "| 64 | 8 |", "| mamba | onnx |", "| mamba | ssast |", "| transformer | mae-ast |"):
        assert needle in done.stdout
    assert (tmp_path / "results.json").is_file() and (tmp_path / "results.md").read_text().strip() in done.stdout


def window_rows(times: dict[tuple[str, float], tuple[float, float]], batch: int = 1) -> list[dict]:
    """Window rows from {(grid, seconds): (full seconds, FTA seconds)}."""
    return [{"attention": a, "grid": grid, "window_s": w, "batch": batch, "tokens": 48, "freq_rows": 8, "keys_per_query": 48 if a == "full" else 13,
             "seconds": s, "peak_bytes": 2**20, "params": 1000} for (grid, w), pair in times.items() for a, s in zip(("full", "fta"), pair)]


def test_fta_summary_is_full_over_fta_at_batch_1_on_patches():
    measured = window_rows({("patch", 1.0): (2.0, 4.0), ("patch", 10.0): (9.0, 3.0), ("overlapping", 10.0): (100.0, 1.0)}) + window_rows({("patch", 10.0): (50.0, 1.0)}, batch=8)
    assert fta_summary(measured) == {"fta_speedup_1s": 0.5, "fta_speedup_10s": 3.0}
    assert all(v != v for v in fta_summary(window_rows({("patch", 5.0): (1.0, 1.0)})).values())  # not measured: nan
    table = render({"settings": {"size": "nano", "device": "cpu", "cpu": "x"}, "windows": measured, "streaming": []})
    assert "| patch (8 rows) | 10 s | 48 | 48 / 13 | 1 | 9000.0 ms | 3000.0 ms | 3.00x |" in table and "pretraining" not in table


@pytest.mark.slow
def test_the_attention_comparison_prints_its_table_and_last_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "train.bench_encoders", "--attention", "--windows", "1", "--windows", "10", "--size", "nano", "--stream-size", "nano",
                           "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    last = done.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"fta_speedup_1s \d+\.\d\dx fta_speedup_10s \d+\.\d\dx", last)
    # one second of 16x16 patches: 6 x 8 tokens; a query scores all 48 under full attention, its row and column (6 + 8 - 1) under FTA
    for needle in ("| patch (8 rows) | 1 s | 48 | 48 / 13 | 1 |", "| overlapping (12 rows) | 10 s | 1188 | 1188 / 110 | 8 |", "| fta | onnx |"):
        assert needle in done.stdout
    assert (tmp_path / "results.md").read_text().strip() in done.stdout


def test_mast_summary_and_table_give_transformer_over_mast_per_window():
    measured = [{"encoder": e, "window_s": w, "batch": b, "tokens": t, "last_tokens": last, "flops": f, "seconds": sec, "peak_bytes": 2**20, "params": 10**6}
                for w, b, sec_pair, f_pair in ((1.0, 1, (0.004, 0.002), (8e7, 2e7)), (10.0, 1, (0.1, 0.02), (1e9, 2e8)), (1.0, 8, (0.01, 0.5), (8e7, 2e7)))
                for e, t, last, sec, f in zip(("transformer", "mast"), (48, 130), (48, 4), sec_pair, f_pair)]
    assert mast_summary(measured) == {"mast_speedup_1s": 2.0, "mast_flops_ratio_1s": 4.0}
    table = render({"settings": {"size": "mini", "mast_size": "mast-edge", "device": "cpu", "cpu": "x"}, "mast": measured, "streaming": []})
    assert "| 10 s | 1 | 48 / 130 -> 4 | 1000.0 / 200.0 | 100.0 ms | 20.0 ms | 5.00x |" in table and "pretraining" not in table
    study = [{"variant": v, "objective": o, "keywords": k, "esc50": 0.25, "pretrain_minutes": 1.0, "minutes": 2.0}
             for v, o, k in (("transformer", "none", 0.5), ("mast", "ss-mast", 0.625))]
    settings = {"size": "mini", "mast_size": "mast-edge", "device": "cpu", "cpu": "x", "study_tokens": "patch", "steps": 400, "batch_size": 32, "epochs": 12}
    table = render({"settings": settings, "mast": measured, "streaming": [], "study": study})
    assert "Fine-tuning at an equal budget: `mini` transformer and `mast-edge` MAST, patch tokens" in table
    assert "| mast | ss-mast | 62.5% | 25.0% | 1.0 | 2.0 |" in table


@pytest.mark.slow
def test_the_mast_comparison_prints_its_table_and_last_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "train.bench_encoders", "--mast", "--windows", "1", "--size", "nano", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.fullmatch(r"mast_speedup_1s \d+\.\d\dx mast_flops_ratio_1s \d+\.\d\dx", done.stdout.strip().splitlines()[-1])
    # one second: the transformer's 6 x 8 patches; MAST's 10 x 13 tokens pooled to 2 x 2
    for needle in ("| 1 s | 1 | 48 / 130 -> 4 |", "| 1 s | 8 | 48 / 130 -> 4 |", "| mast | onnx |", "| transformer | torch |", "| mast | ss-mast |", "| transformer | mae-ast |"):
        assert needle in done.stdout
    assert (tmp_path / "results.md").read_text().strip() in done.stdout


def test_a_study_kept_before_runs_were_keyed_by_variant_is_not_trained_again(tmp_path):
    """study.json of an earlier encoder study names each run's encoder, not its variant: its runs
    are read as done (training one would take minutes and fail on this empty data folder)."""
    import json

    from train.bench_encoders import ENCODER_VARIANTS, OBJECTIVES, BenchConfig, study

    c = BenchConfig(data=str(tmp_path), out=str(tmp_path))
    settings = {"data": str(tmp_path.resolve()), "size": c.study_size, "tokens": "frame", "steps": c.steps, "batch_size": c.batch_size, "epochs": c.epochs}
    old = [{"encoder": e, "objective": o, "keywords": 0.5, "esc50": 0.1, "pretrain_minutes": 0.0, "minutes": 1.0} for e in ENCODER_VARIANTS for o in OBJECTIVES]
    (tmp_path / "study.json").write_text(json.dumps({"settings": settings, "runs": old}))
    runs = study(c, ENCODER_VARIANTS, OBJECTIVES)
    assert [(r["variant"], r["objective"]) for r in runs] == [(e, o) for e in ENCODER_VARIANTS for o in OBJECTIVES]
