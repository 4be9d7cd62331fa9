import pytest
import torch

from nla_rl.errors import InjectionError, SidecarError
from nla_rl.templates import (DEFAULT_AR_TEMPLATE, DEFAULT_AV_TEMPLATE, DEPTH_AV_TEMPLATE, ar_text,
                              av_prompt_ids, av_prompt_text, av_sft_target, depth_percent,
                              extract_explanation)
from nla_rl.testing.tiny import TINY_MARKER_CHAR
from nla_rl.tokens import (MarkerTokens, canonical_neighbors, critic_suffix_ids,
                           find_marker_positions, marker_token_id, marker_tokens, select_marker)


def test_select_marker_skips_multi_token_chars(tiny):
    char, token_id = select_marker(tiny.tokenizer)
    assert char == TINY_MARKER_CHAR
    assert tiny.tokenizer.encode(char, add_special_tokens=False) == [token_id]
    # Every earlier character of the range is several tokens, so the scan really skipped them.
    for code in range(0x3200, ord(char)):
        assert len(tiny.tokenizer.encode(chr(code), add_special_tokens=False)) > 1


def test_select_marker_fails_when_range_has_none(qwen):
    with pytest.raises(SidecarError, match="single token"):
        select_marker(qwen.tokenizer, 0x3200, 0x320D)


def test_multi_token_marker_is_refused(qwen):
    with pytest.raises(SidecarError, match="exactly one token"):
        marker_token_id(qwen.tokenizer, "\u3200")


def test_neighbors_are_the_template_brackets(tiny):
    tok = tiny.tokenizer
    left, right = canonical_neighbors(tok, DEFAULT_AV_TEMPLATE, TINY_MARKER_CHAR)
    assert tok.decode([left]).endswith(">")
    assert tok.decode([right]).startswith("</")


def test_av_prompt_has_exactly_one_bos(tiny):
    tok = tiny.tokenizer
    ids = av_prompt_ids(tok, DEFAULT_AV_TEMPLATE, TINY_MARKER_CHAR)
    bos = tok.bos_token_id
    if tiny.family in ("llama", "gemma3"):
        assert ids[0] == bos and ids.count(bos) == 1
        # The trap this guards against: encoding the chat string with special tokens doubles BOS.
        text = av_prompt_text(tok, DEFAULT_AV_TEMPLATE, TINY_MARKER_CHAR)
        assert tok(text)["input_ids"][:2] == [bos, bos]
    assert tok.decode(ids) == av_prompt_text(tok, DEFAULT_AV_TEMPLATE, TINY_MARKER_CHAR)


def test_depth_template_needs_depth(qwen):
    with pytest.raises(ValueError, match="depth_pct"):
        av_prompt_text(qwen.tokenizer, DEPTH_AV_TEMPLATE, TINY_MARKER_CHAR)
    text = av_prompt_text(qwen.tokenizer, DEPTH_AV_TEMPLATE, TINY_MARKER_CHAR,
                          depth_pct=depth_percent(20, 28), prefill="<explanation>")
    assert "depth 73% of the network" in text and text.endswith("<explanation>")


def test_critic_suffix_drops_first_token(qwen):
    tok = qwen.tokenizer
    ids = critic_suffix_ids(tok, DEFAULT_AR_TEMPLATE)
    full = tok.encode("</text> <summary>", add_special_tokens=False)
    assert ids == full[1:]
    # The suffix ids are the tail of any AR input, whatever the explanation's last character.
    for expl in ("a cat.", "blue", "x)"):
        enc = tok.encode(ar_text(DEFAULT_AR_TEMPLATE, expl), add_special_tokens=False)
        assert enc[-len(ids):] == ids


def test_critic_suffix_needs_placeholder(qwen):
    with pytest.raises(SidecarError, match=r"\{explanation\}"):
        critic_suffix_ids(qwen.tokenizer, "no placeholder here")


def test_find_marker_positions_batch_and_count_check(qwen):
    tok = qwen.tokenizer
    mt = marker_tokens(tok, DEFAULT_AV_TEMPLATE)
    ids = av_prompt_ids(tok, DEFAULT_AV_TEMPLATE, mt.char)
    batch = torch.tensor([ids, [tok.pad_token_id] * 3 + ids[:-3]])
    # Row 1 is shifted right by 3 (left padding) and truncated at the end.
    pos = find_marker_positions(batch, mt, expected=2)
    col = ids.index(mt.token_id)
    assert pos.tolist() == [[0, col], [1, col + 3]]
    with pytest.raises(InjectionError, match="found 2 anchored marker"):
        find_marker_positions(batch, mt, expected=3)


def test_unanchored_marker_is_not_counted(qwen):
    tok = qwen.tokenizer
    mt = marker_tokens(tok, DEFAULT_AV_TEMPLATE)
    # The marker in ordinary text (no <concept> brackets) must not be taken for the injection slot.
    ids = tok.encode(f"look {mt.char} here", add_special_tokens=False)
    assert mt.token_id in ids
    with pytest.raises(InjectionError, match="found 0"):
        find_marker_positions(torch.tensor([ids]), mt, expected=1)
    assert isinstance(mt, MarkerTokens)


@pytest.mark.parametrize("text,expected", [
    ("<explanation>\n a cat \n</explanation>", "a cat"),
    ("pre <explanation>one\ntwo</explanation> <explanation>x</explanation>", "one\ntwo"),
    ("<explanation>never closed", None),
    ("<explanation>  </explanation>", None),
    ("no tags", None),
])
def test_extract_explanation(text, expected):
    assert extract_explanation(text) == expected


def test_sft_target_round_trips():
    assert extract_explanation(av_sft_target("red cat; calm")) == "red cat; calm"
