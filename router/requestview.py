"""What the gateway reads of a generation request, and nothing more: the engine judges the rest.

A request the gateway can route goes to the engine, and the engine's answer, its errors included,
goes back to the client byte for byte. So the gateway reads only what routing, its own limits and
the relay need (:class:`RequestView`): the model (to pick a pool), the prompt (to key it: text,
token ids, a batch of either, chat messages of any role, a Responses API ``input``), whether the
answer streams, and the output limit and ``n`` its budgets charge. A field it cannot use is read as
absent (a prompt of an unknown shape keys as empty text, a ``max_tokens`` that is not a positive
integer as no limit) and left to the engine, which refuses it in its own words. The gateway itself
refuses only what it cannot route: a body that is not a JSON object, or one without a model name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import TypeAdapter, ValidationError

from tandem.openai_api import TandemPromptExtension
from tandem.router.tokenizer import Message

Kind = Literal["completion", "chat", "responses"]

#: The request path each kind is served on, upstream as here.
PATHS: dict[str, str] = {"completion": "/v1/completions", "chat": "/v1/chat/completions",
                         "responses": "/v1/responses"}

_BOOL = TypeAdapter(bool)  # lax, as the engines' own pydantic models read booleans ("true", 1)


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why the gateway refuses a body (400), naming the field when there is one: what it cannot
    route, and (``tandem.router.admission``) what it cannot parse or key."""

    message: str
    param: str | None = None


@dataclass(frozen=True, slots=True)
class RequestView:
    """The fields of a generation request the gateway uses (see the module docstring).

    ``prompts``: the completion prompts (one text or one token-id list per prompt of a batch);
    ``messages``: a chat or Responses conversation. ``output_limit`` 0: none given (or none usable)."""

    kind: Kind
    model: str
    stream: bool
    output_limit: int
    n: int
    prompts: tuple[str | tuple[int, ...], ...] = ()
    messages: tuple[Message, ...] | None = None
    x_tandem: TandemPromptExtension | None = None


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _flag(value: Any) -> bool:
    try:
        return _BOOL.validate_python(value)
    except ValidationError:
        return False  # not a boolean the engine would take either: it refuses the request


def _token_ids(value: Any) -> tuple[int, ...] | None:
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return tuple(value)
    return None


def completion_prompts(prompt: Any) -> tuple[str | tuple[int, ...], ...]:
    """The prompts of ``/v1/completions``: a text, token ids, or a batch of texts or of token-id lists."""
    if isinstance(prompt, str):
        return (prompt,)
    if (ids := _token_ids(prompt)) is not None:
        return (ids,)
    if isinstance(prompt, list):
        out: list[str | tuple[int, ...]] = []
        for p in prompt:
            if isinstance(p, str):
                out.append(p)
            elif (ids := _token_ids(p)) is not None:
                out.append(ids)
            else:
                return ()  # a batch of a shape the engine will judge: nothing to key
        return tuple(out)
    return ()


def content_text(content: Any) -> str:
    """A message's text: a string, or the text parts of a list joined by newlines (as vLLM flattens them)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(t for part in content if isinstance(part, dict) and isinstance(t := part.get("text"), str))
    return ""


def chat_messages(messages: Any) -> tuple[Message, ...]:
    """Every message of any role (the engine decides which roles it accepts) with its text."""
    if not isinstance(messages, list):
        return ()
    return tuple(Message(str(m.get("role", "")), content_text(m.get("content")))
                 for m in messages if isinstance(m, dict))


def responses_messages(data: dict[str, Any]) -> tuple[Message, ...]:
    """A Responses API request as a conversation: ``instructions`` as the system message, then ``input``
    (a text is one user message; a list holds message items, whose ``role`` and ``content`` count)."""
    out: list[Message] = []
    if isinstance(instructions := data.get("instructions"), str):
        out.append(Message("system", instructions))
    given = data.get("input")
    if isinstance(given, str):
        out.append(Message("user", given))
    elif isinstance(given, list):
        out.extend(chat_messages([item for item in given if isinstance(item, dict) and "role" in item]))
    return tuple(out)


def read_view(data: Any, kind: Kind) -> RequestView | Refusal:
    """The view of a parsed JSON body, or why it cannot be routed."""
    if not isinstance(data, dict):
        return Refusal("body: a JSON object is required")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        return Refusal("model: a model name is required to route the request", "model")
    x_tandem = None
    if data.get("x_tandem") is not None:
        try:
            x_tandem = TandemPromptExtension.model_validate(data["x_tandem"])
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in ("x_tandem", *err.get("loc", ())))
            return Refusal(f"{where}: {str(err.get('msg', 'invalid')).removeprefix('Value error, ')}", "x_tandem")
    if kind == "responses":
        limit = _positive_int(data.get("max_output_tokens"))
    else:
        limit = _positive_int(data.get("max_completion_tokens")) or _positive_int(data.get("max_tokens"))
    common = {"kind": kind, "model": model, "stream": _flag(data.get("stream", False)), "output_limit": limit or 0,
              "n": _positive_int(data.get("n")) or 1, "x_tandem": x_tandem}
    if kind == "completion":
        return RequestView(prompts=completion_prompts(data.get("prompt")), **common)
    if kind == "chat":
        return RequestView(messages=chat_messages(data.get("messages")), **common)
    return RequestView(messages=responses_messages(data), **common)


def batch_size(view: RequestView) -> int:
    """Prompts the request carries (a completion batch is several)."""
    return max(1, len(view.prompts)) if view.messages is None else 1


def prompt_texts(view: RequestView) -> Sequence[str]:
    """Every text the request's prompt holds (for checks on the text itself)."""
    if view.messages is not None:
        return [m.text for m in view.messages] + [m.role for m in view.messages]
    return [p for p in view.prompts if isinstance(p, str)]
