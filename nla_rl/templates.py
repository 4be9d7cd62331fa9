"""Prompt templates, the AV chat prompt, the AR text, and explanation parsing.

The templates are compatibility-critical: a checkpoint only works with the template it was trained
with, so runs read them from the sidecar; the defaults below are the reference's, used when a new
run is created.
"""

from __future__ import annotations

import re

DEFAULT_AV_TEMPLATE = (
    "You are a meticulous AI researcher conducting an important investigation into activation "
    "vectors from a language model. Your overall task is to describe the semantic content of that "
    "activation vector.\n\nWe will pass the vector enclosed in <concept> tags into your context. "
    "You must then produce an explanation for the vector, enclosed within <explanation> tags. The "
    "explanation consists of 2-3 text snippets describing that vector.\n\nHere is the vector:\n\n"
    "<concept>{injection_char}</concept>\n\nPlease provide an explanation."
)
# The LoRA hard-negative release: the layer depth (in % of the network) is part of the prompt.
DEPTH_AV_TEMPLATE = (
    "You are a meticulous AI researcher conducting an important investigation into activation "
    "vectors from a language model. Your overall task is to describe the semantic content of that "
    "activation vector.\n\nWe will pass the vector enclosed in <concept> tags into your context, "
    "along with the network depth where it was extracted. You must then produce an explanation for "
    "the vector, enclosed within <explanation> tags. The explanation consists of 2-3 text snippets "
    "describing that vector.\n\nHere is the vector from depth {depth_pct}% of the network:\n\n"
    "<concept>{injection_char}</concept>\n\nPlease provide an explanation."
)
DEFAULT_AR_TEMPLATE = "Summary of the following text: <text>{explanation}</text> <summary>"

# The placeholders each template may hold: (required, each exactly once; optional).
AV_FIELDS = (("injection_char",), ("depth_pct",))
AR_FIELDS = (("explanation",), ())


def template_problem(text: str, fields: tuple[tuple[str, ...], tuple[str, ...]],
                     names: dict[str, str]) -> str | None:
    """What is wrong with a template (None: nothing), checked when the recipe loads rather than
    when a stage first formats it: a misspelt template name (``names``: the known ones), braces
    ``str.format`` cannot read, a placeholder the stages do not fill, or a required one missing
    or repeated (the marker must occur once per prompt; the AR reads after one explanation)."""
    import difflib
    import string

    required, optional = fields
    if re.fullmatch(r"[\w-]+", text.strip()):  # one word: meant as a name, not as the text
        hint = difflib.get_close_matches(text.strip(), list(names), n=1)
        return (f"{text!r} is not a known template name (known: {', '.join(names)})"
                + (f"; did you mean {hint[0]!r}?" if hint else "; or write the template's text"))
    try:
        found = [f for _, f, _, _ in string.Formatter().parse(text) if f is not None]
    except ValueError as err:
        return (f"is not a valid template ({err}); write a literal brace as {{{{ or }}}}, "
                f"placeholders as {{{required[0]}}}")
    allowed = required + optional
    unknown = sorted({f for f in found if f not in allowed})
    if unknown:
        return (f"has the placeholder(s) {', '.join('{' + f + '}' for f in unknown)}, which "
                f"nothing fills; allowed: {', '.join('{' + f + '}' for f in allowed)} (a "
                f"literal brace is written {{{{ or }}}})")
    for name in required:
        if found.count(name) != 1:
            return f"must contain {{{name}}} exactly once, found it {found.count(name)} times"
    return None


EXPLANATION_OPEN = "<explanation>"
EXPLANATION_CLOSE = "</explanation>"
_EXPLANATION_RE = re.compile(r"<explanation>(.*?)</explanation>", re.DOTALL)


def depth_percent(layer_index: int, num_layers: int) -> int:
    """The depth shown by the depth-% template: ``round(100 · (K + 0.5) / L)``."""
    return round(100 * (layer_index + 0.5) / num_layers)


def depth_pct_for(template: str, layer_index: int, num_layers: int) -> int | None:
    """The depth % a template needs (``None`` when it shows no depth)."""
    return depth_percent(layer_index, num_layers) if "{depth_pct}" in template else None


def render_av_user_message(template: str, injection_char: str, depth_pct: int | None = None) -> str:
    """The AV's single user message: the template with the marker (and depth, if it asks for one)."""
    fields = {"injection_char": injection_char}
    if "{depth_pct}" in template:
        if depth_pct is None:
            raise ValueError("this AV template shows the layer depth: pass depth_pct")
        fields["depth_pct"] = depth_pct
    return template.format(**fields)


def av_prompt_text(tokenizer, template: str, injection_char: str, *, depth_pct: int | None = None,
                   prefill: str = "") -> str:
    """The full AV prompt string: chat template with the generation prompt, then ``prefill``.

    The string already contains BOS where the family's chat template writes one (Gemma, Llama):
    encode it with :func:`encode_prompt_text`, never with ``add_special_tokens=True``.
    """
    user = render_av_user_message(template, injection_char, depth_pct)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
    )
    return text + prefill


def encode_prompt_text(tokenizer, text: str) -> list[int]:
    """Token ids of a rendered chat string, without adding a second BOS (the double-BOS trap)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def av_prompt_ids(tokenizer, template: str, injection_char: str, *, depth_pct: int | None = None,
                  prefill: str = "") -> list[int]:
    """Token ids of the AV prompt (see :func:`av_prompt_text`)."""
    return encode_prompt_text(
        tokenizer, av_prompt_text(tokenizer, template, injection_char, depth_pct=depth_pct, prefill=prefill)
    )


def ar_text(template: str, explanation: str) -> str:
    """The AR's input: a raw string (no chat template); tokenise it *with* special tokens."""
    return template.format(explanation=explanation)


def av_sft_target(explanation: str) -> str:
    """The AV-SFT assistant turn (the chat turn-close token is appended by the chat template)."""
    return f"{EXPLANATION_OPEN}\n{explanation}\n{EXPLANATION_CLOSE}"


def extract_explanation(text: str) -> str | None:
    """The first ``<explanation>…</explanation>`` body, stripped; ``None`` if there is none.

    A rollout whose explanation cannot be extracted gets the failure penalty, so an empty body
    counts as a failure too.
    """
    match = _EXPLANATION_RE.search(text)
    if match is None:
        return None
    body = match.group(1).strip()
    return body or None
