"""What one proxied request used: tokens, images, videos and runtime.

Token counts come from OpenAI-style ``usage`` objects (``prompt_tokens`` and
``completion_tokens``), in a JSON response or in any chunk of a server-sent event
stream (OpenAI puts it in the final one). Images are the ``data`` array of an images
response, videos the ``data`` array of a response on a ``/videos`` path. The tap sees
the response as it streams past and never delays it: it keeps at most ``MAX_JSON_BYTES``
of a JSON body and only the current line of an event stream.

A stream cut before its final usage chunk (the client left, the replica died) is read
as: completion tokens = the content-bearing choice deltas delivered (OpenAI-compatible
servers send one token per chunk), prompt tokens = 0 (unknown without the server's
count; the caller's favour). Once any usage object was seen, the last one wins.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

MAX_JSON_BYTES = 8 * 2**20


@dataclass
class Counts:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    images: int = 0
    videos: int = 0


def _nonneg(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return 0
    return value


def counts_from_json(doc: Any, path: str) -> Counts:
    """Usage in one JSON document (a whole response or one SSE chunk)."""
    out = Counts()
    if not isinstance(doc, dict):
        return out
    usage = doc.get("usage")
    if isinstance(usage, dict):
        out.prompt_tokens = _nonneg(usage.get("prompt_tokens", usage.get("input_tokens")))
        out.completion_tokens = _nonneg(usage.get("completion_tokens", usage.get("output_tokens")))
    data = doc.get("data")
    if isinstance(data, list):
        if "/videos" in path:
            out.videos = len(data)
        elif "/images" in path:
            out.images = len(data)
    return out


class UsageTap:
    """Fed every response chunk; ``result()`` is the usage once the response ended."""

    def __init__(self, path: str, content_type: str) -> None:
        self.path = path
        ctype = content_type.split(";")[0].strip().lower()
        self.sse = ctype == "text/event-stream"
        self.json = ctype.endswith("/json") or ctype.endswith("+json")
        self._buf = bytearray()
        self._overflow = False
        self._counts = Counts()
        self._usage_seen = False
        self._deltas = 0  # content-bearing choice deltas seen (a cut stream's tokens)

    def feed(self, chunk: bytes) -> None:
        if self.sse:
            self._buf += chunk
            *lines, rest = self._buf.split(b"\n")
            self._buf = bytearray(rest)
            for line in lines:
                self._line(bytes(line))
        elif self.json and not self._overflow:
            if len(self._buf) + len(chunk) > MAX_JSON_BYTES:
                self._overflow = True
                self._buf = bytearray()
            else:
                self._buf += chunk

    def ends_stream(self, chunk: bytes) -> bool:
        """Whether ``chunk`` (not fed yet) completes the event stream's ``data: [DONE]``
        line: a whole line, not the text ``[DONE]`` inside some generated content."""
        if not self.sse or b"[DONE]" not in self._buf[-16:] + chunk:
            return False
        lines = (bytes(self._buf) + chunk).split(b"\n")
        return any(line.rstrip(b"\r").replace(b" ", b"") == b"data:[DONE]" for line in lines)

    def _line(self, line: bytes) -> None:
        line = line.rstrip(b"\r")
        if not line.startswith(b"data:"):
            return
        payload = line[5:].strip()
        has_usage = b'"usage"' in payload
        if not payload or payload == b"[DONE]" or not (has_usage or b'"delta"' in payload):
            return
        try:
            doc = json.loads(payload)
        except ValueError:
            return
        self._deltas += _content_deltas(doc)
        if not has_usage:
            return
        found = counts_from_json(doc, self.path)
        # The usage object is cumulative: the last one seen wins.
        if found.prompt_tokens or found.completion_tokens:
            self._usage_seen = True
            self._counts.prompt_tokens = found.prompt_tokens
            self._counts.completion_tokens = found.completion_tokens

    def result(self) -> Counts:
        if self.sse:
            if self._buf:
                self._line(bytes(self._buf))
                self._buf = bytearray()
            if not self._usage_seen:
                return Counts(completion_tokens=self._deltas)
            return self._counts
        if self.json and not self._overflow and self._buf:
            try:
                return counts_from_json(json.loads(self._buf), self.path)
            except ValueError:
                return Counts()
        return Counts()


def _content_deltas(doc: Any) -> int:
    """Choices of one stream chunk that carry generated text (one token each)."""
    choices = doc.get("choices") if isinstance(doc, dict) else None
    if not isinstance(choices, list):
        return 0
    n = 0
    for choice in choices:
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if isinstance(delta, dict) and (delta.get("content") or delta.get("reasoning_content")):
            n += 1
    return n
