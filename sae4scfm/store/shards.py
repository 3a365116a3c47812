"""The sharded on-disk store of one layer's activations (written by ``store.extract``,
streamed into training by ``store.buffer``).

Store format (one folder per layer)::

    meta.json                    {"format": 1, "layer", "d_model", "dtype", "n_tokens",
                                  "n_cells", "include_special", "rows", "shards": [{"file", "n_tokens"}]}
    shard_00000.safetensors      acts    [n, d_model] float16|float32
                                 cell    [n] int64   row of the token's cell in the AnnData
                                 gene    [n] int64   vocabulary id of the token's gene (-1: a cell row)
                                 special [n] uint8   1 for special tokens (stored only on request)

``rows``: ``tokens`` (one row per token; absent in stores written before it existed) or a
cell-level hook point (``cell_mean`` | ``cls``: one row per cell, ``store.extract.cell_vectors``);
``n_tokens`` counts rows either way.

A store is written into ``<folder>.partial`` and renamed when complete, so an
interrupted extraction never leaves a store that looks finished; inside it each shard is written
under a temp name and renamed, so a rerun keeps the finished shards (``store.extract``). A shard
holds whole length-bucketed batches (similar lengths share a forward) in a seeded batch order;
``store.buffer`` makes batches uniform anyway. Memory during extraction and streaming is bounded by ``shard_tokens`` and
``buffer_tokens``, not by the number of cells.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sae4scfm.atomic import atomic_write, atomic_write_json
from sae4scfm.errors import InputError

DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


class ActivationStore:
    """A finished store of one layer's activations (rows: tokens, or one per cell)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        meta_file = self.root / "meta.json"
        if not meta_file.is_file():
            raise InputError(f"{self.root} is not a finished activation store (no meta.json).")
        self.meta = json.loads(meta_file.read_text())

    @property
    def n_tokens(self) -> int:
        return int(self.meta["n_tokens"])

    @property
    def rows(self) -> str:
        """``tokens`` or the cell-level hook point whose vectors the rows are."""
        return str(self.meta.get("rows", "tokens"))

    @property
    def d_model(self) -> int:
        return int(self.meta["d_model"])

    @property
    def n_shards(self) -> int:
        return len(self.meta["shards"])

    def read_rows(self, i: int, ranges: np.ndarray) -> np.ndarray:
        """Rows ``a:b`` of shard ``i``'s activations for each ``(a, b)`` of ``ranges`` [n, 2], concatenated:
        [sum(b - a), d_model] float32 | float16 (bfloat16 rows as their int16 bit patterns:
        ``torch.from_numpy(a).view(torch.bfloat16)``). One ``os.preadv`` per range straight into the
        result: the file goes through the page cache but is never mapped into the process, so its
        resident memory is the result, whatever the store size (a memory map would keep every page it
        touched resident)."""
        path = self.root / self.meta["shards"][i]["file"]
        with open(path, "rb") as f:
            n_header = int.from_bytes(f.read(8), "little")
            entry = json.loads(f.read(n_header))["acts"]
            dtype = np.dtype({"F32": np.float32, "F16": np.float16, "BF16": np.int16}[entry["dtype"]])
            d = int(entry["shape"][1])
            ranges = np.asarray(ranges, dtype=np.int64).reshape(-1, 2)
            out = np.empty((int((ranges[:, 1] - ranges[:, 0]).sum()), d), dtype=dtype)
            row_bytes, base = d * dtype.itemsize, 8 + n_header + entry["data_offsets"][0]
            view, at = memoryview(out.reshape(-1).view(np.uint8)), 0
            for a, b in ranges:
                size = int(b - a) * row_bytes
                if size and os.preadv(f.fileno(), [view[at:at + size]], base + int(a) * row_bytes) != size:
                    raise InputError(f"{path}: rows {a}:{b} are past the end of the file (a truncated shard); "
                                     "delete the store folder and extract again.")
                at += size
        return out

    def shard(self, i: int) -> dict[str, torch.Tensor]:
        return load_file(self.root / self.meta["shards"][i]["file"])

    def iter_shards(self) -> Iterator[dict[str, torch.Tensor]]:
        for i in range(self.n_shards):
            yield self.shard(i)

    def sample(self, n: int, seed: int) -> torch.Tensor:
        """Up to ``n`` float32 activations drawn uniformly without replacement: [n, d_model]."""
        rng = np.random.default_rng(seed)
        take = np.sort(rng.choice(self.n_tokens, min(n, self.n_tokens), replace=False))
        out, start = [], 0
        for shard in self.iter_shards():
            stop = start + len(shard["acts"])
            local = take[(take >= start) & (take < stop)] - start
            out.append(shard["acts"][torch.from_numpy(local)].float())
            start = stop
        return torch.cat(out)


class _ShardWriter:
    """Writes one layer's store into ``root`` (``<store>.partial``), shard by shard, each shard
    through the atomic writer, so a file named ``shard_*.safetensors`` is always complete.

    ``shard_tokens`` > 0: a shard is written whenever that many rows are pending (in-memory use);
    0: the caller names each shard (``write(index)``, extraction's plan). ``plan_id`` identifies
    the shard plan: ``main`` (rank 0) keeps the finished shards of a folder left by a killed run
    with the same plan and starts afresh otherwise."""

    def __init__(self, root: Path, layer: int, d_model: int, dtype: str, shard_tokens: int, include_special: bool,
                 rows: str = "tokens", plan_id: str = "", main: bool = True):
        self.root, self.shard_tokens = Path(root), shard_tokens
        self.dtype = DTYPES[dtype]
        self.meta = {"format": 1, "layer": layer, "d_model": d_model, "dtype": dtype, "n_tokens": 0,
                     "include_special": include_special, "rows": rows, "shards": []}
        self.parts: list[dict[str, torch.Tensor]] = []
        self.pending, self.written = 0, 0
        plan_file = self.root / "plan.json"
        if main:
            if not plan_file.is_file() or json.loads(plan_file.read_text()).get("plan") != plan_id:
                shutil.rmtree(self.root, ignore_errors=True)
            self.root.mkdir(parents=True, exist_ok=True)
            for stray in self.root.glob(".*.tmp"):  # temp files of a killed write
                stray.unlink()
            atomic_write_json(plan_file, {"plan": plan_id})

    @staticmethod
    def shard_name(index: int) -> str:
        return f"shard_{index:05d}.safetensors"

    def has(self, index: int) -> bool:
        """Whether shard ``index`` is finished (written by this or an earlier, killed run)."""
        return (self.root / self.shard_name(index)).is_file()

    def add(self, acts: torch.Tensor, cell: torch.Tensor, gene: torch.Tensor, special: torch.Tensor) -> None:
        self.parts.append({"acts": acts.to("cpu", self.dtype), "cell": cell.cpu(), "gene": gene.cpu(),
                           "special": special.cpu().to(torch.uint8)})
        self.pending += len(acts)
        if self.shard_tokens and self.pending >= self.shard_tokens:
            self.write(self.written)

    def write(self, index: int) -> None:
        """Write the pending rows as shard ``index`` (atomically) and start the next shard."""
        if not self.parts:
            return
        tensors = {k: torch.cat([p[k] for p in self.parts]).contiguous() for k in self.parts[0]}
        atomic_write(self.root / self.shard_name(index), lambda tmp: save_file(tensors, tmp))
        self.parts, self.pending, self.written = [], 0, self.written + 1

    def close(self, n_cells: int, n_shards: int | None = None) -> None:
        """Write the pending rows, then ``meta.json`` listing shards 0 .. ``n_shards`` - 1 (default:
        those written here), with their row counts read from the shard headers."""
        self.write(self.written)
        n_shards = self.written if n_shards is None else n_shards
        missing = [i for i in range(n_shards) if not self.has(i)]
        if missing:
            raise InputError(f"{self.root}: shards {missing[:5]} are missing after every rank finished; under "
                             "torchrun on several nodes, buffer.store_dir must be a folder all nodes share.")
        for i in range(n_shards):
            with safe_open(self.root / self.shard_name(i), framework="pt") as f:
                n = int(f.get_slice("acts").get_shape()[0])
            self.meta["shards"].append({"file": self.shard_name(i), "n_tokens": n})
            self.meta["n_tokens"] += n
        self.meta["n_cells"] = n_cells
        (self.root / "plan.json").unlink(missing_ok=True)
        atomic_write_json(self.root / "meta.json", self.meta)
