"""A chat-completions request body (OpenAI's schema) -> a validated ``Completion``: the prompt ids in the
exact format ``lavin-edge chat`` uses (``lavin_edge.prompt.conversation_ids``), the image, and the
sampling settings. Every problem is an ``APIError`` naming the field (``messages[2].content[0].image_url``).

Conversation mapping: ``system``/``developer`` text is put before the first user question (the prompt format
has no system slot); consecutive user messages are joined; each assistant message closes a turn (its text is
re-tokenized); the last message must be the user's. One image per conversation (the format has one image
slot, at the start), in any user message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lavin_edge.modality import IMAGE, TEXT
from lavin_edge.prompt import conversation_ids
from lavin_edge.runtime.sampling import GenerationConfig
from lavin_edge.serve.errors import APIError, bad_request
from lavin_edge.serve.images import ImageLimits, load_image_url

ROLES = ("system", "developer", "user", "assistant")
DEFAULT_MAX_TOKENS = 512
MAX_STOP = 4


@dataclass
class Completion:
    """One validated request."""

    ids: list[int]
    image_pos: int
    image: torch.Tensor | None  # preprocessed [3, S, S]
    gen: GenerationConfig
    max_tokens: int  # already within the context
    stream: bool = False
    include_usage: bool = False
    visual: torch.Tensor | None = None  # the image's visual tokens, once encoded
    ignore_eos: bool = False  # an extension (vLLM's and llama-server's name): exactly max_tokens, for benchmarks

    @property
    def modality(self) -> int:
        return IMAGE if self.image is not None else TEXT


def _number(body: dict[str, Any], name: str, default: float, lo: float, hi: float, lo_open: bool = False
            ) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise bad_request(f"{name} must be a number, got {type(v).__name__}", name)
    if v > hi or v < lo or (lo_open and v == lo):
        raise bad_request(f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}", name)
    return float(v)


def _int(body: dict[str, Any], name: str, lo: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad_request(f"{name} must be an integer, got {type(v).__name__}", name)
    if lo is not None and v < lo:
        raise bad_request(f"{name} must be >= {lo}, got {v}", name)
    return v


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise bad_request("stop must be a string or a list of strings", "stop")
    if len(items) > MAX_STOP:
        raise bad_request(f"stop takes at most {MAX_STOP} strings, got {len(items)}", "stop")
    return tuple(s for s in items if s)


def _content(msg: dict[str, Any], where: str, role: str, images: list[tuple[str, str]]) -> str:
    """A message's text; image parts (user messages only) are appended to ``images`` as (url, param)."""
    content = msg.get("content")
    if isinstance(content, str):
        return content
    if content is None:
        raise bad_request(f"{where}.content is missing (tool calls are not supported)", f"{where}.content")
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or a list of content parts", f"{where}.content")
    texts = []
    for j, part in enumerate(content):
        p = f"{where}.content[{j}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise bad_request(f"{p} must be an object with a type", p)
        kind = part["type"]
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise bad_request(f"{p}.text must be a string", f"{p}.text")
            texts.append(part["text"])
        elif kind == "image_url" and role == "user":
            iu = part.get("image_url")
            url = iu.get("url") if isinstance(iu, dict) else iu
            if not isinstance(url, str):
                raise bad_request(f"{p}.image_url must be an object with a url string", f"{p}.image_url")
            images.append((url, f"{p}.image_url"))
        else:
            allowed = "text or image_url" if role == "user" else "text"
            raise bad_request(f"{p}.type {kind!r} is not supported in a {role} message ({allowed})", f"{p}.type")
    return "\n".join(texts)


def parse_conversation(messages: Any) -> tuple[list[tuple[str, str]], str, tuple[str, str] | None]:
    """``messages`` -> ((question, answer) turns, the new question, the image (url, param) or None)."""
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list", "messages")
    system: list[str] = []
    turns: list[tuple[str, str]] = []
    pending: list[str] = []  # user text not yet answered
    images: list[tuple[str, str]] = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise bad_request(f"{where} must be an object", where)
        role = msg.get("role")
        if role not in ROLES:
            raise bad_request(f"{where}.role {role!r} is not supported (one of {', '.join(ROLES)})", f"{where}.role")
        text = _content(msg, where, role, images)
        if role in ("system", "developer"):
            if turns or pending:
                raise bad_request(f"{where}: {role} messages must come before the conversation", f"{where}.role")
            system.append(text)
        elif role == "user":
            pending.append(text)
        else:
            if not pending:
                raise bad_request(f"{where}: an assistant message must answer a user message", f"{where}.role")
            turns.append(("\n".join(pending), text))
            pending = []
    if not pending:
        raise bad_request("the last message must be the user's (there is nothing to answer)", "messages")
    if len(images) > 1:
        raise bad_request(f"{len(images)} images in the conversation: this model takes one image per conversation "
                          "(start a new conversation for another image)", images[1][1], "too_many_images")
    question = "\n".join(pending)
    if system:
        first = turns[0][0] if turns else question
        first = "\n".join(system) + "\n" + first
        if turns:
            turns[0] = (first, turns[0][1])
        else:
            question = first
    return turns, question, images[0] if images else None


def parse_completion(body: Any, tokenizer: Any, max_context: int, n_visual: int, image_size: int,
                     limits: ImageLimits, has_vision: bool = True) -> Completion:
    """A request body (already JSON-decoded) -> Completion; APIError on anything invalid."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    if "model" in body and not isinstance(body["model"], str):
        raise bad_request("model must be a string", "model")
    n = _int(body, "n", 1)
    if n not in (None, 1):
        raise bad_request("n must be 1 (one choice per request)", "n")
    if body.get("logprobs"):
        raise bad_request("logprobs are not supported", "logprobs")
    if body.get("tools"):
        raise bad_request("tools are not supported by this model", "tools")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request("stream must be a boolean", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool):
        raise bad_request("stream_options must be an object with a boolean include_usage", "stream_options")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise bad_request("ignore_eos must be a boolean", "ignore_eos")
    max_tokens = _int(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", 1)
    gen = GenerationConfig(temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                           top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
                           seed=_int(body, "seed"), stop_strings=_stop(body))
    turns, question, image_ref = parse_conversation(body.get("messages"))
    image = None
    if image_ref is not None:
        if not has_vision:
            raise bad_request("this model has no vision tower (text-only export)", image_ref[1])
        image = load_image_url(image_ref[0], limits, image_size, image_ref[1])
    if not question.strip():
        raise bad_request("the user's message has no text (ask a question about the image)", "messages")
    history = [(q, tokenizer.encode(a)) for q, a in turns]
    ids, image_pos = conversation_ids(tokenizer, history, question, n_visual if image is not None else 0)
    room = max_context - len(ids)
    if room < 1:
        raise bad_request(f"the prompt is {len(ids)} tokens and the model's context is {max_context} tokens "
                          "(the prompt must leave room for at least one new token)", "messages",
                          "context_length_exceeded")
    limit = min(max_tokens or DEFAULT_MAX_TOKENS, room)
    gen.max_new_tokens = limit
    return Completion(ids, image_pos, image, gen, limit, stream, bool(opts.get("include_usage", False)),
                      ignore_eos=ignore_eos)


def check_json_body(raw: bytes, max_body: int) -> Any:
    """The request's bytes -> JSON (400 malformed, 413 over ``max_body``)."""
    import json

    if len(raw) > max_body:
        raise APIError(413, f"request body of {len(raw)} bytes is over the limit of {max_body} bytes", None,
                       "request_too_large")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON ({e})", None, "invalid_json") from e
