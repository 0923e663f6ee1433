"""Ranking metrics shared by training rewards, evaluation and `recommend.py`.

Ranks are 1-based (1 = best). Ties count against the target: an item scored exactly like the
target is ranked ahead of it, so a constant scorer never looks good. A target whose score is
masked (-inf: bought before, and history items are never recommended) is not ranked: its rank
is inf, a miss at every k, in rewards and metrics alike.
"""
import math

import torch

KS = (5, 10, 20)


def target_rank(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """SPEC §4.2 rank of each row's target among all items, 1 = best, inf where its score is
    masked (or NaN).  scores (B, N), targets (B,) -> (B,) float64."""
    target_scores = scores.gather(1, targets[:, None])  # (B, 1)
    ranks = (scores >= target_scores).sum(dim=1).double()  # (B,) the target itself counts once
    return ranks.masked_fill(~(target_scores.squeeze(1) > -math.inf), math.inf)  # NaN too: never a hit


def top_items(scores: torch.Tensor, targets: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best items of each row, best first, ties as `target_rank` counts them: items scored
    like the target before it, other ties by item id; a ranked target sits at its rank.
    scores (B, N), targets (B,) -> (values (B, k), item ids (B, k))."""
    target_last = torch.argsort((torch.arange(scores.shape[1], device=scores.device) == targets[:, None]).int(),
                                dim=1, stable=True)  # (B, N) ids, each row's target moved to the end
    by_score = torch.argsort(scores.gather(1, target_last), dim=1, descending=True, stable=True)[:, :k]
    ids = target_last.gather(1, by_score)  # (B, k)
    return scores.gather(1, ids), ids


def ndcg_at_k(ranks: torch.Tensor, k: int) -> torch.Tensor:
    """SPEC §4.2 NDCG@k for one relevant item: 1/log2(rank+1) if rank <= k else 0.  ranks (B,) -> (B,)."""
    gain = 1.0 / torch.log2(ranks.double() + 1.0)
    return torch.where(ranks <= k, gain, torch.zeros_like(gain))


def hit_at_k(ranks: torch.Tensor, k: int) -> torch.Tensor:
    """Hit@k: 1 if rank <= k else 0.  ranks (B,) -> (B,)."""
    return (ranks <= k).double()


RANKING_METRICS = {"NDCG": ndcg_at_k, "Hit": hit_at_k}  # printed label -> per-sample metric(ranks, k)


def metric_name(label: str, k: int) -> str:
    """The key of a figure: "ndcg@10", "hit@5", ..."""
    return f"{label.lower()}@{k}"


METRIC_NAMES = [metric_name(label, k) for label in RANKING_METRICS for k in KS]  # keys, in printing order


def ranking_metrics(ranks: torch.Tensor) -> dict[str, float]:
    """Mean of each of `RANKING_METRICS` at each of `KS` over samples, keyed `ndcg@10`, `hit@10`, ...
    ranks (B,)."""
    return {metric_name(label, k): metric(ranks, k).mean().item() if ranks.numel() else math.nan
            for label, metric in RANKING_METRICS.items() for k in KS}


def split_metrics(records: list[dict]) -> dict[str, float]:
    """SPEC §5 figures of one split from its recommendation records (`RecPOTrainer.recommend`):
    `ranking_metrics` of the target ranks (None: not ranked) and the mean reasoning length in tokens."""
    ranks = [math.inf if r["target_rank"] is None else r["target_rank"] for r in records]
    metrics = ranking_metrics(torch.tensor(ranks, dtype=torch.float64))
    metrics["reasoning_length"] = sum(r["reasoning_tokens"] for r in records) / len(records) if records else math.nan
    return metrics
