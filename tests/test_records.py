"""`records` behaves like `dataclasses` for what the modules declared with it use: each
record class here is compared with the same class declared as a dataclass."""

from __future__ import annotations

import copy
import dataclasses
import pickle
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dask_safe_worker.records import (
    FrozenInstanceError,
    as_dict,
    field,
    fields,
    mutable_record,
    ordered_record,
    record,
    replace,
)


@record
class Inner:
    n: int
    tags: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class InnerDC:
    n: int
    tags: tuple[str, ...] = ()


@record
class Outer:
    name: str
    inner: Inner
    limit: int | None = None
    items: list[Inner] = field(default_factory=list)

    @property
    def doubled(self) -> int:
        return 2 * self.inner.n


@dataclasses.dataclass(frozen=True)
class OuterDC:
    name: str
    inner: InnerDC
    limit: int | None = None
    items: list[InnerDC] = dataclasses.field(default_factory=list)


@ordered_record
class Version:
    major: int
    minor: int
    patch: int = 0


@dataclasses.dataclass(frozen=True, order=True)
class VersionDC:
    major: int
    minor: int
    patch: int = 0


@mutable_record
class Outcome:
    done: bool
    notes: list[str] = field(default_factory=list)


@record
class Checked:
    value: int

    def __post_init__(self) -> None:
        if self.value < 0:
            raise ValueError("negative")


names = st.text(max_size=8)
ints = st.integers(-(2**63), 2**63)
tags = st.lists(names, max_size=3).map(tuple)


@given(n=ints, t=tags, name=names, limit=st.none() | ints, items=st.lists(ints, max_size=3))
def test_a_record_is_its_dataclass(
    n: int, t: tuple[str, ...], name: str, limit: int | None, items: list[int]
) -> None:
    rec = Outer(name, Inner(n, t), limit, [Inner(i) for i in items])
    dc = OuterDC(name, InnerDC(n, t), limit, [InnerDC(i) for i in items])
    assert repr(rec) == repr(dc).replace("DC(", "(")
    assert as_dict(rec) == dataclasses.asdict(dc)
    assert fields(rec) == tuple(f.name for f in dataclasses.fields(dc))
    assert rec == Outer(name=name, inner=Inner(n, tags=t), limit=limit, items=rec.items)
    assert rec.doubled == 2 * n
    # Hashable where every field is: the list field makes Outer unhashable, as a dataclass.
    assert hash(Inner(n, t)) == hash(Inner(n, t))
    with pytest.raises(TypeError):
        hash(rec)


@given(a=ints, b=ints)
def test_equal_only_with_the_same_class_and_fields(a: int, b: int) -> None:
    assert (Inner(a) == Inner(b)) == (a == b)
    rec: object = Inner(a)
    assert rec != InnerDC(a)
    assert rec != (a, ())  # not a tuple, unlike a NamedTuple
    assert rec != Checked(abs(a))
    nan = float("nan")  # equal to itself as a field: fields compare as one tuple
    assert Checked(nan) == Checked(nan)  # type: ignore[arg-type]


versions = st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 3))


@given(a=versions, b=versions)
def test_an_ordered_record_orders_as_its_dataclass(
    a: tuple[int, int, int], b: tuple[int, int, int]
) -> None:
    mine, theirs = (Version(*a), Version(*b)), (VersionDC(*a), VersionDC(*b))
    assert (mine[0] < mine[1]) == (theirs[0] < theirs[1])
    assert (mine[0] <= mine[1]) == (theirs[0] <= theirs[1])
    assert (mine[0] > mine[1]) == (theirs[0] > theirs[1])
    assert (mine[0] >= mine[1]) == (theirs[0] >= theirs[1])
    assert max(mine) == Version(*max(a, b))
    with pytest.raises(TypeError):
        _ = Inner(1) < Inner(2)  # type: ignore[operator]  # a plain record has no order


def test_defaults_and_factories() -> None:
    first, second = Outer("a", Inner(1)), Outer("b", Inner(2))
    assert first.limit is None and first.items == []
    assert first.items is not second.items  # a fresh list for each instance
    assert Inner.tags == ()  # the default stays on the class, as dataclasses leaves it


def test_frozen_and_mutable() -> None:
    rec = Inner(1)
    with pytest.raises(FrozenInstanceError):
        rec.n = 2  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del rec.n
    outcome = Outcome(False)
    outcome.done = True
    outcome.notes.append("x")
    assert outcome == Outcome(True, ["x"])
    with pytest.raises(TypeError):
        hash(outcome)


def test_copies_and_pickles_are_equal() -> None:
    rec = Outer("a", Inner(1, ("x",)), 5, [Inner(2)])
    assert pickle.loads(pickle.dumps(rec)) == rec
    assert copy.deepcopy(rec) == rec and copy.copy(rec) == rec


def test_replace_goes_through_init_and_post_init() -> None:
    rec = Outer("a", Inner(1), 5)
    assert replace(rec, limit=None) == Outer("a", Inner(1))
    assert rec.limit == 5
    with pytest.raises(TypeError, match="no field"):
        replace(rec, nope=1)
    with pytest.raises(ValueError, match="negative"):
        replace(Checked(1), value=-1)
    with pytest.raises(ValueError, match="negative"):
        Checked(-1)


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((), {}, "missing required argument"),
        ((1, (), 3), {}, "takes 2 positional arguments but 3 were given"),
        ((1,), {"n": 2}, "multiple values for argument 'n'"),
        ((1,), {"m": 2}, "unexpected keyword argument 'm'"),
    ],
)
def test_wrong_arguments_are_refused(
    args: tuple[Any, ...], kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(TypeError, match=message):
        Inner(*args, **kwargs)


def test_a_field_without_default_after_one_with_is_refused() -> None:
    class Bad:
        a: int = 0
        b: int

    with pytest.raises(TypeError, match="non-default argument"):
        record(Bad)


def test_a_mutable_default_needs_a_factory() -> None:
    class Bad:
        a: list[int] = []  # noqa: RUF012

    with pytest.raises(ValueError, match="default_factory"):
        record(Bad)
