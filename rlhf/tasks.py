"""Tasks: where prompts come from and how responses are judged.

* `sentiment`: instructions to write a short movie review, built from templates (neutral wording: the prompt
  must not ask for a positive or negative review). Gold reward = VADER compound score of the response, in
  [-1, 1] (vaderSentiment ships its lexicon, so it runs offline).
* `imdb`: the DPO paper's controlled sentiment task. Prompts are IMDb review prefixes of 2 to 8 tokens, as plain
  text (a completion task for a base model: no chat template). Gold reward = P(positive) of the response under a
  sentiment classifier named in config (siebert/sentiment-roberta-large-english in the paper).
* `hh`: Anthropic HH-RLHF harmless-base dialogues; real human preference pairs, no gold reward.

Other prompts are rendered through the model's chat template (with a short or empty system message: every token
costs time on a CPU), so every component sees the exact same prompt string.
"""

from __future__ import annotations

import gzip
import json
import random
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from collections.abc import Callable

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from rlhf.config import PROJECT_ROOT, ModelConfig, TaskConfig
from rlhf.errors import UserError, unreadable
from rlhf.models import LOAD_ERRORS, added_special_tokens, default_device, resolve_model_path

GoldReward = Callable[[list[str]], list[float]]
PAIR_FIELDS = ("prompt", "chosen", "rejected")


@dataclass
class Task:
    name: str
    train_prompts: list[str]  # chat-templated prompt strings, what the policy is conditioned on
    eval_prompts: list[str]  # the test prompts: everything the report shows is measured on them
    gold_reward: GoldReward | None  # None: no ground truth (real human preferences)
    # Tasks with real preference data carry it; gold-reward tasks build pairs by sampling (rlhf.data).
    train_pairs: list[dict] | None = None
    heldout_pairs: list[dict] | None = None
    # Set aside for choosing hyper-parameters (`task.n_validation_prompts`), disjoint from the test prompts
    validation_prompts: list[str] = field(default_factory=list)
    validation_pairs: list[dict] | None = None
    dropped: dict[str, int] = field(default_factory=dict)  # rows dropped while parsing, by reason


def format_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict], system_prompt: str | None) -> str:
    """Render a conversation up to the assistant's turn, through the chat template where the model has one."""
    if tokenizer.chat_template:
        if system_prompt is not None:
            messages = [{"role": "system", "content": system_prompt}, *messages]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # Every stage tokenises text with the tokenizer's own special tokens, as TRL's trainers do. A template that
        # writes BOS as text, for a tokenizer that adds BOS itself (Llama 3), would then give two: leave it to the
        # tokenizer.
        bos = tokenizer.decode(added_special_tokens(tokenizer)[0])
        return text[len(bos) :] if bos and text.startswith(bos) else text
    # A base model without a template: plain "Human:/Assistant:" text, as in HH-RLHF.
    turns = "".join(f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in messages)
    return turns + "\n\nAssistant:"


# ---------------------------------------------------------------------------------------------------------------
# sentiment

_INSTRUCTIONS = [
    "Write a short review of {film}.",
    "Write a two-sentence review of {film}.",
    "Review {film} in a few sentences.",
    "You just watched {film}. Write a brief review.",
    "Give your honest opinion of {film} in a short review.",
    "Write a short movie review of {film} for a newspaper.",
    "In three sentences, review {film}.",
    "Write a quick review of {film} for a film blog.",
    "A friend asks what you thought of {film}. Write a short review.",
    "Write a brief critic's review of {film}.",
    "Share a short review of {film}.",
    "Write a short audience review of {film}.",
]
_GENRES = [
    "science-fiction",
    "romantic comedy",
    "war",
    "horror",
    "animated",
    "documentary",
    "western",
    "heist",
    "courtroom",
    "musical",
    "coming-of-age",
    "superhero",
    "noir",
    "disaster",
    "sports",
    "biographical",
    "spy",
    "fantasy",
    "period",
    "mystery",
    "road",
    "martial-arts",
    "zombie",
    "space",
    "political",
    "family",
    "crime",
    "detective",
    "survival",
    "time-travel",
]
_SUBJECTS = [
    "about a lighthouse keeper",
    "set on a night train",
    "about two rival chefs",
    "about a missing painting",
    "set in a small fishing town",
    "about a retired boxer",
    "about a family road trip",
    "set on a space station",
    "about a school orchestra",
    "about a stolen election",
    "set in a haunted hotel",
    "about a chess prodigy",
    "about twin sisters",
    "set during a blackout",
    "about a travelling circus",
    "about a city mayor",
    "set in a desert outpost",
    "about an aging rock band",
    "about a wedding gone wrong",
    "set in a submarine",
    "about a small-town sheriff",
    "about a robot butler",
    "about a lost dog",
    "set in a mountain village",
    "about a con artist",
    "about a young inventor",
    "set in a department store",
    "about a cold case",
    "about a jazz pianist",
    "set on a remote island",
    "about a soccer team",
    "about a forgotten king",
    "set in a hospital",
    "about a group of hikers",
    "about a late-night radio host",
    "set in a vineyard",
    "about a bank robbery",
    "about a ghost ship",
    "set in a boarding school",
    "about an astronaut's return",
]
_FRAMES = [
    "",
    " from the 1970s",
    " released this year",
    " by a first-time director",
    " shot in black and white",
    " with an ensemble cast",
]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def sentiment_instructions(n_train: int, n_eval: int, seed: int) -> tuple[list[str], list[str]]:
    """Distinct review instructions, drawn without replacement and split into disjoint train / eval sets."""
    space = len(_INSTRUCTIONS) * len(_GENRES) * len(_SUBJECTS) * len(_FRAMES)
    if n_train + n_eval > space:
        raise UserError(f"task: {n_train + n_eval} prompts asked for, but the templates make only {space}")
    rng = random.Random(seed)
    picks = rng.sample(range(space), n_train + n_eval)  # distinct indices -> distinct prompts
    texts = []
    for i in picks:
        i, frame = divmod(i, len(_FRAMES))
        i, subject = divmod(i, len(_SUBJECTS))
        template, genre = divmod(i, len(_GENRES))
        g = _GENRES[genre]
        film = f"{_article(g)} {g} film{_FRAMES[frame]} {_SUBJECTS[subject]}"
        texts.append(_INSTRUCTIONS[template].format(film=film))
    return texts[:n_train], texts[n_train:]


@lru_cache(maxsize=1)
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def vader_compound(texts: list[str]) -> list[float]:
    """Gold reward of the sentiment task: VADER's compound score in [-1, 1] (1 = most positive)."""
    analyzer = _vader()
    return [float(analyzer.polarity_scores(t)["compound"]) for t in texts]


# ---------------------------------------------------------------------------------------------------------------
# imdb

PREFIX_TOKENS = (2, 8)  # the DPO paper's IMDb prompts: the first 2 to 8 tokens of a review


def review_prefix(tokenizer: PreTrainedTokenizerBase, text: str, n_tokens: int) -> str:
    """The text of the first `n_tokens` tokens of `text` (no special tokens; the decoded string, exactly)."""
    ids = tokenizer(text, add_special_tokens=False).input_ids[:n_tokens]
    return tokenizer.decode(ids, clean_up_tokenization_spaces=False)


def _prefix_prompts(
    texts: list[str], n: int, tokenizer: PreTrainedTokenizerBase, rng: random.Random, dropped: dict[str, int]
) -> list[str]:
    """Up to `n` prompts, one per review in order, each cut at a token count drawn from PREFIX_TOKENS. A prefix that
    tokenises again to a count outside that range (a cut inside a word can merge differently) is dropped, counted."""
    prompts, reason = [], f"prefix re-tokenises to a length outside {PREFIX_TOKENS[0]}-{PREFIX_TOKENS[1]}"
    for text in texts:
        if len(prompts) == n:
            break
        prompt = review_prefix(tokenizer, text, rng.randint(*PREFIX_TOKENS))
        if PREFIX_TOKENS[0] <= len(tokenizer(prompt, add_special_tokens=False).input_ids) <= PREFIX_TOKENS[1]:
            prompts.append(prompt)
        else:
            dropped[reason] = dropped.get(reason, 0) + 1
    return prompts


@lru_cache(maxsize=1)
def _classifier(path: str, device: str):
    """The gold classifier and its own tokenizer, loaded once per process (data, evaluator and PPO-GT share it)."""
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except LOAD_ERRORS as e:
        raise UserError(f"task.gold_model: cannot load a sequence classifier from '{path}': {e}") from None
    tokenizer.padding_side = "right"  # positions then count from 0 in every row, whatever the model's position ids
    return model.to(device).eval(), tokenizer


@dataclass
class PositiveProbability:
    """Gold reward of the imdb task: P(positive label | response) under a sequence classifier, batched, without
    gradients, on the policy's device. The response is scored alone: the 2-8-token prompt is not the policy's."""

    path: str  # the classifier's folder or hub name
    positive: int  # index of the positive label in the classifier's logits
    batch_size: int

    @torch.inference_mode()
    def __call__(self, texts: list[str]) -> list[float]:
        model, tokenizer = _classifier(self.path, str(default_device()))
        scores = []
        for start in range(0, len(texts), self.batch_size):
            enc = tokenizer(texts[start : start + self.batch_size], padding=True, truncation=True, return_tensors="pt")
            logits = model(**enc.to(model.device)).logits.float()
            scores += logits.softmax(dim=-1)[:, self.positive].tolist()
        return scores


def positive_probability(cfg: TaskConfig, hub_access: bool) -> PositiveProbability:
    """The gold reward named by task.gold_model / task.gold_positive_label (label resolved via config.label2id)."""
    path = resolve_model_path(ModelConfig(name_or_path=cfg.gold_model), hub_access, key="task.gold_model")
    try:
        label2id = AutoConfig.from_pretrained(path).label2id  # the model itself loads at the first call
    except LOAD_ERRORS as e:
        raise UserError(f"task.gold_model: cannot read the config of '{path}': {e}") from None
    if cfg.gold_positive_label not in label2id:
        raise UserError(
            f"task.gold_positive_label: '{cfg.gold_positive_label}' is not a label of task.gold_model "
            f"'{cfg.gold_model}' (its config.label2id has {sorted(label2id)})"
        )
    return PositiveProbability(path, int(label2id[cfg.gold_positive_label]), cfg.gold_batch_size)


def load_imdb(cfg: TaskConfig, tokenizer: PreTrainedTokenizerBase, hub_access: bool) -> Task:
    """IMDb reviews (field `text`) -> prompts: train prompts from the train split, eval prompts from the test split
    where the source has one (stanfordnlp/imdb does), else from train reviews the train prompts do not use. Reviews
    are shuffled and each prefix length drawn with `task.prompt_seed`."""
    name, train_rows = read_rows(cfg.path, "task.path", hub_access, "train")
    _, test_rows = read_rows(cfg.path, "task.path", hub_access, "test", optional=True)
    rng = random.Random(cfg.prompt_seed)
    train_texts = text_field(train_rows, "text", f"{name} train")
    rng.shuffle(train_texts)
    if test_rows is None:
        eval_texts, train_texts = train_texts[: cfg.n_eval_prompts], train_texts[cfg.n_eval_prompts :]
    else:
        eval_texts = text_field(test_rows, "text", f"{name} test")
        rng.shuffle(eval_texts)
    dropped: dict[str, int] = {}
    train = _prefix_prompts(train_texts, cfg.n_train_prompts, tokenizer, rng, dropped)
    eval_ = _prefix_prompts(eval_texts, cfg.n_eval_prompts, tokenizer, rng, dropped)
    if not train or not eval_:
        raise UserError(
            f"task.path: {name} gives {len(train)} train and {len(eval_)} eval prompts; it needs reviews "
            "for both (a single file's first task.n_eval_prompts shuffled reviews are held out for eval)"
        )
    return Task(
        name="imdb",
        train_prompts=train,
        eval_prompts=eval_,
        gold_reward=positive_probability(cfg, hub_access),
        dropped=dropped,
    )


# ---------------------------------------------------------------------------------------------------------------
# hh

_HUMAN, _ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


def parse_hh_dialogue(text: str, where: str) -> list[dict]:
    """'\\n\\nHuman: ...\\n\\nAssistant: ...' -> chat messages; raises UserError naming `where` if malformed."""
    if not text.startswith(_HUMAN):
        raise UserError(f"{where}: dialogue does not start with 'Human:'")
    messages = []
    rest = text
    while rest:
        if rest.startswith(_HUMAN):
            role, rest = "user", rest[len(_HUMAN) :]
        elif rest.startswith(_ASSISTANT):
            role, rest = "assistant", rest[len(_ASSISTANT) :]
        else:
            raise UserError(f"{where}: expected a 'Human:' or 'Assistant:' turn at {rest[:40]!r}")
        cut = [i for i in (rest.find(_HUMAN), rest.find(_ASSISTANT)) if i >= 0]
        end = min(cut) if cut else len(rest)
        messages.append({"role": role, "content": rest[:end].strip()})
        rest = rest[end:]
    return messages


def split_hh_pair(row: dict, where: str) -> tuple[list[dict], str, str]:
    """One HH row -> (dialogue before the final assistant turn, chosen reply, rejected reply)."""
    for key in ("chosen", "rejected"):
        if not isinstance(row.get(key), str):
            raise UserError(f"{where}: field '{key}' is missing or not a string")
    chosen, rejected = parse_hh_dialogue(row["chosen"], where), parse_hh_dialogue(row["rejected"], where)
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise UserError(f"{where}: the dialogue must end with an assistant turn")
    if chosen[:-1] != rejected[:-1]:
        raise UserError(f"{where}: chosen and rejected do not share the dialogue before the final reply")
    if chosen[-1]["content"] == rejected[-1]["content"]:
        raise UserError(f"{where}: chosen and rejected replies are identical")
    if not chosen[-1]["content"] or not rejected[-1]["content"]:
        raise UserError(f"{where}: a reply is empty")
    return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]


def _read_jsonl(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of every line of a .jsonl or .jsonl.gz file; a line that is not UTF-8, or a gzip file
    cut short, is an error naming it."""
    opener = gzip.open if path.suffix == ".gz" else open
    lines = []
    try:
        with opener(path, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                try:
                    lines.append((line_no, raw.decode("utf-8")))
                except UnicodeDecodeError as e:
                    raise unreadable(f"{path.name} line {line_no}", e) from None
    except (OSError, EOFError, zlib.error) as e:
        raise unreadable(path.name, e) from None
    return lines


def _split(name: str, pairs: list[dict], dropped: dict[str, int], cfg: TaskConfig) -> Task:
    """Shuffle pairs deterministically and split them into held-out (eval) and train pairs."""
    rng = random.Random(cfg.prompt_seed)
    rng.shuffle(pairs)
    n_eval = min(cfg.n_eval_prompts, len(pairs) // 5)  # keep at least 80% for training
    heldout, train = pairs[:n_eval], pairs[n_eval : n_eval + cfg.n_train_prompts]
    return Task(
        name=name,
        train_prompts=[p["prompt"] for p in train],
        eval_prompts=[p["prompt"] for p in heldout],
        gold_reward=None,
        train_pairs=train,
        heldout_pairs=heldout,
        dropped=dropped,
    )


def _too_long(prompt: str, tokenizer: PreTrainedTokenizerBase, cfg: TaskConfig) -> bool:
    return len(tokenizer(prompt, add_special_tokens=False).input_ids) > cfg.max_prompt_tokens


def project_path(path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else PROJECT_ROOT / p


def load_hh(cfg: TaskConfig, tokenizer: PreTrainedTokenizerBase) -> Task:
    """HH-RLHF rows -> train / held-out preference pairs with templated prompts; bad rows counted and dropped."""
    path = project_path(cfg.path)
    if not path.exists():
        raise UserError(f"task.path: {path} does not exist")
    pairs, dropped = [], {}
    too_long = "prompt longer than task.max_prompt_tokens"
    for line_no, line in _read_jsonl(path):
        where = f"{path.name} line {line_no}"
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise UserError(f"{where}: not a JSON object")
            dialogue, chosen, rejected = split_hh_pair(row, where)
        except (UserError, json.JSONDecodeError) as e:
            reason = str(e).split(": ", 1)[-1] if isinstance(e, UserError) else "invalid JSON"
            dropped[reason] = dropped.get(reason, 0) + 1
            continue
        prompt = format_prompt(tokenizer, dialogue, cfg.system_prompt)
        if _too_long(prompt, tokenizer, cfg):
            dropped[too_long] = dropped.get(too_long, 0) + 1
            continue
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    if not pairs:
        raise UserError(f"{path}: no usable preference rows (dropped: {dropped})")
    return _split("hh", pairs, dropped, cfg)


def check_pair(row: object, where: str) -> dict:
    """A preference row must have non-empty string prompt/chosen/rejected with chosen != rejected."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a row with fields {PAIR_FIELDS}, got {type(row).__name__}")
    for key in PAIR_FIELDS:
        if key not in row:
            raise UserError(f"{where}: field '{key}' is missing")
        if not isinstance(row[key], str):
            raise UserError(f"{where}: field '{key}' must be a string, got {type(row[key]).__name__}")
    for key in ("chosen", "rejected"):
        if not row[key].strip():
            raise UserError(f"{where}: field '{key}' is empty")
    if row["chosen"] == row["rejected"]:
        raise UserError(f"{where}: 'chosen' and 'rejected' are identical")
    return row


def read_rows(
    source: str, key: str, hub_access: bool, split: str = "train", optional: bool = False
) -> tuple[str, list | None]:
    """(name, rows) of one split of a dataset: a json / jsonl(.gz) / parquet / csv file (a file is a `train` split
    only), a `datasets` folder (a DatasetDict's split; a lone Dataset is `train`), or, where `hub_access`, a hub
    dataset name. A missing split is an error naming the config `key`, or rows None where `optional`."""
    name, rows = _read_split(source, key, hub_access, split)
    if rows is None and not optional:
        raise UserError(f"{key}: {name} has no '{split}' split")
    return name, rows


def _read_split(source: str, key: str, hub_access: bool, split: str) -> tuple[str, list | None]:
    from datasets import get_dataset_split_names, load_dataset
    from datasets.exceptions import DatasetGenerationError

    path = project_path(source)
    if path.exists():
        try:
            return path.name, _read_local(path, split)
        # What the readers raise for a file that is not what its name says (not UTF-8, not JSON, not parquet, not
        # a `datasets` folder): one line naming it. `datasets`' csv reader wraps the real error in its own.
        except (OSError, ValueError, DatasetGenerationError) as e:
            cause = e.__cause__ if isinstance(e, DatasetGenerationError) and e.__cause__ else e
            raise unreadable(path.name, cause) from None
    if not hub_access:
        raise UserError(f"{key}: '{source}' is not a local file or folder, and this profile is offline")
    if split not in get_dataset_split_names(source):
        return source, None
    return source, load_dataset(source, split=split).to_list()


def _read_local(path: Path, split: str) -> list | None:
    """The rows of one split of a local file or `datasets` folder (None: no such split)."""
    from datasets import Dataset, DatasetDict, load_from_disk

    if path.is_dir():
        ds = load_from_disk(str(path))
        if isinstance(ds, DatasetDict):
            return ds[split].to_list() if split in ds else None
        return ds.to_list() if split == "train" else None
    if split != "train":
        return None
    if path.suffix == ".parquet":
        return Dataset.from_parquet(str(path)).to_list()
    if path.suffix == ".csv":
        return Dataset.from_csv(str(path)).to_list()
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, list) else [data]
    rows = []
    for line_no, line in _read_jsonl(path):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise UserError(f"{path.name} row {line_no}: invalid JSON ({e.msg})") from None
    return rows


def text_field(rows: list, field_name: str, where: str) -> list[str]:
    """The non-empty string `field_name` of every row; an error names the row (`where row i`) and the field."""
    texts = []
    for i, row in enumerate(rows, start=1):
        text = row.get(field_name) if isinstance(row, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{where} row {i}: field '{field_name}' is missing, empty or not a string")
        texts.append(text)
    return texts


def normalise_pair(row: object, tokenizer: PreTrainedTokenizerBase, system_prompt: str | None, where: str) -> dict:
    """A TRL-format preference row (standard or conversational, explicit or implicit prompt) -> templated
    prompt string + chosen/rejected reply texts; errors name `where`."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object with fields chosen, rejected (and prompt)")
    for key in ("chosen", "rejected"):
        if key not in row:
            raise UserError(f"{where}: field '{key}' is missing")
    chosen, rejected, prompt = row.get("chosen"), row.get("rejected"), row.get("prompt")
    if isinstance(chosen, list) and isinstance(rejected, list):  # conversational: lists of {role, content}
        if prompt is None:  # implicit prompt: the turns chosen and rejected share
            n = 0
            while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
                n += 1
            prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        try:
            prompt = format_prompt(tokenizer, prompt, system_prompt)
            chosen, rejected = chosen[-1]["content"], rejected[-1]["content"]
        except (KeyError, IndexError, TypeError) as e:
            raise UserError(f"{where}: malformed conversation ({type(e).__name__}: {e})") from None
    elif prompt is None and isinstance(chosen, str) and isinstance(rejected, str):
        n = len(_common_prefix(chosen, rejected))
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    return check_pair({"prompt": prompt, "chosen": chosen, "rejected": rejected}, where)


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def load_preference_task(cfg: TaskConfig, tokenizer: PreTrainedTokenizerBase, hub_access: bool) -> Task:
    """Any preference dataset in TRL's format; a malformed row is an error naming the file and row."""
    name, rows = read_rows(cfg.path, "task.path", hub_access)
    pairs, dropped = [], {}
    for i, row in enumerate(rows, start=1):
        pair = normalise_pair(row, tokenizer, cfg.system_prompt, f"{name} row {i}")
        if _too_long(pair["prompt"], tokenizer, cfg):
            dropped["prompt longer than task.max_prompt_tokens"] = (
                dropped.get("prompt longer than task.max_prompt_tokens", 0) + 1
            )
            continue
        pairs.append(pair)
    if len(pairs) < 5:
        raise UserError(
            f"{name}: {len(pairs)} usable preference rows, need at least 5 (a fifth are held out for "
            f"evaluation; dropped: {dropped})"
        )
    return _split("preferences", pairs, dropped, cfg)


def load_task(cfg: TaskConfig, tokenizer: PreTrainedTokenizerBase, hub_access: bool = False) -> Task:
    """The task `cfg` names, its eval prompts split into test and validation prompts (`split_validation`)."""
    return split_validation(_load_task(cfg, tokenizer, hub_access), cfg.n_validation_prompts)


def split_validation(task: Task, n: int) -> Task:
    """Set the last `n` eval prompts (and, for a task with its own pairs, their held-out pairs) aside as
    validation prompts for tuning; the others stay the test prompts the report shows. Disjoint by construction."""
    if n == 0:
        return task
    if n >= len(task.eval_prompts):
        raise UserError(
            f"config key 'task.n_validation_prompts': {n}, but the task has only "
            f"{len(task.eval_prompts)} eval prompts, and some must stay test prompts"
        )
    task.validation_prompts, task.eval_prompts = task.eval_prompts[-n:], task.eval_prompts[:-n]
    if task.heldout_pairs is not None:  # the eval prompts of such a task are its held-out pairs' prompts
        task.validation_pairs, task.heldout_pairs = task.heldout_pairs[-n:], task.heldout_pairs[:-n]
    return task


def _load_task(cfg: TaskConfig, tokenizer: PreTrainedTokenizerBase, hub_access: bool) -> Task:
    if cfg.name == "sentiment":
        train, eval_ = sentiment_instructions(cfg.n_train_prompts, cfg.n_eval_prompts, cfg.prompt_seed)

        def render(texts: list[str]) -> list[str]:
            return [format_prompt(tokenizer, [{"role": "user", "content": t}], cfg.system_prompt) for t in texts]

        return Task(
            name="sentiment", train_prompts=render(train), eval_prompts=render(eval_), gold_reward=vader_compound
        )
    if cfg.name == "imdb":
        return load_imdb(cfg, tokenizer, hub_access)
    if cfg.name == "hh":
        return load_hh(cfg, tokenizer)
    if cfg.name == "preferences":
        return load_preference_task(cfg, tokenizer, hub_access)
    raise UserError(f"task.name: unknown task '{cfg.name}'")
