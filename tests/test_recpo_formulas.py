"""SPEC §4 formulas and §5 metrics against values computed by hand."""
import math

import pytest
import torch

from metrics import ranking_metrics, split_metrics, target_rank, top_items
from trainer import (RepeatedBatchSampler, clipped_item_loss, clipped_token_loss, group_advantages, recpo_reward,
                     relabel_mask)

NEG = float("-inf")


def test_reward_rank_ndcg_and_softmax_by_hand():
    scores = torch.tensor([[NEG, 2.0, 1.0, 3.0, 0.5]])  # pad masked; target item 2 is 3rd best
    reward, terms = recpo_reward(scores, torch.tensor([2]), beta=0.05, ndcg_k=1000)
    softmax_target = math.exp(1.0) / (math.exp(2.0) + math.exp(1.0) + math.exp(3.0) + math.exp(0.5))
    assert target_rank(scores, torch.tensor([2])).item() == 3
    assert terms.keys() == {"ndcg", "softmax"}
    assert terms["ndcg"].item() == pytest.approx(1 / math.log2(4))
    assert terms["softmax"].item() == pytest.approx(softmax_target, rel=1e-6)
    assert reward.item() == pytest.approx(0.95 * 0.5 + 0.05 * softmax_target, rel=1e-6)
    # Past the cut-off only the softmax term is left.
    reward_k2, terms_k2 = recpo_reward(scores, torch.tensor([2]), beta=0.05, ndcg_k=2)
    assert terms_k2["ndcg"].item() == 0.0
    assert reward_k2.item() == pytest.approx(0.05 * softmax_target, rel=1e-6)


def test_ties_rank_the_target_behind_equal_scores():
    scores = torch.tensor([[NEG, 1.0, 1.0, 1.0]])
    assert target_rank(scores, torch.tensor([1])).item() == 3


def test_top_items_list_the_target_at_its_rank():
    scores = torch.tensor([[NEG, 1.0, 1.0, 0.0], [NEG, 1.0, 1.0, 0.0]])  # items 1 and 2 tie
    values, ids = top_items(scores, torch.tensor([1, 3]), 3)
    assert ids.tolist() == [[2, 1, 3], [1, 2, 3]] and values.tolist() == [[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]]
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (50, 12), generator=generator).float()  # many ties
    scores[:, 0] = NEG
    targets = torch.randint(1, 12, (50,), generator=generator)
    _, ids = top_items(scores, targets, 12)
    positions = (ids == targets[:, None]).float().argmax(dim=1) + 1
    assert positions.tolist() == target_rank(scores, targets).tolist()
    assert all(sorted(row) == list(range(12)) for row in ids.tolist())


def test_a_masked_target_is_a_miss_at_every_k():
    # Bought before: the target (item 3) is masked with the history. Counting every item >= -inf
    # would rank it 4th of 4, a hit at k = 5 and an NDCG reward at k = 1000.
    scores = torch.tensor([[NEG, 1.0, 2.0, NEG], [NEG, 1.0, 2.0, 0.5]])
    ranks = target_rank(scores, torch.tensor([3, 3]))
    assert ranks.tolist() == [math.inf, 3.0]
    diverged = torch.tensor([[NEG, 1.0, 2.0, float("nan")]])  # a NaN score ranks nothing above it: not a hit
    assert target_rank(diverged, torch.tensor([3])).tolist() == [math.inf]
    reward, terms = recpo_reward(scores, torch.tensor([3, 3]), beta=0.05, ndcg_k=1000)
    assert terms["ndcg"].tolist() == [0.0, pytest.approx(0.5)] and terms["softmax"][0].item() == 0.0
    assert reward[0].item() == 0.0
    metrics = ranking_metrics(ranks)
    assert metrics["hit@5"] == 0.5 and metrics["ndcg@5"] == pytest.approx(0.25)
    records = [{"target_rank": None, "reasoning_tokens": 4}, {"target_rank": 3, "reasoning_tokens": 6}]
    assert split_metrics(records) == {**metrics, "reasoning_length": 5.0}


def test_gaussian_advantage_by_hand():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 0.5, 0.5, 0.5]])
    std = math.sqrt((1.5 ** 2 + 0.5 ** 2 + 0.5 ** 2 + 1.5 ** 2) / 3)  # unbiased
    expected = torch.tensor([[-1.5, -0.5, 0.5, 1.5]]) / (std + 1e-8)
    advantages = group_advantages(rewards, "gaussian")
    torch.testing.assert_close(advantages[0:1], expected)
    assert torch.equal(advantages[1], torch.zeros(4)), "equal rewards give zero advantage, not NaN"


def test_rloo_advantage_by_hand():
    advantages = group_advantages(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), "rloo")
    torch.testing.assert_close(advantages, torch.tensor([[1 - 3.0, 2 - 8 / 3, 3 - 7 / 3, 4 - 2.0]]))


def test_an_unknown_advantage_type_is_refused_not_read_as_another():
    with pytest.raises(ValueError, match="unknown advantage type 'RLOO': use one of gaussian, rloo"):
        group_advantages(torch.tensor([[1.0, 2.0]]), "RLOO")


def test_single_sample_groups():
    rewards = torch.tensor([[0.3], [0.9]])
    assert torch.equal(group_advantages(rewards, "gaussian"), torch.ones(2, 1))
    assert torch.equal(group_advantages(rewards, "rloo"), torch.zeros(2, 1))


def test_relabel_mask_picks_top_advantages_per_group():
    advantages = torch.tensor([[-1.0, 0.5, 0.3, 2.0], [0.1, 0.1, -0.2, 0.0]])
    torch.testing.assert_close(relabel_mask(advantages, 2), torch.tensor([[0.0, 1, 0, 1], [1, 1, 0, 0]]))
    torch.testing.assert_close(relabel_mask(advantages, 1), torch.tensor([[0.0, 0, 0, 1], [1, 0, 0, 0]]))


def test_token_loss_above_inside_and_below_the_clip_range():
    # Trajectory 0 (A = +1): ratios 1.5 (clipped to 1.28), 1.1 (inside), 0.5 (min keeps 0.5), pad.
    # Trajectory 1 (A = -1): ratios 1.5 (min keeps -1.5), 0.5 (clipped to 0.8).
    ratios = torch.tensor([[1.5, 1.1, 0.5, 1.0], [1.5, 0.5, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    old = torch.full((2, 4), -2.0)
    new = (old + ratios.log()).requires_grad_()
    loss, clip_fraction = clipped_token_loss(new, old, torch.tensor([1.0, -1.0]), mask, 0.2, 0.28)
    per_token = [-1.28, -1.1, -0.5, 1.5, 0.8]
    assert loss.item() == pytest.approx(sum(per_token) / 5 / 2, rel=1e-5)
    assert clip_fraction.item() == pytest.approx(2 / 5)
    loss.backward()
    # Clipped tokens get no gradient; the others get -A·ρ / (count · M).
    expected_grad = torch.tensor([[0.0, -1.1, -0.5, 0.0], [1.5, 0.0, 0.0, 0.0]]) / 5 / 2
    torch.testing.assert_close(new.grad, expected_grad)


def test_token_loss_on_policy_is_reinforce():
    logprobs = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss, _ = clipped_token_loss(logprobs, logprobs.detach(), torch.tensor([0.7]), torch.ones(1, 2), 0.2, 0.28)
    assert loss.item() == pytest.approx(-0.7)
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-0.35, -0.35]]))


def test_item_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0], [1.0, 1.0]], requires_grad=True)
    labels = torch.tensor([0, 1])
    p0 = math.exp(2) / (math.exp(2) + 1)
    old = torch.tensor([p0 / 1.5, 0.5]).log()  # row 0: q = 1.5 -> clipped to 1.28 with Â = 2; row 1: q = 1
    loss, logprobs = clipped_item_loss(logits, labels, old, torch.tensor([2.0, -1.0]), 0.2, 0.28, num_trajectories=4)
    torch.testing.assert_close(logprobs, torch.tensor([p0, 0.5]).log())
    assert loss.item() == pytest.approx((-1.28 * 2 + 1.0) / 4, rel=1e-5)
    on_policy, _ = clipped_item_loss(logits, labels, None, torch.tensor([2.0, -1.0]), 0.2, 0.28, 2)
    assert on_policy.item() == pytest.approx((-2.0 + 1.0) / 2)
    # The lower bound is 1 - ε_low: q = 0.5 with Â = -1 is clipped to 0.8, -min(-0.5, -0.8) = 0.8.
    low, _ = clipped_item_loss(torch.zeros(1, 2), torch.tensor([0]), torch.tensor([0.0]), torch.tensor([-1.0]),
                               0.2, 0.28, num_trajectories=1)
    assert low.item() == pytest.approx(0.8)


def test_off_policy_item_loss_is_exact_below_float32_probabilities():
    """--num_iterations > 1: an unchanged policy has q = 1 even where p_old = e^-90 is below
    float32's normal range (a stored probability would read back as e^-87.3: q = 0.07, and with
    Â = -1 the clip would take 0.8 and drop the row's gradient)."""
    logits = torch.tensor([[0.0, 90.0]], requires_grad=True)
    labels = torch.tensor([0])
    _, old = clipped_item_loss(logits, labels, None, torch.tensor([-1.0]), 0.2, 0.28, num_trajectories=1)
    assert old.item() == pytest.approx(-90, rel=1e-6)
    loss, _ = clipped_item_loss(logits, labels, old, torch.tensor([-1.0]), 0.2, 0.28, num_trajectories=1)
    assert loss.item() == pytest.approx(1.0)  # -min(q·Â, clip(q)·Â) with q = 1, Â = -1
    loss.backward()
    torch.testing.assert_close(logits.grad, torch.tensor([[1.0, -1.0]]), atol=1e-6, rtol=0)  # -Â·(softmax - onehot)·-1


def test_on_policy_item_loss_is_exact_for_tiny_probabilities():
    """q = 1 on-policy even where p underflows a quotient (p ≈ e^-60 here): the loss is -Â and
    its gradient that of -Â·log p, i.e. -Â·(onehot - softmax) on the logits."""
    logits = torch.tensor([[0.0, 60.0], [0.0, 0.0]], requires_grad=True)
    labels = torch.tensor([0, 1])
    advantages = torch.tensor([1.5, -0.5])
    loss, logprobs = clipped_item_loss(logits, labels, None, advantages, 0.2, 0.28, num_trajectories=2)
    assert loss.item() == pytest.approx(-(1.5 - 0.5) / 2)
    assert logprobs[0].item() == pytest.approx(-60, rel=1e-6)
    loss.backward()
    softmax = torch.tensor([[math.exp(-60), 1.0], [0.5, 0.5]])
    onehot = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(logits.grad, -advantages[:, None] * (onehot - softmax) / 2)


def test_ranking_metrics_on_a_crafted_score_matrix():
    scores = torch.tensor([
        [NEG] + [float(30 - i) for i in range(30)],  # target item 1 is the best: rank 1
        [NEG] + [float(30 - i) for i in range(30)],  # target item 7: rank 7
        [NEG] + [float(30 - i) for i in range(30)],  # target item 15: rank 15
        [NEG] + [float(30 - i) for i in range(30)],  # target item 25: rank 25
    ])
    ranks = target_rank(scores, torch.tensor([1, 7, 15, 25]))
    assert ranks.tolist() == [1, 7, 15, 25]
    metrics = ranking_metrics(ranks)
    g = lambda r: 1 / math.log2(r + 1)  # noqa: E731
    assert metrics["hit@5"] == pytest.approx(1 / 4)
    assert metrics["hit@10"] == pytest.approx(2 / 4)
    assert metrics["hit@20"] == pytest.approx(3 / 4)
    assert metrics["ndcg@5"] == pytest.approx(g(1) / 4)
    assert metrics["ndcg@10"] == pytest.approx((g(1) + g(7)) / 4)
    assert metrics["ndcg@20"] == pytest.approx((g(1) + g(7) + g(15)) / 4)


def test_repeated_batch_sampler_layout_and_determinism():
    sampler = RepeatedBatchSampler(num_samples=9, global_batch=4, repeats=2, seed=3)
    order = list(sampler)
    assert len(order) == len(sampler) == 16
    assert order[0:4] == order[4:8] and order[8:12] == order[12:16]
    assert len(set(order[0:4] + order[8:12])) == 8
    assert order == list(RepeatedBatchSampler(9, 4, 2, seed=3))
    epoch = [0]
    sampler = RepeatedBatchSampler(9, 4, 2, seed=3, current_epoch=lambda: epoch[0])
    assert list(sampler) == order
    epoch[0] = 1
    assert list(sampler) != order and list(sampler) == list(RepeatedBatchSampler(9, 4, 2, seed=4))


def test_a_metric_added_to_the_registry_reaches_the_figures_and_recommends_table(monkeypatch):
    """README's change table: a new metric is one function and one `RANKING_METRICS` entry (names derived
    from it at import, METRIC_NAMES and SELECTION_METRICS, follow an edit of the source, not this patch)."""
    import metrics
    from recommend import format_metrics

    monkeypatch.setitem(metrics.RANKING_METRICS, "MRR", lambda ranks, k: torch.where(ranks <= k, 1.0 / ranks, 0.0))
    ranks = torch.tensor([1, 4, 8, 30])
    values = metrics.ranking_metrics(ranks)
    assert values["mrr@5"] == pytest.approx((1 + 1 / 4) / 4)
    assert values["mrr@10"] == pytest.approx((1 + 1 / 4 + 1 / 8) / 4)
    assert values["ndcg@5"] == pytest.approx((1 + 1 / math.log2(5)) / 4)
    table = format_metrics({**values, "reasoning_length": 12.0}, "test", 4).splitlines()
    assert table[-1].split() == ["MRR", f"{1.25 / 4:.4f}", f"{1.375 / 4:.4f}", f"{1.375 / 4:.4f}"]
