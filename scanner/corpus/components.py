"""Connected components of a link graph, out of core, and a solve per component.

    comp = components(ex, edges, parts)       # (node, comp): comp = the lowest gid of the node's component
    out = per_component(ex, edges, nodes, parts, solve)

Local (a small corpus): scipy's connected_components on the edges in memory. Ray: label propagation in rounds
over partitioned edges, no process holding every linked image: each round sends every node's label along its
edges (a shuffle by node) and keeps the smallest label a node hears; then pointer jumping (a node takes its
label's label, another shuffle) halves the distance to the root, so a path of L nodes settles in O(log L) rounds
instead of L. The rounds stop when no label changes.

per_component: the edges and the node records (with whatever columns the caller attached) shuffled together by
component, so each solve call sees whole components and only them: the duplicate groups' one-per-ball rule is
decided per component, identically wherever it runs (its order is the keep rule, global and deterministic).
"""

from __future__ import annotations

import functools
import logging

import numpy as np

log = logging.getLogger("memscan")
MAX_ROUNDS = 64


def local_components(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(nodes sorted, comp: the smallest node of each node's component) of the undirected edges a-b."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    nodes = np.unique(np.r_[a, b]).astype(np.int64)
    if not len(nodes):
        return nodes, nodes.copy()
    ia, ib = np.searchsorted(nodes, a), np.searchsorted(nodes, b)
    g = coo_matrix((np.ones(len(ia), np.int8), (ia, ib)), shape=(len(nodes), len(nodes)))
    _, lab = connected_components(g, directed=False)
    smallest = np.full(lab.max() + 1, np.iinfo(np.int64).max)
    np.minimum.at(smallest, lab, nodes)
    return nodes, smallest[lab]


# ---- Ray: label propagation with pointer jumping

def _directed(b: dict) -> dict:
    a, c = np.asarray(b["a"], np.int64), np.asarray(b["b"], np.int64)
    return {"u": np.r_[a, c], "v": np.r_[c, a]}


def _initial(b: dict) -> dict:
    """Every node's first label: the smallest of itself and its neighbours."""
    u, v = np.asarray(b["u"]), np.asarray(b["v"])
    nodes, inv = np.unique(u, return_inverse=True)
    lab = nodes.copy()
    np.minimum.at(lab, inv, v)
    return {"node": nodes, "label": lab}


def _tag_edges(b: dict) -> dict:
    return {"key": np.asarray(b["u"]), "other": np.asarray(b["v"]), "label": np.full(len(b["u"]), -1, np.int64),
            "kind": np.zeros(len(b["u"]), np.int8)}


def _tag_labels(b: dict) -> dict:
    n = np.asarray(b["node"])
    return {"key": n, "other": n, "label": np.asarray(b["label"]), "kind": np.ones(len(n), np.int8)}


def _by_node(key: np.ndarray, label: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows that carry a node's own label, sorted by node: (nodes, labels), for searchsorted lookups."""
    keys, lab = key[rows], label[rows]
    order = np.argsort(keys)
    return keys[order], lab[order]


def _send(b: dict) -> dict:
    """Per key: its label goes to every neighbour (and to itself, marked as its current label)."""
    key, other, label, kind = (np.asarray(b[c]) for c in ("key", "other", "label", "kind"))
    lab_rows = kind == 1
    keys, lab = _by_node(key, label, lab_rows)
    e = ~lab_rows
    pos = np.searchsorted(keys, key[e])
    return {"node": np.r_[other[e], keys], "cand": np.r_[lab[pos], lab],
            "own": np.r_[np.zeros(int(e.sum()), bool), np.ones(len(keys), bool)]}


def _take_min(b: dict) -> dict:
    node, cand, own = np.asarray(b["node"]), np.asarray(b["cand"]), np.asarray(b["own"], bool)
    nodes, inv = np.unique(node, return_inverse=True)
    best = np.full(len(nodes), np.iinfo(np.int64).max)
    np.minimum.at(best, inv, cand)
    old = np.full(len(nodes), np.iinfo(np.int64).max)
    np.minimum.at(old, inv[own], cand[own])
    return {"node": nodes, "label": best, "changed": (best < old).astype(np.int64)}


def _ask(b: dict) -> dict:
    """Pointer jumping, the asking side: each node asks its label for the label's own label."""
    n, lab = np.asarray(b["node"]), np.asarray(b["label"])
    return {"key": np.r_[n, lab], "asker": np.r_[n, n], "label": np.r_[lab, np.full(len(n), -1, np.int64)],
            "kind": np.r_[np.ones(len(n), np.int8), np.zeros(len(n), np.int8)]}


def _answer(b: dict) -> dict:
    key, asker, label, kind = (np.asarray(b[c]) for c in ("key", "asker", "label", "kind"))
    own = kind == 1
    keys, lab = _by_node(key, label, own)
    q = ~own
    pos = np.minimum(np.searchsorted(keys, key[q]), max(len(keys) - 1, 0))
    found = keys[pos] == key[q] if len(keys) else np.zeros(int(q.sum()), bool)
    # a node's new label: its label's label (found: the label is itself a node here, as every label is)
    return {"node": np.r_[asker[q][found], keys], "cand": np.r_[lab[pos][found], lab],
            "own": np.r_[np.zeros(int(found.sum()), bool), np.ones(len(keys), bool)]}


EDGE_BYTES = 48  # an edge's share of an in-memory components pass (both ends, scipy's sparse graph)


def components(ex, edges, parts: int, n_edges: int, budget_bytes: int):
    """(node, comp) of every node of the edge table (columns a, b): comp is the smallest gid of its component.

    In memory (scipy) when the edges take at most an eighth of the budget, whichever executor runs the step: a
    Ray Data round costs seconds, and a graph that fits needs none. Above that, label propagation as Ray tasks."""
    if edges is None:
        return None
    if ex.kind == "local" or n_edges * EDGE_BYTES <= budget_bytes // 8:
        from scanner.corpus.executor import concat

        e = concat(ex.batches(edges)) if ex.kind != "local" else edges
        nodes, comp = local_components(np.asarray(e["a"], np.int64), np.asarray(e["b"], np.int64))
        log.info("components: %d nodes of %d links, in memory", len(nodes), n_edges)
        return ex.from_batch({"node": nodes, "comp": comp})
    d = ex.materialize(ex.map(edges, _directed))
    labels = ex.materialize(ex.shuffle(d, "u", parts, _initial))
    tagged_edges = ex.materialize(ex.map(d, _tag_edges))
    for r in range(MAX_ROUNDS):
        msgs = ex.shuffle(ex.union(tagged_edges, ex.map(labels, _tag_labels)), "key", parts, _send)
        labels = ex.materialize(ex.shuffle(msgs, "node", parts, _take_min))
        changed = int(labels.sum("changed") or 0)
        # pointer jumping: a label that is itself labelled lower moves down the tree in one round
        jumps = ex.shuffle(ex.map(labels, _ask), "key", parts, _answer)
        labels = ex.materialize(ex.shuffle(jumps, "node", parts, _take_min))
        changed += int(labels.sum("changed") or 0)
        if not changed:
            log.info("components: %d nodes settled after %d rounds of label propagation", labels.count(), r + 1)
            break
    else:
        raise RuntimeError(f"connected components did not settle in {MAX_ROUNDS} rounds")
    return ex.map(labels, _comp_of)


def _comp_of(b: dict) -> dict:
    return {"node": np.asarray(b["node"]), "comp": np.asarray(b["label"])}


# ---- a solve per component

# edges and component labels in one schema (a Ray shuffle of a union of tables with other columns fails to concatenate
# them once a side is itself a union): the edge columns, key, comp and _row (0 an edge, 1 a label)

def _edge_ask(edge_cols: tuple, b: dict) -> dict:
    n = len(b["a"])
    return {**{c: np.asarray(b[c]) for c in edge_cols}, "key": np.asarray(b["a"], np.int64),
            "comp": np.full(n, -1, np.int64), "_row": np.zeros(n, np.int8)}


def _comp_tag(edge_cols: tuple, dtypes: dict, b: dict) -> dict:
    n = np.asarray(b["node"], np.int64)
    return {**{c: np.zeros(len(n), dtypes[c]) for c in edge_cols}, "key": n, "comp": np.asarray(b["comp"], np.int64),
            "_row": np.ones(len(n), np.int8)}


def _edge_comp(edge_cols: tuple, b: dict) -> dict:
    row = np.asarray(b["_row"])
    comp_rows = row == 1
    keys, comps = np.asarray(b["key"])[comp_rows], np.asarray(b["comp"])[comp_rows]
    order = np.argsort(keys)
    keys, comps = keys[order], comps[order]
    e = ~comp_rows
    pos = np.searchsorted(keys, np.asarray(b["key"])[e])
    return {**{c: np.asarray(b[c])[e] for c in edge_cols}, "comp": comps[pos]}


def edges_with_component(ex, edges, comp, parts: int, edge_cols: tuple[str, ...]):
    """The edge table with each edge's component (`comp` column), by a shuffle of edges and labels by node."""
    if ex.kind == "local":
        pos = np.searchsorted(comp["node"], np.asarray(edges["a"], np.int64))
        return {**{c: np.asarray(edges[c]) for c in edge_cols}, "comp": comp["comp"][pos]}
    dtypes = {"a": np.int64, "b": np.int64, "sim": np.float32, "kind": np.int8, "score": np.float32}
    t = ex.union(ex.map(edges, functools.partial(_edge_ask, edge_cols)),
                 ex.map(comp, functools.partial(_comp_tag, edge_cols, dtypes)))
    return ex.shuffle(t, "key", parts, functools.partial(_edge_comp, edge_cols))


def _edge_rows(b: dict) -> dict:
    n = len(b["a"])
    return {"comp": np.asarray(b["comp"], np.int64), "_kind": np.zeros(n, np.int8),
            "x": np.asarray(b["a"], np.int64), "y": np.asarray(b["b"], np.int64),
            "s": np.asarray(b["sim"], np.float32), "k": np.asarray(b["kind"], np.int8),
            "v": np.asarray(b["score"], np.float32) if "score" in b else np.asarray(b["sim"], np.float32),
            "h": np.zeros(n, np.int64), "key": np.full(n, "", dtype=object), "r": np.zeros(n, np.int8)}


def _node_rows(b: dict) -> dict:
    n = len(b["gid"])
    return {"comp": np.asarray(b["comp"], np.int64), "_kind": np.ones(n, np.int8),
            "x": np.asarray(b["gid"], np.int64), "y": np.asarray(b["pixels"], np.int64),
            "s": np.zeros(n, np.float32), "k": np.zeros(n, np.int8), "v": np.zeros(n, np.float32),
            "h": np.asarray(b["phash"], np.int64) if "phash" in b else np.zeros(n, np.int64),
            "key": np.asarray(b["key"], dtype=object),
            "r": np.asarray(b["role"], np.int8) if "role" in b else np.zeros(n, np.int8)}


def _solve_rows(solve, b: dict):
    kind = np.asarray(b["_kind"])
    e, n = kind == 0, kind == 1
    comp, x, y = np.asarray(b["comp"]), np.asarray(b["x"]), np.asarray(b["y"])
    edges = {"a": x[e], "b": y[e], "sim": np.asarray(b["s"])[e], "kind": np.asarray(b["k"])[e],
             "score": np.asarray(b["v"])[e], "comp": comp[e]}
    nodes = {"gid": x[n], "pixels": y[n], "key": np.asarray(b["key"], dtype=object)[n], "phash": np.asarray(b["h"])[n],
             "comp": comp[n], "role": np.asarray(b["r"], np.int8)[n]}
    return solve(edges, nodes)


def per_component(ex, edges_c, nodes_c, parts: int, solve):
    """solve(edges, nodes) -> batch, called with every edge and node of whole components (a call may hold
    several). edges_c: (a, b, sim, kind, score, comp); nodes_c: (gid, pixels, key, phash, comp[, role])."""
    if ex.kind == "local":
        if nodes_c is None:
            return None
        empty = {"a": np.zeros(0, np.int64), "b": np.zeros(0, np.int64), "sim": np.zeros(0, np.float32),
                 "kind": np.zeros(0, np.int8), "score": np.zeros(0, np.float32), "comp": np.zeros(0, np.int64)}
        return ex.map(nodes_c, lambda n: solve(edges_c if edges_c is not None else empty, n))
    t = ex.union(ex.map(edges_c, _edge_rows) if edges_c is not None else None, ex.map(nodes_c, _node_rows))
    return ex.shuffle(t, "comp", parts, functools.partial(_solve_rows, solve))
