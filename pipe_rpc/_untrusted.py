"""Decode pickles from an untrusted peer: plain data and the caller's allowed types only.

Threat model
============

With ``untrusted=True`` every byte that comes from the child process is
hostile: the child may run code an attacker chose, and it may send any byte
string at all, not only what ``pickle.dumps`` or cloudpickle would write.
Unpickling such bytes with ``pickle.loads`` runs any callable the pickle
names (``os.system``, ``subprocess.Popen``, ``builtins.eval`` ...), imports
any module the pickle names, and can be made to crash or stall the parent.

What the restricted unpickler may build
=======================================

Only plain data: ``None``, ``bool``, ``int``, ``float``, ``complex``, ``str``,
``bytes``, ``bytearray``, ``list``, ``tuple``, ``dict``, ``set`` and
``frozenset``, nested in any way (recursive lists and dicts included), plus
instances of the classes the caller passes to :func:`allowed_globals`.

It is the C ``pickle.Unpickler`` (or, for data that could hash keys, the
Python one: see "Resource limits") with ``find_class`` replaced by a lookup in
an exact table of ``(module, qualname) -> object`` (:func:`allowed_globals`).
Every opcode that names a global goes through ``find_class``: ``GLOBAL``,
``STACK_GLOBAL``, ``INST`` and the extension-registry opcodes
``EXT1``/``EXT2``/``EXT4`` (whose result the C unpickler caches process-wide,
see below). No module is ever imported and nothing outside the table is ever
called. Persistent ids are refused.

The table holds only what pickle really writes for plain data at protocols
2 to 5 (``pickletools.dis`` shows the rest is opcodes, no globals):

* ``builtins.complex``, ``builtins.set``, ``builtins.frozenset``: the real
  types, which are safe to call with any plain arguments and immutable.
* ``builtins.bytearray`` (protocols 2-4), ``builtins.bytes`` (empty bytes at
  protocol 2) and ``_codecs.encode`` (non-empty bytes at protocol 2, as
  ``_codecs.encode(text, "latin1")``): stand-ins that accept only the
  arguments pickle writes. The real ones are not safe: ``bytearray(n)``
  allocates and zeroes n bytes, ``bytes(n)`` asks for n bytes, and
  ``bytearray(text, codec)`` or ``_codecs.encode(text, codec)`` looks the
  codec up, which imports ``encodings.<codec>`` (and what that imports).
* Each of these under its protocol-2 name too (``__builtin__.set`` ...): an
  overridden ``find_class`` is given the raw names, before ``fix_imports``.

``copyreg.__newobj__`` and ``copyreg._reconstructor`` are not allowed: at
protocol 2 and above, pickle writes the ``NEWOBJ`` opcode (whose class comes
through ``find_class``) instead of naming ``copyreg.__newobj__``, and
``copyreg._reconstructor`` only appears at protocols 0 and 1.

Allowed classes
===============

An allowed class is resolved under its own ``__module__``/``__qualname__``
(and its protocol-2 name). Its constructor, ``__new__`` and ``__setstate__``
are called with arguments the attacker chose (made of plain data and other
allowed types), and so are the ``append``, ``extend``, ``add`` and
``__setitem__`` methods of its instances (the ``APPEND(S)``, ``ADDITEMS`` and
``SETITEM(S)`` opcodes call them on whatever object is on the stack, without
asking ``find_class``), so allow only classes for which that is safe. Classes nested
in another class can only be decoded from protocol 4 and above (below that
pickle names them through ``builtins.getattr``, which is refused). Allowing a
plain type (``bytes``, ``dict`` ...) changes nothing: they are already
handled, and never by their real constructor.

A class whose attributes can be set (any class defined in Python) is not
resolved to itself but to a stand-in that constructs the real class
(``cls(*args)`` for ``REDUCE``, ``cls.__new__(cls, *args)`` for ``NEWOBJ``)
and cannot be changed. Otherwise a pickle could push the class and apply
``BUILD`` to it, and ``BUILD`` with a ``(None, {name: value})`` state is
``setattr(cls, name, value)``: the class itself would be changed in the
parent, for every later use. Likewise ``APPEND`` on the class would call a
class attribute named ``append``. The cost is that a pickle of the class
object itself (not an instance) decodes to the stand-in.

Three kinds of class resolve to a guard that takes only the arguments their
pickle has, because their constructor would do more than linear work on
others: an ``enum.Enum`` class (a member is looked up by the hash of its
value, which is priced first, see below), ``fractions.Fraction`` (a gcd) and
``decimal.Decimal`` (converting a huge int), which take ``str`` and ``int``
arguments of a bounded size only.

Resource limits
===============

Every failure becomes :class:`UntrustedDataError`: truncated or garbage
input, bad opcodes, forbidden globals, errors raised by a constructor,
``RecursionError``, and ``MemoryError`` (the C unpickler allocates the buffer
for ``BINBYTES8``/``BYTEARRAY8`` before it reads the data, so a claimed
length of 2**40 fails at once; the memory is never touched). Bytes after the
end of the pickle are refused too.

Hashing a tuple hashes its items recursively in C with no recursion check,
so a pickle of a ``set`` or ``dict`` keyed by a tuple nested a million deep
(one byte per level) overflows the C stack and kills the parent. When the
input could nest deeper than a small bound (counted from the bytes that can
make a tuple), it is decoded on a thread whose stack is large enough for
that depth.

Hashing is priced before it happens, since nothing can stop it once it
runs in C. A set of one tuple whose items share an inner tuple through the
memo, 40 levels deep, is 170 bytes and 2**40 leaves to hash; a few
thousand int keys that all hash to 0 make a ``dict`` quadratic. When the
input holds an opcode that could build a ``dict``, ``set`` or
``frozenset`` or name a global, it is decoded by the Python unpickler with
those opcodes replaced: each key is priced first (``_hash_budget``), and the
data is refused once hashing it would cost more than a budget that grows
with its size. That is several times slower than the C unpickler; input
that can hash nothing still goes through C. An allowed type whose
constructor or ``__setstate__`` hashes what it is given is not priced.

The extension cache is cleared
around each decode when it is not empty, but another thread that unpickles
trusted data with extension codes at the same moment can still put an entry
there that this decode then uses.
"""

from __future__ import annotations

import _compat_pickle
import contextvars
import copyreg
import encodings.raw_unicode_escape  # noqa: F401 - else a protocol 0 UNICODE opcode imports it
import enum
import io
import pickle
import reprlib
import struct
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any, ClassVar, Final, NoReturn, cast

from ._hash_budget import HashBudget, HashCostError, budget_for

__all__ = ["UntrustedDataError", "allowed_globals", "restricted_loads"]


class UntrustedDataError(pickle.UnpicklingError):
    """Untrusted data tried to build something not allowed, or is not a valid pickle."""


# -- showing bad values ----------------------------------------------------

_REPR: Final = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxstring = 120
_REPR.maxother = 120
_REPR.maxlong = 60


def _show(value: object) -> str:
    """A short repr of a value from untrusted data, which may be huge or deeply nested."""
    try:
        return _REPR.repr(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"


# -- stand-ins for builtins that are unsafe with arbitrary arguments --------


class _GuardedCallable:
    """A callable in the table that accepts only the arguments pickle writes.

    It cannot be changed: ``BUILD`` on it fails (no ``__dict__``, and
    ``__setattr__`` refuses everything, ``__class__`` included).
    """

    __slots__ = ()
    name: str = ""

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError(f"{self!r} cannot be changed")

    def __delattr__(self, name: str) -> NoReturn:
        raise AttributeError(f"{self!r} cannot be changed")

    def __repr__(self) -> str:
        return f"<restricted {self.name}>"

    def _refuse(self, args: tuple[object, ...]) -> UntrustedDataError:
        return UntrustedDataError(
            f"untrusted data may not call {self.name} with arguments {_show(args)}"
        )


class _EmptyBytes(_GuardedCallable):
    """``bytes()``: how protocols 0-2 pickle ``b""``. ``bytes(n)`` would ask for n bytes."""

    __slots__ = ()
    name = "builtins.bytes"

    def __call__(self, *args: object) -> bytes:
        if args:
            raise self._refuse(args)
        return b""


class _ByteArray(_GuardedCallable):
    """``bytearray()`` or ``bytearray(some_bytes)``: how protocols 0-4 pickle a bytearray.

    ``bytearray(n)`` would allocate n bytes and ``bytearray(text, codec)``
    would import the codec's module.
    """

    __slots__ = ()
    name = "builtins.bytearray"

    def __call__(self, *args: object) -> bytearray:
        if not args:
            return bytearray()
        if len(args) == 1:
            (data,) = args
            if type(data) is bytes:
                return bytearray(data)
        raise self._refuse(args)


class _Latin1Encode(_GuardedCallable):
    """``_codecs.encode(text, "latin1")``: how protocols 0-2 pickle non-empty bytes.

    Any other codec is refused: looking a codec up imports ``encodings.<codec>``.
    """

    __slots__ = ()
    name = "_codecs.encode"

    def __call__(self, *args: object) -> bytes:
        if len(args) == 2:
            text, encoding = args
            if type(text) is str and type(encoding) is str and encoding == "latin1":
                return text.encode("latin-1")
        raise self._refuse(args)


class _BoundedConstructor(_GuardedCallable):
    """An allowed class whose constructor does more than linear work on big arguments
    (``Fraction`` takes a gcd, ``Decimal`` converts an int): only ``str`` and ``int``
    arguments of a bounded size, as its pickle has them."""

    __slots__ = ("_target",)
    _target: Any

    def __init__(self, target: type) -> None:
        object.__setattr__(self, "_target", target)

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"{self._target.__module__}.{self._target.__qualname__}"

    def __call__(self, *args: object) -> Any:
        if not 1 <= len(args) <= 2 or not all(_small_number(arg) for arg in args):
            raise self._refuse(args)
        return self._target(*args)


def _small_number(value: object) -> bool:
    if type(value) is int:
        return value.bit_length() <= _MOST_NUMBER_BITS
    return type(value) is str and len(value) <= _MOST_NUMBER_CHARACTERS


#: Bounds on the arguments of ``_BoundedConstructor``: far above what real values need.
_MOST_NUMBER_BITS: Final = 1 << 17
_MOST_NUMBER_CHARACTERS: Final = 1 << 15


class _EnumMember(_GuardedCallable):
    """An allowed ``Enum`` class: ``cls(value)`` looks the value up by hash, so its hash
    must be cheap (see ``_hash_budget``)."""

    __slots__ = ("_target",)
    _target: Any

    def __init__(self, target: type) -> None:
        object.__setattr__(self, "_target", target)

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"{self._target.__module__}.{self._target.__qualname__}"

    def __call__(self, *args: object) -> Any:
        if len(args) != 1:
            raise self._refuse(args)
        budget = HashBudget(budget_for(0))
        try:
            budget.spend(budget.cost(args[0]), f"the value of a {self.name} member")
        except HashCostError as exc:
            raise UntrustedDataError(f"untrusted data is too costly to decode: {exc}") from exc
        return self._target(args[0])


def _guarded_constructor(cls: type) -> _GuardedCallable | None:
    """The stand-in for an allowed class whose constructor needs its arguments bounded."""
    if isinstance(cls, enum.EnumMeta):
        return _EnumMember(cls)
    fractions, decimal = sys.modules.get("fractions"), sys.modules.get("decimal")
    if (fractions is not None and cls is fractions.Fraction) or (
        decimal is not None and cls is decimal.Decimal
    ):
        return _BoundedConstructor(cls)
    return None


# -- stand-ins for allowed classes that could be changed -------------------

_IMMUTABLE_TYPE: Final = 1 << 8  # Py_TPFLAGS_IMMUTABLETYPE (3.10+): attributes cannot be set


class _ClassStandInMeta(type):
    """The type of a stand-in for an allowed class: constructs that class, cannot be changed."""

    _target: type

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        return cls._target(*args, **kwargs)

    def __setattr__(cls, name: str, value: object) -> NoReturn:
        raise AttributeError(f"{cls!r} cannot be changed")

    def __delattr__(cls, name: str) -> NoReturn:
        raise AttributeError(f"{cls!r} cannot be changed")

    def __repr__(cls) -> str:
        return f"<restricted class {cls._target.__module__}.{cls._target.__qualname__}>"


def _stand_in(target: type) -> type:
    """A stand-in for ``target`` that ``REDUCE``, ``NEWOBJ`` and ``OBJ`` treat like ``target``."""
    real: Any = target

    def __new__(stand_in: type, *args: Any, **kwargs: Any) -> Any:
        # NEWOBJ calls cls.__new__(cls, *args): build the real class instead.
        return real.__new__(real, *args, **kwargs)

    namespace: dict[str, object] = {
        "__slots__": (),
        "__new__": staticmethod(__new__),
        "__module__": target.__module__,
        "__qualname__": target.__qualname__,
        "__doc__": f"Restricted stand-in for {target.__module__}.{target.__qualname__}.",
        "_target": target,
    }
    return _ClassStandInMeta(target.__name__, (), namespace)


# -- the table -------------------------------------------------------------

#: Types that are plain data already: never resolved to their real constructor.
_PLAIN_TYPES: Final[frozenset[type]] = frozenset(
    {
        type(None),
        bool,
        int,
        float,
        complex,
        str,
        bytes,
        bytearray,
        list,
        tuple,
        dict,
        set,
        frozenset,
    }
)

#: What pickle writes for plain data at protocols 2-5, under the Python 3 names.
_PLAIN_GLOBALS: Final[Mapping[tuple[str, str], object]] = {
    ("builtins", "complex"): complex,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "bytearray"): _ByteArray(),
    ("builtins", "bytes"): _EmptyBytes(),
    ("_codecs", "encode"): _Latin1Encode(),
}


def _protocol2_name(module: str, qualname: str) -> tuple[str, str]:
    """The name pickle writes for ``module.qualname`` below protocol 3 (``fix_imports``)."""
    key = (module, qualname)
    if key in _compat_pickle.REVERSE_NAME_MAPPING:
        return _compat_pickle.REVERSE_NAME_MAPPING[key]
    return _compat_pickle.REVERSE_IMPORT_MAPPING.get(module, module), qualname


def allowed_globals(allowed_types: Iterable[type] = ()) -> Mapping[tuple[str, str], object]:
    """The exact (module, qualname) -> object table the restricted unpickler may resolve.

    It holds the builtins needed to rebuild plain data as pickled at protocols
    2-5 (``complex``, ``set``, ``frozenset``, and restricted ``bytearray``,
    ``bytes`` and ``_codecs.encode``), each also under its protocol-2 name,
    plus each type of ``allowed_types`` under its ``__module__``/``__qualname__``
    (and protocol-2 name). A class whose attributes can be set maps to a
    stand-in that constructs it but cannot be changed (see the module
    docstring); an immutable type, such as a builtin exception, maps to itself.

    Raises:
        TypeError: an item of ``allowed_types`` is not a class.
        ValueError: an allowed class claims the name of one of the builtins above.
    """
    table: dict[tuple[str, str], object] = {}
    for (module, qualname), obj in _PLAIN_GLOBALS.items():
        table[(module, qualname)] = obj
        table.setdefault(_protocol2_name(module, qualname), obj)
    for cls in allowed_types:
        if not isinstance(cls, type):
            raise TypeError(f"allowed types must be classes, not {cls!r}")
        if cls in _PLAIN_TYPES:
            continue
        module, qualname = cls.__module__, cls.__qualname__
        key = (module, qualname)
        if key in _PLAIN_GLOBALS:
            raise ValueError(f"allowed type {cls!r} has the reserved name {module}.{qualname}")
        obj = _guarded_constructor(cls) or (
            cls if cls.__flags__ & _IMMUTABLE_TYPE else _stand_in(cls)
        )
        table[key] = obj
        table.setdefault(_protocol2_name(module, qualname), obj)
    return MappingProxyType(table)


# -- decoding --------------------------------------------------------------


class _RestrictedUnpickler(pickle.Unpickler):
    """The C unpickler, resolving globals only through an exact table."""

    def __init__(
        self,
        file: io.BufferedIOBase,
        allowed: Mapping[tuple[str, str], object],
        buffers: Iterable[Any] | None,
    ) -> None:
        super().__init__(file, buffers=buffers)
        self._allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        # Called for GLOBAL, STACK_GLOBAL, INST and EXT1/2/4 with the raw names
        # (the default find_class is the one that would apply fix_imports).
        sys.audit("pickle.find_class", module, name)
        try:
            return self._allowed[(module, name)]
        except (KeyError, TypeError):
            pass
        raise UntrustedDataError(f"untrusted data may not load global {_show(f'{module}.{name}')}")

    def persistent_load(self, pid: Any) -> NoReturn:
        raise UntrustedDataError(f"untrusted data may not use persistent id {_show(pid)}")


class _HashGuardedUnpickler(pickle._Unpickler):
    """The Python unpickler, resolving globals through the same table, and counting the
    cost of every key it hashes before it hashes it (see ``_hash_budget``).

    Only the opcodes that hash (``SETITEM(S)``, ``DICT``, ``ADDITEMS``,
    ``FROZENSET``, a call of ``set`` or ``frozenset``) and two that would
    allocate or hash what the peer chose (``BYTEARRAY8``, ``PUT``) differ.
    """

    dispatch: ClassVar[dict[int, Callable[[Any], None]]] = dict(pickle._Unpickler.dispatch)
    # Set by the base class, which is not typed.
    stack: list[Any]
    memo: dict[int, Any]
    append: Callable[[Any], None]
    pop_mark: Callable[[], list[Any]]
    read: Callable[[int], bytes]
    readline: Callable[[], bytes]

    def __init__(
        self,
        file: io.BufferedIOBase,
        allowed: Mapping[tuple[str, str], object],
        buffers: Iterable[Any] | None,
        budget: HashBudget,
    ) -> None:
        super().__init__(file, buffers=buffers)
        self._allowed = allowed
        self._budget = budget

    find_class = _RestrictedUnpickler.find_class
    persistent_load = _RestrictedUnpickler.persistent_load

    def _set_items(self, target: Any, items: list[Any]) -> None:
        if isinstance(target, dict):
            for key in items[::2]:
                self._budget.insert(target, key)
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]

    def _load_setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        self._set_items(self.stack[-1], [key, value])

    def _load_setitems(self) -> None:
        items = self.pop_mark()
        self._set_items(self.stack[-1], items)

    def _load_dict(self) -> None:
        items = self.pop_mark()
        built: dict[Any, Any] = {}
        self._set_items(built, items)
        self.append(built)

    def _load_additems(self) -> None:
        items = self.pop_mark()
        target = self.stack[-1]
        if isinstance(target, set):
            for item in items:
                self._budget.insert(target, item)
        add = target.add
        for item in items:
            add(item)

    def _load_frozenset(self) -> None:
        items = self.pop_mark()
        self.append(frozenset(self._checked_members(items)))

    def _checked_members(self, items: list[Any]) -> list[Any]:
        """``items``, once hashing them all into one new set is known to be cheap."""
        scratch = object()  # stands for the set about to be built
        for item in items:
            self._budget.insert(scratch, item)
        return items

    def _load_reduce(self) -> None:
        args = self.stack.pop()
        func = self.stack[-1]
        if (func is set or func is frozenset) and type(args) is tuple and len(args) == 1:
            (items,) = args
            if type(items) is list or type(items) is tuple:
                args = (self._checked_members(list(items)),)
        self.stack[-1] = func(*args)

    def _load_put(self) -> None:
        # A text PUT takes any int; ints that hash alike would make the memo quadratic.
        index = int(self.readline()[:-1])
        if not 0 <= index < _MEMO_INDEX_LIMIT:
            raise UntrustedDataError(f"untrusted data uses memo index {_show(index)}")
        self.memo[index] = self.stack[-1]

    def _load_bytearray8(self) -> None:
        # The base class allocates (and zeroes) the claimed length before reading it.
        (size,) = struct.unpack("<Q", self.read(8))
        data = self.read(size)
        if len(data) != size:
            raise UntrustedDataError(f"untrusted data claims a bytearray of {size} bytes")
        self.append(bytearray(data))

    dispatch[pickle.SETITEM[0]] = _load_setitem
    dispatch[pickle.SETITEMS[0]] = _load_setitems
    dispatch[pickle.DICT[0]] = _load_dict
    dispatch[pickle.ADDITEMS[0]] = _load_additems
    dispatch[pickle.FROZENSET[0]] = _load_frozenset
    dispatch[pickle.REDUCE[0]] = _load_reduce
    dispatch[pickle.PUT[0]] = _load_put
    dispatch[pickle.BYTEARRAY8[0]] = _load_bytearray8


#: Larger than any memo a pickler writes; smaller than 2**61 - 1, so no two indices hash alike.
_MEMO_INDEX_LIMIT: Final = 1 << 32

#: Bytes of the opcodes without which no container that hashes can be built: EMPTY_DICT,
#: DICT, EMPTY_SET, FROZENSET, and those that name a global (a call of ``set``, or of an
#: allowed type, which may hold a dict): GLOBAL, STACK_GLOBAL, INST, EXT1/2/4.
_HASHING_OPS: Final = b"}d\x8f\x91c\x93i\x82\x83\x84"
_NOT_HASHING: Final = bytes(sorted(set(range(256)) - set(_HASHING_OPS)))


def _may_hash(raw: bytes) -> bool:
    """Could decoding ``raw`` hash anything? (Counting data bytes too: it may say yes
    for nothing, never no for something.)"""
    return bool(raw.translate(None, _NOT_HASHING))


_COPYREG: Final[dict[str, Any]] = vars(copyreg)
#: copyreg's code -> object cache, shared with the C unpickler, which consults
#: it *before* calling find_class for EXT1/EXT2/EXT4.
_EXTENSION_CACHE: Final[dict[int, object]] = _COPYREG["_extension_cache"]


def _load(raw: bytes, allowed: Mapping[tuple[str, str], object], buffers: Any) -> Any:
    """Unpickle ``raw`` on this thread; every failure becomes UntrustedDataError."""
    if _EXTENSION_CACHE:
        # An entry put there by a trusted unpickle would bypass find_class.
        copyreg.clear_extension_cache()
    stream: io.BufferedIOBase = io.BytesIO(raw)
    if not (len(raw) > 1 and raw[0] == pickle.PROTO[0] and raw[1] >= 4):
        # Without FRAME opcodes the C unpickler reads opcode by opcode; with
        # peek() it reads ahead in large blocks instead.
        stream = io.BufferedReader(cast(io.RawIOBase, stream))
    try:
        unpickler: pickle.Unpickler | _HashGuardedUnpickler
        if _may_hash(raw):
            # Slower, but every key is priced before the C code of dict or set hashes it.
            unpickler = _HashGuardedUnpickler(
                stream, allowed, buffers, HashBudget(budget_for(len(raw)))
            )
        else:
            unpickler = _RestrictedUnpickler(stream, allowed, buffers)
        value = unpickler.load()
        trailing = len(stream.read(1))
    except UntrustedDataError:
        raise
    except HashCostError as exc:
        raise UntrustedDataError(f"untrusted data is too costly to decode: {exc}") from exc
    except MemoryError as exc:
        raise UntrustedDataError("untrusted data asked for more memory than there is") from exc
    except RecursionError as exc:
        raise UntrustedDataError("untrusted data is nested too deeply to decode") from exc
    except Exception as exc:
        raise UntrustedDataError(
            f"untrusted data is not a valid pickle of allowed data: "
            f"{type(exc).__name__}: {_show_message(exc)}"
        ) from exc
    finally:
        if _EXTENSION_CACHE:
            # Our entries (stand-ins) must not leak into trusted unpickling.
            copyreg.clear_extension_cache()
    if trailing:
        raise UntrustedDataError("untrusted data goes on after the end of its pickle")
    return value


def _show_message(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception:
        return "<unprintable message>"
    return text if len(text) <= 200 else text[:200] + "..."


# -- C stack safety ----------------------------------------------------------

#: Up to this nesting depth, decode on the caller's thread (a few hundred KiB of C stack at most).
_DIRECT_DEPTH: Final = 2_000
#: C stack per level of tuple nesting when a tuple is hashed: about 48 bytes
#: measured on CPython 3.11 x86-64; generous for debug builds.
_STACK_PER_LEVEL: Final = 256
#: Stack for everything else on the decoding thread.
_STACK_BASE: Final = 8 << 20
_STACK_ROUNDING: Final = 1 << 20

#: Opcodes that can make a tuple (or an object of an allowed type) out of
#: what is on the stack, and so add one level of nesting each: TUPLE1,
#: TUPLE2, TUPLE3, REDUCE, NEWOBJ, NEWOBJ_EX.
_NESTING_OPS: Final = b"\x85\x86\x87R\x81\x92"
#: Opcodes that do the same but also use up a MARK: TUPLE, OBJ, INST.
_MARKED_NESTING_OPS: Final = b"toi"
_MARK: Final = pickle.MARK
_NOT_COUNTED: Final = bytes(
    sorted(set(range(256)) - set(_NESTING_OPS + _MARKED_NESTING_OPS + _MARK))
)

_STACK_SIZE_LOCK: Final = threading.Lock()


def _nesting_bound(raw: bytes) -> int:
    """An upper bound on how deeply the objects ``raw`` builds can nest.

    Each level is made by one executed opcode of ``_NESTING_OPS`` or
    ``_MARKED_NESTING_OPS``, and no byte is executed twice, so counting bytes
    (data bytes too) can only overcount. The leaf adds one.
    """
    picked = raw.translate(None, _NOT_COUNTED)
    direct = sum(picked.count(op) for op in _NESTING_OPS)
    marked = sum(picked.count(op) for op in _MARKED_NESTING_OPS)
    return 1 + direct + min(marked, picked.count(_MARK))


def _load_on_big_stack(
    raw: bytes, allowed: Mapping[tuple[str, str], object], buffers: Any, depth: int
) -> Any:
    """``_load`` on a new thread whose C stack can hash tuples nested ``depth`` deep."""
    size = _STACK_BASE + depth * _STACK_PER_LEVEL
    size = -(-size // _STACK_ROUNDING) * _STACK_ROUNDING
    outcome: list[tuple[bool, Any]] = []
    # Allowed types may depend on context variables (decimal's context, say).
    context = contextvars.copy_context()

    def run() -> None:
        try:
            outcome.append((True, context.run(_load, raw, allowed, buffers)))
        except BaseException as exc:
            outcome.append((False, exc))

    thread = threading.Thread(target=run, name="pipe_rpc-untrusted-decode", daemon=True)
    with _STACK_SIZE_LOCK:
        old = threading.stack_size()
        try:
            threading.stack_size(size)
            thread.start()
        except (RuntimeError, ValueError, OverflowError, MemoryError) as exc:
            raise UntrustedDataError(
                f"untrusted data may nest {depth} levels deep, and no thread with a "
                f"{size}-byte stack could be started to decode it safely"
            ) from exc
        finally:
            threading.stack_size(old)
    thread.join()
    ok, value = outcome[0]
    if ok:
        return value
    raise cast(BaseException, value)


def restricted_loads(
    data: bytes | bytearray | memoryview,
    *,
    allowed: Mapping[tuple[str, str], object],
    buffers: Iterable[Any] | None = None,
) -> Any:
    """Unpickle `data` allowing only the globals in `allowed`; raise UntrustedDataError otherwise.

    Any failure (truncated data, bad opcode, forbidden global, persistent id, exception raised by a
    constructor, RecursionError, MemoryError from a crafted length, etc.) becomes UntrustedDataError
    (chained with ``from``).

    Args:
        data: one complete pickle, nothing after it.
        allowed: usually ``allowed_globals(types)``; the only globals the pickle may name.
        buffers: the out-of-band buffers of a protocol 5 pickle, as for ``pickle.loads``.

    Raises:
        UntrustedDataError: for anything wrong with ``data``.
        TypeError: ``data`` is not bytes, bytearray or memoryview.
    """
    if isinstance(data, bytes):
        raw = data
    elif isinstance(data, bytearray | memoryview):
        raw = bytes(data)
    else:
        raise TypeError(f"data must be bytes, bytearray or memoryview, not {type(data).__name__}")
    if len(raw) > _DIRECT_DEPTH:
        depth = _nesting_bound(raw)
        if depth > _DIRECT_DEPTH:
            return _load_on_big_stack(raw, allowed, buffers, depth)
    return _load(raw, allowed, buffers)
