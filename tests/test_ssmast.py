"""SS-MAST's objective: patch-drop keeps exactly its count, the momentum teacher never trains by
gradient and moves by the EMA formula, the queue is a FIFO ring of fixed size, the loss is
symmetric in the two views and is InfoNCE as written out by hand, the views are mixes and crops,
and `python -m train.pretrain --method ss-mast` trains, resumes and feeds fine-tuning."""

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, make_dataset

from edgetag import checkpoint
from edgetag.spec import EncoderConfig
from train.objectives.ssmast import SSMAST, SSMASTConfig, patch_drop, symmetric_info_nce, view


@pytest.mark.parametrize("n, ratio, cls", [(48, 0.1, 0), (48, 0.5, 0), (49, 0.25, 2), (7, 0.0, 1)])
def test_patch_drop_keeps_exactly_the_requested_count_in_order(n, ratio, cls):
    x = torch.arange(2 * (cls + n), dtype=torch.float32).reshape(2, cls + n, 1).expand(-1, -1, 3)
    kept = patch_drop(x, ratio, cls, torch.Generator().manual_seed(0))
    assert kept.shape == (2, cls + n - round(ratio * n), 3)
    ids = kept[0, :, 0].long()
    assert ids[:cls].tolist() == list(range(cls))  # the cls tokens always stay
    assert torch.all(ids[cls + 1 :] > ids[cls:-1]) and torch.all(ids[cls:] >= cls)  # distinct patches, in order
    assert torch.equal(kept[1, :, 0] - kept[0, :, 0], torch.full((len(ids),), float(cls + n)))  # one subset for the batch


def model(**settings) -> SSMAST:
    torch.manual_seed(0)
    return SSMAST(EncoderConfig.named("nano"), SSMASTConfig(**settings), steps=10)


def test_the_teacher_gets_no_gradient_and_follows_the_ema_formula():
    m = model(queue_size=32)
    optimizer = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    teacher = list(m.teacher_encoder.parameters()) + list(m.teacher_projection.parameters())
    student = list(m.encoder.parameters()) + list(m.projection.parameters())
    assert not any(p.requires_grad for p in teacher) and all(p.requires_grad for p in student)
    assert not {id(p) for p in teacher} & {id(p) for g in optimizer.param_groups for p in g["params"]}
    x = torch.randn(4, 64, 128)
    m.train()
    for _ in range(2):  # the second step moves the teacher towards a student the first step changed
        before_t, before_s = [p.detach().clone() for p in teacher], [p.detach().clone() for p in student]
        mom = m.momentum()
        loss, _, _ = m(x)
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in teacher)
        for t, t0, s0 in zip(teacher, before_t, before_s):
            torch.testing.assert_close(t, mom * t0 + (1 - mom) * s0, rtol=0, atol=1e-6)
        optimizer.step()
    assert m.momentum() == pytest.approx(1 - 0.01 * (math.cos(math.pi * 2 / 10) + 1) / 2)  # the cosine ramp from 0.99 to 1
    assert any(not torch.equal(t, s) for t, s in zip(teacher, student))  # the teacher lags


def test_the_queue_is_a_fifo_ring_of_fixed_size():
    m = model(queue_size=10, projection_dim=4)
    start = m.queue.clone()
    keys = [torch.full((4, 4), float(i)) for i in range(1, 4)]  # three batches of four keys
    for k in keys:
        m.enqueue(k)
    assert m.queue.shape == (10, 4) and int(m.queue_ptr) == 2
    # slots 0-3 took batch 1, 4-7 batch 2; batch 3 overwrote 8, 9 and then the oldest, 0 and 1
    assert m.queue[:, 0].tolist() == [3, 3, 1, 1, 2, 2, 2, 2, 3, 3]
    m.enqueue(torch.arange(24.0).reshape(12, 2).repeat(1, 2))  # more keys than it holds: the last ten, oldest first
    assert sorted(m.queue[:, 0].tolist()) == [float(2 * i) for i in range(2, 12)]
    assert not torch.equal(start, m.queue)


def test_the_loss_is_symmetric_and_is_infonce_by_hand():
    g = torch.Generator().manual_seed(0)
    q1, q2, k1, k2 = (F.normalize(torch.randn(5, 8, generator=g), dim=-1) for _ in range(4))
    queue = F.normalize(torch.randn(16, 8, generator=g), dim=-1)
    loss, accuracy = symmetric_info_nce(q1, q2, k1, k2, queue, 0.07)
    again, _ = symmetric_info_nce(q2, q1, k2, k1, queue, 0.07)
    torch.testing.assert_close(loss, again, rtol=0, atol=0)

    def by_hand(q, k):  # -log( e^{q.k/t} / (e^{q.k/t} + sum_n e^{q.n/t}) ), averaged over the batch
        pos = torch.exp((q * k).sum(-1) / 0.07)
        return -torch.log(pos / (pos + torch.exp(q @ queue.T / 0.07).sum(-1))).mean()

    torch.testing.assert_close(loss, (by_hand(q1, k2) + by_hand(q2, k1)) / 2, rtol=1e-5, atol=1e-5)
    perfect, acc = symmetric_info_nce(q1, q2, q2, q1, -q1.repeat(3, 1), 0.07)  # the positive the closest key: accuracy 1
    assert acc == 1 and perfect < loss and 0 <= accuracy <= 1


def test_views_are_mixes_and_crops_of_the_clips():
    x = torch.randn(6, 64, 128)
    # no mixing, the whole plane: the clip itself, but for grid_sample's float32 pixel coordinates (2e-5 seen on values of 4)
    torch.testing.assert_close(view(x, 0.0, 1.0), x, rtol=0, atol=1e-4)
    g = torch.Generator().manual_seed(0)
    a, b = view(x, 0.4, 0.6, g), view(x, 0.4, 0.6, g)
    assert a.shape == x.shape and not torch.allclose(a, b)  # two different views
    steady = torch.ones(6, 64, 128) * torch.arange(6.0)[:, None, None]  # constant clips: a crop cannot change them, a mix only by mixup's weight
    mixed = view(steady, 0.4, 0.6, torch.Generator().manual_seed(1))
    assert torch.all(mixed.std(dim=(1, 2)) < 1e-5) and not torch.allclose(mixed, steady)


def test_grid_blocks_are_refused():
    with pytest.raises(ValueError, match="no whole grid"):
        SSMAST(EncoderConfig.named("nano", attention="fta"))


def test_pretrain_ss_mast_resumes_and_fine_tunes(tmp_path):
    """`python -m train.pretrain --method ss-mast` trains and resumes (the queue, the teacher and
    the EMA step come back); fine-tuning from its encoder gives a checkpoint `edgetag file` runs."""
    from test_pretrain import synthetic_corpus

    from train.augment import AugmentConfig
    from train.finetune import FinetuneConfig, finetune

    corpus = synthetic_corpus(tmp_path / "corpus", n=12)
    out = tmp_path / "pre"
    command = [sys.executable, "-m", "train.pretrain", "--data", str(corpus), "--out", str(out), "--method", "ss-mast", "--size", "nano", "--frames", "64",
               "--batch-size", "4", "--queue-size", "16", "--lr", "1e-3", "--warmup-steps", "2", "--checkpoint-every", "3", "--num-workers", "0"]
    done = subprocess.run([*command, "--steps", "3"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    first = torch.load(out / "last.pt", weights_only=True)
    done = subprocess.run([*command, "--steps", "6", "--resume"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["step"] == 6 and [r["step"] for r in state["rows"]] == list(range(1, 7))
    assert int(first["model"]["step"]) == 3 and int(state["model"]["step"]) == 6
    assert int(state["model"]["queue_ptr"]) == (6 * 2 * 4) % 16  # two views of four clips enqueued per step
    encoder = checkpoint.load_model(out / "encoder.safetensors")
    assert encoder.spec.provenance["pretrain"]["method"] == "ss-mast" and encoder.spec.provenance["pretrain"]["ssmast"]["queue_size"] == 16

    data = make_dataset(tmp_path / "data", clips=12, seconds=1.0, silence=True)
    results = finetune(FinetuneConfig(train=[str(data)], out=str(tmp_path / "ft"), init=str(out / "encoder.safetensors"), epochs=15, batch_size=8, lr=3e-3,
                                      val_percent=25, augment=AugmentConfig.off()), device="cpu")
    assert results["tags"]["accuracy"] > 0.5  # three classes
    run = subprocess.run([sys.executable, "-m", "edgetag", "file", str(data / "tone" / "00.wav"), "--model", str(tmp_path / "ft" / "best.safetensors"), "--json"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
