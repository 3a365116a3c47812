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
interrupted extraction never leaves a store that looks finished. Cells are written in
length order (extraction batches similar lengths); ``store.buffer`` makes batches uniform
anyway. Memory during extraction and streaming is bounded by ``shard_tokens`` and
``buffer_tokens``, not by the number of cells.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from safetensors.torch import load_file, save_file

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
    def __init__(self, root: Path, layer: int, d_model: int, dtype: str, shard_tokens: int, include_special: bool,
                 rows: str = "tokens"):
        self.root, self.shard_tokens = root, shard_tokens
        self.dtype = DTYPES[dtype]
        self.meta = {"format": 1, "layer": layer, "d_model": d_model, "dtype": dtype, "n_tokens": 0,
                     "include_special": include_special, "rows": rows, "shards": []}
        self.parts: list[dict[str, torch.Tensor]] = []
        self.pending = 0
        root.mkdir(parents=True)

    def add(self, acts: torch.Tensor, cell: torch.Tensor, gene: torch.Tensor, special: torch.Tensor) -> None:
        self.parts.append({"acts": acts.to("cpu", self.dtype), "cell": cell.cpu(), "gene": gene.cpu(),
                           "special": special.cpu().to(torch.uint8)})
        self.pending += len(acts)
        if self.pending >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self.parts:
            return
        tensors = {k: torch.cat([p[k] for p in self.parts]).contiguous() for k in self.parts[0]}
        name = f"shard_{len(self.meta['shards']):05d}.safetensors"
        save_file(tensors, self.root / name)
        self.meta["shards"].append({"file": name, "n_tokens": len(tensors["acts"])})
        self.meta["n_tokens"] += len(tensors["acts"])
        self.parts, self.pending = [], 0

    def close(self, n_cells: int) -> None:
        self.flush()
        self.meta["n_cells"] = n_cells
        (self.root / "meta.json").write_text(json.dumps(self.meta, indent=1))


