"""RecPO: the R²ec training algorithm as a Hugging Face `Trainer` (SPEC §4–§5).

One training step, per process, on B users (`per_device_train_batch_size`):

    rollout          G reasonings per user from the current policy, with each
                     trajectory's h_u from its last decode step               (SPEC §4.1)
    rewards          (1-β)·NDCG@k + β·softmax(s)[target] vs the item table   (SPEC §4.2)
    advantages       per group, gaussian or rloo                            (SPEC §4.3)
    relabel          top-k trajectories per group feed the item loss       (SPEC §4.4)
    update           micro-batches: token loss + item loss, backward       (SPEC §4.5–4.7)
                     (each user's prompt runs once for its reasonings: `shared_prompt_forward`)

`evaluate` refreshes the item table, writes greedy reasoning for every valid/test sample and
ranks all items (SPEC §5). Everything a user tunes is a field of `RecPOConfig`, which
`train.py` parses from the command line.
"""
import contextlib
import glob
import json
import math
import os
import time
import uuid
import warnings
from collections import defaultdict
from dataclasses import dataclass, field, fields
from typing import Callable, NamedTuple

import torch
from accelerate.utils import gather, gather_object, set_seed
from accelerate.utils.deepspeed import HfDeepSpeedConfig
from torch.utils.data import Sampler
from tqdm.auto import tqdm
from transformers import EarlyStoppingCallback, Trainer, TrainingArguments
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy, get_last_checkpoint

from errors import (UserError, check_int64, check_not_blank, missing_path, one_line, read_json, shown_briefly, umask,
                    write_jsonl)
from metrics import METRIC_NAMES, ndcg_at_k, split_metrics, target_rank, top_items
from model import (ITEM_BATCH_SIZE, LORA_ALPHA, LORA_DROPOUT, LORA_R, LORA_TARGETS, SIMILARITY_TYPES, TAU, ItemTable,
                   check_layer_types, encode, end_of_turn_ids, mask_seen, shared_prompt_forward, similarity)
from paths import DEFAULT_MODEL
from prompts import (MAX_ITEM_TOKENS, MAX_PROMPT_TOKENS, WINDOW_SIZE, answer_stop, item_prompt_tokens, left_pad,
                     user_prompt, user_prompt_tokens)
from rollouts import Rollouts, SamplingConfig, generate_rollouts, replays_graphs

# RecPOConfig keeps the checkpointing flags' old names, the only ones transformers 5.17 knows, and
# PEFT and Trainer still read the model's old `is_gradient_checkpointing`.
CHECKPOINTING_RENAME_WARNING = "`(is_)?gradient_checkpointing(_kwargs)?` is deprecated"
warnings.filterwarnings("ignore", message=CHECKPOINTING_RENAME_WARNING, category=FutureWarning)

MIN_TAU = 1e-6  # far below any useful τ; a tiny one turned scores (similarities / τ) into inf
ADVANTAGE_TYPES = ("gaussian", "rloo")
EVAL_SPLITS = ("valid", "test")
SELECTION_METRICS = [f"eval_valid_{name}" for name in METRIC_NAMES]  # test is held out; reasoning length is no quality
ITEM_TABLE_FILE = "item_table.pt"  # in a checkpoint saved between evaluations: the table a resume starts from
SHARED_FOLDER_MARKER = ".r2ec_shared_check"  # written by process 0 for a moment, read by all
SHARED_FOLDER_WAIT_S = 60  # an NFS client may see a new file only once its attribute cache expires (≤ 60 s)
EVAL_TOP_ITEMS = 10  # top_k of each saved evaluation record: recommended items (id, title, score)


# ----------------------------------------------------------------------------------------------
# Arguments


def check_zero_stage(deepspeed: str):
    """--deepspeed names a readable config (a file, or inline JSON or base64) of ZeRO stage 0-2:
    stage 3 shards the weights, which the rollout engine and the skipped-step reset do not cover."""
    looks_inline = len(deepspeed) > 60 or deepspeed.lstrip().startswith(("{", "["))
    shown = shown_briefly(deepspeed) if looks_inline else missing_path(deepspeed)
    try:
        if os.path.isfile(deepspeed):
            config = HfDeepSpeedConfig(read_json(deepspeed, "fix this --deepspeed file, or pass the shipped "
                                                            "ds_config.json")).config
        else:
            config = inline_deepspeed_config(deepspeed)
    except (AttributeError, TypeError) as e:  # accelerate's reading: JSON, but a section of it is no object
        raise UserError(f"--deepspeed {shown}: accelerate cannot read this config ({one_line(e)}) — it and each of "
                        "its sections (zero_optimization, …) must be JSON objects, as in the shipped "
                        "ds_config.json") from e
    if config is None:
        raise UserError(f"--deepspeed {shown}: no such file, nor a config given inline as JSON or base64 — pass "
                        "a DeepSpeed config file, e.g. the shipped ds_config.json (launch_train.sh: DS_CONFIG)")
    stage = (config.get("zero_optimization") or {}).get("stage", 0)
    if stage not in (0, 1, 2) or isinstance(stage, bool):
        raise UserError(f"--deepspeed {shown}: zero_optimization stage {stage!r} — RecPO runs ZeRO stages 0-2 (the "
                        "shipped ds_config.json: 2); stage 3's sharded weights are not covered")


def inline_deepspeed_config(text: str) -> dict | None:
    """The DeepSpeed config that --deepspeed gives inline, as JSON or base64 of JSON, read by
    accelerate's own parser, or None (not JSON nor base64, or a path: accelerate reads the file)."""
    if os.path.exists(text):
        return None
    try:
        return HfDeepSpeedConfig(text).config
    except ValueError:
        return None


@dataclass
class RecPOConfig(TrainingArguments):
    """Every RecPO knob, on top of `TrainingArguments`; defaults are SPEC §4's.

    Where the paper and the released launcher differ (sampling temperature and top-k, relabel
    top-k), the default is the paper's and launch_train.sh passes the launcher's. The default
    backbone is the embedded SmolLM2 (paths.DEFAULT_MODEL), which runs offline on a CPU.
    """

    # Parameters that control the data, the prompts and the backbone
    dataset_dir: str = field(default="", metadata={"help": "Folder written by preprocess.py."})
    dataset_category: str | None = field(
        default=None, metadata={"help": "Amazon category; default: the one preprocess.py recorded in the dataset folder "
                                 "(preprocess.json), else the one in the folder's name."}
    )
    model: str = field(
        default=DEFAULT_MODEL,
        metadata={"help": "gemma | qwen | a key of paths.model_names | a local folder | a hub id."},
    )
    window_size: int = field(default=WINDOW_SIZE, metadata={"help": "History lines shown in the user prompt."})
    max_prompt_tokens: int = field(default=MAX_PROMPT_TOKENS, metadata={"help": "User prompt length limit."})
    max_item_tokens: int = field(default=MAX_ITEM_TOKENS, metadata={"help": "Item prompt length limit."})
    item_batch_size: int = field(default=ITEM_BATCH_SIZE,
                                 metadata={"help": "Items per forward when encoding the table."})

    # Parameters that control the run's folder
    check_only: bool = field(
        default=False,
        metadata={"help": "Check the flags, output folder, dataset folder and model path, then exit "
                          "(launch_train.sh runs this once before starting its processes)."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Train into an --output_dir that holds an earlier run (everything it wrote is deleted "
                          "once the new run has loaded)."},
    )

    # Parameters that control LoRA
    lora_r: int = field(default=LORA_R, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=LORA_ALPHA, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=LORA_DROPOUT, metadata={"help": "LoRA dropout."})
    lora_target_modules: str = field(
        default=",".join(LORA_TARGETS), metadata={"help": "Comma-separated module names that get LoRA adapters."}
    )

    # Parameters that control the rollouts
    group_size: int = field(default=4, metadata={"help": "Reasonings sampled per user (G)."})
    gen_temperature: float = field(default=1.5, metadata={"help": "Sampling temperature (paper 1.5, launcher 2.0)."})
    gen_top_k: int = field(default=200, metadata={"help": "Top-k sampling, 0 = off (paper 200, launcher 50)."})
    gen_top_p: float = field(default=1.0, metadata={"help": "Top-p (nucleus) sampling."})
    max_new_tokens: int = field(default=640, metadata={"help": "Longest reasoning, <answer> included."})
    reasoning: bool = field(
        default=True,
        metadata={"help": "False: SPEC §5's w/o-reasoning ablation (contrastive only): h right after the prompt "
                          "and a forced <answer>, trained by the item loss alone with every Â = 1 (sets "
                          "--group_size and --trainer_relabel_topk to 1; no token loss)."},
    )
    tempered_logprobs: bool = field(
        default=False,
        metadata={"help": "Token loss on log softmax(logits / --gen_temperature), TRL GRPO's convention, "
                          "instead of log softmax(logits)."},
    )
    compile_rollouts: bool = field(
        default=False,
        metadata={"help": "torch.compile the decode step: ~1.7× faster rollouts on GPUs, ~75 s per new shape."},
    )

    # Parameters that control the reward, the advantage and the losses
    beta: float = field(default=0.05, metadata={"help": "Weight of the softmax reward (β)."})
    reward_ndcg_k: int = field(default=1000, metadata={"help": "Cut-off k of the NDCG@k reward."})
    advantage_type: str = field(default="gaussian", metadata={"help": f"One of {ADVANTAGE_TYPES}."})
    trainer_relabel_topk: int = field(
        default=1, metadata={"help": "Trajectories per group used by the item loss (launcher: 2)."}
    )
    epsilon_low: float = field(default=0.2, metadata={"help": "Lower clip range ε_low."})
    epsilon_high: float = field(default=0.28, metadata={"help": "Upper clip range ε_high."})
    num_iterations: int = field(default=1, metadata={"help": "Updates per rollout batch (PPO epochs)."})
    micro_batch_size: int = field(default=4, metadata={
        "help": "Trajectories per forward/backward. Not for memory alone: SPEC §4.5's normalisation "
                "scales the step's token loss as N/M² against the item loss (README)."})
    tau: float = field(default=TAU, metadata={"help": "Temperature τ of the cosine score."})
    similarity_type: str = field(default="cosine", metadata={"help": f"One of {SIMILARITY_TYPES}."})

    # Parameters that control evaluation
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate on at most this many valid/test samples (quick runs)."}
    )
    early_stopping_patience: int = field(default=8, metadata={"help": "Evaluations without improvement."})

    # Released defaults of the training loop itself (SPEC §4 "Defaults")
    learning_rate: float = field(default=1e-5, metadata={"help": "AdamW learning rate."})
    warmup_steps: float = field(default=32, metadata={"help": "Linear warm-up steps, then constant."})
    lr_scheduler_type: str = field(default="constant_with_warmup", metadata={"help": "LR schedule."})
    num_train_epochs: float = field(default=3, metadata={"help": "Training epochs."})
    # the released launcher's spellings are aliases
    per_device_train_batch_size: int = field(
        default=4, metadata={"help": "Users per step per process (B).", "aliases": ["--train_batch_size"]}
    )
    per_device_eval_batch_size: int = field(
        default=32, metadata={"help": "Samples per greedy eval batch.", "aliases": ["--eval_batch_size"]}
    )
    bf16: bool = field(default=True, metadata={"help": "bfloat16 weights and autocast (SPEC §4 defaults)."})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "Recompute activations."})
    logging_steps: float = field(default=1, metadata={"help": "Log every this many steps."})
    eval_strategy: str = field(default="steps", metadata={"help": "When to evaluate."})
    save_strategy: str = field(default="steps", metadata={"help": "When to save a checkpoint."})
    eval_steps: float | None = field(
        default=None,
        metadata={"help": "Default: max(1, floor(len(train) / (B·grad_accum·processes) / 8)) · num_iterations "
                          "(SPEC §5)."},
    )
    save_steps: float | None = field(
        default=None,
        metadata={"help": "Checkpoint interval; default --eval_steps, which --load_best_model_at_end needs."},
    )
    eval_on_start: bool = field(default=True, metadata={"help": "Evaluate the untrained model first (not on a resume)."})
    restore_callback_states_from_checkpoint: bool = field(
        default=True, metadata={"help": "A resumed run keeps early stopping's count of evaluations without a gain."}
    )
    load_best_model_at_end: bool = field(default=True, metadata={"help": "Reload the best checkpoint by --metric_for_best_model."})
    metric_for_best_model: str = field(default="eval_valid_ndcg@10", metadata={"help": "Model selection and early stopping: a valid ranking figure."})
    greater_is_better: bool = field(default=True, metadata={"help": "Higher metric is better."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Checkpoints kept (best one kept too)."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep raw sample columns."})
    dataloader_drop_last: bool = field(default=True, metadata={"help": "Equal batches on every process."})
    ddp_find_unused_parameters: bool | None = field(
        default=False, metadata={"help": "Every LoRA weight gets a gradient each step: no search for unused ones."}
    )
    report_to: None | str | list[str] = field(default="tensorboard", metadata={"help": "Logging integrations."})
    # Set by __post_init__: which intervals `set_intervals` derives once the data size is known
    eval_steps_from_data: bool = field(default=False, init=False, repr=False)
    save_steps_from_eval: bool = field(default=False, init=False, repr=False)

    def __post_init__(self):
        """Refuse what TrainingArguments would misread (nan, an empty folder), fill the defaults that
        depend on other flags, let TrainingArguments finish, then refuse values that cannot run."""
        for flag in fields(self):  # nan and inf parse as floats
            value, spelled = getattr(self, flag.name), flag.metadata.get("aliases", [f"--{flag.name}"])[0]
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"{spelled} {value}: must be a finite number")
            check_int64(spelled, value)
        check_not_blank("--output_dir", self.output_dir,
                        "pass a folder, or leave the flag out for outputs/<--run_name>")
        if self.output_dir is None:
            self.output_dir = os.path.join("outputs", self.run_name or "r2ec")
            if os.path.normpath(self.output_dir) == "outputs":
                raise UserError(f"--run_name {self.run_name!r} names outputs/ itself, which holds the other runs "
                                "— give this run a name of its own (RUN_NAME for launch_train.sh)")
        for flag in ("dataset_dir", "output_dir", "resume_from_checkpoint", "deepspeed"):  # --flag=~/... too
            if isinstance(getattr(self, flag), str):
                setattr(self, flag, os.path.expanduser(getattr(self, flag)))
        if os.path.dirname(os.path.realpath(self.output_dir)) == os.path.realpath(self.output_dir):
            raise UserError(f"--output_dir {self.output_dir} is the root folder, where the run's checkpoint-* folders "
                            "would sit among the system's — pass a folder of its own (or a --run_name: outputs/<name>)")
        if isinstance(self.deepspeed, str) and os.path.isdir(self.deepspeed):
            raise UserError(f"--deepspeed {self.deepspeed} is a folder — pass a DeepSpeed config file, e.g. ds_config.json")
        if isinstance(self.deepspeed, str):
            check_zero_stage(self.deepspeed)
        for flag in ("eval_steps", "save_steps", "logging_steps"):
            value = getattr(self, flag)
            if value is not None and not value > 0:
                raise UserError(f"--{flag} {value:g}: must be positive (steps, or a fraction of the run below 1)")
        for flag in ("eval_steps", "save_steps"):
            value = getattr(self, flag)
            if value is not None and self.num_iterations > 1 and (value < 1 or value % self.num_iterations):
                raise UserError(f"--{flag} {value:g}: must be a multiple of --num_iterations {self.num_iterations} "
                                "(in steps), so that no checkpoint falls between the updates of one rollout batch")
        strategies = {strategy.value for strategy in SaveStrategy}  # "no", "steps", "epoch", "best"
        if (self.load_best_model_at_end and {self.eval_strategy, self.save_strategy} <= strategies
                and self.save_strategy not in (self.eval_strategy, "best")):
            raise UserError(f"--load_best_model_at_end (the default) evaluates every checkpoint, but --eval_strategy "
                            f"{self.eval_strategy} differs from --save_strategy {self.save_strategy} — pass "
                            "--load_best_model_at_end False, or the same strategy to both")
        by_steps = self.save_strategy == "steps" and self.eval_strategy == "steps"
        if by_steps and self.load_best_model_at_end and self.save_steps not in (None, self.eval_steps):
            raise UserError(f"--save_steps {self.save_steps:g}: with --load_best_model_at_end (the default) a "
                            "checkpoint is saved at every evaluation — drop --save_steps (--save_total_limit "
                            "keeps fewer), or pass --load_best_model_at_end False")
        # Without --eval_steps, `set_intervals` derives the SPEC §5 interval once the data size is known
        # (TrainingArguments would otherwise fall back to logging_steps); checkpoints follow it
        # unless --save_steps is given, so the best one exists when it is evaluated.
        self.eval_steps_from_data = self.eval_steps is None
        self.save_steps_from_eval = self.save_steps is None
        if self.save_steps is None:
            self.save_steps = self.eval_steps or self.logging_steps  # until set_intervals knows the interval
        if not self.reasoning:  # one forced "<answer>" per user: G copies would be identical
            self.group_size = self.trainer_relabel_topk = 1
        if self.gradient_checkpointing_kwargs is None:
            # Re-entrant checkpointing breaks DDP when the same weights run twice before one backward.
            self.gradient_checkpointing_kwargs = {"use_reentrant": False}
        if isinstance(self.report_to, str) and "," in self.report_to:  # "tensorboard,wandb": both
            self.report_to = [name.strip() for name in self.report_to.split(",")]
        if not self.use_cpu and not torch.cuda.is_available():  # train.py sets it when the flag is not given
            raise UserError("--use_cpu False, but no GPU is visible — check CUDA_VISIBLE_DEVICES and the CUDA install, "
                            "or drop --use_cpu False to train on the CPU")
        for flag in getattr(self, "_VALID_DICT_FIELDS", ()):  # JSON objects TrainingArguments parses
            text = getattr(self, flag)
            if flag != "deepspeed" and isinstance(text, str) and text.startswith("{"):
                try:
                    json.loads(text)
                except ValueError as e:
                    raise UserError(f"--{flag} {shown_briefly(text)} is not valid JSON ({one_line(e)}) — give a "
                                    """JSON object, keys in double quotes: '{"name": value}'""") from e
        try:
            super().__post_init__()
        except (ValueError, ImportError) as e:  # e.g. an unknown --eval_strategy, a missing --deepspeed file
            raise UserError(f"{one_line(e)} — fix the flag (python train.py --help lists them)") from e
        self.refuse_bad_values()
        self.check_optimizer()

    def refuse_bad_values(self):
        """One line for the first flag whose value cannot run, with the range it must be in."""
        from transformers.integrations import get_available_reporting_integrations
        from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

        alone = {"none", "all"} if len(self.report_to) == 1 else set()  # words Trainer takes only on their own
        unknown = sorted(set(self.report_to) - set(INTEGRATION_TO_CALLBACK) - alone)
        unavailable = sorted(set(self.report_to) - set(get_available_reporting_integrations()) - alone)
        checks = [
            (not unknown, f"--report_to {','.join(unknown)}: no such integration — choose from "
                          f"{', '.join(sorted(INTEGRATION_TO_CALLBACK))}, or none"),
            (not unavailable, f"--report_to {','.join(unavailable)}: not installed here — pip install it, "
                              "or use tensorboard or none"),
            (self.learning_rate >= 0, f"--learning_rate {self.learning_rate}: must be >= 0"),
            (self.max_steps >= 1 or self.max_steps == -1,
             f"--max_steps {self.max_steps}: must be positive, or -1 to train --num_train_epochs epochs"),
            (self.max_steps > 0 or self.num_train_epochs > 0,
             f"--max_steps {self.max_steps} and --num_train_epochs {self.num_train_epochs:g} train no step — "
             "give one of them a positive value"),
            (self.gradient_accumulation_steps >= 1,
             f"--gradient_accumulation_steps {self.gradient_accumulation_steps}: must be at least 1"),
            (0 <= self.seed < 2**32, f"--seed {self.seed}: must be between 0 and 2**32 - 1"),
            (self.per_device_train_batch_size >= 1,
             f"--train_batch_size {self.per_device_train_batch_size}: must be at least 1"),
            (self.per_device_eval_batch_size >= 1,
             f"--eval_batch_size {self.per_device_eval_batch_size}: must be at least 1"),
            (self.dataloader_num_workers >= 0,
             f"--dataloader_num_workers {self.dataloader_num_workers}: must be 0 (load in the main process) or "
             "positive"),
            (self.lora_r >= 1, f"--lora_r {self.lora_r}: must be at least 1"),
            (all(self.lora_targets),
             f"--lora_target_modules {self.lora_target_modules!r}: give comma-separated module names, "
             f"e.g. {','.join(LORA_TARGETS)}"),
            (self.lora_alpha > 0, f"--lora_alpha {self.lora_alpha}: must be positive"),
            (0 <= self.lora_dropout < 1, f"--lora_dropout {self.lora_dropout}: must be in [0, 1)"),
            (self.window_size >= 1, f"--window_size {self.window_size}: must be at least 1 history line"),
            (self.max_eval_samples is None or self.max_eval_samples >= 1,
             f"--max_eval_samples {self.max_eval_samples}: must be at least 1 (leave it out for every sample)"),
            (self.item_batch_size >= 1, f"--item_batch_size {self.item_batch_size}: must be at least 1"),
            (self.early_stopping_patience >= 1,
             f"--early_stopping_patience {self.early_stopping_patience}: must be at least 1"),
            (self.group_size >= 1, f"--group_size {self.group_size}: must be at least 1"),
            (self.group_size > 1 or self.advantage_type != "rloo" or not self.reasoning,
             "--advantage_type rloo with --group_size 1 has no other sample to compare with: every advantage "
             "is 0 and nothing trains — raise --group_size or use gaussian"),
            (self.advantage_type in ADVANTAGE_TYPES,
             f"--advantage_type {self.advantage_type!r}: choose one of {', '.join(ADVANTAGE_TYPES)}"),
            (self.similarity_type in SIMILARITY_TYPES,
             f"--similarity_type {self.similarity_type!r}: choose one of {', '.join(SIMILARITY_TYPES)}"),
            (1 <= self.trainer_relabel_topk <= self.group_size,
             f"--trainer_relabel_topk {self.trainer_relabel_topk}: must be between 1 and --group_size "
             f"{self.group_size}"),
            (self.max_new_tokens >= 8, f"--max_new_tokens {self.max_new_tokens}: must be at least 8"),
            (self.gen_temperature > 0, f"--gen_temperature {self.gen_temperature}: must be positive"),
            (self.gen_top_k >= 0, f"--gen_top_k {self.gen_top_k}: must be 0 (off) or positive"),
            (0 < self.gen_top_p <= 1, f"--gen_top_p {self.gen_top_p}: must be in (0, 1]"),
            (0 <= self.beta <= 1, f"--beta {self.beta}: must be in [0, 1]"),
            (self.reward_ndcg_k >= 1, f"--reward_ndcg_k {self.reward_ndcg_k}: must be at least 1"),
            (self.tau >= MIN_TAU, f"--tau {self.tau}: must be at least {MIN_TAU:g} (scores are similarities / τ; "
                                  f"SPEC's τ is {TAU})"),
            (self.micro_batch_size >= 1, f"--micro_batch_size {self.micro_batch_size}: must be at least 1"),
            (self.num_iterations >= 1, f"--num_iterations {self.num_iterations}: must be at least 1"),
            (self.reasoning or self.num_iterations == 1,
             "--reasoning False trains by cross-entropy, one update per batch: drop --num_iterations"),
            (self.num_iterations == 1 or self.gradient_accumulation_steps == 1,
             "--num_iterations > 1 needs --gradient_accumulation_steps 1 (each rollout batch is one step)"),
            (self.epsilon_low >= 0 and self.epsilon_high >= 0, "--epsilon_low/--epsilon_high must be >= 0"),
            ({self.metric_for_best_model, f"eval_{self.metric_for_best_model}"} & set(SELECTION_METRICS),
             f"--metric_for_best_model {self.metric_for_best_model!r}: models are selected on a valid ranking "
             f"figure (test is held out) — choose one of {', '.join(SELECTION_METRICS)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    def check_optimizer(self):
        """--optim's package, and the optimizer and learning-rate schedule flags, tried on a stand-in
        parameter: Trainer would refuse them only after the model has loaded. torch's own optimizers
        are built; others need the model itself (GaLore's target modules), checked when it builds them."""
        from transformers.optimization import get_scheduler
        from transformers.utils import is_liger_kernel_available

        if self.use_liger_kernel and not is_liger_kernel_available():
            raise UserError("--use_liger_kernel True needs the liger-kernel package — pip install liger-kernel, or "
                            "drop the flag")
        if "optimizer" in getattr(getattr(self, "hf_deepspeed_config", None), "config", {}):
            return  # DeepSpeed builds the optimizer its config names
        try:
            optimizer_class, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(self)
        except ImportError as e:
            raise UserError(f"--optim {getattr(self.optim, 'value', self.optim)} needs a package not installed here "
                            f"({one_line(e)}) — install it, or pick another --optim") from e
        except ValueError:
            return  # it needs the model itself (GaLore, LOMO), or a package it names: the Trainer says which
        if not optimizer_class.__module__.startswith("torch.optim"):
            return
        decayed, not_decayed = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
        groups = [{"params": [decayed], "weight_decay": self.weight_decay},  # as Trainer groups the model's
                  {"params": [not_decayed], "weight_decay": 0.0}]
        try:
            optimizer = optimizer_class(groups, **optimizer_kwargs)
        except ValueError as e:  # torch's own words, e.g. "Invalid beta parameter at index 0: 2.0"
            raise UserError(f"{one_line(e)} — fix --learning_rate, --adam_beta1, --adam_beta2, --adam_epsilon or "
                            "--weight_decay") from e
        steps = self.max_steps if self.max_steps > 0 else 1000
        try:
            get_scheduler(self.lr_scheduler_type, optimizer, num_warmup_steps=self.get_warmup_steps(steps),
                          num_training_steps=steps, scheduler_specific_kwargs=self.lr_scheduler_kwargs)
        except (ValueError, TypeError) as e:  # settings it lacks, or does not take, in --lr_scheduler_kwargs
            raise UserError(f"--lr_scheduler_type {self.lr_scheduler_type.value}: {one_line(e)} — pass what it needs "
                            "(only that) as --lr_scheduler_kwargs '{...}', or pick another schedule") from e

    def default_eval_steps(self, num_train: int) -> int:
        """SPEC §5: evaluate every floor(len(train) / (B · grad_accum · processes) / 8) steps (at least 1),
        in rollout batches of `num_iterations` steps each: still 8 per epoch, each after a batch's
        last update, so that no checkpoint falls between the updates of one batch (its rollouts
        are not saved, and a resume there would sample new ones)."""
        batches_per_epoch = num_train // (self.per_device_train_batch_size * self.gradient_accumulation_steps
                                          * self.world_size)
        return max(1, batches_per_epoch // 8) * self.num_iterations

    def set_intervals(self, num_train: int):
        """SPEC §5's evaluation interval unless --eval_steps is given; checkpoints follow it unless
        --save_steps is given."""
        if self.eval_steps_from_data:
            self.eval_steps = self.default_eval_steps(num_train)
        if self.save_steps_from_eval:
            self.save_steps = self.eval_steps

    @property
    def n_gpu(self) -> int:
        """GPUs per process: one. Trainer would spread a single process over every visible GPU with
        nn.DataParallel, which the rollouts and the user-state hook do not support; several GPUs
        take several processes (launch_train.sh)."""
        return min(super().n_gpu, 1)

    @property
    def lora_targets(self) -> tuple[str, ...]:
        return tuple(name.strip() for name in self.lora_target_modules.split(","))  # "q_proj, v_proj" too

    @property
    def sampling(self) -> SamplingConfig:
        """The rollout sampling the flags ask for; `RecPOTrainer.sampling` is what training uses
        (without reasoning it is the forced `<answer>` alone)."""
        return SamplingConfig(
            max_new_tokens=self.max_new_tokens,
            temperature=self.gen_temperature,
            top_k=self.gen_top_k,
            top_p=self.gen_top_p,
            tempered_logprobs=self.tempered_logprobs,
        )


# ----------------------------------------------------------------------------------------------
# SPEC §4 formulas, one function each


def recpo_reward(scores: torch.Tensor, targets: torch.Tensor, beta: float, ndcg_k: int):
    """SPEC §4.2 reward: R = (1-β)·NDCG@k + β·softmax(scores)[target].

    `scores` (N, I) are already masked (history and pad at -inf); `targets` (N,).
    Returns (R, its terms by name), each (N,); the trainer logs every term as `reward/{name}`.
    """
    ndcg = ndcg_at_k(target_rank(scores, targets), ndcg_k).float()  # (N,)
    prob = scores.float().softmax(dim=-1).gather(1, targets[:, None]).squeeze(1)  # (N,)
    return (1 - beta) * ndcg + beta * prob, {"ndcg": ndcg, "softmax": prob}


def group_advantages(rewards: torch.Tensor, kind: str) -> torch.Tensor:
    """SPEC §4.3 advantage per group.  rewards (B, G) -> (B, G).

    gaussian: A = (R - mean)/(std + 1e-8), unbiased std, A = 1 when G = 1;
    rloo:     A = R - mean of the other G-1 rewards (0 when G = 1).
    """
    group = rewards.shape[1]
    if kind == "gaussian":
        if group == 1:
            return torch.ones_like(rewards)
        mean = rewards.mean(dim=1, keepdim=True)
        std = rewards.std(dim=1, keepdim=True, unbiased=True)
        return (rewards - mean) / (std + 1e-8)
    if kind == "rloo":
        if group == 1:
            return torch.zeros_like(rewards)
        others_mean = (rewards.sum(dim=1, keepdim=True) - rewards) / (group - 1)
        return rewards - others_mean
    raise ValueError(f"unknown advantage type {kind!r}: use one of {', '.join(ADVANTAGE_TYPES)}")


def relabel_mask(advantages: torch.Tensor, topk: int) -> torch.Tensor:
    """SPEC §4.4 relabel mask: 1 for the `topk` highest-advantage trajectories of each group.

    advantages (B, G) -> (B, G) float; ties go to the earlier trajectory.
    """
    order = torch.sort(advantages, dim=1, descending=True, stable=True).indices[:, :topk]  # (B, k)
    return torch.zeros_like(advantages).scatter(1, order, 1.0)


def clipped_surrogate(ratio, advantages, epsilon_low, epsilon_high):
    """SPEC §4.5 and §4.6 clipped objective, elementwise: -min(ρA, clip(ρ, 1-ε_low, 1+ε_high)A).

    Returns (the objective, where the clip is active: those elements get no gradient).
    """
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * advantages
    return -torch.min(unclipped, clipped), clipped < unclipped


def clipped_token_loss(logprobs, old_logprobs, advantages, mask, epsilon_low, epsilon_high):
    """SPEC §4.5 token loss of one micro-batch: -min(ρA, clip(ρ, 1-ε_low, 1+ε_high)A), ρ = π_θ/π_old.

    logprobs, old_logprobs, mask (M, T); advantages (M,). Summed over the masked tokens,
    divided by their count and again by the number of trajectories M (released code).
    Returns (loss, fraction of tokens where clipping is active, i.e. that get no gradient).
    """
    ratio = torch.exp(logprobs - old_logprobs)  # (M, T)
    per_token, clip_active = clipped_surrogate(ratio, advantages[:, None], epsilon_low, epsilon_high)  # (M, T)
    mask = mask.to(per_token.dtype)
    loss = (per_token * mask).sum() / mask.sum().clamp(min=1) / logprobs.shape[0]
    clip_fraction = (clip_active.to(mask.dtype) * mask).sum() / mask.sum().clamp(min=1)
    return loss, clip_fraction.detach()


def clipped_item_loss(logits, labels, old_logprobs, weighted_advantages, epsilon_low, epsilon_high, num_trajectories):
    """SPEC §4.6 item loss: -min(qÂ, clip(q, 1-ε_low, 1+ε_high)Â), q = p/p_old, Â = A × relabel.

    logits (R, I): in-batch scores of R trajectories over I target items; labels (R,);
    old_logprobs (R,) log p_old, or None (on-policy: q = 1 in value, gradient of p/p.detach());
    weighted_advantages (R,). Summed over rows and divided by `num_trajectories`, the number of
    trajectories of the whole step, so micro-batches add up to the mean over trajectories.
    Returns (loss, log p (R,) detached).
    """
    # q in log space: p below float32's range (e^-88, a cosine gap of ~1.8 at τ = 0.02) would
    # make a quotient of probabilities, or a stored p_old, underflow
    logprobs = logits.float().log_softmax(dim=-1).gather(1, labels[:, None]).squeeze(1)  # (R,)
    reference = logprobs.detach() if old_logprobs is None else old_logprobs
    ratio = torch.exp(logprobs - reference)  # (R,)
    per_row, _ = clipped_surrogate(ratio, weighted_advantages, epsilon_low, epsilon_high)  # (R,)
    return per_row.sum() / num_trajectories, logprobs.detach()


# ----------------------------------------------------------------------------------------------
# Plumbing: data checks, batch order, skipped steps


def check_train_size(num_train: int, global_batch: int):
    if num_train < global_batch:
        raise UserError(f"the train split has {num_train} samples, fewer than one batch of {global_batch} "
                        "(--train_batch_size × processes) — use a smaller batch or a larger dataset")


def check_length_limits(args: RecPOConfig, tokenizer, dataset, category: str, setting: str = "--{}"):
    """The limits must hold what shortening cannot remove: a prompt's instruction (the first
    train sample with every history line dropped) and an item sequence's fixed text (the pad
    item, description cut to nothing). Measured on real rows, so an edited prompt that reads
    other columns is measured too. `setting` names where a limit came from: a flag, or
    (recommend.py) the run's record."""
    limits = {  # setting: (limit, tokens left at the shortest)
        "max_prompt_tokens": (args.max_prompt_tokens, len(user_prompt_tokens(
            tokenizer, user_prompt(dataset["train"][0], category, args.window_size), max_tokens=0))),
        "max_item_tokens": (args.max_item_tokens, len(item_prompt_tokens(
            tokenizer, dataset["item_info"][0], category, max_tokens=0))),
    }
    for name, (limit, needed) in limits.items():
        if limit <= needed:
            raise UserError(f"{setting.format(name)} {limit} cannot hold the {needed} tokens of text no shortening "
                            f"removes — raise it (SPEC §2: {MAX_PROMPT_TOKENS} for prompts, {MAX_ITEM_TOKENS} for items)")


def check_context_length(args: RecPOConfig, model_config):
    """A prompt and its reasoning must fit the backbone's context (its max_position_embeddings)."""
    context = getattr(model_config.get_text_config(), "max_position_embeddings", None)
    if context and args.max_prompt_tokens + args.max_new_tokens > context:
        raise UserError(f"--max_prompt_tokens {args.max_prompt_tokens} + --max_new_tokens {args.max_new_tokens} "
                        f"exceed the backbone's context of {context} tokens (max_position_embeddings) — lower them "
                        f"(the defaults are {MAX_PROMPT_TOKENS} and {RecPOConfig.max_new_tokens})")


class RepeatedBatchSampler(Sampler):
    """Shuffled sample indices in which each global batch comes `repeats` times in a row.

    Accelerate deals consecutive batches of B indices to processes round-robin, so a global batch
    is B × processes indices. With repeats = 2, 2 processes, B = 2:

        indices     [a b c d][a b c d][e f g h][e f g h] ...
        process 0    a b      a b      e f      e f
        process 1    c d      c d      g h      g h

    so every process sees its rollout batch `num_iterations` times, one optimizer step each.
    The order depends only on (seed, epoch), which makes a resumed run see the same data. The
    epoch is read from `current_epoch()` when an iteration starts rather than set through
    `set_epoch`: on a resume with several processes, the wrappers accelerate adds to skip the
    epoch's trained batches hide the sampler from `set_epoch`.
    """

    def __init__(self, num_samples: int, global_batch: int, repeats: int, seed: int,
                 current_epoch: Callable[[], int] = lambda: 0):
        self.num_samples, self.global_batch, self.repeats, self.seed = num_samples, global_batch, repeats, seed
        self.current_epoch = current_epoch

    def __len__(self):
        return (self.num_samples // self.global_batch) * self.global_batch * self.repeats

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.current_epoch())
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        for start in range(0, len(order) - self.global_batch + 1, self.global_batch):
            for _ in range(self.repeats):
                yield from order[start:start + self.global_batch]


def _drop_zero_gradients(engine):
    """Forget the gradients a DeepSpeed ZeRO engine has accumulated since its last step.

    A step skipped after some micro-batches' backward has them reduced into ZeRO's partition
    buffers, which `zero_grad` leaves alone; this clears them as DeepSpeed itself does when it
    skips a step on overflow (tests: a skip after a backward trains like a skip before one).
    Covers ZeRO stages 1-2 on the GPU (ds_config.json); an optimizer offloaded to the CPU keeps
    buffers of its own that this leaves alone.
    """
    engine.zero_grad()  # parameters' .grad
    engine.optimizer.zero_grad(set_to_none=True)  # and ZeRO's per-parameter accumulators
    for buffers in (getattr(engine.optimizer, "all_grad_tensors", {}), getattr(engine.optimizer, "averaged_gradients", {})):
        for group in buffers:
            buffers[group] = None


def marker_seen(path: str, token: str, wait_s: float) -> bool:
    """Whether the file `path` holds `token`, polled once a second for up to `wait_s` seconds."""
    deadline = time.monotonic() + wait_s
    while True:
        with contextlib.suppress(OSError):
            with open(path, "rb") as f:
                if f.read() == token.encode():
                    return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(1)


class SkipStep(RuntimeError):
    """Raised on every process when a step must be skipped (OOM or non-finite values somewhere)."""


def keep_rows(rows):
    """Collator: a batch is the list of raw dataset rows (prompts are built in the trainer)."""
    return rows


def reasoning_texts(tokenizer, rollouts: Rollouts) -> list[str]:
    """Each trajectory's reasoning as text, `<answer>` included (only its masked tokens)."""
    return [tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
            for ids, mask in zip(rollouts.completion_ids, rollouts.completion_mask)]


def reasoning_file(output_dir: str, step: int, split: str) -> str:
    """Where an evaluation at `step` writes its records: one JSON line per sample."""
    return os.path.join(output_dir, "reasoning", f"step{step}_{split}.jsonl")


class RecPOBatch(NamedTuple):
    """One rollout batch of a process, handed from the scoring stages to `update`."""

    rollouts: Rollouts  # N = B·G trajectories, sample j of user i at row i·G + j
    targets: torch.Tensor  # (B,) target item ids
    advantages: torch.Tensor  # (N,)
    relabel: torch.Tensor  # (N,) 1 where the trajectory feeds the item loss
    item_old_logprobs: torch.Tensor | None = None  # (N,) log p_old of the item loss, set by the first update
    token_old_logprobs: torch.Tensor | None = None  # (N, C) π_old of the token loss, set by the first update


# ----------------------------------------------------------------------------------------------
# The trainer


class RecPOTrainer(Trainer):
    """Hugging Face `Trainer` whose training step is RecPO and whose evaluation is full ranking."""

    def __init__(self, model, args: RecPOConfig, tokenizer, dataset, category: str, callbacks=None):
        check_length_limits(args, tokenizer, dataset, category)
        check_context_length(args, model.config)
        check_layer_types(model.config)
        super().__init__(
            model=model,
            args=args,
            train_dataset=dataset["train"],
            eval_dataset={split: dataset[split] for split in EVAL_SPLITS},
            processing_class=tokenizer,
            data_collator=keep_rows,
            callbacks=callbacks,
        )
        self.category = category
        item_info = dataset["item_info"]
        self.item_titles = dict(zip(item_info["item_id"], item_info["title"]))  # column reads: fast for 10k+ items
        self.item_table = ItemTable(
            dataset["item_info"], tokenizer, category, batch_size=args.item_batch_size, max_tokens=args.max_item_tokens
        )
        self.stop = answer_stop(tokenizer, end_of_turn_ids(model, tokenizer))
        # Without reasoning (the ablation) every rollout is the forced stop alone, chosen greedily.
        self.sampling = args.sampling if args.reasoning else SamplingConfig(len(self.stop.forced), greedy=True)
        self._metrics = defaultdict(list)
        self._table_encoded = False
        self._table_rows_written = False  # by training steps since the last full encoding
        self._resume_from: str | None = None
        self._buffer: RecPOBatch | None = None
        self._skipping_step = False  # a batch of this optimizer step was skipped: so are its other batches
        # Each process samples with noise of its own (the model is built, identical on all, by now);
        # checkpoints keep every process's RNG state.
        set_seed((args.seed + self.accelerator.process_index) % 2**32)

    # -- data order ----------------------------------------------------------------------------

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        global_batch = self.args.per_device_train_batch_size * self.accelerator.num_processes
        check_train_size(len(dataset), global_batch)
        return RepeatedBatchSampler(len(dataset), global_batch, self.args.num_iterations, self.args.seed,
                                    current_epoch=lambda: int(self.state.epoch or 0))  # 1.25 on a resume in epoch 2

    # -- prompts -------------------------------------------------------------------------------

    def tokenize_prompts(self, samples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """Chat-formatted user prompts, left-padded.  -> ids, mask (B, P) on the device."""
        prompts = [user_prompt_tokens(self.processing_class, user_prompt(s, self.category, self.args.window_size),
                              self.args.max_prompt_tokens) for s in samples]
        ids, mask = left_pad(prompts, self.processing_class.pad_token_id)
        return torch.tensor(ids, device=self.args.device), torch.tensor(mask, device=self.args.device)

    # -- the item table ------------------------------------------------------------------------

    def refresh_item_table(self, model):
        """Re-encode every item with the current weights (SPEC §4 "Item table"), each process a
        share, gathered into every process's table. Every process must call it at the same point."""
        table, world = self.item_table, self.accelerator.num_processes
        by_length = sorted(range(len(table)), key=lambda i: len(table.tokens[i]))
        shares = [by_length[rank::world] for rank in range(world)]  # equal shares of short and long items
        size = len(shares[0])
        mine = shares[self.accelerator.process_index]
        mine = mine + by_length[-1:] * (size - len(mine))  # padded to equal sizes for the gather
        try:
            h = table.encode(self.accelerator.unwrap_model(model), mine, progress=self.is_local_process_zero())
            ok = True
        except torch.OutOfMemoryError:
            ok = False
        if not self._every_process_ok(ok):  # so that none waits in the gather alone
            raise UserError(f"out of memory encoding the item table ({self.args.item_batch_size} items per batch) "
                            "— lower --item_batch_size or --max_item_tokens")
        gathered = gather(h.to(self.args.device))  # (W·size, D), process by process
        real = torch.cat([torch.arange(size) < len(share) for share in shares])  # the padding left out
        table.update([item for share in shares for item in share], gathered[real.to(gathered.device)])
        self._table_encoded, self._table_rows_written = True, False

    def restore_item_table(self, model):
        """The table a run starts training from: the resumed checkpoint's when it holds one (saved
        between evaluations, with rows written by the steps since), else every item encoded afresh."""
        path = os.path.join(self._resume_from, ITEM_TABLE_FILE) if self._resume_from else ""
        saved, problem = None, None
        try:
            saved = self.read_item_table(path, model) if os.path.isfile(path) else None
        except UserError as e:  # a copy of its own on each node (--save_on_each_node) may fail alone
            problem = e
        if not self._every_process_ok(problem is None):
            raise problem or UserError(f"another process could not read its {ITEM_TABLE_FILE} — see its error line")
        if not self._every_process_ok(saved is not None):  # all load it, or all encode together
            return self.refresh_item_table(model)
        self.item_table.embeddings = saved.to(self.args.device, torch.float32)
        self._table_encoded, self._table_rows_written = True, True

    def save_item_table(self, folder: str):
        torch.save({"embeddings": self.item_table.embeddings.cpu(), "max_item_tokens": self.args.max_item_tokens},
                   os.path.join(folder, ITEM_TABLE_FILE))

    def read_item_table(self, path: str, model) -> torch.Tensor | None:
        """The item embeddings `save_item_table` wrote; None when they were encoded under another
        --max_item_tokens (the resume changed it: every item is encoded afresh under the new one)."""
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"{path} cannot be read ({one_line(e)}) — delete it (the items are then encoded "
                            "afresh, as at an evaluation) or resume from the checkpoint before") from e
        if isinstance(saved, torch.Tensor):  # written before the limit was recorded with it: encode afresh
            return None
        embeddings = saved.get("embeddings") if isinstance(saved, dict) else None
        expected = (len(self.item_table), self.accelerator.unwrap_model(model).config.get_text_config().hidden_size)
        if not isinstance(embeddings, torch.Tensor) or tuple(embeddings.shape) != expected:
            raise UserError(f"{path} is not an item table of {expected[0]} items × {expected[1]} — it belongs to "
                            "another dataset or backbone: delete it or resume from another checkpoint")
        return embeddings if saved.get("max_item_tokens") == self.args.max_item_tokens else None

    # -- RecPO steps ---------------------------------------------------------------------------

    def rollout(self, model, samples: list[dict], sampling: SamplingConfig, num_samples: int) -> Rollouts:
        """SPEC §4.1: `num_samples` reasonings per sample, all B·G generated together."""
        ids, mask = self.tokenize_prompts(samples)
        return generate_rollouts(
            self.accelerator.unwrap_model(model), ids, mask, num_samples, sampling,
            self.stop, self.processing_class.pad_token_id, compile_step=self.args.compile_rollouts,
        )

    def target_ids(self, samples: list[dict]) -> torch.Tensor:
        """Each sample's target item id.  -> (B,) on the device."""
        return torch.tensor([s["item_id"] for s in samples], device=self.args.device)

    def masked_scores(self, user_states: torch.Tensor, samples: list[dict]) -> torch.Tensor:
        """Scores of every user state over the item table, history items and pad masked.  -> (N, I)."""
        group = len(user_states) // len(samples)
        scores = similarity(user_states, self.item_table.embeddings, self.args.similarity_type, self.args.tau)
        histories = [s["history_item_id"] for s in samples for _ in range(group)]
        return mask_seen(scores, histories)

    def rewards(self, user_states: torch.Tensor, samples: list[dict], targets: torch.Tensor):
        """SPEC §4.2 for each trajectory, against the cached item table.  targets (B,) -> R (N,), its terms."""
        group = len(user_states) // len(samples)
        return recpo_reward(self.masked_scores(user_states, samples), targets.repeat_interleave(group),
                            self.args.beta, self.args.reward_ndcg_k)

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """SPEC §4.3 per group of G.  rewards (N,) -> (N,)."""
        return group_advantages(rewards.view(-1, self.args.group_size), self.args.advantage_type).flatten()

    def relabel(self, advantages: torch.Tensor) -> torch.Tensor:
        """SPEC §4.4 per group of G.  advantages (N,) -> (N,)."""
        return relabel_mask(advantages.view(-1, self.args.group_size), self.args.trainer_relabel_topk).flatten()

    def generate_and_score(self, model, samples: list[dict]) -> RecPOBatch:
        """Rollouts, rewards, advantages and relabel mask for one batch of users (no gradient).

        Running out of memory, or a non-finite reward, on any process skips the step on every
        process: all of them learn it in the same collective, right after the rewards.
        """
        try:
            with self._timed("rollout"):
                rollouts = self.rollout(model, samples, self.sampling, self.args.group_size)
            targets = self.target_ids(samples)  # (B,)
            with self._timed("reward"):
                reward, terms = self.rewards(rollouts.user_states, samples, targets)
            ok, problem = torch.isfinite(reward).all(), "non-finite reward"  # read in the collective's one sync
        except torch.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            ok, problem = False, "out of memory in the rollout"
        self._agree_to_continue(ok, problem)
        advantages = self.advantages(reward) if self.args.reasoning else torch.ones_like(reward)  # contrastive only
        rewards_by_group, ndcg_by_group = reward.view(-1, self.args.group_size), terms["ndcg"].view(-1, self.args.group_size)
        self._record(
            **{
                "reward/mean": reward.mean(),
                **{f"reward/{name}": term.mean() for name, term in terms.items()},
                "reward/std_within_group": rewards_by_group.std(dim=1).mean() if self.args.group_size > 1 else 0.0,
                "advantage/abs_mean": advantages.abs().mean(),
                # Groups whose trajectories rank the target alike: only β·softmax tells them apart.
                "frac_ndcg_zero_std": (ndcg_by_group.max(1).values == ndcg_by_group.min(1).values).float().mean(),
                "completions/mean_length": rollouts.completion_mask.sum(1).float().mean(),
            }
        )
        return RecPOBatch(rollouts, targets, advantages, self.relabel(advantages))

    def token_loss(self, logprobs, batch: RecPOBatch, rows):
        """SPEC §4.5 on the micro-batch `rows`.

        π = softmax(logits), or softmax(logits / --gen_temperature) with --tempered_logprobs (the
        policy that sampled, as in TRL's GRPO); `micro_batch_losses` computes it so. π_old is the policy at
        sampling time as the update's own forward computes it: the first update of a rollout batch
        uses its log-probs detached (ρ = 1, REINFORCE, as SPEC states), later ones
        (`num_iterations` > 1) what the first recorded. The sampler's log-probs are not used: they
        come without LoRA dropout and from other kernels, so ρ would drift from 1.
        """
        completion_len = logprobs.shape[1]
        old = logprobs.detach() if batch.token_old_logprobs is None else batch.token_old_logprobs[rows, :completion_len]
        return clipped_token_loss(
            logprobs, old, batch.advantages[rows], batch.rollouts.completion_mask[rows, :completion_len],
            self.args.epsilon_low, self.args.epsilon_high,
        )

    def item_loss(self, user_states, item_states, batch: RecPOBatch, rows, weighted_advantages, old_logprobs):
        """SPEC §4.6 on the micro-batch `rows`, in-batch softmax over every process's targets.

        Other processes' user and item states join detached: each process holds the gradient of
        the full loss through its own states, so the sum over processes is the full gradient.
        `weighted_advantages` (Â) and `old_logprobs` (or None) are every process's, (W·N,).
        Returns (loss, log p of the local rows).
        """
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        users = self._gather_keeping_grad(user_states)  # (W·M, D)
        items = self._gather_keeping_grad(item_states)  # (W·B, D)
        num_local, num_users = len(batch.advantages), len(batch.targets)
        group = num_local // num_users
        local_rows = torch.as_tensor(rows, device=users.device)  # (M,)
        labels = torch.cat([local_rows // group + q * num_users for q in range(world)])  # (W·M,)
        global_rows = torch.cat([local_rows + q * num_local for q in range(world)])  # (W·M,)
        old_logprobs = None if old_logprobs is None else old_logprobs[global_rows]
        logits = similarity(users, items, self.args.similarity_type, self.args.tau)  # (W·M, W·B)
        loss, item_logprobs = clipped_item_loss(
            logits, labels, old_logprobs, weighted_advantages[global_rows], self.args.epsilon_low,
            self.args.epsilon_high, world * num_local,
        )
        mine = slice(rank * len(local_rows), (rank + 1) * len(local_rows))
        return loss, item_logprobs[mine]

    def micro_batch_losses(self, model, batch: RecPOBatch, rows, item_states, weighted_advantages, item_old_logprobs):
        """SPEC §4.5 and §4.6 on the trajectories `rows`, from one forward of the policy.

        The token loss is normalised to B = per_device_train_batch_size users, so a process
        holding a larger batch (the single-process reference of the tests) averages over its
        B-sized shares instead of summing them. -> token loss, item loss, the item loss's log p of
        these rows (M,) and their token log-probs (M, C).
        """
        logprobs, user_states = shared_prompt_forward(model, *self._trajectory_inputs(batch.rollouts, rows),
                                                      self.sampling.policy_temperature)
        item, item_logprobs = self.item_loss(user_states, item_states, batch, rows, weighted_advantages,
                                             item_old_logprobs)
        # The in-batch cross-entropy of each trajectory's own target: the item loss's value is -Â on-policy.
        self._record(**{"item/nll": -item_logprobs.mean()})
        if self.args.reasoning:
            token, clip_fraction = self.token_loss(logprobs, batch, rows)
            token = token * self.args.per_device_train_batch_size / len(batch.targets)
            self._record(**{"clip_ratio/token": clip_fraction})
        else:  # the ablation: `<answer>` was forced, not chosen, so there is no token loss
            token = torch.zeros_like(item)
        self._check_finite(token + item, "loss")
        return token, item, item_logprobs, logprobs

    def update(self, model, batch: RecPOBatch) -> torch.Tensor:
        """SPEC §4.7: token + item loss over micro-batches, one backward each; returns the loss.

        Only the last micro-batch syncs gradients (DDP all-reduce, DeepSpeed step boundary).
        The B target items are encoded with gradient once per update, not once per micro-batch:
        earlier micro-batches score a detached copy and keep the item loss's gradient with
        respect to it, and the last backward carries that gradient through the item encoder
        along with its own (one encoder forward and backward per update).
        """
        args, world = self.args, self.accelerator.num_processes
        # Batches in this optimizer step: Trainer sets it per step, fewer than
        # --gradient_accumulation_steps in an epoch's last step when they do not divide the epoch.
        accumulated = getattr(self, "current_gradient_accumulation_steps", args.gradient_accumulation_steps)
        num_local = len(batch.advantages)
        micro_batches = torch.arange(num_local, device=args.device).split(args.micro_batch_size)
        item_logprobs = torch.zeros(num_local, device=args.device)  # (N,) log p_old for later iterations
        token_logprobs = torch.zeros_like(batch.rollouts.logprobs)  # (N, C) π_old for later iterations
        sync_at_end = self.accelerator.sync_gradients
        token_total = item_total = torch.zeros((), device=args.device)  # the step's loss terms: micro-batches add up
        weighted_advantages = gather(batch.advantages * batch.relabel)  # (W·N,) Â = A × relabel, SPEC §4.6
        item_old_logprobs = None if batch.item_old_logprobs is None else gather(batch.item_old_logprobs)  # (W·N,)
        # Items run on the unwrapped module: DDP allows one wrapped forward per backward.
        item_inputs = {k: v.to(args.device) for k, v in self.item_table.batch(batch.targets.tolist()).items()}
        item_states = encode(self.accelerator.unwrap_model(model), **item_inputs)  # (B, D)
        detached_items = item_states.detach().requires_grad_()
        earlier_items_grad = torch.zeros_like(detached_items)  # d(earlier micro-batches' loss)/d(items)
        for index, rows in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            # DDP must know before the forward whether this backward all-reduces.
            defer_all_reduce = not (last or self.is_deepspeed_enabled)
            with self.accelerator.no_sync(model) if defer_all_reduce else contextlib.nullcontext():
                token, item, rows_item_logprobs, logprobs = self.micro_batch_losses(
                    model, batch, rows, item_states if last else detached_items, weighted_advantages, item_old_logprobs)
                # Every process computes the same full item loss value but holds the gradient only
                # through its own states; DDP averages gradients over processes, hence × world.
                loss = (token + item * world) / accumulated
                if last:
                    loss = loss + (item_states * earlier_items_grad).sum()
                else:  # unscaled, unlike .grad after a backward under a loss scaler
                    earlier_items_grad += torch.autograd.grad(loss, detached_items, retain_graph=True)[0]
                self.accelerator.gradient_state._set_sync_gradients(sync_at_end and last)
                backward_kwargs = {"scale_wrt_gas": False} if self.is_deepspeed_enabled else {}
                self.accelerator.backward(loss, **backward_kwargs)
            item_logprobs[rows] = rows_item_logprobs
            token_logprobs[rows, :logprobs.shape[1]] = logprobs.detach()
            token_total, item_total = token_total + token.detach(), item_total + item.detach()
        self.accelerator.gradient_state._set_sync_gradients(sync_at_end)
        # Every process writes every process's targets, so all processes score against one table.
        self.item_table.update(gather(batch.targets), gather(item_states.detach()))
        self._table_rows_written = True
        if batch.item_old_logprobs is None:
            self._buffer = batch._replace(item_old_logprobs=item_logprobs, token_old_logprobs=token_logprobs)
            mask = batch.rollouts.completion_mask  # how far the sampler's log-probs are off
            gap = (token_logprobs - batch.rollouts.logprobs).abs() * mask
            self._record(**{"rollout/logprob_gap": gap.sum() / mask.sum()})
        self._record(**{"loss/token": token_total, "loss/item": item_total})
        return (token_total + item_total) / accumulated

    # -- Trainer hooks -------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """Trainer.train, once every process sees the run's folder, noting the checkpoint a resume
        starts from (see `restore_item_table`). A resume does not evaluate on start: a checkpoint
        saved at an evaluation was evaluated then, and that evaluation would encode the item table
        afresh instead of taking the checkpoint's. Nothing of an earlier call's steps (one stopped
        by Ctrl-C in a notebook, say) carries over: neither its rollouts nor a skip in progress."""
        self.check_output_dir_shared()
        self._buffer, self._skipping_step = None, False
        if resume_from_checkpoint is True and os.path.isdir(self.args.output_dir):
            self._resume_from = get_last_checkpoint(self.args.output_dir)
        elif isinstance(resume_from_checkpoint, str):
            self._resume_from = resume_from_checkpoint
        if resume_from_checkpoint:
            self.args.eval_on_start = False
            self._table_encoded = False  # the checkpoint's table, not the one in memory
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def check_output_dir_shared(self, wait_s: float = SHARED_FOLDER_WAIT_S):
        """Every process reads what process 0 writes into --output_dir. Without --save_on_each_node
        the checkpoints are written by process 0 alone, and every process loads the best one at the
        end (and resumes from one): a multi-node run whose folder is on each node's own disk fails
        here, not after training. Every process must call it."""
        if self.accelerator.num_processes == 1 or self.args.save_on_each_node:
            return
        marker = os.path.join(self.args.output_dir, SHARED_FOLDER_MARKER)
        token, problem = (uuid.uuid4().hex if self.is_world_process_zero() else None), None
        if token is not None:
            try:
                os.makedirs(self.args.output_dir, exist_ok=True)
                with open(marker, "w") as f:
                    f.write(token)
            except OSError as e:
                problem = f"cannot be written ({e.strerror})"
        token, problem = gather_object([(token, problem)])[0]  # process 0's, known to all
        seen = problem is None and marker_seen(marker, token, wait_s)
        seen_by_all = gather_object([seen])  # also: no process still reads when the marker goes
        if self.is_world_process_zero():
            with contextlib.suppress(OSError):
                os.unlink(marker)
        if problem is not None:
            raise UserError(f"--output_dir {self.args.output_dir} {problem} — pass a folder you can write to")
        if not all(seen_by_all):
            raise UserError(f"--output_dir {self.args.output_dir} is not one folder for all processes: process "
                            f"{seen_by_all.index(False)} did not see within {wait_s:g} s a file process 0 wrote "
                            "into it (each node's own disk?) — put it on a file system every node shares, or pass "
                            "--save_on_each_node True to keep a copy of the checkpoints on each node")

    def _save_checkpoint(self, model, trial):
        """Trainer's checkpoint, plus the item table when steps since the last evaluation wrote rows
        of it: encoding every item afresh on a resume would start from another table."""
        super()._save_checkpoint(model, trial)
        if self._table_rows_written and self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            self.save_item_table(folder)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Trainer's save; under DeepSpeed ZeRO-1/2, where every process holds the whole model, straight
        from the model as without DeepSpeed. Trainer's DeepSpeed route (accelerate's `get_state_dict`)
        would first copy every weight, the frozen backbone's included (6 GB at Qwen2.5-3B), to host
        memory on every process, while only the LoRA weights get written."""
        if not self.is_deepspeed_enabled or self.accelerator.state.deepspeed_plugin.zero_stage == 3:
            super().save_model(output_dir, _internal_call)
            return
        self._save(output_dir or self.args.output_dir)
        if self.args.push_to_hub and not _internal_call:  # as Trainer.save_model ends
            self.push_to_hub(commit_message="Model save")

    def _save(self, output_dir: str | None = None, state_dict=None):
        """Trainer's save, with the weights given the mode every other file of the run gets (0644 under
        the usual umask): safetensors writes them 0600, a run folder others cannot serve."""
        super()._save(output_dir, state_dict)
        if self.args.should_save:
            mode = 0o666 & ~umask()
            for path in glob.glob(os.path.join(glob.escape(output_dir or self.args.output_dir), "*.safetensors")):
                os.chmod(path, mode)

    def _load_callback_state(self):
        """On a resume, early stopping keeps its count of evaluations without a gain but takes this
        run's --early_stopping_patience (Trainer restores the checkpoint's, which would stop a run
        resumed with more patience at its first evaluation without a gain). A callback the
        checkpoint's run lacked (early stopping, when it ran without evaluation) starts afresh:
        Trainer would fail at the next checkpoint, saving a state it cannot find."""
        super()._load_callback_state()
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, EarlyStoppingCallback):
                callback.early_stopping_patience = self.args.early_stopping_patience
            if isinstance(callback, ExportableState):
                self.state.stateful_callbacks.setdefault(type(callback).__name__, callback.state())

    def training_step(self, model, inputs, num_items_in_batch=None):
        """One RecPO batch: fresh rollouts every `num_iterations` steps, then the clipped update.

        Running out of memory in the rollout skips the optimizer step on every process (with
        --gradient_accumulation_steps, its other batches too). In the update it ends the run
        with one line: the processes would then wait in different collectives.
        """
        model.train()
        last_batch_of_step = self.accelerator.sync_gradients  # Trainer's mark; the update changes it
        if not self._table_encoded:  # the first step, also of a resumed run
            with self._timed("item_table"):
                self.restore_item_table(model)
        if self._skipping_step:  # an earlier batch of this optimizer step was skipped
            return self._skip_step(model, "", last_batch_of_step)
        try:
            if self._buffer is None or self.state.global_step % self.args.num_iterations == 0:
                self._buffer = self.generate_and_score(model, inputs)
            with self._timed("update"):
                return self.update(model, self._buffer)
        except SkipStep as skip:
            return self._skip_step(model, str(skip), last_batch_of_step)
        except torch.OutOfMemoryError as e:
            raise UserError(
                f"out of memory in the update at step {self.state.global_step} ({one_line(e)}) — lower "
                "--max_new_tokens or --max_prompt_tokens, or --micro_batch_size (which also reweighs the token loss)"
            ) from e

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the step metrics collected since the last log, averaged over steps and processes."""
        if "loss" in logs:
            # One exchange of every process's means: after a skipped step the processes may
            # hold different keys, and a gather per key would pair them up wrongly.
            totals = [torch.stack(values).sum() if key == "skipped_steps" else torch.stack(values).mean()
                      for key, values in self._metrics.items()]  # skipped steps are counted, the rest averaged
            means = dict(zip(self._metrics, torch.stack(totals).tolist()))  # one device sync for all
            logs.update(self._average_over_processes(means))
            self._metrics.clear()
            if torch.cuda.is_available():
                logs["memory/peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        super().log(logs, start_time)

    # -- evaluation (SPEC §5) ------------------------------------------------------------------

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """SPEC §5: refresh the table, greedy reasoning per sample, rank all items, NDCG/Hit@5/10/20.

        Metrics are named `eval_<split>_ndcg@10` for a dict of splits (the default: valid, test),
        and, as in Trainer, `<metric_key_prefix>_ndcg@10` for one dataset, whose reasoning file
        takes the prefix as its split name."""
        model = self.model
        start = time.perf_counter()
        self.refresh_item_table(model)
        datasets = eval_dataset if isinstance(eval_dataset, dict) else (
            {None: eval_dataset} if eval_dataset is not None else self.eval_dataset
        )
        metrics = {}
        for split, dataset in datasets.items():
            figures, records = self.evaluate_split(model, dataset, split or metric_key_prefix)
            prefix = f"{metric_key_prefix}_{split}" if split else metric_key_prefix
            metrics.update({f"{prefix}_{name}": value for name, value in figures.items()})
            self._save_reasoning(records, split or metric_key_prefix)
        metrics[f"{metric_key_prefix}_seconds"] = time.perf_counter() - start
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def evaluate_split(self, model, dataset, split: str):
        """SPEC §5 on one split (its first --max_eval_samples).  -> metrics, records (see `recommend`)."""
        count = len(dataset) if self.args.max_eval_samples is None else min(len(dataset), self.args.max_eval_samples)
        records = self.recommend_rows(model, dataset, split, list(range(count)), EVAL_TOP_ITEMS)
        return split_metrics(records), records

    def recommend_rows(self, model, dataset, split: str, rows: list[int], top_k: int) -> list[dict]:
        """`recommend` for `rows` of one split, shared across processes.  -> their records, in `rows`' order.

        Where decoding replays a graph per batch shape, a split's last, partial batch (after whole
        ones) repeats its last row up to the batch size: one more shape would cost a capture (a
        compilation with --compile_rollouts) and a decode state kept on the GPU for the rest of the run.
        """
        size = self.args.per_device_eval_batch_size
        records, ok = [], True
        with self.accelerator.split_between_processes(rows, apply_padding=True) as my_rows:
            batches = [my_rows[i:i + size] for i in range(0, len(my_rows), size)]
            if len(batches) > 1 and replays_graphs(self.args.device):
                batches[-1] += batches[-1][-1:] * (size - len(batches[-1]))
            try:
                for batch in tqdm(batches, desc=split, disable=not self.is_local_process_zero() or len(batches) < 2,
                                  leave=False):
                    records += self.recommend(model, [dataset[i] for i in batch], batch, split, top_k)
            except torch.OutOfMemoryError:
                ok = False
        if not self._every_process_ok(ok):  # so that none waits in the gather alone
            raise UserError(f"out of memory in the greedy reasoning of the {split} split ({size} samples per batch) "
                            "— lower the batch size (--eval_batch_size; recommend.py: --batch_size) or --max_new_tokens")
        by_row = {r["row"]: r for r in gather_object(records)}  # padding repeats a row
        return [by_row[row] for row in rows]

    def recommend(self, model, samples: list[dict], rows: list[int], split: str, top_k: int) -> list[dict]:
        """SPEC §3 inference for a batch: greedy reasoning, h_u, every item scored and ranked.

        -> one record per sample, row `rows[i]` of `split`: its user, target item and the target's
        rank among the unseen items (1 = best; None when it was bought before), the reasoning (`<answer>` included) and its length
        in tokens, and the `top_k` unseen items, best first, with their titles and scores.
        """
        greedy = SamplingConfig(max_new_tokens=self.sampling.max_new_tokens, greedy=True)
        rollouts = self.rollout(model, samples, greedy, 1)
        scores = self.masked_scores(rollouts.user_states, samples)  # (B, I), history and pad at -inf
        targets = self.target_ids(samples)  # (B,)
        ranks = target_rank(scores, targets).tolist()
        top_scores, top_ids = top_items(scores, targets, top_k)  # (B, K)
        lengths = rollouts.completion_mask.sum(1).tolist()
        texts = reasoning_texts(self.processing_class, rollouts)
        return [
            {"row": row, "split": split, "user_id": sample["user_id"], "target_item_id": sample["item_id"],
             "target_rank": int(rank) if math.isfinite(rank) else None, "reasoning": text, "reasoning_tokens": length,
             "top_k": [{"item_id": item, "title": self.item_titles[item], "score": score}
                       for item, score in zip(ids, values)
                       if score != -math.inf]}  # fewer unseen items than K: masked ones are no recommendation
            for row, sample, rank, text, length, ids, values in zip(
                rows, samples, ranks, texts, lengths, top_ids.tolist(), top_scores.tolist())
        ]

    # -- helpers -------------------------------------------------------------------------------

    def _trajectory_inputs(self, rollouts: Rollouts, rows):
        """`shared_prompt_forward`'s inputs for the trajectories `rows`: each of their users' prompt
        once, their reasonings trimmed to the longest.  -> prompt ids and mask (U, P), reasoning ids
        and mask (M, C), each reasoning's prompt row."""
        rows = rows.tolist()
        owners = [row // self.args.group_size for row in rows]  # rollouts repeat each prompt G times
        users = list(dict.fromkeys(owners))  # in order of appearance
        prompt_rows = [user * self.args.group_size for user in users]
        completion_len = int(rollouts.completion_mask[rows].sum(1).max())
        return (rollouts.prompt_ids[prompt_rows], rollouts.prompt_mask[prompt_rows],
                rollouts.completion_ids[rows, :completion_len], rollouts.completion_mask[rows, :completion_len],
                [users.index(owner) for owner in owners])

    def _average_over_processes(self, means: dict[str, float]) -> dict[str, float]:
        """Each key's mean over the processes that recorded it."""
        per_process = gather_object([means])  # [means] itself with one process
        keys = sorted(set().union(*per_process))
        return {key: sum(m[key] for m in per_process if key in m) / sum(key in m for m in per_process) for key in keys}

    def _gather_keeping_grad(self, local: torch.Tensor) -> torch.Tensor:
        """All processes' rows, detached, with this process's own rows kept live.  (R, D) -> (W·R, D)."""
        if self.accelerator.num_processes == 1:
            return local
        everything = gather(local.detach().contiguous())  # (W·R, D)
        start = self.accelerator.process_index * len(local)
        return torch.cat([everything[:start], local, everything[start + len(local):]])

    @contextlib.contextmanager
    def _timed(self, stage: str):
        """Record the wall time of a stage as `time/<stage>_s` (device work included)."""
        synchronize = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        synchronize()
        start = time.perf_counter()
        yield
        synchronize()
        self._record(**{f"time/{stage}_s": time.perf_counter() - start})

    def _record(self, **values):
        for key, value in values.items():
            self._metrics[key].append(torch.as_tensor(value, dtype=torch.float32, device=self.args.device).detach())

    def _check_finite(self, value: torch.Tensor, what: str):
        if not self._every_process_ok(torch.isfinite(value.detach()).all()):
            raise SkipStep(f"non-finite {what} on some process")

    def _every_process_ok(self, ok: bool | torch.Tensor) -> bool:
        """Whether every process is ok, known to all of them: a collective every process must reach."""
        flag = torch.as_tensor(ok, dtype=torch.float32, device=self.args.device).reshape(1)
        return bool(gather(flag).min() == 1)

    def _agree_to_continue(self, ok: bool | torch.Tensor, reason: str = ""):
        """All processes learn whether any of them failed, so none waits in a collective alone."""
        if not self._every_process_ok(ok):
            raise SkipStep(reason if not ok else "another process failed this step")

    def _skip_step(self, model, reason: str, last_batch_of_step: bool) -> torch.Tensor:
        """Drop this optimizer step's gradients, its earlier batches' too, and skip its later batches.

        Not syncing gradients at the step's last batch skips the optimizer step (it also skips
        parameters without a gradient).
        """
        if not self._skipping_step:
            warnings.warn(f"step {self.state.global_step}: skipped — {reason}", RuntimeWarning, stacklevel=2)
            self._record(skipped_steps=1.0)
        self._skipping_step = not last_batch_of_step
        self._buffer = None
        if self.is_deepspeed_enabled:
            _drop_zero_gradients(self.model_wrapped)
        else:
            model.zero_grad(set_to_none=True)
        self.accelerator.gradient_state._set_sync_gradients(False)
        return torch.zeros((), device=self.args.device)  # logged as 0: a NaN would stay in Trainer's running sum

    def _save_reasoning(self, records: list[dict], split: str):
        if not self.is_world_process_zero():
            return
        path = reasoning_file(self.args.output_dir, self.state.global_step, split)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_jsonl(path, records)

