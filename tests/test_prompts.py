"""prompts.py: rendered prompts, chat formats, `<answer>` stop sequences and length limits."""
import pytest
from transformers import AutoTokenizer

from prompts import (
    ANSWER,
    answer_stop,
    category_words,
    chat_prompt,
    format_elapsed,
    item_prompt,
    item_prompt_tokens,
    item_sequence,
    user_prompt,
    user_prompt_tokens,
)
from tests.backbones import FAMILIES, tiny_backbone

T = 1_700_000_000_000  # target time, ms
SAMPLE = {
    "history_item_title": ["Too Old", "Yamaha Pacifica Electric Guitar", "Ernie Ball Regular Slinky Strings",
                           "Snark Clip-On Tuner"],
    "history_rating": [1.0, 5.0, 4.0, 3.0],
    "history_timestamp": [T - 40 * 86_400_000, T - 275_400_000, T - 7_380_000, T - 300_000],
    "timestamp": T,
}
ITEM = {"item_id": 3, "title": "Snark Clip-On Tuner", "average_rating": 4.6, "rating_number": 1523,
        "description": ["Second paragraph.", "First paragraph."]}

CHAT = {  # each family's real format around the user turn "Hi"
    "qwen2": "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
             "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "gemma2": "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    "llama": "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
             "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def tokenizer(family):
    return AutoTokenizer.from_pretrained(tiny_backbone(family))


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


LLAMA31_SYSTEM_HEADER = (  # the date logic of Llama 3.1+'s chat template, shortened
    "{%- if not date_string is defined %}{%- if strftime_now is defined %}"
    "{%- set date_string = strftime_now('%d %b %Y') %}{%- else %}{%- set date_string = '26 Jul 2024' %}"
    "{%- endif %}{%- endif %}<|im_start|>system\nToday Date: {{ date_string }}<|im_end|>\n"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}<|im_start|>assistant\n"
)


def test_a_template_that_writes_todays_date_gets_a_fixed_one():
    tokenizer = AutoTokenizer.from_pretrained(tiny_backbone("qwen2"))
    tokenizer.chat_template = LLAMA31_SYSTEM_HEADER
    assert chat_prompt(tokenizer, "Hi") == ("<|im_start|>system\nToday Date: 26 Jul 2024<|im_end|>\n"
                                            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant")


def test_category_words():
    assert category_words("Video_Games") == ("video games", "video game")
    assert category_words("CDs_and_Vinyl") == ("CDs and vinyl", "CD or vinyl")
    assert category_words("Musical_Instruments") == ("musical instruments", "musical instrument")
    assert category_words("Books") == ("books", "book")
    assert category_words("Movies_and_TV") == ("movies and TV", "movies and TV product")
    assert category_words("Electronics") == ("electronics", "electronics product")
    assert category_words("Subscription_Boxes") == ("subscription boxes", "subscription box")
    assert category_words("Pet_Supplies") == ("pet supplies", "pet supplies product")
    assert category_words("Gift_Cards") == ("gift cards", "gift card")


def test_format_elapsed():
    assert format_elapsed(3 * 86400 + 4.5 * 3600) == "3d 4.5h ago"
    assert format_elapsed(2 * 3600 + 3 * 60) == "2h 3.0min ago"
    assert format_elapsed(300) == "5.0min ago"
    assert format_elapsed(86400) == "1d 0.0h ago"
    assert format_elapsed(0) == "0.0min ago"
    # rounding carries into the next unit instead of printing 60 minutes or 24 hours
    assert format_elapsed(3599.99) == "1h 0.0min ago"
    assert format_elapsed(7199.99) == "2h 0.0min ago"
    assert format_elapsed(86399.99) == "1d 0.0h ago"
    assert format_elapsed(2 * 86400 - 1) == "2d 0.0h ago"
    assert format_elapsed(6 * 3600 + 24.65 * 60) == "6h 24.7min ago"  # halves round up
    assert format_elapsed(3 * 86400 + 20.45 * 3600) == "3d 20.5h ago"


def test_user_prompt_keeps_the_last_window_oldest_first():
    assert user_prompt(SAMPLE, "Musical_Instruments", window_size=3) == (
        "Here is a user's purchase history of musical instruments. Analyse it in depth: what the user likes, "
        "how their taste has changed over time, and what they may want next. Finally, recommend the next "
        "musical instrument the user is likely to buy, written inside <answer> and </answer>, for example "
        "<answer>a product</answer>.\n"
        "The history follows, oldest first, each with the user's rating out of 5:\n"
        "3d 4.5h ago: [Yamaha Pacifica Electric Guitar] (5.0)\n"
        "2h 3.0min ago: [Ernie Ball Regular Slinky Strings] (4.0)\n"
        "5.0min ago: [Snark Clip-On Tuner] (3.0)"
    )


def test_item_prompt_reverses_the_description():
    assert item_prompt(ITEM, "CDs_and_Vinyl") == (
        "Summarise the key attributes of the following CD or vinyl in a few words, written inside "
        "<answer> and </answer>.\n"
        "Title: Snark Clip-On Tuner\nUser Rating: 4.6\nNumber of Buyers: 1523\n"
        "Description: First paragraph. Second paragraph."
    )


def test_item_prompt_cuts_the_description_at_100_words():
    words = [f"w{i}" for i in range(150)]
    item = dict(ITEM, description=[" ".join(words[75:]), " ".join(words[:75])])
    assert item_prompt(item, "Video_Games").endswith("\nDescription: " + " ".join(words[:100]) + "...")
    assert item_prompt(dict(ITEM, description=[]), "Video_Games").endswith("\nDescription: ")
    exactly_100 = dict(ITEM, description=[" ".join(words[:100])])
    assert item_prompt(exactly_100, "Video_Games").endswith(" ".join(words[:100]))  # no "..." at 100
    one_more = dict(ITEM, description=[" ".join(words[:101])])
    assert item_prompt(one_more, "Video_Games").endswith(" ".join(words[:100]) + "...")


def test_chat_formats(family, tokenizer):
    assert chat_prompt(tokenizer, "Hi") == CHAT[family]
    assert item_sequence(tokenizer, "Hi") == CHAT[family] + ANSWER
    assert tokenizer.decode(ids(tokenizer, CHAT[family])) == CHAT[family]  # one BOS, no more


def first_stop(stop, tokens):
    """(index of the token that ends the reasoning, its replacement) by the rule, or None."""
    return next(((end, stop.match(tokens[:end + 1])) for end in range(len(tokens))
                 if stop.match(tokens[:end + 1]) is not None), None)


@pytest.mark.parametrize("before,after", [
    ("", ""), (" ", ""), ("\n", ""), (".", ""), (":", ""),  # the contexts the patterns come from
    ("?", ""), (")", ""), ('"', ""), ("**", ""), ("\n\n", ""),  # BPE merges '?<', ')<', ...
    ("", "[Snark Tuner]</answer>"), ("", "\nSnark"), ("", '"Snark"'), ("", "(Snark)"), (".", " Snark"),  # '>[', ...
])
def test_answer_stop_ends_at_the_first_answer_marker(tokenizer, before, after):
    """However BPE splits the text around it, the reasoning ends at its first `<answer>`, cut
    back to the marker itself: the decoded reasoning is the text up to and including it."""
    stop = answer_stop(tokenizer)
    reasoning = "I pick a tuner" + before + ANSWER
    generated = ids(tokenizer, chat_prompt(tokenizer, "Hi") + reasoning + after)
    start = len(ids(tokenizer, chat_prompt(tokenizer, "Hi")))
    end, replacement = first_stop(stop, generated[start:])
    kept = generated[start:start + end] + [replacement]
    assert tokenizer.decode(kept) == reasoning
    assert tokenizer.decode(list(stop.forced)) == ANSWER


@pytest.mark.parametrize("before", ["", " ", "?", "\n"])
def test_a_reasoning_cut_inside_the_marker_gets_only_its_rest(tokenizer, before):
    """A reasoning whose budget ends after `<` (alone or merged with the text before it, as
    '?<') or after the forced stop's first tokens is completed to one `<answer>`, not two."""
    stop = answer_stop(tokenizer)
    reasoning = "I pick a tuner" + before
    cut = ids(tokenizer, reasoning + "<")
    assert stop.written_prefix(cut) == 1
    assert tokenizer.decode(cut + list(stop.forced[1:])) == reasoning + ANSWER
    assert stop.written_prefix(ids(tokenizer, reasoning)) == 0
    for k in range(len(stop.forced)):
        tokens = ids(tokenizer, reasoning) + list(stop.forced[:k])
        assert stop.written_prefix(tokens) == k
        assert tokenizer.decode(tokens + list(stop.forced[k:])) == reasoning + ANSWER


@pytest.mark.parametrize("text", ["I pick a tuner < answer>", "I pick <answer", "<answe r>", "the answer> is"])
def test_answer_stop_ignores_text_without_the_marker(tokenizer, text):
    assert first_stop(answer_stop(tokenizer), ids(tokenizer, text)) is None


def test_long_prompts_lose_their_oldest_history_lines(tokenizer):
    sample = dict(SAMPLE, history_item_title=[f"Guitar model number {i}" for i in range(4)])
    full = user_prompt_tokens(tokenizer, user_prompt(sample, "Video_Games"))
    cut = user_prompt_tokens(tokenizer, user_prompt(sample, "Video_Games"), max_tokens=len(full) - 1)
    assert cut == ids(tokenizer, chat_prompt(tokenizer, user_prompt(sample, "Video_Games", window_size=3)))
    for window in (2, 1):  # a limit that fits exactly `window` lines keeps them all, and no more
        fits = ids(tokenizer, chat_prompt(tokenizer, user_prompt(sample, "Video_Games", window_size=window)))
        assert user_prompt_tokens(tokenizer, user_prompt(sample, "Video_Games"), max_tokens=len(fits)) == fits


def test_long_items_lose_description_words(tokenizer):
    item = dict(ITEM, description=[" ".join(["wordy"] * 90)])
    full = item_prompt_tokens(tokenizer, item, "Video_Games")
    cut = item_prompt_tokens(tokenizer, item, "Video_Games", max_tokens=len(full) - 20)
    assert len(cut) <= len(full) - 20 and cut[-len(ids(tokenizer, ANSWER)):] == ids(tokenizer, ANSWER)
    assert "wordy..." in tokenizer.decode(cut)
    # 20 tokens too many, so 20 words fewer (each word is at least one token): 70 of the 90 kept
    assert cut == ids(tokenizer, item_sequence(tokenizer, item_prompt(item, "Video_Games", 70)))
    assert tokenizer.decode(cut).count("wordy") == 70
