"""recommend.py on a tiny trained run: its top-K against a ranking computed here by hand, the
JSON-lines schema, `--evaluate` against the per-sample ranks and train.py's own final evaluation,
and one-line errors for bad input."""
import contextlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from datasets import load_from_disk

import recommend
from dataset import catalogue_digest
from errors import run_cli
from metrics import ranking_metrics
from model import end_of_turn_ids, load_backbone, policy_forward
from prompts import answer_stop, item_prompt_tokens, user_prompt, user_prompt_tokens
from rollouts import SamplingConfig, generate_rollouts
from trainer import RecPOConfig
from tests.backbones import tiny_backbone
from tests.tiny_data import tiny_dataset
from tests.tiny_run import CATEGORY, ROOT, trained_run

SHOWN_ROWS = (3, 0, 1, 0)  # records come in the order asked, repeats included; row 3 is bought before


def run_recommend(*flags) -> str:
    """recommend.py's main in this process (no second model import); returns what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        run_cli(recommend.main, [*flags, "--device", "cpu"])
    return printed.getvalue()


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return trained_run(tmp_path_factory)


@pytest.fixture(scope="module")
def dataset(run_dir):
    with open(os.path.join(run_dir, "r2ec_run.json")) as f:
        return load_from_disk(json.load(f)["dataset_dir"])


@pytest.fixture(scope="module")
def shown(run_dir, tmp_path_factory):
    """Printed text and JSON records of SHOWN_ROWS of the test split."""
    output = tmp_path_factory.mktemp("shown") / "shown.jsonl"
    printed = run_recommend("--output_dir", run_dir, "--split", "test", "--samples", *map(str, SHOWN_ROWS),
                            "--output", str(output))
    return printed, read_jsonl(output)


def assert_ranked_by_hand(run_dir, dataset, records, window_size=20, score=None):
    """Each record's reasoning, top-10 and target rank equal those computed here: greedy reasoning
    after the user prompt of `window_size` history items, then `score(user, items)` (default
    cosine / τ = 0.02) with the history and pad item masked."""
    from peft import PeftModel

    score = score or (lambda user, items: (F.normalize(user, dim=-1) @ F.normalize(items, dim=-1).T)[0] / 0.02)
    base, tokenizer = load_backbone(tiny_backbone("qwen2"), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, run_dir).eval()
    with torch.no_grad():
        items = torch.cat([
            policy_forward(model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), 0)[1]
            for ids in (item_prompt_tokens(tokenizer, item, CATEGORY) for item in dataset["item_info"])
        ])  # (I, D), item_info rows are in item-id order
        for record in records:
            sample = dataset["test"][record["row"]]
            prompt = torch.tensor([user_prompt_tokens(tokenizer, user_prompt(sample, CATEGORY, window_size))])  # (1, P)
            rollout = generate_rollouts(model, prompt, torch.ones_like(prompt), 1, SamplingConfig(8, greedy=True),
                                        answer_stop(tokenizer, end_of_turn_ids(model, tokenizer)),
                                        tokenizer.pad_token_id)
            reasoning = rollout.completion_ids[:, rollout.completion_mask[0].bool()]  # (1, C)
            assert tokenizer.decode(reasoning[0], skip_special_tokens=True) == record["reasoning"]
            ids = torch.cat([prompt, reasoning], 1)  # (1, P + C)
            user = policy_forward(model, ids, torch.ones_like(ids), reasoning.shape[1])[1]  # (1, D)
            scores = score(user, items)  # (I,)
            scores[[0, *sample["history_item_id"]]] = float("-inf")
            order = scores.argsort(descending=True)[:10]
            assert [item["item_id"] for item in record["top_k"]] == order.tolist()
            torch.testing.assert_close(torch.tensor([item["score"] for item in record["top_k"]]), scores[order],
                                       rtol=1e-4, atol=1e-3)
            bought_before = sample["item_id"] in sample["history_item_id"]
            assert record["target_rank"] == (None if bought_before else int((scores >= scores[sample["item_id"]]).sum()))


def test_top_k_equals_a_ranking_computed_by_hand(run_dir, dataset, shown):
    assert_ranked_by_hand(run_dir, dataset, shown[1])


def test_the_run_record_s_prompt_and_score_settings_are_the_ones_served(run_copy, dataset, tmp_path):
    """A run recorded with a window of 2 history items and dot-product scores is served with them."""
    folder, run = run_copy
    assert (run["window_size"], run["similarity_type"]) == (20, "cosine")
    (folder / "r2ec_run.json").write_text(json.dumps({**run, "window_size": 2, "similarity_type": "dot"}))
    output = tmp_path / "served.jsonl"
    run_recommend("--output_dir", str(folder), "--split", "test", "--samples", "0", "1", "--output", str(output))
    assert_ranked_by_hand(folder, dataset, read_jsonl(output), window_size=2,
                          score=lambda user, items: (user @ items.T)[0])


@pytest.mark.parametrize("flag, recorded_bf16, device, expected", [
    ("auto", True, "cpu", (torch.bfloat16, True)),  # as training evaluated: bf16 weights under autocast
    ("auto", False, "cuda", (torch.float32, False)),
    ("auto", None, "cuda", (torch.bfloat16, False)),  # a record from before precision was kept
    ("auto", None, "cpu", (torch.float32, False)),
    ("float32", True, "cuda", (torch.float32, False)),
    ("bfloat16", False, "cpu", (torch.bfloat16, False)),  # bf16 weights, but the run never used autocast
    ("bfloat16", True, "cpu", (torch.bfloat16, True)),
])
def test_dtype_flag_against_the_run_s_precision(flag, recorded_bf16, device, expected):
    run = {} if recorded_bf16 is None else {"bf16": recorded_bf16}
    assert recommend.precision(types.SimpleNamespace(dtype=flag), run, device) == expected


def test_json_lines_schema(dataset, shown):
    records = shown[1]
    assert [r["row"] for r in records] == list(SHOWN_ROWS)
    for record in records:
        sample = dataset["test"][record["row"]]
        assert set(record) == {"user_id", "split", "row", "target_item_id", "target_rank", "reasoning",
                               "reasoning_tokens", "top_k"}
        assert (record["user_id"], record["split"], record["target_item_id"]) == (
            sample["user_id"], "test", sample["item_id"])
        assert record["reasoning"].endswith("<answer>")
        assert (record["target_rank"] is None) == (record["row"] == 3)  # test row 3 is bought before
        assert record["target_rank"] is None or 1 <= record["target_rank"] <= 16
        assert len(record["top_k"]) == 10
        for item in record["top_k"]:
            assert set(item) == {"item_id", "title", "score"} and isinstance(item["score"], float)
            assert item["title"] == dataset["item_info"][item["item_id"]]["title"]
            assert item["item_id"] not in [0, *sample["history_item_id"]]
        scores = [item["score"] for item in record["top_k"]]
        assert scores == sorted(scores, reverse=True)


def test_printout_shows_history_reasoning_top_k_and_the_target(dataset, shown):
    printed, records = shown
    for record in records:
        sample = dataset["test"][record["row"]]
        assert all(title in printed for title in sample["history_item_title"])
        assert record["reasoning"] in printed
        if record["target_rank"] is not None:
            assert f"rank {record['target_rank']} of 16" in printed
        if record["target_rank"] is not None and record["target_rank"] <= 10:
            assert f"*{record['target_rank']:>3}. " in printed


def test_printout_shows_only_the_history_lines_the_prompt_held(dataset, shown):
    _, records = shown
    record = next(r for r in records if len(dataset["test"][r["row"]]["history_item_title"]) >= 2)
    sample = dataset["test"][record["row"]]
    titles = sample["history_item_title"]
    text = recommend.format_sample(sample, record, 16, window_size=1)
    history = text.split("reasoning:")[0]
    assert f"(1 of {len(titles)} items" in history and titles[-1] in history
    assert sum(line.startswith("  (") for line in history.splitlines()) == 1


def test_printout_of_a_target_bought_before(dataset, shown):
    printed, records = shown
    record = records[0]  # test row 3: its target is its first history item
    sample = dataset["test"][record["row"]]
    assert record["target_item_id"] == sample["history_item_id"][0] and record["target_rank"] is None
    assert all(item["item_id"] != record["target_item_id"] for item in record["top_k"])
    last_lines = [block.strip().splitlines()[-1] for block in printed.split("== test row ")[1:]]
    assert [line.endswith("not ranked: bought before, and history items are never recommended (a miss in every "
                          "metric)") for line in last_lines] == [True, False, False, False]
    assert sum(" of 16" in line for line in last_lines) == 3


def test_evaluate_table_matches_the_per_sample_ranks_and_training(run_dir, tmp_path):
    output = tmp_path / "eval.jsonl"
    printed = run_recommend("--output_dir", run_dir, "--split", "test", "--evaluate", "--output", str(output))
    table = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in printed.splitlines()
             if line.startswith(("NDCG", "Hit"))}
    records = read_jsonl(output)
    assert len(records) == 4 and "4 samples, mean reasoning length 8.0 tokens" in printed
    assert [r["target_rank"] is None for r in records] == [False, False, False, True]  # a miss at every k
    expected = ranking_metrics(torch.tensor([math.inf if r["target_rank"] is None else r["target_rank"]
                                             for r in records]))
    assert table["Hit"][2] == pytest.approx(0.75)  # 16 items, so every ranked target is in the top 20
    with open(os.path.join(run_dir, "final_results.json")) as f:
        trained = json.load(f)  # train.py's last evaluation, same weights, same 4 test samples
    for label, name in (("NDCG", "ndcg"), ("Hit", "hit")):
        for value, k in zip(table[label], (5, 10, 20)):
            assert value == pytest.approx(expected[f"{name}@{k}"], abs=5e-5)
            assert value == pytest.approx(trained[f"eval_test_{name}@{k}"], abs=5e-5)


@pytest.mark.parametrize("deepspeed", [[], ["--deepspeed", os.path.join(ROOT, "ds_config.json")]],
                         ids=["plain", "deepspeed"])
def test_a_bf16_run_is_served_as_training_evaluated_it(tmp_path_factory, tmp_path, deepspeed):
    """bf16 training evaluates under accelerate's bf16 autocast with float32 LoRA weights (DeepSpeed:
    bf16 weights, no autocast): recommend.py runs bf16 weights under bf16 autocast, and repeats
    the run's last evaluation to the last bit."""
    run = trained_run(tmp_path_factory, "--bf16", "True", *deepspeed)
    output = tmp_path / "test.jsonl"
    run_recommend("--output_dir", run, "--split", "test", "--evaluate", "--max_samples", "4", "--batch_size", "4",
                  "--output", str(output))
    assert read_jsonl(output) == read_jsonl(os.path.join(run, "reasoning", "step1_test.jsonl"))


def test_rows_by_user_and_by_max_samples(dataset):
    test = dataset["test"]
    by_user = recommend.parse_args(["--output_dir", "x", "--user_id", test[2]["user_id"]])
    assert recommend.pick_rows(test, "test", by_user) == [2]
    capped = recommend.parse_args(["--output_dir", "x", "--evaluate", "--max_samples", "3"])
    assert recommend.pick_rows(test, "test", capped) == [0, 1, 2]


@pytest.fixture
def no_adapter(run_dir, tmp_path):
    folder = tmp_path / "no_adapter"
    folder.mkdir()
    (folder / "r2ec_run.json").write_text(open(os.path.join(run_dir, "r2ec_run.json")).read())
    return str(folder)


@pytest.mark.parametrize("flags, message", [
    (["--output_dir", "/nonexistent/run"], "does not exist"),
    (["--output_dir", "NO_ADAPTER"], "no LoRA adapter"),
    (["--output_dir", "EARLY"], "holds only the logs of a run that has saved no checkpoint yet (still running, or "
                                "stopped before its first save) — wait for its first checkpoint"),
    (["--output_dir", "KILLED"], "holds no final model (the run stopped before its end, or its final save was cut "
                                 "short) — pass its latest complete checkpoint: --output_dir KILLED/checkpoint-8"),
    (["--output_dir", "KILLED/checkpoint-12"], "no LoRA adapter (adapter_config.json)"),
    (["--output_dir", "CUT_SHORT"], "holds no final model and its checkpoints were cut short (checkpoint-4) — "
                                    "re-run train.py"),
    (["--output_dir", "NO_RECORD"], "no r2ec_run.json in 'NO_RECORD' or its parent — train.py writes it into each "
                                    "checkpoint and the finished run's folder: pass one of those"),
    (["--output_dir", "RUN/r2ec_run.json"], "r2ec_run.json' is a file — pass the folder of a train.py run"),
    (["--output_dir", "RUN", "--split", "dev"], "choose one of train, valid, test"),
    (["--output_dir", "RUN", "--samples", "0", "4"], "--samples 4: the test split has 4 samples"),
    (["--output_dir", "RUN", "--split", "valid", "--user_id", "U999"], "user 'U999' has no sample in the valid"),
    (["--output_dir", "RUN", "--max_samples", "3"], "--max_samples 3 only applies with --evaluate"),
    (["--output_dir", "RUN", "--top_k", "ten"], "argument --top_k: invalid int value: 'ten'"),
    (["--output_dir", "RUN", "--top_k", "0"], "error: --top_k 0: must be at least 1"),
    (["--output_dir", "RUN", "--batch_size", "-2"], "error: --batch_size -2: must be at least 1"),
    (["--output_dir", "RUN", "--batch_size", str(10**20)],  # was blamed on r2ec_run.json's eval batch size
     f"error: --batch_size {10**20}: too large (the most is 2**63 - 1)"),
    (["--output_dir", "RUN", "--evaluate", "--max_samples", str(2**63)], f"error: --max_samples {2**63}: too large"),
])
def test_bad_input_gives_one_line(run_dir, no_adapter, tmp_path, capsys, flags, message):
    killed = tmp_path / "killed"  # stopped before train.py wrote the final model, and during checkpoint-12's save
    for step in (4, 8, 12):
        (killed / f"checkpoint-{step}").mkdir(parents=True)
        if step < 12:
            for name in ("adapter_config.json", "adapter_model.safetensors", "r2ec_run.json"):
                (killed / f"checkpoint-{step}" / name).write_text("{}")
    (killed / "adapter_model.safetensors").write_text("")  # the final save began (a full disk cut it short)
    (tmp_path / "cut_short" / "checkpoint-4").mkdir(parents=True)
    no_record = tmp_path / "no_record"  # an adapter copied out of its run
    no_record.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (no_record / name).write_text("{}")
    early = tmp_path / "early" / "runs" / "Dec02_10-00-00"  # TensorBoard's logs come before any save
    early.mkdir(parents=True)
    (early / "events.out.tfevents.1764669600.host").write_bytes(b"")
    folders = {"RUN": run_dir, "NO_ADAPTER": no_adapter, "KILLED": str(killed), "EARLY": str(tmp_path / "early"),
               "CUT_SHORT": str(tmp_path / "cut_short"), "NO_RECORD": str(no_record)}
    flags = [folders.get(flag, flag.replace("RUN/", run_dir + "/").replace("KILLED/", f"{killed}/")) for flag in flags]
    message = message.replace("KILLED", str(killed)).replace("NO_RECORD", str(no_record))
    with pytest.raises(SystemExit) as exit_info:
        run_recommend(*flags)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith("error: ") and message in error[-1], error


def test_command_line_error_has_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "recommend.py"), "--output_dir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no LoRA adapter" in lines[0], lines


@pytest.fixture
def run_copy(run_dir, tmp_path):
    """A copy of the run's adapter folder whose r2ec_run.json a test may rewrite; -> (folder, run dict)."""
    folder = tmp_path / "run_copy"
    shutil.copytree(run_dir, folder, ignore=shutil.ignore_patterns("checkpoint-*", "reasoning", "runs"))
    with open(folder / "r2ec_run.json") as f:
        return folder, json.load(f)


def assert_one_line_error(capsys, flags: list, *parts: str):
    """recommend exits 2 and its last stderr line is `error: ...` holding every one of `parts`."""
    with pytest.raises(SystemExit) as exit_info:
        run_recommend(*flags)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith("error: ") and all(part in error[-1] for part in parts), error


@pytest.mark.parametrize("content, message", [
    ('{"model": "x", "category": ', "is not readable JSON"),  # truncated
    ("[1, 2]", "holds a JSON list"),
    ("DROP category", "has no category"),
    ("DROP model dataset_dir", "has no model, dataset_dir"),
])
def test_corrupt_run_file_gives_one_line(run_copy, capsys, tmp_path, content, message):
    folder, run = run_copy
    if content.startswith("DROP"):
        content = json.dumps({k: v for k, v in run.items() if k not in content.split()[1:]})
    (folder / "r2ec_run.json").write_text(content)
    output = tmp_path / "ranks.jsonl"
    assert_one_line_error(capsys, ["--output_dir", str(folder), "--output", str(output)],
                          str(folder / "r2ec_run.json"), message, "re-run train.py")
    assert not output.exists()


@pytest.mark.parametrize("setting, message", [
    ({"window_size": 2.5}, "window_size 2.5 is not int"),
    ({"tau": "0.02"}, "tau '0.02' is not float"),
    ({"window_size": True}, "window_size True is not int"),
    ({"window_size": 0}, "holds a bad setting (--window_size 0: must be at least 1"),
    ({"max_prompt_tokens": 10}, "r2ec_run.json's max_prompt_tokens 10 cannot hold the"),
    ({"model": "no-such-model", "model_path": None}, "the run's recorded model_path None is gone too"),
])
def test_bad_setting_in_the_run_file_gives_one_line(run_copy, capsys, setting, message):
    folder, run = run_copy
    (folder / "r2ec_run.json").write_text(json.dumps({**run, **setting}))
    assert_one_line_error(capsys, ["--output_dir", str(folder)], message)


def test_training_settings_added_to_the_run_file_play_no_part_in_serving(run_copy):
    """Only what train.py records is read: a hand-added deepspeed or fsdp made the trainer raise."""
    folder, run = run_copy
    (folder / "r2ec_run.json").write_text(json.dumps({**run, "deepspeed": "ds_config.json", "fsdp": "full_shard",
                                                      "learning_rate": "1e-5", "window_size": 3}))
    edited = recommend.parse_run_file(str(folder / "r2ec_run.json"))  # a setting never read is not type-checked
    args = types.SimpleNamespace(output_dir=str(folder), dataset_dir=None, batch_size=5)
    config = recommend.inference_config(args, edited, device="cpu", autocast=False)
    assert (config.deepspeed, config.fsdp, config.learning_rate) == (None, None, RecPOConfig.learning_rate)
    assert (config.window_size, config.tau, config.per_device_eval_batch_size) == (3, run["tau"], 5)


def test_a_run_trained_without_reasoning_is_served_without_it(run_copy, tmp_path):
    folder, run = run_copy
    assert run["reasoning"] is True
    (folder / "r2ec_run.json").write_text(json.dumps({**run, "reasoning": False}))
    output = tmp_path / "ranks.jsonl"
    run_recommend("--output_dir", str(folder), "--split", "test", "--samples", "0", "1", "--output", str(output))
    assert [record["reasoning"] for record in read_jsonl(output)] == ["<answer>", "<answer>"]


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "adapter_model.safetensors").write_bytes(b"\x10\x00"), "the adapter in"),
    (lambda f: (f / "adapter_config.json").write_text("{not json"), "the adapter in"),
    (lambda f: (f / "adapter_model.safetensors").unlink(), "lacks the adapter's weights (adapter_model.safetensors;"),
    (lambda f: [os.remove(f / name) for name in os.listdir(f) if name.startswith(("tokenizer", "chat_template"))],
     "the tokenizer in"),
    (lambda f: os.remove(f / "tokenizer.json"), "turns text into no tokens"),
    (lambda f: (f / "tokenizer_config.json").write_text("[1]"), "the tokenizer in"),
    (lambda f: (f / "chat_template.jinja").write_text("{% if %}"), "chat template of '"),  # a jinja2 traceback before
    (lambda f: (f / "chat_template.jinja").write_text(""), "has no chat template (chat_template.jinja)"),
    (lambda f: (f / "chat_template.jinja").write_text("{{ bos_token }}"), "leaves out the user's message"),
])
def test_damaged_run_folder_gives_one_line(run_copy, capsys, tmp_path, damage, message):
    folder, _ = run_copy
    damage(folder)
    output = tmp_path / "ranks.jsonl"
    assert_one_line_error(capsys, ["--output_dir", str(folder), "--output", str(output)], message, "re-run train.py")
    assert not output.exists()


def test_a_dataset_with_another_catalogue_is_served_with_a_warning(run_copy, capsys, tmp_path):
    """The run records its catalogue (16 items of tiny_data); the same samples with one item's title
    changed, or one item more, are another catalogue: served (items are encoded from their text),
    with a warning. A record without one (older runs) is served without."""
    folder, run = run_copy
    assert (run["items"], run["catalogue"]) == (16, catalogue_digest(list(tiny_dataset()["item_info"]["title"])))
    output = tmp_path / "ranks.jsonl"
    for name, change in [("renamed", lambda titles: titles[:5] + ["Another game"] + titles[6:]),
                         ("grown", lambda titles: titles + ["One more game"])]:
        dataset = tiny_dataset()
        titles = change(list(dataset["item_info"]["title"]))
        items = dataset["item_info"].select([i % len(dataset["item_info"]) for i in range(len(titles))])
        dataset["item_info"] = items.map(lambda item, i: {"item_id": i, "title": titles[i]}, with_indices=True)
        dataset_dir = tmp_path / name / "Video_Games_0_2022-10-2023-10"
        dataset.save_to_disk(str(dataset_dir))
        (dataset_dir / "preprocess.json").write_text(json.dumps({"users": 50}))  # not also "preprocessed anew"
        (folder / "r2ec_run.json").write_text(json.dumps({**run, "preprocess": {"users": 5000}}))
        run_recommend("--output_dir", str(folder), "--dataset_dir", str(dataset_dir), "--samples", "0", "--output",
                      str(output))
        warning = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
        assert warning == [f"warning: the dataset {str(dataset_dir)!r} holds another catalogue ({len(titles) - 1} items, "
                           "titles not all the same) than the run was trained on (16 items) — fine if meant; else pass "
                           "the dataset it was trained on as --dataset_dir"]
        assert len(read_jsonl(output)) == 1
    run_recommend("--output_dir", str(folder), "--samples", "0")
    assert "warning: " not in capsys.readouterr().err  # its own dataset
    (folder / "r2ec_run.json").write_text(json.dumps({k: v for k, v in run.items() if k not in ("items", "catalogue")}))
    run_recommend("--output_dir", str(folder), "--dataset_dir", str(dataset_dir), "--samples", "0")
    assert "warning: " not in capsys.readouterr().err


def test_the_runs_dataset_preprocessed_anew_is_served_with_a_warning(run_copy, capsys, tmp_path):
    """A dataset of the run's dataset's folder name whose preprocess.json differs from the one the
    run recorded was preprocessed again (here with another --window_size): served, with a warning.
    A dataset of another name is another dataset by choice, and an older run recorded nothing."""
    folder, run = run_copy
    (folder / "r2ec_run.json").write_text(json.dumps({**run, "preprocess": {"K": 0, "window_size": 20, "train": 8}}))
    for name in ("Video_Games_0_2022-10-2023-10", "Video_Games_0_2023-1-2023-10"):
        tiny_dataset().save_to_disk(str(tmp_path / name))
        (tmp_path / name / "preprocess.json").write_text(json.dumps({"K": 0, "window_size": 10, "train": 8}))
    same_name = tmp_path / "Video_Games_0_2022-10-2023-10"
    run_recommend("--output_dir", str(folder), "--dataset_dir", str(same_name), "--samples", "0")
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert warnings == [f"warning: the dataset {str(same_name)!r} was preprocessed anew since the run trained on it "
                        "(window_size 20, now 10) — fine if meant; else rerun preprocess.py into it with the "
                        "settings of then"]
    run_recommend("--output_dir", str(folder), "--dataset_dir", str(tmp_path / "Video_Games_0_2023-1-2023-10"),
                  "--samples", "0")
    assert "warning: " not in capsys.readouterr().err
    (folder / "r2ec_run.json").write_text(json.dumps(run))
    run_recommend("--output_dir", str(folder), "--dataset_dir", str(same_name), "--samples", "0")
    assert "warning: " not in capsys.readouterr().err


def test_a_run_file_the_user_cannot_read_gives_one_line(run_copy, capsys, monkeypatch):
    folder, _ = run_copy
    access = os.access  # as root (the tests' usual user) every file is readable: the check is patched
    monkeypatch.setattr(os, "access", lambda path, mode, **kwargs: (
        not str(path).endswith("adapter_model.safetensors") and access(path, mode, **kwargs)))
    assert_one_line_error(capsys, ["--output_dir", str(folder)],
                          f"{folder / 'adapter_model.safetensors'} is not readable by you (permission denied)",
                          f"chmod -R a+rX {folder}")


def test_a_run_whose_dataset_is_gone_names_the_record_and_the_flag(run_copy, capsys, tmp_path):
    folder, run = run_copy
    (folder / "r2ec_run.json").write_text(json.dumps({**run, "dataset_dir": str(tmp_path / "moved")}))
    assert_one_line_error(capsys, ["--output_dir", str(folder)], f"the run's dataset {str(tmp_path / 'moved')!r} "
                          "(in its r2ec_run.json) is gone — pass its new place as --dataset_dir")


@pytest.mark.parametrize("output, message", [
    ("MISSING/ranks.jsonl", "does not exist"),
    ("FOLDER", "is a folder"),
])
def test_bad_output_path_fails_before_the_model_loads(run_dir, tmp_path, capsys, monkeypatch, output, message):
    monkeypatch.setattr(recommend, "load_recommender", lambda *a: pytest.fail("the model was loaded"))
    output = output.replace("MISSING", str(tmp_path / "missing")).replace("FOLDER", str(tmp_path))
    assert_one_line_error(capsys, ["--output_dir", run_dir, "--output", output], f"--output {output!r}", message)
    assert os.listdir(tmp_path) == []


def test_output_that_is_a_link_a_pipe_or_one_of_the_run_s_files_is_refused(run_dir, tmp_path, capsys, monkeypatch):
    """The write renames a new file into place: it would have replaced a link or a pipe, or the run's
    own r2ec_run.json (the run then unusable)."""
    monkeypatch.setattr(recommend, "load_recommender", lambda *a: pytest.fail("the model was loaded"))
    (tmp_path / "target").write_text("keep")
    os.symlink(tmp_path / "target", tmp_path / "link")
    os.mkfifo(tmp_path / "pipe")
    for name in ("link", "pipe"):
        assert_one_line_error(capsys, ["--output_dir", run_dir, "--output", str(tmp_path / name)],
                              "is a link or a special file, which the write would replace")
    assert os.path.islink(tmp_path / "link") and (tmp_path / "target").read_text() == "keep"
    record = os.path.join(run_dir, "r2ec_run.json")
    before = open(record).read()
    assert_one_line_error(capsys, ["--output_dir", run_dir, "--output", record], "is one of a run's own files")
    assert open(record).read() == before
    evaluation = os.path.join(run_dir, "reasoning", "step1_test.jsonl")
    before = open(evaluation).read()
    os.symlink(os.path.join(run_dir, "reasoning"), tmp_path / "records")
    for path in (evaluation, str(tmp_path / "records" / "step1_test.jsonl")):
        assert_one_line_error(capsys, ["--output_dir", run_dir, "--output", path], "is one of a run's own files")
    assert open(evaluation).read() == before
    (tmp_path / "dataset_dict.json").write_text("{}")  # a dataset's file, the repository's README.md, ...
    assert_one_line_error(capsys, ["--output_dir", run_dir, "--output", str(tmp_path / "dataset_dict.json")],
                          "exists and is no .jsonl file, which recommend.py writes")
    assert (tmp_path / "dataset_dict.json").read_text() == "{}"
    assert_one_line_error(capsys, ["--output_dir", run_dir, "--output", ""], "--output is empty")
    assert_one_line_error(capsys, ["--output_dir", run_dir, "--output", "\t"], "--output is blank ('\\t')")
    assert_one_line_error(capsys, ["--output_dir", run_dir, "--dataset_dir", ""], "--dataset_dir is empty (an unset "
                          "variable?) — pass a dataset folder, or leave the flag out")  # was: the run's dataset


def test_the_printout_alone_goes_to_stdout(run_dir, tmp_path):
    """`recommend.py ... | head -1` shows the first sample's header, not a library's notice, and
    the reader leaving early costs neither the --output file nor a traceback."""
    output, errors = tmp_path / "ranks.jsonl", tmp_path / "stderr.txt"
    with open(errors, "w") as stderr_file, subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "recommend.py"), "--output_dir", run_dir, "--samples", "0", "1",
             "--device", "cpu", "--output", str(output)], cwd=ROOT, text=True, stdout=subprocess.PIPE,
            stderr=stderr_file) as process:  # a file, not a pipe: progress bars can outgrow a pipe's buffer
        first_line = process.stdout.readline()
        process.stdout.close()
    stderr = errors.read_text()
    assert process.returncode == 0 and "Traceback" not in stderr, stderr[-2000:]
    assert first_line.startswith("== test row 0 · user ")
    assert [r["row"] for r in read_jsonl(output)] == [0, 1]


def test_a_reader_that_stops_early_costs_neither_the_output_nor_a_traceback(run_dir, tmp_path, monkeypatch):
    """`recommend.py ... --output ranks.jsonl | head -1`: the reader is gone when the printout starts."""
    read_end, write_end = os.pipe()
    monkeypatch.setattr(sys, "stdout", os.fdopen(write_end, "w"))
    format_sample = recommend.format_sample

    def reader_gone(*args):
        if not gone:
            os.close(read_end)
            gone.append(read_end)
        return format_sample(*args)

    gone = []
    monkeypatch.setattr(recommend, "format_sample", reader_gone)
    output = tmp_path / "ranks.jsonl"
    records = run_cli(recommend.main, ["--output_dir", run_dir, "--samples", "0", "1", "--output", str(output),
                                       "--device", "cpu"])
    assert [r["row"] for r in records] == [0, 1] and read_jsonl(output) == records


def test_failed_write_leaves_no_file(tmp_path):
    path = tmp_path / "ranks.jsonl"
    path.write_text("earlier\n")
    with pytest.raises(TypeError):  # the second record cannot be serialised: the write stops half-way
        recommend.write_jsonl(str(path), [{"row": 0}, {"row": object()}])
    assert os.listdir(tmp_path) == ["ranks.jsonl"] and path.read_text() == "earlier\n"
    recommend.write_jsonl(str(path), [{"row": 0}])
    assert read_jsonl(path) == [{"row": 0}] and os.listdir(tmp_path) == ["ranks.jsonl"]


def test_a_model_name_that_now_resolves_to_another_backbone_is_refused(run_copy, tmp_path, capsys, monkeypatch):
    """paths.py re-pointed since training: the adapter would run on another backbone (same shapes:
    silently wrong recommendations)."""
    monkeypatch.setattr(recommend, "load_backbone", lambda *a, **k: pytest.fail("the backbone was loaded"))
    folder, run = run_copy
    other = tiny_backbone("llama")
    (folder / "r2ec_run.json").write_text(json.dumps(dict(run, model=other)))
    assert_one_line_error(capsys, ["--output_dir", str(folder)], f"was trained on {run['model_path']!r}",
                          f"now resolves to {other!r} — point paths.py's model_names")


def test_adapter_of_another_backbone_size_gives_one_line(run_copy, tmp_path, capsys):
    """The run's `model` now resolves to a backbone of another hidden size than the adapter's."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder, run = run_copy
    other = tmp_path / "elsewhere" / os.path.basename(run["model_path"])  # the backbone's folder name, moved
    shutil.copytree(tiny_backbone("qwen2"), other)  # its tokenizer; config and weights replaced
    config = AutoConfig.from_pretrained(other)
    config.hidden_size, config.intermediate_size = 32, 64
    AutoModelForCausalLM.from_config(config).save_pretrained(other)
    (folder / "r2ec_run.json").write_text(json.dumps(dict(run, model=str(other))))
    output = tmp_path / "ranks.jsonl"
    assert_one_line_error(capsys, ["--output_dir", str(folder), "--output", str(output)],
                          f"the adapter in {str(folder)!r} (trained on {str(other)!r}",
                          f"does not fit {str(other)!r} (size mismatch): that folder holds a backbone of another "
                          "size now, or the adapter_config.json was edited — point paths.py")
    assert not output.exists()
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(dict(config, r=2 * config["r"])))  # the adapter edited
    (folder / "r2ec_run.json").write_text(json.dumps(run))
    assert_one_line_error(capsys, ["--output_dir", str(folder)], "does not fit", "(size mismatch)")


def test_an_adapter_lacking_weights_gives_one_line(run_copy, tmp_path, capsys):
    """PEFT only warns about missing keys and leaves those LoRA matrices as initialised: half an
    adapter, silently. Here the file of a run that adapted the attention alone."""
    from safetensors.torch import load_file, save_file

    folder, run = run_copy
    weights = load_file(folder / "adapter_model.safetensors")
    kept = {name: tensor for name, tensor in weights.items() if "self_attn" in name}
    save_file(kept, folder / "adapter_model.safetensors")
    assert_one_line_error(capsys, ["--output_dir", str(folder)],
                          f"the adapter in {str(folder)!r} lacks {len(weights) - len(kept)} of its weights (",
                          "trained on another backbone than ", "saved from another LoRA setting, or cut short)")
