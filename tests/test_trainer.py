"""RecPO trainer on tiny backbones: a real step, several processes, DeepSpeed, resume, failures."""
import base64
import glob
import hashlib
import json
import math
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import types
import warnings
import zipfile

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import run_folder
import train
from train import free_port  # launches never collide on a fixed port
from dataset import load_dataset_dir
from errors import LAUNCHER_VARIABLES, UserError
from model import LORA_TARGETS, add_lora, check_weights, encode, load_backbone, policy_forward
from rollouts import SamplingConfig, fresh_forward
from tests.backbones import tiny_backbone
from tests import tiny_data
from tests.tiny_data import tiny_dataset
from trainer import (RecPOConfig, RecPOTrainer, RepeatedBatchSampler, check_context_length,
                     check_zero_stage, inline_deepspeed_config)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable


def tiny_config(tmp_path, **overrides) -> RecPOConfig:
    return tiny_data.tiny_config(str(tmp_path / "run"), **{"gradient_checkpointing": True, **overrides})


def lora_state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def tiny_trainer(tmp_path, family="qwen2", **overrides):
    config = tiny_config(tmp_path, **overrides)
    model, tokenizer = load_backbone(tiny_backbone(family), dtype=torch.float32)
    model = add_lora(model, r=4, alpha=8, dropout=config.lora_dropout)
    return RecPOTrainer(model, config, tokenizer, tiny_dataset(), "Video_Games")


def test_a_resume_keeps_early_stopping_s_count_and_takes_the_new_patience(tmp_path):
    from transformers import EarlyStoppingCallback

    trainer = tiny_trainer(tmp_path, early_stopping_patience=20)
    trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=20))
    trainer.state.stateful_callbacks = {"EarlyStoppingCallback": {  # as a checkpoint's trainer_state.json holds it
        "args": {"early_stopping_patience": 8, "early_stopping_threshold": 0.0},
        "attributes": {"early_stopping_patience_counter": 8}}}  # the run had stopped early
    trainer._load_callback_state()
    [callback] = [c for c in trainer.callback_handler.callbacks if isinstance(c, EarlyStoppingCallback)]
    assert (callback.early_stopping_patience, callback.early_stopping_patience_counter) == (20, 8)


def test_a_run_trained_without_evaluation_resumes_with_it_and_saves_its_checkpoints(tmp_path):
    """Its checkpoints hold no early-stopping state, which Trainer's next save looked up (KeyError,
    a checkpoint left without trainer_state.json)."""
    from transformers import EarlyStoppingCallback

    trainer = tiny_trainer(tmp_path, early_stopping_patience=3)
    trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=3))
    trainer.state.stateful_callbacks = {"TrainerControl": trainer.control.state()}  # --eval_strategy no's checkpoint
    trainer._load_callback_state()
    trainer.create_optimizer_and_scheduler(num_training_steps=2)
    trainer.state.global_step = 3
    trainer._save_checkpoint(trainer.model, None)
    saved = json.loads((tmp_path / "run" / "checkpoint-3" / "trainer_state.json").read_text())["stateful_callbacks"]
    assert saved["EarlyStoppingCallback"]["attributes"] == {"early_stopping_patience_counter": 0}


def test_window_and_length_flags_shape_the_trainer_s_prompts_and_item_table(tmp_path):
    """--window_size, --max_prompt_tokens and --max_item_tokens reach the sequences the trainer builds:
    a window of 2 of the 3-item histories; a limit that fits a window of 1 drops the oldest line;
    the item limit shortens descriptions."""
    from prompts import chat_prompt, item_prompt_tokens, user_prompt

    dataset = tiny_dataset()
    sample = dataset["train"][0]
    assert len(sample["history_item_title"]) == 3
    tokenizer = tiny_trainer(tmp_path).processing_class
    ids = {window: tokenizer(chat_prompt(tokenizer, user_prompt(sample, "Video_Games", window)),
                             add_special_tokens=False)["input_ids"] for window in (1, 2, 3)}
    assert len(ids[1]) < len(ids[2]) < len(ids[3])
    with pytest.raises(UserError, match="cannot hold the") as caught:
        tiny_trainer(tmp_path, max_item_tokens=1)
    item_limit = int(re.search(r"the (\d+) tokens", str(caught.value))[1]) + 1  # the pad item's fixed text + 1
    items = {limit: [item_prompt_tokens(tokenizer, item, "Video_Games", limit) for item in dataset["item_info"]]
             for limit in (item_limit, 10_000)}
    assert sum(map(len, items[item_limit])) < sum(map(len, items[10_000]))  # descriptions were shortened

    no_limit = 4000  # above every prompt here, and within the tiny backbone's context with the reasoning
    for window, limit, expected in ((2, no_limit, ids[2]), (2, len(ids[1]), ids[1]), (3, no_limit, ids[3])):
        trainer = tiny_trainer(tmp_path, window_size=window, max_prompt_tokens=limit, max_item_tokens=item_limit)
        prompt_ids, mask = trainer.tokenize_prompts([sample])
        assert prompt_ids[0][mask[0].bool()].tolist() == expected
        assert [list(tokens) for tokens in trainer.item_table.tokens] == items[item_limit]


@pytest.mark.parametrize("flag", ["max_prompt_tokens", "max_item_tokens"])
def test_length_limits_must_hold_the_text_every_sequence_starts_with(tmp_path, flag):
    with pytest.raises(UserError, match=f"--{flag} 10 cannot hold the [0-9]+ tokens") as caught:
        tiny_trainer(tmp_path, **{flag: 10})
    needed = int(re.search(r"the (\d+) tokens", str(caught.value))[1])
    assert needed > 10
    with pytest.raises(UserError):
        tiny_trainer(tmp_path, **{flag: needed})
    tiny_trainer(tmp_path, **{flag: needed + 1})  # room for one token more: accepted


def test_length_limits_are_measured_on_the_dataset_rows_an_edited_prompt_reads(tmp_path, monkeypatch):
    """A prompt edit that reads another column (here user_id) is measured, not a KeyError; the
    instruction is what dropping every history line leaves, the item text the pad item's."""
    import prompts
    from trainer import check_length_limits
    from transformers import AutoTokenizer

    def with_user_id(sample, category, window_size=20):
        return prompts.user_prompt(sample, category, window_size).replace("a user's", f"user {sample['user_id']}'s", 1)

    monkeypatch.setattr("trainer.user_prompt", with_user_id)
    tokenizer = AutoTokenizer.from_pretrained(tiny_backbone("qwen2"))
    dataset = tiny_dataset()
    header = with_user_id(dataset["train"][0], "Video_Games").split("\n")[:prompts.HEADER_LINES]
    instruction = tokenizer(prompts.chat_prompt(tokenizer, "\n".join(header)), add_special_tokens=False)["input_ids"]
    assert dataset["train"][0]["user_id"] in tokenizer.decode(instruction)
    pad_item = prompts.item_sequence(tokenizer, prompts.item_prompt(dataset["item_info"][0], "Video_Games", 0))
    item_text = tokenizer(pad_item, add_special_tokens=False)["input_ids"]
    for flag, needed in (("max_prompt_tokens", len(instruction)), ("max_item_tokens", len(item_text))):
        with pytest.raises(UserError, match=f"--{flag} {needed} cannot hold the {needed} tokens"):
            check_length_limits(tiny_config(tmp_path, **{flag: needed}), tokenizer, dataset, "Video_Games")
        check_length_limits(tiny_config(tmp_path, **{flag: needed + 1}), tokenizer, dataset, "Video_Games")


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_one_step_changes_lora_and_logs_finite_metrics(tmp_path, family):
    trainer = tiny_trainer(tmp_path, family)
    before = lora_state(trainer.model)
    assert not trainer.model.is_gradient_checkpointing
    trainer.train()
    after = lora_state(trainer.model)
    assert any(not torch.equal(before[n], after[n]) for n in before), "LoRA weights did not move"
    assert trainer.model.is_gradient_checkpointing  # Trainer turns it on (--gradient_checkpointing)
    logged = next(entry for entry in trainer.state.log_history if "reward/mean" in entry)
    for key in ("loss", "reward/mean", "reward/ndcg", "reward/softmax", "advantage/abs_mean", "loss/token",
                "loss/item", "completions/mean_length", "learning_rate"):
        assert key in logged and torch.isfinite(torch.tensor(logged[key])), key
    assert 1 <= logged["completions/mean_length"] <= 12


def test_logged_loss_terms_add_up_to_the_logged_loss_over_micro_batches(tmp_path):
    """4 trajectories in 4 micro-batches: loss/token and loss/item are the step's terms, not a
    micro-batch's average (which read 4x too small)."""
    trainer = tiny_trainer(tmp_path, micro_batch_size=1, lora_dropout=0.0)
    trainer.train()
    logged = next(entry for entry in trainer.state.log_history if "loss/item" in entry)
    assert logged["loss/item"] != 0
    assert logged["loss"] == pytest.approx(logged["loss/token"] + logged["loss/item"], rel=1e-4, abs=1e-6)


def test_a_batch_s_rewards_advantages_and_relabel_mask_by_hand(tmp_path, monkeypatch):
    """generate_and_score wires SPEC §4.2–4.4: each trajectory scored against its own user's target and
    history with the given β and k, advantages within each group of G = 2, the better trajectory of each group relabelled; the rollouts use the sampling flags."""
    trainer = tiny_trainer(tmp_path, beta=0.3, reward_ndcg_k=5, gen_temperature=2.0, gen_top_k=7)
    trainer.refresh_item_table(trainer.model)
    samples = [dict(trainer.train_dataset[i]) for i in (0, 1)]
    rollout, captured = trainer.rollout, {}

    def capturing_rollout(model, samples, sampling, num_samples):
        captured["sampling"], captured["num_samples"] = sampling, num_samples
        return rollout(model, samples, sampling, num_samples)

    monkeypatch.setattr(trainer, "rollout", capturing_rollout)
    batch = trainer.generate_and_score(trainer.model, samples)
    assert captured == {"sampling": SamplingConfig(12, temperature=2.0, top_k=7), "num_samples": 2}
    users, items = batch.rollouts.user_states, trainer.item_table.embeddings
    rewards, ndcgs, softmaxes = [], [], []
    for row in range(4):
        sample = samples[row // 2]
        scores = F.normalize(users[row], dim=0) @ F.normalize(items, dim=1).T / 0.02  # (I,)
        scores[[0, *sample["history_item_id"]]] = -math.inf
        target = sample["item_id"]
        rank = int((scores >= scores[target]).sum())
        ndcgs.append(1 / math.log2(rank + 1) if rank <= 5 else 0.0)
        softmaxes.append(scores.softmax(0)[target].item())
        rewards.append(0.7 * ndcgs[-1] + 0.3 * softmaxes[-1])
    logged = {key: float(values[-1]) for key, values in trainer._metrics.items()}
    gaps = [abs(rewards[0] - rewards[1]), abs(rewards[2] - rewards[3])]
    assert logged == pytest.approx({
        "reward/mean": sum(rewards) / 4, "reward/ndcg": sum(ndcgs) / 4, "reward/softmax": sum(softmaxes) / 4,
        "reward/std_within_group": sum(gaps) / 2 / 2**0.5,  # unbiased std of two values: |d| / √2
        "advantage/abs_mean": 2**-0.5,  # each (d/2) / (|d|/√2) in size, as below
        "frac_ndcg_zero_std": sum(ndcgs[2 * g] == ndcgs[2 * g + 1] for g in range(2)) / 2,
        "completions/mean_length": batch.rollouts.completion_mask.sum().item() / 4,
        "time/rollout_s": logged["time/rollout_s"], "time/reward_s": logged["time/reward_s"],
    }, rel=1e-4, abs=1e-6)  # float32 rewards
    assert torch.equal(batch.targets, torch.tensor([s["item_id"] for s in samples]))
    for group in range(2):
        first, second = rewards[2 * group], rewards[2 * group + 1]
        assert first != pytest.approx(second, abs=1e-6)  # sampled at temperature 2: distinct reasonings
        # (R - mean) / (unbiased std + 1e-8): ±(d/2) / (d/√2 + 1e-8) for d = |R_1 - R_2|
        advantage = (first - second) / 2 / (abs(first - second) / 2**0.5 + 1e-8)
        assert batch.advantages[2 * group:2 * group + 2].tolist() == pytest.approx([advantage, -advantage], rel=1e-4)
        assert batch.relabel[2 * group:2 * group + 2].tolist() == ([1.0, 0.0] if first > second else [0.0, 1.0])


@pytest.mark.parametrize("similarity_type, tau", [("cosine", 0.05), ("dot", 0.02), ("L2", 0.02)])
def test_a_batch_under_other_scoring_advantage_and_relabel_flags_by_hand(tmp_path, similarity_type, tau):
    """The flags reach generate_and_score: the score is --similarity_type (with --tau for cosine), RLOO
    advantages within each group of G = 4, the --trainer_relabel_topk 2 best of each relabelled."""
    trainer = tiny_trainer(tmp_path, similarity_type=similarity_type, tau=tau, advantage_type="rloo", group_size=4,
                           trainer_relabel_topk=2, gen_temperature=2.0)
    trainer.refresh_item_table(trainer.model)
    samples = [dict(trainer.train_dataset[i]) for i in (0, 1)]
    batch = trainer.generate_and_score(trainer.model, samples)
    users, items = batch.rollouts.user_states.float(), trainer.item_table.embeddings.float()
    rewards = []
    for row in range(8):
        sample, user = samples[row // 4], users[row]
        scores = {"cosine": lambda: torch.stack([torch.dot(user, item) / (user.norm() * item.norm()) for item in items]) / tau,
                  "dot": lambda: torch.stack([torch.dot(user, item) for item in items]),
                  "L2": lambda: -torch.stack([(user - item).norm() for item in items])}[similarity_type]()
        scores[[0, *sample["history_item_id"]]] = -math.inf
        target = sample["item_id"]
        rank = int((scores >= scores[target]).sum())
        rewards.append(0.95 / math.log2(rank + 1) + 0.05 * scores.softmax(0)[target].item())
    for group in range(2):
        group_rewards = rewards[4 * group:4 * group + 4]
        rloo = [r - (sum(group_rewards) - r) / 3 for r in group_rewards]
        assert batch.advantages[4 * group:4 * group + 4].tolist() == pytest.approx(rloo, rel=1e-3, abs=1e-5)
        chosen = [i for i in range(4) if batch.relabel[4 * group + i]]
        second_best = sorted(group_rewards, reverse=True)[1]
        assert len(chosen) == 2 and all(group_rewards[i] >= second_best - 1e-5 for i in chosen)  # float32 ties


def test_skipped_steps_are_counted_over_the_logging_window(tmp_path):
    trainer = tiny_trainer(tmp_path)
    for reward in (0.2, 0.4, 0.9):
        trainer._record(**{"reward/mean": reward})
    trainer._record(**{"skipped_steps": 1.0})
    trainer._record(**{"skipped_steps": 1.0})
    trainer.log({"loss": 0.5})
    logged = trainer.state.log_history[-1]
    assert logged["skipped_steps"] == 2.0 and logged["reward/mean"] == pytest.approx(0.5)


def test_an_epochs_short_last_accumulation_step_is_not_scaled_down(tmp_path):
    """4 batches an epoch, 3 accumulated per step: the second step holds one batch, whose loss is
    divided by 1, not 3 (one micro-batch per update, so the backward's loss is (token + item) / n)."""
    trainer = tiny_trainer(tmp_path, gradient_accumulation_steps=3, max_steps=2, micro_batch_size=4)
    parts, divisors = [], []
    micro_batch_losses, backward = trainer.micro_batch_losses, trainer.accelerator.backward

    def record_parts(*args, **kwargs):
        token, item, probs, logprobs = micro_batch_losses(*args, **kwargs)
        parts.append((token + item).item())
        return token, item, probs, logprobs

    def record_divisor(loss, **kwargs):
        divisors.append(parts[-1] / loss.item())
        return backward(loss, **kwargs)

    trainer.micro_batch_losses, trainer.accelerator.backward = record_parts, record_divisor
    trainer.train()
    assert divisors == pytest.approx([3, 3, 3, 1], rel=1e-5)


def test_evaluate_reports_every_metric_and_saves_reasoning(tmp_path):
    trainer = tiny_trainer(tmp_path)
    metrics = trainer.evaluate()
    for split in ("valid", "test"):
        for name in ("ndcg@5", "ndcg@10", "ndcg@20", "hit@5", "hit@10", "hit@20", "reasoning_length"):
            value = metrics[f"eval_{split}_{name}"]
            assert 0 <= value <= (12 if name == "reasoning_length" else 1)
        with open(tmp_path / "run" / "reasoning" / f"step0_{split}.jsonl") as f:
            records = [json.loads(line) for line in f]
        assert [r["row"] for r in records] == [0, 1, 2, 3] and all(r["split"] == split for r in records)
        assert all(r["reasoning"].endswith("<answer>") for r in records)
        assert [r["target_rank"] is None for r in records] == [False, False, False, True]  # row 3: bought before
        ranks = [math.inf if r["target_rank"] is None else r["target_rank"] for r in records]
        lengths = [r["reasoning_tokens"] for r in records]
        assert all(1 <= r <= 16 for r in ranks[:3])
        assert metrics[f"eval_{split}_hit@20"] == pytest.approx(sum(r <= 20 for r in ranks) / 4)
        assert metrics[f"eval_{split}_ndcg@5"] == pytest.approx(sum(1 / math.log2(r + 1) for r in ranks if r <= 5) / 4)
        assert metrics[f"eval_{split}_reasoning_length"] == pytest.approx(sum(lengths) / 4)


def test_evaluate_on_one_dataset_names_metrics_by_the_prefix_alone(tmp_path):
    """As Trainer does: evaluate(test_set, metric_key_prefix="test") logs test_ndcg@10, not
    test_eval_ndcg@10, with the same figures as the default evaluation's eval_test_*."""
    trainer = tiny_trainer(tmp_path)
    both = trainer.evaluate()
    alone = trainer.evaluate(trainer.eval_dataset["test"], metric_key_prefix="test")
    assert not any("eval" in key for key in alone)
    names = {key for key in alone if key.startswith("test_") and key != "test_seconds"}
    assert names == {f"test_{name}" for name in ("ndcg@5", "ndcg@10", "ndcg@20", "hit@5", "hit@10", "hit@20",
                                                 "reasoning_length")}
    assert {key: alone[key] for key in names} == pytest.approx({key: both["eval_" + key] for key in names})
    with open(tmp_path / "run" / "reasoning" / "step0_test.jsonl") as f:
        assert [json.loads(line)["split"] for line in f] == ["test"] * 4


def test_where_graphs_are_replayed_a_last_partial_evaluation_batch_is_padded_to_the_batch_size(tmp_path, monkeypatch):
    """4 valid samples in batches of 3: [0, 1, 2], [3]. Where decoding replays a graph per shape
    (patched in: this is the CPU) the second batch runs as [3, 3, 3], with the same records."""
    trainer = tiny_trainer(tmp_path, per_device_eval_batch_size=3)
    trainer.refresh_item_table(trainer.model)
    plain_metrics, plain = trainer.evaluate_split(trainer.model, trainer.eval_dataset["valid"], "valid")
    recommend, batches = trainer.recommend, []
    monkeypatch.setattr(trainer, "recommend", lambda model, samples, rows, *rest: batches.append(rows) or
                        recommend(model, samples, rows, *rest))
    monkeypatch.setattr("trainer.replays_graphs", lambda device: True)
    padded_metrics, padded = trainer.evaluate_split(trainer.model, trainer.eval_dataset["valid"], "valid")
    assert batches == [[0, 1, 2], [3, 3, 3]]
    assert padded_metrics == pytest.approx(plain_metrics)
    assert [r["row"] for r in padded] == [0, 1, 2, 3]
    for a, b in zip(plain, padded):
        assert {k: v for k, v in a.items() if k != "top_k"} == {k: v for k, v in b.items() if k != "top_k"}
        assert [i["item_id"] for i in a["top_k"]] == [i["item_id"] for i in b["top_k"]]
        # another batch shape rounds the cosine otherwise: a few float32 ulps (1.2e-7), times 1/τ = 50
        assert [i["score"] for i in a["top_k"]] == pytest.approx([i["score"] for i in b["top_k"]], abs=1e-4)


def test_out_of_memory_skips_the_step_without_touching_weights(tmp_path, monkeypatch):
    trainer = tiny_trainer(tmp_path)
    before = lora_state(trainer.model)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(trainer, "rollout", out_of_memory)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert any("skipped" in str(w.message) and "out of memory in the rollout" in str(w.message) for w in caught)
    after = lora_state(trainer.model)
    assert all(torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize("failing_batch", [1, 2])
def test_a_skip_with_gradient_accumulation_skips_the_whole_optimizer_step(tmp_path, monkeypatch, failing_batch):
    """Steps of 2 batches: a rollout out of memory in either batch of step 1 leaves the weights as
    they were (the other batch's gradients dropped too, a later batch not even rolled out), warns
    once, and step 2 trains."""
    from transformers import TrainerCallback

    trainer = tiny_trainer(tmp_path, max_steps=2, gradient_accumulation_steps=2, logging_steps=1)
    rollout, calls, after_step = trainer.rollout, [], []

    def out_of_memory_once(model, samples, *args):
        calls.append(trainer.state.global_step)
        if len(calls) == failing_batch:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return rollout(model, samples, *args)

    class WeightsAfterEachStep(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            after_step.append(lora_state(model))

    monkeypatch.setattr(trainer, "rollout", out_of_memory_once)
    trainer.add_callback(WeightsAfterEachStep())
    before = lora_state(trainer.model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert calls == ([0, 1, 1] if failing_batch == 1 else [0, 0, 1, 1])
    assert [str(w.message) for w in caught if "skipped" in str(w.message)] == [
        "step 0: skipped — out of memory in the rollout"]
    first, second = after_step
    assert all(torch.equal(before[n], first[n]) for n in before)
    assert any(not torch.equal(first[n], second[n]) for n in before)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry.get("skipped_steps") for entry in logged] == [1.0, None]


def test_a_second_train_call_starts_clean_after_one_interrupted_mid_step(tmp_path, monkeypatch):
    """Ctrl-C after a skipped batch of a two-batch step left the skip in progress, so the next
    train() silently skipped its first step; its stale rollouts would have been trained on too."""
    from transformers import Trainer

    trainer = tiny_trainer(tmp_path, max_steps=1, gradient_accumulation_steps=2, logging_steps=1,
                           eval_strategy="no", save_strategy="no", load_best_model_at_end=False)
    trainer._skipping_step, trainer._buffer = True, "rollouts of the interrupted call"
    before = lora_state(trainer.model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert not [w for w in caught if "skipped" in str(w.message)]
    after = lora_state(trainer.model)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    [logged] = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert "skipped_steps" not in logged and "reward/mean" in logged
    # A later call that resumes starts from the checkpoint's item table, not the one in memory.
    monkeypatch.setattr(Trainer, "train", lambda self, **kwargs: (self._table_encoded, self._resume_from))
    assert trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1")) == (False, str(tmp_path / "checkpoint-1"))


def test_out_of_memory_in_the_update_ends_the_run_with_one_line(tmp_path, monkeypatch):
    trainer = tiny_trainer(tmp_path)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")

    monkeypatch.setattr(trainer, "update", out_of_memory)
    with pytest.raises(UserError) as caught:
        trainer.train()
    message = str(caught.value)
    assert "out of memory in the update" in message and "--micro_batch_size" in message and "\n" not in message


def test_out_of_memory_encoding_the_item_table_ends_the_run_with_one_line(tmp_path, monkeypatch):
    trainer = tiny_trainer(tmp_path, item_batch_size=7)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(trainer.item_table, "encode", out_of_memory)
    with pytest.raises(UserError, match=r"^out of memory encoding the item table \(7 items per batch\) — lower "
                                        r"--item_batch_size or --max_item_tokens$"):
        trainer.train()


def test_out_of_memory_in_the_greedy_evaluation_ends_with_one_line(tmp_path, monkeypatch):
    trainer = tiny_trainer(tmp_path, per_device_eval_batch_size=3)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(trainer, "recommend", out_of_memory)
    with pytest.raises(UserError, match=r"^out of memory in the greedy reasoning of the valid split \(3 samples per "
                                        r"batch\) — lower the batch size \(--eval_batch_size; recommend.py: "
                                        r"--batch_size\) or --max_new_tokens$"):
        trainer.evaluate()


def test_non_finite_reward_skips_the_step(tmp_path, monkeypatch):
    trainer = tiny_trainer(tmp_path)
    before = lora_state(trainer.model)
    real_rewards = trainer.rewards

    def nan_rewards(*args):
        reward, terms = real_rewards(*args)
        return reward * float("nan"), terms

    monkeypatch.setattr(trainer, "rewards", nan_rewards)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert any("non-finite reward" in str(w.message) for w in caught)
    assert all(torch.equal(before[n], lora_state(trainer.model)[n]) for n in before)


def test_two_processes_equal_one_process_on_the_concatenated_batch(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    single, double = tmp_path / "single.pt", tmp_path / "double.pt"
    worker = os.path.join(ROOT, "tests", "dist_update_worker.py")
    subprocess.run([PYTHON, worker, str(single)], check=True, env=env, cwd=ROOT)
    subprocess.run([PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
                    worker, str(double)], check=True, env=env, cwd=ROOT, timeout=600)  # a process left waiting
    one, two = torch.load(single), torch.load(double)
    assert one["loss"].item() != 0
    torch.testing.assert_close(two["loss"], one["loss"], rtol=1e-4, atol=1e-6)
    assert one["grads"].keys() == two["grads"].keys()
    assert any(g.abs().sum() > 0 for g in one["grads"].values())
    for name in one["grads"]:
        torch.testing.assert_close(two["grads"][name], one["grads"][name], rtol=1e-3, atol=1e-6, msg=name)
    # Every process writes all 4 users' fresh target embeddings into its item table, as one process does.
    written = two["table"].abs().sum(1) > 0
    assert torch.equal(written.nonzero().flatten(), one["targets"].unique())
    torch.testing.assert_close(two["table"], one["table"], rtol=1e-4, atol=1e-6)
    # Logged means: each key over the processes that recorded it.
    assert one["logged"] == {"shared": 0.0}
    assert two["logged"] == {"only_rank_1": 5.0, "shared": 0.5}
    # Each process samples with noise of its own: the same prompt gets other reasonings on process 1.
    first, second = two["sampled"]
    assert len(first) == len(second) == 2 and first != second
    # One process's item table damaged (a copy on each node): every process stops, none waits.
    unreadable_0, unreadable_1 = two["unreadable"]
    assert unreadable_0 == "another process could not read its item_table.pt — see its error line"
    assert "item_table.pt cannot be read (" in unreadable_1 and one["unreadable"] == ["passed"]
    # A run folder that is not one for all processes (each node's own disk) is refused on every process.
    assert one["unshared"] == ["passed"]  # one process: nothing to share
    assert [message.split(" is not")[1] for message in two["unshared"]] == [
        " one folder for all processes: process 1 did not see within 2 s a file process 0 wrote into it (each "
        "node's own disk?) — put it on a file system every node shares, or pass --save_on_each_node True to keep "
        "a copy of the checkpoints on each node"] * 2
    assert two["left_in_shared"] == []  # a shared folder passes, and its marker is gone


def test_a_process_out_of_memory_in_its_rollout_skips_the_step_on_every_process(tmp_path):
    out = tmp_path / "skip.json"
    subprocess.run([PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
                    os.path.join(ROOT, "tests", "dist_skip_worker.py"), str(out)],
                   check=True, env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=ROOT, timeout=600)
    result = json.loads(out.read_text())
    skips_rank0, skips_rank1 = result["skips"]
    assert len(skips_rank0) == len(skips_rank1) == 1
    assert "step 0: skipped" in skips_rank1[0] and "out of memory in the rollout" in skips_rank1[0]
    assert skips_rank0[0].endswith("step 0: skipped — another process failed this step")
    steps = {entry["step"]: entry for entry in result["log_history"] if "loss" in entry}
    assert sorted(steps) == [1, 2]
    assert steps[1]["skipped_steps"] == 1.0 and "reward/mean" not in steps[1]
    assert steps[1]["time/rollout_s"] > 0  # recorded by process 0 alone, still logged under its own name
    assert "skipped_steps" not in steps[2] and "reward/mean" in steps[2] and "loss/token" in steps[2]
    first, second = result["checksums"]
    assert first == pytest.approx(second, rel=1e-6)  # the replicas stayed identical


def test_evaluation_over_four_processes_counts_every_sample_once(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    worker = os.path.join(ROOT, "tests", "dist_eval_worker.py")
    single, four = tmp_path / "single.json", tmp_path / "four.json"
    subprocess.run([PYTHON, worker, str(single)], check=True, env=env, cwd=ROOT)
    subprocess.run([PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--master_port", free_port(),
                    worker, str(four)], check=True, env=env, cwd=ROOT)
    one, split = json.loads(single.read_text()), json.loads(four.read_text())
    assert [r["row"] for r in split["records"]] == list(range(9))
    def ranked(records):  # scores may differ in the last bits: other batches, other padding
        return [(r["row"], r["target_rank"], r["reasoning"], r["reasoning_tokens"]) for r in records]

    assert ranked(split["records"]) == ranked(one["records"])
    items = len(one["table"])
    assert one["encoded"] == [items] and split["encoded"] == [-(-items // 4)] * 4  # each process a quarter
    torch.testing.assert_close(torch.tensor(split["table"]), torch.tensor(one["table"]), atol=1e-5, rtol=1e-4)
    assert [r["target_rank"] is None for r in split["records"]] == [False] * 8 + [True]  # row 8: bought before
    ranks = torch.tensor([math.inf if r["target_rank"] is None else r["target_rank"] for r in split["records"]],
                         dtype=torch.float64)
    for k in (5, 10, 20):  # SPEC §5, averaged over the 9 samples, each once
        hit = (ranks <= k).double()
        assert split["metrics"][f"hit@{k}"] == pytest.approx(hit.mean().item())
        assert split["metrics"][f"ndcg@{k}"] == pytest.approx((hit / torch.log2(ranks + 1)).mean().item())
    assert split["metrics"] == pytest.approx(one["metrics"])


@pytest.mark.parametrize("checkpointing, tempered", [(False, True), (True, False)])
def test_update_gradient_equals_one_backward_of_the_whole_loss(tmp_path, checkpointing, tempered):
    """Micro-batches, and the target items encoded once per update, must add up to the full loss."""
    from tests.dist_update_worker import GROUP, USERS, fixed_batch, tiny_lora_model

    model, tokenizer = tiny_lora_model(gradient_checkpointing=checkpointing)
    config = tiny_config(tmp_path, per_device_train_batch_size=USERS, group_size=GROUP, micro_batch_size=3,
                         lora_dropout=0.0, gradient_checkpointing=checkpointing, gen_temperature=2.0,
                         tempered_logprobs=tempered)
    trainer = RecPOTrainer(model, config, tokenizer, tiny_dataset(), "Video_Games")
    trainer.refresh_item_table(model)
    batch = fixed_batch(trainer, model, rank=0, world=1, noise_scale=0.0)  # on-policy: ρ = q = 1
    trainer.update(trainer.accelerator.prepare_model(model), batch)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    # The same loss written out directly, for all trajectories at once, one backward. On-policy the
    # clipped terms have the gradients of -A·log π (token; π = softmax(logits), or softmax(logits / 2)
    # tempered) and -Â·log p (item).
    model.zero_grad(set_to_none=True)
    rollouts, num = batch.rollouts, len(batch.advantages)
    completion_len = rollouts.completion_ids.shape[1]
    logprobs, users = policy_forward(model, torch.cat([rollouts.prompt_ids, rollouts.completion_ids], 1),
                                     torch.cat([rollouts.prompt_mask, rollouts.completion_mask], 1), completion_len,
                                     temperature=2.0 if tempered else 1.0)
    token = 0.0
    for rows in torch.arange(num).split(3):  # released normalisation: per micro-batch of 3
        mask = rollouts.completion_mask[rows].float()
        token = token - (batch.advantages[rows, None] * logprobs[rows] * mask).sum() / mask.sum() / len(rows)
    items = encode(model, **trainer.item_table.batch(batch.targets))  # (USERS, D)
    scores = F.normalize(users, dim=-1) @ F.normalize(items, dim=-1).T / config.tau  # (N, USERS)
    own_item = scores.log_softmax(-1)[torch.arange(num), torch.arange(num) // GROUP]
    item = -(batch.advantages * batch.relabel * own_item).sum() / num
    (token + item).backward()
    assert any(g.abs().sum() > 0 for g in grads.values())
    # float32 sums in another order: round-off scales with the largest gradients (a CPU's kernels decide)
    atol = 5e-5 * max(g.abs().max().item() for g in grads.values())
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=atol, msg=name)


def test_a_later_update_s_clipped_losses_and_gradient_by_hand(tmp_path):
    """num_iterations > 1: π_old and p_old from the batch, ratios spread around 1, some clipped by
    the given --epsilon_low / --epsilon_high. The step's loss and every LoRA gradient equal those
    of SPEC §4.5 + §4.6 written out directly, for all trajectories at once."""
    from tests.dist_update_worker import GROUP, USERS, fixed_batch, tiny_lora_model

    low, high = 0.05, 0.4  # row 2 of the item loss (q = 0.93, Â < 0) falls under 1 - low
    model, tokenizer = tiny_lora_model()
    config = tiny_config(tmp_path, per_device_train_batch_size=USERS, group_size=GROUP, micro_batch_size=3,
                         lora_dropout=0.0, gradient_checkpointing=False, epsilon_low=low, epsilon_high=high)
    trainer = RecPOTrainer(model, config, tokenizer, tiny_dataset(), "Video_Games")
    trainer.refresh_item_table(model)
    batch = fixed_batch(trainer, model, rank=0, world=1, noise_scale=0.3)
    loss = trainer.update(trainer.accelerator.prepare_model(model), batch)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    model.zero_grad(set_to_none=True)
    rollouts, num = batch.rollouts, len(batch.advantages)
    completion_len = rollouts.completion_ids.shape[1]
    logprobs, users = policy_forward(model, torch.cat([rollouts.prompt_ids, rollouts.completion_ids], 1),
                                     torch.cat([rollouts.prompt_mask, rollouts.completion_mask], 1), completion_len)
    token, clipped_tokens = 0.0, 0
    for rows in torch.arange(num).split(3):
        mask = rollouts.completion_mask[rows].float()
        ratio = (logprobs[rows] - batch.token_old_logprobs[rows]).exp()
        advantage = batch.advantages[rows, None]
        objective = torch.min(ratio * advantage, ratio.clamp(1 - low, 1 + high) * advantage)
        token = token - (objective * mask).sum() / mask.sum() / len(rows)
        clipped_tokens += int((((ratio < 1 - low) | (ratio > 1 + high)) * mask).sum())
    items = encode(model, **trainer.item_table.batch(batch.targets))  # (USERS, D)
    scores = F.normalize(users, dim=-1) @ F.normalize(items, dim=-1).T / config.tau  # (N, USERS)
    q = (scores.log_softmax(-1)[torch.arange(num), torch.arange(num) // GROUP] - batch.item_old_logprobs).exp()
    weighted = batch.advantages * batch.relabel
    item = -torch.min(q * weighted, q.clamp(1 - low, 1 + high) * weighted).sum() / num
    (token + item).backward()
    assert clipped_tokens > 0 and ((q < 1 - low) & (weighted < 0)).any()  # the clip is exercised
    assert loss.item() == pytest.approx((token + item).item(), rel=1e-4)
    # float32 sums in another order: round-off scales with the largest gradients (a CPU's kernels decide)
    atol = 5e-5 * max(g.abs().max().item() for g in grads.values())
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=atol, msg=name)


def test_the_item_table_holds_each_item_s_h_and_an_update_rewrites_its_targets(tmp_path):
    """Against `encode` of one unpadded item at a time: the table after a refresh; after an update
    with moved adapters, fresh rows for the batch's targets and the old ones elsewhere; after an
    evaluation, every row fresh."""
    trainer = tiny_trainer(tmp_path, lora_dropout=0.0, micro_batch_size=4)
    model, table = trainer.model, trainer.item_table

    def one_by_one(item_ids):
        with torch.no_grad():
            return torch.cat([encode(model.eval(), **table.batch([i])) for i in item_ids])

    trainer.refresh_item_table(model)
    refreshed = table.embeddings.clone()
    torch.testing.assert_close(refreshed, one_by_one(range(len(table))), atol=1e-5, rtol=1e-5)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_B" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    batch = trainer.generate_and_score(model, [trainer.train_dataset[i] for i in range(2)])
    model.train()
    trainer.update(trainer.accelerator.prepare_model(model), batch)
    targets = batch.targets.unique()
    others = torch.ones(len(table), dtype=torch.bool)
    others[targets] = False
    torch.testing.assert_close(table.embeddings[targets], one_by_one(targets.tolist()), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(table.embeddings[targets], refreshed[targets], atol=1e-3)
    assert torch.equal(table.embeddings[others], refreshed[others])
    trainer.evaluate()  # re-encodes every item with the current weights
    torch.testing.assert_close(table.embeddings, one_by_one(range(len(table))), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(table.embeddings[others], refreshed[others], atol=1e-3)


def test_without_reasoning_training_is_in_batch_contrastive_learning(tmp_path):
    """--reasoning False (SPEC §5's ablation): each user's rollout is the forced `<answer>` alone,
    G = 1, and the update's gradient is that of the in-batch softmax cross-entropy of h (prompt +
    `<answer>`) against the batch's targets, with no token loss."""
    trainer = tiny_trainer(tmp_path, reasoning=False, group_size=4, trainer_relabel_topk=2, lora_dropout=0.0,
                           per_device_train_batch_size=3, micro_batch_size=2, gradient_checkpointing=False,
                           advantage_type="rloo")  # RLOO's A would be 0 for G = 1: Â = 1 must not come from it
    assert trainer.args.group_size == trainer.args.trainer_relabel_topk == 1
    model, forced = trainer.model, list(trainer.stop.forced)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_B" in name:  # adapters that change h, so the gradient reaches lora_A too
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    trainer.refresh_item_table(model)
    samples = [trainer.train_dataset[i] for i in range(3)]
    batch = trainer.generate_and_score(model, samples)
    assert batch.rollouts.completion_ids.tolist() == [forced] * 3 and batch.advantages.tolist() == [1.0] * 3
    model.train()
    trainer.update(trainer.accelerator.prepare_model(model), batch)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    logged = {key: values[-1].item() for key, values in trainer._metrics.items()}
    assert logged["loss/token"] == 0 and "clip_ratio/token" not in logged

    model.zero_grad(set_to_none=True)
    ids, mask = trainer.tokenize_prompts(samples)
    answer = torch.tensor([forced] * 3)
    users = encode(model, torch.cat([ids, answer], 1), torch.cat([mask, torch.ones_like(answer)], 1))  # (3, D)
    items = encode(model, **trainer.item_table.batch([s["item_id"] for s in samples]))  # (3, D)
    scores = F.normalize(users, dim=-1) @ F.normalize(items, dim=-1).T / 0.02
    F.cross_entropy(scores, torch.arange(3)).backward()
    per_row = F.cross_entropy(scores, torch.arange(3), reduction="none").detach()
    nll = [value.item() for value in trainer._metrics["item/nll"]]  # logged per micro-batch: rows 0-1, row 2
    assert nll == pytest.approx([per_row[:2].mean().item(), per_row[2].item()], rel=1e-5)
    assert any(g.abs().sum() > 0 for g in grads.values())
    for name, param in model.named_parameters():  # gradients up to ~50 (τ = 0.02): a relative tolerance
        if param.requires_grad:
            torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-5 * param.grad.abs().max().item(),
                                       msg=name)
    records = trainer.recommend(model, samples, [0, 1, 2], "train", top_k=3)
    assert [r["reasoning_tokens"] for r in records] == [len(forced)] * 3
    num_items = len(trainer.item_table)
    for record, sample in zip(trainer.recommend(model, samples, [0, 1, 2], "train", top_k=num_items + 5), samples):
        unseen = set(range(1, num_items)) - set(sample["history_item_id"])  # neither the pad nor a bought item
        listed = [entry["item_id"] for entry in record["top_k"]]
        scores = [entry["score"] for entry in record["top_k"]]
        assert sorted(listed) == sorted(unseen) and scores == sorted(scores, reverse=True)


def test_first_update_is_on_policy_although_the_sampler_runs_without_lora_dropout(tmp_path):
    """SPEC §4.5: with one update per rollout ρ = 1 (REINFORCE), so no token is clipped."""
    model, tokenizer = load_backbone(tiny_backbone("qwen2"), dtype=torch.float32)
    model = add_lora(model, r=4, alpha=8, dropout=0.5)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_B" in name:  # non-zero adapters, so dropout changes the log-probs
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    trainer = RecPOTrainer(model, tiny_config(tmp_path, micro_batch_size=4, gradient_checkpointing=False),
                           tokenizer, tiny_dataset(), "Video_Games")
    trainer.refresh_item_table(model)
    batch = trainer.generate_and_score(model, [trainer.train_dataset[i] for i in range(2)])
    model.train()
    trainer.update(trainer.accelerator.prepare_model(model), batch)
    logged = {key: values[-1].item() for key, values in trainer._metrics.items()}
    # ρ = 1 on every token: the loss is -Σ_i A_i·n_i / Σ_i n_i / M over the M = 4 trajectories.
    lengths = batch.rollouts.completion_mask.sum(1).float()
    expected = -(batch.advantages * lengths).sum() / lengths.sum() / 4
    assert batch.advantages.abs().sum() > 0
    assert logged["clip_ratio/token"] == 0
    assert logged["loss/token"] == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    assert logged["rollout/logprob_gap"] > 1e-3  # the sampler's own log-probs would have given ρ ≠ 1


@pytest.mark.parametrize("tempered", [False, True])
def test_sampler_and_update_score_tokens_under_the_same_temperature(tmp_path, tempered):
    """The update's forward recomputes the sampler's log-probs, of softmax(z) by default and of
    softmax(z / T) with --tempered_logprobs (fresh LoRA: B = 0, so LoRA dropout changes nothing)."""
    trainer = tiny_trainer(tmp_path, gen_temperature=2.0, tempered_logprobs=tempered)
    model = trainer.model
    trainer.refresh_item_table(model)
    batch = trainer.generate_and_score(model, [trainer.train_dataset[i] for i in range(2)])
    r = batch.rollouts
    untempered = fresh_forward(model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)[0]
    distance = (r.logprobs - untempered).abs().max().item()
    assert distance > 1e-2 if tempered else distance < 1e-4
    model.train()
    trainer.update(trainer.accelerator.prepare_model(model), batch)
    assert trainer._metrics["rollout/logprob_gap"][-1].item() < 1e-4


def tiny_dataset_dir(tmp_path) -> str:
    folder = tmp_path / "Video_Games_0_2022-10-2023-10"
    tiny_dataset().save_to_disk(str(folder))
    return str(folder)


def quick_flags(tmp_path, *extra) -> list[str]:
    return ["--dataset_dir", tiny_dataset_dir(tmp_path), "--model", tiny_backbone("qwen2"), "--bf16", "False",
            "--report_to", "none", "--train_batch_size", "2", "--group_size", "2", "--micro_batch_size", "2",
            "--max_new_tokens", "10", "--eval_batch_size", "4", "--learning_rate", "1e-2", "--warmup_steps", "0",
            "--output_dir", str(tmp_path / "out"), *extra]


def test_a_single_process_uses_one_gpu_of_several_and_says_so(tmp_path, monkeypatch, capsys):
    """Trainer would wrap a lone process's model in nn.DataParallel over every visible GPU (and
    multiply the batch by their number); RecPO keeps one GPU per process."""
    config = RecPOConfig(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=3)
    config._n_gpu = 4  # what TrainingArguments finds on a 4-GPU machine without a launcher
    assert config.n_gpu == 1 and config.train_batch_size == 3
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    train.note_unused_gpus(processes=1)
    train.note_unused_gpus(processes=3)  # launch_train.sh's default leaves the fourth GPU out on purpose
    assert capsys.readouterr().err.splitlines() == [
        "note: 4 GPUs are visible and a single process trains on the first — NUM_PROCESSES=4 bash launch_train.sh "
        "trains on all of them"]


def test_check_only_validates_without_training_and_warns_without_a_gpu(tmp_path, capsys, monkeypatch):
    train.main(quick_flags(tmp_path, "--check_only", "True"))
    printed = capsys.readouterr()
    assert printed.out.startswith("ok: flags, ")
    assert not (tmp_path / "out").exists()  # nothing written, no model loaded
    warned = "warning: no GPU visible" in printed.err
    assert warned != torch.cuda.is_available()
    train.main(quick_flags(tmp_path, "--check_only", "True", "--use_cpu", "True"))
    assert "warning: no GPU visible" not in capsys.readouterr().err  # the CPU is meant
    monkeypatch.setenv("R2EC_PROCESSES", "1")  # launch_train.sh's check: the training process will warn
    train.main(quick_flags(tmp_path, "--check_only", "True"))
    assert "warning: no GPU visible" not in capsys.readouterr().err
    empty_model = tmp_path / "empty_model"
    empty_model.mkdir()
    flags = quick_flags(tmp_path, "--check_only", "True")
    flags[flags.index("--model") + 1] = str(empty_model)
    with pytest.raises(UserError, match="has no config.json"):
        train.main(flags)


@pytest.mark.parametrize("flags, message", [
    (["--model", "models/qwen"], "'models/qwen' is no local folder, so it was read as a hub id"),  # a mistyped folder
    (["--lora_target_modules", "q_proj,qkv_proj"], "LoRA targets qkv_proj are not modules of this backbone"),
    (["--lora_target_modules", "q_proj, qkv_proj"], "LoRA targets qkv_proj are not modules"),  # spaces after commas
    (["--max_prompt_tokens", "8"], "--max_prompt_tokens 8 cannot hold the"),
    (["--max_new_tokens", "1000000000"], "--max_new_tokens 1000000000 exceed the backbone's context of 4096 tokens"),
])
def test_check_only_refuses_what_building_the_trainer_would(tmp_path, monkeypatch, flags, message):
    """Without loading the weights: launch_train.sh's check must stop these before any process starts.
    (In this process: `run_cli` turning the UserError into one line is tested on its own.)"""
    monkeypatch.chdir(ROOT)  # where launch_train.sh runs train.py
    with pytest.raises(UserError) as caught:
        train.main(quick_flags(tmp_path, "--check_only", "True", *flags))
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_check_only_reads_the_weight_files_headers(tmp_path):
    """A half-copied backbone is refused before launch_train.sh starts any process (loading the
    weights in every process would fail there, after the launch)."""
    model = tmp_path / "model"
    shutil.copytree(tiny_backbone("qwen2"), model)
    weights = model / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[:len(whole) // 2])
    flags = quick_flags(tmp_path, "--check_only", "True")
    flags[flags.index("--model") + 1] = str(model)
    with pytest.raises(UserError) as caught:
        train.main(flags)
    assert str(caught.value).startswith(f"model weights {str(weights)!r} cannot be read")
    assert str(caught.value).endswith("— finish copying or downloading the model, or point paths.py or --model at "
                                      "a complete model folder")
    weights.write_bytes(whole)
    check_weights(str(model))  # whole again: passes
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a.weight": "model-00001-of-00002.safetensors", "b.weight": "model-00002-of-00002.safetensors"}}))
    check_weights(str(model))  # model.safetensors is what transformers loads first
    weights.rename(model / "model-00001-of-00002.safetensors")
    with pytest.raises(UserError, match=r"lacks model-00002-of-00002.safetensors, a part of its weights named in "
                                        r"model.safetensors.index.json"):
        check_weights(str(model))
    (model / "model.safetensors.index.json").unlink()
    (model / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(UserError, match=r"has no weights \(\*.safetensors or \*.bin\)"):
        check_weights(str(model))
    check_weights("Qwen/Qwen2.5-3B-Instruct")  # a hub id: checked as it downloads


def test_deepspeed_zero2_on_two_cpu_processes_skips_steps_cleanly(tmp_path):
    """ZeRO-2 on two processes, process 1 failing step 2 of 3: out of memory after its rollout (no
    backward yet), or a non-finite loss in its second micro-batch (after the first one's backward,
    whose gradients ZeRO has already reduced). Both runs skip that step on both processes and end
    with the same weights, identical on every replica: the skip drops the reduced gradients. The
    saved adapter holds those weights, written without copying the model to host memory."""
    # No ACCELERATE_USE_CPU here: accelerate turns DeepSpeed off in CPU mode; train.py sets use_cpu.
    env = dict(os.environ, OMP_NUM_THREADS="1",
               TORCH_EXTENSIONS_DIR=os.path.join(ROOT, ".cache", "torch_extensions"))
    runs = {}
    for fault in ("oom_after_rollout", "nan_second_micro_batch"):
        folder = tmp_path / fault
        folder.mkdir()
        flags = quick_flags(folder, "--deepspeed", os.path.join(ROOT, "ds_config.json"), "--max_steps", "3",
                            "--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "False",
                            "--eval_on_start", "False", "--lora_dropout", "0")  # same random draws in both runs
        done = subprocess.run([PYTHON, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                               "--main_process_port", free_port(), os.path.join(ROOT, "tests", "ds_train_worker.py"),
                               str(folder), "--fault", fault, *flags],
                              env=env, cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-4000:]
        ranks = [torch.load(folder / f"rank{r}.pt") for r in (0, 1)]
        assert all(r["deepspeed"] and r["world"] == 2 and r["host_copies"] == 0 for r in ranks)
        saved = load_file(folder / "saved" / "adapter_model.safetensors")
        assert {name.replace(".default", "") for name in ranks[0]["after"]} == set(saved)
        for name, weight in ranks[0]["after"].items():
            torch.testing.assert_close(saved[name.replace(".default", "")].float(), weight, rtol=0, atol=0, msg=name)
        assert [entry.get("skipped_steps") for entry in ranks[0]["log_history"][:3]] == [None, 1.0, None]
        for name in ranks[0]["after"]:
            torch.testing.assert_close(ranks[0]["after"][name], ranks[1]["after"][name], rtol=0, atol=0, msg=name)
        runs[fault] = ranks[0]
    before, after = runs["oom_after_rollout"]["before"], runs["oom_after_rollout"]["after"]
    assert any(not torch.equal(before[n], after[n]) for n in before), "steps 1 and 3 should train"
    for name, weight in runs["nan_second_micro_batch"]["after"].items():
        torch.testing.assert_close(weight, after[name], rtol=0, atol=0, msg=name)


def test_saving_under_zero_2_still_pushes_to_the_hub_when_asked():
    """The ZeRO-1/2 save (straight from the model) ends as Trainer.save_model does: a push with
    --push_to_hub, except for a checkpoint's save (an internal call)."""
    calls = []
    plugin = types.SimpleNamespace(zero_stage=2)
    stand_in = types.SimpleNamespace(
        is_deepspeed_enabled=True, accelerator=types.SimpleNamespace(state=types.SimpleNamespace(deepspeed_plugin=plugin)),
        args=types.SimpleNamespace(output_dir="out", push_to_hub=True),
        _save=lambda folder: calls.append(("save", folder)), push_to_hub=lambda **kwargs: calls.append("push"))
    RecPOTrainer.save_model(stand_in)
    RecPOTrainer.save_model(stand_in, "out/checkpoint-1", _internal_call=True)
    assert calls == [("save", "out"), "push", ("save", "out/checkpoint-1")]


@pytest.mark.parametrize("write, refused", [
    (lambda path: torch.save({}, path), False),
    (lambda path: torch.save({}, path, _use_new_zipfile_serialization=False), False),  # "checkpoint_serialization": false
    (lambda path: path.write_bytes(b"garbage"), True),
])
def test_deepspeed_s_state_files_are_checked_whole(tmp_path, write, refused):
    checkpoint = tmp_path / "checkpoint-2"
    fake_checkpoint(checkpoint)
    (checkpoint / "optimizer.pt").unlink()  # DeepSpeed keeps it in global_step*/
    state = checkpoint / "global_step2" / "mp_rank_00_model_states.pt"
    state.parent.mkdir()
    write(state)
    config = types.SimpleNamespace(deepspeed="ds_config.json")  # what check_checkpoint_state reads of the config
    if refused:
        with pytest.raises(UserError, match=re.escape(f"{state} is truncated or corrupt — resume from another")):
            run_folder.check_checkpoint_state(str(checkpoint), config)
    else:
        run_folder.check_checkpoint_state(str(checkpoint), config)


def test_deepspeed_without_a_launcher_trains_as_one_process_and_resumes(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env = dict(env, OMP_NUM_THREADS="2", TORCH_EXTENSIONS_DIR=os.path.join(ROOT, ".cache", "torch_extensions"))
    flags = quick_flags(tmp_path, "--deepspeed", os.path.join(ROOT, "ds_config.json"), "--eval_strategy", "no",
                        "--save_steps", "1", "--load_best_model_at_end", "False", "--eval_on_start", "False")
    subprocess.run([PYTHON, os.path.join(ROOT, "train.py"), *flags, "--max_steps", "1"], cwd=ROOT, check=True,
                   capture_output=True, env=env)
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()
    assert glob.glob(str(tmp_path / "out" / "checkpoint-1" / "global_step*"))  # DeepSpeed's optimizer state
    assert (tmp_path / "out" / "checkpoint-1" / "item_table.pt").exists()  # no evaluation: the resume takes it
    subprocess.run([PYTHON, os.path.join(ROOT, "train.py"), *flags, "--max_steps", "2", "--resume_from_checkpoint",
                    "last"], cwd=ROOT, check=True, capture_output=True, env=env)
    assert json.loads((tmp_path / "out" / "trainer_state.json").read_text())["global_step"] == 2


def test_a_build_lock_left_by_a_stopped_deepspeed_build_is_named(tmp_path, monkeypatch, capsys):
    """A launch killed while DeepSpeed compiled its CPU collectives left <op>/lock: the next DeepSpeed
    run waited on it for ever, without a word."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    train.warn_about_build_locks()
    assert capsys.readouterr().err == ""
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    lock.write_text("")
    os.utime(lock, (time.time() - 13 * 60, time.time() - 13 * 60))
    train.warn_about_build_locks()
    assert capsys.readouterr().err == (
        f"warning: {lock} is 13 min old: another run is building that DeepSpeed op, or a build was stopped midway "
        "and left it — if training then waits with no output, stop it, delete that file and start again\n")


def run_train(flags, check=True):
    return subprocess.run([PYTHON, os.path.join(ROOT, "train.py"), *flags], cwd=ROOT, capture_output=True,
                          text=True, check=check, env=dict(os.environ, OMP_NUM_THREADS="2"))


def test_train_py_end_to_end_then_the_saved_folder_loads(tmp_path):
    flags = quick_flags(tmp_path, "--max_steps", "2", "--eval_steps", "1", "--max_eval_samples", "4")
    dataset_dir = flags[flags.index("--dataset_dir") + 1]
    flags[flags.index("--dataset_dir") + 1] = os.path.relpath(dataset_dir, ROOT)  # train.py runs in ROOT
    run_train(flags)
    out = tmp_path / "out"
    assert json.load(open(out / "r2ec_run.json"))["dataset_dir"] == dataset_dir  # usable from any folder
    metrics = json.load(open(out / "final_results.json"))
    assert 0 <= metrics["eval_test_ndcg@10"] <= 1 and metrics["eval_valid_reasoning_length"] > 0
    assert (out / "adapter_config.json").exists() and (out / "tokenizer_config.json").exists()
    assert sorted(os.listdir(out / "reasoning"))[:2] == ["step0_test.jsonl", "step0_valid.jsonl"]
    umask = os.umask(0)
    os.umask(umask)
    modes = {path: oct(os.stat(path).st_mode & 0o777) for path in glob.glob(str(out / "**"), recursive=True)
             if os.path.isfile(path)}
    assert [path for path in modes if path.endswith(".safetensors")], "the adapter and checkpoints' weights"
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes  # safetensors writes 0600 by itself
    from peft import PeftModel
    base, _ = load_backbone(tiny_backbone("qwen2"), dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, str(out))
    from safetensors.torch import load_file
    best = json.load(open(out / "checkpoint-2" / "trainer_state.json"))["best_model_checkpoint"]
    best_weights = load_file(os.path.join(best, "adapter_model.safetensors"))
    loaded = {n.replace(".default", ""): p for n, p in reloaded.named_parameters() if "lora_" in n}
    assert loaded.keys() == best_weights.keys()
    for name, weight in best_weights.items():
        torch.testing.assert_close(loaded[name], weight, msg=name)  # the best model is what was saved


def test_the_data_order_follows_the_trainer_state_epoch(tmp_path):
    """Read from the state, not set by Trainer's set_epoch, which a resume with several processes
    cannot reach through accelerate's skip wrappers (the one-process resume test can't show it)."""
    trainer = tiny_trainer(tmp_path)
    sampler = trainer._get_train_sampler()
    first = list(sampler)
    trainer.state.epoch = 1.25  # a resume a quarter into the second epoch
    assert list(sampler) == list(RepeatedBatchSampler(8, 2, 1, seed=trainer.args.seed + 1)) != first


@pytest.mark.parametrize("eval_steps, evaluations", [("5", [0, 5, 7]), ("3", [0, 3, 6, 7])],
                         ids=["saved_at_an_evaluation", "saved_between_evaluations"])
def test_resume_from_checkpoint_matches_the_uninterrupted_run(tmp_path, eval_steps, evaluations):
    """A run killed right after its step-5 checkpoint (what the uninterrupted run wrote by then),
    the first step of epoch 2 (8 samples, 2 a step), and resumed: the resumed steps see epoch 2's
    order, as the uninterrupted run's did. Saved between evaluations, the checkpoint keeps the item
    table (which the steps since the last evaluation wrote rows of) and the resume starts from it."""
    common = ["--eval_steps", eval_steps, "--save_steps", "5", "--max_eval_samples", "2", "--gen_temperature", "1.0",
              "--load_best_model_at_end", "False", "--save_total_limit", "5", "--max_steps", "7"]
    run_train(quick_flags(tmp_path / "a", *common))
    killed = tmp_path / "b" / "out"
    shutil.copytree(tmp_path / "a" / "out" / "checkpoint-5", killed / "checkpoint-5")
    shutil.copy(tmp_path / "a" / "out" / "r2ec_run.json", killed)
    assert (killed / "checkpoint-5" / "item_table.pt").exists() == (eval_steps == "3")
    run_train(quick_flags(tmp_path / "b", "--resume_from_checkpoint", "last", *common))
    from safetensors.torch import load_file
    a = load_file(str(tmp_path / "a" / "out" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "out" / "adapter_model.safetensors"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6, msg=name)
    state_a = json.load(open(tmp_path / "a" / "out" / "trainer_state.json"))
    state_b = json.load(open(tmp_path / "b" / "out" / "trainer_state.json"))
    rewards = lambda s: [e["reward/mean"] for e in s["log_history"] if "reward/mean" in e]  # noqa: E731
    assert len(rewards(state_a)) == 7 and rewards(state_b) == pytest.approx(rewards(state_a), rel=1e-4)
    # No second evaluation of the checkpoint's step, and early stopping's count carried over
    evaluated = lambda s: [e["step"] for e in s["log_history"] if "eval_valid_ndcg@10" in e]  # noqa: E731
    assert evaluated(state_b) == evaluated(state_a) == evaluations
    assert state_b["stateful_callbacks"]["EarlyStoppingCallback"] == state_a["stateful_callbacks"]["EarlyStoppingCallback"]


def test_a_resume_through_the_trainer_api_skips_the_start_evaluation_and_takes_the_saved_table(tmp_path):
    """eval_on_start is on by default; a resume called straight on the trainer (not through train.py)
    does not evaluate at its start, which would encode the table afresh: it takes item_table.pt."""
    first = tiny_trainer(tmp_path, save_strategy="steps", save_steps=1)
    first.train()
    checkpoint = tmp_path / "run" / "checkpoint-1"
    table = torch.load(checkpoint / "item_table.pt")
    saved = table["embeddings"] + 1  # told apart from what encoding the items again would give
    torch.save({**table, "embeddings": saved}, checkpoint / "item_table.pt")
    resumed = tiny_trainer(tmp_path, max_steps=2, eval_on_start=True)
    evaluated, tables = [], []
    evaluate, update = resumed.evaluate, resumed.update
    resumed.evaluate = lambda *args, **kwargs: evaluated.append(resumed.state.global_step) or evaluate(*args, **kwargs)
    resumed.update = lambda model, batch: tables.append(resumed.item_table.embeddings.clone()) or update(model, batch)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert evaluated == [] and resumed.state.global_step == 2
    torch.testing.assert_close(tables[0], saved)


def test_a_resume_takes_the_checkpoint_s_item_table_and_names_a_bad_one(tmp_path):
    trainer = tiny_trainer(tmp_path)
    checkpoint = tmp_path / "checkpoint-5"
    checkpoint.mkdir()
    trainer._resume_from = str(checkpoint)
    items, width = len(trainer.item_table), trainer.model.config.hidden_size
    saved = torch.randn(items, width)
    trainer.item_table.embeddings = saved
    trainer.save_item_table(str(checkpoint))
    trainer.item_table.embeddings = torch.zeros(items, width)
    trainer.restore_item_table(trainer.model)
    assert torch.equal(trainer.item_table.embeddings, saved)  # taken as saved, not encoded afresh
    (checkpoint / "item_table.pt").write_bytes(b"garbage")
    with pytest.raises(UserError, match=re.escape("item_table.pt cannot be read (")) as caught:
        trainer.restore_item_table(trainer.model)
    assert "\n" not in str(caught.value)
    another_dataset = {"embeddings": torch.randn(items - 1, width), "max_item_tokens": trainer.args.max_item_tokens}
    torch.save(another_dataset, checkpoint / "item_table.pt")
    with pytest.raises(UserError, match=re.escape(f"is not an item table of {items} items × {width} —")):
        trainer.restore_item_table(trainer.model)
    fresh = trainer.item_table.encode(trainer.model, list(range(items)))
    # Encoded under another --max_item_tokens (the resume changed it), of an older version (a bare
    # tensor, without the limit), or saved at an evaluation (no file): every item encoded afresh
    torch.save(saved, checkpoint / "item_table.pt")
    trainer.restore_item_table(trainer.model)
    torch.testing.assert_close(trainer.item_table.embeddings, fresh)
    trainer.item_table.embeddings = torch.zeros(items, width)
    torch.save({"embeddings": saved, "max_item_tokens": trainer.args.max_item_tokens + 1}, checkpoint / "item_table.pt")
    trainer.restore_item_table(trainer.model)
    torch.testing.assert_close(trainer.item_table.embeddings, fresh)
    (checkpoint / "item_table.pt").unlink()
    trainer.item_table.embeddings = torch.zeros(items, width)
    trainer.restore_item_table(trainer.model)
    torch.testing.assert_close(trainer.item_table.embeddings, fresh)


def test_early_stopping_ends_the_run_after_patience_evaluations_without_a_gain(tmp_path):
    """Learning rate 0: every evaluation equals the first. The step-1 evaluation sets the best
    (the step-0 one, before training, is never the best); steps 2 and 3 bring no gain, so a
    patience of 2 stops the run at step 3 of 10."""
    flags = quick_flags(tmp_path, "--learning_rate", "0", "--eval_steps", "1", "--max_steps", "10",
                        "--early_stopping_patience", "2", "--max_eval_samples", "2")
    trainer = train.build_trainer(train.parse_config(flags))
    trainer.train()
    evaluated = [entry["step"] for entry in trainer.state.log_history if "eval_valid_ndcg@10" in entry]
    assert trainer.state.global_step == 3 and evaluated == [0, 1, 2, 3]
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-1")


def test_lora_flags_shape_the_adapter(tmp_path):
    flags = quick_flags(tmp_path, "--lora_r", "3", "--lora_alpha", "6", "--lora_dropout", "0.25",
                        "--lora_target_modules", "q_proj,v_proj")
    model = train.build_trainer(train.parse_config(flags)).model
    adapter = model.peft_config["default"]
    assert (adapter.r, adapter.lora_alpha, adapter.lora_dropout, adapter.target_modules) == (3, 6, 0.25, {"q_proj", "v_proj"})
    trained = {name.split(".lora_")[0].rsplit(".", 1)[1]: param.shape for name, param in model.named_parameters()
               if param.requires_grad and ".lora_A." in name}
    assert set(trained) == {"q_proj", "v_proj"} and all(shape[0] == 3 for shape in trained.values())


@pytest.mark.parametrize("flags, message", [
    (["--dataset_dir", "/nonexistent/Video_Games_0_2022-10-2023-10"], "does not exist"),
    (["--advantage_type", "ppo"], "choose one of gaussian, rloo"),
    (["--group_size", "0"], "--group_size 0"),
    (["--trainer_relabel_topk", "9"], "--trainer_relabel_topk 9"),
    (["--max_new_tokens", "1000000000"], "--max_prompt_tokens 2048 + --max_new_tokens 1000000000 exceed the "
                                         "backbone's context of 4096 tokens (max_position_embeddings) — lower them"),
    (["--max_new_tokens", "2049"], "--max_prompt_tokens 2048 + --max_new_tokens 2049 exceed"),  # 4097 > 4096
])
def test_bad_input_gives_one_clear_line(tmp_path, flags, message):
    with pytest.raises(UserError) as caught:
        train.main(quick_flags(tmp_path, *flags))
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_a_deepspeed_config_given_inline_is_read_as_accelerate_reads_it():
    config = {"zero_optimization": {"stage": 2}, "train_batch_size": "auto"}
    text = json.dumps(config)
    assert inline_deepspeed_config(text) == config
    assert inline_deepspeed_config(base64.urlsafe_b64encode(text.encode()).decode()) == config
    for not_a_config in ("ds_config.json", "ds_config", text[:-1], "abcd"):
        assert inline_deepspeed_config(not_a_config) is None, not_a_config
    check_zero_stage('{"zero_optimization": null}')  # accelerate takes it: stage 0


def test_report_to_takes_a_comma_separated_list(tmp_path, monkeypatch):
    monkeypatch.setattr("transformers.integrations.get_available_reporting_integrations", lambda: ["tensorboard", "wandb"])
    config = train.parse_config(["--output_dir", str(tmp_path / "run"), "--report_to", "tensorboard, wandb"])
    assert config.report_to == ["tensorboard", "wandb"]


def ds_file(config: dict) -> str:
    """A DeepSpeed config written to a file of its own, for the parametrized flags below."""
    path = os.path.join(tempfile.mkdtemp(), "ds.json")
    with open(path, "w") as f:
        json.dump(config, f)
    return path


@pytest.mark.parametrize("flags, message", [
    (["--foo", "3"], "unknown argument(s) --foo 3"),
    (["--learning_rate", "-1"], "--learning_rate -1.0"),
    (["--train_batch_size", "0"], "--train_batch_size 0: must be at least 1"),  # the flag README and launcher use
    (["--eval_batch_size", "0"], "--eval_batch_size 0: must be at least 1"),
    (["--dataloader_num_workers", "-1"], "--dataloader_num_workers -1: must be 0 (load in the main process) or"),
    (["--lora_r", "0"], "--lora_r 0"),
    (["--lora_dropout", "1"], "--lora_dropout 1.0"),
    (["--window_size", "0"], "--window_size 0"),
    (["--max_eval_samples", "0"], "--max_eval_samples 0"),
    (["--early_stopping_patience", "0"], "--early_stopping_patience 0"),
    (["--eval_strategy", "sometimes"], "sometimes is not a valid"),
    (["--deepspeed", "/nonexistent/ds.json"], "--deepspeed '/nonexistent/ds.json': no such file, nor a config given "
                                              "inline as JSON or base64 — pass a DeepSpeed config file, e.g. the "
                                              "shipped ds_config.json (launch_train.sh: DS_CONFIG)"),
    (["--deepspeed", "ds_config"], f"--deepspeed 'ds_config' (relative to {os.getcwd()}): no such file, nor a config"),
    (["--deepspeed", '{"zero_optimization": {"stage": 3}}'], """--deepspeed '{"zero_optimization": {"stage": 3}}': """
                                                             "zero_optimization stage 3 — RecPO runs ZeRO stages 0-2"),
    (["--deepspeed", '{"zero_optimization": {"stage": "two"}}'], "zero_optimization stage 'two' — RecPO runs ZeRO"),
    (["--deepspeed", ds_file({"zero_optimization": {"stage": 3, "overlap_comm": True}})], "stage 3 — RecPO runs ZeRO "
                                                                                           "stages 0-2 (the shipped"),
    (["--deepspeed", '{"zero_optimization": 5}'], """--deepspeed '{"zero_optimization": 5}': accelerate cannot read """
                                                  "this config ('int' object has no attribute 'get') — it and each of "
                                                  "its sections (zero_optimization, …) must be JSON objects"),
    (["--deepspeed", json.dumps({"train_batch_size": "auto", "zero_optimization": {"stage": 3, "overlap_comm": True}})],
     """--deepspeed '{"train_batch_size": "auto", "zero_optimization": {"stage":…: zero_optimization stage 3"""),
    (["--deepspeed", "[1, 2]"], "--deepspeed '[1, 2]': accelerate cannot read this config ('list' object has no "
                                "attribute 'get')"),
    (["--deepspeed", base64.b64encode(b"[1, 2]").decode()], "--deepspeed 'WzEsIDJd' (relative to "  # base64: a path?
                                                            f"{os.getcwd()}): accelerate cannot read this config"),
    (["--deepspeed", ds_file({"zero_optimization": {"stage": 2, "offload_optimizer": "cpu"}})],
     "accelerate cannot read this config ('str' object has no attribute 'get')"),
    (["--deepspeed", "ds_config.yaml"], "--deepspeed 'ds_config.yaml' (relative to "),  # accelerate's words before
    (["--deepspeed", '{"zero_optimization": {"stage": 2}'],  # inline JSON with a brace missing
     """--deepspeed '{"zero_optimization": {"stage": 2}': no such file, nor a config given inline as JSON or base64"""),
    (["--report_to", "no_such_tracker"], "--report_to no_such_tracker: no such integration — choose from "),
    (["--report_to", "dvclive"], "--report_to dvclive: not installed here — pip install it"),  # not in requirements.txt
    (["--report_to", "tensorboard, dvclive"], "--report_to dvclive: not installed here"),  # a list: each one checked
    (["--deepspeed", "tests"], "--deepspeed tests is a folder — pass a DeepSpeed config file"),
    (["--max_steps", "-5"], "--max_steps -5: must be positive, or -1 to train --num_train_epochs epochs"),
    (["--max_steps", "0"], "--max_steps 0: must be positive, or -1 to train --num_train_epochs epochs"),
    (["--metric_for_best_model", "eval_valid_ndcg@50"], "valid ranking figure (test is held out) — choose one of "
                                                        "eval_valid_ndcg@5, "),
    (["--metric_for_best_model", "eval_test_ndcg@10"], "--metric_for_best_model 'eval_test_ndcg@10': models are"),
    (["--reasoning", "False", "--num_iterations", "2"], "--reasoning False trains by cross-entropy, one update"),
    (["--num_iterations", "2", "--eval_steps", "5"], "--eval_steps 5: must be a multiple of --num_iterations 2"),
    (["--num_iterations", "2", "--eval_steps", "0.1"], "--eval_steps 0.1: must be a multiple of --num_iterations 2 "
                                                        "(in steps)"),
    (["--num_iterations", "3", "--save_steps", "4", "--load_best_model_at_end", "False"],
     "--save_steps 4: must be a multiple of --num_iterations 3 (in steps), so that no checkpoint falls between"),
    (["--metric_for_best_model", "valid_reasoning_length"], "--metric_for_best_model 'valid_reasoning_length'"),
    (["--save_strategy", "no"], "--load_best_model_at_end (the default) evaluates every checkpoint, but "
                                "--eval_strategy steps differs from --save_strategy no — pass "
                                "--load_best_model_at_end False, or the same strategy to both"),
    (["--eval_strategy", "no"], "--eval_strategy no differs from --save_strategy steps"),
    (["--save_steps", "7"], "--save_steps 7: with --load_best_model_at_end"),
    (["--save_steps", "7", "--eval_steps", "5"], "drop --save_steps"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps 0: must be at least 1"),
    (["--seed", "-1"], "--seed -1: must be between 0 and 2**32 - 1"),
    (["--tau", "inf"], "--tau inf: must be a finite number"),
    (["--tau", "1e-320"], "--tau 1e-320: must be at least 1e-06 (scores are similarities / τ; SPEC's τ is "
                          "0.02)"),  # trained nothing: every step skipped, scores inf
    (["--tau", "0"], "--tau 0.0: must be at least 1e-06"),
    (["--reward_ndcg_k", str(10 ** 20)], f"--reward_ndcg_k {10 ** 20}: too large (the most is 2**63 - 1)"),
    (["--micro_batch_size", str(2 ** 63)], f"--micro_batch_size {2 ** 63}: too large"),  # overflowed at the first step
    (["--eval_batch_size", str(2 ** 63)], f"--eval_batch_size {2 ** 63}: too large"),  # as given, not the field's name
    (["--warmup_steps", "nan"], "--warmup_steps nan: must be a finite number"),  # passed --check_only, then crashed
    (["--num_train_epochs", "inf"], "--num_train_epochs inf: must be a finite number"),
    (["--eval_steps", "inf"], "--eval_steps inf: must be a finite number"),
    (["--max_grad_norm", "nan"], "--max_grad_norm nan: must be a finite number"),  # would turn clipping off
    (["--advantage_type", "rloo", "--group_size", "1"], "every advantage is 0 and nothing trains"),
    (["--eval_steps", "0"], "--eval_steps 0: must be positive"),
    (["--eval_steps", "-1"], "--eval_steps -1: must be positive"),
    (["--save_steps", "-2", "--load_best_model_at_end", "False"], "--save_steps -2: must be positive"),
    (["--logging_steps", "-1"], "--logging_steps -1: must be positive"),
    (["--num_train_epochs", "0"], "--max_steps -1 and --num_train_epochs 0 train no step"),
    (["--lora_target_modules", ""], "--lora_target_modules '': give comma-separated module names"),
    (["--learning_rate", "abc"], "invalid float value: 'abc' — python train.py --help lists the flags"),
    (["--bf16", "maybe"], "argument --bf16: Truthy value expected: got maybe"),
    # Trainer refused these only after the model loaded (the optimizer and schedule are built then)
    (["--optim", "adamw_bnb_8bit"], "--optim adamw_bnb_8bit needs a package not installed here (You need to install "
                                    "`bitsandbytes`"),  # not in requirements.txt
    (["--adam_beta1", "2"], "Invalid beta parameter at index 0: 2.0 — fix --learning_rate, --adam_beta1"),
    (["--lr_scheduler_type", "cosine_with_min_lr"], "--lr_scheduler_type cosine_with_min_lr: One of min_lr or "
                                                    "min_lr_rate should be set"),
    (["--lr_scheduler_type", "warmup_stable_decay"], "missing 1 required positional argument: 'num_decay_steps' — "
                                                     "pass what it needs (only that) as --lr_scheduler_kwargs"),
    (["--use_liger_kernel", "True"], "--use_liger_kernel True needs the liger-kernel package"),
    (["--lr_scheduler_kwargs", "{min_lr: 1}"], "--lr_scheduler_kwargs '{min_lr: 1}' is not valid JSON (Expecting "
                                               "property name"),  # json's words alone named no flag
])
def test_bad_flags_are_named_before_any_work(flags, message):
    with pytest.raises(UserError) as caught:
        train.parse_config(["--dataset_dir", "/nonexistent", *flags])
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_optimizer_and_schedule_flags_that_can_run_pass_the_check(monkeypatch):
    """The stand-in build refuses no usable setting: a schedule given what it needs (per parameter
    group, of which Trainer makes two), an optimizer that is not torch's or needs the model itself
    (GaLore), a DeepSpeed config's own optimizer (built by DeepSpeed)."""
    import transformers

    deepspeed_optimizer = json.dumps({"optimizer": {"type": "AdamW"}, "zero_optimization": {"stage": 2}})
    for flags in (["--lr_scheduler_type", "cosine_with_min_lr", "--lr_scheduler_kwargs", '{"min_lr_rate": 0.1}'],
                  ["--lr_scheduler_type", "reduce_lr_on_plateau", "--lr_scheduler_kwargs", '{"min_lr": [0, 0]}'],
                  ["--optim", "adafactor"], ["--deepspeed", deepspeed_optimizer, "--adam_beta1", "2"]):
        train.parse_config(["--dataset_dir", "/nonexistent", *flags])

    def needs_the_model(args, model=None):  # what transformers says for GaLore, whose package is not here
        raise ValueError(f"You need to pass a model to initialize {args.optim} optimizer.")

    monkeypatch.setattr(transformers.Trainer, "get_optimizer_cls_and_kwargs", staticmethod(needs_the_model))
    train.parse_config(["--dataset_dir", "/nonexistent", "--optim", "galore_adamw", "--optim_target_modules",
                        "all-linear"])


@pytest.mark.parametrize("flags, eval_steps, save_steps", [
    ([], 3, 3),  # from the data: 48 train samples / (B = 2 · accum 1 · 1 process) / 8 = 3
    (["--eval_steps", "5"], 5, 5),
    (["--eval_steps", "5", "--save_steps", "5"], 5, 5),
    (["--eval_steps", "5", "--save_steps", "7", "--load_best_model_at_end", "False"], 5, 7),
    (["--save_steps", "7", "--load_best_model_at_end", "False"], 3, 7),
    (["--save_steps", "7", "--eval_strategy", "epoch", "--save_strategy", "epoch"], 3, 7),  # unused: allowed
])
def test_checkpoints_follow_evaluations_unless_asked_otherwise(flags, eval_steps, save_steps):
    config = train.parse_config(["--dataset_dir", "/nonexistent", "--train_batch_size", "2", *flags])
    config.set_intervals(num_train=48)
    assert (config.eval_steps, config.save_steps) == (eval_steps, save_steps)


def test_cli_error_is_the_only_line_on_stderr(tmp_path):
    result = run_train(["--dataset_dir", str(tmp_path), "--learning_rate", "-1"], check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: --learning_rate -1.0: must be >= 0"]


def test_output_folder_follows_the_run_name_in_either_spelling():
    parse = lambda *flags: train.parse_config(list(flags))  # noqa: E731
    assert parse().output_dir == os.path.join("outputs", "r2ec")
    assert parse("--run_name", "a").output_dir == os.path.join("outputs", "a")
    assert parse("--run_name=b").output_dir == os.path.join("outputs", "b")
    assert parse("--run_name=b", "--output_dir=elsewhere").output_dir == "elsewhere"
    assert parse("--run_name", "ablations/no_kl").output_dir == os.path.join("outputs", "ablations", "no_kl")
    assert parse("--run_name", "/scratch/run").output_dir == "/scratch/run"  # a path: taken as given
    for name in (".", "a/.."):
        with pytest.raises(UserError, match=re.escape(f"--run_name {name!r} names outputs/ itself, which holds "
                                                      "the other runs — give this run a name of its own")):
            parse("--run_name", name)
    assert parse("--run_name", ".", "--output_dir", "runs/x").output_dir == "runs/x"  # a label only, then
    for flags in (["--run_name", "/"], ["--output_dir", "/"], ["--output_dir", "//"]):
        with pytest.raises(UserError, match=re.escape(f"--output_dir {flags[1]} is the root folder")):
            parse(*flags)
    config = parse("--train_batch_size=3", "--eval_batch_size", "5")
    assert (config.per_device_train_batch_size, config.per_device_eval_batch_size) == (3, 5)


def damage_inside(path):
    """Flip a byte of the pickle inside a torch.save archive, leaving the archive itself whole."""
    data = bytearray(path.read_bytes())
    entry = next(i for i in zipfile.ZipFile(path).infolist() if i.filename.endswith("data.pkl"))
    name_length, extra_length = struct.unpack("<HH", data[entry.header_offset + 26:entry.header_offset + 30])
    data[entry.header_offset + 30 + name_length + extra_length + 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(Exception):
        torch.load(path)


def test_a_state_file_saved_without_checksums_is_whole(tmp_path):
    """torch.serialization.set_crc32_options(False) writes entries with CRC 0, which torch.load reads."""
    torch.serialization.set_crc32_options(False)
    try:
        torch.save({"step": torch.arange(3)}, tmp_path / "optimizer.pt")
    finally:
        torch.serialization.set_crc32_options(True)
    assert run_folder.saved_by_torch(str(tmp_path / "optimizer.pt"))
    torch.save({"step": torch.arange(3)}, tmp_path / "scheduler.pt")
    assert run_folder.saved_by_torch(str(tmp_path / "scheduler.pt"))
    damage_inside(tmp_path / "scheduler.pt")
    assert not run_folder.saved_by_torch(str(tmp_path / "scheduler.pt"))


def fake_checkpoint(folder, lora_r=4):
    """The files check_checkpoint reads, whole: state, adapter config and weights, optimizer, scheduler,
    and a run record of the default settings on a Video_Games dataset kept elsewhere."""
    from safetensors.torch import save_file
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text("{}")
    (folder / "r2ec_run.json").write_text(json.dumps(
        {"dataset_dir": "/data/Video_Games_0_2022-10-2023-10", "reasoning": True, "similarity_type": "cosine", "tau": 0.02}))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"r": lora_r, "lora_alpha": 128, "target_modules": list(LORA_TARGETS)}))
    save_file({"lora_A": torch.zeros(lora_r, 2)}, str(folder / "adapter_model.safetensors"))
    torch.save({}, folder / "optimizer.pt")
    torch.save({}, folder / "scheduler.pt")
    torch.save({}, folder / "rng_state_0.pth")
    torch.save({}, folder / "rng_state_1.pth")


def test_output_and_resume_folders_are_checked_before_any_work(tmp_path, monkeypatch):
    config = lambda *flags: train.parse_config(["--output_dir", str(tmp_path / "run"), *flags])  # noqa: E731
    assert run_folder.check_output_dir(config()) is None
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        run_folder.check_output_dir(train.parse_config(["--output_dir", str(tmp_path / "file")]))
    with pytest.raises(UserError, match="no checkpoint-\\* folder"):
        run_folder.check_output_dir(config("--resume_from_checkpoint", "last"))
    with pytest.raises(UserError, match="not a checkpoint folder"):
        run_folder.check_output_dir(config("--resume_from_checkpoint", str(tmp_path)))
    with pytest.raises(UserError, match="checkpoint-3' does not exist — pass a checkpoint-\\* folder of a run"):
        run_folder.check_output_dir(config("--resume_from_checkpoint", str(tmp_path / "run" / "checkpoint-3")))
    with pytest.raises(UserError, match="file' is a file — pass the checkpoint-\\* folder that holds it"):
        run_folder.check_output_dir(config("--resume_from_checkpoint", str(tmp_path / "file")))
    for step in (2, 10):
        fake_checkpoint(tmp_path / "run" / f"checkpoint-{step}")
    assert run_folder.check_output_dir(config("--resume_from_checkpoint", "last")) == str(tmp_path / "run" / "checkpoint-10")
    monkeypatch.setenv("HOME", str(tmp_path))  # --resume_from_checkpoint=~/... reaches Python unexpanded
    assert run_folder.check_output_dir(config("--resume_from_checkpoint", "~/run/checkpoint-2")) == str(
        tmp_path / "run" / "checkpoint-2")
    with pytest.raises(UserError, match=f"--output_dir {re.escape(str(tmp_path))}/run/checkpoint-2 is a checkpoint "
                                        f"of the run in {re.escape(str(tmp_path))}/run — pass that folder as "
                                        "--output_dir with --resume_from_checkpoint last"):
        run_folder.check_output_dir(train.parse_config(["--output_dir", "~/run/checkpoint-2"]))
    (tmp_path / "run" / "trainer_state.json").write_text("{}")  # a run's output folder is not a checkpoint
    with pytest.raises(UserError, match="not a checkpoint folder"):
        run_folder.check_output_dir(config("--resume_from_checkpoint", str(tmp_path / "run")))
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(UserError, match="is not writable"):
        run_folder.check_output_dir(config())


def test_an_earlier_run_is_kept_unless_replaced_on_purpose(tmp_path):
    """Training into a run's folder would mix its checkpoints with the new run's (rotation deletes
    some, `last` resumes the old one): refused, also by --check_only; --overwrite_output_dir True
    clears the old checkpoints and run record, but only once the new run is built."""
    run = tmp_path / "run"
    fake_checkpoint(run / "checkpoint-3")
    (run / "trainer_state.json").write_text("{}")
    (run / "r2ec_run.json").write_text("{}")
    config = lambda *flags: train.parse_config(["--output_dir", str(run), *flags])  # noqa: E731
    for flags in ([], ["--check_only", "True"]):
        with pytest.raises(UserError, match="holds an earlier run — continue it with --resume_from_checkpoint last, "
                                            r"pick another --output_dir \(RUN_NAME for launch_train.sh\), or pass"):
            run_folder.check_output_dir(config(*flags))
    assert run_folder.check_output_dir(config("--overwrite_output_dir", "True")) is None
    assert (run / "checkpoint-3").exists()  # the check alone deletes nothing
    with pytest.raises(UserError, match=re.escape(f"--resume_from_checkpoint continues the run in {run}, and "
                                                  "--overwrite_output_dir would replace it — pass only one of them")):
        run_folder.check_output_dir(config("--overwrite_output_dir", "True", "--resume_from_checkpoint", "last"))
    flags = quick_flags(tmp_path, "--output_dir", str(run), "--overwrite_output_dir", "True",
                        "--lora_target_modules", "q_proj,qkv_proj")
    with pytest.raises(UserError, match="LoRA targets qkv_proj"):
        train.main(flags)
    assert (run / "checkpoint-3").exists() and (run / "r2ec_run.json").exists()  # a failed start loses nothing
    for name in ("final_results.json", "training_curves.png", "adapter_model.safetensors", "README.md", ".notes"):
        (run / name).write_text("old")
    (run / "runs").mkdir()
    run_folder.clear_earlier_run(str(run))
    assert sorted(os.listdir(run)) == [".notes"]  # nothing of the old run is left to mix with the new one
    fake_checkpoint(run / "checkpoint-3")
    fake_checkpoint(tmp_path / "other" / "checkpoint-5")  # another run's checkpoint, resumed into this folder
    with pytest.raises(UserError, match="holds an earlier run"):
        run_folder.check_output_dir(config("--resume_from_checkpoint", str(tmp_path / "other" / "checkpoint-5")))
    assert run_folder.check_output_dir(config("--resume_from_checkpoint", "last")) == str(run / "checkpoint-3")


@pytest.mark.parametrize("make, given, problem", [
    (lambda t: os.symlink(t / "gone", t / "link"), "link", "is a link to a missing place (or a loop of links)"),
    (lambda t: os.symlink(t / "gone", t / "link"), "link/run", "cannot be created: {t}/link is a link to a missing "
                                                               "place (or a loop of links)"),
    (lambda t: (os.symlink(t / "b", t / "a"), os.symlink(t / "a", t / "b")), "a", "is a link to a missing place (or "
                                                                              "a loop of links)"),
    (lambda t: None, "x" * 256 + "/run",
     "cannot be created: a part of it, '" + "x" * 59 + "…, is longer than the 255 bytes a name may have"),
])
def test_an_output_dir_that_cannot_be_created_is_named_up_front(tmp_path, make, given, problem):
    """A link to nowhere, a loop of links and an over-long name do not exist, yet no folder can be
    made there: the Trainer's makedirs raised FileExistsError or ENAMETOOLONG after the model loaded."""
    make(tmp_path)
    folder = tmp_path / given
    with pytest.raises(UserError) as caught:
        run_folder.check_output_dir(train.parse_config(["--output_dir", str(folder)]))
    assert str(caught.value) == f"--output_dir {folder} {problem.format(t=tmp_path)} — pass a folder you can write to"
    with pytest.raises(OSError):  # what the message says
        os.makedirs(folder)


def test_a_folder_a_run_would_overwrite_or_mix_with_is_refused_even_when_overwriting(tmp_path):
    """--output_dir . in the repository (PEFT's model card went over its README.md), a backbone, a
    dataset folder or a data root holding one (data/sample). A log or recommend.py's output beside
    a run is no reason to refuse, and stays."""
    for folder, others in (("repo", ("README.md", "train.py", "notes.txt")),
                           ("backbone", ("config.json", "model.safetensors")), ("data", ("dataset_dict.json",)),
                           ("data_root", ("Video_Games_0_2022-10-2023-10/dataset_dict.json",)),
                           ("venv", ("pyvenv.cfg",)), ("home", (".bashrc", ".ssh/known_hosts"))):  # .venv, ~
        for name in others:
            (tmp_path / folder / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / folder / name).write_text("{}")
        others = [name.split("/")[0] for name in others]
        for flags in ([], ["--overwrite_output_dir", "True"], ["--check_only", "True"]):
            config = train.parse_config(["--output_dir", str(tmp_path / folder), *flags])
            clashing = ", ".join(sorted(set(others) - {"notes.txt"}))
            with pytest.raises(UserError, match=f"holds {clashing}, not an earlier run's, which the run would "
                                                "overwrite or mix with — pick a new or empty folder"):
                run_folder.check_output_dir(config)
    (tmp_path / "killed").mkdir()
    (tmp_path / "killed" / "runs").mkdir()  # empty, as TensorBoard leaves it before its first event
    (tmp_path / "killed" / "train.log").write_text("")  # `> outputs/r1/train.log` exists before train.py starts
    assert run_folder.check_output_dir(train.parse_config(["--output_dir", str(tmp_path / "killed")])) is None
    for name in ("runs", "reasoning"):  # files where the run makes these folders: it failed at their first write
        (tmp_path / "logs_as_files" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "logs_as_files" / name).write_text("")
        with pytest.raises(UserError, match=f"holds {name}, not an earlier run's"):
            run_folder.check_output_dir(train.parse_config(["--output_dir", str(tmp_path / "logs_as_files")]))
        (tmp_path / "logs_as_files" / name).unlink()
    run = tmp_path / "run"
    fake_checkpoint(run / "checkpoint-3")
    (run / "test.jsonl").write_text("mine")  # README step 4 writes recommend.py's output into the run folder
    (run / "zero_to_fp32.py").write_text("")  # DeepSpeed ZeRO-3's save_model writes it: a run's file, not code
    assert run_folder.check_output_dir(train.parse_config(["--output_dir", str(run), "--overwrite_output_dir", "True"])) is None
    run_folder.clear_earlier_run(str(run))
    assert os.listdir(run) == ["test.jsonl"]


class StandInTrainer:
    """What train.main uses of a RecPOTrainer, its train() and save_model() given by the test."""
    category = "Video_Games"
    item_titles = {0: "", 1: "A game"}
    accelerator = types.SimpleNamespace(wait_for_everyone=lambda: None)

    def __init__(self, on_train, on_save=lambda: None):
        self.on_train, self.on_save = on_train, on_save

    def is_world_process_zero(self):
        return True

    def add_callback(self, callback):
        pass

    def train(self, resume_from_checkpoint=None):
        self.on_train()

    def save_model(self, output_dir):
        self.on_save()


@pytest.mark.parametrize("error, output_disk_full, stage, message", [
    (OSError(28, "No space left on device"), True, "train", "no space left on the disk of .*/run \\(\\[Errno 28\\]"),
    (Exception("No space left on device (os error 28)"), True, "train", "no space left on the disk of"),  # tokenizers
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"), True, "train",
     "no space left on the disk of .*unexpected pos 704"),  # torch.save on a full disk
    (OSError(28, "No space left on device"), False, "train", "no space left on a disk \\(a full /dev/shm"),
    (OSError(28, "No space left on device"), True, "save_model", "then serve its last checkpoint-\\* with recommend.py"),
    (ZeroDivisionError("division by zero"), False, "train", None),  # other failures are not disguised
    (RuntimeError("CUDA error: an illegal memory access"), False, "save_model", None),
])
def test_a_full_disk_is_one_line_that_says_how_to_continue(tmp_path, monkeypatch, error, output_disk_full, stage,
                                                             message):
    """No real full disk in CI: the error each writer raises on one (measured on a 1 MiB tmpfs) and
    the free space of the output folder's disk are given."""
    def fail():
        raise error

    monkeypatch.setattr(train, "build_trainer", lambda config: StandInTrainer(
        on_train=fail if stage == "train" else lambda: None, on_save=fail))
    free = 0 if output_disk_full else 2**40
    monkeypatch.setattr(train.shutil, "disk_usage", lambda path: shutil_usage(free))
    argv = ["--output_dir", str(tmp_path / "run"), "--model", tiny_backbone("qwen2"), "--report_to", "none"]
    if message is None:
        with pytest.raises(type(error)):
            train.main(argv)
        return
    with pytest.raises(UserError, match=message) as caught:
        train.main(argv)
    continuation = "resume with --resume_from_checkpoint last" if stage == "train" else "serve its last checkpoint"
    assert continuation in str(caught.value) and "\n" not in str(caught.value)


def test_the_logs_of_a_run_killed_before_its_first_save_are_refused_or_overwritten(tmp_path, monkeypatch):
    """Its TensorBoard run and evaluation records would sit beside the new run's: refused, unless
    overwritten (the quick start overwrites its folder). Only what such a run writes goes: a folder
    named runs/ or reasoning/ holding anything else (another run saved as outputs/reasoning) stays,
    as does a user's log."""
    run = tmp_path / "run"
    (run / "runs" / "Nov30_killed").mkdir(parents=True)
    (run / "runs" / "Nov30_killed" / "events.out.tfevents.1.host").write_text("")
    (run / "reasoning").mkdir()
    (run / "reasoning" / "step0_valid.jsonl").write_text("old")
    (run / "train.log").write_text("")
    listed = []

    class Stop(Exception):
        pass

    def list_then_stop():
        listed.append(sorted(os.listdir(run)))
        raise Stop

    monkeypatch.setattr(train, "build_trainer", lambda config: StandInTrainer(on_train=list_then_stop))
    argv = ["--output_dir", str(run), "--model", tiny_backbone("qwen2"), "--report_to", "none"]
    for checked in ([], ["--check_only", "True"]):  # refused (nothing deleted) without --overwrite_output_dir
        with pytest.raises(UserError, match=re.escape(
                f"--output_dir {run} holds the logs (runs/, reasoning/) of a run killed before its first checkpoint, "
                "which the new run's would mix with — pass --overwrite_output_dir True to replace them")):
            train.main([*argv, *checked])
    assert sorted(os.listdir(run)) == ["reasoning", "runs", "train.log"] and listed == []
    with pytest.raises(Stop):
        train.main([*argv, "--overwrite_output_dir", "True"])
    assert listed == [["train.log"]]
    (run / "reasoning").mkdir()
    (run / "reasoning" / "adapter_config.json").write_text("{}")  # not a killed run's: kept
    with pytest.raises(Stop):
        train.main([*argv, "--overwrite_output_dir", "True"])
    assert listed[-1] == ["reasoning", "train.log"] and (run / "reasoning" / "adapter_config.json").exists()


def test_final_metrics_are_the_saved_model_s_logged_evaluation():
    """The best checkpoint's step with --load_best_model_at_end, else the last step's; a new
    evaluation only when none was logged for that step."""
    history = [{"eval_valid_ndcg@10": 0.3, "eval_test_ndcg@10": 0.25, "step": 2},
               {"loss": 1.0, "step": 2},
               {"eval_valid_ndcg@10": 0.1, "eval_test_ndcg@10": 0.05, "eval_seconds": 3.0, "step": 4}]

    def final(load_best, best_step, global_step=4):
        trainer = types.SimpleNamespace(
            args=types.SimpleNamespace(load_best_model_at_end=load_best),
            state=types.SimpleNamespace(global_step=global_step, best_global_step=best_step, log_history=history),
            evaluate=lambda: {"eval_test_ndcg@10": "evaluated anew"})
        return train.final_metrics(trainer)

    best = 2
    assert final(True, best) == {"eval_valid_ndcg@10": 0.3, "eval_test_ndcg@10": 0.25}
    assert final(False, best) == {"eval_valid_ndcg@10": 0.1, "eval_test_ndcg@10": 0.05, "eval_seconds": 3.0}
    assert final(True, None) == final(False, best)  # no checkpoint chosen: the last step's
    assert final(False, None, global_step=5) == {"eval_test_ndcg@10": "evaluated anew"}


def shutil_usage(free: int):
    import shutil
    return shutil._ntuple_diskusage(total=2**41, used=2**41 - free, free=free)


def test_every_checkpoint_holds_the_run_record_so_a_killed_run_can_be_served(tmp_path):
    import recommend

    run_train(quick_flags(tmp_path, "--max_steps", "2", "--save_steps", "1", "--eval_strategy", "no",
                          "--load_best_model_at_end", "False", "--eval_on_start", "False"))
    out = tmp_path / "out"
    final = json.loads((out / "r2ec_run.json").read_text())
    assert final["model"] == tiny_backbone("qwen2") and final["category"] == "Video_Games"
    assert final["dataset_dir"] == tiny_dataset_dir(tmp_path) and final["window_size"] == 20
    (out / "r2ec_run.json").unlink()  # as if the run had been killed after its checkpoints
    for step in (1, 2):
        assert recommend.read_run(str(out / f"checkpoint-{step}")) == final
    with pytest.raises(UserError, match=re.escape(f"latest complete checkpoint: --output_dir {out / 'checkpoint-2'}")):
        recommend.read_run(str(out))  # the final adapter is there, but the final save ended before the record
    (out / "checkpoint-2" / "r2ec_run.json").unlink()  # and checkpoint-2's own save was cut short
    with pytest.raises(UserError, match=re.escape(f"latest complete checkpoint: --output_dir {out / 'checkpoint-1'}")):
        recommend.read_run(str(out))
    (out / "checkpoint-1" / "r2ec_run.json").unlink()  # a run of a version that wrote the record at the start
    (out / "r2ec_run.json").write_text(json.dumps(final))
    (out / "adapter_config.json").unlink()
    with pytest.raises(UserError, match=re.escape(f"latest complete checkpoint: --output_dir {out / 'checkpoint-2'}")):
        recommend.read_run(str(out))
    assert recommend.read_run(str(out / "checkpoint-2")) == final


def test_earlier_run_in_a_folder_named_with_glob_characters(tmp_path):
    run = tmp_path / "run[1]*"
    fake_checkpoint(run / "checkpoint-3")  # a run killed before its first trainer_state.json at the top
    assert run_folder.earlier_run(str(run))
    run_folder.clear_earlier_run(str(run))
    assert os.listdir(run) == [] and not run_folder.earlier_run(str(run))


def test_an_earlier_run_that_cannot_be_removed_is_named(tmp_path, monkeypatch):
    """A file of the earlier run that cannot be removed (another user's, a read-only mount):
    one line naming it, not a traceback, nor a silent mix of the two runs."""
    run = tmp_path / "run"
    fake_checkpoint(run / "checkpoint-3")
    (run / "training_curves.png").write_text("old")

    def remove(path, *args, **kwargs):
        if os.path.basename(path) == "trainer_state.json":
            raise PermissionError(13, "Permission denied", path)
        return os_remove(path, *args, **kwargs)

    os_remove = os.remove
    monkeypatch.setattr(os, "unlink", remove)  # what shutil.rmtree calls for each file
    with pytest.raises(UserError, match=re.escape(f"cannot remove {run / 'checkpoint-3'} of the earlier run ([Errno 13] "
                                                  "Permission denied: 'trainer_state.json') — remove it yourself")):
        run_folder.clear_earlier_run(str(run))


def test_a_checkpoint_of_an_older_version_without_run_records_resumes(tmp_path):
    checkpoint = tmp_path / "run" / "checkpoint-2"
    for step in (1, 2):
        fake_checkpoint(tmp_path / "run" / f"checkpoint-{step}")
        (tmp_path / "run" / f"checkpoint-{step}" / "r2ec_run.json").unlink()
    flags = ["--output_dir", str(tmp_path / "run"), "--max_steps", "5", "--resume_from_checkpoint", "last", "--lora_r", "4"]
    assert run_folder.check_output_dir(train.parse_config(flags)) == str(checkpoint)


def test_a_checkpoint_of_the_same_data_order_resumes_and_another_one_with_ignore_data_skip(tmp_path, monkeypatch):
    checkpoint = tmp_path / "run" / "checkpoint-2"
    fake_checkpoint(checkpoint)
    flags = ["--output_dir", str(tmp_path / "run"), "--max_steps", "5", "--resume_from_checkpoint", "last",
             "--dataset_dir", "/data/Video_Games_0_2022-10-2023-10", "--lora_r", "4"]
    record = json.loads((checkpoint / "r2ec_run.json").read_text())
    record["data_order"] = run_folder.data_order(train.parse_config(flags))
    assert record["data_order"] == {"samples_per_step": 4, "num_iterations": 1, "seed": 42}  # B = 4, 1 process
    (checkpoint / "r2ec_run.json").write_text(json.dumps(record))
    assert run_folder.check_output_dir(train.parse_config(flags)) == str(checkpoint)
    for changed in (["--train_batch_size", "2"], ["--gradient_accumulation_steps", "2"], ["--seed", "1"]):
        with pytest.raises(UserError, match="the resume would skip the wrong samples"):
            run_folder.check_output_dir(train.parse_config(flags + changed))
        assert run_folder.check_output_dir(train.parse_config(flags + changed + ["--ignore_data_skip", "True"])) == str(checkpoint)
    # launch_train.sh's --check_only runs as one process and says how many it will start
    monkeypatch.setenv("R2EC_PROCESSES", "2")
    with pytest.raises(UserError, match="samples_per_step 4, not 8"):
        run_folder.check_output_dir(train.parse_config(flags))
    assert run_folder.check_output_dir(train.parse_config(flags + ["--train_batch_size", "2"])) == str(checkpoint)


@pytest.mark.parametrize("damage, message", [
    (lambda c: (c / "trainer_state.json").write_text('{"log_hist'), "trainer_state.json' is not readable JSON"),
    (lambda c: (c / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 128})),
     "was trained with --lora_r 8, not 4 — resume with --lora_r 8"),
    (lambda c: (c / "adapter_config.json").write_text(json.dumps(
        {"r": 4, "lora_alpha": 128, "target_modules": ["v_proj", "q_proj"]})),
     "was trained with --lora_target_modules q_proj,v_proj, not down_proj,gate_proj,"),
    (lambda c: (c / "adapter_config.json").write_text(json.dumps(
        {"r": 4, "lora_alpha": 128, "target_modules": list(LORA_TARGETS), "base_model_name_or_path": "/models/gemma-2-2b-it"})),
     "was trained on /models/gemma-2-2b-it, not Qwen/Qwen2.5-3B-Instruct — resume with that --model (moved: keep its folder name)"),
    (lambda c: (c / "r2ec_run.json").write_text(json.dumps({"reasoning": False, "window_size": 5})),
     "was trained with --reasoning False, not True — resume with --reasoning False"),
    (lambda c: (c / "r2ec_run.json").write_text(json.dumps({"tau": 0.05})), "was trained with --tau 0.05, not 0.02"),
    (lambda c: (c / "r2ec_run.json").write_text(json.dumps({"data_order": {  # 3 processes then, 1 now
        "samples_per_step": 12, "num_iterations": 1, "seed": 42}})),
     "was trained with samples_per_step 12, not 4: the resume would skip the wrong samples of its epoch — resume with "
     "the same --train_batch_size × --gradient_accumulation_steps × processes, --num_iterations and --seed, or pass "
     "--ignore_data_skip True"),
    (lambda c: (c / "r2ec_run.json").write_text(json.dumps({"data_order": {
        "samples_per_step": 4, "num_iterations": 2, "seed": 7}})),
     "was trained with num_iterations 2, not 1, seed 7, not 42: the resume"),
    (lambda c: (c / "r2ec_run.json").write_text("[1"), "r2ec_run.json' is not readable JSON"),
    (lambda c: (c / "r2ec_run.json").write_text("[1]"), "r2ec_run.json' holds a JSON list, not an object"),
    (lambda c: (c / "adapter_config.json").write_text("[]"), "adapter_config.json' holds a JSON list, not an object"),
    (lambda c: (c / "trainer_state.json").write_text('{"global_step": "1"}'), "global_step '1' is not a step number"),
    (lambda c: (c / "trainer_state.json").write_text('{"global_step": 2, "log_history": 5}'),
     "checkpoint-2/trainer_state.json's log_history 5 is not a list of log entries — resume from another checkpoint-*"),
    (lambda c: (c / "trainer_state.json").write_text('{"log_history": [{"loss": 1}, 3]}'), "log_history [{'loss': 1}, 3]"),
    (lambda c: (c / "trainer_state.json").write_text(json.dumps({"log_history": list(range(100))})),
     "log_history [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 1… is not"),  # 60 characters
    (lambda c: (c / "trainer_state.json").write_text('{"best_metric": "x"}'), "best_metric 'x' is not a number or null"),
    (lambda c: (c / "trainer_state.json").write_text('{"best_metric": true}'), "best_metric True is not a number"),
    (lambda c: (c / "trainer_state.json").write_text('{"stateful_callbacks": []}'), "stateful_callbacks [] is not an"),
    (lambda c: (c / "r2ec_run.json").write_text(json.dumps({"dataset_dir": "/data/Musical_Instruments_0_2022-10-2023-10"})),
     "was trained on the dataset /data/Musical_Instruments_0_2022-10-2023-10, not /elsewhere/Video_Games_0_2022-10-2023-10/ "
     "— resume with that --dataset_dir (moved: keep its folder name)"),
    (lambda c: (c / "trainer_state.json").unlink(), "is incomplete (no trainer_state.json: its save was cut short) — "
     "delete it and start the run afresh (no checkpoint came before it): drop --resume_from_checkpoint and pass "
     "--overwrite_output_dir True"),
    (lambda c: ((c / "r2ec_run.json").unlink(), fake_checkpoint(c.parent / "checkpoint-1")),  # killed mid-save
     "is incomplete (no r2ec_run.json, which its run writes last into each checkpoint: its save was cut short) — "
     "delete it and resume from the checkpoint before it"),
    (lambda c: (c / "adapter_model.safetensors").write_bytes(b"\x10\x00"), "adapter weights cannot be read"),
    (lambda c: (c / "optimizer.pt").write_bytes(b"garbage"), "optimizer.pt is truncated or corrupt"),
    (lambda c: damage_inside(c / "optimizer.pt"), "optimizer.pt is truncated or corrupt"),  # a whole zip archive
    (lambda c: (c / "scheduler.pt").write_bytes((c / "scheduler.pt").read_bytes()[:100]), "scheduler.pt is truncated"),
    (lambda c: (c / "rng_state_1.pth").write_bytes(b"x"), "rng_state_1.pth is truncated or corrupt"),
    (lambda c: (c / "scheduler.pt").unlink(), "lacks scheduler.pt, the optimizer and learning-rate state"),
    (lambda c: (c / "global_step2").mkdir(), "was saved under DeepSpeed — resume with --deepspeed ds_config.json"),
    (lambda c: (c / "trainer_state.json").write_text('{"global_step": 5}'),
     "has already trained 5 steps, --max_steps 5 — raise --max_steps to continue"),
])
def test_a_damaged_or_mismatched_checkpoint_is_named_before_resuming(tmp_path, damage, message):
    checkpoint = tmp_path / "run" / "checkpoint-2"
    fake_checkpoint(checkpoint)
    damage(checkpoint)
    with pytest.raises(UserError, match=re.escape(message)) as caught:
        run_folder.check_output_dir(train.parse_config(["--output_dir", str(tmp_path / "run"), "--max_steps", "5",
                                                   "--model", "Qwen/Qwen2.5-3B-Instruct", "--resume_from_checkpoint", "last",
                                                   "--dataset_dir", "/elsewhere/Video_Games_0_2022-10-2023-10/"]))
    assert "\n" not in str(caught.value)


def test_a_folder_a_run_is_training_in_is_refused_to_a_second_run(tmp_path):
    """--overwrite_output_dir deleted the checkpoints of a run still training there; a resume mixed with it."""
    run = tmp_path / "run"
    fake_checkpoint(run / "checkpoint-2")
    flags = ["--output_dir", str(run), "--dataset_dir", "/elsewhere/Video_Games_0_2022-10-2023-10"]
    with run_folder.in_use(str(run), holder=True):  # the run training there (its process 0)
        for more in (["--overwrite_output_dir", "True"], ["--resume_from_checkpoint", "last", "--max_steps", "5"]):
            with pytest.raises(UserError) as caught:
                run_folder.check_output_dir(train.parse_config([*flags, *more]))
            assert str(caught.value) == (f"--output_dir {run} is in use by a train.py run that is still training — "
                                         "wait for it to end or stop it, or pick another --output_dir")
        with pytest.raises(UserError, match="is in use by a train.py run"):
            with run_folder.in_use(str(run), holder=True):  # a second run started in the meantime
                pass
        with run_folder.in_use(str(run), holder=False):  # the run's other processes hold nothing
            pass
    assert run_folder.check_output_dir(train.parse_config([*flags, "--overwrite_output_dir", "True"])) is None
    assert sorted(os.listdir(run)) == ["checkpoint-2"]  # nothing written to mark it


@pytest.mark.parametrize("logs", [True, False])
def test_resuming_a_run_that_saved_no_checkpoint_says_how_to_start_it_afresh(tmp_path, logs):
    """Its logs alone: "drop --resume_from_checkpoint" would be refused next for them."""
    run = tmp_path / "run"
    (run / "runs" / "Dec02").mkdir(parents=True)
    if logs:
        (run / "runs" / "Dec02" / "events.out.tfevents.1.host").write_bytes(b"")
    with pytest.raises(UserError) as caught:
        run_folder.check_output_dir(train.parse_config(["--output_dir", str(run), "--resume_from_checkpoint", "last",
                                                        "--dataset_dir", "/elsewhere/Video_Games_0_2022-10-2023-10"]))
    assert str(caught.value).endswith(
        "— start it afresh: drop --resume_from_checkpoint and pass --overwrite_output_dir True" if logs else
        "— drop --resume_from_checkpoint or pass a checkpoint folder"), caught.value


def test_a_plain_train_py_stopped_by_sigterm_says_so_in_one_line(tmp_path):
    """`kill` of a run started without a launcher (a scheduler's time limit): one line and code 130,
    as Ctrl-C, and the run's folder is free again (a launcher's processes keep SIGTERM's default)."""
    out = tmp_path / "out"
    env = {key: value for key, value in os.environ.items() if key not in LAUNCHER_VARIABLES}
    run = subprocess.Popen([PYTHON, os.path.join(ROOT, "train.py"), *quick_flags(tmp_path, "--max_steps", "10000")],
                           cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           env={**env, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 300
    while run.poll() is None and time.monotonic() < deadline:  # until it holds its folder: training
        try:
            run_folder.check_not_in_use(str(out), str(out))
        except UserError:
            break
        time.sleep(0.2)
    run.send_signal(signal.SIGTERM)
    _, stderr = run.communicate(timeout=120)
    assert (run.returncode, stderr.strip().splitlines()[-1]) == (130, "error: interrupted"), stderr[-2000:]
    assert "Traceback" not in stderr
    run_folder.check_not_in_use(str(out), str(out))


def test_a_resume_onto_another_catalogue_of_the_same_folder_name_is_refused(tmp_path):
    """The sample's and the full category's datasets share a folder name: a resume is checked
    against the catalogue digest its run recorded, here of the tiny dataset's titles in id order."""
    name = "Video_Games_0_2022-10-2023-10"
    trained_on, other = tiny_dataset(), tiny_dataset()
    other["item_info"] = other["item_info"].map(lambda item: {"title": item["title"] + " (2nd edition)"})
    for root, dataset, users in (("full", trained_on, 5000), ("sample", other, 50)):
        dataset.save_to_disk(str(tmp_path / root / name))
        (tmp_path / root / name / "preprocess.json").write_text(json.dumps({"users": users}))
    titles = [item["title"] for item in trained_on["item_info"]]  # in id order, the pad item's first
    checkpoint = tmp_path / "run" / "checkpoint-2"
    fake_checkpoint(checkpoint)
    digest = hashlib.sha256(json.dumps(titles).encode()).hexdigest()[:16]
    record = {**json.loads((checkpoint / "r2ec_run.json").read_text()), "dataset_dir": str(tmp_path / "full" / name),
              "catalogue": digest, "items": len(titles) - 1, "preprocess": {"users": 5000}}  # named first: catalogue
    (checkpoint / "r2ec_run.json").write_text(json.dumps(record))
    config = lambda root: train.parse_config(["--output_dir", str(tmp_path / "run"), "--max_steps", "5",  # noqa: E731
                                              "--resume_from_checkpoint", "last", "--dataset_dir", str(tmp_path / root / name)])
    assert run_folder.check_output_dir(config("full")) == str(checkpoint)
    with pytest.raises(UserError, match=re.escape(
            f"was trained on another catalogue ({len(titles) - 1} items) than the dataset {tmp_path / 'sample' / name} "
            f"holds ({len(titles) - 1} items, or other titles) — resume with the --dataset_dir it was trained on, "
            f"{tmp_path / 'full' / name}")):
        run_folder.check_output_dir(config("sample"))


def test_a_resume_onto_a_dataset_preprocessed_anew_is_refused(tmp_path):
    """preprocess.py run again into the run's dataset folder with another --window_size keeps its
    name and catalogue but not its samples: the run records the folder's preprocess.json, and a
    resume is checked against it (entries both records hold; an older run recorded none)."""
    dataset_dir = tiny_dataset_dir(tmp_path)
    written = {"category": "Video_Games", "K": 0, "window_size": 20, "start": "2021-10-01", "train": 8}
    (tmp_path / "Video_Games_0_2022-10-2023-10" / "preprocess.json").write_text(json.dumps(written))
    flags = ["--output_dir", str(tmp_path / "run"), "--max_steps", "5", "--dataset_dir", dataset_dir]
    record = run_folder.run_record(train.parse_config(flags), "Video_Games", ["", "A game"])
    assert record["preprocess"] == written
    checkpoint = tmp_path / "run" / "checkpoint-2"
    fake_checkpoint(checkpoint)
    (checkpoint / "r2ec_run.json").write_text(json.dumps(
        {**json.loads((checkpoint / "r2ec_run.json").read_text()), "dataset_dir": dataset_dir,
         "preprocess": record["preprocess"]}))
    config = train.parse_config([*flags, "--resume_from_checkpoint", "last"])
    assert run_folder.check_output_dir(config) == str(checkpoint)
    (tmp_path / "Video_Games_0_2022-10-2023-10" / "preprocess.json").write_text(json.dumps(
        {**written, "window_size": 10, "train": 6, "blank_titles": 0}))  # an entry added since: not compared
    with pytest.raises(UserError) as caught:
        run_folder.check_output_dir(config)
    assert str(caught.value) == (
        f"the dataset {dataset_dir} was preprocessed anew since {checkpoint} trained on it (window_size 20, now 10; "
        "train 8, now 6) — rerun preprocess.py into it with the settings of then, or start a fresh run with "
        "--overwrite_output_dir True")
    (checkpoint / "r2ec_run.json").write_text(json.dumps(
        {**json.loads((checkpoint / "r2ec_run.json").read_text()), "preprocess": None}))  # a run of an older version
    assert run_folder.check_output_dir(config) == str(checkpoint)


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(valid=d["valid"].select([])), "the valid split of .* is empty"),
    (lambda d: d.update(item_info=d["item_info"].select(range(1, len(d["item_info"])))),
     "does not hold item ids 0..[0-9]+ in order"),
    (lambda d: d.update(test=d["test"].map(lambda s: {"item_id": 999})), "the test split .* names item ids outside"),
    (lambda d: d.update(train=d["train"].map(lambda s: {"history_item_id": [0]})), "the train split .* names item ids"),
])
def test_empty_splits_and_unknown_item_ids_are_named(tmp_path, change, message):
    dataset = tiny_dataset()
    change(dataset)
    folder = tmp_path / "Video_Games_0_2022-10-2023-10"
    dataset.save_to_disk(str(folder), num_shards={split: 1 for split in dataset})  # as preprocess.py saves
    with pytest.raises(UserError, match=message):
        load_dataset_dir(str(folder))


@pytest.mark.parametrize("split, columns", [("valid", ["history_item_title"]), ("test", ["item_title"]),
                                            ("item_info", ["title"]), ("item_info", ["item_id", "title"])])
def test_every_split_is_checked_for_the_columns_read(tmp_path, split, columns):
    dataset = tiny_dataset()
    dataset[split] = dataset[split].remove_columns(columns)
    folder = tmp_path / "Video_Games_0_2022-10-2023-10"
    dataset.save_to_disk(str(folder))
    with pytest.raises(UserError, match=f"the {split} split .* lacks the column\\(s\\) {', '.join(columns)} — rerun"):
        load_dataset_dir(str(folder))


@pytest.mark.parametrize("split, column, values, message", [
    ("test", "history_rating", lambda v: [[str(r) for r in rs] for rs in v], "history_rating holds list<item: string>, "
                                                                           "not lists of numbers"),
    ("train", "timestamp", lambda v: [str(t) for t in v], "timestamp holds string, not integers"),
    ("item_info", "title", lambda v: [len(t) for t in v], "title holds int64, not text"),
    # the item prompt's metadata: a TypeError traceback in recommend.py, or text split into letters
    ("item_info", "description", lambda v: [[len(p) for p in d] for d in v], "description holds list<item: int64>, "
                                                                              "not lists of text"),
    ("item_info", "description", lambda v: [" ".join(d) for d in v], "description holds string, not lists of text"),
    ("item_info", "average_rating", lambda v: [str(r) for r in v], "average_rating holds string, not numbers"),
])
def test_a_column_of_the_wrong_kind_is_named(tmp_path, split, column, values, message):
    """A hand-made dataset with ratings as text ended recommend.py with a ValueError traceback."""
    dataset = tiny_dataset()
    changed = values(dataset[split][column])
    dataset[split] = dataset[split].remove_columns(column).add_column(column, changed)
    folder = tmp_path / "Video_Games_0_2022-10-2023-10"
    dataset.save_to_disk(str(folder))
    with pytest.raises(UserError, match=re.escape(f"the {split} split of {str(folder)!r}: {message} — rerun "
                                                  "preprocess.py for it")):
        load_dataset_dir(str(folder))


def test_item_prompt_columns_left_all_empty_are_accepted(tmp_path):
    """A hand-made item_info whose descriptions are all [] (Arrow: list<null>) and ratings all
    missing (null) renders its prompts: not refused as a column of the wrong kind."""
    dataset = tiny_dataset()
    items = dataset["item_info"].remove_columns(["description", "average_rating"])
    dataset["item_info"] = items.add_column("description", [[] for _ in items]).add_column(
        "average_rating", [None] * len(items))
    folder = tmp_path / "Video_Games_0_2022-10-2023-10"
    dataset.save_to_disk(str(folder))
    loaded, _ = load_dataset_dir(str(folder))
    assert str(loaded["item_info"].data.column("description").type) == "list<item: null>"


def test_category_that_contradicts_the_dataset_folder_is_named(tmp_path):
    with pytest.raises(UserError, match="holds Video_Games, not CDs_and_Vinyl"):
        train.main(quick_flags(tmp_path, "--dataset_category", "CDs_and_Vinyl"))


@pytest.mark.parametrize("large", [False, True])  # large_list, which the column check accepts too
def test_empty_values_in_a_training_column_are_named(tmp_path, large):
    """A null rating inside a history (a hand-edited dataset) failed in the prompt with a TypeError."""
    import pyarrow as pa

    dataset = tiny_dataset()
    ratings = list(dataset["test"]["history_rating"])
    ratings[1] = [None, *ratings[1][1:]]
    column = pa.array(ratings, pa.large_list(pa.float64()) if large else pa.list_(pa.float64()))
    dataset["test"] = dataset["test"].remove_columns("history_rating").add_column("history_rating", column)
    folder = tmp_path / "Video_Games_0_2022-10-2023-10"
    dataset.save_to_disk(str(folder))
    with pytest.raises(UserError, match="the test split .* has empty values in history_rating — rerun preprocess.py"):
        load_dataset_dir(str(folder))


def test_the_category_preprocess_recorded_wins_over_the_folder_name(tmp_path, monkeypatch):
    """A copied or renamed folder must not get another category's prompts; a custom name needs no flag."""
    dataset = tiny_dataset()
    for name in ("CDs_and_Vinyl_0_2022-10-2023-10", "my_games"):
        dataset.save_to_disk(str(tmp_path / name))
        (tmp_path / name / "preprocess.json").write_text(json.dumps({"category": "Video_Games", "K": 0}))
    with pytest.raises(UserError, match="is named for CDs_and_Vinyl but holds Video_Games \\(its preprocess.json\\)"):
        load_dataset_dir(str(tmp_path / "CDs_and_Vinyl_0_2022-10-2023-10"))
    assert load_dataset_dir(str(tmp_path / "my_games"))[1] == "Video_Games"
    assert load_dataset_dir(str(tmp_path / "my_games"), "")[1] == "Video_Games"  # an empty flag: not given
    with pytest.raises(UserError, match="holds Video_Games, not Books"):
        load_dataset_dir(str(tmp_path / "my_games"), "Books")
    (tmp_path / "my_games" / "preprocess.json").unlink()
    with pytest.raises(UserError, match="cannot read the category from the folder name"):
        load_dataset_dir(str(tmp_path / "my_games"), "")  # was an AttributeError in the prompts
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_dataset_dir("~/my_games", "Video_Games")[1] == "Video_Games"


def test_a_split_folder_is_refused_with_its_parent_named(tmp_path):
    folder = tiny_dataset_dir(tmp_path)
    with pytest.raises(UserError, match=re.escape(f"is one split of a dataset — pass the dataset folder above it, {folder!r}")):
        load_dataset_dir(os.path.join(folder, "train"))
    with pytest.raises(UserError, match=re.escape("is not a dataset saved by preprocess.py") + ".*" +
                       re.escape(f"— it holds {folder}: pass that as --dataset_dir")):
        load_dataset_dir(str(tmp_path))  # the folder above the dataset, as data/sample holds the sample's
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=re.escape("— point --dataset_dir at the folder preprocess.py printed")):
        load_dataset_dir(str(tmp_path / "empty"))
    (arrow,) = glob.glob(os.path.join(folder, "train", "*.arrow"))
    with open(arrow, "r+b") as f:  # bytes damaged in place, inside one title: the folder still loads
        data = f.read()
        f.seek(data.index(b"Game 1"))
        f.write(b"\xff" * 6)
    with pytest.raises(UserError, match=re.escape(f"dataset folder {folder!r} is damaged (train: ") + ".*UTF8.*" +
                       re.escape("— rerun preprocess.py to write it again")):
        load_dataset_dir(folder)
    (arrow,) = glob.glob(os.path.join(folder, "valid", "*.arrow"))
    os.truncate(arrow, os.path.getsize(arrow) // 2)  # a copy cut short
    with pytest.raises(UserError, match=re.escape(f"dataset folder {folder!r} is damaged (") + ".*" +
                       re.escape("— rerun preprocess.py to write it again")):
        load_dataset_dir(folder)


@pytest.mark.parametrize("flags, message", [
    (["--output_dir", ""], "--output_dir is empty (an unset variable?)"),
    (["--output_dir", "  "], "--output_dir is blank ('  ') (an unset variable?) — pass a folder, or leave the flag out"),
    (["--deepspeed", "BROKEN"], "is not readable JSON"),
])
def test_empty_output_dir_and_broken_deepspeed_file_are_named(tmp_path, flags, message):
    (tmp_path / "broken.json").write_text('{"zero_optimization": ')
    flags = [str(tmp_path / "broken.json") if flag == "BROKEN" else flag for flag in flags]
    with pytest.raises(UserError, match=re.escape(message)) as caught:
        train.parse_config(flags)
    assert "\n" not in str(caught.value)


def test_parsing_deepspeed_flags_leaves_the_environment_alone(tmp_path):
    """The one-process rendezvous is train.py's main's business: set while parsing, it leaked into
    every later process (tests included) a RANK and a MASTER_PORT nobody listened on."""
    before = dict(os.environ)
    train.parse_config(["--deepspeed", os.path.join(ROOT, "ds_config.json"), "--output_dir", str(tmp_path)])
    assert dict(os.environ) == before


def test_a_symlinked_output_dir_resumes_in_place(tmp_path):
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    config = train.parse_config(["--output_dir", str(tmp_path / "link")])
    assert run_folder.resumes_in_place(config, str(tmp_path / "real" / "checkpoint-4"))
    assert not run_folder.resumes_in_place(config, str(tmp_path / "checkpoint-4"))


def test_num_iterations_reuses_each_rollout_batch_with_real_old_probabilities(tmp_path, monkeypatch):
    trainer = tiny_trainer(tmp_path, max_steps=4, num_iterations=2, learning_rate=1e-2)
    batches, updates = [], []
    generate_and_score, update = trainer.generate_and_score, trainer.update

    def counting_generate_and_score(model, samples):
        batches.append([s["user_id"] for s in samples])
        return generate_and_score(model, samples)

    def recording_update(model, batch):
        updates.append(batch)
        return update(model, batch)

    monkeypatch.setattr(trainer, "generate_and_score", counting_generate_and_score)
    monkeypatch.setattr(trainer, "update", recording_update)
    trainer.train()
    assert len(batches) == 2 and len(updates) == 4  # 2 rollout batches, 2 optimizer steps each
    assert updates[0] is not updates[1] and updates[1].rollouts is updates[0].rollouts
    assert updates[0].item_old_logprobs is None  # first update: on-policy
    assert updates[1].item_old_logprobs is not None and updates[1].item_old_logprobs.shape == (4,)
    old_logprobs, reasoning = updates[1].token_old_logprobs, updates[1].rollouts.completion_mask.bool()
    assert old_logprobs.shape == reasoning.shape and (old_logprobs[reasoning] < 0).all() and (old_logprobs[~reasoning] == 0).all()
    assert batches[0] != batches[1]
    clip = [entry["clip_ratio/token"] for entry in trainer.state.log_history if "clip_ratio/token" in entry]
    assert len(clip) == 4 and all(0 <= c <= 1 for c in clip)
    assert clip[0] == clip[2] == 0  # a rollout batch's first update: ρ = 1 exactly


def test_num_iterations_second_update_reads_the_first_update_s_probabilities(tmp_path, monkeypatch):
    """Learning rate 0, no dropout: the policy does not move, so update 2 of a rollout batch sees
    ρ = 1 and item ratio 1 (p_old and π_old aligned row by row with update 1's), equal losses."""
    trainer = tiny_trainer(tmp_path, max_steps=2, num_iterations=2, learning_rate=0.0, lora_dropout=0.0,
                           micro_batch_size=1)
    updates, update = [], trainer.update
    monkeypatch.setattr(trainer, "update", lambda model, batch: updates.append(batch) or update(model, batch))
    trainer.train()
    first, second = updates
    assert second.rollouts is first.rollouts and first.item_old_logprobs is None
    reasoning = first.rollouts.completion_mask.bool()
    torch.testing.assert_close(second.token_old_logprobs[reasoning], first.rollouts.logprobs[reasoning],
                               atol=1e-4, rtol=0)  # the sampler's log-probs, row by row
    assert bool((second.item_old_logprobs < 0).all() and second.item_old_logprobs.isfinite().all())
    logged = [entry for entry in trainer.state.log_history if "loss/item" in entry]
    assert [entry["clip_ratio/token"] for entry in logged] == [0, 0] and logged[0]["loss/item"] != 0
    assert logged[1]["loss/item"] == pytest.approx(logged[0]["loss/item"], rel=1e-5)
    assert logged[1]["loss/token"] == pytest.approx(logged[0]["loss/token"], rel=1e-5, abs=1e-7)


def test_num_iterations_realigns_rollouts_with_their_users_after_a_skipped_step(tmp_path, monkeypatch):
    """Sampler order [a a][b b]: a skip at the first a must not make b train on a's rollouts."""
    from trainer import SkipStep

    trainer = tiny_trainer(tmp_path, max_steps=4, num_iterations=2)
    generate_and_score, update, training_step = trainer.generate_and_score, trainer.update, trainer.training_step
    rollout_steps, step_targets, update_targets = [], {}, {}

    def skipping_generate_and_score(model, samples):
        rollout_steps.append(trainer.state.global_step)
        if len(rollout_steps) == 1:
            raise SkipStep("simulated")
        return generate_and_score(model, samples)

    def recording_update(model, batch):
        update_targets[trainer.state.global_step] = batch.targets.tolist()
        return update(model, batch)

    def recording_training_step(model, inputs, *args, **kwargs):
        step_targets[trainer.state.global_step] = [s["item_id"] for s in inputs]
        return training_step(model, inputs, *args, **kwargs)

    monkeypatch.setattr(trainer, "generate_and_score", skipping_generate_and_score)
    monkeypatch.setattr(trainer, "update", recording_update)
    monkeypatch.setattr(trainer, "training_step", recording_training_step)
    with pytest.warns(RuntimeWarning, match="step 0: skipped — simulated"):
        trainer.train()
    assert rollout_steps == [0, 1, 2]  # skipped, redone for the second copy of a, then b
    assert sorted(update_targets) == [1, 2, 3]
    assert all(update_targets[step] == step_targets[step] for step in update_targets)
    assert step_targets[0] == step_targets[1] != step_targets[2] == step_targets[3]


def test_wrong_dataset_folder_is_named(tmp_path):
    (tmp_path / "not_a_dataset").mkdir()
    with pytest.raises(UserError, match="preprocess.py"):
        train.main(quick_flags(tmp_path, "--dataset_dir", str(tmp_path / "not_a_dataset")))


def test_warmup_is_linear_then_constant_and_tensorboard_logs_are_written(tmp_path):
    trainer = tiny_trainer(tmp_path, max_steps=4, warmup_steps=2, learning_rate=1e-3, report_to="tensorboard")
    trainer.train()
    rates = [entry["learning_rate"] for entry in trainer.state.log_history if "reward/mean" in entry]
    # The rate logged at step k is the one its optimizer step used: 0, 1/2, then the full rate.
    assert rates == pytest.approx([0.0, 5e-4, 1e-3, 1e-3])
    runs = tmp_path / "run" / "runs"  # the Trainer's default TensorBoard folder
    folders = [folder for folder, _, names in os.walk(runs) if any("tfevents" in name for name in names)]
    assert folders, "no TensorBoard event file"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    accumulator = EventAccumulator(folders[0])
    accumulator.Reload()
    assert {"train/reward/mean", "train/loss/item", "train/learning_rate"} <= set(accumulator.Tags()["scalars"])


def test_a_prompt_and_reasoning_may_fill_the_context_exactly():
    config = types.SimpleNamespace(get_text_config=lambda: types.SimpleNamespace(max_position_embeddings=4096))
    check_context_length(types.SimpleNamespace(max_prompt_tokens=2048, max_new_tokens=2048), config)
    with pytest.raises(UserError, match="2048 \\+ --max_new_tokens 2049 exceed the backbone's context of 4096 tokens"):
        check_context_length(types.SimpleNamespace(max_prompt_tokens=2048, max_new_tokens=2049), config)
    no_limit = types.SimpleNamespace(get_text_config=lambda: types.SimpleNamespace())  # a config without the field
    check_context_length(types.SimpleNamespace(max_prompt_tokens=2048, max_new_tokens=10 ** 9), no_limit)


@pytest.mark.parametrize("file, text", [("dataset_dict.json", "{}"), ("dataset_dict.json", "[1, 2]"),
                                        ("train/state.json", "[]"), ("train/dataset_info.json", "[]")])
def test_a_damaged_dataset_record_is_named_in_one_line(tmp_path, file, text):
    folder = tiny_dataset_dir(tmp_path)
    with open(os.path.join(folder, file), "w") as f:
        f.write(text)  # valid JSON of the wrong shape: load_from_disk raised KeyError or TypeError
    with pytest.raises(UserError, match=re.escape(f"dataset folder {folder!r} is damaged (") + ".*" +
                       re.escape("— rerun preprocess.py to write it again")):
        load_dataset_dir(folder)
