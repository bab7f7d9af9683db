"""Robust Random Cut Forest (Guha et al., ICML 2016) on flat NumPy arrays with numba kernels.

Why our own: the pure-Python ``rrcf`` package streams ~50 points/s with 100 trees, far too slow for
per-bucket scoring, and the AWS library is Java. Here every tree is a set of flat node arrays (children,
parent, cut dimension/value, mass, bounding box min/max) and all walks, insertions and deletions run in
``@njit`` kernels, so one ``update`` is one compiled call.

Score scale (the one AWS users know, SageMaker RCF / Kinesis ``RANDOM_CUT_FOREST``): we implement the
default anomaly score of aws/random-cut-forest-by-aws (``AnomalyScoreVisitor`` with ``CommonUtils``'
scoreSeen / scoreUnseen / damp / normaliser). Per tree, follow the cuts to a leaf at depth ``L`` (root
depth 0). If the leaf already holds the point (a duplicate, leaf mass ``m``, tree mass ``M``) the tree
score is ``(1 - m / 2M) / (L + log2(m + 1))``. Otherwise it starts at ``1 / (L + 1)`` and, walking back up,
each ancestor at depth ``k`` mixes in ``1 / (k + 1)`` with the probability ``p`` that a random cut of its
bounding box grown by the point separates the point: ``s = p / (k + 1) + (1 - p) s`` (stop once
``p = 0``). The tree score is multiplied by ``log2(M + 1)`` and the forest score is the mean over trees.
On this scale typical points score about 0.6-1.2 and isolated points several times more; as in the
AWS docs, treat scores more than 3 standard deviations above the mean score as anomalous.

``attribution`` is the AWS DiVector (``AnomalyAttributionVisitor``): the same recursion split per
dimension into LOW (``[..., 0]``, the point is below the box) and HIGH (``[..., 1]``, above it); for a
duplicate point the sibling ("shadow") boxes give the directions, rescaled to the seen score. Summed
over dimensions and both directions it equals the score.

Sampling is the AWS weighted reservoir: every tree gives each point the weight
``log(-log u) - time_decay * sequence_index`` (``u`` uniform) and keeps the ``sample_size`` lowest, so
``time_decay=None`` (0) is a uniform sample of the whole stream and ``time_decay > 0`` forgets old points
with rate ``time_decay`` per point (AWS's default is ``1 / (10 * sample_size)``).

Shingling: with ``shingle_size = s`` and ``d`` raw dimensions each point is the concatenation of the last
``s`` raw rows, oldest first, so shingled dimension ``j * d + i`` is raw dimension ``i`` at lag ``s-1-j``.

Differences from the AWS library, all deliberate: float64 boxes (not float32), every bounding box stored
(no cache fraction), top-down insertion (the original paper's; same tree distribution as AWS's
bottom-up one), no ``initialAcceptFraction`` and no ``outputAfter`` warm-up gate, and one SplitMix64
stream per forest so the complete RNG state is a single saved integer.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from numba import njit

from anomaly_dagster.detectors.base import Detector
from anomaly_dagster.storage import atomic_write_bytes

_FORMAT_VERSION = 1
_TREE_KEYS = ("root", "links", "cut_val", "mass", "box", "free", "n_free")
_SAMPLER_KEYS = ("heap_w", "heap_leaf", "heap_n")

# Fields of a node's ``links`` record; the children are ``links[t, i, _LEFT + (x[dim] > cut)]``.
_DIM, _LEFT, _PARENT = 0, 1, 3

# SplitMix64 constants, typed so numba keeps the arithmetic in wrapping uint64.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_SHIFT11 = np.uint64(11)
_SHIFT27 = np.uint64(27)
_SHIFT30 = np.uint64(30)
_SHIFT31 = np.uint64(31)
_TWO_POW_MINUS_53 = 1.0 / 9007199254740992.0
# Let LLVM reorder sums (to vectorise box loops) but keep inf/NaN semantics: shadow boxes start at +-inf.
_FASTMATH = {"reassoc", "nsz", "contract"}


# ---------------------------------------------------------------------------------------------- kernels
# A forest is a tuple of arrays over trees t and nodes i (2 * sample_size slots per tree):
#   root[t]; links[t, i] = (cut dim or -1 for a leaf, left, right, parent); cut_val[t, i]; mass[t, i];
#   box[t, i] = (min row, max row) of the points below (a leaf's box is its point); free[t] a stack of
#   n_free[t] unused slots. A node's fields sit together so a step down or up touches few cache lines.


@njit(cache=True, nogil=True)
def _uniform(rng):
    """One SplitMix64 step to a float in (0, 1): the whole RNG state is ``rng[0]``, so saving it resumes."""
    z = rng[0] + _GOLDEN
    rng[0] = z
    z = (z ^ (z >> _SHIFT30)) * _MIX1
    z = (z ^ (z >> _SHIFT27)) * _MIX2
    z = z ^ (z >> _SHIFT31)
    return (float(z >> _SHIFT11) + 0.5) * _TWO_POW_MINUS_53


@njit(cache=True, nogil=True, fastmath=_FASTMATH, inline="always")
def _outside(x, box):
    """L1 distance of ``x`` outside ``box`` (2, d) and the box's range sum; branch-free so it vectorises."""
    gap = 0.0
    span = 0.0
    for i in range(x.shape[0]):
        gap += max(box[0, i] - x[i], 0.0) + max(x[i] - box[1, i], 0.0)
        span += box[1, i] - box[0, i]
    return gap, span


@njit(cache=True, nogil=True)
def _descend_points(points, root, links, cut_val, leaf, depth, rows, at):
    """Send all points down one tree (its ``links``/``cut_val`` rows) one level at a time, writing
    ``leaf[j]`` and ``depth[j]``.

    One root-to-leaf walk is a chain of dependent loads; interleaving many walks gives the CPU
    independent work to overlap. ``rows`` and ``at`` are scratch of length n.
    """
    active = points.shape[0]
    for j in range(active):
        rows[j] = j
        at[j] = root
    level = 0
    while active:
        kept = 0
        for a in range(active):
            j, i = rows[a], at[a]
            dim = links[i, _DIM]
            if dim >= 0:
                rows[kept] = j
                at[kept] = links[i, _LEFT + np.int64(points[j, dim] > cut_val[i])]
                kept += 1
            else:
                leaf[j] = i
                depth[j] = level
        active = kept
        level += 1


@njit(cache=True, nogil=True)
def _descend_trees(x, tree, leaf, depth, trees, at):
    """Send one point down every non-empty tree in lockstep (same reason as :func:`_descend_points`);
    writes ``leaf[t]`` and ``depth[t]`` and returns how many trees are non-empty."""
    root, links, cut_val = tree[:3]
    active = 0
    for t in range(root.shape[0]):
        if root[t] >= 0:
            trees[active] = t
            at[active] = root[t]
            active += 1
    used = active
    level = 0
    while active:
        kept = 0
        for a in range(active):
            t, i = trees[a], at[a]
            dim = links[t, i, _DIM]
            if dim >= 0:
                trees[kept] = t
                at[kept] = links[t, i, _LEFT + np.int64(x[dim] > cut_val[t, i])]
                kept += 1
            else:
                leaf[t] = i
                depth[t] = level
        active = kept
        level += 1
    return used


@njit(cache=True, nogil=True, fastmath=_FASTMATH, inline="always")
def _climb_score(x, leaf, depth, links, mass, box, tree_mass):
    """AWS score of ``x`` in one tree (its rows of the forest arrays) given the leaf it reached at
    ``depth``: see the module docstring. Per-tree views keep the hot loop's indexing cheap."""
    gap, _ = _outside(x, box[leaf])
    if gap == 0.0:
        leaf_mass = mass[leaf]
        score = (1.0 - leaf_mass / (2.0 * tree_mass)) / (depth + np.log2(leaf_mass + 1.0))
    else:
        score = 1.0 / (depth + 1.0)
        i = links[leaf, _PARENT]
        while i >= 0:
            depth -= 1
            gap, span = _outside(x, box[i])
            if gap == 0.0:
                break  # x is inside this box, hence inside every box above it
            p = gap / (span + gap)
            score = p / (depth + 1.0) + (1.0 - p) * score
            i = links[i, _PARENT]
    return score * np.log2(tree_mass + 1.0)


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _mix_box(x, box, node_score, cur):
    """One upward step of the DiVector recursion; False once ``x`` lies inside ``box`` (nothing changes)."""
    gap, span = _outside(x, box)
    if gap <= 0.0:
        return False
    span += gap
    keep = 1.0 - gap / span
    for i in range(x.shape[0]):
        cur[i, 0] = max(box[0, i] - x[i], 0.0) / span * node_score + keep * cur[i, 0]
        cur[i, 1] = max(x[i] - box[1, i], 0.0) / span * node_score + keep * cur[i, 1]
    return True


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _tree_attribution(t, x, tree, path, shadow, cur, out):
    """Add tree ``t``'s AWS DiVector for ``x`` to ``out`` (d, 2); ``path``, ``shadow``, ``cur`` are scratch."""
    root, links, cut_val, mass, box = tree[:5]
    dims = x.shape[0]
    depth = 0
    i = root[t]
    while links[t, i, _DIM] >= 0:
        path[depth] = i
        i = links[t, i, _LEFT + np.int64(x[links[t, i, _DIM]] > cut_val[t, i])]
        depth += 1
    path[depth] = i
    tree_mass = mass[t, root[t]]
    total = 0.0
    for k in range(dims):
        cur[k, 0] = max(box[t, i, 0, k] - x[k], 0.0)
        cur[k, 1] = max(x[k] - box[t, i, 0, k], 0.0)
        total += cur[k, 0] + cur[k, 1]
    if total > 0.0:
        # Unseen point: the leaf term 1/(L+1) splits by where x leaves the leaf, then ancestors mix in.
        saved = 1.0 / (depth + 1.0)
        cur *= saved / total
        for k in range(depth - 1, -1, -1):
            if not _mix_box(x, box[t, path[k]], 1.0 / (k + 1.0), cur):
                break
    else:
        # Duplicate: directions come from the sibling boxes ("what if this leaf were absent"), and the
        # total is rescaled to the seen score so that it still equals the scalar score.
        leaf_mass = mass[t, i]
        saved = (1.0 - leaf_mass / (2.0 * tree_mass)) / (depth + np.log2(leaf_mass + 1.0))
        cur[:, :] = saved / (2.0 * dims)
        shadow[0, :] = np.inf
        shadow[1, :] = -np.inf
        for k in range(depth - 1, -1, -1):
            sibling = links[t, path[k], _LEFT] + links[t, path[k], _LEFT + 1] - path[k + 1]
            for d in range(dims):
                shadow[0, d] = min(shadow[0, d], box[t, sibling, 0, d])
                shadow[1, d] = max(shadow[1, d], box[t, sibling, 1, d])
            if not _mix_box(x, shadow, 1.0 / (k + 1.0), cur):
                break
        cur *= saved / cur.sum()
    out += cur * np.log2(tree_mass + 1.0)


@njit(cache=True, nogil=True)
def _alloc(t, free, n_free):
    n_free[t] -= 1
    return free[t, n_free[t]]


@njit(cache=True, nogil=True)
def _release(t, i, free, n_free):
    free[t, n_free[t]] = i
    n_free[t] += 1


@njit(cache=True, nogil=True)
def _insert(t, x, tree, rng):
    """Insert ``x`` top-down (Guha et al.): at each node draw a cut over the box grown by ``x``, range-
    proportional per dimension; if it separates ``x`` from the box, hang a new leaf there, else follow the
    node's own cut. Returns the leaf now holding ``x`` (an existing one for a duplicate)."""
    root, links, cut_val, mass, box, free, n_free = tree
    dims = x.shape[0]
    i = root[t]
    dim = -1
    cut = 0.0
    while i >= 0:
        total = 0.0
        for d in range(dims):
            total += max(box[t, i, 1, d], x[d]) - min(box[t, i, 0, d], x[d])
        if total == 0.0:
            mass[t, i] += 1  # x equals this leaf's point; ancestors were counted on the way down
            return i
        target = _uniform(rng) * total
        for d in range(dims):
            width = max(box[t, i, 1, d], x[d]) - min(box[t, i, 0, d], x[d])
            if width > 0.0:
                dim = d
                if target < width:
                    break
                target -= width
        low = min(box[t, i, 0, dim], x[dim])
        high = max(box[t, i, 1, dim], x[dim])
        cut = min(low + target, np.nextafter(high, low))  # in [low, high) despite rounding
        if x[dim] <= cut < box[t, i, 0, dim] or box[t, i, 1, dim] <= cut < x[dim]:
            break
        mass[t, i] += 1
        for d in range(dims):
            box[t, i, 0, d] = min(box[t, i, 0, d], x[d])
            box[t, i, 1, d] = max(box[t, i, 1, d], x[d])
        i = links[t, i, _LEFT + np.int64(x[links[t, i, _DIM]] > cut_val[t, i])]
    leaf = _alloc(t, free, n_free)
    links[t, leaf, _DIM] = -1
    mass[t, leaf] = 1
    box[t, leaf, 0] = x
    box[t, leaf, 1] = x
    if i < 0:  # empty tree
        links[t, leaf, _PARENT] = -1
        root[t] = leaf
        return leaf
    joint = _alloc(t, free, n_free)
    up = links[t, i, _PARENT]
    side = np.int64(x[dim] > cut)
    links[t, joint, _DIM] = dim
    links[t, joint, _LEFT + side] = leaf
    links[t, joint, _LEFT + 1 - side] = i
    links[t, joint, _PARENT] = up
    links[t, i, _PARENT] = joint
    links[t, leaf, _PARENT] = joint
    cut_val[t, joint] = cut
    mass[t, joint] = mass[t, i] + 1
    for d in range(dims):
        box[t, joint, 0, d] = min(box[t, i, 0, d], x[d])
        box[t, joint, 1, d] = max(box[t, i, 1, d], x[d])
    if up < 0:
        root[t] = joint
    else:
        links[t, up, _LEFT + np.int64(links[t, up, _LEFT + 1] == i)] = joint
    return leaf


@njit(cache=True, nogil=True)
def _delete(t, leaf, tree):
    """Remove one copy of ``leaf``'s point: splice out the leaf and its parent when its mass hits 0, then
    shrink masses and (until one stops changing) bounding boxes up to the root."""
    root, links, _, mass, box, free, n_free = tree
    mass[t, leaf] -= 1
    i = links[t, leaf, _PARENT]
    changed = False
    if mass[t, leaf] == 0:
        _release(t, leaf, free, n_free)
        if i < 0:
            root[t] = -1
            return
        sibling = links[t, i, _LEFT] + links[t, i, _LEFT + 1] - leaf
        up = links[t, i, _PARENT]
        links[t, sibling, _PARENT] = up
        _release(t, i, free, n_free)
        if up < 0:
            root[t] = sibling
            return
        links[t, up, _LEFT + np.int64(links[t, up, _LEFT + 1] == i)] = sibling
        i = up
        changed = True
    while i >= 0:
        mass[t, i] -= 1
        if changed:
            changed = False
            left, right = links[t, i, _LEFT], links[t, i, _LEFT + 1]
            for d in range(box.shape[3]):
                low = min(box[t, left, 0, d], box[t, right, 0, d])
                high = max(box[t, left, 1, d], box[t, right, 1, d])
                if low != box[t, i, 0, d] or high != box[t, i, 1, d]:
                    changed = True
                    box[t, i, 0, d] = low
                    box[t, i, 1, d] = high
        i = links[t, i, _PARENT]


@njit(cache=True, nogil=True)
def _sift_down(t, heap_w, heap_leaf, size):
    pos = 0
    while True:
        largest = pos
        for kid in (2 * pos + 1, 2 * pos + 2):
            if kid < size and heap_w[t, kid] > heap_w[t, largest]:
                largest = kid
        if largest == pos:
            return
        heap_w[t, pos], heap_w[t, largest] = heap_w[t, largest], heap_w[t, pos]
        heap_leaf[t, pos], heap_leaf[t, largest] = heap_leaf[t, largest], heap_leaf[t, pos]
        pos = largest


@njit(cache=True, nogil=True)
def _sift_up(t, heap_w, heap_leaf, pos):
    while pos > 0:
        up = (pos - 1) // 2
        if heap_w[t, up] >= heap_w[t, pos]:
            return
        heap_w[t, pos], heap_w[t, up] = heap_w[t, up], heap_w[t, pos]
        heap_leaf[t, pos], heap_leaf[t, up] = heap_leaf[t, up], heap_leaf[t, pos]
        pos = up


@njit(cache=True, nogil=True)
def _offer(x, counters, tree, sampler, rng, time_decay):
    """Offer ``x`` to every tree's weighted reservoir (max-heap on weight), inserting where accepted."""
    heap_w, heap_leaf, heap_n = sampler
    sequence = counters[0]
    counters[0] += 1
    capacity = heap_w.shape[1]
    for t in range(heap_w.shape[0]):
        weight = np.log(-np.log(_uniform(rng))) - time_decay * sequence
        size = heap_n[t]
        if size < capacity:
            heap_w[t, size] = weight
            heap_leaf[t, size] = _insert(t, x, tree, rng)
            heap_n[t] = size + 1
            _sift_up(t, heap_w, heap_leaf, size)
        elif weight < heap_w[t, 0]:
            _delete(t, heap_leaf[t, 0], tree)
            heap_w[t, 0] = weight
            heap_leaf[t, 0] = _insert(t, x, tree, rng)
            _sift_down(t, heap_w, heap_leaf, size)


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _update(raw, shingle, counters, tree, sampler, rng, time_decay):
    """Shift ``raw`` into the shingle; once it is full, score it, then offer it to the samplers."""
    width = raw.shape[0]
    dims = shingle.shape[0]
    for d in range(width):
        if not np.isfinite(raw[d]):
            raise ValueError("points must be finite (no NaN or inf)")
    for d in range(dims - width):
        shingle[d] = shingle[d + width]
    shingle[dims - width :] = raw
    counters[1] += 1
    if counters[1] < dims // width:
        return 0.0
    root, links, _, mass, box = tree[:5]
    trees = root.shape[0]
    leaf = np.empty(trees, np.int32)
    depth = np.empty(trees, np.int32)
    used = _descend_trees(shingle, tree, leaf, depth, np.empty(trees, np.int32), np.empty(trees, np.int32))
    score = 0.0
    for t in range(trees):
        if root[t] >= 0:
            score += _climb_score(shingle, leaf[t], depth[t], links[t], mass[t], box[t], mass[t, root[t]])
    _offer(shingle, counters, tree, sampler, rng, time_decay)
    return score / used if used else 0.0


@njit(cache=True, nogil=True)
def _fit_rows(points, counters, tree, sampler, rng, time_decay):
    for j in range(points.shape[0]):
        _offer(points[j], counters, tree, sampler, rng, time_decay)


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _score_rows(points, tree):
    """Mean tree scores of many points; trees in the outer loop so one tree's arrays stay in cache."""
    root, links, cut_val, mass, box = tree[:5]
    n = points.shape[0]
    out = np.zeros(n)
    leaf = np.empty(n, np.int32)
    depth = np.empty(n, np.int32)
    rows = np.empty(n, np.int32)
    at = np.empty(n, np.int32)
    used = 0
    for t in range(root.shape[0]):
        if root[t] >= 0:
            used += 1
            _descend_points(points, root[t], links[t], cut_val[t], leaf, depth, rows, at)
            links_t, mass_t, box_t, tree_mass = links[t], mass[t], box[t], mass[t, root[t]]
            for j in range(n):
                out[j] += _climb_score(points[j], leaf[j], depth[j], links_t, mass_t, box_t, tree_mass)
    return out / used if used else out


@njit(cache=True, nogil=True)
def _attribute_rows(points, tree):
    root = tree[0]
    n, dims = points.shape
    out = np.zeros((n, dims, 2))
    path = np.empty(tree[1].shape[1], np.int32)
    shadow = np.empty((2, dims))
    cur = np.empty((dims, 2))
    used = 0
    for t in range(root.shape[0]):
        if root[t] >= 0:
            used += 1
            for j in range(n):
                _tree_attribution(t, points[j], tree, path, shadow, cur, out[j])
    return out / used if used else out


# ------------------------------------------------------------------------------------------- public API


def fold_attribution(attribution: np.ndarray, shingle_size: int) -> np.ndarray:
    """Sum a shingled (n, s*d, 2) attribution over shingle positions to (n, d, 2) per raw dimension."""
    n, width, _ = attribution.shape
    if width % shingle_size:
        raise ValueError(f"{width} shingled dimensions are not a multiple of shingle_size={shingle_size}")
    return attribution.reshape(n, shingle_size, width // shingle_size, 2).sum(axis=1)


class RandomCutForest:
    """Streaming/batch Robust Random Cut Forest with AWS-scale scores and DiVector attribution.

    ``fit`` restarts from ``random_state`` and streams the rows through the samplers (no scoring), so
    fit-then-``update`` behaves exactly like updating from the start. Before any data every score is 0.
    """

    def __init__(
        self,
        num_trees: int = 100,
        sample_size: int = 256,
        shingle_size: int = 1,
        time_decay: float | None = None,
        random_state: int | np.random.Generator | None = None,
    ) -> None:
        if num_trees < 1 or sample_size < 1 or shingle_size < 1:
            raise ValueError("num_trees, sample_size and shingle_size must all be >= 1")
        if time_decay is not None and not (time_decay >= 0 and np.isfinite(time_decay)):
            raise ValueError(f"time_decay must be None or a finite value >= 0, got {time_decay!r}")
        self.num_trees = int(num_trees)
        self.sample_size = int(sample_size)
        self.shingle_size = int(shingle_size)
        self.time_decay = None if time_decay is None else float(time_decay)
        self.seed = int(np.random.default_rng(random_state).integers(2**63))
        self.raw_dims: int | None = None
        self._arrays: dict[str, np.ndarray] = {}
        self._tree: tuple[np.ndarray, ...] = ()
        self._sampler: tuple[np.ndarray, ...] = ()
        self._stream: tuple[Any, ...] = ()

    @property
    def dims(self) -> int | None:
        """Dimensions the trees see: ``shingle_size * raw_dims`` (None before any data)."""
        return None if self.raw_dims is None else self.raw_dims * self.shingle_size

    def fit(self, X: np.ndarray) -> RandomCutForest:
        """Rebuild the forest from the raw series ``X`` (n, d) (shingled internally); returns self."""
        rows = self._rows(X, allow_new_dims=True)
        self._reset(rows.shape[1])
        points, _ = self._shingles(rows, None)
        shingle, counters, tree, sampler, rng, decay = self._stream
        _fit_rows(points, counters, tree, sampler, rng, decay)
        tail = rows[-self.shingle_size :].ravel()
        shingle[:] = 0.0
        shingle[shingle.size - tail.size :] = tail
        counters[1] = rows.shape[0]
        return self

    def score(self, X: np.ndarray, history: np.ndarray | None = None) -> np.ndarray:
        """(n,) scores of the raw rows ``X``; the forest is unchanged.

        With ``shingle_size > 1`` a row needs the ``s - 1`` rows before it: they come from ``X`` itself or
        from ``history`` (raw rows preceding ``X``); rows without a full shingle score 0.
        """
        rows = self._rows(X)
        out = np.zeros(rows.shape[0])
        if self.raw_dims is None:
            return out
        points, first = self._shingles(rows, history)
        out[first:] = _score_rows(points, self._tree)
        return out

    def attribution(self, X: np.ndarray, history: np.ndarray | None = None) -> np.ndarray:
        """(n, shingle_size * d, 2) DiVector per *shingled* dimension: ``[..., 0]`` LOW, ``[..., 1]`` HIGH.

        Sums over the last two axes to ``score(X, history)``; rows without a full shingle are 0. Use
        :func:`fold_attribution` to get (n, d, 2) per raw dimension.
        """
        rows = self._rows(X)
        out = np.zeros((rows.shape[0], rows.shape[1] * self.shingle_size, 2))
        if self.raw_dims is None:
            return out
        points, first = self._shingles(rows, history)
        out[first:] = _attribute_rows(points, self._tree)
        return out

    def update(self, x: np.ndarray) -> float:
        """Score one raw point ``x`` (d,) against the forest, then offer it to every tree's sampler.

        With ``shingle_size = s`` the first ``s - 1`` points only fill the shingle: they return 0.0 and
        are not inserted. The very first inserted point also scores 0.0 (empty forest).
        """
        raw = np.ascontiguousarray(x, dtype=np.float64).reshape(-1)
        if self.raw_dims is None:
            self._reset(raw.shape[0])
        elif raw.shape[0] != self.raw_dims:
            raise ValueError(f"expected a point with {self.raw_dims} values, got {raw.shape[0]}")
        return _update(raw, *self._stream)

    def save(self, path: str | Path) -> None:
        """Write one ``.npz`` (atomically): all arrays plus a ``meta`` JSON string; nothing is pickled."""
        buffer = io.BytesIO()
        np.savez(buffer, meta=np.array(json.dumps(self._meta())), **self._arrays)
        atomic_write_bytes(Path(path), buffer.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> RandomCutForest:
        """Inverse of :meth:`save`; the loaded forest continues exactly, RNG state included."""
        with np.load(Path(path), allow_pickle=False) as archive:
            meta = json.loads(str(archive["meta"]))
            arrays = {key: archive[key] for key in archive.files if key != "meta"}
        return cls.from_state(arrays, meta)

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Arrays (copies) and JSON-able metadata that fully describe the forest, as saved by :meth:`save`."""
        return {key: value.copy() for key, value in self._arrays.items()}, self._meta()

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> RandomCutForest:
        """Rebuild a forest from :meth:`state` output, checking every array's dtype and shape."""
        if meta.get("format_version") != _FORMAT_VERSION:
            raise ValueError(f"unsupported forest format {meta.get('format_version')!r}")
        forest = cls(meta["num_trees"], meta["sample_size"], meta["shingle_size"], meta["time_decay"], 0)
        forest.seed = int(meta["seed"])
        if meta["raw_dims"] is not None:
            forest._reset(int(meta["raw_dims"]))
            for key, expected in forest._arrays.items():
                value = np.asarray(arrays[key])
                if value.dtype != expected.dtype or value.shape != expected.shape:
                    raise ValueError(
                        f"array {key!r} is {value.dtype}{value.shape}, expected {expected.dtype}{expected.shape}"
                    )
                expected[...] = value
        return forest

    # -- internals

    def _meta(self) -> dict[str, Any]:
        return {
            "format_version": _FORMAT_VERSION,
            "num_trees": self.num_trees,
            "sample_size": self.sample_size,
            "shingle_size": self.shingle_size,
            "time_decay": self.time_decay,
            "seed": self.seed,
            "raw_dims": self.raw_dims,
        }

    def _reset(self, raw_dims: int) -> None:
        """Empty trees and samplers for ``raw_dims`` raw dimensions, RNG back at the seed."""
        trees, nodes, dims = self.num_trees, 2 * self.sample_size, raw_dims * self.shingle_size
        self.raw_dims = raw_dims
        self._arrays = {
            "root": np.full(trees, -1, np.int32),
            "links": np.full((trees, nodes, 4), -1, np.int32),
            "cut_val": np.zeros((trees, nodes)),
            "mass": np.zeros((trees, nodes), np.int32),
            "box": np.zeros((trees, nodes, 2, dims)),
            "free": np.ascontiguousarray(np.tile(np.arange(nodes - 1, -1, -1, dtype=np.int32), (trees, 1))),
            "n_free": np.full(trees, nodes, np.int32),
            "heap_w": np.zeros((trees, self.sample_size)),
            "heap_leaf": np.full((trees, self.sample_size), -1, np.int32),
            "heap_n": np.zeros(trees, np.int32),
            "rng": np.array([self.seed], np.uint64),
            "counters": np.zeros(2, np.int64),  # [points offered to the samplers, raw points seen]
            "shingle": np.zeros(dims),
        }
        # Kernel arguments built once (the arrays are only ever mutated in place): keeps update() cheap.
        a = self._arrays
        self._tree = tuple(a[key] for key in _TREE_KEYS)
        self._sampler = tuple(a[key] for key in _SAMPLER_KEYS)
        decay = 0.0 if self.time_decay is None else self.time_decay
        self._stream = (a["shingle"], a["counters"], self._tree, self._sampler, a["rng"], decay)

    def _rows(self, X: np.ndarray, allow_new_dims: bool = False) -> np.ndarray:
        """``X`` as a C-contiguous float64 (n, d) matrix (1-D means one dimension), finite values only."""
        rows = np.asarray(X, dtype=np.float64)
        if rows.ndim == 1:
            rows = rows[:, None]
        if rows.ndim != 2:
            raise ValueError(f"expected an (n, d) array, got shape {rows.shape}")
        if not allow_new_dims and self.raw_dims is not None and rows.shape[1] != self.raw_dims:
            raise ValueError(f"expected {self.raw_dims} columns, got {rows.shape[1]}")
        if not np.isfinite(rows).all():
            raise ValueError("points must be finite (no NaN or inf)")
        return np.ascontiguousarray(rows)

    def _shingles(self, rows: np.ndarray, history: np.ndarray | None) -> tuple[np.ndarray, int]:
        """Shingled points for ``rows`` and the index of the first row that has a full shingle."""
        s = self.shingle_size
        if s == 1:
            return rows, 0
        prefix = np.empty((0, rows.shape[1]))
        if history is not None:
            prefix = self._rows(history).reshape(-1, rows.shape[1])
            prefix = prefix[max(0, len(prefix) - (s - 1)) :]
        joined = np.concatenate([prefix, rows])
        first = max(0, s - 1 - len(prefix))
        if joined.shape[0] < s:
            return np.empty((0, s * rows.shape[1])), rows.shape[0]
        windows = np.lib.stride_tricks.sliding_window_view(joined, s, axis=0)  # (m, d, s)
        points = np.ascontiguousarray(windows.transpose(0, 2, 1).reshape(windows.shape[0], -1))
        return points, first


class RCFDetector(Detector):
    """Pipeline adapter: a :class:`RandomCutForest` over the detector's features, rows in time order.

    Features are divided by their training MAD (falling back to std, then 1) because random cuts are
    drawn proportionally to each dimension's range: unscaled, the widest feature would get nearly all
    cuts. (Shifting does not matter; cuts are translation invariant.) ``score``/``explain`` accept the
    rows preceding ``frame`` as ``history`` to complete the first shingles; without it the first
    ``shingle_size - 1`` rows score 0.
    """

    kind: ClassVar[str] = "rcf"

    def __init__(
        self,
        features: list[str],
        num_trees: int = 100,
        sample_size: int = 256,
        shingle_size: int = 1,
        time_decay: float | None = None,
        random_state: int | None = 0,
    ) -> None:
        super().__init__(
            features,
            num_trees=num_trees,
            sample_size=sample_size,
            shingle_size=shingle_size,
            time_decay=time_decay,
            random_state=random_state,
        )
        self.forest = RandomCutForest(num_trees, sample_size, shingle_size, time_decay, random_state)
        self.scale = np.ones(len(self.features))

    def fit(self, frame: pd.DataFrame) -> RCFDetector:
        values = self.matrix(frame)
        values = values[np.isfinite(values).all(axis=1)]  # e.g. lags of a first day with no day before
        if not len(values):
            raise ValueError("RCFDetector.fit needs at least one finite row")
        mad = np.median(np.abs(values - np.median(values, axis=0)), axis=0)
        std = values.std(axis=0)
        self.scale = np.where(mad > 0, mad, np.where(std > 0, std, 1.0))
        self.forest.fit(values / self.scale)
        return self

    def score(self, frame: pd.DataFrame, history: pd.DataFrame | None = None) -> np.ndarray:
        """Scores of the rows; a row with a missing value scores 0 (nothing to compare)."""
        values, finite = self._finite_rows(frame)
        scores = np.zeros(len(values))
        if finite.all():
            return self.forest.score(values, self._history(history))
        scores[finite] = self.forest.score(values[finite]) if finite.any() else []
        return scores

    def explain(self, frame: pd.DataFrame, history: pd.DataFrame | None = None) -> np.ndarray:
        """(n, d): HIGH minus LOW attribution per raw feature, summed over shingle positions."""
        values, finite = self._finite_rows(frame)
        signed = np.zeros_like(values)
        if finite.any():
            rows = values if finite.all() else values[finite]
            attribution = self.forest.attribution(rows, self._history(history) if finite.all() else None)
            folded = fold_attribution(attribution, self.forest.shingle_size)
            signed[finite] = folded[..., 1] - folded[..., 0]
        return signed

    def _finite_rows(self, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        values = self.matrix(frame) / self.scale
        return values, np.isfinite(values).all(axis=1)

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays, meta = self.forest.state()
        return {**arrays, "scale": self.scale.copy()}, meta

    @classmethod
    def from_state(
        cls, features: list[str], params: dict[str, Any], arrays: dict[str, np.ndarray], meta: dict[str, Any]
    ) -> RCFDetector:
        detector = cls(features, **params)
        detector.forest = RandomCutForest.from_state(arrays, meta)
        detector.scale = np.asarray(arrays["scale"], dtype=np.float64)
        return detector

    def _history(self, history: pd.DataFrame | None) -> np.ndarray | None:
        return None if history is None else self.matrix(history) / self.scale
