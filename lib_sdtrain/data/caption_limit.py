"""The longest caption the text encoder reads, and cutting longer ones (issue #14: a 10 MB caption stalled a run).

The loop encodes a caption as A1111 does, in 75-token chunks, one text-encoder pass per chunk. A caption file
of megabytes would be tens of thousands of passes per step, so captions are cut at MAX_CAPTION_CHUNKS chunks
(225 tokens, also the longest `max_token_length` kohya's scripts train with), at a tag boundary; the scan
warns, naming the file. MAX_CAPTION_BYTES bounds what is read of a caption file at all.

Kept apart from `captions.py` (which imports `scan.py`) so that `scan.py` can use it without an import cycle.
"""

from __future__ import annotations

from typing import Callable

MAX_CAPTION_CHUNKS = 3
MAX_CAPTION_TOKENS = MAX_CAPTION_CHUNKS * 75
MAX_CAPTION_BYTES = 256 * 1024
_CLIP_BOS, _CLIP_EOS = 49406, 49407
_tokenizer_cache: list = []


def _count_function() -> Callable[[str], int]:
    """CLIP token count (without BOS/EOS) with our tokenizer; without one, the UTF-8 byte count (never lower
    than the token count, so a cut by it stays within the limit)."""
    if not _tokenizer_cache:
        try:
            from ..models.tokenizer import ClipTokenizer

            _tokenizer_cache.append(ClipTokenizer(flavor="hf"))
        except Exception:  # noqa: BLE001 - no vocabulary installed: the byte bound below is safe
            _tokenizer_cache.append(None)
    tok = _tokenizer_cache[0]
    if tok is None:
        return lambda text: len(text.encode("utf-8"))

    def count(text: str) -> int:
        ids = list(tok.encode(text))
        if ids and ids[0] == _CLIP_BOS:
            ids = ids[1:]
        if ids and ids[-1] == _CLIP_EOS:
            ids = ids[:-1]
        return len(ids)

    return count


def _longest_fitting(pieces: list[str], joiner: str, limit: int, count: Callable[[str], int]) -> int:
    """The largest k with count(joiner.join(pieces[:k])) <= limit (token counts grow with k)."""
    lo, hi = 0, len(pieces)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(joiner.join(pieces[:mid])) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return lo


def cap_caption_line(line: str, limit: int = MAX_CAPTION_TOKENS, count: Callable[[str], int] | None = None
                     ) -> tuple[str, int | None]:
    """(`line` cut to at most `limit` CLIP tokens at a tag, word or character boundary, tokens counted before
    the cut (a lower bound for a very long line)); the second value is None when nothing was cut.

    A line of at most `limit` UTF-8 bytes is never tokenized (every CLIP token covers at least one byte), so
    ordinary captions cost nothing here.
    """
    if len(line) <= limit // 4 or len(line.encode("utf-8")) <= limit:
        return line, None
    count = count or _count_function()
    head = line[:limit * 32]          # far more text than `limit` tokens; bounds the tokenizer's work
    total = count(head)
    if head == line and total <= limit:
        return line, None
    tags = head.split(",")
    k = _longest_fitting(tags, ",", limit, count)
    if k:
        out = ",".join(tags[:k]).rstrip()
    else:                              # the first tag alone is too long: cut between words, then characters
        words = tags[0].split(" ")
        k = _longest_fitting(words, " ", limit, count)
        out = " ".join(words[:k]) if k else head[:_longest_fitting(list(head[:limit * 8]), "", limit, count)]
    return out.strip(), total
