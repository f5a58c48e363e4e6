"""Assistant output parsing, incremental: ``<think>…</think>`` reasoning, content, and Nemotron / Qwen3-Coder
tool calls (``<tool_call><function=NAME><parameter=ARG>VALUE</parameter></function></tool_call>``).

``OutputParser.feed(piece)`` takes decoded text in any split (even mid-tag) and returns a ``Delta``;
``parse(text)`` is the same parser fed everything at once, so a stream and a full parse always agree.

Rules (one scan for both):

* ``thinking=True``: the output starts inside reasoning (the prompt ended with ``<think>``). A leading
  ``<think>`` also opens reasoning; ``</think>`` ends it, and so does a tool call. Later ``<think>`` tags, and
  ``</think>`` outside reasoning, are text.
* Reasoning and content are each the text routed to them with the call blocks cut out, stripped at both ends
  (the chat template writes ``<think>\\n`` + reasoning + ``\\n</think>\\n`` + content, so the strip round-trips).
* A call is ``[<tool_call>] <function=NAME> (<parameter=P>VALUE</parameter>)* </function> [</tool_call>]``. A
  value ends at ``</parameter`` (drifted spellings like ``</parameter1>`` too) followed by whitespace and then
  ``<parameter=`` or ``</function>``; any other tag-like text is part of the value. A forgotten
  ``</parameter>`` is tolerated before a line starting ``<parameter=``, or before ``</function>`` followed by
  ``</tool_call>`` or the end of output. One leading and one trailing newline of a value are dropped.
* A call with an unknown name (when tools are given) or without ``</function>`` stays text where it stands.
* ``<|im_end|>`` / ``<|endoftext|>`` end the output (normally stop tokens, removed upstream).
"""
from __future__ import annotations

import ast
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Delta", "Message", "OutputParser", "ToolCall", "convert_value", "parse", "parse_response"]

THINK, END_THINK, TOOL_CALL, END_TOOL_CALL = "<think>", "</think>", "<tool_call>", "</tool_call>"
FUNCTION, END_FUNCTION, PARAMETER = "<function=", "</function>", "<parameter="
END_MARKERS = ("<|im_end|>", "<|endoftext|>")
_NAME = re.compile(r"[^<>\n]{0,256}")              # a function or parameter name, up to its ">"
_CLOSE = re.compile(r"</parameter([^<>\n]{0,32})(>)?")  # "</parameter>" and drifted spellings
_CLOSE_DONE = re.compile(r"</parameter[^<>\n]{0,32}>")
_VALUE_STOP = re.compile(r"</parameter|</function>|\n<parameter=")


@dataclass
class ToolCall:
    """One complete call: ``arguments`` is a JSON object string, values converted by the tool's schema."""
    name: str
    arguments: str


@dataclass
class Delta:
    """What one ``feed`` / ``finish`` adds: reasoning text, content text, and calls that closed."""
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)


@dataclass
class Message:
    """A whole output. reasoning: None when the output had no reasoning part; content: None when empty."""
    reasoning: str | None
    content: str | None
    tool_calls: list[ToolCall]


# ---------------------------------------------------------------------------------------------------------
# Argument conversion by JSON schema
# ---------------------------------------------------------------------------------------------------------

_INT = re.compile(r"[-+]?\d+")
_FLOAT = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_ALIASES = {"int": "integer", "float": "number", "double": "number", "bool": "boolean", "dict": "object",
            "list": "array", "str": "string"}
_PY_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string", type(None): "null",
             dict: "object", list: "array"}


def schema_types(schema: Any) -> list[str]:
    """The JSON types a schema allows, in its order: ``type`` (a name or a list), ``anyOf`` / ``oneOf`` /
    ``allOf``, ``nullable``, ``enum`` / ``const`` values, ``properties`` (object) / ``items`` (array)."""
    if not isinstance(schema, dict):
        return []
    out: list[str] = []
    t = schema.get("type")
    out += [_ALIASES.get(n.strip().lower(), n.strip().lower()) for n in (t if isinstance(t, list) else [t])
            if isinstance(n, str)]
    for key in ("anyOf", "oneOf", "allOf"):
        for sub in schema.get(key) if isinstance(schema.get(key), list) else []:
            out += schema_types(sub)
    if schema.get("nullable") is True:
        out.append("null")
    values = list(schema.get("enum") or []) + ([schema["const"]] if "const" in schema else [])
    out += [_PY_TYPES.get(type(v), "string") for v in values]
    if not out and "properties" in schema:
        out.append("object")
    if not out and "items" in schema:
        out.append("array")
    return list(dict.fromkeys(out))


def _jsonable(x: Any) -> Any:
    """x with tuples as lists; ValueError if it is not plain JSON data (sets, bytes, non-finite floats...)."""
    if x is None or isinstance(x, (bool, int, str)):
        return x
    if isinstance(x, float):
        if not math.isfinite(x):
            raise ValueError("non-finite number")
        return x
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, dict) and all(isinstance(k, str) for k in x):
        return {k: _jsonable(v) for k, v in x.items()}
    raise ValueError(f"not JSON data: {type(x).__name__}")


def _as_type(text: str, kind: str) -> Any:
    """text read as JSON type ``kind``; ValueError when it is not one."""
    s = text.strip()
    if kind == "string":
        return text
    if kind == "null" and s in ("null", "None"):
        return None
    if kind == "boolean" and s.lower() in ("true", "false"):
        return s.lower() == "true"
    if kind in ("integer", "number") and _INT.fullmatch(s):
        return int(s)
    if kind in ("integer", "number") and _FLOAT.fullmatch(s):
        v = float(s)
        if math.isfinite(v) and (kind == "number" or v.is_integer()):
            return int(v) if kind == "integer" else v
    if kind in ("object", "array"):
        try:
            try:
                v = json.loads(s)
            except ValueError:  # Python literals, as the chat template writes them: True / False / None
                v = ast.literal_eval(s)
            v = _jsonable(v)
            json.dumps(v)  # nested too deeply to write back?
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise ValueError(f"not {kind}") from None
        if isinstance(v, dict if kind == "object" else list):
            return v
    raise ValueError(f"not {kind}")


def convert_value(text: str, schema: Any) -> Any:
    """A parameter's raw text as the first type of the schema that reads it (null first: ``null`` / ``None``
    when the schema allows null); the text itself when no type reads it or the schema names none."""
    kinds = schema_types(schema)
    for kind in (["null"] if "null" in kinds else []) + [k for k in kinds if k != "null"]:
        try:
            return _as_type(text, kind)
        except ValueError:
            pass
    return text


def _tool_schemas(tools: list | None) -> dict[str, dict]:
    """{function name: its parameters' property schemas} from OpenAI-style tools: ``{"type": "function",
    "function": {"name", "parameters"}}``, the bare function dict, or pydantic models of either."""
    out = {}
    for n, t in enumerate(tools or []):
        t = t.model_dump() if hasattr(t, "model_dump") else t
        fn = t.get("function", t) if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ValueError(f"tools[{n}]: expected {{'type': 'function', 'function': {{'name': ...}}}}, got {t!r:.80}")
        params = fn.get("parameters") if isinstance(fn.get("parameters"), dict) else {}
        props = params.get("properties")
        out[fn["name"]] = props if isinstance(props, dict) else {}
    return out


# ---------------------------------------------------------------------------------------------------------
# One call block
# ---------------------------------------------------------------------------------------------------------

class _More(Exception):
    """The buffer ends before the call's shape is decided."""


class _Bad(Exception):
    """Not a call."""


def _at(buf: str, i: int, lit: str, final: bool) -> bool:
    """buf[i:] starts with lit; _More when it is a proper prefix of lit and more text may come."""
    if buf.startswith(lit, i):
        return True
    if not final and len(buf) - i < len(lit) and lit.startswith(buf[i:]):
        raise _More
    return False


def _skip_ws(buf: str, i: int) -> int:
    while i < len(buf) and buf[i].isspace():
        i += 1
    return i


def _name(buf: str, i: int, final: bool) -> tuple[str, int]:
    """The name at buf[i:] up to ">" (no newline or "<"), stripped, and the index after ">"."""
    e = _NAME.match(buf, i).end()
    if e == len(buf):
        if final:
            raise _Bad
        raise _More
    name = buf[i:e].strip()
    if buf[e] != ">" or not name:
        raise _Bad
    return name, e + 1


def _value_end(buf: str, i: int, final: bool, memo: dict) -> tuple[int, int]:
    """(end of the value starting at i, where the scan goes on). A value ends at the first of: a close marker
    followed by whitespace and ``<parameter=`` / ``</function>``; a line starting ``<parameter=`` (its close
    tag forgotten); ``</function>`` followed by whitespace and ``</tool_call>`` or the end of output. In the
    last two cases a close marker left inside the value still ends it (what follows it is dropped).

    memo[i]: where the search resumes (candidates before it were ruled out) or the answer, so a long value
    streamed in many pieces is scanned once, not once per piece."""
    k = memo.get(i, i)
    if isinstance(k, tuple):
        return k
    while True:
        m = _VALUE_STOP.search(buf, k)
        if m is None:
            memo[i] = max(k, len(buf) - 12)  # a stop string may be starting in the last 11 characters
            if final:
                raise _Bad
            raise _More
        k = memo[i] = m.start()
        found = None
        if m.group() == "</parameter":
            c = _CLOSE.match(buf, k)
            if c.group(2) is None:
                if c.end() == len(buf) and not final:
                    raise _More
            else:
                p = _skip_ws(buf, c.end())
                if p == len(buf) and not final:
                    raise _More
                if _at(buf, p, PARAMETER, final) or _at(buf, p, END_FUNCTION, final):
                    found = k, p
        elif m.group() == END_FUNCTION:
            q = _skip_ws(buf, m.end())
            if q == len(buf) and not final:
                raise _More
            if q == len(buf) or _at(buf, q, END_TOOL_CALL, final):
                found = _cut(buf, i, k), k
        else:  # "\n<parameter="
            found = _cut(buf, i, k + 1), k + 1
        if found:
            memo[i] = found
            return found
        k += 1


def _cut(buf: str, i: int, end: int) -> int:
    """end, or the start of the last complete close marker in buf[i:end]."""
    last = None
    for last in _CLOSE_DONE.finditer(buf, i, end):
        pass
    return last.start() if last else end


def _strip_newline(v: str) -> str:
    v = v[1:] if v.startswith("\n") else v
    return v[:-1] if v.endswith("\n") else v


def _tail(buf: str, i: int, final: bool) -> int:
    """The end of a call whose ``</function>`` ends at i: an optional ``</tool_call>`` after whitespace."""
    q = _skip_ws(buf, i)
    if q == len(buf) and not final:
        raise _More
    return q + len(END_TOOL_CALL) if _at(buf, q, END_TOOL_CALL, final) else i


def scan_call(buf: str, final: bool, memo: dict | None = None) -> tuple[int, str, dict[str, str]] | None:
    """Read the call block at the start of buf (which starts with ``<tool_call>`` or ``<function=``).

    Returns (its length, name, {parameter: raw value}); None when it is not a call. Raises _More when the
    answer depends on text not yet in buf (never when final: buf is then the whole rest of the output).
    memo: kept by the caller between scans of the same growing buf (see _value_end)."""
    memo = {} if memo is None else memo
    i = 0
    if buf.startswith(TOOL_CALL):
        i = _skip_ws(buf, len(TOOL_CALL))
        if i == len(buf) and not final:
            raise _More
        if not _at(buf, i, FUNCTION, final):
            return None
    try:
        name, i = _name(buf, i + len(FUNCTION), final)
    except _Bad:
        return None
    args = {}
    try:
        while True:
            i = _skip_ws(buf, i)
            if i == len(buf) and not final:
                raise _More
            if _at(buf, i, END_FUNCTION, final):
                return _tail(buf, i + len(END_FUNCTION), final), name, args
            if not _at(buf, i, PARAMETER, final):
                raise _Bad
            key, start = _name(buf, i + len(PARAMETER), final)
            end, i = _value_end(buf, start, final, memo)
            args[key] = _strip_newline(buf[start:end])
    except _Bad:
        return None


# ---------------------------------------------------------------------------------------------------------
# The incremental parser
# ---------------------------------------------------------------------------------------------------------

def _held(buf: str, tags: tuple[str, ...]) -> int:
    """Length of the longest suffix of buf that is a proper prefix of one of tags (may still become it)."""
    for n in range(min(len(buf), max(map(len, tags)) - 1), 0, -1):
        tail = buf[-n:]
        if any(len(t) > n and t.startswith(tail) for t in tags):
            return n
    return 0


_REASONING_TAGS = (END_THINK, TOOL_CALL, FUNCTION)
_CONTENT_TAGS = (TOOL_CALL, FUNCTION)
_FIND = {tags: re.compile("|".join(map(re.escape, tags))) for tags in (_REASONING_TAGS, _CONTENT_TAGS)}
_FIND_END = re.compile("|".join(map(re.escape, END_MARKERS)))


class OutputParser:
    """Decoded-text pieces -> ``Delta`` s. Text that may still become a tag is held back until it cannot.

    tools: OpenAI-style tool list (argument schemas; when non-empty, calls to other names stay text).
    thinking: the prompt ended inside an open ``<think>`` block (``enable_thinking=True``).
    tool_calls: False when the request offers no tools (``tool_choice`` none, as vLLM): call blocks stay text."""

    def __init__(self, tools: list[dict] | None = None, thinking: bool = True, tool_calls: bool = True):
        self.schemas = _tool_schemas(tools)
        self.check_names = bool(tools)
        self.tool_calls = tool_calls
        self.in_reasoning = bool(thinking)
        self.reasoning_opened = bool(thinking)   # the output had a reasoning part (maybe empty)
        self._at_start = True                    # only whitespace so far: a "<think>" opens reasoning
        self._raw = ""                           # held back: may be the start of an end marker
        self._buf = ""                           # held back: may be the start of a tag or an open call
        self._ended = False                      # an end marker came: the rest is ignored
        self._finished = False
        self._started = {"reasoning": False, "content": False}
        self._ws = {"reasoning": "", "content": ""}  # trailing whitespace held until text follows it
        self._memo: dict = {}                    # scan_call's memo for the call open at the start of _buf

    def feed(self, text: str) -> Delta:
        """The next piece of decoded output (any split) -> what is now certain."""
        if self._finished:
            raise RuntimeError("OutputParser.feed after finish()")
        out = Delta()
        if not self._ended:
            self._raw += text
            m = _FIND_END.search(self._raw)
            if m:
                self._buf, self._raw, self._ended = self._buf + self._raw[:m.start()], "", True
            else:
                n = _held(self._raw, END_MARKERS)
                self._buf, self._raw = self._buf + self._raw[:len(self._raw) - n], self._raw[len(self._raw) - n:]
            self._run(out, final=False)
        return out

    def finish(self) -> Delta:
        """End of output: everything held back is decided (open calls without ``</function>`` become text)."""
        if self._finished:
            return Delta()
        self._finished = True
        out = Delta()
        self._buf, self._raw = self._buf + self._raw, ""
        self._run(out, final=True)
        return out

    def _emit(self, out: Delta, text: str) -> None:
        """Route text to reasoning or content; each is stripped at both ends, inner whitespace kept."""
        ch = "reasoning" if self.in_reasoning else "content"
        text = self._ws[ch] + text
        if not self._started[ch]:
            text = text.lstrip()
        body = text.rstrip()
        self._ws[ch] = text[len(body):]
        if body:
            self._started[ch] = True
            setattr(out, ch, getattr(out, ch) + body)

    def _run(self, out: Delta, final: bool) -> None:
        buf = self._buf
        while buf:
            if self._at_start:
                s = buf.lstrip()
                if not s or (not final and len(s) < len(THINK) and THINK.startswith(s)):
                    break
                self._at_start = False
                if s.startswith(THINK):
                    buf, self.in_reasoning, self.reasoning_opened = s[len(THINK):], True, True
                    continue
            tags = _REASONING_TAGS if self.in_reasoning else _CONTENT_TAGS
            m = _FIND[tags].search(buf)
            if m is None:
                n = 0 if final else _held(buf, tags)
                self._emit(out, buf[:len(buf) - n])
                buf = buf[len(buf) - n:]
                break
            if m.start():
                self._emit(out, buf[:m.start()])
                buf, self._memo = buf[m.start():], {}
            if m.group() == END_THINK:
                buf, self.in_reasoning = buf[len(END_THINK):], False
                continue
            try:
                call = scan_call(buf, final, self._memo)
            except _More:
                break
            self._memo = {}
            if call is None:  # not a call: its opening tag is text
                self._emit(out, m.group())
                buf = buf[len(m.group()):]
                continue
            n, name, args = call
            if not self.tool_calls or (self.check_names and name not in self.schemas):
                self._emit(out, buf[:n])
            else:
                props = self.schemas.get(name, {})
                values = {k: convert_value(v, props.get(k)) for k, v in args.items()}
                out.tool_calls.append(ToolCall(name, json.dumps(values, ensure_ascii=False)))
                self.in_reasoning = False
            buf = buf[n:]
        self._buf = buf


def parse(text: str, tools: list | None = None, thinking: bool = True, tool_calls: bool = True) -> Message:
    """The whole output at once: ``OutputParser(tools, thinking, tool_calls)`` fed text, then finished. Like
    vLLM's reasoning parsers, reasoning is "" for an empty reasoning part and None when the output had none."""
    p = OutputParser(tools, thinking, tool_calls)
    a, b = p.feed(text), p.finish()
    reasoning = a.reasoning + b.reasoning
    return Message(reasoning=reasoning if p.reasoning_opened else None, content=(a.content + b.content) or None,
                   tool_calls=a.tool_calls + b.tool_calls)


def parse_response(text: str, *, thinking: bool = True, tools: list | None = None) -> dict:
    """``{"reasoning", "content", "tool_calls": [{"name", "arguments": {...}}]}`` of a whole output (the
    ``generate`` CLI's JSON): ``parse`` with content "" when empty and the arguments decoded."""
    m = parse(text, tools, thinking)
    return {"reasoning": m.reasoning, "content": m.content or "",
            "tool_calls": [{"name": c.name, "arguments": json.loads(c.arguments)} for c in m.tool_calls]}
