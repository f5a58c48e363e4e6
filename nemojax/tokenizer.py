"""Tokenizer and chat template of a checkpoint folder: ``tokenizer.json`` through ``tokenizers``, the chat
template from ``tokenizer_config.json`` through jinja2 (rendered the way transformers renders it)."""
from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Any, Sequence

__all__ = ["Tokenizer", "TokenizerError"]


class TokenizerError(ValueError):
    """A missing or invalid tokenizer.json / tokenizer_config.json / chat template."""


def _read_json(path: str) -> dict:
    """A JSON object from ``path`` ({} when there is no such file); TokenizerError naming the file otherwise."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise TokenizerError(f"{path}: not valid JSON (nested too deeply)") from None
    except IsADirectoryError:
        raise TokenizerError(f"{path}: is a folder, not a JSON file") from None
    if not isinstance(d, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def _token_ids(value, path: str, field: str, vocab: int) -> list[int]:
    """A token id or a list of them (``null``: none) from ``field`` of ``path``, each in [0, vocab)."""
    ids = [] if value is None else value if isinstance(value, list) else [value]
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TokenizerError(f"{path}: field {field!r}: expected an integer token id or a list of them, got "
                                 f"{value!r}")
        if not 0 <= i < vocab:
            raise TokenizerError(f"{path}: field {field!r}: token id {i} is outside the vocabulary [0, {vocab}) "
                                 f"of tokenizer.json")
    return ids


def _chat_template(cfg: dict, path: str) -> str | None:
    """tokenizer_config.json's ``chat_template``: a string, or a list of {"name", "template"} (the "default" one,
    else the first)."""
    t = cfg.get("chat_template")
    if isinstance(t, list):
        if not all(isinstance(x, dict) and isinstance(x.get("template"), str) for x in t):
            raise TokenizerError(f"{path}: field 'chat_template': a list must hold "
                                 f"{{\"name\": ..., \"template\": \"...\"}} objects")
        named = {x.get("name"): x["template"] for x in t}
        t = named.get("default") or next(iter(named.values()), None)
    if t is not None and not isinstance(t, str):
        raise TokenizerError(f"{path}: field 'chat_template': expected a string, got {type(t).__name__}")
    return t


class Tokenizer:
    """``encode``/``decode`` plus ``apply_chat_template`` and the stop token ids of a model folder."""

    def __init__(self, folder: str | os.PathLike):
        from tokenizers import Tokenizer as _Tok

        self.folder = os.fspath(folder)
        path = os.path.join(self.folder, "tokenizer.json")
        if not os.path.exists(path):
            raise TokenizerError(f"{self.folder}: no tokenizer.json")
        try:
            self._tok = _Tok.from_file(path)
        except Exception as e:  # tokenizers raises its own exception type
            raise TokenizerError(f"{path}: cannot be read by tokenizers ({e})") from None
        self.config_path = os.path.join(self.folder, "tokenizer_config.json")
        self.config = _read_json(self.config_path)
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            v = self.config.get(key)
            if v is not None and not isinstance(v, str) and not (isinstance(v, dict)
                                                                 and isinstance(v.get("content"), str)):
                raise TokenizerError(f"{self.config_path}: field {key!r}: expected a token string or "
                                     f"{{\"content\": \"...\"}}, got {v!r}")
        gen_path = os.path.join(self.folder, "generation_config.json")
        self.generation_config = _read_json(gen_path)
        for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
            ids = _token_ids(self.generation_config.get(key), gen_path, key, self.vocab_size)
            if key != "eos_token_id" and len(ids) > 1:
                raise TokenizerError(f"{gen_path}: field {key!r}: expected one token id, got {ids}")
        self.chat_template = _chat_template(self.config, self.config_path)
        self._template = None

    # ------------------------------------------------------------------ tokens
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def _special(self, key: str) -> str | None:
        v = self.config.get(key)
        return v.get("content") if isinstance(v, dict) else v

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    @property
    def stop_token_ids(self) -> list[int]:
        """End-of-turn ids: generation_config's eos ids, the eos token and ``<|im_end|>`` when present."""
        ids: list[int] = []
        eos = self.generation_config.get("eos_token_id")
        ids += eos if isinstance(eos, list) else ([eos] if eos is not None else [])
        for tok in (self._special("eos_token"), "<|im_end|>"):
            i = self.token_to_id(tok) if tok else None
            if i is not None:
                ids.append(i)
        return list(dict.fromkeys(int(i) for i in ids))

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, messages: list[dict[str, Any]], *, tools: list | None = None,
                            add_generation_prompt: bool = True, enable_thinking: bool = True, **kwargs) -> str:
        """Render a conversation with the checkpoint's jinja chat template."""
        if not self.chat_template:
            raise TokenizerError(f"{self.folder}: tokenizer_config.json has no chat_template")
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
        if self._template is None:
            self._template = _compile(self.chat_template, self.config_path)
        try:
            return self._template.render(
                messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
                enable_thinking=enable_thinking, bos_token=self._special("bos_token") or "",
                eos_token=self._special("eos_token") or "", **kwargs)
        except Exception as e:  # noqa: BLE001  (the template is the checkpoint's code: any failure is its own)
            raise TokenizerError(f"{self.config_path}: field 'chat_template' failed while rendering "
                                 f"({type(e).__name__}: {e})") from None


def _compile(source: str, where: str):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise jinja2.exceptions.TemplateError(msg)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise TokenizerError(f"{where}: field 'chat_template' is not valid jinja (line {e.lineno}: {e.message})") \
            from None
