"""Tool-call parsing over recorded-style model outputs: what becomes a call, what stays content, and
where a stream must start holding text back."""

from __future__ import annotations

import json

import pytest

from serving.api.tool_parsers import (
    PARSERS,
    HermesParser,
    JsonParser,
    Parsed,
    PythonicParser,
    ToolCall,
    detect_parser,
    get_parser,
)


def calls(parsed: Parsed) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls]


# ---- pythonic ----

def test_pythonic_list_of_calls():
    p = PythonicParser().parse('[get_weather(city="Paris", unit="c"), get_time(tz="UTC")]')
    assert p.content is None
    assert calls(p) == [("get_weather", {"city": "Paris", "unit": "c"}), ("get_time", {"tz": "UTC"})]


def test_pythonic_arguments_are_a_json_object_string():
    p = PythonicParser().parse('[f(city="Zürich")]')
    assert p.tool_calls == [ToolCall("f", '{"city": "Zürich"}')]  # ensure_ascii=False, like OpenAI


def test_pythonic_wrapped_in_python_tags_with_text_around():
    p = PythonicParser().parse('Let me check.<|python_start|>[f(a=1)]<|python_end|> Done.')
    assert calls(p) == [("f", {"a": 1})]
    assert p.content == "Let me check. Done."


def test_pythonic_python_start_without_end_and_bare_call_inside():
    p = PythonicParser().parse('<|python_start|>f(a="x")')
    assert calls(p) == [("f", {"a": "x"})] and p.content is None


def test_pythonic_text_before_the_list():
    p = PythonicParser().parse("Sure, checking both.\n[f(a=1), g(b=2)]")
    assert calls(p) == [("f", {"a": 1}), ("g", {"b": 2})]
    assert p.content == "Sure, checking both."


def test_pythonic_brackets_and_quotes_inside_strings_and_prose_after():
    p = PythonicParser().parse("Sure. [f(a='it\\'s ]', b=\"[(\")] I'll wait (don't worry) [1]")
    assert calls(p) == [("f", {"a": "it's ]", "b": "[("})]
    assert p.content == "Sure.  I'll wait (don't worry) [1]"


def test_pythonic_nested_values_and_both_literal_spellings():
    text = ('[search(q="a]b", filters={"tags": ["x", "y"], "range": [1, 2.5]}, '
            'exact=True, fuzzy=false, limit=None, cursor=null, neg=-3, deep=[[{"k": (1, 2)}]])]')
    assert calls(PythonicParser().parse(text)) == [("search", {
        "q": "a]b", "filters": {"tags": ["x", "y"], "range": [1, 2.5]},
        "exact": True, "fuzzy": False, "limit": None, "cursor": None, "neg": -3, "deep": [[{"k": [1, 2]}]],
    })]


def test_pythonic_names_dotted_underscored_digits_and_no_args():
    p = PythonicParser().parse("[brave_search.call(query=\"x\"), get_v2_time()]")
    assert calls(p) == [("brave_search.call", {"query": "x"}), ("get_v2_time", {})]


def test_pythonic_bare_call_is_the_whole_output():
    assert calls(PythonicParser().parse('  get_time(tz="Asia/東京")\n')) == [("get_time", {"tz": "Asia/東京"})]


def test_pythonic_unicode_arguments():
    p = PythonicParser().parse('Voilà : [traduire(texte="こんにちは 👋", langue="français")]')
    assert calls(p) == [("traduire", {"texte": "こんにちは 👋", "langue": "français"})]
    assert p.content == "Voilà :"


@pytest.mark.parametrize("text", [
    "see [1] for details",
    "[1, 2, 3]",
    "[f(1, 2)]",  # positional arguments
    "[f(a=x)]",  # a variable, not a literal
    "[f(a=1), 3]",  # a list mixing calls and non-calls
    "[f(**kw)]",
    "[f(a=1)",  # unbalanced
    '[f(a="open)]',
    "[os.system(cmd=__import__('os').getcwd())]",  # never evaluated
    "[f(a={1, 2})]",  # a set has no JSON form
    "[f(a=1) for f in g]",
    "[(f)(a=1)]",
    "print(x) is how you print.",
    "The list:[f(a=1)]",  # not after whitespace: the stream could not have held it back
    "",
])
def test_pythonic_non_calls_stay_content_unchanged(text):
    p = PythonicParser().parse(text)
    assert p.tool_calls == [] and p.content == text


def test_pythonic_skips_prose_brackets_before_a_real_call():
    p = PythonicParser().parse("As noted in [1] and [see(below)]: [f(a=[1])]")
    assert calls(p) == [("f", {"a": [1]})]
    assert p.content == "As noted in [1] and [see(below)]:"


@pytest.mark.parametrize("text, at", [
    ("", None),
    ("Hello world", None),
    ("see [1", None),
    ("see [ 1", None),
    ("[Paris (France)", None),
    ("Sure (I'll check", None),
    ("a[f(", None),
    ("see [", 4),
    ("see [ ", 4),
    ("see [get_wea", 4),
    ("[get_weather(", 0),
    ('[get_weather(city="Par', 0),
    ("ok\n[f(a=1), g(", 3),
    ("[f()", 0),
    ("Hello", 0),  # the first word could still be a bare call
    ('get_time(tz="', 0),
    ("hi <|python_start|>[f(", 3),
    ("hi <|python_st", 3),
    ("hi <", 3),
])
def test_pythonic_call_start(text, at):
    assert PythonicParser().call_start(text) == at


# ---- json ----

def test_json_single_object_with_parameters():
    p = JsonParser().parse('{"name": "get_weather", "parameters": {"city": "Paris"}}')
    assert calls(p) == [("get_weather", {"city": "Paris"})] and p.content is None


def test_json_python_tag_and_arguments_key():
    p = JsonParser().parse('<|python_tag|>{"name": "f", "arguments": {"x": [1, {"y": null}]}}')
    assert calls(p) == [("f", {"x": [1, {"y": None}]})]


def test_json_arguments_encoded_as_a_string():
    p = JsonParser().parse('{"name": "f", "parameters": "{\\"city\\": \\"Paris\\", \\"n\\": 2}"}')
    assert calls(p) == [("f", {"city": "Paris", "n": 2})]


def test_json_several_calls_by_semicolon_and_newline():
    text = '{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"t": true}}\n{"name": "c", "parameters": {}}'
    assert [n for n, _ in calls(JsonParser().parse(text))] == ["a", "b", "c"]


def test_json_list_of_calls():
    p = JsonParser().parse('[{"name": "a", "parameters": {"v": false}}, {"name": "b", "parameters": {}}]')
    assert calls(p) == [("a", {"v": False}), ("b", {})]


def test_json_text_before_the_call_and_unicode():
    p = JsonParser().parse('Je vérifie.\n{"name": "météo", "parameters": {"ville": "Orléans 🌧"}}')
    assert calls(p) == [("météo", {"ville": "Orléans 🌧"})]
    assert p.content == "Je vérifie."


@pytest.mark.parametrize("text", [
    '{"name": "f", "parameters": {"a": 1}',  # unbalanced
    '{"name": "f", "parameters": [1, 2]}',
    '{"name": "f", "parameters": "not json"}',
    '{"name": "f"}',  # a call names its arguments
    '{"name": "Ada", "age": 36}',
    '{"name": "", "parameters": {}}',
    "[1, 2, 3]",
    '[{"name": "f", "parameters": {}}, 3]',
    "[]",
    'Here it is: {"name": "f", "parameters": {}}',  # mid-line: the stream could not have held it back
    "{not json at all}",
    "<|python_tag|>",
])
def test_json_non_calls_stay_content_unchanged(text):
    p = JsonParser().parse(text)
    assert p.tool_calls == [] and p.content == text


@pytest.mark.parametrize("text, at", [
    ("", None),
    ("The set {1, 2}", None),
    ("[1, 2]", None),
    ("{", 0),
    ('{"name": "get_w', 0),
    ("[", 0),
    ("[ {", 0),
    ("Checking.\n{", 10),
    ("Checking.\n  {", 10),
    ("Sure <|python_tag|>{", 5),
    ("Sure <|python_t", 5),
])
def test_json_call_start(text, at):
    assert JsonParser().call_start(text) == at


# ---- hermes ----

def test_hermes_one_block():
    p = HermesParser().parse('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')
    assert calls(p) == [("get_weather", {"city": "Paris"})] and p.content is None


def test_hermes_text_between_blocks_nested_values_and_unicode():
    text = ('I will look both up.\n<tool_call>{"name": "a", "arguments": {"q": {"k": [1, [2]], "n": null}}}'
            '</tool_call>\nand\n<tool_call>{"name": "b", "arguments": {"s": "日本"}}</tool_call> done')
    p = HermesParser().parse(text)
    assert calls(p) == [("a", {"q": {"k": [1, [2]], "n": None}}), ("b", {"s": "日本"})]
    assert p.content == "I will look both up.\n\nand\n done"


def test_hermes_missing_final_close_tag_is_tolerated():
    p = HermesParser().parse('ok <tool_call>{"name": "f", "arguments": {"a": true}}\n')
    assert calls(p) == [("f", {"a": True})] and p.content == "ok"


def test_hermes_arguments_string_and_no_arguments():
    p = HermesParser().parse('<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>'
                             '<tool_call>{"name": "now"}</tool_call>')
    assert calls(p) == [("f", {"a": 1}), ("now", {})]


def test_hermes_bad_block_stays_content_and_good_one_still_parses():
    p = HermesParser().parse('<tool_call>{"name": "f", "arg</tool_call><tool_call>{"name": "g", "arguments": {}}'
                             '</tool_call>')
    assert calls(p) == [("g", {})]
    assert p.content == '<tool_call>{"name": "f", "arg</tool_call>'


@pytest.mark.parametrize("text", [
    '<tool_call>{"name": "f", "arguments": {"a": 1}',  # incomplete JSON at the end of the output
    '<tool_call>{"name": "f"}<tool_call>',  # unclosed, and not the last block
    "<tool_call>[1, 2]</tool_call>",
    '<tool_call>{"name": "f", "arguments": 3}</tool_call>',
    'Use {"name": "f", "arguments": {}} like this.',
    "plain answer",
])
def test_hermes_non_calls_stay_content_unchanged(text):
    p = HermesParser().parse(text)
    assert p.tool_calls == [] and p.content == text


@pytest.mark.parametrize("text, at", [
    ("", None),
    ("a < b and c > d", None),
    ("Let me check <tool_call>{", 13),
    ("Let me check <tool_c", 13),
    ("Let me check <", 13),
    ("a <tool_call>{}</tool_call> then <tool_call>", 2),
])
def test_hermes_call_start(text, at):
    assert HermesParser().call_start(text) == at


# ---- llama4: either form ----

@pytest.mark.parametrize("text", ['[get_weather(city="Paris")]', '{"name": "get_weather", "parameters": {"city": "Paris"}}',
                                  '<|python_start|>[get_weather(city="Paris")]<|python_end|>'])
def test_llama4_reads_both_forms(text):
    (call,) = get_parser("llama4").parse(text).tool_calls
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}


# ---- every parser ----

@pytest.mark.parametrize("name", sorted(PARSERS))
def test_streamed_prefixes_hold_back_every_call(name):
    """Whatever call_start lets through of a growing output must be content of the final parse."""
    outputs = {
        "pythonic": 'Sure, both.\n[get_weather(city="Paris"), get_time(tz="UTC")]',
        "json": 'Sure, both.\n{"name": "get_weather", "parameters": {"city": "Paris"}}',
        "hermes": 'Sure, both.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>',
        "llama4": 'Sure, both.\n{"name": "get_weather", "parameters": {"city": "Paris"}}',
    }
    parser, text = get_parser(name), outputs[name]
    final = parser.parse(text)
    assert final.tool_calls and final.content == "Sure, both."
    for end in range(len(text) + 1):
        at = parser.call_start(text[:end])
        streamed = text[:end] if at is None else text[:at]
        assert final.content.startswith(streamed.rstrip()), text[:end]


@pytest.mark.parametrize("name", sorted(PARSERS))
@pytest.mark.parametrize("text", [
    "[[[[", "{" * 5000, "[" * 5000 + "]" * 5000, "[f(a=" + "[" * 3000 + "]" * 3000 + ")]",
    "<tool_call>" + "[" * 5000 + "]" * 5000, "\x00", "<tool_call>\x00",
])
def test_parse_never_raises(name, text):
    assert get_parser(name).parse(text).content == text


def test_get_parser_by_name_and_unknown_name():
    assert isinstance(get_parser("hermes"), HermesParser) and get_parser("json").name == "json"
    with pytest.raises(ValueError, match="pythonic.*json.*hermes"):
        get_parser("mistral")


# Excerpts of the real chat templates (Hugging Face chat_template strings).
LLAMA4 = """{%- if message.role == "assistant" and 'tool_calls' in message %}
{{- '<|header_start|>assistant<|header_end|>\\n\\n' -}}{{- '<|python_start|>' }}
{%- elif message.role == "tool" or message.role == "ipython" %}
{{- "<|header_start|>ipython<|header_end|>\\n\\n" }}
{{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}"""
LLAMA31 = """{{- "Given the following functions, please respond with a JSON for a function call with its proper arguments" }}
{{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
{{- "<|python_tag|>" + tool_call.name + ".call(" }}
{%- if message.role == "tool" or message.role == "ipython" %}"""
LLAMA32_PYTHONIC = """You SHOULD NOT include any other text in the response if you call a function.
[func_name1(params_name1=params_value1, params_name2=params_value2...), func_name2(params)]
{%- if message.role == "tool" or message.role == "ipython" %}"""
QWEN25 = (
    '{{- "For each function call, return a json object with function name and arguments within '
    '<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, '
    '\\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}'
)
HERMES_WITH_PARAMETERS = """{{- '"parameters": ' + tool.parameters|tojson }} For each function call return a json
object within <tool_call></tool_call> XML tags"""
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>' + '\\n'}}{% endfor %}"
)


@pytest.mark.parametrize("template, expected", [
    (LLAMA4, "llama4"),  # its template asks for JSON; the model also writes the pythonic form
    (LLAMA32_PYTHONIC, "pythonic"),
    (LLAMA31, "json"),
    ('Respond in the format {"name": function name, "parameters": ...} for a function call', "json"),
    (QWEN25, "hermes"),
    (HERMES_WITH_PARAMETERS, "hermes"),
    (CHATML, "hermes"),
    (None, "hermes"),
])
def test_detect_parser(template, expected):
    assert detect_parser(template) == expected
