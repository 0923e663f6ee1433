"""Every string the model reads, and its token ids: user prompts, item prompts, chat templates
and the `<answer>` marker that ends a reasoning (SPEC §2).

Layout of the two sequences (the chat template is the backbone's own):

    user:  <template> user prompt <template, assistant turn opened> reasoning... <answer>
           (the rollout's completion_mask, which the token loss is taken over: 0 ... 0  1 ... 1)
    item:  <template> item prompt <template, assistant turn opened> <answer>

Both end inside the assistant turn, on `<answer>`: the rec head reads the hidden state there.
`<answer>` is plain text, not a new vocabulary token. Nothing here runs on its own; the tests
are `pytest tests/test_prompts.py`.
"""
import functools
import math
from dataclasses import dataclass

ANSWER = "<answer>"
ANSWER_CLOSE = "</answer>"

# Parameters that bound the sequences (SPEC §2)
MAX_PROMPT_TOKENS = 2048  # user prompt, template included; oldest history lines go first
MAX_ITEM_TOKENS = 768  # item sequence; the description is shortened to fit
DESCRIPTION_WORDS = 100  # description cut, then "..."
WINDOW_SIZE = 20  # history lines a user prompt shows (the dataset keeps up to preprocess.py's --window_size)

CATEGORY_WORDS = {  # (plural, singular) for the paper's categories
    "Video_Games": ("video games", "video game"),
    "CDs_and_Vinyl": ("CDs and vinyl", "CD or vinyl"),
    "Musical_Instruments": ("musical instruments", "musical instrument"),
}

USER_HEADER = (
    "Here is a user's purchase history of {plural}. Analyse it in depth: what the user likes, "
    "how their taste has changed over time, and what they may want next. Finally, recommend the "
    "next {singular} the user is likely to buy, written inside " + ANSWER + " and " + ANSWER_CLOSE
    + ", for example " + ANSWER + "a product" + ANSWER_CLOSE + ".\n"
    "The history follows, oldest first, each with the user's rating out of 5:\n"
)
HEADER_LINES = USER_HEADER.count("\n")  # history lines start after these

ITEM_TEMPLATE = (
    "Summarise the key attributes of the following {singular} in a few words, written inside "
    + ANSWER + " and " + ANSWER_CLOSE + ".\n"
    "Title: {title}\nUser Rating: {rating}\nNumber of Buyers: {buyers}\nDescription: {description}"
)


def category_words(category: str) -> tuple[str, str]:
    """(plural, singular) words for a category: the paper's three, or derived from the name.

    `Toys_and_Games` -> ("toys and games", "toys and games product"), `Books` -> ("books",
    "book"), `Subscription_Boxes` -> (..., "subscription box"): a plural `s` or `es` (after x, ch,
    sh) is dropped only from names of one or two words without "and", since guessing the singular
    of compound names ("movies and TV") or of words like "electronics" or "supplies" goes wrong
    more often than not.
    """
    if category in CATEGORY_WORDS:
        return CATEGORY_WORDS[category]
    words = [w if sum(c.isupper() for c in w) > 1 else w.lower() for w in category.split("_") if w]
    plural = " ".join(words)
    last = words[-1] if words else ""
    if len(words) <= 2 and "and" not in words:
        if last.endswith(("xes", "ches", "shes")):
            return plural, plural[:-2]
        if last.endswith("s") and not last.endswith(("ss", "ics", "us", "ies")):
            return plural, plural[:-1]
    return plural, f"{plural} product"


def format_elapsed(seconds: float) -> str:
    """Time before the target purchase: '3d 4.5h ago', '2h 3.0min ago' or '5.0min ago'.

    Rounded to the printed tenth before splitting, so 7,199.99 s reads '2h 0.0min', not '1h 60.0min'.
    """
    seconds = max(float(seconds), 0.0)
    hours, tenth_minutes = divmod(math.floor(seconds / 6 + 0.5), 600)  # tenths of a minute, half up
    if hours == 0:
        return f"{tenth_minutes / 10:.1f}min ago"
    if hours < 24:
        return f"{hours}h {tenth_minutes / 10:.1f}min ago"
    days, tenth_hours = divmod(math.floor(seconds / 360 + 0.5), 240)
    return f"{days}d {tenth_hours / 10:.1f}h ago"


def user_prompt(sample: dict, category: str, window_size: int = WINDOW_SIZE) -> str:
    """User-turn text: the instruction, then one line per history item, oldest first.

    `sample` is a preprocessed row; times are relative to the target's `timestamp` (ms).
    """
    plural, singular = category_words(category)
    titles = sample["history_item_title"][-window_size:]
    ratings = sample["history_rating"][-window_size:]
    times = sample["history_timestamp"][-window_size:]
    lines = [
        f"{format_elapsed((sample['timestamp'] - t) / 1000)}: [{title}] ({float(rating):.1f})"
        for title, rating, t in zip(titles, ratings, times)
    ]
    return USER_HEADER.format(plural=plural, singular=singular) + "\n".join(lines)


def describe(description: list[str] | None, max_words: int = DESCRIPTION_WORDS) -> str:
    """Description paragraphs reversed and joined; cut to `max_words` words plus '...'."""
    text = " ".join(reversed(description or []))
    words = text.split()
    return " ".join(words[:max_words]) + "..." if len(words) > max_words else text


def item_prompt(item: dict, category: str, max_words: int = DESCRIPTION_WORDS) -> str:
    """User-turn text of one `item_info` row: the instruction and its metadata block."""
    return ITEM_TEMPLATE.format(
        singular=category_words(category)[1],
        title=item.get("title") or "",
        rating=item.get("average_rating"),
        buyers=item.get("rating_number"),
        description=describe(item.get("description"), max_words),
    )


TEMPLATE_DATE = "26 Jul 2024"  # Llama 3.1+'s own default when it cannot read the clock


def chat_prompt(tokenizer, user_text: str) -> str:
    """The backbone's chat template around one user turn, with the assistant turn opened.

    Tokenise the result with `add_special_tokens=False`: templates that need a BOS (Gemma)
    already write it. Templates that write today's date (Llama 3.1 and later) get a fixed one,
    so a prompt is the same in training, evaluation and recommend.py on any day; the others
    ignore it.
    """
    messages = [{"role": "user", "content": user_text}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         date_string=TEMPLATE_DATE)


def item_sequence(tokenizer, user_text: str) -> str:
    """Item sequence: the assistant turn holds `<answer>`, continued rather than closed."""
    return chat_prompt(tokenizer, user_text) + ANSWER


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@dataclass(frozen=True)
class StopRule:
    """How a reasoning ends, in token ids (SPEC §2, §4.1: at `<answer>`, appended when missing).

    A row ends when its last tokens match one of `patterns`; `patterns[p][j]` holds the tokens
    allowed at position j of pattern p. The row's last token is then replaced by `last_ids[p]`
    (`>` for a sampled `>[`), so the reasoning ends exactly where the pattern's text does. A row
    that writes one of `end_ids` (its turn ends) gets `forced` from that token on, in place of
    it; so does a row still going `len(forced)` tokens before max_new_tokens (only the rest of
    `forced` when the row's last tokens begin it: `written_prefix`). Frozen and hashable: it
    keys the rollout engine's captured decode graphs.
    """

    patterns: tuple[tuple[frozenset, ...], ...]
    last_ids: tuple[int, ...]
    forced: tuple[int, ...]
    end_ids: frozenset = frozenset()

    @classmethod
    def exact(cls, sequences: list[list[int]], end_ids=()) -> "StopRule":
        """Rows end on any of these token sequences; the first of the shortest is forced."""
        patterns = tuple(tuple(frozenset([t]) for t in s) for s in sequences)
        return cls(patterns, tuple(s[-1] for s in sequences), tuple(min(sequences, key=len)), frozenset(end_ids))

    def forced_heads(self) -> tuple[frozenset, ...]:
        """For each position of `forced` but its last, the tokens that count as writing it: the
        sets of the pattern of its length that `forced` spells (so '?<' counts as the `<` of
        `<answer>`), else its own tokens alone."""
        spelled = next((p for p in self.patterns if len(p) == len(self.forced)
                        and all(t in allowed for t, allowed in zip(self.forced, p))), None)
        return tuple(spelled[j] if spelled else frozenset([t]) for j, t in enumerate(self.forced[:-1]))

    def written_prefix(self, tokens: list[int]) -> int:
        """How many first positions of `forced` (not all) `tokens` end with: a row stopped while
        writing `<answer>` is given only the rest of it, not a second whole one (`<<answer>`)."""
        heads = self.forced_heads()
        return max([k for k in range(1, len(self.forced)) if len(tokens) >= k
                    and all(t in allowed for t, allowed in zip(tokens[-k:], heads))], default=0)

    def match(self, tokens: list[int]) -> int | None:
        """`last_ids` of the first pattern that `tokens` end with, or None."""
        for pattern, last in zip(self.patterns, self.last_ids):
            tail = tokens[len(tokens) - len(pattern):]
            if len(tail) == len(pattern) and all(t in allowed for t, allowed in zip(tail, pattern)):
                return last
        return None


def answer_stop(tokenizer, end_ids=()) -> StopRule:
    """The `StopRule` of `<answer>` in this tokenizer: a reasoning ends at the first `<answer>`
    it writes, or gets it appended when its turn ends (`end_ids`) or its tokens run out.

    BPE merges the first piece of `<answer>` with the text before it ('?<', ' <') and the last
    piece with the text after it ('>[', '>\\n'). So the first position of a pattern takes every
    token whose text ends with the first piece, and the last every token whose text starts with
    the last piece. Patterns come from `<answer>` tokenised bare and after a space, a newline, a
    full stop and a colon; the bare one is forced.
    """
    raw = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))

    @functools.cache  # the contexts mostly share their pieces ('<' and '>'): one vocabulary scan each
    def tokens_whose_text(piece, test):
        candidates = [i for i, r in enumerate(raw) if r is not None and piece in r]  # cheap pre-filter
        texts = tokenizer.batch_decode([[i] for i in candidates])
        return frozenset(i for i, text in zip(candidates, texts) if test(text, piece))

    patterns, last_ids = [], []
    for context in ("", " ", "\n", ".", ":"):
        prefix, full = _ids(tokenizer, context), _ids(tokenizer, context + ANSWER)
        shared = 0
        while shared < min(len(prefix), len(full)) and prefix[shared] == full[shared]:
            shared += 1
        ids = full[shared:]
        if len(ids) == 1:  # `<answer>` is one token: only that token
            pattern = (frozenset(ids),)
        else:
            first_text, last = tokenizer.decode(ids[:1]), tokenizer.decode(ids[-1:])
            first = next((first_text[k:] for k in range(len(first_text)) if ANSWER.startswith(first_text[k:])), None)
            heads = tokens_whose_text(first, str.endswith) if first else frozenset(ids[:1])
            tails = tokens_whose_text(last, str.startswith) if last and ANSWER.endswith(last) else frozenset(ids[-1:])
            pattern = (heads, *(frozenset([t]) for t in ids[1:-1]), tails)
        if pattern not in patterns:
            patterns.append(pattern)
            last_ids.append(ids[-1])
        if context == "":
            forced = tuple(ids)
    return StopRule(tuple(patterns), tuple(last_ids), forced, frozenset(end_ids))


def user_prompt_tokens(tokenizer, user_text: str, max_tokens: int = MAX_PROMPT_TOKENS) -> list[int]:
    """Token ids of the chat-formatted user prompt, at most `max_tokens` where dropping history
    lines can get it there: the instruction is never cut (`max_tokens=0` returns it alone).

    Too long: the oldest history lines are dropped, whole, until it fits. Cutting tokens from
    the left instead would lose the instruction and the template's opening; the recent end of
    the history is what predicts the next purchase best. With windows of 20 titles of at most
    20 words (preprocessing's filter) this rarely triggers.
    """
    lines = user_text.split("\n")
    ids = _ids(tokenizer, chat_prompt(tokenizer, user_text))
    while len(ids) > max_tokens and len(lines) > HEADER_LINES:
        excess = len(ids) - max_tokens
        while excess > 0 and len(lines) > HEADER_LINES:  # drop enough lines in one go
            excess -= len(_ids(tokenizer, lines.pop(HEADER_LINES))) + 1
        ids = _ids(tokenizer, chat_prompt(tokenizer, "\n".join(lines)))
    return ids


def item_prompt_tokens(tokenizer, item: dict, category: str, max_tokens: int = MAX_ITEM_TOKENS) -> list[int]:
    """Token ids of one item sequence, at most `max_tokens` where shortening the description
    can get it there (every word is at least one token, so dropping `excess` words suffices)."""
    words = min(DESCRIPTION_WORDS, len(" ".join(item.get("description") or []).split()))
    ids = _ids(tokenizer, item_sequence(tokenizer, item_prompt(item, category, words)))
    while len(ids) > max_tokens and words > 0:
        words = max(0, words - (len(ids) - max_tokens))
        ids = _ids(tokenizer, item_sequence(tokenizer, item_prompt(item, category, words)))
    return ids


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[list[list[int]], list[list[int]]]:
    """Left-pad to the longest: (padded ids, attention mask)."""
    width = max(len(s) for s in sequences)
    ids = [[pad_id] * (width - len(s)) + list(s) for s in sequences]
    mask = [[0] * (width - len(s)) + [1] * len(s) for s in sequences]
    return ids, mask
