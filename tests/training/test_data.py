"""Data: SFT trains on assistant tokens only, packing keeps documents apart without losing a label,
and the loader's order is seeded, split over data-parallel ranks and resumable."""

from __future__ import annotations

import json

import pytest
import torch

from training.documents import DataError, chat_document, read_documents, text_document
from training.loader import BatchLoader
from training.packing import IGNORE, PackedWindows

CONVERSATION = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]


@pytest.fixture(scope="module")
def byte_tok(byte_tokenizer_dir):
    from models.llama4.loader import load_tokenizer

    return load_tokenizer(byte_tokenizer_dir)


def _target_text(tok, doc) -> list[str]:
    """The runs of consecutive target tokens, decoded."""
    runs, current = [], []
    for i, t in zip(doc.ids, doc.targets):
        if t:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tok.decode(r, skip_special_tokens=False) for r in runs]


def test_sft_loss_falls_on_assistant_tokens_only(byte_tok):
    doc = chat_document(byte_tok, CONVERSATION)
    # The template: <|user|>hi<|eos|><|assistant|>Hello!<|eos|><|user|>2+2?<|eos|><|assistant|>4<|eos|>
    assert byte_tok.decode(doc.ids, skip_special_tokens=False) == \
        "<|user|>hi<|eos|><|assistant|>Hello!<|eos|><|user|>2+2?<|eos|><|assistant|>4<|eos|>"
    assert _target_text(byte_tok, doc) == ["Hello!<|eos|>", "4<|eos|>"]
    # After packing, each label is the next token where that token is the assistant's.
    packed = PackedWindows([doc], seq_len=len(doc.ids), pad_id=0, seed=0)
    labels = packed.labels_NS[0].tolist()
    expected = [doc.ids[t + 1] if doc.targets[t + 1] else IGNORE for t in range(len(doc.ids) - 1)] + [IGNORE]
    assert labels == expected
    assert byte_tok.decode([x for x in labels if x != IGNORE], skip_special_tokens=False) == "Hello!<|eos|>4<|eos|>"


@pytest.mark.slow
def test_sft_mask_with_the_default_models_template():
    """SmolLM2's template adds a system turn of its own; only the assistant's reply and its
    <|im_end|> are trained on."""
    from models.default import default_model_path
    from models.llama4.loader import load_tokenizer

    tok = load_tokenizer(default_model_path())
    doc = chat_document(tok, CONVERSATION[:2])
    assert tok.encode_chat(CONVERSATION[:2], add_generation_prompt=False) == doc.ids
    assert _target_text(tok, doc) == ["Hello!<|im_end|>\n"]


def test_text_documents_and_bad_records(byte_tok, tmp_path):
    doc = text_document(byte_tok, "abc")
    assert doc.ids == [byte_tok.bos_token_id, *byte_tok.encode("abc", False), byte_tok.eos_token_id]
    assert doc.targets == [False, True, True, True, True]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"txt": "oops"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: field 'text'"):
        read_documents(bad, "text", byte_tok)
    with pytest.raises(DataError, match=r"bad\.jsonl:1: field 'messages'"):
        read_documents(bad, "chat", byte_tok)
    opener = tmp_path / "opener.jsonl"
    opener.write_text(json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match=r"opener\.jsonl:1: an assistant message cannot open"):
        read_documents(opener, "chat", byte_tok)


def _docs(lengths):
    # Document i is made of token i (its first token is not a target, as after a BOS).
    from training.documents import Document

    return [Document([i] * n, [False] + [True] * (n - 1)) for i, n in enumerate(lengths)]


def test_packing_keeps_documents_apart_and_every_label():
    docs = _docs([5, 23, 3, 40, 12])
    packed = PackedWindows(docs, seq_len=16, pad_id=99, seed=1)
    assert len(packed) == 6 and packed.num_real_tokens == 83  # padded to 96
    labels = {}
    for w in range(len(packed)):
        batch = packed.batch([w])
        ids, pos, lab = batch.input_ids_T.tolist(), batch.positions_T.tolist(), batch.labels_T.tolist()
        start = 0
        for n in batch.seq_lens:
            piece = ids[start:start + n]
            assert len(set(piece)) == 1  # one document per attention sequence
            assert pos[start:start + n] == list(range(n))  # positions restart with each piece
            start += n
        for i, x in zip(ids, lab):
            if x != IGNORE:
                assert x == i  # never a label from another document
                labels[i] = labels.get(i, 0) + 1
        assert sum(batch.seq_lens) == 16
    # Every target of every document is some token's label exactly once, across window edges too.
    assert labels == {d: len(doc.ids) - 1 for d, doc in enumerate(docs)}
    last = packed.batch([len(packed) - 1])
    assert last.valid_T.tolist() == [True] * 3 + [False] * 13
    assert last.seq_lens[-1] == 13 and (last.input_ids_T[3:] == 99).all() and (last.labels_T[3:] == IGNORE).all()


def test_loader_order_is_seeded_split_and_resumable():
    packed = PackedWindows(_docs([7] * 30), seq_len=8, pad_id=0, seed=0)
    n = len(packed)

    def windows(loader, count):
        return [tuple(loader.next_batch().input_ids_T.view(-1, 8)[:, 0].tolist()) for _ in range(count)]

    a, b = BatchLoader(packed, 3, seed=5), BatchLoader(packed, 3, seed=5)
    assert windows(a, 4) == windows(b, 4)
    assert windows(BatchLoader(packed, 3, seed=6), 4) != windows(BatchLoader(packed, 3, seed=5), 4)
    # One epoch visits every window once.
    one = BatchLoader(packed, 1, seed=5)
    seen = [one._window(g) for g in range(n)]
    assert sorted(seen) == list(range(n))
    # Resume: a new loader from the saved position continues the same sequence.
    full = BatchLoader(packed, 3, seed=5)
    straight = windows(full, 30)  # past an epoch boundary
    part = BatchLoader(packed, 3, seed=5)
    first = windows(part, 13)
    resumed = BatchLoader(packed, 3, seed=5)
    resumed.load_state_dict(part.state_dict())
    assert first + windows(resumed, 17) == straight
    # Two data-parallel ranks together see what one rank with twice the batch sees.
    r0, r1 = BatchLoader(packed, 2, 5, dp_rank=0, dp_size=2), BatchLoader(packed, 2, 5, dp_rank=1, dp_size=2)
    single = BatchLoader(packed, 4, 5)
    for _ in range(5):
        both = torch.cat([r0.next_batch().input_ids_T, r1.next_batch().input_ids_T])
        assert torch.equal(both, single.next_batch().input_ids_T)
    other = PackedWindows(_docs([7] * 31), seq_len=8, pad_id=0, seed=0)
    with pytest.raises(ValueError, match="data changed"):
        BatchLoader(other, 3, seed=5).load_state_dict(part.state_dict())
