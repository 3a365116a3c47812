"""Single-feature steering: the paired per-gene test equals scipy's on changes measured one forward at a
time, the null is matched on firing density, and the stage runs from a real Hydra config on a trained run."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats
from statsmodels.stats.multitest import multipletests

import sae4scfm
from sae4scfm.causal.interventions import Intervention, latent_edit
from sae4scfm.causal.steering import firing_stats, gene_shifts, matched_null, readout
from sae4scfm.errors import InputError


@pytest.fixture(scope="module")
def trained(small_run):
    from sae4scfm.data import load_dataset
    from sae4scfm.saes.base import load_sae
    from sae4scfm.scfm import load_scfm
    from sae4scfm.scfm.loading import tokenize_dataset

    cfg, run_dir = small_run
    adapter = load_scfm(cfg.scfm)
    tokens = tokenize_dataset(adapter, load_dataset(cfg.data), cfg.data)
    sae, _ = load_sae(run_dir)
    return cfg, run_dir, adapter, sae, tokens.subset(np.arange(12)), int(cfg.sae.target_layer)


def test_paired_gene_test_equals_scipy_on_one_forward_at_a_time(trained):
    _, _, adapter, sae, tokens, layer = trained
    density, scale = firing_stats(adapter, sae, layer, tokens)
    j = int(np.argmax(density))
    ivs = [Intervention((j,), "add", 2.0 * scale[j]), Intervention((j,), "clamp", 0.0, "firing")]
    shifts, output = gene_shifts(adapter, sae, layer, tokens, ivs, batch_size=5, per_forward=2, output="mvc")
    assert output == "mvc"
    for e, iv in enumerate(ivs):
        per_gene: dict[int, list[float]] = {}
        per_gene_clean: dict[int, list[float]] = {}
        with torch.no_grad():
            for i in range(len(tokens)):
                batch = tokens.collate(np.array([i]))
                clean = readout(adapter.run(batch), output, batch.gene_ids)[batch.gene_mask]
                with adapter.intervene(layer, latent_edit(sae, [iv])):
                    steered = readout(adapter.run(batch), output, batch.gene_ids)[batch.gene_mask]
                for g, c, s in zip(batch.gene_ids[batch.gene_mask].tolist(), clean.tolist(), steered.tolist()):
                    per_gene.setdefault(g, []).append(s)
                    per_gene_clean.setdefault(g, []).append(c)
        table = shifts.paired_test(e, min_cells=3).set_index("gene_id")
        genes = [g for g, v in per_gene.items() if len(v) >= 3]
        assert sorted(genes) == sorted(table.index)
        assert len(genes) > 100
        ref = [stats.ttest_rel(per_gene[g], per_gene_clean[g]) for g in genes]  # each gene on its own cells
        t_ref, p_ref = np.array([r.statistic for r in ref]), np.array([r.pvalue for r in ref])
        ok = np.isfinite(t_ref)
        assert ok.mean() > 0.9
        # float32 forwards of a padded 5-cell batch vs single cells differ by ~1e-6 in each readout
        np.testing.assert_allclose(table.loc[genes, "t"].to_numpy()[ok], t_ref[ok], rtol=2e-3, atol=1e-3)
        np.testing.assert_allclose(table.loc[genes, "p"].to_numpy()[ok], p_ref[ok], rtol=2e-3, atol=1e-4)
        np.testing.assert_allclose(table["q"], multipletests(table["p"], method="fdr_bh")[1], rtol=1e-10)
        emb = shifts.embedding[e]
        assert emb.shape == (len(tokens),) and np.all(emb > 0)


def test_vocab_readout_is_gepc_of_every_gene_and_steering_tests_it_in_every_cell(trained):
    """mvc_vocab: at a cell's input genes the whole-vocabulary GEPC equals the model's own ``mvc`` output; steered
    with it, every non-special gene is tested in every cell, and the paired test equals scipy's on changes
    measured one cell at a time."""
    _, _, adapter, sae, tokens, layer = trained
    from sae4scfm.scfm.scgpt.model import SPECIAL_TOKENS

    with torch.no_grad():
        batch = tokens.collate(np.arange(4))
        out = adapter.run(batch)
        values, ids = adapter.vocab_readout(out)
        assert values.shape == (4, len(adapter.vocab) - len(SPECIAL_TOKENS)) and len(ids) == values.shape[1]
        column = {int(g): c for c, g in enumerate(ids.tolist())}
        for b in range(4):
            genes = batch.gene_ids[b][batch.gene_mask[b]]
            mine = values[b, [column[int(g)] for g in genes]]
            torch.testing.assert_close(mine, out["mvc"][b][batch.gene_mask[b]], atol=1e-5, rtol=1e-5)
    density, scale = firing_stats(adapter, sae, layer, tokens)
    j = int(np.argmax(density))
    iv = Intervention((j,), "add", 3.0 * scale[j])
    shifts, output = gene_shifts(adapter, sae, layer, tokens, [iv], batch_size=5)
    assert output == "mvc_vocab"  # the default below the last layer: the demo has scGPT's GEPC head
    assert set(np.unique(shifts.n[0])) == {0.0, len(tokens)}
    assert int((shifts.n[0] == len(tokens)).sum()) == len(ids)
    deltas = []
    with torch.no_grad():
        for i in range(len(tokens)):
            one = tokens.collate(np.array([i]))
            clean = adapter.vocab_readout(adapter.run(one))[0][0]
            with adapter.intervene(layer, latent_edit(sae, [iv])):
                deltas.append((adapter.vocab_readout(adapter.run(one))[0][0] - clean).numpy())
    deltas = np.stack(deltas)  # [cells, G]
    table = shifts.paired_test(0).set_index("gene_id")
    ref = stats.ttest_1samp(deltas, 0.0, axis=0)
    np.testing.assert_allclose(table.loc[ids.numpy(), "mean_delta"], deltas.mean(0), rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(table.loc[ids.numpy(), "t"], ref.statistic, rtol=2e-3, atol=1e-3)
    assert np.abs(deltas).max() > 1e-3  # the edit reached the cell embedding


def test_paired_test_is_scipys_ttest_rel_on_the_accumulated_changes():
    """Exact in float64: accumulate known paired changes of 6 genes over up to 9 cells."""
    from sae4scfm.causal.steering import GeneShifts

    rng = np.random.default_rng(0)
    deltas = {g: rng.normal(0.3 * g - 0.5, 1.0, size=3 + g) for g in range(6)}
    n, total, squares = (np.zeros((1, 6)) for _ in range(3))
    for g, d in deltas.items():
        n[0, g], total[0, g], squares[0, g] = len(d), d.sum(), (d ** 2).sum()
    table = GeneShifts(n, total, squares, np.zeros((1, 9))).paired_test(0, min_cells=4).set_index("gene_id")
    assert list(table.index) == [1, 2, 3, 4, 5]
    for g in table.index:
        ref = stats.ttest_1samp(deltas[g], 0.0)
        np.testing.assert_allclose(table.loc[g, ["t", "p"]].to_numpy(float), [ref.statistic, ref.pvalue], rtol=1e-10)
        assert table.loc[g, "mean_delta"] == pytest.approx(deltas[g].mean(), rel=1e-12)


def test_matched_null_draws_the_nearest_densities_and_never_a_target():
    density = np.r_[0.0, np.geomspace(1e-4, 0.5, 99)]
    rng = np.random.default_rng(0)
    null = matched_null(density, [10, 60], 5, rng)
    for j, drawn in null.items():
        assert len(drawn) == 5 and j not in drawn and 0 not in drawn and 10 not in drawn and 60 not in drawn
        assert max(abs(np.log(density[drawn]) - np.log(density[j]))) <= np.sort(
            abs(np.log(density[1:]) - np.log(density[j])))[16]
    with pytest.raises(InputError, match="null_features=200"):
        matched_null(density, [10], 200, rng)


def test_steer_features_stage_writes_targets_against_the_null(trained, runs_dir):
    _, run_dir, *_ = trained
    address = [f"runs_dir={runs_dir}", "sae_checkpoint.experiment=small", f"sae_checkpoint.timestamp={run_dir.name}"]
    cfg = sae4scfm.compose("steer", [*address, "steering.n_cells=10", "steering.null_features=3",
                                     "steering.alphas=[-2,2]", "steering.labels=[CD14+ Monocyte,CD19+ B]",
                                     "steering.per_forward=8", "steering.markers=builtin"])
    from sae4scfm.causal.steering import steer_features

    summary = steer_features(cfg)
    out = run_dir / "causal" / "steering"
    assert len(summary) == 4 and set(summary["label"]) == {"CD14+ Monocyte", "CD19+ B"}
    assert pd.read_csv(out / "null.csv").shape[0] == 2 * 3 * 2
    genes = pd.read_csv(out / "genes.csv")
    assert set(genes["target"]) == set(summary["target"])
    for col in ("marker_excess_rank_p", "marker_rank_p", "n_significant_p", "embedding_shift_p"):
        assert summary[col].between(1 / 4, 1).all()  # (1 + #null >= x) / (1 + 3)
    assert summary["marker_set"].tolist() == ["CD14 Monocyte"] * 2 + ["B"] * 2
    assert summary["marker_rank"].between(0, 1).all()

    for extra, match in [("steering.features=[9999]", "out of range"),
                         ("steering.labels=[Martian]", "Martian"),
                         ("steering.label_key=nope", "nope")]:
        with pytest.raises(InputError, match=match):
            steer_features(sae4scfm.compose("steer", [*address, extra]))


def test_de_markers_are_chosen_on_train_cells_and_higher_in_their_label(trained):
    from sae4scfm.analysis.labels import train_mask
    from sae4scfm.analysis.run_data import open_run
    from sae4scfm.causal.steering import de_markers

    run = open_run(trained[1])
    expression, genes = run.expression()
    labels = run.features.obs["bulk_labels"].astype(str).to_numpy()
    is_train = train_mask(run.features.obs)
    markers = de_markers(expression, genes, labels, is_train, 10)
    shuffled = labels.copy()
    shuffled[~is_train] = np.random.default_rng(0).permutation(labels[~is_train])
    assert de_markers(expression, genes, shuffled, is_train, 10) == markers  # eval labels are never read
    col = {g: i for i, g in enumerate(genes)}
    X = expression[np.flatnonzero(is_train)].toarray()
    lab = labels[is_train]
    for label in ("CD14+ Monocyte", "CD19+ B"):
        assert len(markers[label]) == 10
        idx = [col[g] for g in markers[label]]
        assert (X[lab == label][:, idx].mean(0) > X[lab != label][:, idx].mean(0)).all()
    assert {"CD79A", "CD79B", "MS4A1"} & set(markers["CD19+ B"]) and {"LYZ", "S100A8", "S100A9", "FCN1", "CD14"} & set(markers["CD14+ Monocyte"])


def test_steer_cli_reports_bad_input_in_one_line(tmp_path, repo_root):
    proc = subprocess.run([sys.executable, str(repo_root / "scripts" / "steer_features.py"), f"runs_dir={tmp_path}",
                           "sae_checkpoint.experiment=none", "sae_checkpoint.timestamp=latest"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr


def test_null_excess_is_a_leave_one_out_z_against_the_null_features():
    """Each row's per-gene change as a z-score against the OTHER null features of its (target, α), so a gene that
    every edit moves scores 0 and the target's own gene-specific change stands out."""
    from sae4scfm.causal.steering import null_excess

    rng = np.random.default_rng(0)
    plan = [(7, f, a) for a in (4.0, -4.0) for f in (7, 1, 2, 3, 4)]
    deltas = rng.normal(size=(len(plan), 6)) + np.array([5, 5, 0, 0, 0, 0.0])  # genes 0, 1 move under every edit
    deltas[0, 2] += 10  # the target (α = +4) moves gene 2 specifically
    tests = [pd.DataFrame({"gene_id": np.arange(6)[::-1], "mean_delta": d[::-1]}) for d in deltas]
    z = null_excess(tests, plan)
    nulls = deltas[1:5]
    want = (deltas[0] - nulls.mean(0)) / nulls.std(0, ddof=1)
    np.testing.assert_allclose(z[0], want[::-1])
    loo = np.delete(nulls, 1, axis=0)  # row 2 = null feature 2 against nulls 1, 3, 4
    np.testing.assert_allclose(z[2], ((deltas[2] - loo.mean(0)) / loo.std(0, ddof=1))[::-1])
    assert np.argmax(z[0][::-1]) == 2 and abs(z[0][::-1][2]) > 3
    np.testing.assert_allclose(z[5], ((deltas[5] - deltas[6:].mean(0)) / deltas[6:].std(0, ddof=1))[::-1])


def test_own_genes_are_the_most_often_fired_on():
    from sae4scfm.causal.patching import own_genes

    fires = np.array([[0, 5, 1, 9, 0], [2, 0, 0, 0, 0]], dtype=float)
    seen = np.array([4, 10, 1, 10, 3], dtype=float)
    # fractions row 0: 0, .5, 1 (but gene 2 seen once < min_cells), .9, 0 -> genes 3, 1
    assert [g.tolist() for g in own_genes(fires, seen, top=3, min_cells=2)] == [[3, 1], [0]]


def test_gene_firing_counts_match_the_codes(trained):
    from sae4scfm.causal.patching import gene_firing

    _, _, adapter, sae, tokens, layer = trained
    fires, seen = gene_firing(adapter, sae, layer, tokens, [3, 7], batch_size=5)
    batch = tokens.collate(np.arange(len(tokens)))
    with torch.no_grad():
        f = sae.encode(adapter.capture(batch, [layer])[layer][batch.gene_mask])
    ids = batch.gene_ids[batch.gene_mask].numpy()
    np.testing.assert_array_equal(seen, np.bincount(ids, minlength=len(adapter.vocab)))
    for c, j in enumerate([3, 7]):
        np.testing.assert_array_equal(fires[c], np.bincount(ids, weights=(f[:, j] > 0).numpy(),
                                                            minlength=len(adapter.vocab)))


def test_patch_features_stage_compares_specificity_with_the_null(trained, runs_dir):
    from sae4scfm.causal.patching import patch_features

    _, run_dir, *_ = trained
    address = [f"runs_dir={runs_dir}", "sae_checkpoint.experiment=small", f"sae_checkpoint.timestamp={run_dir.name}"]
    summary = patch_features(sae4scfm.compose("patch", [*address, "patching.n_cells=10", "patching.null_features=3",
                                                        "patching.labels=[CD14+ Monocyte,CD19+ B]"]))
    assert len(summary) == 2
    assert (summary["specificity"] == summary["own_effect"] / summary["other_effect"]).all()
    assert summary["specificity_p"].between(0.25, 1).all() and summary["n_own"].between(1, 10).all()
    null = pd.read_csv(run_dir / "causal" / "patching" / "null.csv")
    assert len(null) == 6 and not set(null["feature_id"]) & set(summary["target"])


def test_trace_stage_traces_into_a_deeper_run_and_names_bad_targets(trained, runs_dir):
    """The small run's layer-2 SAE traced into a layer-3 run of the same model and data (few steps)."""
    from sae4scfm.causal.tracing import trace_features
    from tests.conftest import SMALL_RUN

    cfg, run_dir, *_ = trained
    deep = sae4scfm.train(sae4scfm.compose("train", [*SMALL_RUN, f"runs_dir={runs_dir}", "experiment=small_l3",
                                                     "sae.target_layer=3", "train.n_epochs=1",
                                                     f"buffer.store_dir={cfg.buffer.store_dir}"]))
    address = [f"runs_dir={runs_dir}", "sae_checkpoint.experiment=small", f"sae_checkpoint.timestamp={run_dir.name}"]
    edges = trace_features(sae4scfm.compose("trace", [*address, f"tracing.targets=[small_l3/{deep.name}]",
                                                      "tracing.n_cells=6", "tracing.features=[1,2,3,4,5]",
                                                      "tracing.n_perm=63", "tracing.chunk=2"]))
    assert set(edges["source"]) <= {1, 2, 3, 4, 5} and set(edges["target_layer"]) == {3}
    assert (run_dir / "causal" / "tracing" / "edges.csv").is_file()
    assert edges["p"].min() >= 1 / 64
    with pytest.raises(InputError, match="tracing.targets is empty"):
        trace_features(sae4scfm.compose("trace", address))
    with pytest.raises(InputError, match="small_l7"):  # a layer with no SAE run
        trace_features(sae4scfm.compose("trace", [*address, "tracing.targets=[small_l7/latest]"]))


def test_scaled_edit_is_the_identity_at_one_and_ablation_at_zero(trained):
    from sae4scfm.causal.contrastive import scaled_edit

    _, _, adapter, sae, tokens, layer = trained
    batch = tokens.collate(np.arange(4))
    with torch.no_grad():
        clean = adapter.run(batch)
        with adapter.intervene(layer, scaled_edit(sae, torch.ones(sae.d_sae))):
            same = adapter.run(batch)
        alpha = torch.ones(sae.d_sae)
        alpha[[3, 9]] = 0.0
        with adapter.intervene(layer, scaled_edit(sae, alpha)):
            scaled = adapter.run(batch)
        with adapter.intervene(layer, latent_edit(sae, [Intervention((3, 9), "zero")])):
            ablated = adapter.run(batch)
    for key in clean:
        torch.testing.assert_close(same[key], clean[key], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(scaled[key], ablated[key], atol=1e-5, rtol=1e-5)


def test_contrastive_fit_lowers_its_objective_and_takes_only_the_gradient_of_alpha(trained):
    """Toward the centroid of the other cells, the fitted α lowers the latent objective below α = 1 on the
    fitted cells, and the model's and the SAE's parameters get no gradient (only α is optimised)."""
    from sae4scfm.causal.contrastive import fit_contrastive, scaled_edit, type_profiles

    _, _, adapter, sae, tokens, layer = trained
    source, target = tokens.subset(np.arange(6)), tokens.subset(np.arange(6, 12))
    emb_s, total_s, count_s = type_profiles(adapter, source, "mvc")
    emb_t, total_t, count_t = type_profiles(adapter, target, "mvc")
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_s, mean_t = total_s / count_s, total_t / count_t
    c_t = emb_t.mean(0)
    fit = fit_contrastive(adapter, sae, layer, source, c_t, emb_s.mean(0), mean_t, mean_s, steps=15, lr=0.1,
                          l1=0.0, batch_size=6)
    assert all(p.grad is None for p in [*adapter.model.parameters(), *sae.parameters()])
    with torch.no_grad(), adapter.intervene(layer, scaled_edit(sae, torch.as_tensor(fit.alpha, dtype=torch.float32))):
        steered = type_profiles(adapter, source, "mvc")[0]
    assert ((steered - c_t) ** 2).sum(1).mean() < ((emb_s - c_t) ** 2).sum(1).mean()


def test_contrastive_stage_moves_held_out_source_cells_and_reports_the_null(trained, runs_dir):
    from sae4scfm.causal.contrastive import check_embedding_reachable, contrast_features, scaled_edit

    _, run_dir, *_ = trained
    address = [f"runs_dir={runs_dir}", "sae_checkpoint.experiment=small", f"sae_checkpoint.timestamp={run_dir.name}"]
    summary = contrast_features(sae4scfm.compose("contrast", [
        *address, "contrastive.source=CD14+ Monocyte", "contrastive.target=CD19+ B", "contrastive.n_cells=12",
        "contrastive.steps=25", "contrastive.null_draws=3", "contrastive.lr=0.1"]))
    assert summary["n_recruited"] > 0
    assert summary["fitted_closer_fraction"] > 0.5  # the fitted alpha moves most held-out cells toward the target
    assert 0.25 <= summary["p_closer_fraction"] <= 1
    alpha = pd.read_csv(run_dir / "causal" / "contrastive" / "alpha.csv")
    assert len(alpha) == summary["n_recruited"] and (alpha["alpha"] != 1).all()
    saved = run_dir / "causal" / "contrastive" / "alpha_fitted.csv"
    (run_dir / "causal" / "contrastive" / "alpha.csv").rename(saved)
    pair = ["contrastive.source=CD14+ Monocyte", "contrastive.target=CD19+ B", "contrastive.n_cells=12",
            "contrastive.null_draws=3"]
    again = contrast_features(sae4scfm.compose("contrast", [*address, *pair, f"contrastive.alpha={saved}"]))
    assert again == pytest.approx(summary, nan_ok=True)  # the saved alpha reproduces the fit's held-out numbers
    for extra, match in [("contrastive.source=Martian", "Martian"), ("contrastive.alpha=[1.0,0.5,2.0]", "has 3 values"),
                         (f"contrastive.alpha={run_dir}/none.csv", "is not a file")]:
        with pytest.raises(InputError, match=match):
            contrast_features(sae4scfm.compose("contrast", [*address, *pair, extra]))
    with pytest.raises(InputError, match="shape \\(3,\\)"):
        scaled_edit(trained[3], torch.ones(3))
    _, _, adapter, sae, tokens, layer = trained
    check_embedding_reachable(adapter, sae, layer, tokens.collate(np.arange(2)))
    with pytest.raises(InputError, match="cell embedding does not depend"):  # <cls> read after the last block
        check_embedding_reachable(adapter, sae, adapter.n_layers, tokens.collate(np.arange(2)))


def test_last_layer_steering_reads_a_per_token_head_and_a_no_op_is_an_error(trained):
    """At the last layer the GEPC readout comes from <cls>, which gene-token edits cannot reach: the default
    switches to the per-token head (mlm), and forcing mvc there is an error, not a table of zeros."""
    from sae4scfm.causal.steering import check_moved, default_output

    _, _, adapter, sae, tokens, _ = trained
    out = adapter.run(tokens.collate(np.arange(2)))
    assert default_output(out) == "mvc" and default_output(out, last_layer=True) == "mlm"
    last = adapter.n_layers
    ivs = [Intervention((j,), "add", 3.0) for j in range(3)]
    shifts, _ = gene_shifts(adapter, sae, last, tokens.subset(np.arange(4)), ivs, output="mvc")
    assert not shifts.squares.any()
    with pytest.raises(InputError, match="changed no value"):
        check_moved(shifts, "mvc", last)
    moved, output = gene_shifts(adapter, sae, last, tokens.subset(np.arange(4)), ivs)
    assert output == "mlm" and moved.squares.any()


def test_gene_patch_equals_gene_by_gene_clamps_and_stacks(trained):
    """The perturbation check's gene-wise patch is a clamp of each feature to its per-gene mean at that gene's
    tokens (checked against the Intervention clamp, one gene at a time); unseen genes and α = 0 change nothing."""
    from sae4scfm.causal.interventions import stacked_run
    from sae4scfm.causal.perturbation import gene_patch
    from sae4scfm.causal.steering import per_gene_stats

    _, _, adapter, sae, tokens, layer = trained
    sums, fires, seen = per_gene_stats(adapter, sae, layer, tokens.subset(np.arange(4)), batch_size=4)
    means = sums / np.maximum(seen, 1)[:, None]
    batch = tokens.collate(np.arange(6, 9))
    with torch.no_grad():
        h = adapter.capture(batch, [layer])[layer]
        feats = [int(np.argmax(fires.sum(0))), int(np.argsort(-fires.sum(0))[5])]
        patched = gene_patch(means, seen, 1.0)(sae, [feats], batch.gene_ids)(h, batch.gene_mask)
        ref = h
        genes = np.unique(batch.gene_ids[batch.gene_mask].numpy())
        for g in genes[seen[genes] > 0]:
            iv = Intervention(tuple(feats), "clamp", tuple(float(means[g, j]) for j in feats), (int(g),))
            ref = latent_edit(sae, [iv], batch.gene_ids)(ref, batch.gene_mask)
        torch.testing.assert_close(patched, ref, atol=1e-5, rtol=0)
        unseen = batch.gene_mask & torch.as_tensor(seen[batch.gene_ids.numpy()] == 0)
        assert unseen.any() and (patched[unseen] == h[unseen]).all()
        assert not torch.allclose(patched[batch.gene_mask], h[batch.gene_mask])
        assert torch.equal(gene_patch(means, seen, 0.0)(sae, [feats], batch.gene_ids)(h, batch.gene_mask), h)
        edit = gene_patch(means, seen, 0.5)
        stacked = stacked_run(adapter, sae, layer, batch, [feats[:1], feats[1:]], edit=edit)
        for e, s in enumerate([feats[:1], feats[1:]]):
            with adapter.intervene(layer, edit(sae, [s], batch.gene_ids)):
                alone = adapter.run(batch)
            torch.testing.assert_close(stacked["mlm"][e], alone["mlm"], atol=1e-4, rtol=0)


def test_perturbation_check_correlates_with_the_observed_change_against_the_null(trained, runs_dir):
    """A pseudo-perturbation on the small run (monocytes -> B cells as control -> perturbed): the summary's r is
    the correlation of genes.csv's columns without the excluded genes, the observed change is scanpy's
    log1p(CP10k) difference on eval cells, the null is one p per set, and bad input is one clear error."""
    import scanpy as sc

    from sae4scfm.causal.perturbation import perturbation_check
    from sae4scfm.data import load_dataset

    cfg, run_dir, *_ = trained
    address = [f"runs_dir={runs_dir}", "sae_checkpoint.experiment=small", f"sae_checkpoint.timestamp={run_dir.name}"]
    pair = ["perturbation.condition_key=bulk_labels", "perturbation.control_value=CD14+ Monocyte",
            "perturbation.perturbed_value=CD19+ B"]
    small = ["perturbation.n_cells=8", "perturbation.null_sets=3", "perturbation.n_features=2",
             "perturbation.exclude_top_genes=5", "perturbation.per_forward=4"]
    summary = perturbation_check(sae4scfm.compose("perturb", [*address, *pair, *small]))
    row = summary.iloc[0]
    assert summary["model"].tolist() == ["trained"] and len(row["features"].split()) == 2
    genes = pd.read_csv(run_dir / "causal" / "perturbation" / "genes.csv")
    kept = genes[~genes["excluded"] & genes["observed_lfc"].notna()]
    assert len(kept) == row["n_genes"] > 50 and 0 < genes["excluded"].sum() <= row["n_excluded_genes"]
    assert row["spearman"] == pytest.approx(stats.spearmanr(kept["predicted_shift"], kept["observed_lfc"]).statistic)
    assert row["spearman_p"] in (0.25, 0.5, 0.75, 1.0)
    sets = pd.read_csv(run_dir / "causal" / "perturbation" / "sets.csv")
    assert len(sets) == 4 and sets["features"].nunique() == 4

    adata = load_dataset(cfg.data)
    split = sae4scfm.analysis.run_data.open_run(run_dir).features.obs["split"].to_numpy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    gene = kept.iloc[0]["gene"]
    x = adata[:, gene].X.toarray().ravel() if hasattr(adata.X, "toarray") else np.asarray(adata[:, gene].X).ravel()
    lab = adata.obs["bulk_labels"].astype(str).to_numpy()
    held = split == "eval"
    expected = x[held & (lab == "CD19+ B")].mean() - x[held & (lab == "CD14+ Monocyte")].mean()
    assert kept.iloc[0]["observed_lfc"] == pytest.approx(expected, abs=1e-5)

    for extra, match in [(["perturbation.perturbed_value=Martian"], "perturbed_value='Martian'"),
                         ([], "names no condition_key"), (["perturbation.control=twins"], "twins")]:
        overrides = [*address, *small, *([*pair[:2], *extra] if extra and "Martian" in extra[0] else extra)]
        with pytest.raises(InputError, match=match):
            perturbation_check(sae4scfm.compose("perturb", overrides))
