"""Text helpers for lora.models: a tokenizer wrapper and a small labelled sentence set.

`Tokenizer` turns sentences into the padded int64 arrays a BERT model takes, through the
`tokenizers` package (an optional dependency, imported only here and in gguf.py) and the
`tokenizer.json` shipped with a checkpoint, or the vocabulary inside a GGUF file.
`negation_sentiment` builds the project's own sentence
classification set from templates. Nothing here downloads anything.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import random

import numpy as np

from .gguf import build_tokenizer, is_gguf

__all__ = ["Tokenizer", "model_max_length", "negation_sentiment", "batches"]


class Tokenizer:
    """A Hugging Face fast tokenizer read from `<directory>/tokenizer.json`, or rebuilt from the
    vocabulary a `.gguf` file embeds (byte-level BPE, as transformers builds it: see
    lora.models.gguf.build_tokenizer; its limit is the file's context length).

    Calling it on a list of strings (or of string pairs) returns a dict with `input_ids`,
    `attention_mask` and `token_type_ids`, each int64 of shape (batch, seq): seq is the longest
    sequence in the batch (`padding="longest"`) or `max_length` (`padding="max_length"`).
    Sequences longer than `max_length` are truncated, the way transformers' tokenizer does it.
    `max_length` defaults to the model's own limit, as transformers' `truncation=True` takes
    it: tokenizer_config.json's `model_max_length`, capped by config.json's
    `max_position_embeddings` (None, no truncation, when the directory states neither).
    """

    def __init__(self, directory: str | os.PathLike, max_length: int | None = None):
        try:
            import tokenizers
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                "lora.models.Tokenizer needs the `tokenizers` package: pip install 'lora[models]'"
            ) from e
        if is_gguf(directory):
            self._tok, tok_config = build_tokenizer(directory)
            file_limit = tok_config.pop("model_max_length", None)
        else:
            path = os.path.join(directory, "tokenizer.json")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: no such file (a tokenizer.json is required)")
            self._tok = tokenizers.Tokenizer.from_file(path)
            tok_config = _read_json(os.path.join(directory, "tokenizer_config.json"))
            file_limit = None
        self.pad_token = "[PAD]"
        self._config = tok_config
        self.chat_template = _read_chat_template(directory, tok_config)
        self.pad_token = tok_config.get("pad_token", self.pad_token)
        if isinstance(self.pad_token, dict):  # an AddedToken as some tokenizers store it
            self.pad_token = self.pad_token.get("content", "[PAD]")
        if max_length is None:
            max_length = file_limit if is_gguf(directory) else model_max_length(directory)
        if max_length is not None and (isinstance(max_length, bool) or int(max_length) < 1):
            raise ValueError(
                f"Tokenizer: max_length must be a positive integer, got {max_length!r}")
        self.max_length = None if max_length is None else int(max_length)
        self.pad_token_id = self._tok.token_to_id(self.pad_token) or 0
        self._tok.no_padding()
        self._tok.no_truncation()

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def __call__(self, texts, padding: str = "longest", max_length: int | None = None) -> dict:
        if isinstance(texts, str):
            texts = [texts]
        max_length = self.max_length if max_length is None else int(max_length)
        if padding not in ("longest", "max_length"):
            raise ValueError(f"padding must be 'longest' or 'max_length', got {padding!r}")
        if max_length is None:
            if padding == "max_length":
                raise ValueError("padding='max_length' needs a max_length (the tokenizer has "
                                 "no limit of its own)")
            encs = self._tok.encode_batch(list(texts))
        else:
            encs = self._truncated(list(texts), max_length)
        return self._pad(encs, max_length if padding == "max_length" else None)

    def _truncated(self, texts: list, max_length: int) -> list:
        self._tok.enable_truncation(max_length)
        try:
            return self._tok.encode_batch(texts)
        finally:
            self._tok.no_truncation()

    def _pad(self, encs: list, seq: int | None) -> dict:
        n = len(encs)
        if seq is None:
            seq = max((len(e.ids) for e in encs), default=0)
        ids = np.full((n, seq), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((n, seq), dtype=np.int64)
        types = np.zeros((n, seq), dtype=np.int64)
        for i, e in enumerate(encs):
            k = len(e.ids)
            ids[i, :k] = e.ids
            mask[i, :k] = 1
            types[i, :k] = e.type_ids
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The ids of one text, as transformers' `tokenizer.encode(text)`: special tokens
        (BERT's [CLS]/[SEP], a Llama bos) only where the model's tokenizer adds them."""
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode: text must be a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """The text of `ids`; special tokens kept unless skip_special_tokens (transformers'
        default)."""
        return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)],
                                skip_special_tokens=skip_special_tokens)

    def _special(self, name: str) -> tuple[str | None, int | None]:
        token = self._config.get(name)
        if isinstance(token, dict):
            token = token.get("content")
        return (token, None) if token is None else (token, self._tok.token_to_id(token))

    @property
    def bos_token_id(self) -> int | None:
        return self._special("bos_token")[1]

    @property
    def eos_token_id(self) -> int | None:
        return self._special("eos_token")[1]

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False,
                            tokenize: bool = True, **kwargs):
        """Render `messages` ([{"role": ..., "content": ...}, ...]) with the model's chat
        template (tokenizer_config.json's `chat_template` or chat_template.jinja) the way
        transformers does: a sandboxed jinja2 environment with trim_blocks and lstrip_blocks,
        `raise_exception`, `strftime_now` and a `tojson` filter, the special tokens (bos_token,
        eos_token, ...) and `kwargs` as variables. tokenize=True (transformers' default)
        returns the ids of the text, encoded without adding special tokens."""
        if self.chat_template is None:
            raise ValueError("apply_chat_template: this tokenizer has no chat template "
                             "(no chat_template in tokenizer_config.json, no chat_template.jinja)")
        if not (isinstance(messages, (list, tuple)) and all(
                isinstance(m, dict) and "role" in m for m in messages)):
            raise TypeError("apply_chat_template: messages must be a list of dicts with 'role' "
                            "and 'content'")
        specials = {}
        for name in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token",
                     "cls_token", "mask_token"):
            token = self._special(name)[0]
            if token is not None:
                specials[name] = token
        text = _compiled_template(self.chat_template).render(
            messages=list(messages), tools=kwargs.pop("tools", None),
            documents=kwargs.pop("documents", None),
            add_generation_prompt=add_generation_prompt, **{**specials, **kwargs})
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _read_chat_template(directory, tok_config: dict) -> str | None:
    """transformers 5 writes the template to chat_template.jinja; older files keep it in
    tokenizer_config.json (a string, or a list of named templates: "default" is taken)."""
    path = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    template = tok_config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


@functools.lru_cache(maxsize=8)
def _compiled_template(source: str):
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("chat templates need the `jinja2` package: "
                          "pip install 'lora[models]'") from e

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


# transformers' stand-in for "no limit" (tokenization_utils_base.VERY_LARGE_INTEGER, 1e30).
_NO_LIMIT = int(1e29)


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def model_max_length(directory: str | os.PathLike) -> int | None:
    """The longest sequence the checkpoint in `directory` takes: tokenizer_config.json's
    `model_max_length` (ignoring transformers' 1e30 "no limit"), capped by config.json's
    `max_position_embeddings`; None when neither says."""
    directory = os.fspath(directory)
    limits = []
    tok_limit = _read_json(os.path.join(directory, "tokenizer_config.json")).get("model_max_length")
    if isinstance(tok_limit, (int, float)) and 0 < tok_limit < _NO_LIMIT:
        limits.append(int(tok_limit))
    positions = _read_json(os.path.join(directory, "config.json")).get("max_position_embeddings")
    if isinstance(positions, int) and positions > 0:
        limits.append(positions)
    return min(limits) if limits else None


# ---------------------------------------------------------------------------------------------
# The sentence set. Every sentence states an opinion about a thing; its label is the opinion the
# sentence ends up with (1 positive, 0 negative). Templates negate the adjective or put a
# contrary adjective next to the decisive one, so a bag of the words (and, largely, a mean of
# frozen contextual embeddings) does not give the label: the model has to read the structure.
# Train and test use disjoint adjectives and disjoint things, so the test set measures whether
# the structure was learnt, not whether words were memorised.

_POS = [
    "good", "great", "excellent", "wonderful", "delightful", "superb", "pleasant", "lovely",
    "fantastic", "brilliant", "charming", "impressive", "enjoyable", "outstanding", "marvelous",
    "terrific", "splendid", "satisfying", "fine", "amazing", "perfect", "solid",
]
_NEG = [
    "bad", "awful", "terrible", "horrible", "dreadful", "poor", "disappointing", "mediocre",
    "unpleasant", "boring", "lousy", "miserable", "dismal", "atrocious", "annoying", "weak",
    "appalling", "frustrating", "subpar", "shoddy", "tedious", "pathetic",
]
_THINGS = [
    "movie", "meal", "hotel", "phone", "book", "concert", "service", "coffee", "laptop", "game",
    "show", "trip", "car", "album", "restaurant", "lecture", "camera", "play", "pizza", "course",
    "flight", "museum", "app", "novel", "soup", "team", "match", "room", "chair", "song",
]

# (template, which adjective decides, whether the sentence negates it). Slots: {t} thing,
# {a} the decisive adjective, {b} the contrary distractor.
_TEMPLATES = [
    ("the {t} was {a}.", False),
    ("the {t} was not {a}.", True),
    ("i expected the {t} to be {b}, but it was {a}.", False),
    ("i expected the {t} to be {a}, but it was not.", True),
    ("although the {t} looked {b}, it turned out {a}.", False),
    ("the {t} was {a}, even though everyone said it would be {b}.", False),
    ("nobody would call the {t} {a}.", True),
    ("the {t} was anything but {a}.", True),
    ("people said the {t} was {b}. they were wrong, it was {a}.", False),
    ("the {t} was not {b}; it was {a}.", False),
    ("i would never say the {t} was {a}.", True),
    ("the reviews called the {t} {b}, yet it was {a}.", False),
]


def _split_half(words, rng):
    words = list(words)
    rng.shuffle(words)
    k = len(words) // 2
    return words[:k], words[k:]


def negation_sentiment(n_train: int = 1200, n_test: int = 400, seed: int = 0):
    """The project's templated sentence-sentiment set: ((train_texts, train_labels),
    (test_texts, test_labels)), labels int64 in {0, 1}, classes balanced.

    Made here from 12 templates, 44 adjectives and 30 nouns (see the source); train and test use
    disjoint halves of the adjectives and of the nouns. Deterministic for a given seed.
    """
    rng = random.Random(seed)
    pos_tr, pos_te = _split_half(_POS, rng)
    neg_tr, neg_te = _split_half(_NEG, rng)
    th_tr, th_te = _split_half(_THINGS, rng)

    def make(n, pos, neg, things):
        texts, labels = [], []
        for i in range(n):
            label = i % 2
            template, negated = _TEMPLATES[rng.randrange(len(_TEMPLATES))]
            # the decisive adjective's own polarity: flipped by a negation
            a_pos = (label == 1) != negated
            a = rng.choice(pos if a_pos else neg)
            b = rng.choice(neg if a_pos else pos)
            texts.append(template.format(t=rng.choice(things), a=a, b=b))
            labels.append(label)
        order = list(range(n))
        rng.shuffle(order)
        return [texts[i] for i in order], np.array([labels[i] for i in order], dtype=np.int64)

    return make(n_train, pos_tr, neg_tr, th_tr), make(n_test, pos_te, neg_te, th_te)


def batches(n: int, batch_size: int, rng: np.random.Generator | None = None):
    """Index arrays covering range(n) in batches; shuffled when rng is given."""
    order = np.arange(n) if rng is None else rng.permutation(n)
    for i in range(0, n, batch_size):
        yield order[i : i + batch_size]
