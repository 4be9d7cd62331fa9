"""Marker token bookkeeping: choosing the marker, its canonical neighbours, the AR suffix ids, and
finding the marker in token ids.

The marker is one rare character that tokenises to exactly one token; the activation is injected
there. To avoid injecting into a marker that merely happens to appear in user text, a position only
counts when its left and right neighbours are the ids the template produces (stored in the sidecar).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nla_rl.errors import InjectionError, SidecarError
from nla_rl.templates import av_prompt_ids

MARKER_RANGE = (0x3200, 0x33FF)


@dataclass(frozen=True)
class MarkerTokens:
    """The ids that locate the injection position in a prompt."""

    char: str
    token_id: int
    left_id: int
    right_id: int


def single_token_id(tokenizer, char: str) -> int | None:
    """The id ``char`` encodes to when that is exactly one (non-UNK) token, else ``None``."""
    ids = tokenizer.encode(char, add_special_tokens=False)
    if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
        return None
    return ids[0]


def select_marker(tokenizer, lo: int = MARKER_RANGE[0], hi: int = MARKER_RANGE[1]) -> tuple[str, int]:
    """The first character in U+lo–U+hi that tokenises to exactly one token, with its id.

    Pure (no cache written anywhere): scanning 512 characters takes milliseconds.
    """
    for code in range(lo, hi + 1):
        token_id = single_token_id(tokenizer, chr(code))
        if token_id is not None:
            return chr(code), token_id
    raise SidecarError(
        f"no character in U+{lo:04X}–U+{hi:04X} is a single token for this tokenizer; "
        "set injection.marker in the recipe to a character that is"
    )


def marker_token_id(tokenizer, char: str) -> int:
    """The id of marker ``char``; raises if it is not exactly one token."""
    token_id = single_token_id(tokenizer, char)
    if token_id is None:
        found = tokenizer.encode(char, add_special_tokens=False)
        raise SidecarError(
            f"tokens.injection_char: {char!r} (U+{ord(char):04X}) must encode to exactly one token, "
            f"found {found}. Choose another marker (nla_rl.tokens.select_marker finds one)"
        )
    return token_id


def canonical_neighbors(tokenizer, template: str, char: str, *, depth_pct: int | None = None) -> tuple[int, int]:
    """Left and right neighbour ids of the marker in the rendered AV prompt.

    The marker must appear exactly once and not at either end of the prompt.
    """
    token_id = marker_token_id(tokenizer, char)
    ids = av_prompt_ids(tokenizer, template, char, depth_pct=depth_pct)
    where = [i for i, t in enumerate(ids) if t == token_id]
    if len(where) != 1 or not 0 < where[0] < len(ids) - 1:
        raise SidecarError(
            f"the AV template must contain the marker {char!r} exactly once, inside the prompt; "
            f"found it at token positions {where} of {len(ids)}"
        )
    p = where[0]
    return ids[p - 1], ids[p + 1]


def marker_tokens(tokenizer, template: str, char: str | None = None, *,
                  depth_pct: int | None = None) -> MarkerTokens:
    """Everything needed to find the marker: the char (selected if ``None``), its id, neighbours."""
    if char is None:
        char, _ = select_marker(tokenizer)
    left, right = canonical_neighbors(tokenizer, template, char, depth_pct=depth_pct)
    return MarkerTokens(char, marker_token_id(tokenizer, char), left, right)


def critic_suffix_ids(tokenizer, ar_template: str) -> list[int]:
    """Ids of the AR template text after ``{explanation}``, first token dropped.

    The first token is dropped because it may merge with the explanation's last character.
    """
    if "{explanation}" not in ar_template:
        raise SidecarError("prompt_templates.ar must contain '{explanation}'")
    suffix = ar_template.split("{explanation}", 1)[1]
    ids = tokenizer.encode(suffix, add_special_tokens=False)
    if len(ids) < 2:
        raise SidecarError(
            f"the AR template's text after {{explanation}} must be at least 2 tokens, found {ids}"
        )
    return list(ids[1:])


def find_marker_positions(input_ids: torch.Tensor, marker: MarkerTokens, expected: int) -> torch.Tensor:
    """Positions ``[n, 2]`` (row, column) of anchored markers in ``input_ids`` [batch, seq].

    A marker counts only when its left and right neighbours are the canonical ids. The number of
    matches must equal ``expected`` (the number of vectors), otherwise injection would silently go
    wrong: raise instead.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    ids = input_ids
    hit = ids[:, 1:-1] == marker.token_id
    hit &= ids[:, :-2] == marker.left_id
    hit &= ids[:, 2:] == marker.right_id
    positions = hit.nonzero()
    positions[:, 1] += 1
    if positions.shape[0] != expected:
        raise InjectionError(
            f"found {positions.shape[0]} anchored marker(s) {marker.char!r} (id {marker.token_id}, "
            f"between ids {marker.left_id} and {marker.right_id}) but {expected} vector(s) to inject. "
            "Each prompt must contain the marker exactly once, built from the sidecar's AV template"
        )
    return positions
