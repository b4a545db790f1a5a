"""Size identities of the axis graph on sequence-derived sizes: chunks longer than 64, a chunk count the trace fixed,
and regroupings of the data's axes that leave width axes alone (``growir/ir/axes.py``)."""

from __future__ import annotations

import pytest
import sympy

from growir.errors import AnalysisError
from growir.ir.axes import PROD, AxisGraph, same_size

S = sympy.Symbol("s", integer=True, positive=True)


def _chunks(k: int):
    padded = S + sympy.Mod(k - sympy.Mod(S, k), k)
    return padded, sympy.floor(padded / k)


def test_a_chunk_longer_than_64_is_not_one_chunk_at_every_length():
    padded, chunks = _chunks(256)
    assert not same_size(chunks, sympy.Integer(1))  # one chunk only up to 256
    assert same_size(256 * chunks, padded) and same_size(sympy.floor(padded / chunks), sympy.Integer(256))


def test_a_chunk_count_the_trace_fixed_is_assumed_where_it_was_traced():
    ag = AxisGraph()
    ag.traced[S] = 8
    padded, chunks = _chunks(64)
    symbolic, literal = ag.add("chunks", chunks), ag.add("one", 1)
    ag.unify(symbolic, literal, "a cumsum")  # the graph holds one chunk: only lengths up to 64 run
    assert ag.assumed and ag.same(padded, sympy.Integer(64))  # where it runs, the padded length is one chunk
    assert not same_size(padded, sympy.Integer(64))
    with pytest.raises(AnalysisError, match="were found equal"):
        ag.unify(ag.add("seq", S), ag.add("eight", 8), "a bad rule")  # no floor/Mod: never assumed


def test_a_regrouping_of_data_axes_aligns_what_it_can_and_keeps_the_rest_from_growing():
    ag = AxisGraph()
    batch, heads, seq = ag.add(("ids", 0), sympy.Symbol("b", positive=True)), ag.add("heads", 4), ag.add("s", S)
    ag.data.append(batch)
    rel = ag.add("rel", 2 * S - 1)
    heads2, seq2, rel2 = ag.add("heads'", 4), ag.add("s'", S), ag.add("rel'", 2 * S - 1)
    ag.align(PROD, [batch, heads, rel, seq], [ag.add(("b'", 0), batch_size := ag.size_of(batch)), heads2, seq2,
                                              rel2], "a relative shift")
    assert ag.find(heads) == ag.find(heads2) and ag.size_of(batch) == batch_size
    assert set(ag.opaque) == {rel, seq, seq2, rel2}  # the walker pins them, or refuses if a weight contracts one


def test_a_regrouping_of_width_axes_alone_is_still_refused():
    ag = AxisGraph()
    with pytest.raises(AnalysisError, match="regroups elements"):
        ag.align(PROD, [ag.add("a", 6), ag.add("b", 4)], [ag.add("c", 4), ag.add("d", 6)], "a transpose as a view")
    assert not ag.opaque


def test_a_size_that_divides_by_zero_at_some_points_is_decided_at_the_others():
    """A sequence floor-divided twice and used as a divisor (a stream pooled by 2, twice) is 0 at the grid's
    smallest sizes: those points decide nothing (no model runs there) and the others decide (it had raised
    ZeroDivisionError out of the analysis)."""
    import sympy
    from torch.utils._sympy.functions import FloorDiv
    from growir.ir.axes import same_size
    s = sympy.Symbol("s", integer=True, positive=True)
    quarter = FloorDiv(s, 4)
    assert not same_size(FloorDiv(s, quarter), sympy.Integer(4))
    assert same_size(FloorDiv(s, quarter) * quarter, s - sympy.Mod(s, quarter))


def test_a_data_dependent_size_is_equal_where_an_op_equates_it():
    """Tokens routed to experts are counted per expert at run time (``u0 + u1``, unbacked): an op that scatters
    them back (``index_add`` over ``2·s`` token slots) equates the two, which no algebra decides; the graph is
    valid where they agree (an assumption). Two backed sizes that differ still raise."""
    import sympy
    from growir.errors import AnalysisError
    from growir.ir.axes import AxisGraph
    s, u0, u1 = (sympy.Symbol(n, integer=True, positive=True) for n in ("s0", "u0", "u1"))
    ag = AxisGraph()
    routed, slots = ag.add("routed", u0 + u1), ag.add("slots", 2 * s)
    ag.unify(routed, slots, "index_add")
    assert ag.find(routed) == ag.find(slots) and ag.assumed
    with pytest.raises(AnalysisError, match="were found equal"):
        ag.unify(ag.add("a", s), ag.add("b", 2 * s), "a wrong rule")
