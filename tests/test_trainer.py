"""RecPO trainer on tiny backbones: a real step, several processes, DeepSpeed, resume, failures."""
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from model import add_lora, load_backbone
from tests.backbones import tiny_backbone
from tests.tiny_data import tiny_dataset
from trainer import RecPOConfig, RecPOTrainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable


def tiny_config(tmp_path, **overrides) -> RecPOConfig:
    values = dict(
        output_dir=str(tmp_path / "run"), use_cpu=True, bf16=False, report_to="none",
        per_device_train_batch_size=2, group_size=2, micro_batch_size=2, max_new_tokens=12,
        gen_temperature=1.0, gen_top_k=0, gradient_checkpointing=True, eval_strategy="no", save_strategy="no",
        load_best_model_at_end=False, eval_on_start=False, max_steps=1, learning_rate=1e-2, warmup_steps=0,
        per_device_eval_batch_size=4, dataloader_num_workers=0,
    )
    values.update(overrides)
    return RecPOConfig(**values)


def lora_state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def tiny_trainer(tmp_path, family="qwen2", **overrides):
    model, tokenizer = load_backbone(tiny_backbone(family), dtype=torch.float32, gradient_checkpointing=True)
    model = add_lora(model, r=4, alpha=8)
    return RecPOTrainer(model, tiny_config(tmp_path, **overrides), tokenizer, tiny_dataset(), "Video_Games")


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_one_step_changes_lora_and_logs_finite_metrics(tmp_path, family):
    trainer = tiny_trainer(tmp_path, family)
    before = lora_state(trainer.model)
    trainer.train()
    after = lora_state(trainer.model)
    assert any(not torch.equal(before[n], after[n]) for n in before), "LoRA weights did not move"
    logged = next(entry for entry in trainer.state.log_history if "reward/mean" in entry)
    for key in ("loss", "reward/mean", "reward/ndcg", "reward/softmax", "advantage/abs_mean", "loss/token",
                "loss/item", "completions/mean_length", "learning_rate"):
        assert key in logged and torch.isfinite(torch.tensor(logged[key])), key
    assert 1 <= logged["completions/mean_length"] <= 12


def test_evaluate_reports_every_metric_and_saves_reasoning(tmp_path):
    trainer = tiny_trainer(tmp_path)
    metrics = trainer.evaluate()
    for split in ("valid", "test"):
        for name in ("ndcg@5", "ndcg@10", "ndcg@20", "hit@5", "hit@10", "hit@20", "reasoning_length"):
            value = metrics[f"eval_{split}_{name}"]
            assert 0 <= value <= (12 if name == "reasoning_length" else 1)
        records = [json.loads(line) for line in open(tmp_path / "run" / "reasoning" / f"step0_{split}.jsonl")]
        assert len(records) == 4 and all(r["reasoning"] and r["rank"] >= 1 for r in records)
    hits = metrics["eval_valid_hit@20"]
    ranks = [json.loads(line)["rank"] for line in open(tmp_path / "run" / "reasoning" / "step0_valid.jsonl")]
    assert hits == pytest.approx(sum(r <= 20 for r in ranks) / len(ranks))


def test_out_of_memory_skips_the_step_without_touching_weights(tmp_path, monkeypatch):
    trainer = tiny_trainer(tmp_path)
    before = lora_state(trainer.model)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(trainer, "make_batch", out_of_memory)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert any("skipped" in str(w.message) and "out of memory" in str(w.message) for w in caught)
    after = lora_state(trainer.model)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_non_finite_reward_skips_the_step(tmp_path, monkeypatch):
    trainer = tiny_trainer(tmp_path)
    before = lora_state(trainer.model)
    real_rewards = trainer.rewards

    def nan_rewards(*args):
        reward, ndcg, prob = real_rewards(*args)
        return reward * float("nan"), ndcg, prob

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
    subprocess.run([PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29611",
                    worker, str(double)], check=True, env=env, cwd=ROOT)
    one, two = torch.load(single), torch.load(double)
    assert one["loss"].item() != 0
    torch.testing.assert_close(two["loss"], one["loss"], rtol=1e-4, atol=1e-6)
    assert one["grads"].keys() == two["grads"].keys()
    assert any(g.abs().sum() > 0 for g in one["grads"].values())
    for name in one["grads"]:
        torch.testing.assert_close(two["grads"][name], one["grads"][name], rtol=1e-3, atol=1e-6, msg=name)
