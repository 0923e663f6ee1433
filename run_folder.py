"""A run's folder: what a run writes there, what a fresh run refuses or replaces, what a resume
checks before any work, and the run record recommend.py serves a run from.

A folder holds one run: its checkpoint-* folders, the final adapter and tokenizer, its logs and
records (RUN_OUTPUTS). A fresh run refuses a folder holding another run unless told to replace
it, and always one holding what a run would overwrite or mix with (a model, a dataset, code); a
resume must keep the method, LoRA shape, data order, dataset and backbone of its checkpoint.
"""
import contextlib
import fcntl
import fnmatch
import glob
import os
import re
import shutil
import zipfile

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from dataset import (catalogue_digest, catalogue_titles, is_dataset, load_dataset_dir, preprocess_record,
                     preprocessed_anew)
from errors import UserError, folder_problem, missing_path, one_line, read_json, shown_briefly, write_json
from paths import resolve_model
from trainer import RecPOConfig

CHECKPOINT_NAME = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-\d+")  # the folders Trainer saves
RUN_RECORD = "r2ec_run.json"  # what recommend.py needs: in the output folder and in every checkpoint
RUN_SETTINGS = ("window_size", "max_new_tokens", "reasoning", "similarity_type", "tau", "max_prompt_tokens",
                "max_item_tokens", "bf16")
METHOD_SETTINGS = ("reasoning", "similarity_type", "tau")  # of RUN_SETTINGS, what a resume must keep
RUN_OUTPUTS = ("checkpoint-*", "runs", "reasoning", RUN_RECORD, "trainer_state.json", "*_results.json",
               "training_args.bin", "training_curves.png", "adapter_*", "README.md", "tokenizer*", "*.jinja",
               "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
               "global_step*", "latest", "zero_to_fp32.py", "emissions.csv")  # what a run writes, ZeRO-3's too
WRITTEN_BEFORE_A_SAVE = ("runs", "reasoning")  # a run killed before its first checkpoint leaves only these
OTHER_CONTENT = ("config.json", "*.safetensors", "dataset_dict.json", "preprocess.json", ".git", "*.py",  # not a run's
                 "pyvenv.cfg", ".bashrc", ".profile", ".ssh")  # a virtual environment's, a home folder's


def check_output_dir(config: RecPOConfig) -> str | None:
    """Fail before any work when the run's folder cannot be written, holds another run, or a
    resume has nothing whole to read; returns the checkpoint folder to resume from (None: a
    fresh run)."""
    folder = os.path.abspath(config.output_dir)
    problem = folder_problem(folder)
    if problem:
        raise UserError(f"--output_dir {config.output_dir} {problem} — pass a folder you can write to")
    if config.process_index == 0:  # the one process that holds the folder while its run trains
        check_not_in_use(folder, config.output_dir)
    if is_checkpoint(folder):
        raise UserError(f"--output_dir {config.output_dir} is a checkpoint of the run in {os.path.dirname(folder)} — "
                        "pass that folder as --output_dir with --resume_from_checkpoint last to continue the run, "
                        "or pick another --output_dir")
    resume = config.resume_from_checkpoint
    if resume in ("last", "latest", "True", "true"):
        resume = get_last_checkpoint(folder) if os.path.isdir(folder) else None
        if resume is None and os.path.isdir(folder) and killed_run_logs(folder):
            raise UserError(f"no checkpoint-* folder in {config.output_dir!r} to resume from: its run was stopped "
                            "before its first save (only runs/ and reasoning/ remain) — start it afresh: drop "
                            "--resume_from_checkpoint and pass --overwrite_output_dir True")
        if resume is None:
            raise UserError(f"no checkpoint-* folder in {config.output_dir!r} to resume from — drop "
                            "--resume_from_checkpoint or pass a checkpoint folder")
    elif resume is not None and not os.path.exists(resume):
        raise UserError(f"--resume_from_checkpoint {missing_path(resume)} does not exist — pass a checkpoint-* folder "
                        "of a run, or 'last' for the newest one in --output_dir")
    elif resume is not None and not os.path.isdir(resume):
        raise UserError(f"--resume_from_checkpoint {resume!r} is a file — pass the checkpoint-* folder that holds it")
    elif resume is not None and not CHECKPOINT_NAME.fullmatch(folder_name(resume)):
        raise UserError(f"--resume_from_checkpoint {resume!r} is not a checkpoint folder (checkpoint-N) — pass "
                        "a checkpoint-* folder or 'last'")
    if resumes_in_place(config, resume) and config.overwrite_output_dir:
        raise UserError(f"--resume_from_checkpoint continues the run in {config.output_dir}, and "
                        "--overwrite_output_dir would replace it — pass only one of them")
    if resume is not None:
        check_checkpoint(resume, config)
    if not resumes_in_place(config, resume):
        check_no_clash(folder, config.output_dir)
    if not resumes_in_place(config, resume) and earlier_run(folder) and not config.overwrite_output_dir:
        raise UserError(f"--output_dir {config.output_dir} holds an earlier run — continue it with "
                        "--resume_from_checkpoint last, pick another --output_dir (RUN_NAME for launch_train.sh), "
                        "or pass --overwrite_output_dir True to replace it")
    if not resumes_in_place(config, resume) and killed_run_logs(folder) and not config.overwrite_output_dir:
        raise UserError(f"--output_dir {config.output_dir} holds the logs (runs/, reasoning/) of a run killed before "
                        "its first checkpoint, which the new run's would mix with — pass --overwrite_output_dir True "
                        "to replace them, or pick another --output_dir")
    return resume


def check_not_in_use(folder: str, given: str):
    """No train.py run is training in `folder` now (see `in_use`): a second one would delete or mix
    with its files."""
    if os.path.isdir(folder):
        os.close(lock_folder(folder, fcntl.LOCK_SH, given))


@contextlib.contextmanager
def in_use(folder: str, holder: bool):
    """While the block runs, `folder` is marked in use by this run: its process 0 (`holder`) holds
    an exclusive lock on the folder, which the process's end releases too (also when killed)."""
    if not holder:
        yield
        return
    os.makedirs(folder, exist_ok=True)
    descriptor = lock_folder(folder, fcntl.LOCK_EX, folder)  # refused: another run started since the check
    try:
        yield
    finally:
        os.close(descriptor)


def lock_folder(folder: str, kind: int, given: str) -> int:
    """An open descriptor of `folder` holding a `kind` flock on it (none where the file system has no
    locks, as some NFS setups); closing it releases the lock. Held by another run: refused."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, kind | fcntl.LOCK_NB)
    except BlockingIOError as e:
        os.close(descriptor)
        raise UserError(f"--output_dir {given} is in use by a train.py run that is still training — wait for it to "
                        "end or stop it, or pick another --output_dir") from e
    except OSError:
        pass
    return descriptor


def is_checkpoint(folder: str) -> bool:
    """Whether `folder` is a checkpoint-N folder a run saved."""
    return (CHECKPOINT_NAME.fullmatch(folder_name(folder)) is not None
            and os.path.isfile(os.path.join(folder, "trainer_state.json")))


def folder_name(path: str) -> str:
    """The last part of a folder path or hub id, trailing slash or not."""
    return os.path.basename(os.path.normpath(path))


def resumes_in_place(config: RecPOConfig, resume: str | None) -> bool:
    """Whether the run continues from a checkpoint of its own --output_dir (not another run's)."""
    return resume is not None and os.path.dirname(os.path.realpath(resume)) == os.path.realpath(config.output_dir)


def checkpoint_step(folder: str) -> int | None:
    """N of a checkpoint-N folder; None for any other name."""
    return int(folder_name(folder).split("-")[1]) if CHECKPOINT_NAME.fullmatch(folder_name(folder)) else None


def checkpoint_folders(folder: str) -> list[str]:
    return glob.glob(os.path.join(glob.escape(folder), "checkpoint-*"))  # a folder name may hold [ ] * ?


def is_run_output(path: str) -> bool:
    """Whether a run writes an entry of this name at its folder's top level (hidden ones aside)."""
    name = folder_name(path)
    return not name.startswith(".") and any(fnmatch.fnmatch(name, pattern) for pattern in RUN_OUTPUTS)


def in_a_run(path: str) -> bool:
    """Whether `path` is a run's own file, or lies in one of its folders (reasoning/, checkpoint-*/)."""
    path = os.path.realpath(path)  # a link to reasoning/ leads into the run too
    while os.path.dirname(path) != path:
        if is_run_output(path) and earlier_run(os.path.dirname(path)):
            return True
        path = os.path.dirname(path)
    return False


def clashing_files(folder: str) -> list[str]:
    """Entries of `folder` that a run would overwrite or mix with: a model, a dataset (also one a
    data root holds) or code (`--output_dir .` had PEFT's model card written over the repository's
    README.md), and, where
    no earlier run wrote them, the names a run writes. Other files (a log, recommend.py's output)
    are left alone, and kept when an earlier run is replaced."""
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    earlier = earlier_run(folder)
    other_content = [name for name in names if (any(fnmatch.fnmatch(name, pattern) for pattern in OTHER_CONTENT)
                                                 or is_dataset(os.path.join(folder, name))) and not is_run_output(name)]
    log_folders = {name for name in WRITTEN_BEFORE_A_SAVE if os.path.isdir(os.path.join(folder, name))}
    unclaimed_run_names = [] if earlier else [name for name in names if is_run_output(name) and name not in log_folders]
    return sorted(other_content + unclaimed_run_names)


def check_no_clash(folder: str, given: str):
    """A fresh run (train.py or the quick start) must not go where `clashing_files` finds anything."""
    clashing = clashing_files(folder)
    if clashing:
        raise UserError(f"--output_dir {given} holds {', '.join(clashing[:3])}{', ...' if len(clashing) > 3 else ''}, "
                        "not an earlier run's, which the run would overwrite or mix with — pick a new or empty folder")


def clear_earlier_run(folder: str):
    """--overwrite_output_dir: remove what the earlier run wrote (the names of RUN_OUTPUTS; other
    files stay), also when it was killed before its first save (`killed_run_logs`), so that `last`,
    checkpoint rotation, curves.py, TensorBoard and recommend.py (which refuses a folder without a
    run record until the new run completes it) never see a mix of two runs. Called once the new
    run is built, so a bad flag or backbone leaves the earlier run whole."""
    for path in [os.path.join(folder, name) for name in os.listdir(folder) if is_run_output(name)]:
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
        except OSError as e:
            raise UserError(f"--overwrite_output_dir: cannot remove {path} of the earlier run ({one_line(e)}) — "
                            "remove it yourself or pick another --output_dir") from e


def killed_run_logs(folder: str) -> bool:
    """Whether `folder` holds what a run killed before its first save leaves, and nothing else in
    those folders: TensorBoard event files under runs/, evaluation records reasoning/step*_*.jsonl."""
    logs = {"runs": "events.out.tfevents.*", "reasoning": "step*_*.jsonl"}
    files = [(file, pattern) for name, pattern in logs.items()
             for _, _, names in os.walk(os.path.join(folder, name)) for file in names]
    return bool(files) and all(fnmatch.fnmatch(file, pattern) for file, pattern in files)


def earlier_run(folder: str) -> bool:
    saved = [os.path.join(folder, name) for name in ("trainer_state.json", RUN_RECORD)]
    return any(map(os.path.exists, saved)) or bool(checkpoint_folders(folder))


TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"  # pickle protocol 2, torch's MAGIC_NUMBER
RESUME_ELSEWHERE = "resume from another checkpoint-* folder, or start afresh in another --output_dir"
TRAINER_STATE_FIELDS = {  # what Trainer reads from trainer_state.json, some only after a step: (what it is, test)
    "global_step": ("a step number", lambda value: type(value) is int),
    "log_history": ("a list of log entries", lambda value: isinstance(value, list)
                    and all(isinstance(entry, dict) for entry in value)),
    "best_metric": ("a number or null", lambda value: value is None or type(value) in (int, float)),
    "best_model_checkpoint": ("a folder or null", lambda value: value is None or isinstance(value, str)),
    "stateful_callbacks": ("an object of callback states", lambda value: isinstance(value, dict)),
}


def check_checkpoint(checkpoint: str, config: RecPOConfig):
    """The checkpoint's LoRA shape, method settings, data order and backbone are this run's, and its
    saved state is whole, so resuming cannot switch method, retrain samples or fail halfway."""
    check_checkpoint_settings(checkpoint, config)
    check_checkpoint_state(checkpoint, config)


def without_incomplete(checkpoint: str) -> str:
    """The fix for a checkpoint whose save was cut short: resume from the one before, if any."""
    step = checkpoint_step(checkpoint)
    others = checkpoint_folders(os.path.dirname(os.path.abspath(checkpoint)))
    if step is not None and any((checkpoint_step(other) or step) < step for other in others):
        return "delete it and resume from the checkpoint before it"
    return ("delete it and start the run afresh (no checkpoint came before it): drop --resume_from_checkpoint and "
            "pass --overwrite_output_dir True")


def check_checkpoint_settings(checkpoint: str, config: RecPOConfig):
    """What the checkpoint was trained with (its trainer state, adapter config and run record)
    against this run's flags."""
    fix = RESUME_ELSEWHERE
    if not os.path.isfile(os.path.join(checkpoint, "trainer_state.json")):
        raise UserError(f"{checkpoint} is incomplete (no trainer_state.json: its save was cut short) — "
                        f"{without_incomplete(checkpoint)}")
    state = read_json(os.path.join(checkpoint, "trainer_state.json"), fix)
    for key, (what, holds) in TRAINER_STATE_FIELDS.items():
        if key in state and not holds(state[key]):
            raise UserError(f"{checkpoint}/trainer_state.json's {key} {shown_briefly(state[key])} is not {what} — "
                            f"{fix}")
    step = state.get("global_step", 0)
    if 0 < config.max_steps <= step:  # the Trainer would still train one more step
        steps = f"{step} step{'s' * (step != 1)}"
        raise UserError(f"{checkpoint} has already trained {steps}, --max_steps {config.max_steps} — raise "
                        "--max_steps to continue")
    adapter = read_json(os.path.join(checkpoint, "adapter_config.json"), fix)
    saved_and_given = {  # flag: (the checkpoint's value, this run's)
        "lora_r": (adapter.get("r"), config.lora_r),
        "lora_alpha": (adapter.get("lora_alpha"), config.lora_alpha),
        "lora_target_modules": (",".join(sorted(adapter.get("target_modules") or [])), ",".join(sorted(config.lora_targets))),
    }
    record_path = os.path.join(checkpoint, RUN_RECORD)
    run_folder = os.path.dirname(os.path.abspath(checkpoint))
    if os.path.isfile(record_path):
        record = read_json(record_path, fix)
    elif any(os.path.isfile(os.path.join(folder, RUN_RECORD)) for folder in [run_folder, *checkpoint_folders(run_folder)]):
        raise UserError(f"{checkpoint} is incomplete (no {RUN_RECORD}, which its run writes last into each "
                        f"checkpoint: its save was cut short) — {without_incomplete(checkpoint)}")
    else:
        record = {}  # a checkpoint of an older version, whose runs wrote no record
    for flag in METHOD_SETTINGS:  # a resume must not switch method halfway (length limits may change)
        if flag in record:
            saved_and_given[flag] = (record[flag], getattr(config, flag))
    for flag, (saved, given) in saved_and_given.items():
        if saved != given:
            raise UserError(f"{checkpoint} was trained with --{flag} {saved}, not {given} — resume with --{flag} {saved}")
    saved_order, order = record.get("data_order"), data_order(config)
    if isinstance(saved_order, dict) and saved_order != order and not config.ignore_data_skip:
        changed = ", ".join(f"{key} {saved_order.get(key)}, not {value}" for key, value in order.items()
                            if saved_order.get(key) != value)
        raise UserError(f"{checkpoint} was trained with {changed}: the resume would skip the wrong samples of its epoch "
                        "— resume with the same --train_batch_size × --gradient_accumulation_steps × processes, "
                        "--num_iterations and --seed, or pass --ignore_data_skip True to start the epoch's order afresh")
    trained_on_data = record.get("dataset_dir")
    moved_or_other = isinstance(trained_on_data, str) and config.dataset_dir
    if moved_or_other and folder_name(trained_on_data) != folder_name(config.dataset_dir):
        raise UserError(f"{checkpoint} was trained on the dataset {trained_on_data}, not {config.dataset_dir} — resume "
                        "with that --dataset_dir (moved: keep its folder name)")
    if record.get("catalogue") and config.dataset_dir:
        check_same_catalogue(checkpoint, record, config)
    if config.dataset_dir:  # the catalogue's, then the samples
        check_same_samples(checkpoint, record, config)
    trained_on, backbone = adapter.get("base_model_name_or_path"), resolve_model(config.model)
    if trained_on and folder_name(trained_on) != folder_name(backbone):  # the backbone may sit elsewhere now
        raise UserError(f"{checkpoint} was trained on {trained_on}, not {backbone} — resume with that --model "
                        "(moved: keep its folder name)")


def check_same_samples(checkpoint: str, record: dict, config: RecPOConfig):
    """The dataset is still the one preprocess.py wrote when the checkpoint trained: run again into
    the same folder (another --window_size, newer reviews) it holds other samples."""
    changed = preprocessed_anew(record.get("preprocess"), preprocess_record(config.dataset_dir))
    if changed:
        raise UserError(f"the dataset {config.dataset_dir} was preprocessed anew since {checkpoint} trained on it "
                        f"({'; '.join(changed)}) — rerun preprocess.py into it with the settings of then, or start "
                        "a fresh run with --overwrite_output_dir True")


def check_same_catalogue(checkpoint: str, record: dict, config: RecPOConfig):
    """The dataset holds the catalogue the checkpoint was trained on: datasets of one folder name
    (the sample's and the full category's, preprocessed into two roots) differ in their items."""
    dataset, _ = load_dataset_dir(config.dataset_dir, config.dataset_category)
    titles = catalogue_titles(dataset["item_info"])
    if catalogue_digest(titles) != record["catalogue"]:
        raise UserError(f"{checkpoint} was trained on another catalogue ({record.get('items')} items) than the "
                        f"dataset {config.dataset_dir} holds ({len(titles) - 1} items, or other titles) — resume "
                        f"with the --dataset_dir it was trained on, {record.get('dataset_dir')}")


def check_checkpoint_state(checkpoint: str, config: RecPOConfig):
    """The adapter weights and the optimizer and scheduler state (DeepSpeed's, or Trainer's files)
    are there, and every state file torch saved (random generators' too) is whole."""
    fix = RESUME_ELSEWHERE
    try:
        from safetensors import safe_open

        with safe_open(os.path.join(checkpoint, "adapter_model.safetensors"), "pt"):
            pass
    except Exception as e:  # missing, truncated or not safetensors: the library raises several kinds
        raise UserError(f"{checkpoint}'s adapter weights cannot be read ({one_line(e)}) — {fix}") from e
    # Without its optimizer and scheduler state Trainer would resume with fresh ones, silently.
    optimizer = os.path.join(checkpoint, "optimizer.pt")
    deepspeed_state = bool(glob.glob(os.path.join(glob.escape(checkpoint), "global_step*")))  # DeepSpeed's own folder
    if deepspeed_state and not config.deepspeed:
        raise UserError(f"{checkpoint} was saved under DeepSpeed — resume with --deepspeed ds_config.json "
                        "(launch_train.sh passes it)")
    if config.deepspeed and not deepspeed_state and os.path.exists(optimizer):
        raise UserError(f"{checkpoint} was saved without DeepSpeed — resume without --deepspeed")
    if config.deepspeed:
        missing = [] if deepspeed_state else ["global_step*"]
    else:
        missing = [name for name in ("optimizer.pt", "scheduler.pt") if not os.path.exists(os.path.join(checkpoint, name))]
    if missing:
        raise UserError(f"{checkpoint} lacks {', '.join(missing)}, the optimizer and learning-rate state — {fix}")
    saved_states = [os.path.join(checkpoint, name) for name in ("optimizer.pt", "scheduler.pt")]
    saved_states += glob.glob(os.path.join(glob.escape(checkpoint), "rng_state*.pth"))  # one per process
    saved_states += glob.glob(os.path.join(glob.escape(checkpoint), "global_step*", "*.pt"))
    for path in saved_states:
        if os.path.exists(path) and not saved_by_torch(path):
            raise UserError(f"{path} is truncated or corrupt — {fix}")


def saved_by_torch(path: str) -> bool:
    """Whether `path` is a whole file torch.save wrote: a zip archive whose entries all match their
    checksums (bytes damaged inside, not only a cut), or the older pickle format (DeepSpeed writes
    it with "checkpoint_serialization": false) which opens with torch's magic number."""
    with open(path, "rb") as f:
        if f.read(len(TORCH_LEGACY_MAGIC)) == TORCH_LEGACY_MAGIC:
            return True
        try:
            with zipfile.ZipFile(f) as archive:
                for entry in archive.infolist():
                    if entry.CRC or not entry.file_size:  # torch.serialization.set_crc32_options(False): none
                        with archive.open(entry) as data:  # its reading checks the checksum at the end
                            while data.read(2**20):
                                pass
        except (zipfile.BadZipFile, OSError, EOFError):
            return False
        return True


def run_processes(config: RecPOConfig) -> int:
    """The run's processes: this launch's, or the ones launch_train.sh starts after its --check_only."""
    return int(os.environ.get("R2EC_PROCESSES", config.world_size))


def data_order(config: RecPOConfig) -> dict:
    """What decides which samples each step trains: a resume skips the samples of the steps done."""
    samples_per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps * run_processes(config)
    return {"samples_per_step": samples_per_step, "num_iterations": config.num_iterations, "seed": config.seed}


def run_record(config: RecPOConfig, category: str, item_titles: list[str]) -> dict:
    """The run record recommend.py rebuilds a run's inference from: backbone, dataset and its catalogue
    (`item_titles` in id order), prompt and score settings, precision."""
    model_path = resolve_model(config.model)
    return {"model": config.model, "model_path": os.path.abspath(model_path) if os.path.isdir(model_path) else model_path,
            "dataset_dir": os.path.abspath(config.dataset_dir), "category": category,
            "items": len(item_titles) - 1, "catalogue": catalogue_digest(item_titles),
            "preprocess": preprocess_record(config.dataset_dir),
            **{key: getattr(config, key) for key in RUN_SETTINGS}, "data_order": data_order(config)}


class RecordInCheckpoints(TrainerCallback):
    """Writes the run record into every checkpoint, so each one can be served without the run finishing."""

    def __init__(self, record: dict):
        self.record = record

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:  # process 0, or each node's first with --save_on_each_node
            write_json(os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}", RUN_RECORD),
                       self.record)
