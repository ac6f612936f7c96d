"""A1111's prompt syntax: extra-network tags, attention weights, BREAK, and 75-token chunks.

Mirrors AUTOMATIC1111 stable-diffusion-webui v1.10.1 (commit 82a973c0), rewritten here:
- `strip_extra_networks`: `modules/extra_networks.py:parse_prompt` removes every `<name:args>` tag before the
  prompt reaches the text encoder (`processing.py` calls it for each prompt).
- `parse_attention`: `modules/prompt_parser.py:parse_prompt_attention`.
- `chunk_prompt`: `modules/sd_hijack_clip.py:TextConditionalModel.tokenize_line` (75-token chunks, BREAK, comma
  back-tracking with `opts.comma_padding_backtrack` = 20, textual-inversion placeholders) plus the pad-id rewrite
  of `process_tokens` (SD2/SDXL-2 pad with 0 after the first end token).

A1111's quirks are kept on purpose, so that what we train on is what the WebUI later feeds the UNet; each is
marked "A1111 quirk" below.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Protocol

from ..errors import UserError

CHUNK_LENGTH = 75                       # prompt tokens per chunk; +start +end = 77 ids
EMPHASIS_MODES: tuple[str, ...] = ("Original", "No norm", "Ignore", "None")   # A1111 `opts.emphasis` choices
DEFAULT_COMMA_BACKTRACK = 20            # A1111 `opts.comma_padding_backtrack` default (shared_options.py)
ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1             # A1111 multiplies by 1/1.1 (not divides by 1.1): same float rounding
BREAK = ("BREAK", -1.0)                 # how parse_attention marks a BREAK

_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
_BREAK_SPLIT = re.compile(r"\s*\bBREAK\b\s*", re.S)
_ATTENTION_TOKEN = re.compile(r"""
      (?P<escape>\\[()\[\]\\]?)            # \( \) \[ \] \\ stand for the character; a lone \ for nothing
    | (?P<open>[(\[])
    | :\s*(?P<weight>[+-]?[.\d]+)\s*\)     # ":1.3)" closes a round bracket with an explicit weight
    | (?P<close>[)\]])
    | (?P<text>[^\\()\[\]:]+|:)
""", re.X)


def strip_extra_networks(prompt: str) -> tuple[str, list[tuple[str, list[str]]]]:
    """Remove `<lora:name:1>`-style tags (any `<word:args>`), as A1111 does before tokenizing.

    Returns the prompt without the tags (surrounding spaces and commas stay, as in A1111) and the tags found
    as (network type, arguments split on ":").
    """
    found: list[tuple[str, list[str]]] = []

    def take(m: re.Match[str]) -> str:
        found.append((m.group(1), m.group(2).split(":")))
        return ""

    return _EXTRA_NETWORK.sub(take, prompt), found


def parse_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) runs following A1111's attention syntax.

    `(x)` ×1.1, `[x]` ×(1/1.1), `(x:1.5)` ×1.5, nesting multiplies, `\\(` `\\)` `\\[` `\\]` `\\\\` are literal,
    unclosed brackets still apply to the end of the prompt, stray closers are literal text, and `BREAK` (a whole
    word) becomes the marker ("BREAK", -1.0). Neighbouring runs with equal weights are merged; an empty prompt
    gives [("", 1.0)]. Raises UserError for a weight that is not a number, such as `(x:1.2.3)` (A1111 crashes).
    """
    runs: list[list] = []                 # [text, weight], mutable while brackets close
    round_open: list[int] = []            # index in `runs` where each open bracket started
    square_open: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for m in _ATTENTION_TOKEN.finditer(text):
        token = m.group(0)
        if m.group("escape") is not None:
            runs.append([token[1:], 1.0])
        elif m.group("open") is not None:
            (round_open if token == "(" else square_open).append(len(runs))
        elif m.group("weight") is not None and round_open:
            try:
                factor = float(m.group("weight"))
            except ValueError:
                raise UserError(f"bad attention weight {m.group('weight')!r} in prompt {text!r}") from None
            scale_from(round_open.pop(), factor)
        elif token == ")" and round_open:
            scale_from(round_open.pop(), ROUND_MULTIPLIER)
        elif token == "]" and square_open:
            scale_from(square_open.pop(), SQUARE_MULTIPLIER)
        else:  # plain text; also a stray closer or a ":1.2)" without an open bracket
            for i, part in enumerate(_BREAK_SPLIT.split(token)):
                if i:
                    runs.append(list(BREAK))
                runs.append([part, 1.0])

    # Unclosed brackets apply to the end: round ones first, in the order they were opened, then square ones.
    for start in round_open:
        scale_from(start, ROUND_MULTIPLIER)
    for start in square_open:
        scale_from(start, SQUARE_MULTIPLIER)
    # A1111 quirk: a BREAK inside brackets gets scaled too (e.g. -1.1) and is then tokenized as the word "break".

    if not runs:
        runs = [["", 1.0]]
    merged: list[list] = [runs[0]]
    for run in runs[1:]:
        if run[1] == merged[-1][1]:
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    return [(t, w) for t, w in merged]


class Tokenizer(Protocol):
    """What chunking needs from a tokenizer (`tokenizer.ClipTokenizer` has it)."""

    start_id: int
    end_id: int
    pad_id: int
    comma_id: int | None

    def encode(self, text: str) -> list[int]: ...


class EmbeddingLookup(Protocol):
    """Textual-inversion names in a token stream (see `conditioning.PromptEncoder.add_embedding`)."""

    def match(self, ids: list[int], position: int) -> tuple[str, int, int] | None:
        """(name, number of vectors, number of ids the name spans) if an embedding's name starts here."""


@dataclass
class PromptChunk:
    """One 77-id window of a prompt: what one text-encoder call sees.

    ids: start, 75 prompt ids or padding, end; when pad_id != end_id, every id after the first end id is pad_id.
    multipliers: one per id (1.0 for start, end and padding).
    fixes: (index into ids of the first vector, embedding name) for each textual-inversion embedding; its
        placeholder ids are 0, as in A1111.
    """

    ids: list[int]
    multipliers: list[float]
    fixes: list[tuple[int, str]] = field(default_factory=list)


def finish_ids(tokens: list[int], tokenizer: Tokenizer) -> list[int]:
    """[start] + tokens + [end], with pad_id after the first end id (A1111 `process_tokens`, SD2/SDXL-2)."""
    ids = [tokenizer.start_id, *tokens, tokenizer.end_id]
    if tokenizer.pad_id != tokenizer.end_id:
        first_end = ids.index(tokenizer.end_id)
        ids[first_end + 1:] = [tokenizer.pad_id] * (len(ids) - first_end - 1)
    return ids


def empty_chunk(tokenizer: Tokenizer) -> PromptChunk:
    """The all-padding chunk that pads a shorter prompt in a batch (A1111 `empty_chunk`)."""
    return PromptChunk(finish_ids([tokenizer.end_id] * CHUNK_LENGTH, tokenizer), [1.0] * (CHUNK_LENGTH + 2))


def target_token_count(token_count: int) -> int:
    """The "75" of the UI's "N/75": the next multiple of 75 (A1111 `get_target_prompt_token_count`)."""
    return math.ceil(max(token_count, 1) / CHUNK_LENGTH) * CHUNK_LENGTH


def chunk_prompt(
    text: str,
    tokenizer: Tokenizer,
    *,
    emphasis: str = "Original",
    comma_backtrack: int = DEFAULT_COMMA_BACKTRACK,
    embeddings: EmbeddingLookup | None = None,
) -> tuple[list[PromptChunk], int]:
    """Tokenize one prompt into 77-id chunks with per-id multipliers, as A1111's `tokenize_line` does.

    Args:
        text: the prompt, extra-network tags already removed (`strip_extra_networks`).
        emphasis: A1111's emphasis mode; "None" disables the attention syntax (and BREAK) entirely.
        comma_backtrack: when a chunk fills up and its last comma is at most this many tokens back, the tokens
            after that comma move to the next chunk (0 = off; A1111 allows 0..74).
        embeddings: textual-inversion names to replace by placeholder ids (None = none).
    Returns:
        the chunks (at least one) and the token count A1111 shows: 75 per full chunk plus the tokens of the last.
    """
    if emphasis not in EMPHASIS_MODES:
        raise UserError(f"unknown emphasis mode {emphasis!r}; choose one of {', '.join(EMPHASIS_MODES)}")
    if not 0 <= comma_backtrack < CHUNK_LENGTH:
        raise UserError(f"comma back-track must be 0..{CHUNK_LENGTH - 1}, not {comma_backtrack}")
    runs = parse_attention(text) if emphasis != "None" else [(text, 1.0)]

    chunks: list[PromptChunk] = []
    tokens: list[int] = []
    mults: list[float] = []
    fixes: list[tuple[int, str]] = []
    token_count = 0
    last_comma = -1                      # index in `tokens` of the current chunk's last comma

    def close_chunk(is_last: bool = False) -> None:
        nonlocal tokens, mults, fixes, token_count, last_comma
        # A1111 counts a closed chunk as 75 even when a back-track left it shorter; only the last one exactly.
        token_count += len(tokens) if is_last else CHUNK_LENGTH
        padding = CHUNK_LENGTH - len(tokens)
        if padding > 0:
            tokens += [tokenizer.end_id] * padding
            mults += [1.0] * padding
        chunks.append(PromptChunk(finish_ids(tokens, tokenizer), [1.0, *mults, 1.0], fixes))
        tokens, mults, fixes, last_comma = [], [], [], -1

    for run_text, weight in runs:
        if run_text == BREAK[0] and weight == BREAK[1]:
            close_chunk()
            continue
        ids = tokenizer.encode(run_text)
        position = 0
        while position < len(ids):
            token = ids[position]
            if token == tokenizer.comma_id:
                last_comma = len(tokens)
            elif (comma_backtrack and len(tokens) == CHUNK_LENGTH and last_comma != -1
                  and len(tokens) - last_comma <= comma_backtrack):
                # Move the words after the last comma to the next chunk so a short phrase is not cut in two.
                cut = last_comma + 1
                moved_tokens, moved_mults = tokens[cut:], mults[cut:]
                tokens, mults = tokens[:cut], mults[:cut]
                # A1111 quirk: `fixes` stay with the closed chunk, so an embedding among the moved tokens is
                # spliced into that chunk's padding and its placeholders in the next chunk stay plain id 0.
                close_chunk()
                tokens, mults = moved_tokens, moved_mults
            # A1111 quirk: a comma arriving when the chunk is full starts the next chunk but is not remembered
            # there as its last comma (closing resets it).
            if len(tokens) == CHUNK_LENGTH:
                close_chunk()

            found = embeddings.match(ids, position) if embeddings is not None else None
            if found is None:
                tokens.append(token)
                mults.append(weight)
                position += 1
                continue
            name, n_vectors, n_ids = found
            if len(tokens) + n_vectors > CHUNK_LENGTH:
                close_chunk()
            fixes.append((len(tokens) + 1, name))        # +1: the start id precedes the prompt tokens
            tokens += [0] * n_vectors
            mults += [weight] * n_vectors
            position += n_ids

    if tokens or not chunks:
        close_chunk(is_last=True)
    return chunks, token_count
