"""When a request ends (`Scheduler.postprocess` asks `check` per token), and the text it returns.

Stop strings are matched on the newest tokens' text, so one spanning tokens is found; only one
ending in the newest token counts (an earlier one was seen already, or came before `min_tokens`)."""

import functools

from nanozipage.sequence import Sequence


class StopConditions:
    def __init__(self, eos_token_ids: set[int], tokenizer):
        self.eos_token_ids, self.tokenizer = eos_token_ids, tokenizer

    def check(self, seq: Sequence, length: int) -> bool:
        """Whether seq ends with its first `length` tokens; sets its finish and stop reason."""
        params, token = seq.sampling_params, seq.token_ids[length - 1]
        num_completion = length - seq.num_prompt_tokens
        if num_completion >= params.min_tokens:
            if not params.ignore_eos and token in self.eos_token_ids:
                seq.finish_reason = "stop"
            elif token in params.stop_token_ids:
                seq.finish_reason, seq.stop_reason = "stop", token
            elif params.stop and self.tokenizer:
                # Tokens enough to hold any stop string: a character is at most 4 byte tokens.
                window = 4 * max(len(stop) for stop in params.stop) + 4
                start = max(seq.num_prompt_tokens, length - window)
                match, _ = self._find(params.stop, seq.token_ids, start, length)
                if match:
                    seq.finish_reason, seq.stop_reason = "stop", match[1]
        if seq.finish_reason is None and num_completion == params.max_tokens:
            seq.finish_reason = "length"
        return seq.finish_reason is not None

    def _find(self, stops: list[str], ids: list[int], start: int, end: int):
        """The text of `ids[start:end]`, and the stop string (with its start in that text) whose
        occurrence ends in the text of the last id; the earliest if several do."""
        text, before = self._decode(ids, start, end), self._decode(ids, start, end - 1)
        before = before.rstrip("\ufffd")  # an unfinished character, which the last id may finish
        found = [(text.find(stop, max(0, len(before) - len(stop) + 1)), stop) for stop in stops]
        return min(((i, stop) for i, stop in found if i >= 0), default=None), text

    def _decode(self, ids: list[int], start: int, end: int) -> str:
        """The text of ids[start:end] as it reads after the ids before it (a SentencePiece decoder
        drops the first id's leading space), so decoded from a few ids earlier and cut; alone if
        the text of those ids changes (a tokenizer's clean-up joins "x ." into "x.")."""
        decode = functools.partial(self.tokenizer.decode, skip_special_tokens=True)
        context = max(0, start - 4)
        before, text = decode(ids[context:start]).rstrip("\ufffd"), decode(ids[context:end])
        return text[len(before) :] if text.startswith(before) else decode(ids[start:end])

    def text(self, seq: Sequence) -> str | None:
        """The completion's text, cut before a stop string (after, `include_stop_str_in_output`)."""
        if self.tokenizer is None:
            return None
        stop, ids, start = seq.stop_reason, seq.token_ids, seq.num_prompt_tokens
        if not isinstance(stop, str):  # as vLLM: a stop token's text only if asked for
            keep = stop is None or seq.sampling_params.include_stop_str_in_output
            return self._decode(ids, start, len(ids) if keep else len(ids) - 1)
        match, text = self._find([stop], ids, start, len(ids))
        keep = len(stop) if seq.sampling_params.include_stop_str_in_output else 0
        return text[: match[0] + keep] if match else text
