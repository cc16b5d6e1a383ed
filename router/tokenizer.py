"""The engine's own tokenizer and chat template, for routing keys and prompt lengths that match the engine's.

``--tokenizer`` names a ``tokenizer.json`` (Hugging Face ``tokenizers`` format) or the model folder that
holds one. A ``tokenizer_config.json`` beside it may carry the model's ``chat_template`` (Jinja, rendered
in a sandbox as Hugging Face renders it, with ``add_generation_prompt`` on: what vLLM does for a chat
request by default); then a chat prompt is tokenized as the engine sees it, role markers and all, and
its token count agrees with the engine's ``usage.prompt_tokens``. Without a template (or when it fails to
render a conversation) the gateway keys a chat on its own approximation: one ``<|role|>`` marker line per
message, then the message text (:func:`approximate_chat`); lengths are then approximate.

Text prompts of ``/v1/completions`` are tokenized with the tokenizer's special tokens (a BOS, when its
post-processor adds one), chat renderings without (the template writes them), as vLLM does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class Message:
    """A chat message as routing reads it: its role and its text (text parts joined by newlines)."""

    role: str
    text: str


class Tokenizer(Protocol):
    """Text -> token ids (as strings: the block hashing joins them)."""

    def __call__(self, text: str, *, special: bool = False) -> list[str]: ...


class ChatRenderer(Protocol):
    """A conversation -> the prompt text the engine tokenizes (None: this conversation cannot be rendered)."""

    def render(self, messages: Sequence[Message]) -> str | None: ...


@dataclass(frozen=True, slots=True)
class EngineTokenizer:
    """The loaded tokenizer and, when the model has one, its chat template."""

    encode: Tokenizer
    chat: ChatRenderer | None


def approximate_chat(messages: Sequence[Message]) -> str:
    """The gateway's own rendering when it has no chat template: a role marker line per message."""
    return "".join(f"<|{m.role}|>\n{m.text}\n" for m in messages)


def load_tokenizer(path: Path) -> EngineTokenizer:
    """``path``: a ``tokenizer.json`` or a folder holding one; its ``tokenizer_config.json`` gives the template."""
    try:
        from tokenizers import Tokenizer as HFTokenizer
    except ImportError:
        raise ValueError("tokenizer: needs the 'tokenizers' package (pip install 'tandem-serving[tokenizer]')") \
            from None
    file = path / "tokenizer.json" if path.is_dir() else path
    try:
        tok = HFTokenizer.from_file(str(file))
    except Exception as exc:  # the library raises plain Exception for unreadable or malformed files
        raise ValueError(f"tokenizer: cannot load {file}: {exc}") from None

    def encode(text: str, *, special: bool = False) -> list[str]:
        return [str(i) for i in tok.encode(text, add_special_tokens=special).ids]

    return EngineTokenizer(encode=encode, chat=_chat_template(file.parent / "tokenizer_config.json"))


def _special(value: Any) -> str:
    """A special token of tokenizer_config.json: a string, or an AddedToken mapping with ``content``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


class JinjaChatTemplate:
    """A model's chat template, rendered in Jinja's immutable sandbox (templates are data, not code)."""

    def __init__(self, source: str, bos_token: str, eos_token: str) -> None:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = raise_exception
        self.template = env.from_string(source)
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(self, messages: Sequence[Message]) -> str | None:
        from jinja2.exceptions import TemplateError

        try:
            return self.template.render(messages=[{"role": m.role, "content": m.text} for m in messages],
                                        add_generation_prompt=True, bos_token=self.bos_token,
                                        eos_token=self.eos_token)
        except (TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError):
            return None  # a conversation this template refuses: the engine will say why; keyed approximately


def _chat_template(config: Path) -> JinjaChatTemplate | None:
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return None
    source = data.get("chat_template") if isinstance(data, dict) else None
    if isinstance(source, list):  # several named templates: the default one
        source = next((t.get("template") for t in source if isinstance(t, dict) and t.get("name") == "default"),
                      None)
    if not isinstance(source, str) or not source:
        return None
    try:
        return JinjaChatTemplate(source, _special(data.get("bos_token")), _special(data.get("eos_token")))
    except ImportError:
        raise ValueError("tokenizer: its chat template needs the 'jinja2' package "
                         "(pip install 'tandem-serving[tokenizer]')") from None
    except Exception as exc:  # a template Jinja cannot compile
        raise ValueError(f"tokenizer: the chat template of {config} does not compile: {exc}") from None
