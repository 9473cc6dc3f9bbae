"""The OpenAI Batch line format and the resume ledger, without a model."""

from __future__ import annotations

import json

import pytest

from serving.batch.ledger import Ledger
from serving.batch.lines import LineError, custom_id_of, error_line, parse_request, result_line

MODEL = "served-model"


def parse(obj, endpoints=None):
    raw = json.dumps(obj).encode() if not isinstance(obj, bytes) else obj
    found, cid = custom_id_of(7, raw)
    return parse_request(7, found, cid, MODEL, endpoints)


def chat(**body):
    return {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": "hi"}], **body}}


def test_a_body_without_model_gets_the_served_model():
    req = parse(chat(max_tokens=3))
    assert req.body.model == MODEL and req.body.max_tokens == 3 and req.line == 7
    assert parse({**chat(), "body": {"model": "other", "prompt": "x"}, "url": "/v1/completions"}).body.model == "other"


@pytest.mark.parametrize("line, param, code", [
    (b"{not json", None, "invalid_json"),
    (b"[1, 2]", None, "invalid_json"),
    ({"url": "/v1/completions", "body": {}}, "custom_id", "invalid_request"),
    ({**chat(), "custom_id": ""}, "custom_id", "invalid_request"),
    ({**chat(), "url": "/v1/embeddings"}, "url", "invalid_url"),
    ({**chat(), "method": "GET"}, "method", "invalid_request"),
    ({**chat(), "body": "text"}, "body", "invalid_request"),
    ({**chat(), "extra": 1}, "extra", "invalid_request"),
    (chat(max_tokens=0), "body.max_tokens", "invalid_request_error"),
    (chat(temperature=9), "body.temperature", "invalid_request_error"),
    (chat(messages=[]), "body.messages", "invalid_request_error"),
    (chat(stream=True), "body.stream", "invalid_request"),
    (chat(bogus_field=1), "body.bogus_field", "invalid_request_error"),
])
def test_bad_lines_name_the_line_and_field(line, param, code):
    with pytest.raises(LineError) as info:
        parse(line)
    e = info.value
    assert (e.line, e.param, e.code) == (7, param, code)
    assert str(e).startswith("line 7: ") and (param is None or param in str(e))
    out = error_line(e)
    assert out["error"]["line"] == 7 and out["error"]["param"] == param and out["custom_id"] == e.custom_id
    if code == "invalid_request_error":  # what the HTTP API would have answered: a 400 naming the field
        assert out["response"]["status_code"] == 400
        assert out["response"]["body"]["error"]["param"] == param.removeprefix("body.")


def test_an_online_batch_accepts_only_its_endpoint():
    with pytest.raises(LineError, match="url: must be /v1/completions"):
        parse(chat(), endpoints={"/v1/completions"})


def test_ledger_keys_results_by_custom_id_and_errors_by_line(tmp_path):
    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    body = {"usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}
    out.write_text(json.dumps(result_line("a", body)) + "\n" + json.dumps(result_line("b", body)) + "\n")
    err.write_text(json.dumps(error_line(LineError(4, "a", "custom_id: duplicate", "custom_id"))) + "\n"
                   + json.dumps(error_line(LineError(9, None, "not valid JSON")))[:-7])  # a cut-off last line
    ledger = Ledger.load(out, err)
    assert ledger.result_ids == {"a", "b"} and ledger.error_lines == {4}
    assert (ledger.prompt_tokens, ledger.completion_tokens) == (10, 6)
    assert err.read_text().count("\n") == 1 and err.read_text().endswith("\n")  # the partial line is gone
    assert ledger.is_done(1, "a", first_of_id=True)
    assert ledger.is_done(4, "a", first_of_id=False)  # the duplicate's error was written
    assert not ledger.is_done(6, "a", first_of_id=False)  # a later duplicate was not
    assert not ledger.is_done(9, None, first_of_id=True)  # its error line was cut off: redo it


def test_ledger_refuses_a_file_it_did_not_write(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text('{"something": "else"}\n')
    with pytest.raises(ValueError, match="out.jsonl:1"):
        Ledger.load(path)
