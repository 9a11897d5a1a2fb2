"""Typed value classes without importing `dataclasses` (stdlib only, nothing heavy).

`dataclasses` imports `inspect`, and with it `ast`, `dis`, `tokenize` and `enum`: about
5.5 ms here, plus ~0.3 ms to build each class, on a start-up whose goal is 3 times a bare
interpreter (`--print-limit` for entrypoints/host-prestart.sh; docs/benchmarks.md). The
modules on that path declare their classes with `@record` (frozen), `@ordered_record`
or `@mutable_record` as they would with `@dataclass`: annotated fields in order,
defaults, `field(default=...)` or `field(default_factory=...)`, `__post_init__`.
Instances behave like dataclass instances: keyword or positional `__init__`, equality
and (frozen) hash over the fields, only between instances of the same class, the
dataclass repr, no iteration, and no ordering but an ordered record's. mypy reads the
decorators as dataclasses (PEP 681). `replace` and `as_dict` stand in for
`dataclasses.replace` and `dataclasses.asdict`.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing costs ~2 ms to import; mypy knows this name
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, TypeVar

    from typing_extensions import dataclass_transform

    T = TypeVar("T")
else:

    def dataclass_transform(**_kwargs: object) -> Callable[[T], T]:
        return lambda f: f


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


_MISSING: Any = _Missing()
_FIELDS = "__record_fields__"


class FrozenInstanceError(AttributeError):
    """An assignment to a field of a frozen record (as dataclasses.FrozenInstanceError)."""


class _Field:
    __slots__ = ("default", "default_factory")

    def __init__(self, default: object, default_factory: Callable[[], object] | None) -> None:
        self.default = default
        self.default_factory = default_factory


def field(*, default: Any = _MISSING, default_factory: Callable[[], Any] | None = None) -> Any:
    """A field's default (`default`) or a callable that makes one per instance."""
    if default is not _MISSING and default_factory is not None:
        raise ValueError("cannot specify both default and default_factory")
    return _Field(default, default_factory)


def _frozen_setattr(self: object, name: str, value: object) -> None:
    raise FrozenInstanceError(f"cannot assign to field {name!r}")


def _frozen_delattr(self: object, name: str) -> None:
    raise FrozenInstanceError(f"cannot delete field {name!r}")


def _build(cls: type[T], frozen: bool, order: bool = False) -> type[T]:
    inherited: dict[str, _Field] = {}
    for base in reversed(cls.__mro__[1:]):
        inherited.update(getattr(base, _FIELDS, {}))
    own: dict[str, _Field] = {}
    # inspect.get_annotations would import inspect, the cost this module avoids.
    annotations = cls.__dict__.get("__annotations__", {})  # noqa: RUF063
    for name, annotation in annotations.items():
        if isinstance(annotation, str) and annotation.startswith(("ClassVar", "typing.ClassVar")):
            continue
        value = cls.__dict__.get(name, _MISSING)
        spec = value if isinstance(value, _Field) else _Field(value, None)
        if isinstance(spec.default, (list, dict, set)):
            raise ValueError(f"mutable default for field {name}: use default_factory")
        own[name] = spec
        if value is not _MISSING:
            if spec.default is _MISSING:
                delattr(cls, name)
            else:
                setattr(cls, name, spec.default)  # the default, as dataclasses leaves it
    fields = {**inherited, **own}
    setattr(cls, _FIELDS, fields)
    names = tuple(fields)

    # One generic __init__ instead of one compiled per class (as dataclasses does): a
    # compile costs more per class than this costs over every instance of a start.
    defaults = {n: spec.default for n, spec in fields.items() if spec.default is not _MISSING}
    factories = {
        n: spec.default_factory for n, spec in fields.items() if spec.default_factory is not None
    }
    with_default = False
    for name in names:
        if name in defaults or name in factories:
            with_default = True
        elif with_default:
            raise TypeError(f"non-default argument {name!r} follows default argument")
    # Looked up on the instance when called, as dataclasses does: a subclass may override it.
    has_post_init = hasattr(cls, "__post_init__")
    count = len(names)

    def init(self: object, *args: object, **kwargs: object) -> None:
        if len(args) > count:
            raise TypeError(
                f"{cls.__name__}() takes {count} positional arguments but {len(args)} were given"
            )
        if len(args) == count and not kwargs:  # parsers build records positionally
            self.__dict__.update(zip(names, args, strict=True))
            if has_post_init:
                getattr(self, "__post_init__")()  # noqa: B009 - object has no such method
            return
        if not args and len(kwargs) == count and kwargs.keys() == fields.keys():
            # Every field by keyword (a measurement, on every tick of the watch): checked
            # as a whole, not one name at a time.
            self.__dict__.update({n: kwargs[n] for n in names})
            if has_post_init:
                getattr(self, "__post_init__")()  # noqa: B009 - object has no such method
            return
        values = dict(zip(names, args, strict=False))
        for key, value in kwargs.items():
            if key not in fields:
                raise TypeError(f"{cls.__name__}() got an unexpected keyword argument {key!r}")
            if key in values:
                raise TypeError(f"{cls.__name__}() got multiple values for argument {key!r}")
            values[key] = value
        if len(values) < count:
            for name in names:
                if name in values:
                    continue
                if name in factories:
                    values[name] = factories[name]()
                elif name in defaults:
                    values[name] = defaults[name]
                else:
                    missing = [
                        n for n in names if n not in values and n not in {**defaults, **factories}
                    ]
                    raise TypeError(
                        f"{cls.__name__}() missing required argument(s): "
                        + ", ".join(map(repr, missing))
                    )
        # In field order, as dataclasses assigns them (vars() and as_dict read it). A
        # comprehension, not a generator: the watch builds records with keywords on every
        # tick, and a generator resumes once per field.
        self.__dict__.update({n: values[n] for n in names})
        if has_post_init:
            getattr(self, "__post_init__")()  # noqa: B009 - object has no such method

    init.__qualname__ = f"{cls.__qualname__}.__init__"

    def __repr__(self: object) -> str:
        inner = ", ".join(f"{n}={getattr(self, n)!r}" for n in names)
        return f"{type(self).__qualname__}({inner})"

    def __eq__(self: object, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        # As tuples (as dataclasses before Python 3.13), consistent with __hash__.
        return tuple(getattr(self, n) for n in names) == tuple(getattr(other, n) for n in names)

    def __hash__(self: object) -> int:
        return hash(tuple(getattr(self, n) for n in names))

    methods: dict[str, object] = {"__init__": init, "__repr__": __repr__, "__eq__": __eq__}
    if frozen:
        methods.update(__hash__=__hash__, __setattr__=_frozen_setattr, __delattr__=_frozen_delattr)
    else:
        methods["__hash__"] = None  # mutable and compared by value: unhashable, as dataclasses
    if order:
        methods.update(_ordering(names))
    for name, method in methods.items():
        setattr(cls, name, method)
    return cls


def _ordering(names: tuple[str, ...]) -> dict[str, object]:
    """<, <=, >, >= over the fields as a tuple, only between instances of one class."""

    def compare(op: Callable[[tuple[Any, ...], tuple[Any, ...]], bool]) -> object:
        def method(self: object, other: object) -> object:
            if other.__class__ is not self.__class__:
                return NotImplemented
            return op(
                tuple(getattr(self, n) for n in names), tuple(getattr(other, n) for n in names)
            )

        return method

    return {
        "__lt__": compare(tuple.__lt__),
        "__le__": compare(tuple.__le__),
        "__gt__": compare(tuple.__gt__),
        "__ge__": compare(tuple.__ge__),
    }


@dataclass_transform(frozen_default=True, field_specifiers=(field,))
def record(cls: type[T]) -> type[T]:
    """A frozen value class, as `@dataclass(frozen=True)`."""
    return _build(cls, frozen=True)


@dataclass_transform(frozen_default=True, order_default=True, field_specifiers=(field,))
def ordered_record(cls: type[T]) -> type[T]:
    """A frozen value class ordered by its fields in turn, as
    `@dataclass(frozen=True, order=True)` (a release version, for one)."""
    return _build(cls, frozen=True, order=True)


@dataclass_transform(field_specifiers=(field,))
def mutable_record(cls: type[T]) -> type[T]:
    """A value class whose fields may be assigned, as `@dataclass`."""
    return _build(cls, frozen=False)


def is_record(obj: object) -> bool:
    return hasattr(type(obj), _FIELDS)


def fields(obj: object) -> tuple[str, ...]:
    """The field names of a record (class or instance), in order."""
    cls = obj if isinstance(obj, type) else type(obj)
    return tuple(getattr(cls, _FIELDS))


def replace(obj: T, **changes: object) -> T:
    """A copy of the record `obj` with `changes`, through its `__init__` (and so its
    `__post_init__` checks), as dataclasses.replace."""
    names = fields(obj)
    unknown = set(changes) - set(names)
    if unknown:
        raise TypeError(f"{type(obj).__name__} has no field {', '.join(sorted(unknown))}")
    values: dict[str, Any] = {n: getattr(obj, n) for n in names}
    values.update(changes)
    return type(obj)(**values)


def as_dict(obj: object) -> dict[str, Any]:
    """The record's fields as a dict, nested records, lists, tuples and dicts converted
    too (as dataclasses.asdict: a tuple stays a tuple)."""
    if not is_record(obj):
        raise TypeError(f"as_dict() should be called on a record, not {type(obj).__name__}")
    return {n: _value(getattr(obj, n)) for n in fields(obj)}


def _value(value: object) -> Any:
    if is_record(value):
        return as_dict(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_value(v) for v in value)
    if isinstance(value, dict):
        return {_value(k): _value(v) for k, v in value.items()}
    return value
