"""`lora generate`: text from a Llama-family model (a Hugging Face directory or a GGUF file),
with or without LoRA adapters, streamed to stdout as it is decoded; `--chat` for a loop.

`generate_text` is the library function behind the command: it loads nothing, so a notebook
can call it on a model and tokenizer it already holds.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import numpy as np

__all__ = ["load", "generate_text", "chat_loop", "run"]


def load(model_path: str, adapters: list[str] | None = None, *, keep_quantized: bool = False,
         q8: bool = False):
    """(model, tokenizer) from a Hugging Face directory or a .gguf file, with `adapters` (PEFT
    directories) loaded in order, in eval mode. keep_quantized (a .gguf file): the weights
    stay in the file's blocks; q8 (with it): decoding takes 8-bit activations
    (lora.set_quant_activations)."""
    from ..io.adapter import load_adapter
    from ..models.data import Tokenizer
    from ..models.llama import LlamaForCausalLM
    from ..nn.quantized import set_quant_activations

    if q8 and not keep_quantized:
        raise ValueError("--q8 applies to a quantized model: add --keep-quantized (a .gguf "
                         "MODEL)")
    model = LlamaForCausalLM.from_pretrained(model_path, keep_quantized=keep_quantized)
    for directory in adapters or []:
        load_adapter(model, directory)
    if q8:
        set_quant_activations(model, "q8")
    return model.eval(), Tokenizer(model_path)


def _prompt_ids(tokenizer, messages: list[dict], raw: bool) -> list[int]:
    if raw or getattr(tokenizer, "chat_template", None) is None:
        return tokenizer.encode("".join(m["content"] for m in messages))
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)


def generate_text(model, tokenizer, messages: list[dict] | str, *, raw: bool = False,
                  on_text: Callable[[str], None] | None = None, **generate_kwargs
                  ) -> tuple[str, dict]:
    """Generate an answer to `messages` (a chat, [{"role": ..., "content": ...}], or a plain
    string, taken as one user message) and return (text, stats). The chat template of the
    tokenizer renders the prompt unless `raw` (the text as is) or the model has none.
    `on_text(piece)` receives the text as it is decoded. `generate_kwargs` go to
    model.generate (max_new_tokens, do_sample, temperature, top_k, top_p,
    repetition_penalty, seed); eos_token_id defaults to the tokenizer's. stats: prompt and new
    token counts, prefill and decode seconds."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    prompt = _prompt_ids(tokenizer, messages, raw)
    generate_kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
    eos = generate_kwargs["eos_token_id"]
    stops = set([] if eos is None else [eos] if np.isscalar(eos) else list(eos))
    new: list[int] = []
    shown = ""
    t0 = time.perf_counter()
    first: list[float] = []

    def stream(ids):
        nonlocal shown
        if not first:
            first.append(time.perf_counter())
        token = int(np.asarray(ids).reshape(-1)[0])
        if token in stops:
            return
        new.append(token)
        text = tokenizer.decode(new, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a UTF-8 sequence split across tokens: wait for the rest
            return
        if on_text is not None and len(text) > len(shown):
            on_text(text[len(shown):])
        shown = text

    model.generate(np.asarray([prompt], dtype=np.int64), streamer=stream, **generate_kwargs)
    t1 = time.perf_counter()
    text = tokenizer.decode(new, skip_special_tokens=True)
    if on_text is not None and len(text) > len(shown):
        on_text(text[len(shown):])
    t_first = first[0] if first else t1
    stats = {"prompt_tokens": len(prompt), "new_tokens": len(new),
             "prefill_s": t_first - t0, "decode_s": t1 - t_first}
    return text, stats


def _print_piece(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def _report(stats: dict) -> None:
    rate = (stats["new_tokens"] - 1) / stats["decode_s"] if stats["decode_s"] > 0 else 0.0
    print(f"[{stats['prompt_tokens']} prompt tokens in {stats['prefill_s']:.2f} s, "
          f"{stats['new_tokens']} new tokens, {rate:.1f} tokens/s]", file=sys.stderr)


def chat_loop(model, tokenizer, *, system: str | None = None, read=input, **generate_kwargs
              ) -> list[dict]:
    """Read a user line, stream the answer, repeat, keeping the conversation; an empty line,
    EOF or Ctrl-D ends it. Returns the conversation."""
    messages = [{"role": "system", "content": system}] if system else []
    while True:
        try:
            line = read("> ")
        except EOFError:
            print(file=sys.stderr)
            return messages
        if not line.strip():
            return messages
        messages.append({"role": "user", "content": line})
        text, stats = generate_text(model, tokenizer, messages, on_text=_print_piece,
                                    **generate_kwargs)
        print()
        _report(stats)
        messages.append({"role": "assistant", "content": text})


def run(args) -> int:
    """`lora generate` from parsed arguments (see lora.cli.commands)."""
    if args.threads is not None:
        from .. import set_num_threads

        set_num_threads(args.threads)
    model, tokenizer = load(args.model, args.adapter, keep_quantized=args.keep_quantized,
                            q8=args.q8)
    kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                  temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                  repetition_penalty=args.repetition_penalty, seed=args.seed)
    if args.chat:
        chat_loop(model, tokenizer, system=args.system, **kwargs)
        return 0
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.prompt}]
    _, stats = generate_text(model, tokenizer, messages, raw=args.raw, on_text=_print_piece,
                             **kwargs)
    print()
    _report(stats)
    return 0
