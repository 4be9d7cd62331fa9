"""Tiny, offline models and tokenizers for tests, benchmarks and the embedded CPU recipe.

Nothing here downloads anything: models are built from transformers' config classes with random
weights, and the tokenizer is a byte-level BPE trained in a fraction of a second on generated text.

Design choices that matter downstream:

* Attention head size is 32 (vLLM's CPU attention refuses head sizes below 32).
* Each family gets its own chat-template *style* (ChatML for Qwen, header tokens for Llama-3,
  turns for Gemma) and its real BOS convention: Qwen declares no BOS token and adds none; Llama and
  Gemma declare BOS and add it, and their chat template string already contains it — the
  double-BOS trap real checkpoints have. A declared BOS is always the one tokenisation adds
  (:func:`nla_rl.compat.check_bos_contract`; the reference AR critic asserts it).
* Exactly one character of the marker range (``TINY_MARKER_CHAR``, U+320E as in Qwen2.5) is a
  single BPE token; its lower neighbours in U+3200–U+320D are not, so marker selection is exercised
  for real.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

FAMILIES = ("qwen2", "qwen3", "llama", "gemma3")
TINY_MARKER_CHAR = "\u320e"  # ㈎ — the Qwen2.5 marker; the only single-token char in U+3200–U+33FF here

_QWEN_DEFAULT_SYSTEM = "You are Qwen, a tiny helpful assistant."

# Chat templates in the style of each family (Jinja, as transformers renders them).
_CHAT_TEMPLATES = {
    "chatml": (
        "{%- if messages[0]['role'] != 'system' %}"
        "{{- '<|im_start|>system\\n" + _QWEN_DEFAULT_SYSTEM + "<|im_end|>\\n' }}"
        "{%- endif %}"
        "{%- for message in messages %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    ),
    "llama3": (
        "{{- bos_token }}"
        "{%- for message in messages %}"
        "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
        " + message['content'] + '<|eot_id|>' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}"
        "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
        "{%- endif %}"
    ),
    "gemma": (
        "{{- bos_token }}"
        "{%- for message in messages %}"
        "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
        "{{- '<start_of_turn>' + role + '\\n' + message['content'] + '<end_of_turn>\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
    ),
}


@dataclass(frozen=True)
class TokenizerStyle:
    """Special tokens and BOS behaviour of one family's tokenizer."""

    chat_template: str
    bos: str | None  # None: the family declares no BOS token (Qwen2.5/Qwen3)
    eos: str
    pad: str
    turn_close: str
    specials: tuple[str, ...]
    add_bos: bool


_STYLES = {
    "qwen2": TokenizerStyle(
        "chatml", None, "<|im_end|>", "<|endoftext|>", "<|im_end|>",
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), add_bos=False,
    ),
    "llama": TokenizerStyle(
        "llama3", "<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>", "<|eot_id|>",
        ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
         "<|eot_id|>", "<|finetune_right_pad_id|>"), add_bos=True,
    ),
    "gemma3": TokenizerStyle(
        "gemma", "<bos>", "<end_of_turn>", "<pad>", "<end_of_turn>",
        ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"), add_bos=True,
    ),
}
_STYLES["qwen3"] = _STYLES["qwen2"]

_WORDS = (
    "the a red blue green yellow cat dog bird fish house tree river city sky ocean mountain "
    "one two three four five many happy sad calm angry small large old new quickly slowly runs "
    "sits sees eats sings jumps in on under near with and but because explanation concept vector "
    "summary text activation model layer network describes semantic content snippets depth "
    "researcher meticulous investigation important language please provide here is we will pass "
    "enclosed tags into your context you must then produce an for that of this is are was"
).split()


def tiny_training_text(seed: int = 0, n_lines: int = 400) -> list[str]:
    """Generated text the tiny tokenizer is trained on: words, NLA template text and the marker."""
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 16))) for _ in range(n_lines)]
    # The marker appears often and always alone, so BPE merges its three UTF-8 bytes into one
    # token; no other character of U+3200–U+33FF appears, so those stay multi-token.
    # It is never trained next to punctuation, so "<concept>㈎</concept>" still splits into
    # ">", "㈎", "</" — the neighbour pattern the real Qwen2.5 tokenizer has.
    lines += [TINY_MARKER_CHAR] * 200 + ["<concept> </concept>"] * 50
    lines += ["<explanation>\nSummary of the following text: <text>x</text> <summary>\n</explanation>"] * 20
    lines += ["0123456789 .,:;!?%()[]{}<>/\\'\"-_=+*&^$#@~`|"] * 20
    return lines


def build_tiny_tokenizer(family: str, out_dir: str | Path, vocab_size: int = 512, seed: int = 0,
                         texts: list[str] | None = None):
    """Train a byte-level BPE tokenizer in the style of ``family`` and save it to ``out_dir``.

    ``texts`` (optional) are extra training lines appended to :func:`tiny_training_text` (the toy
    world passes its corpus and explanation phrasings so they tokenise compactly). They should not
    contain :data:`TINY_MARKER_CHAR`, or the marker's neighbour pattern may change.

    Returns the reloaded ``PreTrainedTokenizerFast`` (reloaded through ``AutoTokenizer`` so tests
    see exactly what a user loading the directory sees).
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    style = _style(family)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(style.specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tiny_training_text(seed) + list(texts or ()), trainer=trainer)
    if style.add_bos:
        bos_id = tok.token_to_id(style.bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{style.bos} $A", pair=f"{style.bos} $A $B", special_tokens=[(style.bos, bos_id)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=style.bos,
        eos_token=style.eos,
        pad_token=style.pad,
        chat_template=_CHAT_TEMPLATES[style.chat_template],
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)


def tiny_config(family: str, vocab_size: int, *, layers: int = 4, hidden: int = 64, heads: int = 2,
                kv_heads: int = 1, intermediate: int | None = None, tokenizer=None):
    """A transformers config for a tiny ``family`` model (head size = hidden // heads ≥ 32)."""
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config, Qwen3Config

    head_dim = hidden // heads
    if head_dim < 32:
        raise ValueError(f"head size {head_dim} < 32: vLLM's CPU attention needs ≥ 32 "
                         f"(use hidden ≥ 32 × heads)")
    ids = {}
    if tokenizer is not None:
        ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    common = dict(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads,
        intermediate_size=intermediate or 2 * hidden, max_position_embeddings=1024,
        tie_word_embeddings=True, **ids,
    )
    family = _check_family(family)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "qwen3":
        return Qwen3Config(head_dim=head_dim, **common)
    if family == "llama":
        return LlamaConfig(head_dim=head_dim, **common)
    # Gemma-3: alternating sliding/global layers and √d embedding scaling inside the model.
    return Gemma3TextConfig(head_dim=head_dim, sliding_window=64, query_pre_attn_scalar=head_dim,
                            **common)


def build_tiny_model(family: str, out_dir: str | Path, *, seed: int = 0, layers: int = 4,
                     hidden: int = 64, heads: int = 2, kv_heads: int = 1, tokenizer=None):
    """Build a tiny random causal LM of ``family`` (with its tokenizer) and save both to ``out_dir``.

    Returns ``(model, tokenizer)`` reloaded from disk in float32.
    """
    import torch
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    tokenizer = tokenizer or build_tiny_tokenizer(family, out_dir)
    tokenizer.save_pretrained(out_dir)
    config = tiny_config(family, len(tokenizer), layers=layers, hidden=hidden, heads=heads,
                         kv_heads=kv_heads, tokenizer=tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out_dir, safe_serialization=True)
    return AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32), tokenizer


def turn_close_token(family: str) -> str:
    """The token that closes an assistant turn in ``family``'s chat format."""
    return _style(family).turn_close


def _check_family(family: str) -> str:
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny model family {family!r}; choose one of {', '.join(FAMILIES)}")
    return family


def _style(family: str) -> TokenizerStyle:
    return _STYLES[_check_family(family)]
