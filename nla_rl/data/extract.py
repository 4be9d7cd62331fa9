"""Activation extraction: block-K outputs of a base LM at sampled document positions.

* Documents are tokenised *with* special tokens (BOS where the tokenizer adds one) and truncated.
* Up to ``positions_per_doc`` positions per document, each ``≥ min_pos`` and not a special token,
  sampled without replacement by ``numpy.random.default_rng([seed, doc_id])``: reruns, and any
  other batching or sharding of the corpus, pick the same positions.
* Only blocks ``0..K`` are loaded (:meth:`ActivationReconstructor.from_base` builds the model from a
  config with ``K + 1`` layers; final norm and lm_head are Identity), so the captured tensor is the
  output of block K = ``hidden_states[K + 1]`` of the full model in transformers. Rows are batched
  by length, left-padded, with position ids counting real tokens only
  (:func:`nla_rl.ar_model.block_hidden_states`); each document is cut after its last sampled
  position (the model is causal, so later tokens cannot change the result).
* Vectors are stored raw in fp32; rows with a non-finite value are dropped and counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from nla_rl.ar_model import ActivationReconstructor, block_hidden_states
from nla_rl.data.corpus import Document
from nla_rl.data.store import ActivationWriter, activations_table
from nla_rl.errors import NLAError
from nla_rl.sidecar import (DatasetSidecar, dataset_sidecar_path, read_dataset_sidecar,
                            validate_dataset_sidecar, write_dataset_sidecar)


class ExtractionError(NLAError):
    """Extraction cannot run as asked (bad layer index, parameters, or output file)."""


@dataclass
class ExtractStats:
    """Counts of one extraction (add two with ``+``)."""

    documents: int = 0  # documents given
    too_short: int = 0  # documents with no eligible position (≤ min_pos tokens, or all special)
    tokens: int = 0  # tokens run through the model
    rows: int = 0  # rows kept
    nonfinite_rows: int = 0  # rows dropped for a NaN/inf value

    def __add__(self, other: ExtractStats) -> ExtractStats:
        return ExtractStats(**{k: v + getattr(other, k) for k, v in asdict(self).items()})

    def as_dict(self) -> dict:
        return asdict(self)


def special_token_ids(tokenizer) -> set[int]:
    """Ids of every special token: the named ones and added tokens flagged special."""
    ids = set(tokenizer.all_special_ids)
    ids |= {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}
    return ids


def tokenize_documents(tokenizer, docs: Sequence[Document], max_tokens: int) -> list[list[int]]:
    """Token ids of each document, with special tokens (BOS where the tokenizer adds one),
    truncated to ``max_tokens``."""
    if max_tokens < 1:
        raise ExtractionError(f"max_tokens: expected ≥ 1, found {max_tokens}")
    if not docs:
        return []
    enc = tokenizer([d.text for d in docs], add_special_tokens=True, truncation=True,
                    max_length=max_tokens)
    return [list(ids) for ids in enc["input_ids"]]


POSITION_MODES = ("random", "last")


def sample_positions(ids: Sequence[int], doc_id: int, *, seed: int, n: int, min_pos: int,
                     special_ids: set[int] | frozenset[int], mode: str = "random") -> list[int]:
    """Up to ``n`` sorted distinct positions ``p ≥ min_pos`` with ``ids[p]`` not special.

    ``random``: drawn without replacement by ``numpy.random.default_rng([seed, doc_id])``.
    ``last``: the last ``n`` such positions, where the model has read the whole (truncated)
    document; a document-level attribute is encoded there even when no single earlier token
    carries it.
    """
    if n < 0 or min_pos < 0 or seed < 0 or doc_id < 0:
        raise ExtractionError(f"sample_positions: n, min_pos, seed and doc_id must be ≥ 0, "
                              f"found n={n}, min_pos={min_pos}, seed={seed}, doc_id={doc_id}")
    if mode not in POSITION_MODES:
        raise ExtractionError(f"positions: expected one of {', '.join(POSITION_MODES)}, "
                              f"found {mode!r}")
    candidates = [p for p in range(min_pos, len(ids)) if ids[p] not in special_ids]
    k = min(n, len(candidates))
    if k == 0:
        return []
    if mode == "last":
        return candidates[len(candidates) - k:]
    rng = np.random.default_rng([seed, doc_id])
    chosen = rng.choice(len(candidates), size=k, replace=False)
    return sorted(candidates[i] for i in chosen)


class ActivationExtractor:
    """Captures block-K outputs of ``base_dir``'s model (only blocks 0..K are loaded)."""

    def __init__(self, base_dir: str | Path, layer_index: int, *, tokenizer=None,
                 positions_per_doc: int = 10, min_pos: int = 50, max_tokens: int = 1024,
                 positions: str = "random", seed: int = 0, batch_size: int = 8, text_prefix: bool = False,
                 dtype: torch.dtype = torch.float32, device: str | torch.device | None = None,
                 trust_remote_code: bool = False):
        from transformers import AutoConfig, AutoTokenizer

        from nla_rl.base_model import check_model_dir

        check_model_dir(base_dir, "base model")
        self.base_dir, self.layer_index = str(base_dir), int(layer_index)
        self.base_config = AutoConfig.from_pretrained(base_dir, trust_remote_code=trust_remote_code)
        total = int(self.base_config.num_hidden_layers)
        if not 0 <= self.layer_index < total:
            raise ExtractionError(
                f"layer_index: expected 0 ≤ K < {total} ({self.base_dir} has {total} decoder blocks; "
                f"K is a 0-based block index), found K={layer_index}. Choose K in 0..{total - 1}.")
        if batch_size < 1 or positions_per_doc < 1:
            raise ExtractionError(f"batch_size and positions_per_doc must be ≥ 1, found "
                                  f"{batch_size} and {positions_per_doc}")
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(
            base_dir, trust_remote_code=trust_remote_code)
        if positions not in POSITION_MODES:
            raise ExtractionError(f"positions: expected one of {', '.join(POSITION_MODES)}, "
                                  f"found {positions!r}")
        self.positions_per_doc, self.min_pos, self.max_tokens = positions_per_doc, min_pos, max_tokens
        self.positions = positions
        self.seed, self.batch_size, self.text_prefix = seed, batch_size, text_prefix
        ar = ActivationReconstructor.from_base(base_dir, self.layer_index, dtype=dtype,
                                               trust_remote_code=trust_remote_code)
        self.backbone = ar.backbone.eval()  # the identity value head is not needed
        if device is None and torch.cuda.is_available():
            device = "cuda"  # a Ray worker given a GPU sees exactly that one as cuda:0
        if device is not None:
            self.backbone.to(device)
        self.device = next(self.backbone.parameters()).device
        self.d_model = int(self.backbone.config.hidden_size)
        self._special = special_token_ids(self.tokenizer)
        tok = self.tokenizer
        self._pad_id = next((i for i in (tok.pad_token_id, tok.eos_token_id) if i is not None), 0)

    @property
    def num_loaded_layers(self) -> int:
        """Decoder blocks actually instantiated (K + 1)."""
        return len(getattr(self.backbone, self.backbone.base_model_prefix).layers)

    def _hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Block-K output [B, T, d] of a left-padded batch."""
        return block_hidden_states(self.backbone, input_ids, attention_mask)

    @torch.inference_mode()
    def extract(self, docs: Sequence[Document]) -> tuple[pa.Table, ExtractStats]:
        """One table (contract columns, plus ``text_prefix`` if enabled) for ``docs``, rows in
        document order then position order; and the counts."""
        stats = ExtractStats(documents=len(docs))
        plan = []  # (doc, ids cut after the last position, positions)
        for doc, ids in zip(docs, tokenize_documents(self.tokenizer, docs, self.max_tokens)):
            pos = sample_positions(ids, doc.doc_id, seed=self.seed, n=self.positions_per_doc,
                                   min_pos=self.min_pos, special_ids=self._special,
                                   mode=self.positions)
            if not pos:
                stats.too_short += 1
                continue
            plan.append((doc, ids[:pos[-1] + 1], pos))
        vectors = [None] * len(plan)
        order = sorted(range(len(plan)), key=lambda i: -len(plan[i][1]))
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            width = len(plan[rows[0]][1])
            ids = torch.full((len(rows), width), self._pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):  # left padding
                seq = plan[i][1]
                ids[r, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
                mask[r, width - len(seq):] = 1
            stats.tokens += int(mask.sum())
            hidden = self._hidden(ids.to(self.device), mask.to(self.device))
            for r, i in enumerate(rows):
                index = torch.tensor(plan[i][2], device=hidden.device) + (width - len(plan[i][1]))
                vectors[i] = hidden[r, index].float().cpu().numpy()
        return self._table(plan, vectors, stats)

    def _table(self, plan, vectors, stats: ExtractStats) -> tuple[pa.Table, ExtractStats]:
        d = self.d_model
        vec = np.concatenate(vectors) if vectors else np.empty((0, d), dtype=np.float32)
        doc_ids = np.concatenate([[doc.doc_id] * len(pos) for doc, _, pos in plan] or [[]])
        positions = np.concatenate([pos for _, _, pos in plan] or [[]])
        extra = {}
        if self.text_prefix:
            extra["text_prefix"] = pa.array(
                [self.tokenizer.decode(ids[:p + 1], skip_special_tokens=True)
                 for _, ids, pos in plan for p in pos], type=pa.string())
        finite = np.isfinite(vec).all(axis=1)
        stats.nonfinite_rows += int((~finite).sum())
        if not finite.all():
            vec, doc_ids, positions = vec[finite], doc_ids[finite], positions[finite]
            extra = {k: v.filter(pa.array(finite)) for k, v in extra.items()}
        stats.rows += len(vec)
        return activations_table(doc_ids, positions, self.layer_index, vec, **extra), stats

    def extract_to(self, docs: Sequence[Document], path: str | Path, *, dataset_id: str,
                   corpus: str, corpus_slice: tuple[int, int] | None = None,
                   docs_per_shard: int = 1024, append: bool = False) -> ExtractStats:
        """Extract ``docs`` shard by shard into ``path`` (parquet) and write its dataset sidecar
        (stage ``base``; counts under ``stats``). ``append=True`` adds to an existing file after
        checking its sidecar against this model (d_model, layer index, tokenizer)."""
        path = Path(path)
        previous = None
        if append and dataset_sidecar_path(path).is_file():
            previous = read_dataset_sidecar(path)
            validate_dataset_sidecar(previous, self.tokenizer, self.base_config)
            if previous.layer_index != self.layer_index:
                raise ExtractionError(f"{path}: cannot append layer-{self.layer_index} rows to a file "
                                      f"of layer {previous.layer_index}")
        total = ExtractStats()
        with ActivationWriter(path, self.d_model, append=append) as writer:
            for start in range(0, len(docs), docs_per_shard):
                table, stats = self.extract(docs[start:start + docs_per_shard])
                writer.write(table)
                total = total + stats
            if writer.rows == 0:
                raise ExtractionError(f"{path}: no rows extracted from {len(docs)} document(s) "
                                      f"({total.too_short} too short for min_pos={self.min_pos})")
        if previous is not None and isinstance(previous.extras.get("stats"), dict):
            known = ExtractStats().as_dict()
            total = total + ExtractStats(**{k: int(v) for k, v in previous.extras["stats"].items()
                                            if k in known})
        write_dataset_sidecar(path, DatasetSidecar(
            dataset_id=dataset_id, stage="base", row_count=writer.rows, base_model=self.base_dir,
            d_model=self.d_model, layer_index=self.layer_index, corpus=corpus,
            positions_per_doc=self.positions_per_doc, corpus_slice=corpus_slice,
            extras={"stats": total.as_dict(),
                    "sampling": {"seed": self.seed, "min_pos": self.min_pos,
                                 "positions": self.positions,
                                 "max_tokens": self.max_tokens, "text_prefix": self.text_prefix}}))
        return total
