"""``nla-rl explain``, ``nla-rl extract`` and ``nla-rl eval`` (registered by :mod:`launch.cli`).

    nla-rl extract --base DIR --layer K --text "…" [--text-file F] [--positions last|all] --out v.npy
    nla-rl explain --av DIR --ar DIR --vectors v.npy|rows.parquet [--out results.jsonl] [--limit N]
                   [--injection-family add|replace]   (only for a sidecar that does not record it)
    nla-rl eval RUN_DIR [--av DIR --ar DIR] [--rows N]

``extract`` turns text into activations of the base model (block K's output), so a user can go
text → activation → explanation. ``explain`` prints each row's explanation, normalised MSE and
cosine of the AR's reconstruction, and the FVE over all rows (the paper's definition).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from nla_rl.atomic import atomic_path, atomic_write_text
from nla_rl.errors import NLAError


def load_vectors(path: str | Path, limit: int | None = None) -> np.ndarray:
    """float32 [n, d] from a ``.npy`` file or the ``activation_vector`` column of a parquet file."""
    import torch

    from nla_rl.data.store import read_activations
    from nla_rl.vectors import check_norms

    path = Path(path)
    if not path.is_file():
        raise NLAError(f"--vectors {path}: no such file")
    if limit is not None and limit < 1:
        raise NLAError(f"--limit: expected >= 1 rows, found {limit}")
    if path.suffix == ".npy":
        try:
            vectors = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            # numpy's own message suggests allow_pickle=True: an unsafe fix for a file that is
            # simply not an array file.
            raise NLAError(f"--vectors {path} is not a NumPy .npy vector file ({type(err).__name__}"
                           f"); write one with numpy.save(path, float32_array), or give a "
                           f".parquet with an activation_vector column") from None
    elif path.suffix in (".parquet", ".arrow"):
        vectors = read_activations(path)
    else:
        raise NLAError(f"--vectors {path}: expected a .npy (float32 [n, d]) or .parquet file")
    if vectors.ndim == 1:
        vectors = vectors[None, :]
    if vectors.ndim != 2 or not np.issubdtype(vectors.dtype, np.floating):
        raise NLAError(f"--vectors {path}: expected a float array [n, d], found "
                       f"{vectors.dtype} {list(vectors.shape)}")
    if len(vectors) == 0:
        raise NLAError(f"--vectors {path}: 0 rows; there is nothing to explain")
    vectors = np.ascontiguousarray(vectors[:limit], dtype=np.float32)
    check_norms(torch.from_numpy(vectors), f"--vectors {path}", NLAError)
    return vectors


def _cmd_explain(args) -> int:
    from nla_rl.inference import NLA

    vectors = load_vectors(args.vectors, args.limit)
    factory = None
    if args.engine != "hf":
        from rollout.explain import engine_factory
        factory = engine_factory(args.engine)
    nla = NLA.from_pretrained(args.av, args.ar, dtype=args.dtype, engine=args.engine,
                              engine_factory=factory, prefill=args.prefill,
                              injection_family=args.injection_family)
    result = nla.score(vectors, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    rows = result.rows()
    for row in rows:
        text = "(no explanation extracted)" if row["explanation"] is None else row["explanation"]
        print(f"[{row['row']}] mse={row['mse']:.4f} cos={row['cosine']:.4f}  {' '.join(text.split())}")
    print(f"FVE over {len(rows)} rows (paper definition): {result.fve:.4f}; extraction failures: "
          f"{result.extraction_failure_rate:.1%}")
    if args.out:
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        summary = {"summary": {"fve": result.fve, "rows": len(rows),
                               "extraction_failure_rate": result.extraction_failure_rate}}
        atomic_write_text(args.out, lines + json.dumps(summary, allow_nan=True) + "\n")
        print(f"wrote {args.out}")
    return 0


def _texts(args) -> list[str]:
    texts = list(args.text or [])
    blank = [i + 1 for i, t in enumerate(texts) if not t.strip()]
    if blank:
        raise NLAError(f"extract: --text number {blank} is empty or whitespace only; give text "
                       f"with at least one token")
    if args.text_file:
        path = Path(args.text_file)
        if not path.is_file():
            raise NLAError(f"--text-file {path}: no such file")
        try:
            content = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise NLAError(f"--text-file {path}: not UTF-8 text (byte {err.object[err.start]:#04x} "
                           f"at offset {err.start}); convert it, e.g. iconv -f latin1 -t utf-8"
                           ) from None
        texts += [line for line in content.splitlines() if line.strip()]
    if not texts:
        raise NLAError("extract: give at least one --text or a --text-file (one text per line)")
    return texts


def _cmd_extract(args) -> int:
    import torch

    from nla_rl.base_model import DTYPES
    from nla_rl.data.corpus import Document
    from nla_rl.data.extract import ActivationExtractor

    from nla_rl.base_model import check_model_dir

    texts = _texts(args)
    check_model_dir(args.base, "--base")
    if args.layer < 0:
        raise NLAError(f"--layer: K is a 0-based block index (block K's output is read), found "
                       f"{args.layer}; give 0 <= K < the base model's number of layers")
    last = args.positions == "last"
    # "last": the final non-special token of each text; "all": every non-special token.
    extractor = ActivationExtractor(args.base, args.layer, positions_per_doc=1 if last else args.max_tokens,
                                    min_pos=0, max_tokens=args.max_tokens, positions="last",
                                    dtype=DTYPES[args.dtype], device=args.device)
    with torch.inference_mode():
        table, stats = extractor.extract([Document(i, t) for i, t in enumerate(texts)])
    if table.num_rows == 0:
        raise NLAError("extract: no token positions found (are the texts empty?)")
    vectors = np.stack(table["activation_vector"].to_numpy(zero_copy_only=False)).astype(np.float32)
    out = Path(args.out)
    with atomic_path(out) as tmp, tmp.open("wb") as fh:  # a file object: np.save would add .npy
        np.save(fh, vectors, allow_pickle=False)
    index = [{"row": r, "text": int(d), "position": int(p)} for r, (d, p) in
             enumerate(zip(table["doc_id"].to_pylist(), table["position"].to_pylist()))]
    index_path = out.with_suffix(".rows.json")
    atomic_write_text(index_path, json.dumps(index))
    print(f"wrote {out}: float32 {list(vectors.shape)} (block {args.layer} of {args.base}, "
          f"{stats.rows} rows from {len(texts)} text(s)); row → (text, position) in {index_path}")
    return 0


def _cmd_eval(args) -> int:
    from launch.eval import evaluate

    report = evaluate(args.run_dir, av=args.av, ar=args.ar, rows=args.rows,
                      max_new_tokens=args.max_new_tokens)
    m = report["metrics"]
    print(f"evaluated {report['models']['label']} ({report['models']['av']}, {report['models']['ar']}) "
          f"on {report['data']['rows']} rows: fve={m['fve']:.4f} cosine={m['cosine']:.4f} "
          f"gap={m['gap']:.4f} top1={m['top1']:.4f}; controls fve: shuffled="
          f"{report['controls']['shuffled']['fve']:.4f}, no_injection="
          f"{report['controls']['no_injection']['fve']:.4f}")
    print(f"report: {Path(args.run_dir) / 'eval' / 'report.md'}")
    return 0


def add_inference_commands(sub) -> None:
    """Register ``explain``, ``extract`` and ``eval`` on the ``nla-rl`` subparsers."""
    explain = sub.add_parser("explain", help="explain activation vectors with an AV/AR pair")
    explain.add_argument("--av", required=True, help="AV checkpoint directory")
    explain.add_argument("--ar", required=True, help="AR checkpoint directory")
    explain.add_argument("--vectors", required=True, help=".npy float32 [n, d] or .parquet")
    explain.add_argument("--out", help="write one JSON line per row (+ a summary line)")
    explain.add_argument("--limit", type=int, help="only the first N vectors")
    explain.add_argument("--max-new-tokens", type=int, default=128)
    explain.add_argument("--batch-size", type=int, default=16)
    explain.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    explain.add_argument("--prefill", default="", help="text after the generation prompt")
    explain.add_argument("--engine", default="hf", choices=("hf", "vllm"))
    explain.add_argument("--injection-family", choices=("add", "replace"),
                         help="the AV's family when its sidecar does not record it (nanoNLA: add)")
    explain.set_defaults(func=_cmd_explain)

    extract = sub.add_parser("extract", help="activations of a base model for some text")
    extract.add_argument("--base", required=True, help="base model directory (HF)")
    extract.add_argument("--layer", type=int, required=True, help="K: read block K's output")
    extract.add_argument("--text", action="append", help="a text (repeatable)")
    extract.add_argument("--text-file", help="one text per non-empty line")
    extract.add_argument("--positions", choices=("last", "all"), default="last")
    extract.add_argument("--max-tokens", type=int, default=1024)
    extract.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    extract.add_argument("--device", default=None)
    extract.add_argument("--out", required=True, help="output .npy (float32 [n, d])")
    extract.set_defaults(func=_cmd_extract)

    ev = sub.add_parser("eval", help="evaluate a run's AV/AR pair on its eval split")
    ev.add_argument("run_dir")
    ev.add_argument("--av", help="AV directory (default: the run's most trained pair)")
    ev.add_argument("--ar", help="AR directory (with --av)")
    ev.add_argument("--rows", type=int, help="first N rows of data/eval.parquet (default: the "
                    "run's eval.rows, 256)")
    ev.add_argument("--max-new-tokens", type=int, default=None)
    ev.set_defaults(func=_cmd_eval)
