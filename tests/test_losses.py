"""DINO, iBOT and masked-L1 losses against hand / NumPy computations."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from smartformer.loss import DINOLoss, iBOTPatchLoss, masked_l1_loss, upsample_mask


def _np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _np_ce(p: np.ndarray, s_logits: np.ndarray) -> np.ndarray:
    """Row-wise -sum_k p_k log softmax(s)_k, with log-softmax written out explicitly."""
    log_q = s_logits - s_logits.max(axis=-1, keepdims=True)
    log_q = log_q - np.log(np.exp(log_q).sum(axis=-1, keepdims=True))
    return -(p * log_q).sum(axis=-1)


# ----------------------------------------------------------------------------------------- DINO


def test_dino_uniform_logits_give_log_k() -> None:
    k = 7
    loss = DINOLoss(k)
    student = [torch.full((3, k), 2.5), torch.zeros(3, k)]
    teacher = [torch.zeros(3, k), torch.full((3, k), -1.0)]
    assert loss(student, teacher, teacher_temp=0.04).item() == pytest.approx(math.log(k), rel=1e-6)


def test_teacher_entropy_is_a_fraction_of_log_k() -> None:
    k = 8
    loss = DINOLoss(k)
    assert loss.teacher_entropy(torch.zeros(4, k), 0.04) == pytest.approx(1.0, abs=1e-6)
    sharp = torch.full((4, k), -1.0)
    sharp[:, 0] = 1.0
    assert loss.teacher_entropy(sharp, 0.04) < 1e-3
    # two-level logits, closed form: p0 = e^a / (e^a + (k-1)), the rest share 1 - p0
    logits = torch.zeros(3, k)
    logits[:, 2] = 0.1
    p0 = math.exp(0.1 / 0.07) / (math.exp(0.1 / 0.07) + k - 1)
    rest = (1 - p0) / (k - 1)
    expected = -(p0 * math.log(p0) + (k - 1) * rest * math.log(rest)) / math.log(k)
    assert loss.teacher_entropy(logits, 0.07) == pytest.approx(expected, rel=1e-5)
    loss.center.fill_(0.3)  # a constant center changes nothing; a per-prototype one does
    assert loss.teacher_entropy(logits, 0.07) == pytest.approx(expected, rel=1e-5)
    loss.center[0, 2] = 0.4  # cancels the bump exactly
    assert loss.teacher_entropy(logits, 0.07) == pytest.approx(1.0, abs=1e-6)


def test_dino_matches_numpy_and_pairs_only_cross_view() -> None:
    s = np.array([[[0.2, -0.1, 0.4], [1.0, 0.0, -0.5]], [[-0.3, 0.8, 0.1], [0.0, 0.5, 0.5]]], dtype=np.float32)
    t = np.array([[[0.5, 0.1, -0.2], [0.3, 0.3, 0.9]], [[-0.4, 0.2, 0.6], [0.7, -0.1, 0.0]]], dtype=np.float32)
    center = np.array([[0.1, -0.2, 0.05]], dtype=np.float32)
    ts, tt = 0.1, 0.05
    loss = DINOLoss(3, student_temp=ts)
    loss.center.copy_(torch.from_numpy(center))
    got = loss([torch.from_numpy(v) for v in s], [torch.from_numpy(v) for v in t], teacher_temp=tt).item()

    p_t = [_np_softmax((t[q] - center) / tt) for q in range(2)]
    cross = 0.5 * (_np_ce(p_t[0], s[1] / ts).mean() + _np_ce(p_t[1], s[0] / ts).mean())
    same = 0.5 * (_np_ce(p_t[0], s[0] / ts).mean() + _np_ce(p_t[1], s[1] / ts).mean())
    assert abs(cross - same) > 0.1  # the example tells the two pairings apart
    assert got == pytest.approx(cross, rel=1e-5)


def test_dino_more_student_views_than_teacher_views() -> None:
    gen = torch.Generator().manual_seed(0)
    s = [torch.randn(4, 5, generator=gen) for _ in range(3)]
    t = [torch.randn(4, 5, generator=gen) for _ in range(2)]
    got = DINOLoss(5)(s, t, teacher_temp=0.07).item()
    pairs = [(q, v) for q in range(2) for v in range(3) if q != v]
    want = np.mean([_np_ce(_np_softmax(t[q].numpy() / 0.07), s[v].numpy() / 0.1).mean() for q, v in pairs])
    assert len(pairs) == 4
    assert got == pytest.approx(want, rel=1e-5)


def test_dino_student_view_gradient_ignores_same_view_teacher() -> None:
    gen = torch.Generator().manual_seed(1)
    s = [torch.randn(2, 4, generator=gen, requires_grad=True) for _ in range(2)]
    t0, t1 = torch.randn(2, 4, generator=gen), torch.randn(2, 4, generator=gen)
    loss = DINOLoss(4)
    (g_a,) = torch.autograd.grad(loss(s, [t0, t1], 0.04), s[0])
    (g_b,) = torch.autograd.grad(loss(s, [t0 + 3.0 * torch.randn(2, 4, generator=gen), t1], 0.04), s[0])
    (g_c,) = torch.autograd.grad(loss(s, [t0, t1 + 3.0 * torch.randn(2, 4, generator=gen)], 0.04), s[0])
    torch.testing.assert_close(g_a, g_b)  # teacher view 0 never meets student view 0
    assert not torch.allclose(g_a, g_c)  # teacher view 1 does


def test_dino_is_float32_and_needs_two_views() -> None:
    loss = DINOLoss(3)
    out = loss([torch.zeros(2, 3, dtype=torch.bfloat16)] * 2, [torch.zeros(2, 3, dtype=torch.bfloat16)] * 2, 0.04)
    assert out.dtype == torch.float32
    with pytest.raises(ValueError, match="cross-view"):
        loss([torch.zeros(2, 3)], [torch.zeros(2, 3)], 0.04)


def test_dino_center_ema_exact() -> None:
    loss = DINOLoss(2, center_momentum=0.75)
    loss.update_center([torch.tensor([[1.0, 2.0], [3.0, 6.0]]), torch.tensor([[5.0, 0.0], [7.0, 0.0]])])
    # batch mean over both views = [4, 2]; center = 0.75 * 0 + 0.25 * [4, 2]
    assert loss.center.tolist() == [[1.0, 0.5]]
    loss.update_center([torch.tensor([[9.0, -2.0]])])
    assert loss.center.tolist() == [[0.75 * 1.0 + 0.25 * 9.0, 0.75 * 0.5 + 0.25 * -2.0]]


# ------------------------------------------------------------------------------ distributed center


def _rank_logits(rank: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)
    views = [torch.randn(3 + rank, 4, generator=gen) + rank for _ in range(2)]  # ranks differ in batch size
    patches = torch.randn(2, 5 + rank, 4, generator=gen) - rank
    return views, patches


def _center_worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        views, patches = _rank_logits(rank)
        dino, ibot = DINOLoss(4, center_momentum=0.5), iBOTPatchLoss(4, center_momentum=0.5)
        dino.update_center(views)
        ibot.update_center(patches)
        torch.save({"dino": dino.center, "ibot": ibot.center}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # spawns two Python processes (about 5 s on 2 CPU cores)
def test_update_center_all_reduces_over_two_gloo_processes(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_center_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    dino_means, ibot_means = [], []
    for rank in range(2):
        views, patches = _rank_logits(rank)
        dino_means.append(torch.cat(views).mean(0))
        ibot_means.append(patches.reshape(-1, 4).mean(0))
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got["dino"], 0.5 * (dino_means[0] + dino_means[1]).unsqueeze(0) / 2)
        torch.testing.assert_close(got["ibot"], 0.5 * (ibot_means[0] + ibot_means[1]).unsqueeze(0) / 2)


# ----------------------------------------------------------------------------------------- iBOT


def _ibot_reference(s: np.ndarray, t: np.ndarray, mask: np.ndarray, center: np.ndarray, ts: float, tt: float) -> float:
    per_image = []
    for b in range(s.shape[0]):
        idx = np.flatnonzero(mask[b])
        if idx.size:
            ce = _np_ce(_np_softmax((t[b, idx] - center) / tt), s[b, idx] / ts)
            per_image.append(ce.sum() / idx.size)
    return float(np.mean(per_image))


def test_ibot_matches_hand_computation() -> None:
    s = np.array([[[0.1, 0.9], [0.5, -0.5], [2.0, 0.0]], [[-1.0, 1.0], [0.3, 0.2], [0.0, 0.0]]], dtype=np.float32)
    t = np.array([[[1.0, 0.0], [0.2, 0.1], [-0.5, 0.5]], [[0.0, 0.4], [0.6, -0.6], [1.0, 1.0]]], dtype=np.float32)
    mask = np.array([[True, False, True], [False, True, False]])
    center = np.array([[0.05, -0.05]], dtype=np.float32)
    loss = iBOTPatchLoss(2, student_temp=0.1)
    loss.center.copy_(torch.from_numpy(center))
    got = loss(torch.from_numpy(s), torch.from_numpy(t), torch.from_numpy(mask), teacher_temp=0.04).item()
    assert got == pytest.approx(_ibot_reference(s, t, mask, center, 0.1, 0.04), rel=1e-5)
    # Only masked tokens count: changing an unmasked student token leaves the loss unchanged.
    s2 = s.copy()
    s2[0, 1] = [5.0, -5.0]
    got2 = loss(torch.from_numpy(s2), torch.from_numpy(t), torch.from_numpy(mask), teacher_temp=0.04).item()
    assert got2 == got


def test_ibot_empty_masks_are_excluded_and_never_nan() -> None:
    gen = torch.Generator().manual_seed(2)
    s = torch.randn(3, 8, 6, generator=gen, requires_grad=True)
    t = torch.randn(3, 8, 6, generator=gen)
    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[0, [1, 4]] = True
    mask[2, [0, 2, 7]] = True
    loss = iBOTPatchLoss(6)
    both = loss(s, t, mask, 0.04)
    alone = [loss(s[i : i + 1], t[i : i + 1], mask[i : i + 1], 0.04) for i in (0, 2)]
    torch.testing.assert_close(both, (alone[0] + alone[1]) / 2)  # image 1 is not in the mean

    empty = loss(s, t, torch.zeros(3, 8, dtype=torch.bool), 0.04)
    assert empty.item() == 0.0
    (grad,) = torch.autograd.grad(empty, s)
    assert torch.isfinite(grad).all() and grad.abs().sum() == 0


def test_ibot_accepts_grid_mask_and_updates_center_over_all_tokens() -> None:
    gen = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 8, 3, generator=gen), torch.randn(2, 8, 3, generator=gen)
    grid_mask = torch.rand(2, 2, 2, 2, generator=gen) > 0.5
    grid_mask[:, 0, 0, 0] = True
    loss = iBOTPatchLoss(3, center_momentum=0.9)
    torch.testing.assert_close(loss(s, t, grid_mask, 0.05), loss(s, t, grid_mask.reshape(2, 8), 0.05))
    loss.update_center(t)
    torch.testing.assert_close(loss.center, 0.1 * t.reshape(16, 3).mean(0, keepdim=True))


# ------------------------------------------------------------------------------------ masked L1


def test_masked_l1_tiny_hand_example() -> None:
    pred = torch.zeros(1, 1, 2, 2, 4, requires_grad=True)
    target = torch.ones(1, 1, 2, 2, 4)
    target[..., 2:] = 3.0
    mask = torch.tensor([[[[False, True]]]])  # grid (1, 1, 2): the right half (W 2..3) is masked
    loss = masked_l1_loss(pred, target, mask)
    assert loss.item() == 3.0
    loss.backward()
    assert pred.grad is not None
    assert pred.grad[..., :2].abs().sum() == 0 and torch.all(pred.grad[..., 2:] == -1.0 / 8)


def test_masked_l1_matches_voxel_loop_and_ignores_unmasked_voxels() -> None:
    gen = torch.Generator().manual_seed(4)
    pred = torch.randn(2, 2, 4, 6, 2, generator=gen)
    target = torch.randn(2, 2, 4, 6, 2, generator=gen)
    mask = torch.tensor([[[[True], [False]], [[False], [True]]], [[[False], [False]], [[True], [False]]]])  # (2,2,2,1)
    total, count = 0.0, 0
    for b, c, z, y, x in np.ndindex(*pred.shape):
        if mask[b, z // 2, y // 3, x // 2]:
            total += abs(pred[b, c, z, y, x].item() - target[b, c, z, y, x].item())
            count += 1
    assert count == 3 * 2 * 12  # 3 masked cells, 2 channels, 12 voxels per cell
    loss = masked_l1_loss(pred, target, mask)
    assert loss.item() == pytest.approx(total / count, rel=1e-5)

    voxel_mask = upsample_mask(mask, (4, 6, 2)).unsqueeze(1).expand_as(pred)
    changed = pred.clone()
    changed[~voxel_mask] += 10.0
    assert masked_l1_loss(changed, target, mask).item() == loss.item()
    changed[voxel_mask] += 10.0
    assert masked_l1_loss(changed, target, mask).item() != loss.item()


def test_masked_l1_nothing_masked_is_zero_with_grad() -> None:
    pred = torch.randn(1, 1, 4, 4, 4, requires_grad=True)
    loss = masked_l1_loss(pred, torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 2, 2, 2, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert pred.grad is not None and pred.grad.abs().sum() == 0


def test_upsample_mask_blocks_and_rejects_non_integer_factor() -> None:
    mask = torch.tensor([[[[True, False]], [[False, True]]]])  # (1, 2, 1, 2)
    up = upsample_mask(mask, (4, 3, 2))
    assert up.shape == (1, 4, 3, 2) and up.dtype == torch.bool
    assert up[0, :2, :, 0].all() and not up[0, :2, :, 1].any()
    assert up[0, 2:, :, 1].all() and not up[0, 2:, :, 0].any()
    with pytest.raises(ValueError, match="integer multiple"):
        upsample_mask(mask, (5, 3, 2))
    with pytest.raises(ValueError, match="integer multiple"):
        masked_l1_loss(torch.zeros(1, 1, 5, 3, 2), torch.zeros(1, 1, 5, 3, 2), mask)


# ----------------------------------------------------------------------- Sinkhorn-Knopp, KoLeo


def test_sinkhorn_rows_are_distributions_and_prototypes_are_used_equally() -> None:
    from smartformer.loss import sinkhorn_knopp

    logits = torch.randn(8, 4, generator=torch.Generator().manual_seed(0)) * 3
    q = sinkhorn_knopp(logits, temp=0.5, iterations=200)
    assert torch.allclose(q.sum(1), torch.ones(8), atol=1e-5)  # one unit per sample
    assert torch.allclose(q.sum(0), torch.full((4,), 2.0), atol=1e-4)  # N / K per prototype
    plain = torch.softmax(logits / 0.5, dim=-1)
    assert not torch.allclose(plain.sum(0), torch.full((4,), 2.0), atol=1e-2)  # softmax alone does not balance


def test_sinkhorn_ignores_a_bias_towards_one_prototype() -> None:
    # The collapse EMA centering fights slowly: every input leaning to the same prototype. A
    # per-prototype constant is a column scaling of exp(logits / T), which Sinkhorn-Knopp removes.
    from smartformer.loss import sinkhorn_knopp

    logits = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    bias = torch.tensor([4.0, 0.0, -1.0, 0.5, 2.0])
    a = sinkhorn_knopp(logits, temp=0.1, iterations=300)
    b = sinkhorn_knopp(logits + bias, temp=0.1, iterations=300)
    assert torch.allclose(a, b, atol=1e-4)


def test_sinkhorn_queue_holds_the_newest_teacher_rows_and_sharpens_small_batches() -> None:
    k = 64
    loss = DINOLoss(k, centering="sinkhorn", queue_size=6)
    first, second = torch.randn(2, 2, k), torch.randn(2, 2, k)
    loss.update_center(list(first))
    assert int(loss.queue_filled) == 4 and torch.equal(loss.queue[:4], first.reshape(4, k))
    loss.update_center(list(second))
    assert int(loss.queue_filled) == 6
    assert torch.equal(loss.queue[:4], second.reshape(4, k)) and torch.equal(loss.queue[4:], first.reshape(4, k)[:2])
    # Balanced over 64 prototypes, 4 rows must each spread over >= 16 of them; past rows in the
    # queue carry most of the balancing, so the current rows may stay sharp.
    no_queue = DINOLoss(k, centering="sinkhorn", sinkhorn_iterations=100)
    logits = torch.randn(1000, k, generator=torch.Generator().manual_seed(0))
    queued = DINOLoss(k, centering="sinkhorn", queue_size=996, sinkhorn_iterations=100)
    queued.update_center([logits[4:]])
    alone, with_queue = no_queue.teacher_entropy(logits[:4], 0.1), queued.teacher_entropy(logits[:4], 0.1)
    assert alone > math.log(16) / math.log(k) - 0.02
    assert with_queue < alone - 0.1


def test_dino_loss_with_sinkhorn_targets_is_the_cross_entropy_against_them() -> None:
    from smartformer.loss import sinkhorn_knopp

    k, ts, tt = 5, 0.1, 0.07
    loss = DINOLoss(k, student_temp=ts, centering="sinkhorn")
    g = torch.Generator().manual_seed(3)
    student = [torch.randn(3, k, generator=g) for _ in range(2)]
    teacher = [torch.randn(3, k, generator=g) for _ in range(2)]
    p = sinkhorn_knopp(torch.cat(teacher), tt).reshape(2, 3, k).numpy()
    s = [x.numpy() / ts for x in student]
    expected = (_np_ce(p[0], s[1]).mean() + _np_ce(p[1], s[0]).mean()) / 2
    assert loss(student, teacher, tt).item() == pytest.approx(expected, rel=1e-5)


def test_queue_needs_sinkhorn() -> None:
    with pytest.raises(ValueError, match="sinkhorn"):
        DINOLoss(8, queue_size=4)


def test_batch_entropy_tells_one_hot_collapse_from_sharp_targets() -> None:
    k = 16
    same = torch.zeros(4, k)
    same[:, 3] = 1.0
    different = torch.eye(k)[:4]
    assert DINOLoss.batch_entropy(same) == pytest.approx(0.0, abs=1e-6)
    assert DINOLoss.batch_entropy(different) == pytest.approx(math.log(4) / math.log(k), rel=1e-5)
    assert DINOLoss.entropy_fraction(same) == DINOLoss.entropy_fraction(different) == pytest.approx(0.0, abs=1e-6)


def test_koleo_closed_form_and_it_pushes_a_pair_apart() -> None:
    from smartformer.loss import KoLeoLoss

    koleo = KoLeoLoss()
    orthogonal = torch.tensor([[3.0, 0.0], [0.0, 0.5]])  # normalised distance sqrt(2)
    assert koleo(orthogonal).item() == pytest.approx(-0.5 * math.log(2.0), rel=1e-6)
    theta = 0.2
    close = torch.tensor([[1.0, 0.0], [math.cos(theta), math.sin(theta)]])
    assert koleo(close).item() == pytest.approx(-math.log(2 * math.sin(theta / 2)), rel=1e-5)
    x = close.clone().requires_grad_(True)
    koleo(x).backward()
    with torch.no_grad():
        moved = x - 0.01 * x.grad
    cos = lambda z: float(torch.nn.functional.cosine_similarity(z[0:1], z[1:2]))  # noqa: E731
    assert cos(moved) < cos(close)
    with pytest.raises(ValueError, match="B >= 2"):
        koleo(torch.ones(1, 4))


def test_patch_branch_can_keep_its_own_teacher_temperature() -> None:
    # A [CLS] temperature of 0.02 keeps the [CLS] targets informative at batch 2 but makes the
    # patch targets one-hot; loss.patch_teacher_temp keeps the patch branch warmer.
    from smartformer.config import load_config
    from smartformer.train.ssl_meta_arch import SMARTMetaArch

    views = torch.rand(2, 2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))

    def terms(overrides: list[str], temp: float) -> dict[str, float]:
        torch.manual_seed(0)
        meta = SMARTMetaArch(load_config("tiny", ["data.roi=[32,32,32]", "masking.warmup_steps=0", *overrides]))
        return meta(views, 10, temp, generator=torch.Generator().manual_seed(1)).terms

    split = terms(["loss.teacher_temp=0.02", "loss.patch_teacher_temp=0.07"], 0.02)
    warm = terms(["loss.teacher_temp=0.07"], 0.07)
    cold = terms(["loss.teacher_temp=0.02"], 0.02)
    assert split["loss_patch"] == pytest.approx(warm["loss_patch"], rel=1e-6)
    assert split["teacher_patch_entropy"] == pytest.approx(warm["teacher_patch_entropy"], rel=1e-6)
    assert split["loss_cls"] == pytest.approx(cold["loss_cls"], rel=1e-6)
    assert split["teacher_patch_entropy"] > cold["teacher_patch_entropy"] + 0.01


def test_local_views_join_the_cls_loss_only() -> None:
    # Multi-crop: the student's [CLS] of each local view is paired with every teacher (global) view;
    # the other terms, the teacher and the monitors see the global views alone.
    from smartformer.config import load_config
    from smartformer.train.ssl_meta_arch import SMARTMetaArch

    g = torch.Generator().manual_seed(0)
    views, local = torch.rand(2, 2, 1, 32, 32, 32, generator=g), torch.rand(2, 3, 1, 32, 32, 32, generator=g)
    torch.manual_seed(0)
    meta = SMARTMetaArch(
        load_config(
            "tiny",
            ["data.roi=[32,32,32]", "data.local_views=3", "masking.warmup_steps=0", "model.backbone.drop_path_rate=0"],
        )
    )

    def step(local_views: torch.Tensor | None):
        return meta(views, 10, 0.04, generator=torch.Generator().manual_seed(1), local_views=local_views)

    plain, multi = step(None), step(local)
    for key in ("loss_recon", "loss_patch", "teacher_cls_entropy", "teacher_cls_cosine"):
        assert multi.terms[key] == pytest.approx(plain.terms[key], rel=1e-6)
    # by hand: 2 global + 3 local student views against 2 teacher views = 2 global pairs + 6 local ones
    with torch.no_grad():
        s_local = meta.student(local.transpose(0, 1).reshape(6, 1, 32, 32, 32), reconstruct=False)["cls_logits"]
        targets = meta.dino_loss.view_targets(multi.teacher_cls_logits, 0.04)  # (2 views, 2 volumes, K)
        log_s = F.log_softmax(s_local / 0.1, dim=-1).reshape(3, 2, -1)
        local_sum = -(torch.einsum("qbk,vbk->qv", targets, log_s) / 2).sum()
    expected = (plain.terms["loss_cls"] * 2 + float(local_sum)) / 8
    assert multi.terms["loss_cls"] == pytest.approx(expected, rel=1e-5)
    assert multi.terms["loss_cls"] != pytest.approx(plain.terms["loss_cls"], rel=1e-5)
    multi.loss.backward()
    grads = [p.grad for n, p in meta.student.named_parameters() if n.startswith("cls_head") and p.requires_grad]
    assert grads and all(gr is not None and torch.isfinite(gr).all() for gr in grads)


@pytest.mark.parametrize(
    "preset, overrides, needle",
    [
        ("vit_tiny", ["data.local_views=2"], "Swin backbone"),
        ("tiny", ["data.roi=[32,32,32]", "data.local_views=2", "loss.cls_weight=0"], "loss.cls_weight"),
    ],
)
def test_local_views_are_refused_where_nothing_would_learn_from_them(
    preset: str, overrides: list[str], needle: str
) -> None:
    from smartformer.config import load_config
    from smartformer.errors import ConfigError
    from smartformer.train.ssl_meta_arch import SMARTMetaArch

    with pytest.raises(ConfigError, match=needle):
        SMARTMetaArch(load_config(preset, overrides))
