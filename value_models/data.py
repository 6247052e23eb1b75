"""Training data for token-level value models: Parquet rows, a collator, a resumable sampler.

Row format (one Parquet row per problem x roll-in x roll-out; written by `value_models.collect`):

| column          | type          | meaning                                                          |
|-----------------|---------------|------------------------------------------------------------------|
| problem_id      | string        | id of the problem (stable across rounds; the val split hashes it)|
| round           | int32         | collection round (1 for plain VGS data)                          |
| policy          | string        | name of the roll-in policy                                       |
| roll_in_index   | int32         | which roll-in of this problem                                    |
| roll_out_index  | int32         | which roll-out of this roll-in                                   |
| roll_in_ids     | list<int32>   | prompt token ids + roll-in prefix token ids                      |
| roll_out_ids    | list<int32>   | pi_ref continuation token ids (ends with EOS when finished)     |
| prompt_len      | int32         | number of prompt tokens at the start of roll_in_ids              |
| label           | int8          | 0 finished incorrect, 1 finished correct, 2 unfinished           |
| answer          | string        | gold answer                                                      |
| pred            | string        | answer extracted from prefix + roll-out (may be empty)           |
| ...             |               | lengths, switch point, finish reason, seed (see collect.py)      |

The trainer reads only problem_id, roll_in_ids, roll_out_ids and label, so hand-made data
needs no more than these four columns.

Why one row per pair (not per problem as in the published OpenR1-VM): a sequence is then one
row read, nothing depends on a "responses per problem" constant, and rounds can be
aggregated by listing more files. `value_models.convert` turns OpenR1-VM rows into these.

Token lists are read as `large_list<int32>` (int64 offsets): one file may hold more than 2^31
tokens (the published data has ~35B). `value_models.prepare` converts Parquet data once into
memory-mappable Arrow files (a "prepared" directory) that every rank of every node maps
without any rank waiting for another.

Problem filters (`--drop`) are applied here, per problem over everything loaded together
(all rounds), never per collection chunk: `problems_to_drop`.
"""

from __future__ import annotations

import glob
import hashlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from vgs.errors import VGSError

if TYPE_CHECKING:  # torch itself is imported inside the functions that need it
    import torch

REQUIRED_COLUMNS = ("problem_id", "roll_in_ids", "roll_out_ids", "label")
NUM_CLASSES = 3
DROP_FILTERS = ("all-wrong", "no-variation", "none")
PREPARED_FILE = "prepared.json"
PREPARED_FORMAT = "vgs-prepared/1"


def problems_to_drop(codes: np.ndarray, labels: np.ndarray, num_problems: int, mode: str) -> np.ndarray:
    """Per problem (bool [num_problems]): whether the filter drops it, judged on all its rows.

    all-wrong:    no roll-out is correct (label 1) -- the published VGS post-filter
    no-variation: no roll-out is correct, or all are (nothing to rank)
    none:         nothing dropped"""
    if mode not in DROP_FILTERS:
        raise VGSError(f"--drop must be one of {', '.join(DROP_FILTERS)}, got {mode!r}")
    total = np.bincount(codes, minlength=num_problems)
    correct = np.bincount(codes, weights=(labels == 1).astype(np.float64), minlength=num_problems)
    if mode == "all-wrong":
        return correct == 0
    if mode == "no-variation":
        return (correct == 0) | (correct == total)
    return np.zeros(num_problems, dtype=bool)


def is_prepared(path: str) -> bool:
    return os.path.isfile(os.path.join(path, PREPARED_FILE))


def recorded_drop(paths: str | Sequence[str]) -> str | None:
    """The `--drop` filter the data's collection manifests (or prepared.json) name, if any;
    several that disagree are an error (the trainer's --drop then decides)."""
    import json

    if isinstance(paths, str):
        paths = [paths]
    found: dict[str, str] = {}
    for p in paths:
        if not os.path.isdir(p):
            continue
        parent = os.path.dirname(os.path.abspath(p))  # `--data COLLECT/data` names the shards' folder
        cands = [os.path.join(p, PREPARED_FILE)] if is_prepared(p) else (
            glob.glob(os.path.join(p, "manifest*.json"))
            + (glob.glob(os.path.join(parent, "manifest*.json")) if os.path.basename(os.path.abspath(p)) == "data" else []))
        for m in cands:
            try:
                with open(m) as f:
                    d = json.load(f)
            except (OSError, ValueError):
                continue
            drop = d.get("drop") or ("no-variation" if d.get("fingerprint", {}).get("drop_no_variation") else None)
            if drop:
                found[m] = drop
    if len(set(found.values())) > 1:
        raise VGSError("the training data's manifests name different --drop filters ("
                       + ", ".join(f"{k}: {v}" for k, v in sorted(found.items())) + "); choose one with --drop")
    return next(iter(found.values()), None)


def parquet_files(paths: str | Sequence[str], what: str = "training data") -> list[str]:
    """Expand files, directories (every *.parquet below, sorted) and globs into a file list.
    `what` names the input in errors (the trainer's data, convert's OpenR1-VM sources)."""
    if isinstance(paths, str):
        paths = [paths]
    files: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(glob.glob(os.path.join(p, "**", "*.parquet"), recursive=True))
            # skip hidden / private parts (collect's staging area, partial writes)
            found = [f for f in found if not any(part.startswith((".", "_")) or part.endswith(".tmp")
                                                 for part in os.path.relpath(f, p).split(os.sep))]
            if not found:
                raise VGSError(f"no .parquet files under {what} {p!r}")
            files.extend(found)
        elif os.path.isfile(p):
            files.append(p)
        else:
            matched = sorted(glob.glob(p))
            if not matched:
                raise VGSError(f"{what} {p!r} does not exist")
            files.extend(matched)
    return files


@dataclass
class Example:
    """One training sequence: roll_in + roll_out truncated to max_length.

    `out_start` is the index of the first roll-out token (the first supervised position)."""

    input_ids: np.ndarray  # int64 [length]
    out_start: int
    label: int

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])


class ValueDataset:
    """The rows of prepared directories (memory-mapped Arrow, see `value_models.prepare`) or of
    Parquet files (read into memory) as flat int32 token arrays plus int64 offsets (Arrow
    buffers, no per-row Python objects), so millions of rows index in O(1). A prepared
    directory is shared by every rank of a node through the page cache (the published data
    is ~35B tokens).

    `drop` filters whole problems over all rows loaded together (see `problems_to_drop`):
    their rows stay addressable but `usable()` leaves them out."""

    def __init__(self, paths: str | Sequence[str], max_length: int = 16384, drop: str = "none"):
        if max_length < 2:
            raise VGSError(f"max_length must be >= 2, got {max_length}")
        if isinstance(paths, str):
            paths = [paths]
        self.max_length = int(max_length)
        self.files: list[str] = []
        segs = []
        for p in paths:
            if os.path.isdir(p) and is_prepared(p):
                for f in prepared_files(p):
                    self.files.append(f)
                    segs.extend(_mapped_batches(f))
            else:
                for f in parquet_files(p):
                    self.files.append(f)
                    segs.append(_load_columns(f))
        segs = [t for t in segs if t.num_rows]
        if not segs:
            raise VGSError(f"no rows in {self.files}")
        names: dict[str, int] = {}
        codes, labels, self._segs = [], [], []
        for t in segs:
            pid = t.column("problem_id")
            enc = (pid.combine_chunks() if hasattr(pid, "combine_chunks") else pid).dictionary_encode()
            remap = np.array([names.setdefault(str(x), len(names)) for x in enc.dictionary.to_pylist()], dtype=np.int32)
            codes.append(remap[enc.indices.to_numpy(zero_copy_only=False)])
            labels.append(t.column("label").to_numpy().astype(np.int64))
            self._segs.append((*_flat(t.column("roll_in_ids")), *_flat(t.column("roll_out_ids"))))
        self.problem_names = list(names)
        self.problem_codes = np.concatenate(codes)
        self.labels = np.concatenate(labels)
        bad = ~np.isin(self.labels, np.arange(NUM_CLASSES))
        if bad.any():
            raise VGSError(f"labels must be 0, 1 or 2; found {sorted(set(self.labels[bad].tolist()))}")
        self._seg_start = np.cumsum([0] + [len(s[1]) - 1 for s in self._segs])
        self.roll_in_lens = np.concatenate([np.diff(s[1]) for s in self._segs])
        self.roll_out_lens = np.concatenate([np.diff(s[3]) for s in self._segs])
        # Truncated sequence length and number of supervised (roll-out) tokens in the window.
        self.lengths = np.minimum(self.roll_in_lens + self.roll_out_lens, self.max_length)
        self.loss_tokens = np.clip(self.lengths - self.roll_in_lens, 0, None)
        self.drop = drop
        self.dropped_problems = problems_to_drop(self.problem_codes, self.labels, len(self.problem_names), drop)
        self.dropped = self.dropped_problems[self.problem_codes]

    @property
    def problem_ids(self) -> np.ndarray:
        """Problem id of every row (object array; built on demand)."""
        return np.asarray(self.problem_names, dtype=object)[self.problem_codes]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def usable(self) -> np.ndarray:
        """Indices of rows of kept problems with at least one roll-out token inside
        max_length; the others would contribute nothing to the loss (their roll-in alone
        fills the window)."""
        return np.nonzero((self.loss_tokens > 0) & ~self.dropped)[0]

    def split(self, indices: np.ndarray, val_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(train, validation) subsets of `indices`, whole problems at a time (see
        `split_by_problem`); hashes each distinct problem id once."""
        if not 0 <= val_fraction < 1:
            raise VGSError(f"val_fraction must be in [0, 1), got {val_fraction}")
        is_val = np.array([problem_fraction(p, seed) < val_fraction for p in self.problem_names], dtype=bool)
        v = is_val[self.problem_codes[indices]]
        return np.asarray(indices)[~v], np.asarray(indices)[v]

    def __getitem__(self, i: int) -> Example:
        s = int(np.searchsorted(self._seg_start, i, side="right")) - 1
        j = i - int(self._seg_start[s])
        in_vals, in_off, out_vals, out_off = self._segs[s]
        a, b = in_off[j], in_off[j + 1]
        c, d = out_off[j], out_off[j + 1]
        ids = np.concatenate([in_vals[a:b], out_vals[c:d]])[: self.max_length].astype(np.int64)
        return Example(ids, int(min(b - a, self.max_length)), int(self.labels[i]))


def columns_schema():
    """The trainer's four columns; token lists with int64 offsets (no 2^31-token file limit)."""
    import pyarrow as pa

    return pa.schema([("problem_id", pa.string()), ("roll_in_ids", pa.large_list(pa.int32())),
                      ("roll_out_ids", pa.large_list(pa.int32())), ("label", pa.int8())])


def prepared_files(path: str) -> list[str]:
    """The Arrow files of a prepared directory, refusing one that is unfinished or stale."""
    import json

    with open(os.path.join(path, PREPARED_FILE)) as f:
        meta = json.load(f)
    if meta.get("format") != PREPARED_FORMAT or not meta.get("complete"):
        raise VGSError(f"{path} is not a finished prepared directory; re-run `python -m value_models.prepare`")
    for src in meta.get("sources", []):
        if os.path.exists(src["path"]):
            st = os.stat(src["path"])
            if st.st_size != src["size"] or st.st_mtime_ns != src["mtime_ns"]:
                raise VGSError(f"prepared data {path} is stale: {src['path']} changed since it was prepared; "
                               "re-run `python -m value_models.prepare` with the same --out")
    return [os.path.join(path, p["file"]) for p in meta["parts"]]


def _mapped_batches(path: str) -> list:
    """The record batches of an Arrow IPC file, memory-mapped (zero-copy: pages load on use)."""
    import pyarrow as pa

    reader = pa.ipc.open_file(pa.memory_map(path, "r"))
    return [reader.get_batch(i) for i in range(reader.num_record_batches)]


def check_columns(f: str, names: Sequence[str]) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise VGSError(f"{f!r} lacks column(s) {', '.join(missing)} (need {', '.join(REQUIRED_COLUMNS)})")


def _load_columns(f: str):
    """The four training columns of one Parquet file, read into memory."""
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(f)
    except Exception as exc:  # noqa: BLE001 - a corrupt file is a user problem
        raise VGSError(f"cannot read Parquet file {f!r}: {exc}") from exc
    check_columns(f, schema.names)
    return pq.read_table(f, columns=list(REQUIRED_COLUMNS)).cast(columns_schema()).combine_chunks()


def _flat(col) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets) of a list<int32> column, without copying the token values (so a
    memory-mapped column stays on disk); offsets rebased to 0, as int64."""
    import pyarrow as pa

    if isinstance(col, pa.ChunkedArray):
        col = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    if col.null_count:
        raise VGSError("token id lists must not be null")
    offsets = col.offsets.to_numpy().astype(np.int64, copy=False)
    try:
        values = col.values.to_numpy(zero_copy_only=True)
    except Exception:  # noqa: BLE001 - e.g. a sliced child with nulls: fall back to a copy
        values = col.values.to_numpy(zero_copy_only=False)
    return values[offsets[0]: offsets[-1]], offsets - offsets[0]


def problem_fraction(problem_id: str, seed: int = 0) -> float:
    """A stable pseudo-random number in [0, 1) per problem id, the same on every machine
    and in every round (so a problem never moves between train and validation)."""
    h = hashlib.sha1(f"{seed}:{problem_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def split_by_problem(problem_ids: Iterable[str], val_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices): whole problems go to validation, so the held-out
    split measures generalisation to unseen problems, not to unseen roll-outs."""
    if not 0 <= val_fraction < 1:
        raise VGSError(f"val_fraction must be in [0, 1), got {val_fraction}")
    ids = list(problem_ids)
    cache: dict[str, bool] = {}
    is_val = np.array([cache.setdefault(p, problem_fraction(p, seed) < val_fraction) for p in ids], dtype=bool)
    return np.nonzero(~is_val)[0], np.nonzero(is_val)[0]


@dataclass
class Batch:
    """A collated micro-batch.

    Unpacked: `input_ids` [B, T] right-padded, `attention_mask` [B, T]. Packed: one row
    [1, sum of lengths], `attention_mask` None and `position_ids` restarting at 0 for each
    sequence (transformers then builds a block-diagonal causal mask; flash-attention uses
    the position ids directly). `seq_index` [B, T] maps every token to its sequence (-1 on
    padding); `loss_mask` is 1 on roll-out tokens only; `labels` [N] per sequence;
    `last_pos` / `first_out_pos` [N] are flat indices into B*T of each sequence's final
    token and first roll-out token."""

    input_ids: "torch.Tensor"
    attention_mask: "torch.Tensor | None"
    position_ids: "torch.Tensor | None"
    seq_index: "torch.Tensor"
    loss_mask: "torch.Tensor"
    labels: "torch.Tensor"
    last_pos: "torch.Tensor"
    first_out_pos: "torch.Tensor"
    num_tokens: int  # real (non-pad) tokens
    num_padded: int  # B * T

    @property
    def num_seqs(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device) -> "Batch":
        import torch

        def mv(x):
            return x.to(device, non_blocking=True) if isinstance(x, torch.Tensor) else x

        return Batch(*(mv(getattr(self, f)) for f in (
            "input_ids", "attention_mask", "position_ids", "seq_index", "loss_mask", "labels",
            "last_pos", "first_out_pos")), num_tokens=self.num_tokens, num_padded=self.num_padded)


def collate(examples: Sequence[Example], pad_id: int, pad_to_multiple: int = 8, pack: bool = False) -> Batch:
    """Build one micro-batch. Loss mask: 0 on prompt + roll-in, 1 on roll-out tokens.

    Padding goes to the longest sequence of the batch rounded up to `pad_to_multiple`
    (8 keeps tensor cores aligned; the published code padded to multiples of 1024)."""
    import torch

    if not examples:
        raise ValueError("empty batch")
    lengths = [e.length for e in examples]
    n = len(examples)
    labels = torch.tensor([e.label for e in examples], dtype=torch.long)
    if pack:
        total = sum(lengths)
        width = -(-total // pad_to_multiple) * pad_to_multiple
        ids = torch.full((1, width), pad_id, dtype=torch.long)
        pos = torch.zeros((1, width), dtype=torch.long)
        seq = torch.full((1, width), -1, dtype=torch.long)
        mask = torch.zeros((1, width), dtype=torch.float32)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        for k, (e, s) in enumerate(zip(examples, starts)):
            s = int(s)
            ids[0, s: s + e.length] = torch.from_numpy(e.input_ids)
            pos[0, s: s + e.length] = torch.arange(e.length)
            seq[0, s: s + e.length] = k
            mask[0, s + e.out_start: s + e.length] = 1.0
        if width > total:  # tail padding: its own "sequence" of positions so it attends only to itself
            pos[0, total:] = torch.arange(width - total)
        last = torch.tensor([int(s) + e.length - 1 for e, s in zip(examples, starts)], dtype=torch.long)
        first = torch.tensor([int(s) + min(e.out_start, e.length - 1) for e, s in zip(examples, starts)], dtype=torch.long)
        return Batch(ids, None, pos, seq, mask, labels, last, first, total, width)
    width = -(-max(lengths) // pad_to_multiple) * pad_to_multiple
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    att = torch.zeros((n, width), dtype=torch.long)
    seq = torch.full((n, width), -1, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.float32)
    for k, e in enumerate(examples):
        ids[k, : e.length] = torch.from_numpy(e.input_ids)
        att[k, : e.length] = 1
        seq[k, : e.length] = k
        mask[k, e.out_start: e.length] = 1.0
    last = torch.tensor([k * width + e.length - 1 for k, e in enumerate(examples)], dtype=torch.long)
    first = torch.tensor([k * width + min(e.out_start, e.length - 1) for k, e in enumerate(examples)], dtype=torch.long)
    return Batch(ids, att, None, seq, mask, labels, last, first, sum(lengths), n * width)


def length_buckets(indices: Sequence[int], lengths: np.ndarray, micro_batch_size: int) -> list[list[int]]:
    """Split one rank's share of a step into micro-batches of similar length (sorted, then
    chunked), so padding inside a micro-batch is small. The number of micro-batches depends
    only on the count, so every rank runs the same number of forward passes (FSDP needs it)."""
    order = sorted(indices, key=lambda i: (int(lengths[i]), int(i)))
    return [order[k: k + micro_batch_size] for k in range(0, len(order), micro_batch_size)]


class StepSampler:
    """Endless, deterministic, resumable sampler of global batches, sharded over ranks.

    Each epoch is a permutation of `indices` seeded by (seed, epoch) and identical on every
    rank; step t takes the next `batch_size` entries of it (the incomplete tail of an epoch
    is dropped) and rank r keeps entries r, r + world, ... The global batch therefore does
    not depend on the world size. State = (epoch, position): saving it after a step and
    restoring it reproduces the remaining order exactly."""

    def __init__(self, indices: Sequence[int], batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise VGSError(f"batch size must be >= 1, got {batch_size}")
        if batch_size % world_size:
            raise VGSError(f"batch size {batch_size} is not divisible by the world size {world_size}")
        self.indices = np.asarray(indices, dtype=np.int64)
        if len(self.indices) < batch_size:
            raise VGSError(f"batch size {batch_size} exceeds the {len(self.indices)} training sequences")
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.epoch, self.position = 0, 0
        self._perm_epoch, self._perm = -1, self.indices

    @property
    def steps_per_epoch(self) -> int:
        return len(self.indices) // self.batch_size

    def _permutation(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._perm = self.indices[rng.permutation(len(self.indices))]
            self._perm_epoch = self.epoch
        return self._perm

    def next_global(self) -> np.ndarray:
        """The next global batch (all ranks' indices), advancing the state."""
        if self.position + self.batch_size > len(self.indices):
            self.epoch, self.position = self.epoch + 1, 0
        batch = self._permutation()[self.position: self.position + self.batch_size]
        self.position += self.batch_size
        return batch

    def next_indices(self) -> list[int]:
        """This rank's share of the next global batch."""
        return self.next_global()[self.rank:: self.world_size].tolist()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "size": int(len(self.indices))}

    def load_state_dict(self, state: dict) -> None:
        if int(state.get("size", len(self.indices))) != len(self.indices) or int(state.get("seed", self.seed)) != self.seed:
            raise VGSError("the training data or seed changed since the checkpoint was written; "
                           "resume with the same --data, --val-fraction and --seed")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
