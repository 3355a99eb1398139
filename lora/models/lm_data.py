"""Training data for causal-LM fine-tuning: plain text packed into fixed-length blocks, and
prompt/answer or chat examples whose prompt tokens are masked so that only the answers are
learned.

Every function returns a dict of int64 arrays (n, seq) ready for `model(input_ids,
attention_mask, labels=...)` or `lora.nn.causal_lm_loss(logits, labels)`: `input_ids`,
`attention_mask` (1 for real tokens), and `labels`, which equal input_ids where the token is
learned and -100 elsewhere (prompt tokens, padding). The model shifts by one itself (position t
predicts labels[t + 1]), as transformers' causal LMs do, so labels are not shifted here.

- `pack_text(texts, tokenizer, block_size)`: the documents' ids concatenated, each followed by
  the eos token, and cut into blocks of block_size tokens, as transformers' run_clm example
  groups texts (the tail that does not fill a block is dropped unless drop_last=False, which
  pads it).
- `instruction_examples(tokenizer, prompts, answers)` and `chat_examples(tokenizer,
  conversations)`: one row per example, right-padded, the prompt masked. Chat examples are
  rendered with the model's chat template and learn the assistant turns (by default every
  one; train_on="last" learns only the last): a turn's tokens are those the template writes
  after the generation prompt of the conversation up to it, through the end of the turn
  (<|im_end|> included, so the model learns to stop).

The text is tokenized once, whole, as apply_chat_template(tokenize=True) does; which tokens are
learned is decided by their character offsets.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["pack_text", "instruction_examples", "chat_examples", "IGNORE_INDEX"]

IGNORE_INDEX = -100


def _backend(tokenizer):
    tok = getattr(tokenizer, "_tok", None)
    if tok is None or not hasattr(tok, "encode"):
        raise TypeError("tokenizer must be a lora.models.data.Tokenizer, got "
                        f"{type(tokenizer).__name__}")
    return tok


def _positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _texts(name: str, texts) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{name}[{i}] must be a str, got {type(t).__name__}")
    return texts


def pack_text(texts, tokenizer, block_size: int, *, add_eos: bool = True,
              drop_last: bool = True) -> dict:
    """Tokenize `texts` (a str or a sequence of str, one per document), join the ids with the
    eos token after each document (add_eos, when the tokenizer has one) and cut them into
    rows of `block_size`. Every real token is learned; drop_last=False keeps the last, short
    block, padded (labels -100, attention_mask 0). ValueError when not one block fills."""
    block_size = _positive("block_size", block_size)
    tok = _backend(tokenizer)
    eos = tokenizer.eos_token_id if add_eos else None
    ids: list[int] = []
    for enc in tok.encode_batch(_texts("texts", texts)):
        ids.extend(enc.ids)
        if eos is not None:
            ids.append(eos)
    n_full, rest = divmod(len(ids), block_size)
    rows = n_full + (1 if rest and not drop_last else 0)
    if rows == 0:
        raise ValueError(f"pack_text: {len(ids)} tokens do not fill one block of {block_size}; "
                         "pass more text, a smaller block_size, or drop_last=False")
    input_ids = np.full((rows, block_size), tokenizer.pad_token_id, dtype=np.int64)
    mask = np.zeros((rows, block_size), dtype=np.int64)
    used = min(len(ids), rows * block_size)
    input_ids.reshape(-1)[:used] = ids[:used]
    mask.reshape(-1)[:used] = 1
    labels = np.where(mask == 1, input_ids, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def _rows(tokenizer, examples: list[tuple[str, list[tuple[int, int]]]], max_length,
          padding: str) -> dict:
    """Tokenize each (text, spans) and right-pad: labels are the ids of tokens whose first
    character lies in one of the character spans [start, end), -100 elsewhere."""
    if padding not in ("longest", "max_length"):
        raise ValueError(f"padding must be 'longest' or 'max_length', got {padding!r}")
    if max_length is not None:
        max_length = _positive("max_length", max_length)
    elif padding == "max_length":
        raise ValueError("padding='max_length' needs a max_length")
    tok = _backend(tokenizer)
    encs = tok.encode_batch([text for text, _ in examples], add_special_tokens=False)
    rows = []
    for enc, (_, spans) in zip(encs, examples, strict=True):
        ids = enc.ids[:max_length] if max_length else enc.ids
        starts = np.array([o[0] for o in enc.offsets[:len(ids)]], dtype=np.int64)
        learn = np.zeros(len(ids), dtype=bool)
        for a, b in spans:
            learn |= (starts >= a) & (starts < b)
        rows.append((ids, learn))
    seq = max_length if padding == "max_length" else max((len(r[0]) for r in rows), default=0)
    n = len(rows)
    input_ids = np.full((n, seq), tokenizer.pad_token_id, dtype=np.int64)
    mask = np.zeros((n, seq), dtype=np.int64)
    labels = np.full((n, seq), IGNORE_INDEX, dtype=np.int64)
    for i, (ids, learn) in enumerate(rows):
        k = len(ids)
        input_ids[i, :k] = ids
        mask[i, :k] = 1
        labels[i, :k] = np.where(learn, ids, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def _check_messages(i, messages):
    if not (isinstance(messages, (list, tuple)) and messages and all(
            isinstance(m, dict) and "role" in m and "content" in m for m in messages)):
        raise TypeError(f"conversations[{i}] must be a non-empty list of dicts with 'role' and "
                        "'content'")


def chat_examples(tokenizer, conversations: Sequence[Sequence[dict]], *,
                  train_on: str = "assistant", max_length: int | None = None,
                  padding: str = "longest", **template_kwargs) -> dict:
    """One row per conversation (a list of {"role", "content"} messages), rendered with the
    tokenizer's chat template; the tokens of its assistant turns are learned (train_on=
    "assistant"), or those of the last assistant turn only ("last"), everything else is -100.
    Rows longer than max_length are cut at the right. ValueError when the template does not
    render a conversation's prefixes as prefixes of its whole text (the masking needs that)."""
    if train_on not in ("assistant", "last"):
        raise ValueError(f"train_on must be 'assistant' or 'last', got {train_on!r}")
    examples = []
    for i, messages in enumerate(conversations):
        _check_messages(i, messages)
        messages = list(messages)
        text = tokenizer.apply_chat_template(messages, tokenize=False, **template_kwargs)
        turns = [j for j, m in enumerate(messages) if m["role"] == "assistant"]
        if not turns:
            raise ValueError(f"conversations[{i}] has no assistant message to learn")
        if train_on == "last":
            turns = turns[-1:]
        spans = []
        for j in turns:
            head = tokenizer.apply_chat_template(messages[:j], add_generation_prompt=True,
                                                 tokenize=False, **template_kwargs)
            through = tokenizer.apply_chat_template(messages[:j + 1], tokenize=False,
                                                    **template_kwargs)
            if not (text.startswith(through) and through.startswith(head)):
                raise ValueError(
                    f"conversations[{i}]: the chat template does not render the turns before "
                    f"message {j} as a prefix of the whole conversation, so its answer tokens "
                    "cannot be found; use instruction_examples with the texts rendered yourself")
            spans.append((len(head), len(through)))
        examples.append((text, spans))
    return _rows(tokenizer, examples, max_length, padding)


def instruction_examples(tokenizer, prompts, answers, *, chat_template: bool | None = None,
                         system: str | None = None, max_length: int | None = None,
                         padding: str = "longest") -> dict:
    """One row per (prompt, answer) pair, only the answer learned. With the tokenizer's chat
    template (chat_template=None uses it when the tokenizer has one): a user turn and an
    assistant turn (after a system turn when `system` is given), as chat_examples. Without:
    the text prompt + answer followed by the eos token, the bos token first when the
    tokenizer adds one; answer and eos learned."""
    prompts, answers = _texts("prompts", prompts), _texts("answers", answers)
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    if chat_template is None:
        chat_template = tokenizer.chat_template is not None
    if chat_template:
        head = [{"role": "system", "content": system}] if system is not None else []
        return chat_examples(tokenizer, [head + [{"role": "user", "content": p},
                                                 {"role": "assistant", "content": a}]
                                         for p, a in zip(prompts, answers, strict=True)],
                             train_on="last", max_length=max_length, padding=padding)
    if system is not None:
        raise ValueError("system needs the chat template (chat_template=True)")
    bos = ""
    bos_id = tokenizer.bos_token_id
    if bos_id is not None and tokenizer.encode("", add_special_tokens=True)[:1] == [bos_id]:
        bos = tokenizer.decode([bos_id])
    eos_id = tokenizer.eos_token_id
    eos = tokenizer.decode([eos_id]) if eos_id is not None else ""
    examples = []
    for p, a in zip(prompts, answers, strict=True):
        start = len(bos) + len(p)
        text = bos + p + a + eos
        examples.append((text, [(start, len(text))]))
    return _rows(tokenizer, examples, max_length, padding)
