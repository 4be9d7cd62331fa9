"""The toy base LM: a tiny Qwen2-style model trained on the toy-world corpus on CPU in minutes.

Its block-K activations are what the toy NLA explains. The tokenizer is the tiny byte-level BPE
trained on :func:`~nla_rl.data.toyworld.toy_tokenizer_texts` (vocab 1024 makes every corpus,
template and explanation word one token). The LM trains on documents with ids from
:data:`LM_DOC_START` on, disjoint from the ids the data pipeline uses (0, 1, …), and on fresh
documents every step, so it cannot memorise; its loss floor is the corpus entropy (see
:func:`corpus_entropy_floor`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from nla_rl.data.toyworld import DEFAULT_P_SLOT, ToyWorld, toy_tokenizer_texts
from nla_rl.errors import ConfigError

LM_DOC_START = 1_000_000_000
META_FILE = "toy_lm.json"
_WEIGHTS = "model.safetensors"


def build_toy_tokenizer(out_dir: str | Path, *, seed: int = 0, vocab_size: int = 1024,
                        ending: str = "end"):
    """The toy world's tiny byte-level BPE (Qwen2 style), saved to ``out_dir`` and reloaded."""
    from nla_rl.testing.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer("qwen2", out_dir, vocab_size=vocab_size, seed=seed,
                                texts=toy_tokenizer_texts(seed, ending=ending))


def is_finished_toy_lm(path: str | Path) -> bool:
    """Whether ``path`` holds a finished toy LM (weights and ``toy_lm.json``, written last)."""
    path = Path(path)
    return (path / META_FILE).is_file() and (path / _WEIGHTS).is_file()


def train_toy_lm(out_dir: str | Path, *, seed: int = 0, steps: int = 600, hidden: int = 128,
                 layers: int = 4, heads: int = 4, kv_heads: int = 1, batch_size: int = 32,
                 max_len: int = 96, lr: float = 1e-3, warmup: int | None = None,
                 vocab_size: int = 1024, threads: int = 1, progress: bool = True,
                 ending: str = "end", recap_loss_weight: float = 1.0,
                 p_slot: float = DEFAULT_P_SLOT) -> Path:
    """Train the toy LM and save model + tokenizer (safetensors) and ``toy_lm.json`` to ``out_dir``.

    Next-token prediction with AdamW (betas 0.9/0.95, linear warmup — default 10% of ``steps`` —
    then cosine to 10% of ``lr``, gradient clip 1), one torch thread. Written into a temporary
    sibling directory renamed into place, so ``out_dir`` either holds a finished model or does not
    exist. Cached: if ``out_dir`` is already finished it is returned untouched; if it was trained
    with other settings that is an error (delete it to retrain).

    ``recap_loss_weight`` w (recap world): the loss is ``Σ_t m_t·nll_t / Σ_t m_t`` with
    ``m_t = w`` on the tokens after the readout (the recap) and 1 elsewhere; the logged loss
    stays the plain per-token mean, comparable to the entropy floor.
    """
    out_dir = Path(out_dir)
    if recap_loss_weight <= 0:
        raise ConfigError(f"toyworld.recap_loss_weight: must be > 0, found {recap_loss_weight}")
    settings = dict(seed=seed, steps=steps, hidden=hidden, layers=layers, heads=heads,
                    kv_heads=kv_heads, batch_size=batch_size, max_len=max_len, lr=lr,
                    warmup=warmup if warmup is not None else max(1, steps // 10),
                    vocab_size=vocab_size, ending=ending, world=world_fingerprint(seed, ending, p_slot))
    if recap_loss_weight != 1.0:  # absent at 1: LMs cached before the weight existed stay valid
        settings["recap_loss_weight"] = recap_loss_weight
    if p_slot != DEFAULT_P_SLOT:  # likewise absent at the default
        settings["p_slot"] = p_slot
    if is_finished_toy_lm(out_dir):
        return _check_cached(out_dir, settings)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not a finished toy LM; remove it first")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        meta = _train(tmp, settings, threads=threads, progress=progress)
        _write_meta(tmp, meta)
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def world_fingerprint(seed: int, ending: str = "end", p_slot: float = DEFAULT_P_SLOT) -> str:
    """A hash of what the toy LM learns from (tokenizer texts, a sample of its training
    documents): a cached LM built from an older toy world must not be reused silently."""
    import hashlib

    docs = [d.text for d in ToyWorld(seed, ending=ending, p_slot=p_slot).documents(
        20, start=LM_DOC_START)]
    return hashlib.sha256("\n".join([*toy_tokenizer_texts(seed, ending=ending), *docs]).encode()).hexdigest()[:16]


def _check_cached(out_dir: Path, settings: dict) -> Path:
    meta = json.loads((out_dir / META_FILE).read_text())
    cached = meta.get("settings") or {}
    if cached != settings:
        differ = sorted(k for k in set(cached) | set(settings) if cached.get(k) != settings.get(k))
        what = f"it was trained with other settings ({', '.join(differ)})"
        if differ == ["world"]:
            what = ("the toy world (corpus or tokenizer texts) changed since it was trained"
                    if "world" in cached else "it predates the toy-world fingerprint")
        raise ConfigError(f"{out_dir} holds a toy LM that does not match: {what}; delete the "
                         "directory to retrain it")
    return out_dir


def _publish(tmp: Path, out_dir: Path) -> None:
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    try:
        os.rename(tmp, out_dir)
    except OSError:
        if not is_finished_toy_lm(out_dir):  # not a concurrent writer finishing first
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _write_meta(tmp: Path, meta: dict) -> None:
    (tmp / META_FILE).write_text(json.dumps(meta, indent=1))


def _train(tmp: Path, settings: dict, *, threads: int, progress: bool) -> dict:
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    from nla_rl.testing.tiny import tiny_config

    s = settings
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t0 = time.perf_counter()
        tok = build_toy_tokenizer(tmp, seed=s["seed"], vocab_size=s["vocab_size"],
                                  ending=s["ending"])
        config = tiny_config("qwen2", len(tok), layers=s["layers"], hidden=s["hidden"],
                             heads=s["heads"], kv_heads=s["kv_heads"], tokenizer=tok)
        torch.manual_seed(s["seed"])
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        world = ToyWorld(s["seed"], ending=s["ending"], p_slot=s.get("p_slot", DEFAULT_P_SLOT))
        opt = torch.optim.AdamW(model.parameters(), lr=s["lr"], betas=(0.9, 0.95),
                                weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(s["steps"], s["warmup"]))
        model.train()
        losses = []
        bar = tqdm(range(s["steps"]), desc="toy LM", disable=not progress, mininterval=2)
        for step in bar:
            docs = world.documents(s["batch_size"], start=LM_DOC_START + step * s["batch_size"])
            ids, mask = pad_right(tok, [d.text for d in docs], s["max_len"])
            weights = recap_weights(tok, docs, mask, s.get("recap_loss_weight", 1.0))
            loss, weighted = lm_losses(model, ids, mask, weights)
            opt.zero_grad(set_to_none=True)
            weighted.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(round(loss.item(), 4))
            if step % 10 == 0:
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
        model.eval()
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        tail = losses[-max(1, len(losses) // 10):]
        return dict(settings=s, loss_curve=losses, final_loss=sum(tail) / len(tail),
                    entropy_floor_nats=corpus_entropy_floor(world, tok),
                    params=sum(p.numel() for p in model.parameters()),
                    wall_s=round(time.perf_counter() - t0, 2))
    finally:
        torch.set_num_threads(prev_threads)


def recap_weights(tokenizer, docs, mask, weight: float):
    """Per-token loss weights ``[B, T]``: ``weight`` on each document's tokens after its readout
    (the recap), 1 elsewhere, 0 on padding."""
    import torch

    weights = mask.float()
    if weight != 1.0:
        for i, doc in enumerate(docs):
            if doc.readout_end is not None:
                weights[i, len(tokenizer(doc.readout_text)["input_ids"]):] *= weight
    return weights


def lm_losses(model, ids, mask, weights):
    """``(mean next-token NLL, weighted mean)``: ``Σ nll_t / Σ 1`` and ``Σ w_t·nll_t / Σ w_t``
    over the predicted tokens ``t ≥ 1`` (``w_t`` the target token's weight)."""
    import torch

    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                            ids[:, 1:].reshape(-1), reduction="none")
    nll = nll.view(ids.shape[0], -1)
    counted, w = mask[:, 1:].float(), weights[:, 1:]
    return (nll * counted).sum() / counted.sum(), (nll * w).sum() / w.sum()


def _lr_lambda(steps: int, warmup: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def pad_right(tokenizer, texts: list[str], max_len: int):
    """``(input_ids, attention_mask)`` tensors, truncated to ``max_len`` and padded on the right."""
    import torch

    rows = [tokenizer(t)["input_ids"][:max_len] for t in texts]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def corpus_entropy_floor(world: ToyWorld, tokenizer, n_docs: int = 2000) -> float:
    """Estimated loss floor in nats/token: Σ generator-choice nats / Σ predicted tokens.

    An upper bound on the true floor where two choice paths produce the same text.
    """
    docs = world.documents(n_docs, start=LM_DOC_START - n_docs)
    tokens = sum(len(tokenizer(d.text)["input_ids"]) - 1 for d in docs)
    return sum(d.nats for d in docs) / tokens


def last_token_activations(model, tokenizer, texts: list[str], layer: int, batch_size: int = 64,
                           max_len: int = 96) -> np.ndarray:
    """Output of block ``layer`` (``hidden_states[layer + 1]``) at each text's last token."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            ids, mask = pad_right(tokenizer, texts[i : i + batch_size], max_len)
            hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
            last = mask.sum(1) - 1
            out.append(hs[layer + 1][torch.arange(len(ids)), last].float().numpy())
    return np.concatenate(out)


def linear_probe_accuracy(x_train: np.ndarray, y_train, x_test: np.ndarray, y_test,
                          l2: float = 1.0) -> float:
    """Test accuracy of a closed-form one-vs-rest ridge classifier.

    Features are centred and scaled with the training statistics first: activations at a fixed
    position are almost one constant direction, so uncentred probes mostly see that direction.
    """
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    xtr, xte = (x_train - mean) / std, (x_test - mean) / std
    classes = sorted(set(y_train))
    y = np.array([[c == v for c in classes] for v in y_train], dtype=np.float64) * 2 - 1
    w = np.linalg.solve(xtr.T @ xtr + l2 * np.eye(xtr.shape[1]), xtr.T @ (y - y.mean(0)))
    pred = np.asarray(classes)[np.argmax(xte @ w + y.mean(0), axis=1)]
    return float(np.mean(pred == np.asarray(y_test)))


def slot_labels(attribute_lists: Sequence[Iterable[str]], slot: str) -> list[str]:
    """The value of ``slot`` in each row's ``slot=value`` attributes, or ``absent``."""
    prefix = slot + "="
    return [next((a[len(prefix):] for a in attrs if a.startswith(prefix)), "absent")
            for attrs in attribute_lists]


def slot_probe_accuracies(x_train: np.ndarray, attrs_train, x_test: np.ndarray, attrs_test,
                          slots: Iterable[str], l2: float = 1.0) -> dict[str, tuple[float, float]]:
    """Per slot: (held-out linear-probe accuracy, majority-class rate on the test rows).

    Reads which toy-world attributes a set of activations encodes linearly; a slot is encoded
    when its accuracy clearly beats the majority rate (``absent`` counts as a class).
    """
    out = {}
    for slot in slots:
        y_train, y_test = slot_labels(attrs_train, slot), slot_labels(attrs_test, slot)
        majority = max(y_test.count(v) for v in set(y_test)) / len(y_test)
        out[slot] = (linear_probe_accuracy(x_train, y_train, x_test, y_test, l2=l2), majority)
    return out


def slot_features(attribute_lists: Sequence[Iterable[str]]) -> tuple[np.ndarray, np.ndarray]:
    """``(presence [N, slots], values [N, Σ values])``: one-hot which slots each row reveals, and
    which value each revealed slot has (``slot=value`` attributes; slots in ``SLOTS`` order)."""
    from nla_rl.data.toyworld import SLOTS

    rows = [dict(a.split("=", 1) for a in attrs) for attrs in attribute_lists]
    presence = np.array([[s in r for s in SLOTS] for r in rows], dtype=np.float64)
    values = np.array([[r.get(s) == v for s in SLOTS for v in SLOTS[s]] for r in rows],
                      dtype=np.float64)
    return presence, values


def ridge_fve(x_train: np.ndarray, f_train: np.ndarray, x_test: np.ndarray, f_test: np.ndarray,
              l2: float = 1.0) -> float:
    """Held-out fraction of variance of ``x`` explained by a ridge fit from features ``f``:
    ``1 - Σ‖x̂ - x‖² / Σ‖x - x̄‖²`` on the test rows, ``x̂ = (f - f̄) W + x̄`` fitted on the
    training rows."""
    x_mean, f_mean = x_train.mean(0), f_train.mean(0)
    centred = f_train - f_mean
    w = np.linalg.solve(centred.T @ centred + l2 * np.eye(centred.shape[1]),
                        centred.T @ (x_train - x_mean))
    residual = (f_test - f_mean) @ w + x_mean - x_test
    return float(1 - (residual ** 2).sum() / ((x_test - x_test.mean(0)) ** 2).sum())


def readout_property(x: np.ndarray, attribute_lists: Sequence[Iterable[str]],
                     train_fraction: float = 0.7) -> dict:
    """What the readout activations ``x`` carry, on held-out rows (the first ``train_fraction``
    of rows fit, the rest score), on L2-normalised vectors:

    * ``value_probe``: per slot, a linear probe's accuracy at the slot's value, over the rows
      that reveal it (the toy world v2 goal: ≥ 0.95 for every slot);
    * ``fve_presence``, ``fve_values``: ridge FVE from which slots are revealed, and from that
      plus their values; their difference is the values' share of the variance, what a
      reconstruction reward can pay a true value.
    """
    from nla_rl.data.toyworld import SLOTS

    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    attrs = [list(a) for a in attribute_lists]
    n_train = int(len(x) * train_fraction)
    probes = {}
    for slot in SLOTS:
        labels = np.array(slot_labels(attrs, slot))
        revealed = labels != "absent"
        train = np.flatnonzero(revealed[:n_train])
        test = n_train + np.flatnonzero(revealed[n_train:])
        probes[slot] = linear_probe_accuracy(x[train], labels[train], x[test], labels[test])
    presence, values = slot_features(attrs)
    both = np.hstack([presence, values])
    return {"value_probe": probes,
            "fve_presence": ridge_fve(x[:n_train], presence[:n_train], x[n_train:], presence[n_train:]),
            "fve_values": ridge_fve(x[:n_train], both[:n_train], x[n_train:], both[n_train:])}
