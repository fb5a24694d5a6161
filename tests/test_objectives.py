"""The test-time objectives and the label-free guard, against their formulas."""

import torch

from rankmerge.workers.tta.guard import GuardTally, GuardTrack, holdout_split
from rankmerge.workers.tta.objectives import distill, entropy, infomax


def test_distill_is_the_tempered_kl_and_vanishes_at_the_teacher():
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(5, 7, generator=gen), torch.randn(5, 7, generator=gen)
    for temperature in (1.0, 2.0):
        p = torch.softmax(teacher / temperature, -1)
        expected = (p * (p.log() - torch.log_softmax(student / temperature, -1))).sum(-1).mean() * temperature**2
        torch.testing.assert_close(distill(student, teacher, temperature=temperature), expected)
        assert float(distill(teacher, teacher, temperature=temperature)) < 1e-6


def test_distill_over_top_k_token_support_uses_the_given_vocabulary_ids():
    gen = torch.Generator().manual_seed(1)
    student = torch.randn(2, 3, 11, generator=gen)  # [B, L, V]
    full_teacher = torch.randn(2, 3, 11, generator=gen)
    top = full_teacher.topk(11, dim=-1)  # k = V: the top-k KL is the exact KL
    valid = torch.tensor([[1, 1, 0], [1, 1, 1]])
    exact = distill(student, full_teacher, valid=valid)
    torch.testing.assert_close(distill(student, top.values, top.indices, valid), exact)


def test_infomax_punishes_collapse_that_entropy_rewards():
    collapsed = torch.tensor([[9.0, 0.0, 0.0]] * 4)
    balanced = torch.tensor([[9.0, 0, 0], [0, 9.0, 0], [0, 0, 9.0], [9.0, 0, 0]])
    assert torch.isclose(entropy(collapsed), entropy(balanced))
    assert float(infomax(balanced)) < float(infomax(collapsed)) - 0.5


def test_infomax_gradient_over_ranks_equals_the_full_batch_gradient():
    """Two data-parallel ranks, each with half the batch: the mean of their gradients is the one-process gradient."""
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(8, 5, generator=gen, requires_grad=True)
    (full,) = torch.autograd.grad(infomax(logits), logits)
    halves = [logits[:4], logits[4:]]
    local = [(torch.softmax(h.detach(), -1).sum(0), torch.tensor(4.0)) for h in halves]

    def group_sum(value):  # what all_reduce returns: the sum of every rank's value of the same quantity
        return sum(p for p, _ in local) if value.dim() else sum(c for _, c in local)

    per_rank = [torch.autograd.grad(infomax(h, None, group_sum, world=2), logits)[0] for h in halves]
    torch.testing.assert_close(sum(per_rank) / 2, full)
    values = [float(infomax(h.detach(), None, group_sum, world=2)) for h in halves]
    assert abs(sum(values) / 2 - float(infomax(logits.detach()))) < 1e-5


def test_holdout_split_is_disjoint_seeded_and_capped():
    held, pool = holdout_split(100, 0.1, 512, 0, "cars")
    assert held.numel() == 10 and pool.numel() == 90 and not set(held.tolist()) & set(pool.tolist())
    assert torch.equal(held, holdout_split(100, 0.1, 512, 0, "cars")[0])
    assert not torch.equal(held, holdout_split(100, 0.1, 512, 0, "dtd")[0])
    assert holdout_split(10_000, 0.5, 64, 0, "x")[0].numel() == 64
    assert holdout_split(9, 0.5, 64, 0, "x")[0].numel() == 0


def test_guard_keeps_the_best_state_and_reports_a_collapse():
    track = GuardTrack()
    healthy, better = {"agreement": 0.8, "spread": 0.9}, {"agreement": 0.9, "spread": 0.9}
    collapsed = {"agreement": 0.95, "spread": 0.1}  # high agreement on a lopsided slice, but one class everywhere
    assert track.record(0, [healthy]) and track.best_step == 0
    assert track.record(50, [better]) and track.best_step == 50
    assert not track.record(100, [collapsed]) and track.best_step == 50
    assert "collapsed" in track.degraded()
    resumed = GuardTrack()
    resumed.load(track.state(), step=50)
    assert resumed.best_step == 50 and [p["step"] for p in resumed.curve] == [0, 50]


def test_guard_tally_counts_agreement_and_spread():
    tally = GuardTally()
    logits = torch.tensor([[5.0, 0.0], [0.0, 5.0], [5.0, 0.0], [5.0, 0.0]])
    tally.add(logits[:2], torch.tensor([0, 0]))
    tally.add(logits[2:], torch.tensor([0, 0]))
    signals = tally.signals()
    assert signals["agreement"] == 0.75
    one_class = GuardTally()
    one_class.add(torch.tensor([[9.0, -9.0]] * 4), torch.tensor([0, 0, 0, 0]))
    assert one_class.signals()["spread"] < 0.01 < signals["spread"]


def test_teacher_cache_is_reused_only_when_intact_and_of_this_job(tmp_path):
    from rankmerge.workers.tta.teachers import CACHE, load_teachers, save_teachers

    targets = [{"teacher_logits": torch.randn(4, 3)}, {"teacher_logits": torch.randn(5, 2)}]
    save_teachers(tmp_path, ["a", "b"], targets, "job-1")
    loaded = load_teachers(tmp_path, ["a", "b"], "job-1")
    assert all(torch.equal(x["teacher_logits"], y["teacher_logits"]) for x, y in zip(loaded, targets))
    assert load_teachers(tmp_path, ["a", "b"], "job-2") is None  # another job (spec or input files changed)
    data = bytearray((tmp_path / CACHE).read_bytes())
    data[-1] ^= 1
    (tmp_path / CACHE).write_bytes(bytes(data))
    assert load_teachers(tmp_path, ["a", "b"], "job-1") is None  # damaged: recomputed, never trusted
    assert load_teachers(tmp_path / "nowhere", ["a"], "job-1") is None
