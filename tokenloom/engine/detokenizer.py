"""Incremental detokenization and stop strings for one sequence.

Each new token is decoded with the prefix_offset/read_offset window of vLLM and TGI: decode the few
tokens from `prefix_offset` to the end, decode the same window without the new tokens, and keep the
difference. Decoding in context gets SentencePiece's leading spaces right, and a window whose text ends
in "\ufffd" (a multi-byte character split over byte-fallback tokens) is held until the character is
complete, so the cost per token stays O(1) and no half character is ever shown.
"""

from __future__ import annotations

from tokenloom.loader.tokenizer import Tokenizer
from tokenloom.sampling_params import SamplingParams

# How many prompt tokens start the window, so the first output token decodes in context.
PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


def _prompt_context(tokenizer: Tokenizer, prompt: list[int], skip_special_tokens: bool) -> list[int]:
    """The last few prompt tokens, moved back (up to 3 tokens) so they don't start inside a character.

    A window that starts with the tail bytes of a character decodes the whole byte run as U+FFFD.
    """
    start = max(0, len(prompt) - PROMPT_CONTEXT_TOKENS)
    lowest = max(0, start - 3)
    while start > lowest and tokenizer.decode(prompt[start:], skip_special_tokens).startswith(_REPLACEMENT):
        start -= 1
    return list(prompt[start:])


class IncrementalDetokenizer:
    """Build a sequence's text token by token, cut it at stop strings and hand it out as deltas."""

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = params.skip_special_tokens
        self.stop: list[str] = list(params.stop or [])
        self.include_stop_str_in_output = params.include_stop_str_in_output
        self.min_tokens = params.min_tokens
        self.stop_string: str | None = None  # the stop string that ended the sequence, once found
        self.num_output_tokens = 0
        self._tokens = _prompt_context(tokenizer, prompt_token_ids, self.skip_special_tokens)
        self._prefix_offset = 0
        self._read_offset = len(self._tokens)
        self._prefix_text: str | None = None  # decode of tokens[prefix_offset:read_offset], cached
        self._text = ""
        self._sent = 0  # characters already handed out by get_delta

    @property
    def output_text(self) -> str:
        """The text so far (cut at a stop string once one is found)."""
        return self._text

    def update(self, new_token_ids: list[int], is_eos: bool = False) -> str | None:
        """Append the new tokens' text; return the stop string if one now appears, else None.

        `is_eos` says the last new token ended the sequence (eos or a stop token id): as in vLLM, its
        text is left out unless include_stop_str_in_output. Stop strings are only looked for once more
        than min_tokens tokens exist, and never in the text of the first min_tokens tokens.
        """
        if not new_token_ids or self.stop_string is not None:
            return None
        skip_last = is_eos and not self.include_stop_str_in_output
        decode_ids = new_token_ids[:-1] if skip_last else new_token_ids
        check_from = len(self._text)
        for token_id in decode_ids:
            self._tokens.append(token_id)
            self.num_output_tokens += 1
            self._text += self._decode_next()
            if self.num_output_tokens <= self.min_tokens:
                check_from = len(self._text)
        self.num_output_tokens += len(new_token_ids) - len(decode_ids)
        if self.stop and self.num_output_tokens > self.min_tokens:
            return self._check_stop(check_from)
        return None

    def get_delta(self, finished: bool) -> str:
        """Text not handed out by earlier calls.

        While not finished, the longest tail of the text that could still grow into a stop string is
        held back, so a streamed delta never shows text that a stop string later removes (an incomplete
        trailing character is never in the text to begin with). When finished (or stopped), everything
        is returned, including tokens still waiting to complete a character (decoded as "\ufffd").
        """
        done = finished or self.stop_string is not None
        if done:
            self._flush()
        text = self._text
        end = len(text) if done else len(text) - self._holdback(text)
        if end <= self._sent:
            self._sent = min(self._sent, len(text))
            return ""
        delta, self._sent = text[self._sent:end], end
        return delta

    def _decode(self, start: int, end: int | None = None) -> str:
        return self.tokenizer.decode(self._tokens[start:end], skip_special_tokens=self.skip_special_tokens)

    def _decode_next(self) -> str:
        """Text added by the tokens after read_offset; '' while they end in an incomplete character."""
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset)
        if len(new_text) <= len(self._prefix_text) or new_text.endswith(_REPLACEMENT):
            return ""
        delta = new_text[len(self._prefix_text):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._tokens)
        self._prefix_text = None
        return delta

    def _flush(self) -> None:
        """At the end, add the text of tokens still held (an incomplete character shows as U+FFFD)."""
        if self._read_offset >= len(self._tokens) or self.stop_string is not None:
            return
        prefix = self._prefix_text if self._prefix_text is not None else self._decode(
            self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset)
        self._prefix_offset, self._read_offset, self._prefix_text = len(self._tokens), len(self._tokens), None
        if len(new_text) > len(prefix):
            check_from = len(self._text)
            self._text += new_text[len(prefix):]
            if self.stop and self.num_output_tokens > self.min_tokens:
                self._check_stop(check_from)

    def _check_stop(self, check_from: int) -> str | None:
        """Find the earliest stop string ending after `check_from`; cut the text there."""
        text = self._text
        best: tuple[int, str] | None = None
        for stop in self.stop:
            index = text.find(stop, max(0, check_from - len(stop) + 1))
            if index != -1 and (best is None or index < best[0]):
                best = (index, stop)
        if best is None:
            return None
        index, stop = best
        self._text = text[:index + len(stop) if self.include_stop_str_in_output else index]
        self.stop_string = stop
        return stop

    def _holdback(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        longest = 0
        for stop in self.stop:
            for k in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:k]):
                    longest = k
                    break
        return longest
