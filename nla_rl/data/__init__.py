"""Data generation: corpora, activation extraction, storage, splits, teachers, hard negatives and
the toy world.

Storage contract (every stage reads only these files):

* ``<run>/data/<split>.parquet`` — one row per activation: ``doc_id`` int64, ``position`` int32
  (token index in the document), ``layer`` int16 (K), ``activation_vector``
  fixed_size_list<float32>[d] (raw, never normalised), optional ``text_prefix`` string,
  ``explanation`` string (teacher), and for the toy world ``attributes`` list<string> (the ground
  truth at that position). Beside it ``<split>.parquet.nla_meta.yaml`` (dataset sidecar).
* ``<run>/data/rl.negatives.parquet`` — hard negatives of the rl split: ``neighbors``
  list<int32> (row indices into rl.parquet, best first) and ``scores`` list<float32> (cosines).
"""
