"""One RecPO update on a fixed batch; run by tests/test_trainer.py alone or under torchrun.

    python tests/dist_update_worker.py OUT.pt                                   # 4 users, 1 process
    python -m torch.distributed.run --nproc_per_node 2 tests/dist_update_worker.py OUT.pt  # 2 users each

Rank 0 writes the step's loss (averaged over processes, as the Trainer logs it), every LoRA
gradient and its item table after the update, and how it averages metrics that only rank 1
recorded, the reasonings each process sampled for one same prompt, what a resume does when one
process's item table is damaged, and what the check of a run folder shared by all processes
says, for the test to compare. tests/test_trainer.py also builds its
single-process gradient check from `tiny_lora_model` and `fixed_batch`.
"""
import math
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from accelerate.utils import gather, gather_object  # noqa: E402

from errors import UserError  # noqa: E402
from model import add_lora, enable_checkpointing, load_backbone, policy_forward  # noqa: E402
from rollouts import Rollouts  # noqa: E402
from tests.backbones import tiny_backbone  # noqa: E402
from tests.tiny_data import tiny_config, tiny_dataset  # noqa: E402
from trainer import ITEM_TABLE_FILE, RecPOBatch, RecPOTrainer, relabel_mask  # noqa: E402

USERS, GROUP = 4, 2  # the global batch


def fixed_completions(trainer):
    """G random completions per user of the global batch, each ending in <answer>, and noise."""
    generator = torch.Generator().manual_seed(1)
    stop, pad = list(trainer.stop.forced), trainer.processing_class.pad_token_id
    rows = [torch.randint(300, 2000, (int(torch.randint(2, 6, (1,), generator=generator)),),
                          generator=generator).tolist() + stop for _ in range(USERS * GROUP)]
    width = max(map(len, rows))
    completion_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])  # (N, C)
    completion_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])  # (N, C)
    return completion_ids, completion_mask, torch.randn(completion_ids.shape, generator=generator)


def local_rollouts(trainer, samples, model, completion_ids, completion_mask):
    """This process's rollouts, with the model's current log-probs."""
    prompt_ids, prompt_mask = trainer.tokenize_prompts(samples)
    prompt_ids, prompt_mask = prompt_ids.repeat_interleave(GROUP, 0), prompt_mask.repeat_interleave(GROUP, 0)
    with torch.no_grad():
        logprobs, user_states = policy_forward(model, torch.cat([prompt_ids, completion_ids], 1),
                                               torch.cat([prompt_mask, completion_mask], 1), completion_ids.shape[1],
                                               trainer.sampling.policy_temperature)
    return Rollouts(prompt_ids, prompt_mask, completion_ids, completion_mask, logprobs * completion_mask,
                    user_states.float())


def tiny_lora_model(gradient_checkpointing: bool = False):
    """Tiny Qwen2 with LoRA (no dropout) whose B matrices are non-zero, identical on every process."""
    model, tokenizer = load_backbone(tiny_backbone("qwen2"), dtype=torch.float32)
    torch.manual_seed(0)
    model = add_lora(model, r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))))
    if gradient_checkpointing:
        enable_checkpointing(model)
    return model, tokenizer


def fixed_batch(trainer, model, rank: int, world: int, noise_scale: float = 0.3) -> RecPOBatch:
    """This process's share of a fixed global batch of USERS × GROUP trajectories.

    With `noise_scale` > 0 it is a later update of the batch (`num_iterations` > 1): the token
    loss's π_old is the current log-probs plus `noise_scale` × noise, and the item loss's log p_old
    is that of a uniform in-batch softmax over the USERS targets plus noise, so ratios spread around
    1 and some are clipped. With 0 it is the first update (π_old and p_old set by the update, ρ = q = 1).
    """
    all_samples = [trainer.train_dataset[i] for i in range(USERS)]
    per_process = USERS // world
    samples = all_samples[rank * per_process:(rank + 1) * per_process]
    mine = slice(rank * per_process * GROUP, (rank + 1) * per_process * GROUP)
    completion_ids, completion_mask, noise = (t[mine] for t in fixed_completions(trainer))
    rollouts = local_rollouts(trainer, samples, model, completion_ids, completion_mask)
    old_logprobs = (rollouts.logprobs + noise_scale * noise) * completion_mask if noise_scale else None
    item_noise = torch.randn(USERS * GROUP, generator=torch.Generator().manual_seed(3))
    item_old_logprobs = (-math.log(USERS) + noise_scale * 3 * item_noise)[mine] if noise_scale else None
    advantages = torch.randn(USERS * GROUP, generator=torch.Generator().manual_seed(2))
    relabel = relabel_mask(advantages.view(-1, GROUP), 1).flatten()
    targets = torch.tensor([s["item_id"] for s in samples])
    return RecPOBatch(rollouts, targets, advantages[mine], relabel[mine], item_old_logprobs=item_old_logprobs,
                      token_old_logprobs=old_logprobs)


def exit_without_teardown(accelerator):
    """Leave once every process is done, skipping the interpreter's teardown: gloo on the CPU
    sometimes aborts there ("terminate called without an active exception"), after every result
    was saved (about 1 run in 10 of dist_skip_worker.py, 2 in 60 of ds_train_worker.py, once in
    dist_eval_worker.py's CI runs)."""
    accelerator.wait_for_everyone()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(out_path: str):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    config = tiny_config(tempfile.mkdtemp(), group_size=GROUP, lora_dropout=0.0, gradient_checkpointing=False,
                         max_new_tokens=8)
    model, tokenizer = tiny_lora_model()
    trainer = RecPOTrainer(model, config, tokenizer, tiny_dataset(), "Video_Games")
    rank = trainer.accelerator.process_index
    same_prompt = trainer.rollout(model, [trainer.train_dataset[0]], trainer.sampling, num_samples=GROUP)
    sampled = gather_object([same_prompt.completion_ids.tolist()])  # one list of G reasonings per process
    trainer.refresh_item_table(model)
    batch = fixed_batch(trainer, model, rank, world)

    trainer.item_table.embeddings.zero_()  # so the rows the update writes stand out
    wrapped = trainer.accelerator.prepare_model(model)
    loss = trainer.update(wrapped, batch)
    loss = gather(loss.detach()[None]).mean()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    targets = gather(batch.targets)
    logged = trainer._average_over_processes({"shared": float(rank), **({"only_rank_1": 5.0} if rank == 1 else {})})
    try:
        trainer.check_output_dir_shared(wait_s=2)  # each process its own mkdtemp() folder: nodes' own disks
        unshared = "passed"
    except UserError as error:
        unshared = str(error)
    trainer._resume_from = trainer.args.output_dir  # each process its own: rank 1's table damaged
    trainer.save_item_table(trainer.args.output_dir)
    if rank == 1:
        with open(os.path.join(trainer.args.output_dir, ITEM_TABLE_FILE), "wb") as f:
            f.write(b"garbage")
    try:
        trainer.restore_item_table(model)
        unreadable = "passed"
    except UserError as error:
        unreadable = str(error)
    trainer.args.output_dir = os.path.join(os.path.dirname(os.path.abspath(out_path)), "run")  # one for all
    os.makedirs(trainer.args.output_dir, exist_ok=True)
    trainer.check_output_dir_shared()
    left_in_shared = os.listdir(trainer.args.output_dir)
    unshared, unreadable = gather_object([unshared]), gather_object([unreadable])
    if rank == 0:
        torch.save({"loss": loss, "grads": grads, "table": trainer.item_table.embeddings,
                    "targets": targets, "logged": logged, "sampled": sampled,
                    "unshared": unshared, "unreadable": unreadable, "left_in_shared": left_in_shared}, out_path)
    exit_without_teardown(trainer.accelerator)


if __name__ == "__main__":
    main(sys.argv[1])
