"""The incremental output parser (nemojax.chat): every case fed at once, character by character and in random
splits must give the same hand-written reasoning / content / tool calls; random tag soup must parse the same
streamed as whole."""
from __future__ import annotations

import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nemojax.chat import Message, OutputParser, convert_value, parse


def tool(name, **props):
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": props}}}


WEATHER = tool("get_weather", city={"type": "string"}, days={"type": "integer"})
WRITE = tool("write_file", path={"type": "string"}, content={"type": "string"})
TYPED = tool("typed", i={"type": "integer"}, n={"type": "number"}, b={"type": "boolean"}, o={"type": "object"},
             a={"type": "array"}, z={"type": "null"}, s={"type": "string"},
             u={"anyOf": [{"type": "integer"}, {"type": "null"}]}, one={"oneOf": [{"type": "boolean"},
                                                                                  {"type": "string"}]},
             tl={"type": ["number", "null"]}, ns={"type": "string", "nullable": True})


def call(name, **args):
    return (name, args)


# (id, output text, tools, thinking, (reasoning, content, [(name, arguments)]))
CASES = [
    ("content_only", "  The answer is 5.\n", None, False, (None, "The answer is 5.", [])),
    ("reasoning_then_content", "step one\nstep two\n</think>\n\nThe answer is 5.", None, True,
     ("step one\nstep two", "The answer is 5.", [])),
    ("explicit_think_opens", "\n<think>\nwhy\n</think>ok", None, False, ("why", "ok", [])),
    ("explicit_think_when_thinking", "<think>why</think>ok", None, True, ("why", "ok", [])),
    ("empty_think_block", "<think></think>Hello there", None, False, ("", "Hello there", [])),
    ("empty_reasoning", "</think>\nHi", None, True, ("", "Hi", [])),
    ("truncated_reasoning", "still thinking about <b>it", None, True, ("still thinking about <b>it", None, [])),
    ("later_think_tags_are_text", "a <think> b </think> c", None, False, (None, "a <think> b </think> c", [])),
    ("reasoning_keeps_later_think", "x <think> y</think>z", None, True, ("x <think> y", "z", [])),
    ("near_tags_are_text", "if a <tool and b </thin or <function <tool_cal> <functio=x> <", None, False,
     (None, "if a <tool and b </thin or <function <tool_cal> <functio=x> <", [])),
    ("near_tags_in_reasoning", "a </thinker> <tool_calls x <function", None, True,
     ("a </thinker> <tool_calls x <function", None, [])),
    ("end_marker_ends_output", "r</think>done<|im_end|>\n<|im_start|>user\nmore", None, True, ("r", "done", [])),
    ("end_marker_mid_reasoning", "think<|endoftext|>rest", None, True, ("think", None, [])),
    ("one_call", "I need the weather.\n</think>\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n"
     "</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>\n", [WEATHER], True,
     ("I need the weather.", None, [call("get_weather", city="Paris", days=3)])),
    ("call_ends_reasoning", "let me call it\n<tool_call>\n<function=f>\n<parameter=x>\n1\n</parameter>\n"
     "</function>\n</tool_call>", None, True, ("let me call it", None, [call("f", x="1")])),
    ("bare_function_ends_reasoning", "hmm\n<function=f>\n<parameter=x>\n1\n</parameter>\n</function>\nok?",
     None, True, ("hmm", "ok?", [call("f", x="1")])),
    ("bare_function_block", "Sure.<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n</function>",
     [WEATHER], False, (None, "Sure.", [call("get_weather", city="Rome")])),
    ("parallel_calls", "Checking both.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nDallas\n</parameter>"
     "\n</function>\n</tool_call>\n<tool_call>\n<function=get_weather>\n<parameter=city>\nOrlando\n</parameter>\n"
     "<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>", [WEATHER], False,
     (None, "Checking both.", [call("get_weather", city="Dallas"), call("get_weather", city="Orlando", days=2)])),
    ("text_after_last_call", "Before.\n<tool_call>\n<function=f>\n</function>\n</tool_call>\n\nAfter.", None,
     False, (None, "Before.\n\n\nAfter.", [call("f")])),
    ("no_parameters", "<tool_call><function=now></function></tool_call>", None, False, (None, None, [call("now")])),
    ("tags_inside_value", "<tool_call>\n<function=write_file>\n<parameter=path>\na.html\n</parameter>\n"
     "<parameter=content>\n<div class=\"x\">\n<tool_call> <function=evil> </div>\n<parameter x>\n"
     "</function> tail\n</parameter> more\n</think>\n</parameter>\n</function>\n</tool_call>", [WRITE], False,
     (None, None, [call("write_file", path="a.html", content="<div class=\"x\">\n<tool_call> <function=evil> "
                        "</div>\n<parameter x>\n</function> tail\n</parameter> more\n</think>")])),
    ("function_keyword_in_code", "<tool_call>\n<function=write_file>\n<parameter=content>\nfunction f() {\n"
     "  return '<function=g>';\n}\n</parameter>\n<parameter=path>\nf.js\n</parameter>\n</function>\n</tool_call>",
     [WRITE], False, (None, None, [call("write_file", content="function f() {\n  return '<function=g>';\n}",
                                        path="f.js")])),
    ("drifted_close_markers", "<tool_call>\n<function=write_file>\n<parameter=path>\nx.txt\n</parameter1>\n"
     "<parameter=content>\nhi\n</parameter_name>\n</function>\n</tool_call>", [WRITE], False,
     (None, None, [call("write_file", path="x.txt", content="hi")])),
    ("missing_close_before_parameter", "Let me check:\n<tool_call>\n<function=get_weather>\n<parameter=city>\n"
     "Dallas\n<parameter=days>\n4\n</parameter>\n</function>\n</tool_call>", [WEATHER], False,
     (None, "Let me check:", [call("get_weather", city="Dallas", days=4)])),
    ("missing_close_before_function", "<tool_call>\n<function=get_weather>\n<parameter=city>\nLima\n</function>\n"
     "</tool_call>", [WEATHER], False, (None, None, [call("get_weather", city="Lima")])),
    ("one_newline_stripped", "<function=f>\n<parameter=x>\n\n  two\n\n</parameter>\n</function>", None, False,
     (None, None, [call("f", x="\n  two\n")])),
    ("indented_layout", " <tool_call>\n  <function=typed> <parameter=i>\n      30\n    </parameter>\n    "
     "<parameter=b>\n      false\n    </parameter>\n    <parameter=s>\n  kept as written\n</parameter>\n"
     "<parameter=extra>\n</parameter>\n  </function> </tool_call>\n\n", [TYPED], False,
     (None, None, [call("typed", i=30, b=False, s="  kept as written", extra="")])),
    ("typed_arguments", "<tool_call>\n<function=typed>\n<parameter=i>\n-42\n</parameter>\n<parameter=n>\n2.5e1\n"
     "</parameter>\n<parameter=b>\nTrue\n</parameter>\n<parameter=o>\n{'k': [True, None, 1.5], 'j': False}\n"
     "</parameter>\n<parameter=a>\n[1, \"two\", {\"three\": 3}]\n</parameter>\n<parameter=z>\nNone\n</parameter>\n"
     "<parameter=s>\n007\n</parameter>\n<parameter=u>\nnull\n</parameter>\n<parameter=one>\nfalse\n</parameter>\n"
     "<parameter=tl>\n3\n</parameter>\n<parameter=ns>\nNone\n</parameter>\n<parameter=extra>\n5\n</parameter>\n"
     "</function>\n</tool_call>", [TYPED], False,
     (None, None, [call("typed", i=-42, n=25.0, b=True, o={"k": [True, None, 1.5], "j": False},
                        a=[1, "two", {"three": 3}], z=None, s="007", u=None, one=False, tl=3, ns=None,
                        extra="5")])),
    ("unparseable_kept_as_string", "<function=typed>\n<parameter=i>\nforty\n</parameter>\n<parameter=o>\n"
     "{broken\n</parameter>\n<parameter=b>\nyes\n</parameter>\n<parameter=one>\nmaybe\n</parameter>\n</function>",
     [TYPED], False, (None, None, [call("typed", i="forty", o="{broken", b="yes", one="maybe")])),
    ("unknown_name_is_text", "Try.\n<tool_call>\n<function=nope>\n<parameter=x>\n1\n</parameter>\n</function>\n"
     "</tool_call>\n<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n</function>\n"
     "</tool_call>", [WEATHER], False,
     (None, "Try.\n<tool_call>\n<function=nope>\n<parameter=x>\n1\n</parameter>\n</function>\n</tool_call>",
      [call("get_weather", city="Oslo")])),
    ("unknown_name_in_reasoning_stays_reasoning", "plan <function=nope></function> more</think>ok", [WEATHER],
     True, ("plan <function=nope></function> more", "ok", [])),
    ("unclosed_call_is_text", "Calling.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n"
     "</parameter>\n", [WEATHER], False,
     (None, "Calling.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>", [])),
    ("unclosed_call_after_a_good_one", "<function=f>\n</function>\n<tool_call>\n<function=g>\n<parameter=y>\n2",
     None, False, (None, "<tool_call>\n<function=g>\n<parameter=y>\n2", [call("f")])),
    ("unclosed_call_in_reasoning", "thinking <tool_call>\n<function=f>\n<parameter=x>\n1", None, True,
     ("thinking <tool_call>\n<function=f>\n<parameter=x>\n1", None, [])),
    ("tool_call_tag_without_function", "see <tool_call> here </tool_call>", None, False,
     (None, "see <tool_call> here </tool_call>", [])),
    ("bad_function_name", "<function=a\nb>\n</function> and <function=>x</function>", None, False,
     (None, "<function=a\nb>\n</function> and <function=>x</function>", [])),
]


def check(msg: Message, exp) -> None:
    """msg has exactly the expected (reasoning, content, [(name, arguments)])."""
    reasoning, content, calls = exp
    assert msg.reasoning == reasoning
    assert msg.content == content
    got = [(c.name, json.loads(c.arguments)) for c in msg.tool_calls]
    # json.dumps tells True from 1 and 3 from 3.0, which == on Python values does not
    assert [(n, json.dumps(a, sort_keys=True)) for n, a in got] == \
        [(n, json.dumps(a, sort_keys=True)) for n, a in calls]


def stream(pieces, tools, thinking) -> Message:
    """The Message a client assembles from the deltas of feeding pieces one by one."""
    p = OutputParser(tools, thinking)
    deltas = [p.feed(x) for x in pieces] + [p.finish()]
    reasoning = "".join(d.reasoning for d in deltas)
    content = "".join(d.content for d in deltas)
    return Message(reasoning if p.reasoning_opened else None, content or None,
                   [c for d in deltas for c in d.tool_calls])


def cuts(text: str, points) -> list[str]:
    """text split at the given indices (clamped, deduplicated)."""
    points = sorted({min(max(0, k), len(text)) for k in points})
    return [text[a:b] for a, b in zip([0] + points, points + [len(text)])]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_case_at_once_and_char_by_char(case):
    _, text, tools, thinking, exp = case
    check(parse(text, tools, thinking), exp)
    check(stream([text], tools, thinking), exp)
    check(stream(list(text), tools, thinking), exp)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_case_random_splits(case, data):
    _, text, tools, thinking, exp = case
    points = data.draw(st.lists(st.integers(0, len(text)), max_size=12))
    check(stream(cuts(text, points), tools, thinking), exp)


def test_text_is_emitted_as_soon_as_it_cannot_be_a_tag():
    p = OutputParser(thinking=False)
    assert p.feed("a <tool").content == "a"          # " <tool" may still become "<tool_call>"
    assert p.feed("box> b").content == " <toolbox> b"
    assert p.feed(" </think").content == " </think"     # "</think>" ends only reasoning: not held here
    assert p.feed(">  ").content == ">"                 # whitespace is held until text follows it
    assert p.feed("c").content == "  c"
    p = OutputParser(thinking=True)
    assert p.feed("r </thi").reasoning == "r"
    d = p.feed("nk>\nx")
    assert (d.reasoning, d.content) == ("", "x")


def test_a_call_comes_out_when_it_closes():
    p = OutputParser([WEATHER], thinking=False)
    head = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n"
    assert not p.feed(head)                             # "</tool_call>" may follow
    d = p.feed("</tool_call>")
    assert [(c.name, c.arguments) for c in d.tool_calls] == [("get_weather", '{"city": "Paris"}')]
    assert not p.finish()
    with pytest.raises(RuntimeError, match="feed after finish"):
        p.feed("x")


@pytest.mark.parametrize("text,schema,want", [
    ("12", {"type": "integer"}, 12), ("12.0", {"type": "integer"}, 12), ("1.5", {"type": "integer"}, "1.5"),
    ("-0.25", {"type": "number"}, -0.25), ("1e400", {"type": "number"}, "1e400"), ("nan", {"type": "number"}, "nan"),
    ("FALSE", {"type": "boolean"}, False), ("null", {"type": "boolean"}, "null"),
    ("null", {"type": ["boolean", "null"]}, None), ("None", {"anyOf": [{"type": "string"}, {"type": "null"}]}, None),
    ("5", {"anyOf": [{"type": "string"}, {"type": "integer"}]}, "5"),
    ("5", {"anyOf": [{"type": "integer"}, {"type": "string"}]}, 5),
    ("(1, 'a')", {"type": "array"}, [1, "a"]), ("{1, 2}", {"type": "array"}, "{1, 2}"),
    ("[1]", {"type": "object"}, "[1]"), ('{"a": NaN}', {"type": "object"}, '{"a": NaN}'),
    ("{'a': None}", {"properties": {"a": {}}}, {"a": None}), ("[True]", {"items": {}}, [True]),
    ("b", {"enum": ["a", "b"]}, "b"), ("2", {"enum": [1, 2]}, 2), ("x", {"type": "float"}, "x"),
    ("2.5", {"type": "float"}, 2.5), ("42", {}, "42"), ("42", None, "42"), ("null", {"type": "string"}, "null"),
    ("[" * 2000 + "]" * 2000, {"type": "array"}, "[" * 2000 + "]" * 2000),
])
def test_convert_value(text, schema, want):
    got = convert_value(text, schema)
    assert json.dumps(got) == json.dumps(want)


TOKENS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<function=f>", "<function=g>", "<function=",
          "</function>", "<parameter=a>", "<parameter=b>", "</parameter>", "</parameter1>", "<|im_end|>", "<",
          ">", "</", "<tool", "<func", "</thi", "<think", "\n", " ", "  \n", "x", "1", "True", "[1, 2]", "=", "f>",
          "<|im", "</parameter", "<parameter="]
SOUP_TOOLS = [tool("f", a={"type": "integer"}, b={"type": "array"})]


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(st.sampled_from(TOKENS), max_size=40), points=st.lists(st.integers(0, 400), max_size=10),
       thinking=st.booleans(), tools=st.sampled_from([None, SOUP_TOOLS]))
def test_streaming_equals_full_parse_on_tag_soup(parts, points, thinking, tools):
    """However the text is split, nothing that the full parse reads as (part of) a tag is streamed as text,
    and nothing is lost or duplicated."""
    text = "".join(parts)
    full = parse(text, tools, thinking)
    for pieces in (cuts(text, points), list(text)):
        got = stream(pieces, tools, thinking)
        assert got == full
    if full.reasoning is None and not full.tool_calls:  # all of it was content, none lost
        assert full.content == (text.split("<|im_end|>")[0].strip() or None)


def render_call(name: str, args: dict) -> str:
    """A call written the way the Nemotron chat template writes one: lists / dicts as JSON, anything else
    through Python ``str`` (so ``True`` / ``False`` / ``None``)."""
    out = f"<tool_call>\n<function={name}>\n"
    for k, v in args.items():
        out += f"<parameter={k}>\n{json.dumps(v) if isinstance(v, (dict, list)) else v}\n</parameter>\n"
    return out + "</function>\n</tool_call>\n"


_JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False,
                     allow_infinity=False) | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                     max_leaves=8)
_TEXT = st.lists(st.sampled_from(["a", "b ", "\n", "<div>", "</div>", "<function=g>", "</parameter> x", "<tool_call>",
                                  "</think>", "True", "None", "3", " <parameter x>"]), max_size=8).map("".join)
ROUND_TRIP = {"s": ({"type": "string"}, _TEXT), "i": ({"type": "integer"}, st.integers(-10**20, 10**20)),
              "n": ({"type": "number"}, st.floats(allow_nan=False, allow_infinity=False)),
              "b": ({"type": "boolean"}, st.booleans()), "z": ({"type": ["object", "null"]}, st.none()),
              "o": ({"type": "object"}, st.dictionaries(st.text(max_size=4), _JSON, max_size=3)),
              "a": ({"type": "array"}, st.lists(_JSON, max_size=3))}
ROUND_TRIP_TOOLS = [tool("f", **{k: s for k, (s, _) in ROUND_TRIP.items()})]


@settings(max_examples=100, deadline=None)
@given(args=st.fixed_dictionaries({}, optional={k: v for k, (_, v) in ROUND_TRIP.items()}),
       points=st.lists(st.integers(0, 2000), max_size=10),
       reasoning=st.lists(st.sampled_from(["a", "b ", "\n", "<div>", "x < y", "<tool", "</thi"]), max_size=6).map(
           lambda p: "".join(p).strip()))
def test_template_written_calls_read_back(args, points, reasoning):
    """What the chat template writes for a call (Python-style scalars, JSON containers, values holding tags)
    reads back to the same arguments, the reasoning and the content around it too, in any split."""
    text = f"{reasoning}\n</think>\nCalling f.\n" + render_call("f", args) + render_call("f", {"b": True})
    want = (reasoning, "Calling f.", [("f", json.loads(json.dumps(args))), ("f", {"b": True})])
    check(parse(text, ROUND_TRIP_TOOLS, True), want)
    check(stream(cuts(text, points), ROUND_TRIP_TOOLS, True), want)


def test_tools_as_pydantic_models_and_bad_tools():
    from pydantic import BaseModel

    class Function(BaseModel):
        name: str
        parameters: dict

    class Tool(BaseModel):
        type: str
        function: Function

    t = Tool(type="function", function=Function(name="get_weather", parameters=WEATHER["function"]["parameters"]))
    m = parse("<function=get_weather>\n<parameter=days>\n2\n</parameter>\n</function>", [t], False)
    assert [(c.name, c.arguments) for c in m.tool_calls] == [("get_weather", '{"days": 2}')]
    with pytest.raises(ValueError, match=r"tools\[1\]"):
        OutputParser([WEATHER, {"type": "function", "function": {"description": "no name"}}])
    with pytest.raises(ValueError, match=r"tools\[0\]"):
        OutputParser(["get_weather"])


def test_no_tool_parsing_keeps_calls_as_text():
    """tool_calls=False (a request without tools): a well-formed call stays text where it stands, in any split."""
    text = ("<think>\nplan\n</think>\nbefore <tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n"
            "</parameter>\n</function>\n</tool_call> after")
    rng = random.Random()
    for _ in range(20):
        p = OutputParser(thinking=False, tool_calls=False)
        parts, i = [], 0
        while i < len(text):
            j = i + rng.randint(1, 7)
            parts.append(p.feed(text[i:j]))
            i = j
        parts.append(p.finish())
        assert "".join(d.reasoning for d in parts) == "plan"
        assert "".join(d.content for d in parts) == text[text.index("before"):]
        assert not any(d.tool_calls for d in parts)
    m = parse(text, thinking=False, tool_calls=False)
    assert m.tool_calls == [] and m.content == text[text.index("before"):] and m.reasoning == "plan"
    assert parse(text, thinking=False).tool_calls[0].name == "get_weather"
