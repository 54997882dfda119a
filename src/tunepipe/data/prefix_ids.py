"""Where a rendered prefix of a conversation ends in the conversation's tokens, without
re-tokenizing the whole prefix.

The label mask needs, for each answer, the token ids of "everything before it" and
"everything up to its end", and a check that they are a prefix of the full sequence.
Tokenizing every prefix costs as much as the conversation again (more for multi-turn
rows). Fast tokenizers split text at special tokens first and tokenize the pieces in
between independently, so when a prefix X of the full text F ends with a special token
at character h followed by a short tail T (e.g. "<|im_start|>assistant\n"):

    ids(X) = ids(F)[:m] + ids(T as the piece after that special token)

where m counts F's tokens up to that special token. The tail is tokenized as
special + T (dropping the special's id), and memoized: templates produce few distinct
tails. Any case this reasoning does not cover (no special token in X, X not a string
prefix of F, a special token the tokenizer did not split on, lstrip/rstrip tokens) falls
back to tokenizing X itself, and `verify` compares both ways on a sample of real rows
before the shortcut is trusted.
"""

from __future__ import annotations

import bisect
import logging
import re

log = logging.getLogger(__name__)


class PrefixResolver:
    def __init__(self, tokenizer, encode):
        self.encode = encode  # texts -> list of id lists, exactly as the full texts were encoded
        self.tail_cache: dict[tuple[str, str], list[int] | None] = {}
        self.special_ids = usable_special_tokens(tokenizer)
        self.pattern = (re.compile("|".join(map(re.escape, sorted(self.special_ids, key=len, reverse=True))))
                        if self.special_ids else None)
        self.trusted: bool | None = None if self.pattern else False

    def prefix_lengths(self, fulls: list[str], full_ids: list[list[int]],
                       requests: list[tuple[int, str]]) -> list[int | None]:
        """For each (row, prefix text): len(ids(prefix)) when ids(prefix) is a prefix of that row's
        ids, else None."""
        if self.trusted is None:
            self.trusted = self.verify(fulls, full_ids, requests[:64])
        if not self.trusted:
            return self.slow(full_ids, requests)
        found: dict[int, list] = {}  # row -> special-token matches in its full text
        plans = []
        for row, text in requests:
            if row not in found:
                found[row] = [(m.start(), m.end(), m.group()) for m in self.pattern.finditer(fulls[row])]
            plans.append(self.plan(fulls[row], full_ids[row], text, found[row]))
        missing = sorted({plan[1] for plan in plans if plan and plan[1] not in self.tail_cache})
        for key, ids in zip(missing, self.encode([special + tail for special, tail in missing])):
            first = self.special_ids[key[0]]
            self.tail_cache[key] = ids[1:] if ids and ids[0] == first else None
        results: list[int | None] = [None] * len(requests)
        slow = []
        for i, (plan, (row, text)) in enumerate(zip(plans, requests)):
            tail = self.tail_cache.get(plan[1]) if plan else None
            if tail is None:
                slow.append(i)
                continue
            m, ids = plan[0], full_ids[row]
            end = m + len(tail)
            results[i] = end if ids[m:end] == tail else None
        if slow:
            for i, n in zip(slow, self.slow(full_ids, [requests[i] for i in slow])):
                results[i] = n
        return results

    def plan(self, full: str, ids: list[int], text: str, matches: list[tuple[int, int, str]]):
        """(m, (special, tail)) for the shortcut, or None when only tokenizing `text` is safe."""
        size = len(text)
        if size == 0 or not full.startswith(text):
            return None
        ends = [end for _, end, _ in matches]
        k = bisect.bisect_right(ends, size) - 1
        if k < 0 or (k + 1 < len(matches) and matches[k + 1][0] < size):
            return None  # no special token before the cut, or the cut falls inside one
        special = matches[k][2]
        token = self.special_ids[special]
        occurrences = [j for j, match in enumerate(matches) if match[2] == special]
        if ids.count(token) != len(occurrences):
            return None  # the tokenizer did not split on every occurrence: do not guess
        position = -1
        for _ in range(occurrences.index(k) + 1):
            position = ids.index(token, position + 1)
        return position + 1, (special, text[matches[k][1]:])

    def slow(self, full_ids: list[list[int]], requests: list[tuple[int, str]]) -> list[int | None]:
        encoded = self.encode([text for _, text in requests])
        return [len(ids) if full_ids[row][:len(ids)] == ids else None
                for ids, (row, _) in zip(encoded, requests)]

    def verify(self, fulls, full_ids, sample) -> bool:
        """Trust the shortcut only if it agrees with plain tokenization on real rows."""
        self.trusted = True
        fast = self.prefix_lengths(fulls, full_ids, sample)
        agrees = fast == self.slow(full_ids, sample)
        if not agrees:
            log.warning("prefix shortcut disagrees with this tokenizer; tokenizing every prefix in full")
        return agrees


def usable_special_tokens(tokenizer) -> dict[str, int]:
    """Special tokens matched verbatim on the raw text (the ones the shortcut can cut at)."""
    if getattr(tokenizer, "_tokenizer", None) is None or getattr(tokenizer, "split_special_tokens", False):
        return {}
    tokens = {}
    for token_id, added in tokenizer.added_tokens_decoder.items():
        if added.special and not (added.lstrip or added.rstrip or added.single_word or added.normalized):
            tokens[added.content] = token_id
    return tokens
