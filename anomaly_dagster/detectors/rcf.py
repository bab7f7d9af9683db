"""Robust Random Cut Forest (Guha et al., ICML 2016) on flat NumPy arrays with numba kernels.

Why our own: the pure-Python ``rrcf`` package streams 10-50 points/s with 100 trees, far too slow for
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

Points, boxes and cuts are float32, as in the AWS library: half the memory and half the SIMD work of
float64 (a 24-dim box is 3 cache lines instead of 6). Input is rounded to float32 on the way in, so
values equal in float32 count as duplicates, and values beyond float32's range are refused. Scores are
accumulated in float64.

Differences from the AWS library, all deliberate: every bounding box stored (no cache fraction),
top-down insertion (the original paper's; same tree distribution as AWS's bottom-up one), no
``initialAcceptFraction`` and no ``outputAfter`` warm-up gate, and one SplitMix64 stream per forest so
the complete RNG state is a single saved integer.

Speed: one ``update`` (score, then offer to the samplers) is one compiled call; its descent runs all
trees in lockstep and records the paths, so the climbs read boxes at known addresses and prefetch them a
few trees ahead. Batch ``score`` first copies each tree into depth-first tables (left child next to its
parent, box range sums precomputed; kept until the trees change) and scores chunks of points tree by
tree, in threads (:data:`NUM_THREADS`): the descent moves 32 points at a time as branch-free SIMD lanes,
and points whose leaves share a parent climb together, 8 per SIMD group. The two sums per box (distance
outside it, range sum) are explicit 8-lane float32 SIMD with a fixed order, so all paths give
bit-identical scores (streaming, small or large batches, any thread count); being a different order
from a left-to-right sum, it moves scores by a few units in the last place at most. Insertion draws its
cut over the box grown by the point, whose range sum is the same SIMD ``gap + span``.
"""

from __future__ import annotations

import io
import itertools
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from anomaly_dagster.detectors.base import Assessment, Detector
from anomaly_dagster.storage import atomic_write_bytes

_FORMAT_VERSION = 2  # 2: float32 boxes, cuts and shingle (1 had float64)
_NOT_FINITE = "points must be finite (no NaN or inf) and within float32 range (|x| < 3.4e38)"
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

# Batch scoring: points per chunk (more points per leaf fill the climb's SIMD groups better; measured best
# at 8192-16384, where 2048 gave 15-20% fewer points/s), the fewest points worth building the depth-first
# tables for, and the fewest points per thread.
_CHUNK = 8192
_TABLE_MIN_POINTS = 1024
_THREAD_MIN_POINTS = 4096
# Streaming scoring prefetches the leaf's and the lowest _PREFETCH_LEVELS ancestors' boxes on the path of the
# tree _PREFETCH_AHEAD trees ahead: those are the boxes its climb reads, and with 100 trees of 24-dim boxes
# (20 MB) they come from L3 or memory.
_PREFETCH_AHEAD = 2
_PREFETCH_LEVELS = 8

#: Threads for batch ``score``/``attribution`` (None: every CPU this process may run on). Python threads
#: over ``nogil`` kernels rather than numba ``parallel=True``: no OpenMP runtime, so the forest stays safe
#: to use in forked processes, and per-point results do not depend on the thread count.
NUM_THREADS: int | None = None


# -------------------------------------------------------------------------------------- SIMD box sums
# The two sums every score step needs, over a box (float32 rows ``lo``, ``hi``) and a point ``x``: the L1
# distance of ``x`` outside the box, sum(max(lo - x, x - hi, 0)), and the box's range sum, sum(hi - lo).
# They are written as LLVM IR with <8 x float> lanes (one AVX register) so that the summation order is
# fixed by us: lane l adds elements l, l+8, l+16, ... in order (in float32) and the result is
# ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)), widened to float64; the last partial block is a masked
# load (missing lanes add 0, which changes nothing). Plain loops would need ``fastmath`` reassociation to
# vectorise, and then LLVM picks the order per call site: streaming, small and large batches would differ
# in the last bits. With fixed lanes they agree exactly, and precomputed range sums are reusable.

_LANES = 8
_I32 = ir.IntType(32)
# The batch descent moves _DESCENT_GROUPS independent groups of _LANES points per loop iteration.
_DESCENT_GROUPS = 4
_DESCENT_POINTS = _DESCENT_GROUPS * _LANES
# float32 values per 64-byte cache line, for prefetching a box line by line.
_LINE_VALUES = 16
_ALL_LANES = (1 << _LANES) - 1


def _is_array(ty: types.Type, dtype: types.Type = types.float32, ndim: int = 1) -> bool:
    return isinstance(ty, types.Array) and ty.ndim == ndim and ty.layout == "C" and ty.dtype == dtype


def _intrinsic_function(builder: ir.IRBuilder, name: str, fnty: ir.FunctionType) -> ir.Function:
    existing = builder.module.globals.get(name)
    return existing if existing is not None else ir.Function(builder.module, fnty, name)


def _emit_box_sums(context, builder, x, lo, hi):
    """IR for the lane sums described above; ``x`` None skips the distance. Returns (gap, span) values.

    Rows of at most 4 values take one 4-lane masked block: the same sums bit for bit (the 8-lane order
    would only add zero lanes), with a cheaper load and reduction (dims 3 is the common raw case)."""
    lo, hi = (context.make_array(ty)(context, builder, value) for ty, value in (lo, hi))
    xs = None if x is None else context.make_array(x[0])(context, builder, x[1])
    n = builder.extract_value(lo.shape, 0)
    i64 = n.type

    def zeros(lanes):
        return ir.Constant(ir.VectorType(ir.FloatType(), lanes), [0.0] * lanes)

    def lane_step(gap, span, block):
        lov, hiv, xv = block
        if xv is not None:
            zero = zeros(lov.type.count)
            below, above = builder.fsub(lov, xv), builder.fsub(xv, hiv)
            out = builder.select(builder.fcmp_ordered(">", below, above), below, above)
            gap = builder.fadd(gap, builder.select(builder.fcmp_ordered(">", out, zero), out, zero))
        return gap, builder.fadd(span, builder.fsub(hiv, lov))

    def masked_block(base, lanes):
        """(lo, hi, x) blocks of ``lanes`` values from element ``base``; lanes at or past n load 0."""
        vector = ir.VectorType(ir.FloatType(), lanes)
        left = builder.sub(n, base)
        rest = builder.insert_element(
            ir.Constant(ir.VectorType(i64, lanes), None), left, ir.Constant(_I32, 0)
        )
        rest = builder.shuffle_vector(rest, rest, ir.Constant(ir.VectorType(_I32, lanes), [0] * lanes))
        mask = builder.icmp_unsigned("<", ir.Constant(ir.VectorType(i64, lanes), list(range(lanes))), rest)
        masked_load = _intrinsic_function(
            builder,
            f"llvm.masked.load.v{lanes}f32.p0",
            ir.FunctionType(vector, [vector.as_pointer(), _I32, mask.type, vector]),
        )

        def load(array):
            pointer = builder.bitcast(builder.gep(array.data, [base]), vector.as_pointer())
            return builder.call(masked_load, [pointer, ir.Constant(_I32, 4), mask, zeros(lanes)])

        return load(lo), load(hi), None if xs is None else load(xs)

    def lanes_sum(vector):
        lane = [builder.extract_element(vector, ir.Constant(_I32, k)) for k in range(vector.type.count)]
        while len(lane) > 1:  # pairwise: ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))
            lane = [builder.fadd(lane[k], lane[k + 1]) for k in range(0, len(lane), 2)]
        return builder.fpext(lane[0], ir.DoubleType())

    narrow = builder.append_basic_block("box_sums.narrow")
    wide = builder.append_basic_block("box_sums.wide")
    exit_ = builder.append_basic_block("box_sums.exit")
    builder.cbranch(builder.icmp_unsigned("<=", n, ir.Constant(i64, 4)), narrow, wide)

    builder.position_at_end(narrow)
    gap, span = lane_step(zeros(4), zeros(4), masked_block(ir.Constant(i64, 0), 4))
    narrow_sums, narrow_end = (lanes_sum(gap), lanes_sum(span)), builder.block
    builder.branch(exit_)

    builder.position_at_end(wide)
    zero = zeros(_LANES)
    vector_ptr = zero.type.as_pointer()
    blocks = builder.lshr(n, ir.Constant(i64, 3))
    start = builder.block
    head = builder.append_basic_block("box_sums.head")
    body = builder.append_basic_block("box_sums.body")
    done = builder.append_basic_block("box_sums.done")
    builder.branch(head)
    builder.position_at_end(head)
    index, gap, span = builder.phi(i64), builder.phi(zero.type), builder.phi(zero.type)
    for phi, value in ((index, ir.Constant(i64, 0)), (gap, zero), (span, zero)):
        phi.add_incoming(value, start)
    builder.cbranch(builder.icmp_unsigned("<", index, blocks), body, done)
    builder.position_at_end(body)

    def load_block(array):
        return builder.load(builder.gep(builder.bitcast(array.data, vector_ptr), [index]), align=4)

    next_gap, next_span = lane_step(
        gap, span, (load_block(lo), load_block(hi), None if xs is None else load_block(xs))
    )
    index.add_incoming(builder.add(index, ir.Constant(i64, 1)), builder.block)
    gap.add_incoming(next_gap, builder.block)
    span.add_incoming(next_span, builder.block)
    builder.branch(head)
    builder.position_at_end(done)

    # The last n % 8 elements, if any, as one masked block: the missing lanes load as 0 and add 0.
    base = builder.shl(blocks, ir.Constant(i64, 3))
    full = builder.block
    tail = builder.append_basic_block("box_sums.tail")
    end = builder.append_basic_block("box_sums.end")
    builder.cbranch(builder.icmp_unsigned("!=", builder.sub(n, base), ir.Constant(i64, 0)), tail, end)
    builder.position_at_end(tail)
    tail_gap, tail_span = lane_step(gap, span, masked_block(base, _LANES))
    builder.branch(end)
    builder.position_at_end(end)
    gap_in, span_in = builder.phi(zero.type), builder.phi(zero.type)
    for phi, before, after in ((gap_in, gap, tail_gap), (span_in, span, tail_span)):
        phi.add_incoming(before, full)
        phi.add_incoming(after, tail)
    wide_sums, wide_end = (lanes_sum(gap_in), lanes_sum(span_in)), builder.block
    builder.branch(exit_)

    builder.position_at_end(exit_)
    sums = []
    for narrow_value, wide_value in zip(narrow_sums, wide_sums, strict=True):
        phi = builder.phi(ir.DoubleType())
        phi.add_incoming(narrow_value, narrow_end)
        phi.add_incoming(wide_value, wide_end)
        sums.append(phi)
    return sums[0], sums[1]


@intrinsic
def _gap_span(typingctx, x, lo, hi):
    """(distance of ``x`` outside the box ``lo``..``hi``, the box's range sum); rows of equal length."""
    if not (_is_array(x) and _is_array(lo) and _is_array(hi)):
        return None

    def codegen(context, builder, signature, args):
        x_, lo_, hi_ = zip(signature.args, args, strict=True)
        gap, span = _emit_box_sums(context, builder, x_, lo_, hi_)
        return context.make_tuple(builder, signature.return_type, (gap, span))

    return types.UniTuple(types.float64, 2)(x, lo, hi), codegen


@intrinsic
def _span(typingctx, lo, hi):
    """The second half of :func:`_gap_span` (bit for bit)."""
    if not (_is_array(lo) and _is_array(hi)):
        return None

    def codegen(context, builder, signature, args):
        lo_, hi_ = zip(signature.args, args, strict=True)
        return _emit_box_sums(context, builder, None, lo_, hi_)[1]

    return types.float64(lo, hi), codegen


@intrinsic
def _prefetch(typingctx, array, index):
    """Hint the CPU to fetch the cache line holding flat element ``index`` of ``array`` (never faults)."""
    if not (isinstance(array, types.Array) and isinstance(index, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        offset = context.cast(builder, args[1], signature.args[1], types.intp)
        byte_ptr = ir.IntType(8).as_pointer()
        prefetch = _intrinsic_function(
            builder, "llvm.prefetch.p0", ir.FunctionType(ir.VoidType(), [byte_ptr, _I32, _I32, _I32])
        )
        pointer = builder.bitcast(builder.gep(data, [offset]), byte_ptr)  # read, keep in all caches, data
        builder.call(prefetch, [pointer, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])
        return context.get_dummy_value()

    return types.void(array, index), codegen


def _splat(builder: ir.IRBuilder, value: ir.Value, vector: ir.VectorType) -> ir.Value:
    """``value`` in every lane of ``vector``."""
    single = builder.insert_element(ir.Constant(vector, None), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(
        single, single, ir.Constant(ir.VectorType(_I32, vector.count), [0] * vector.count)
    )


def _emit_blocks_then_rest(builder, dims, name, state, whole_block, one_dim):
    """IR for ``for b in range(dims // 8): state = whole_block(state, 8 * b)``, then for each of the last
    ``dims % 8`` dimensions (at most 7, unrolled) ``state = one_dim(state, k, d)`` with k the dimension's
    place in its block. ``state`` is a list of IR values carried through (phis); returns its final value."""
    index = dims.type
    blocks = builder.lshr(dims, ir.Constant(index, 3))
    start = builder.block
    head = builder.append_basic_block(f"{name}.head")
    body = builder.append_basic_block(f"{name}.body")
    rest = builder.append_basic_block(f"{name}.rest")
    builder.branch(head)
    builder.position_at_end(head)
    block = builder.phi(index)
    block.add_incoming(ir.Constant(index, 0), start)
    carried = [builder.phi(value.type) for value in state]
    for phi, value in zip(carried, state, strict=True):
        phi.add_incoming(value, start)
    builder.cbranch(builder.icmp_unsigned("<", block, blocks), body, rest)
    builder.position_at_end(body)
    updated = whole_block(list(carried), builder.shl(block, ir.Constant(index, 3)))
    block.add_incoming(builder.add(block, ir.Constant(index, 1)), builder.block)
    for phi, value in zip(carried, updated, strict=True):
        phi.add_incoming(value, builder.block)
    builder.branch(head)

    builder.position_at_end(rest)
    base = builder.shl(blocks, ir.Constant(index, 3))
    left = builder.sub(dims, base)
    end = builder.append_basic_block(f"{name}.end")
    state = list(carried)
    exits = []  # (block, the state when leaving it for ``end``)
    for k in range(_LANES - 1):
        more = builder.append_basic_block(f"{name}.dim")
        exits.append((builder.block, state))
        builder.cbranch(builder.icmp_unsigned(">", left, ir.Constant(index, k)), more, end)
        builder.position_at_end(more)
        state = one_dim(list(state), k, builder.add(base, ir.Constant(index, k)))
    exits.append((builder.block, state))
    builder.branch(end)
    builder.position_at_end(end)
    final = []
    for k, value in enumerate(state):
        phi = builder.phi(value.type)
        for block, values in exits:
            phi.add_incoming(values[k], block)
        final.append(phi)
    return final


def _emit_lane_loads(builder, base, index, record, field):
    """``<8 x T>`` of ``base[index[l] * record + field]`` for the 8 lanes of ``index`` (``<8 x i32>``).

    Eight scalar loads, not an AVX2 gather instruction: measured here, gathers were no faster, and plain
    loads run on every CPU."""
    out = ir.Constant(ir.VectorType(base.type.pointee, _LANES), None)
    for lane in range(_LANES):
        at = builder.extract_element(index, ir.Constant(_I32, lane))
        at = builder.add(builder.mul(at, ir.Constant(_I32, record)), ir.Constant(_I32, field))
        out = builder.insert_element(out, builder.load(builder.gep(base, [at])), ir.Constant(_I32, lane))
    return out


@intrinsic
def _descend_lanes(typingctx, points, first, cuts, kids, leaf, depth):
    """Send points ``first`` .. ``first + _DESCENT_POINTS - 1`` down one tree's tables as SIMD lanes,
    writing their ``leaf`` and ``depth`` (the same as :func:`_descend_table`; indices must fit int32).

    Why: the scalar descent (:func:`_descend_table`) keeps a list of the points still moving, and its
    branch on "reached a leaf" is mispredicted once per point and tree. Here every step is branch-free
    (compare and select on 8 lanes, _DESCENT_GROUPS independent groups per iteration to overlap load
    latencies): a lane at its leaf (cut dimension -1) keeps its node and depth until every lane of the
    call is at a leaf."""
    if not (
        _is_array(points, ndim=2)
        and isinstance(first, types.Integer)
        and _is_array(cuts)
        and _is_array(kids, types.int32, 2)
        and _is_array(leaf, types.int32)
        and _is_array(depth, types.int32)
    ):
        return None

    def codegen(context, builder, signature, args):
        rows, cut_values, kid_fields, leaf_out, depth_out = (
            context.make_array(signature.args[k])(context, builder, args[k]) for k in (0, 2, 3, 4, 5)
        )
        vector = ir.VectorType(_I32, _LANES)
        first_row = builder.trunc(args[1], _I32)
        dims = builder.trunc(builder.extract_value(rows.shape, 1), _I32)
        zero, one = ir.Constant(vector, [0] * _LANES), ir.Constant(vector, [1] * _LANES)
        row_starts = []
        for group in range(_DESCENT_GROUPS):
            row = builder.add(
                _splat(builder, builder.add(first_row, ir.Constant(_I32, group * _LANES)), vector),
                ir.Constant(vector, list(range(_LANES))),
            )
            row_starts.append(builder.mul(row, _splat(builder, dims, vector)))
        entry = builder.block
        loop = builder.append_basic_block("descend_lanes.loop")
        done = builder.append_basic_block("descend_lanes.done")
        builder.branch(loop)
        builder.position_at_end(loop)
        nodes = [builder.phi(vector) for _ in range(_DESCENT_GROUPS)]
        levels = [builder.phi(vector) for _ in range(_DESCENT_GROUPS)]
        moving = None
        for group, (node, level) in enumerate(zip(nodes, levels, strict=True)):
            node.add_incoming(zero, entry)
            level.add_incoming(zero, entry)
            dim = _emit_lane_loads(builder, kid_fields.data, node, 2, 0)
            right = _emit_lane_loads(builder, kid_fields.data, node, 2, 1)
            cut = _emit_lane_loads(builder, cut_values.data, node, 1, 0)
            inner = builder.icmp_signed(">=", dim, zero)
            value = _emit_lane_loads(
                builder, rows.data, builder.add(row_starts[group], builder.select(inner, dim, zero)), 1, 0
            )
            below = builder.select(builder.fcmp_ordered(">", value, cut), right, builder.add(node, one))
            node.add_incoming(builder.select(inner, below, node), loop)
            level.add_incoming(builder.add(level, builder.zext(inner, vector)), loop)
            bits = builder.bitcast(inner, ir.IntType(_LANES))
            moving = bits if moving is None else builder.or_(moving, bits)
        builder.cbranch(builder.icmp_unsigned("!=", moving, ir.Constant(ir.IntType(_LANES), 0)), loop, done)
        builder.position_at_end(done)
        for group, (node, level) in enumerate(zip(nodes, levels, strict=True)):
            offset = builder.add(first_row, ir.Constant(_I32, group * _LANES))
            for out, value in ((leaf_out, node), (depth_out, level)):
                builder.store(
                    value, builder.bitcast(builder.gep(out.data, [offset]), vector.as_pointer()), align=4
                )
        return context.get_dummy_value()

    return types.void(points, first, cuts, kids, leaf, depth), codegen


@intrinsic
def _load_columns(typingctx, points, members, columns):
    """Copy the rows ``points[members[l]]`` of a climb group into the columns of ``columns`` (``(dims, 8)``).

    Why not a scalar loop: that is two scalar moves per value, a fifth of a 24-dim climb's time. Here each
    8 x 8 block is 8 row loads, the standard 24-shuffle transpose and 8 column stores; the last dims % 8
    values are copied one by one."""
    if not (_is_array(points, ndim=2) and _is_array(members, types.int32) and _is_array(columns, ndim=2)):
        return None

    def codegen(context, builder, signature, args):
        rows, picks, out = (
            context.make_array(signature.args[k])(context, builder, args[k]) for k in range(3)
        )
        dims = builder.extract_value(rows.shape, 1)
        index = dims.type
        floats = ir.VectorType(ir.FloatType(), _LANES)
        starts = []
        for lane in range(_LANES):
            row = builder.sext(builder.load(builder.gep(picks.data, [ir.Constant(index, lane)])), index)
            starts.append(builder.gep(rows.data, [builder.mul(row, dims)]))

        def shuffle(u, v, order):
            return builder.shuffle_vector(u, v, ir.Constant(ir.VectorType(_I32, _LANES), order))

        column_pointer = builder.bitcast(out.data, floats.as_pointer())

        def whole_block(state, base):
            r = [
                builder.load(builder.bitcast(builder.gep(s, [base]), floats.as_pointer()), align=4)
                for s in starts
            ]
            # unpack lo/hi of row pairs, then 2-float shuffles, then 128-bit halves: column d of the block.
            t = []
            for k in range(0, _LANES, 2):
                t += [
                    shuffle(r[k], r[k + 1], [0, 8, 1, 9, 4, 12, 5, 13]),
                    shuffle(r[k], r[k + 1], [2, 10, 3, 11, 6, 14, 7, 15]),
                ]
            low, high = [0, 1, 8, 9, 4, 5, 12, 13], [2, 3, 10, 11, 6, 7, 14, 15]
            u = []
            for k in (0, 4):
                u += [shuffle(t[k], t[k + 2], low), shuffle(t[k], t[k + 2], high)]
                u += [shuffle(t[k + 1], t[k + 3], low), shuffle(t[k + 1], t[k + 3], high)]
            for d in range(_LANES):
                half = [0, 1, 2, 3, 8, 9, 10, 11] if d < 4 else [4, 5, 6, 7, 12, 13, 14, 15]
                value = shuffle(u[d % 4], u[d % 4 + 4], half)
                target = builder.gep(column_pointer, [builder.add(base, ir.Constant(index, d))])
                builder.store(value, target, align=4)
            return state

        def one_dim(state, _, d):
            for lane, s in enumerate(starts):
                at = builder.add(builder.mul(d, ir.Constant(index, _LANES)), ir.Constant(index, lane))
                builder.store(builder.load(builder.gep(s, [d])), builder.gep(out.data, [at]))
            return state

        _emit_blocks_then_rest(builder, dims, "load_columns", [], whole_block, one_dim)
        return context.get_dummy_value()

    return types.void(points, members, columns), codegen


@intrinsic
def _group_step(typingctx, xs, lo, hi, span, weight, score):
    """One climb step of a group of 8 points at one shared box: ``xs`` holds their rows as columns
    (``(dims, 8)``, one point per SIMD lane), ``score`` their 8 scores, ``weight`` 1 / (the box's depth + 1).

    Each point's distance outside the box is summed in exactly :func:`_gap_span`'s order (accumulator l adds
    dimensions l, l + 8, ... in order, then ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))), here as 8
    accumulators of 8 points each; then :func:`_mix` runs on all 8 scores at once. A point inside the box
    keeps its score bit for bit (the mix with p = 0 is exact), so a group can climb until its last point
    stops. Returns the lanes whose point is outside the box, as bits (lane l is bit l)."""
    if not (_is_array(xs, ndim=2) and _is_array(lo) and _is_array(hi) and _is_array(score, types.float64)):
        return None

    def codegen(context, builder, signature, args):
        columns, low, high, scores = (
            context.make_array(signature.args[k])(context, builder, args[k]) for k in (0, 1, 2, 5)
        )
        dims = builder.extract_value(low.shape, 0)
        index = dims.type
        floats = ir.VectorType(ir.FloatType(), _LANES)
        doubles = ir.VectorType(ir.DoubleType(), _LANES)
        zero = ir.Constant(floats, [0.0] * _LANES)
        row_pointer = builder.bitcast(columns.data, floats.as_pointer())

        def add_distance(total, d):
            x = builder.load(builder.gep(row_pointer, [d]), align=4)
            below = builder.fsub(_splat(builder, builder.load(builder.gep(low.data, [d])), floats), x)
            above = builder.fsub(x, _splat(builder, builder.load(builder.gep(high.data, [d])), floats))
            out = builder.select(builder.fcmp_ordered(">", below, above), below, above)
            return builder.fadd(total, builder.select(builder.fcmp_ordered(">", out, zero), out, zero))

        # Dimension d adds into accumulator d % 8: whole blocks of 8 in a loop, the last dims % 8 one by one.
        def whole_block(sums, base):
            return [add_distance(sums[k], builder.add(base, ir.Constant(index, k))) for k in range(_LANES)]

        def one_dim(sums, k, d):
            sums[k] = add_distance(sums[k], d)
            return sums

        finals = _emit_blocks_then_rest(builder, dims, "group_step", [zero] * _LANES, whole_block, one_dim)

        # Accumulator l holds "lane l" of every point: the documented pairwise order, on all points at once.
        level = list(finals)
        while len(level) > 1:
            level = [builder.fadd(level[k], level[k + 1]) for k in range(0, len(level), 2)]
        gap32 = level[0]
        gap = builder.fpext(gap32, doubles)
        score_pointer = builder.bitcast(scores.data, doubles.as_pointer())
        old = builder.load(score_pointer, align=8)
        p = builder.fdiv(gap, builder.fadd(_splat(builder, args[3], doubles), gap))
        mixed = builder.fadd(old, builder.fmul(p, builder.fsub(_splat(builder, args[4], doubles), old)))
        builder.store(mixed, score_pointer, align=8)
        outside = builder.bitcast(builder.fcmp_ordered(">", gap32, zero), ir.IntType(_LANES))
        return builder.zext(outside, ir.IntType(64))

    return types.int64(xs, lo, hi, types.float64, types.float64, score), codegen


# ---------------------------------------------------------------------------------------------- kernels
# A forest is a tuple of arrays over trees t and nodes i (2 * sample_size slots per tree):
#   root[t]; links[t, i] = (cut dim or -1 for a leaf, left, right, parent); cut_val[t, i]; mass[t, i];
#   box[t, i] = (min row, max row) of the points below (a leaf's box is its point); free[t] a stack of
#   n_free[t] unused slots. A node's fields sit together so a step down or up touches few cache lines.
# Every score, streaming or batch, runs the same arithmetic in the same order (no fastmath anywhere), so
# ``update`` returns exactly what ``score`` gives for the same point and forest.


@njit(cache=True, nogil=True)
def _uniform(rng):
    """One SplitMix64 step to a float in (0, 1): the whole RNG state is ``rng[0]``, so saving it resumes."""
    z = rng[0] + _GOLDEN
    rng[0] = z
    z = (z ^ (z >> _SHIFT30)) * _MIX1
    z = (z ^ (z >> _SHIFT27)) * _MIX2
    z = z ^ (z >> _SHIFT31)
    return (float(z >> _SHIFT11) + 0.5) * _TWO_POW_MINUS_53


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _leaf_score(x, point, depth, leaf_mass, tree_mass):
    """Start of the AWS climb at the leaf (holding ``point``) that ``x`` reached at ``depth``: the seen
    score if the leaf holds ``x`` (then the climb is over: ``x`` lies in every box above), else the unseen
    ``1 / (depth + 1)``. Returns (score, seen)."""
    for d in range(x.shape[0]):
        if x[d] != point[d]:
            return 1.0 / (depth + 1.0), False
    return (1.0 - leaf_mass / (2.0 * tree_mass)) / (depth + np.log2(leaf_mass + 1.0)), True


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _mix(score, gap, span, depth):
    """One AWS step up to an ancestor at ``depth`` whose box (range sum ``span``) ``x`` is ``gap`` outside:
    a random cut of the grown box separates ``x`` with probability ``p = gap / (span + gap)``, and
    ``p / (depth + 1) + (1 - p) score`` is computed as below: one division per point (the batch group
    step shares ``1 / (depth + 1)`` between its 8 points), none on the chain through ``score``.
    ``gap = 0`` leaves ``score`` exact."""
    p = gap / (span + gap)
    return score + p * (1.0 / (depth + 1.0) - score)


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


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _climb_score(x, leaf, depth, links, mass, box, tree_mass):
    """AWS score of ``x`` in one tree (its rows of the forest arrays) given the leaf it reached at
    ``depth``, climbing parent links: see the module docstring."""
    score, seen = _leaf_score(x, box[leaf, 0], depth, mass[leaf], tree_mass)
    if not seen:
        i = links[leaf, _PARENT]
        while i >= 0:
            depth -= 1
            gap, span = _gap_span(x, box[i, 0], box[i, 1])
            if gap == 0.0:
                break  # x is inside this box, hence inside every box above it
            score = _mix(score, gap, span, depth)
            i = links[i, _PARENT]
    return score * np.log2(tree_mass + 1.0)


@njit(cache=True, nogil=True, error_model="numpy")
def _score_rows(points, tree, out):
    """Add every non-empty tree's score of each point to ``out``, straight on the forest arrays (for
    batches too small to pay for :func:`_fill_tables`); trees outer so one tree's arrays stay in cache."""
    root, links, cut_val, mass, box = tree[:5]
    n = points.shape[0]
    leaf = np.empty(n, np.int32)
    depth = np.empty(n, np.int32)
    rows = np.empty(n, np.int32)
    at = np.empty(n, np.int32)
    for t in range(root.shape[0]):
        if root[t] >= 0:
            _descend_points(points, root[t], links[t], cut_val[t], leaf, depth, rows, at)
            links_t, mass_t, box_t, tree_mass = links[t], mass[t], box[t], mass[t, root[t]]
            for j in range(n):
                out[j] += _climb_score(points[j], leaf[j], depth[j], links_t, mass_t, box_t, tree_mass)


# Large batches first copy each tree into depth-first "tables": node k's left child is k + 1, so a step
# down reads one small record (cut value, cut dimension, right child); parents, masses, boxes and the boxes'
# range sums (computed once per node instead of once per visit) sit in the same order. Building them costs
# about as much as scoring a few hundred points; the forest keeps them until its trees change.


def _line_aligned_boxes(shape: tuple[int, ...]) -> np.ndarray:
    """float32 zeros starting on a 64-byte cache line, so that a 24-dim box (192 bytes) spans 3 lines."""
    count = int(np.prod(shape))
    buffer = np.zeros(count + _LINE_VALUES, np.float32)
    start = (-buffer.ctypes.data % 64) // buffer.itemsize
    return buffer[start : start + count].reshape(shape)


def _new_tables(trees: int, nodes: int, dims: int) -> tuple[np.ndarray, ...]:
    return (
        np.empty((trees, nodes), np.float32),  # cut value
        np.empty((trees, nodes, 2), np.int32),  # (cut dimension or -1 for a leaf, right child)
        _line_aligned_boxes((trees, nodes, 2, dims)),  # box
        np.empty((trees, nodes)),  # box range sum
        np.empty((trees, nodes), np.int32),  # parent (-1 at the root, slot 0)
        np.empty((trees, nodes), np.int32),  # mass
    )


@njit(cache=True, nogil=True, error_model="numpy")
def _fill_tables(tree, tables, first, last):
    """Copy the non-empty trees ``first``..``last - 1`` into ``tables`` in depth-first preorder."""
    root, links, cut_val, mass, box = tree[:5]
    cuts, kids, boxes, spans, ups, masses = tables
    stack = np.empty((links.shape[1] + 1, 3), np.int32)  # (node, parent slot, 1 if it is a right child)
    for t in range(first, last):
        if root[t] < 0:
            continue
        stack[0, 0], stack[0, 1], stack[0, 2] = root[t], -1, 0
        top, k = 1, 0
        while top:
            top -= 1
            i, up, right = stack[top, 0], stack[top, 1], stack[top, 2]
            if right:
                kids[t, up, 1] = k
            dim = links[t, i, _DIM]
            kids[t, k, 0] = dim
            cuts[t, k] = cut_val[t, i]
            ups[t, k] = up
            masses[t, k] = mass[t, i]
            for d in range(box.shape[3]):
                boxes[t, k, 0, d] = box[t, i, 0, d]
                boxes[t, k, 1, d] = box[t, i, 1, d]
            spans[t, k] = _span(box[t, i, 0], box[t, i, 1])
            if dim >= 0:
                stack[top, 0], stack[top, 1], stack[top, 2] = links[t, i, _LEFT + 1], k, 1
                stack[top + 1, 0], stack[top + 1, 1], stack[top + 1, 2] = links[t, i, _LEFT], k, 0
                top += 2
            k += 1


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _descend_table(points, cuts, kids, leaf, depth, rows, at):
    """:func:`_descend_points` on one tree's tables."""
    active = points.shape[0]
    for j in range(active):
        rows[j] = j
        at[j] = 0
    level = 0
    while active:
        kept = 0
        for a in range(active):
            j, k = rows[a], at[a]
            dim, right = kids[k, 0], kids[k, 1]  # both loads up front: a select, not a 50/50 branch
            if dim >= 0:
                rows[kept] = j
                at[kept] = right if points[j, dim] > cuts[k] else k + 1
                kept += 1
            else:
                leaf[j] = k
                depth[j] = level
        active = kept
        level += 1


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _descend_chunk(points, cuts, kids, leaf, depth, rows, at):
    """:func:`_descend_table` by :func:`_descend_lanes` for all but the last few points (for all of them
    if the chunk's flat indices would overflow int32)."""
    lanes_end = points.shape[0] - points.shape[0] % _DESCENT_POINTS
    if points.size >= 2**31:
        lanes_end = 0
    for first in range(0, lanes_end, _DESCENT_POINTS):
        _descend_lanes(points, first, cuts, kids, leaf, depth)
    _descend_table(points[lanes_end:], cuts, kids, leaf[lanes_end:], depth[lanes_end:], rows, at)


@njit(cache=True, nogil=True, error_model="numpy")
def _climb_groups(points, leaf, depth, box, span, up, mass, out, scratch):
    """Add one tree's score of each point (its ``leaf`` and ``depth`` known) to ``out``, on the tree's
    tables: :func:`_climb_score`'s arithmetic, bit for bit.

    Points whose leaves share a parent share the whole climb above it (and the depth), so they are sorted
    by that parent (a counting sort) and climb in groups of 8 as SIMD lanes (:func:`_group_step`).

    Every point starts with the unseen score. Only a point inside the parent's box can be its leaf's
    point (a duplicate, "seen"), and such a point's score is never changed by the climb (p = 0 all the
    way up), so the scalar leaf check runs after the climb and only for those points."""
    order, key, count, columns, scores, members = scratch
    n = points.shape[0]
    tree_mass = mass[0]
    norm = np.log2(tree_mass + 1.0)
    count[:] = 0
    for j in range(n):
        key[j] = up[leaf[j]] + 1  # the root's -1 (a one-leaf tree) sorts first
        count[key[j] + 1] += 1
    for k in range(1, count.shape[0]):
        count[k] += count[k - 1]
    for j in range(n):
        order[count[key[j]]] = j
        count[key[j]] += 1  # ends as the end of the run of key[j]
    first = 0
    while first < n:
        end = count[key[order[first]]]
        level = depth[order[first]]
        unseen = 1.0 / (level + 1.0)
        for group in range(first, end, _LANES):
            for lane in range(_LANES):
                members[lane] = order[min(group + lane, end - 1)]  # a short group repeats its last point
                scores[lane] = unseen
            _load_columns(points, members, columns)
            i = up[leaf[members[0]]]
            inside_parent = outside = _ALL_LANES  # without a parent (one-leaf tree) every point may be seen
            at = level
            while outside and i >= 0:
                at -= 1
                outside = _group_step(columns, box[i, 0], box[i, 1], span[i], 1.0 / (at + 1.0), scores)
                if at == level - 1:
                    inside_parent ^= outside
                i = up[i]
            for lane in range(min(_LANES, end - group)):
                j = members[lane]
                if inside_parent >> lane & 1:
                    scores[lane] = _leaf_score(points[j], box[leaf[j], 0], level, mass[leaf[j]], tree_mass)[0]
                out[j] += scores[lane] * norm
        first = end


@njit(cache=True, nogil=True, error_model="numpy")
def _score_table_rows(points, root, tables, out):
    """:func:`_score_rows` on the tables (same arithmetic, same result), in equal chunks of about
    ``_CHUNK`` points (a short last chunk would fill the climb groups worse)."""
    cuts, kids, boxes, spans, ups, masses = tables
    n, dims = points.shape
    chunks = max(1, (n + _CHUNK // 2) // _CHUNK)
    size = (n + chunks - 1) // chunks
    leaf = np.empty(size, np.int32)
    depth = np.empty(size, np.int32)
    rows = np.empty(size, np.int32)
    at = np.empty(size, np.int32)
    scratch = (
        np.empty(size, np.int32),  # points in climb order
        np.empty(size, np.int32),  # their sort keys
        np.empty(kids.shape[1] + 2, np.int64),  # counts, then run ends, per key
        np.empty((dims, _LANES), np.float32),  # a group's rows as columns
        np.empty(_LANES),  # its scores
        np.empty(_LANES, np.int32),  # its points
    )
    for start in range(0, n, size):
        chunk = points[start : min(n, start + size)]
        part = out[start : start + chunk.shape[0]]
        for t in range(root.shape[0]):
            if root[t] >= 0:
                _descend_chunk(chunk, cuts[t], kids[t], leaf, depth, rows, at)
                _climb_groups(chunk, leaf, depth, boxes[t], spans[t], ups[t], masses[t], part, scratch)


@njit(cache=True, nogil=True)
def _descend_trees(x, tree, path, depth, trees, at):
    """Send one point down every non-empty tree in lockstep (same reason as :func:`_descend_points`),
    recording each tree's path: ``path[k, t]`` is tree t's node at depth k and ``depth[t]`` its leaf's."""
    root, links, cut_val = tree[:3]
    active = 0
    for t in range(root.shape[0]):
        if root[t] >= 0:
            trees[active] = t
            at[active] = root[t]
            active += 1
    level = 0
    while active:
        kept = 0
        for a in range(active):
            t, i = trees[a], at[a]
            path[level, t] = i
            dim = links[t, i, _DIM]
            if dim >= 0:
                trees[kept] = t
                at[kept] = links[t, i, _LEFT + np.int64(x[dim] > cut_val[t, i])]
                kept += 1
            else:
                depth[t] = level
        active = kept
        level += 1


@njit(cache=True, nogil=True, error_model="numpy")
def _score_point(x, tree, scratch):
    """Sum over non-empty trees of the AWS score of one point (the streaming path): lockstep descent, then
    each tree's climb over its recorded path, prefetching the boxes a few trees ahead will need."""
    root, _, _, mass, box = tree[:5]
    path, depth, trees, at = scratch
    _descend_trees(x, tree, path, depth, trees, at)
    count = root.shape[0]
    node_size = box.shape[2] * box.shape[3]
    tree_size = box.shape[1] * node_size
    total = 0.0
    norm_mass, norm = -1, 0.0  # log2(M + 1) of the last tree mass seen: trees mostly share one mass
    for t in range(count):
        ahead = t + _PREFETCH_AHEAD
        if ahead < count and root[ahead] >= 0:
            for k in range(max(depth[ahead] - _PREFETCH_LEVELS, 0), depth[ahead] + 1):
                first = ahead * tree_size + path[k, ahead] * node_size
                for offset in range(0, node_size, _LINE_VALUES):
                    _prefetch(box, first + offset)
                _prefetch(box, first + node_size - 1)
        if root[t] < 0:
            continue
        level = depth[t]
        i = path[level, t]
        tree_mass = mass[t, root[t]]
        score, seen = _leaf_score(x, box[t, i, 0], level, mass[t, i], tree_mass)
        if not seen:
            for k in range(level - 1, -1, -1):
                i = path[k, t]
                gap, span = _gap_span(x, box[t, i, 0], box[t, i, 1])
                if gap == 0.0:
                    break
                score = _mix(score, gap, span, k)
        if tree_mass != norm_mass:
            norm_mass, norm = tree_mass, np.log2(tree_mass + 1.0)
        total += score * norm
    return total


@njit(cache=True, nogil=True, error_model="numpy")
def _mix_box(x, lo, hi, node_score, cur):
    """One upward step of the DiVector recursion; False once ``x`` lies inside the box (nothing changes)."""
    gap, span = _gap_span(x, lo, hi)
    if gap <= 0.0:
        return False
    span += gap
    keep = 1.0 - gap / span
    for i in range(x.shape[0]):
        cur[i, 0] = max(lo[i] - x[i], 0.0) / span * node_score + keep * cur[i, 0]
        cur[i, 1] = max(x[i] - hi[i], 0.0) / span * node_score + keep * cur[i, 1]
    return True


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _scale(cur, factor):
    for d in range(cur.shape[0]):
        cur[d, 0] *= factor
        cur[d, 1] *= factor


@njit(cache=True, nogil=True, error_model="numpy")
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
        _scale(cur, saved / total)
        for k in range(depth - 1, -1, -1):
            if not _mix_box(x, box[t, path[k], 0], box[t, path[k], 1], 1.0 / (k + 1.0), cur):
                break
    else:
        # Duplicate: directions come from the sibling boxes ("what if this leaf were absent"), and the
        # total is rescaled to the seen score so that it still equals the scalar score.
        leaf_mass = mass[t, i]
        saved = (1.0 - leaf_mass / (2.0 * tree_mass)) / (depth + np.log2(leaf_mass + 1.0))
        for d in range(dims):
            cur[d, 0] = cur[d, 1] = saved / (2.0 * dims)
            shadow[0, d] = np.inf
            shadow[1, d] = -np.inf
        for k in range(depth - 1, -1, -1):
            sibling = links[t, path[k], _LEFT] + links[t, path[k], _LEFT + 1] - path[k + 1]
            for d in range(dims):
                shadow[0, d] = min(shadow[0, d], box[t, sibling, 0, d])
                shadow[1, d] = max(shadow[1, d], box[t, sibling, 1, d])
            if not _mix_box(x, shadow[0], shadow[1], 1.0 / (k + 1.0), cur):
                break
        total = 0.0
        for d in range(dims):
            total += cur[d, 0]
            total += cur[d, 1]
        _scale(cur, saved / total)
    norm = np.log2(tree_mass + 1.0)
    for d in range(dims):
        out[d, 0] += cur[d, 0] * norm
        out[d, 1] += cur[d, 1] * norm


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
    cut = np.float32(0.0)
    node_size = 2 * dims
    while i >= 0:
        if links[t, i, _DIM] >= 0:
            # Fetch both children while this level's arithmetic runs: the insert may go on into either.
            for side in range(2):
                kid = t * links.shape[1] + links[t, i, _LEFT + side]
                for offset in range(0, node_size, _LINE_VALUES):
                    _prefetch(box, kid * node_size + offset)
                _prefetch(box, kid * node_size + node_size - 1)
                _prefetch(links, kid * 4)
                _prefetch(cut_val, kid)
                _prefetch(mass, kid)
        gap, span = _gap_span(x, box[t, i, 0], box[t, i, 1])
        total = gap + span  # range sum of the box grown by x (SIMD; the scan below may end a hair short)
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
        cut = min(max(np.float32(low + target), low), np.nextafter(high, low))  # float32 in [low, high)
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
    for d in range(dims):
        box[t, leaf, 0, d] = box[t, leaf, 1, d] = x[d]
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
            left, right = links[t, i, _LEFT], links[t, i, _LEFT + 1]
            moved = 0  # branch-free, so that LLVM vectorises the loop
            for d in range(box.shape[3]):
                low = min(box[t, left, 0, d], box[t, right, 0, d])
                high = max(box[t, left, 1, d], box[t, right, 1, d])
                moved |= (low != box[t, i, 0, d]) | (high != box[t, i, 1, d])
                box[t, i, 0, d] = low
                box[t, i, 1, d] = high
            changed = moved != 0
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
    """Offer ``x`` to every tree's weighted reservoir (max-heap on weight), inserting where accepted.

    Without time decay a full tree accepts ``u`` iff ``log(-log u) < w`` (``w`` its largest kept weight),
    that is iff ``u > exp(-exp(w))``: that bound (``gate``, lowered by a margin far above its rounding
    error, NaN when stale) turns most offers away without the two logs, and the rest take the exact test,
    so the samples are exactly those of the plain rule."""
    heap_w, heap_leaf, heap_n, gate = sampler
    sequence = counters[0]
    counters[0] += 1
    capacity = heap_w.shape[1]
    for t in range(heap_w.shape[0]):
        u = _uniform(rng)
        size = heap_n[t]
        if size == capacity and time_decay == 0.0:
            if np.isnan(gate[t]):
                gate[t] = np.exp(-np.exp(heap_w[t, 0])) * (1.0 - 1e-12)
            if u <= gate[t]:
                continue
        weight = np.log(-np.log(u)) - time_decay * sequence
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
            gate[t] = np.nan


@njit(cache=True, nogil=True, error_model="numpy")
def _update(raw, shingle, counters, tree, sampler, rng, time_decay, scratch):
    """Shift ``raw`` into the shingle; once it is full, score it, then offer it to the samplers."""
    width = raw.shape[0]
    dims = shingle.shape[0]
    for d in range(width):
        if not np.isfinite(np.float32(raw[d])):
            raise ValueError(_NOT_FINITE)
    for d in range(dims - width):
        shingle[d] = shingle[d + width]
    for d in range(width):
        shingle[dims - width + d] = raw[d]
    counters[1] += 1
    if counters[1] < dims // width:
        return 0.0
    root = tree[0]
    used = 0
    for t in range(root.shape[0]):
        used += root[t] >= 0
    score = _score_point(shingle, tree, scratch) if used else 0.0
    _offer(shingle, counters, tree, sampler, rng, time_decay)
    return score / used if used else 0.0


@njit(cache=True, nogil=True)
def _fit_rows(points, counters, tree, sampler, rng, time_decay):
    for j in range(points.shape[0]):
        _offer(points[j], counters, tree, sampler, rng, time_decay)


@njit(cache=True, nogil=True, error_model="numpy")
def _attribute_rows(points, tree, out):
    """Add every non-empty tree's DiVector of each point to ``out`` (n, d, 2)."""
    root = tree[0]
    dims = points.shape[1]
    path = np.empty(tree[1].shape[1], np.int32)
    shadow = np.empty((2, dims), np.float32)  # a box: float32 like the forest's
    cur = np.empty((dims, 2))
    for t in range(root.shape[0]):
        if root[t] >= 0:
            for j in range(points.shape[0]):
                _tree_attribution(t, points[j], tree, path, shadow, cur, out[j])


def _threads(points: int) -> int:
    """Threads for a batch of ``points``: :data:`NUM_THREADS` (default: every usable CPU), at most one per
    ``_THREAD_MIN_POINTS`` points."""
    wanted = NUM_THREADS
    if wanted is None:
        wanted = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(int(wanted), points // _THREAD_MIN_POINTS))


def _in_threads(work: Callable[[int, int], object], count: int, threads: int) -> None:
    """Run ``work(start, stop)`` over ``threads`` contiguous parts of ``range(count)``, in parallel (the
    kernels release the GIL). A fresh pool per call: a process forked later inherits no dead pool."""
    bounds = np.linspace(0, count, threads + 1).astype(int)
    if threads == 1:
        work(0, count)
        return
    with ThreadPoolExecutor(threads) as pool:
        for future in [pool.submit(work, a, b) for a, b in itertools.pairwise(bounds)]:
            future.result()


# ------------------------------------------------------------------------------------------- public API


def float32_finite(values: np.ndarray) -> np.ndarray:
    """Which values a forest can take: finite once rounded to float32, the rule ``_rows`` refuses by
    (1e42 is a float64, not a float32)."""
    with np.errstate(over="ignore"):
        return np.isfinite(np.asarray(values, dtype=np.float32))


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
        self._tables: tuple[np.ndarray, ...] | None = None  # batch tables of the current forest, if built

    @property
    def dims(self) -> int | None:
        """Dimensions the trees see: ``shingle_size * raw_dims`` (None before any data)."""
        return None if self.raw_dims is None else self.raw_dims * self.shingle_size

    def fit(self, X: np.ndarray) -> RandomCutForest:
        """Rebuild the forest from the raw series ``X`` (n, d) (shingled internally); returns self."""
        rows = self._rows(X, allow_new_dims=True)
        self._reset(rows.shape[1])
        points, _ = self._shingles(rows, None)
        shingle, counters, tree, sampler, rng, decay, _ = self._stream
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
        out[first:] = self._score_points(points)
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
        used = np.count_nonzero(self._tree[0] >= 0)
        if used:
            part = out[first:]
            _in_threads(
                lambda a, b: _attribute_rows(points[a:b], self._tree, part[a:b]),
                len(points),
                _threads(len(points)),
            )
            part /= used
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
        self._tables = None  # the trees may change
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
            raise ValueError(
                f"forest format {meta.get('format_version')!r} is not this version's {_FORMAT_VERSION} "
                "(format 1 held float64 boxes and cuts): retrain the model (re-materialize its training "
                "partition) or restart the stream to rebuild it"
            )
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
        self._tables = None
        self._arrays = {
            "root": np.full(trees, -1, np.int32),
            "links": np.full((trees, nodes, 4), -1, np.int32),
            "cut_val": np.zeros((trees, nodes), np.float32),
            "mass": np.zeros((trees, nodes), np.int32),
            "box": _line_aligned_boxes((trees, nodes, 2, dims)),
            "free": np.ascontiguousarray(np.tile(np.arange(nodes - 1, -1, -1, dtype=np.int32), (trees, 1))),
            "n_free": np.full(trees, nodes, np.int32),
            "heap_w": np.zeros((trees, self.sample_size)),
            "heap_leaf": np.full((trees, self.sample_size), -1, np.int32),
            "heap_n": np.zeros(trees, np.int32),
            "rng": np.array([self.seed], np.uint64),
            "counters": np.zeros(2, np.int64),  # [points offered to the samplers, raw points seen]
            "shingle": np.zeros(dims, np.float32),
        }
        # Kernel arguments built once (the arrays are only ever mutated in place): keeps update() cheap.
        a = self._arrays
        self._tree = tuple(a[key] for key in _TREE_KEYS)
        gate = np.full(trees, np.nan)  # derived from heap_w by _offer, not state
        self._sampler = (*(a[key] for key in _SAMPLER_KEYS), gate)
        decay = 0.0 if self.time_decay is None else self.time_decay
        # Streaming scratch (not state): each tree's root-to-leaf path, leaf depths, two lockstep work lists.
        scratch = (np.empty((nodes, trees), np.int32), *(np.empty(trees, np.int32) for _ in range(3)))
        self._stream = (a["shingle"], a["counters"], self._tree, self._sampler, a["rng"], decay, scratch)

    def _score_points(self, points: np.ndarray) -> np.ndarray:
        """Mean tree score of each shingled point: on the forest arrays for a few points, else on
        depth-first tables (built in parallel over trees, then scored in parallel over points).

        The tables are kept until ``update`` or ``fit`` changes the trees, so scoring many batches
        against one trained forest builds them once (they take about as much memory as the boxes)."""
        root = self._tree[0]
        used = np.count_nonzero(root >= 0)
        out = np.zeros(len(points))
        if not used or not len(points):
            return out
        if len(points) < _TABLE_MIN_POINTS:
            _score_rows(points, self._tree, out)
            return out / used
        threads = _threads(len(points))
        tables = self._tables
        if tables is None:
            trees, nodes, _, dims = self._tree[4].shape
            tables = _new_tables(trees, nodes, dims)
            _in_threads(lambda a, b: _fill_tables(self._tree, tables, a, b), trees, threads)
            self._tables = tables
        _in_threads(lambda a, b: _score_table_rows(points[a:b], root, tables, out[a:b]), len(points), threads)
        return out / used

    def _rows(self, X: np.ndarray, allow_new_dims: bool = False) -> np.ndarray:
        """``X`` as a C-contiguous float32 (n, d) matrix (1-D means one dimension), finite values only."""
        rows = np.asarray(X)
        if rows.ndim == 1:
            rows = rows[:, None]
        if rows.ndim != 2:
            raise ValueError(f"expected an (n, d) array, got shape {rows.shape}")
        if not allow_new_dims and self.raw_dims is not None and rows.shape[1] != self.raw_dims:
            raise ValueError(f"expected {self.raw_dims} columns, got {rows.shape[1]}")
        with np.errstate(over="ignore"):  # beyond float32's range becomes inf, refused just below
            rows = np.ascontiguousarray(rows, dtype=np.float32)
        if not np.isfinite(rows).all():
            raise ValueError(_NOT_FINITE)
        return rows

    def _shingles(self, rows: np.ndarray, history: np.ndarray | None) -> tuple[np.ndarray, int]:
        """Shingled points for ``rows`` and the index of the first row that has a full shingle."""
        s = self.shingle_size
        if s == 1:
            return rows, 0
        prefix = np.empty((0, rows.shape[1]), np.float32)
        if history is not None:
            prefix = self._rows(history).reshape(-1, rows.shape[1])
            prefix = prefix[max(0, len(prefix) - (s - 1)) :]
        joined = np.concatenate([prefix, rows])
        first = max(0, s - 1 - len(prefix))
        if joined.shape[0] < s:
            return np.empty((0, s * rows.shape[1]), np.float32), rows.shape[0]
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
        """Learn the scale on the finite rows, then fit the forest on the rows it can take: those
        finite in float32 once scaled, as :meth:`score` takes them (a sensor's 3.4e38 error value is
        finite in float64 but not a point the forest can hold)."""
        values = self.matrix(frame)
        values = values[np.isfinite(values).all(axis=1)]  # e.g. lags of a first day with no day before
        if len(values):
            mad = np.median(np.abs(values - np.median(values, axis=0)), axis=0)
            with np.errstate(over="ignore"):  # a 1e300 reading overflows the variance: no scale from it
                std = values.std(axis=0)
            self.scale = np.where(mad > 0, mad, np.where((std > 0) & np.isfinite(std), std, 1.0))
            values = values[float32_finite(values / self.scale).all(axis=1)]
        if not len(values):
            raise ValueError("RCFDetector.fit needs at least one row with every feature finite")
        self.forest.fit(values / self.scale)
        return self

    def score(self, frame: pd.DataFrame, history: pd.DataFrame | None = None) -> np.ndarray:
        """Scores of the rows; a row with a missing value scores 0 (nothing to compare) and the shingles
        run on over it, as over the gap between ``history`` and the rows."""
        values, finite = self._finite_rows(frame)
        scores = np.zeros(len(values))
        if finite.any():
            scores[finite] = self.forest.score(values[finite], self._history(history))
        return scores

    def explain(self, frame: pd.DataFrame, history: pd.DataFrame | None = None) -> np.ndarray:
        """(n, d): HIGH minus LOW attribution per raw feature, summed over shingle positions."""
        values, finite = self._finite_rows(frame)
        signed = np.zeros_like(values)
        if finite.any():
            attribution = self.forest.attribution(values[finite], self._history(history))
            folded = fold_attribution(attribution, self.forest.shingle_size)
            signed[finite] = folded[..., 1] - folded[..., 0]
        return signed

    @property
    def history_rows(self) -> int:
        return self.forest.shingle_size - 1

    def assess(self, frame: pd.DataFrame, history: pd.DataFrame | None = None) -> Assessment:
        return Assessment(self.score(frame, history), self.explain(frame, history), self.scored_rows(frame))

    def scored_rows(self, frame: pd.DataFrame) -> np.ndarray:
        """(n,) bool: rows the forest can take (every feature finite in float32); the others score 0."""
        return self._finite_rows(frame)[1]

    def _finite_rows(self, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        values = self.matrix(frame) / self.scale
        return values, float32_finite(values).all(axis=1)

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
        """The scaled ``history`` rows, without those a forest cannot take (a gap is skipped, as
        :meth:`score` skips it among the rows it scores)."""
        if history is None:
            return None
        values = self.matrix(history) / self.scale
        return values[float32_finite(values).all(axis=1)]
