"""A tiny dataset in preprocess.py's output format, built in memory for trainer tests, and the
trainer settings the tests run it with."""
import json

from datasets import Dataset, DatasetDict

GROUPS = ("Racing", "Puzzle", "Horror", "Sports")
DAY_MS = 86_400_000


def item_rows(items_per_group: int = 4) -> list[dict]:
    rows = [{"item_id": 0, "parent_asin": "pad_asin", "title": "pad_title", "main_category": "", "subtitle": "",
             "average_rating": 0.0, "rating_number": 0, "features": [], "description": [], "price": 0.0,
             "store": "", "categories": [], "details": "{}"}]
    for g, group in enumerate(GROUPS):
        for k in range(items_per_group):
            item_id = len(rows)
            rows.append({"item_id": item_id, "parent_asin": f"B{item_id:04d}", "title": f"{group} Game {k + 1}",
                         "main_category": "Video Games", "subtitle": "", "average_rating": 3.5 + 0.1 * k,
                         "rating_number": 10 + item_id, "features": [], "description": [f"A {group.lower()} game."],
                         "price": 9.99, "store": "Studio", "categories": [], "details": json.dumps({})})
    return rows


def sample_rows(items: list[dict], num_users: int = 8, history: int = 3) -> list[dict]:
    """Each user buys inside one group: history of `history` items, target the next one."""
    per_group = (len(items) - 1) // len(GROUPS)
    rows = []
    for u in range(num_users):
        g = u % len(GROUPS)
        ids = [1 + g * per_group + (u // len(GROUPS) + k) % per_group for k in range(history + 1)]
        times = [1_690_000_000_000 + (u * 10 + k) * DAY_MS for k in range(history + 1)]
        rows.append({
            "user_id": f"U{u}", "item_asins": [items[i]["parent_asin"] for i in ids[:-1]],
            "item_asin": items[ids[-1]]["parent_asin"], "history_item_id": ids[:-1], "item_id": ids[-1],
            "history_item_title": [items[i]["title"] for i in ids[:-1]], "item_title": items[ids[-1]]["title"],
            "history_rating": [5.0] * history, "rating": 4.0, "history_timestamp": times[:-1],
            "timestamp": times[-1], "interaction_id": u,
        })
    return rows


def bought_again(row: dict, items: list[dict]) -> None:
    """Make the row's target its first history item: masked with the history, never ranked."""
    target = row["history_item_id"][0]
    row.update(item_id=target, item_asin=items[target]["parent_asin"], item_title=items[target]["title"])


def tiny_dataset(num_train: int = 8, num_eval: int = 4) -> DatasetDict:
    """The last valid and the last test sample are repeat purchases (`bought_again`)."""
    items = item_rows()
    samples = sample_rows(items, num_users=num_train + 2 * num_eval)
    for row in (samples[num_train + num_eval - 1], samples[-1]):
        bought_again(row, items)
    return DatasetDict({
        "train": Dataset.from_list(samples[:num_train]),
        "valid": Dataset.from_list(samples[num_train:num_train + num_eval]),
        "test": Dataset.from_list(samples[num_train + num_eval:]),
        "item_info": Dataset.from_list(items),
    })


def tiny_config(output_dir: str, **overrides):
    """RecPOConfig for tiny backbones on the CPU: float32, nothing logged, evaluated or saved unless
    asked for, one step of 2 users × 2 reasonings of at most 12 tokens, sampled at temperature 1."""
    from trainer import RecPOConfig  # torch and transformers only where a trainer is built

    values = dict(
        output_dir=output_dir, use_cpu=True, bf16=False, report_to="none", eval_strategy="no", save_strategy="no",
        load_best_model_at_end=False, eval_on_start=False, dataloader_num_workers=0,
        per_device_train_batch_size=2, group_size=2, micro_batch_size=2, max_new_tokens=12, gen_temperature=1.0,
        gen_top_k=0, max_steps=1, learning_rate=1e-2, warmup_steps=0, per_device_eval_batch_size=4,
    )
    return RecPOConfig(**{**values, **overrides})
