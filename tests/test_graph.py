"""Knowledge graph from a real art-office slice, LightGCN propagation against a hand computation, and the three
fusion modes of text + graph vectors training a few steps on real MiniLM vectors."""

import numpy as np
import pytest
import torch

from crossrec.config import TrainConfig, load_config
from crossrec.dataset import Dataset
from crossrec.fusion import feature_column_vectors, split_sides
from crossrec.graph import ItemGraph, build_graph, graph_item_vectors, normalized_adjacency, propagate
from crossrec.inference import backbone_vectors
from crossrec.model import CrossRecModel
from crossrec.splits import Splits
from crossrec.training import SequenceData, loss_inputs


@pytest.fixture(scope="module")
def ao(tiny_ao):
    data = Dataset.load(tiny_ao)
    return data, Splits(data)


def test_graph_of_a_real_slice_has_the_expected_nodes_and_edges(ao):
    data, splits = ao
    g = build_graph(data, splits)
    items = data.items.take(splits.item_row)
    tokens = [set(a.split()) for a in items.column("attributes").to_pylist()]
    # Attribute nodes: every token of the `attributes` column shared by >= 2 items, and only those.
    expected = {t for t in set().union(*tokens) if sum(t in s for s in tokens) >= 2}
    assert set(g.attributes) == {f"attributes:{t}" for t in expected}
    assert "attributes:arts" in g.attributes
    got = {(int(i), g.attributes[a].split(":", 1)[1]) for i, a in g.item_attr}
    assert got == {(i, t) for i, s in enumerate(tokens) for t in s if t in expected}
    # Item-item edges: consecutive TRAINING interactions of a user, never a validation or test target.
    want = set()
    for rows in splits.train_sequences():
        for a, b in zip(splits.row_item[rows[:-1]], splits.row_item[rows[1:]]):
            if a != b:
                want.add((min(a, b), max(a, b)))
    assert {tuple(map(int, e)) for e in g.item_item} == want and want
    no_co = build_graph(data, splits, co_interaction=False)
    assert len(no_co.item_item) == 0 and no_co.attributes == g.attributes
    with pytest.raises(ValueError, match="graph column 'brand' not in the items table"):
        build_graph(data, splits, columns=["brand"])


def test_a_dataset_without_attributes_gets_co_interaction_edges_only(tiny_fk):
    data = Dataset.load(tiny_fk)
    splits = Splits(data)
    g = build_graph(data, splits)
    assert g.attributes == [] and len(g.item_item) > 0
    vecs = graph_item_vectors(g, np.ones((g.n_items, 4), np.float32))
    isolated = g.degree()[: g.n_items] == 0
    assert isolated.any() and (vecs[isolated] == 0).all() and (vecs[~isolated] != 0).any()


def test_propagation_matches_a_hand_computed_graph():
    # items 0, 1 share attribute a (node 3); item 2 has no edges.
    g = ItemGraph(n_items=3, attributes=["c:a"], item_attr=np.array([[0, 0], [1, 0]]), item_item=np.zeros((0, 2)))
    adj = normalized_adjacency(g).to_dense()
    r = 1 / np.sqrt(2)  # deg(item) = 1, deg(a) = 2
    np.testing.assert_allclose(adj.numpy(), [[0, 0, 0, r], [0, 0, 0, r], [0, 0, 0, 0], [r, r, 0, 0]], atol=1e-7)
    x0 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0], [0.0, 0.0]])
    # e1: items 0, e1(a) = r (x0 + x1); e2(items) = r e1(a) = (x0 + x1) / 2; mean of e0, e1, e2.
    out = propagate(adj.to_sparse(), x0, layers=2)
    np.testing.assert_allclose(out[0].numpy(), [(1 + 0.5) / 3, 0.5 / 3], atol=1e-6)
    np.testing.assert_allclose(out[3].numpy(), [r / 3, r / 3], atol=1e-6)
    vec = graph_item_vectors(g, x0[:3].numpy(), layers=2)
    np.testing.assert_allclose(vec[:2], out[:2].numpy(), atol=1e-6)
    assert (vec[2] == 0).all()  # no edges: zero graph vector, the text alone carries the item
    # Padded Â rows for the ranker: weight 1/sqrt(1 * 2) to the shared token.
    arr = g.item_arrays(max_attrs=2)
    assert arr["attr"][:, 0].tolist() == [0, 0, -1] and arr["attr_w"][0, 0] == pytest.approx(r)


@pytest.fixture(scope="module")
def text_and_graph(ao, vector_cache):
    data, splits = ao
    text = backbone_vectors(data, splits, "minilm", "", 64)  # real MiniLM vectors of the slice
    return text, graph_item_vectors(build_graph(data, splits), text)


@pytest.mark.parametrize("mode", ["concat", "gate", "attention"])
def test_each_fusion_mode_trains(ao, mode, text_and_graph):
    data, splits = ao
    text, graph = text_and_graph
    x = torch.from_numpy(np.concatenate([text, graph], 1))
    cfg = load_config(
        overrides=[
            "dim=32",
            "layers=1",
            "dropout=0",
            "domain_dropout=0",
            "graph.enabled=true",
            f"fusion={mode}",
            "text_prior_decay=0.6",
            "text_prior_cross=0.1",
        ]
    )
    cfg.side_dims = [graph.shape[1]]  # derived: training sets it (users cannot)
    torch.manual_seed(0)
    model = CrossRecModel(cfg, len(splits.domains), in_dim=x.shape[1])
    model.adaptor.init_from_vectors(x[:, : model.adaptor_in_dim])
    assert model.adaptor_in_dim == text.shape[1] and model.vector_dim == 32 + text.shape[1]
    seqs = SequenceData(splits, cfg.max_len)
    item_domain = torch.from_numpy(splits.item_domain)
    dom_items = [torch.arange(splits.offset[d], splits.offset[d] + splits.n_items[d]) for d in splits.domains]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    batch = next(iter(seqs.batches(32, np.random.default_rng(0))))
    inputs = loss_inputs(batch, lambda idx: x[idx], item_domain, dom_items, 16, rng, len(splits.domains))
    losses = []
    for _ in range(4):
        loss = model(**inputs)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    grads = [p for n, p in model.named_parameters() if n.startswith("fusion.") and p.grad is not None]
    assert grads and any(p.grad.abs().sum() > 0 for p in grads)
    # A new item given as text alone scores like one with an all-zero graph vector (the fallback).
    model.eval()
    with torch.no_grad():
        alone = model.item_vectors(x[:5, : text.shape[1]])
        zero = model.item_vectors(torch.cat([x[:5, : text.shape[1]], torch.zeros(5, graph.shape[1])], 1))
        full = model.item_vectors(x[:5])
    torch.testing.assert_close(alone, zero)
    assert not torch.allclose(full, alone)
    # side_dropout hides the graph vector of a share of the batch's items in training: at 1, all of them.
    model.cfg.side_dropout, model.cfg.dropout = 1.0, 0.0
    model.adaptor.drop.p = 0.0
    model.train()
    with torch.no_grad():
        torch.testing.assert_close(model.item_vectors(x[:5]), alone)


def test_split_sides_and_feature_columns():
    x = torch.arange(12.0).reshape(2, 6)
    text, sides = split_sides(x, [2, 1], text_dim=3)
    assert text.shape == (2, 3) and [s.shape[1] for s in sides] == [2, 1]
    text, sides = split_sides(x[:, :3], [2, 1], text_dim=3)
    assert all((s == 0).all() for s in sides)
    import pyarrow as pa

    t = pa.table({"img": pa.array([[1.0, 2.0], None, [3.0, 4.0]], pa.list_(pa.float32())), "t": ["a", "b", "c"]})
    np.testing.assert_array_equal(feature_column_vectors(t, "img"), [[1, 2], [0, 0], [3, 4]])
    with pytest.raises(ValueError, match="no column 'image'"):
        feature_column_vectors(t, "image")
    with pytest.raises(ValueError, match="`fusion` must be one of concat, gate, attention, got 'sum'"):
        load_config(overrides=["fusion=sum"])
    with pytest.raises(ValueError, match="need `item_encoder` text and `mode` cached"):
        TrainConfig(item_encoder="id", graph={"enabled": True})


@pytest.mark.slow
def test_train_with_graph_fusion_round_trips_through_the_bundle(ray_cluster, vector_cache, tiny_ao, tmp_path):
    """`crossrec train --set graph.enabled=true`: [text | graph] inputs, side_dims saved, the bundle reloads."""
    from crossrec.bundle import load_bundle
    from crossrec.config import RunSettings
    from crossrec.evaluation import evaluate
    from crossrec.inference import bundle_retriever
    from trainers.pipeline import train_bundle

    cfg = load_config(
        overrides=[
            "epochs=1",
            "dim=32",
            "layers=1",
            "batch_size=16",
            "valid_max_targets=0",
            "graph.enabled=true",
            "fusion=gate",
        ]
    )
    meta = train_bundle(tiny_ao, tmp_path / "b", cfg, RunSettings(workers=1, name="graph"), progress=False)
    assert meta["config"]["side_dims"] == [384] and meta["in_dim"] == 768
    data = Dataset.load(tiny_ao)
    splits = Splits(data)
    res = evaluate(splits, bundle_retriever(load_bundle(tmp_path / "b"), data, splits))
    assert res.metrics["all"]["ndcg@10"] == pytest.approx(meta["metrics"]["test"]["all"]["ndcg@10"], abs=1e-6)


def test_ranker_graph_similarity_is_lightgcn_two_hop(ao):
    """The ranker's `two_hop` (padded Â rows) equals Â² through attribute nodes + Â between items, read off the
    normalised adjacency of the same graph."""
    from crossrec.ranker import ItemTable, two_hop

    data, splits = ao
    g = build_graph(data, splits)
    arrays = {k: torch.from_numpy(v) for k, v in g.item_arrays(max_attrs=256, max_neighbors=256).items()}
    items = ItemTable(
        domains=splits.domains,
        item_domain=["x"] * g.n_items,
        item_ids=[str(i) for i in range(g.n_items)],
        arrays={"log_pop": torch.zeros(g.n_items), **arrays},
    )
    adj = normalized_adjacency(g).to_dense().double()
    a_items = adj[: g.n_items]
    want_full = a_items[:, g.n_items :] @ a_items[:, g.n_items :].T + a_items[:, : g.n_items]  # (items, items)
    rng = np.random.default_rng(0)
    hist = torch.from_numpy(rng.integers(0, g.n_items, (3, 5)))
    hist[0, 0] = -1  # padding / an unknown item
    cand = torch.from_numpy(rng.integers(0, g.n_items, (3, 7)))
    cand[:, 0] = hist[:, 1]  # a candidate equal to a history item shares all its tokens
    got = two_hop(items, cand, hist)
    want = want_full[cand[:, :, None], hist.clamp(min=0)[:, None, :]]  # (3, 7, 5)
    want = torch.where(hist[:, None, :] >= 0, want, torch.zeros((), dtype=want.dtype))
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)
    assert (got[:, 0, 1] > 0).all()
