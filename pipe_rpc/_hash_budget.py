"""What hashing untrusted keys may cost, counted before any key is hashed.

A dict or set hashes each key as it is inserted, in C, holding the GIL: no
deadline and no signal handler can stop it. Two shapes make that unbounded
for a reply of a few hundred bytes:

* A tuple does not cache its hash, so hashing it visits every leaf, once per
  path: a tuple nested 40 deep whose items are the same inner tuple twice
  (a pickle can share an object through the memo) has 2**40 paths.
* Keys whose hashes are equal (ints ``k * (2**61 - 1)`` all hash to 0) make
  every insertion compare with all earlier ones: quadratic.

:class:`HashBudget` is told about each key before it goes in. It works out
what hashing the key will cost (leaves counted with their multiplicity,
without visiting an object twice), and counts the earlier keys of the same
container with the same hash, each of which will be compared with it. When
the total goes over the budget, :class:`HashCostError` refuses the data.
The budget grows with the size of the pickle: hashing is linear in the size
of the data for anything a pickler writes for real values.

``str`` and ``bytes`` keys are not counted for collisions: their hash is
salted per process, so the peer cannot choose keys that collide.
"""

from __future__ import annotations

from typing import Any, Final

__all__ = ["HashBudget", "HashCostError", "budget_for"]

#: Units any pickle may spend, however short (a few milliseconds of hashing).
_BASE: Final = 1 << 20
#: And per byte of pickle: enough for a set of a million-deep tuple, one byte a level.
_PER_BYTE: Final = 4
#: Bits of an int's magnitude hashed per unit.
_INT_BITS_PER_UNIT: Final = 64

_SALTED: Final = (str, bytes)


class HashCostError(ValueError):
    """Hashing the keys of untrusted data would cost more than its budget."""


def budget_for(size: int) -> int:
    """The units of hashing work a pickle of ``size`` bytes may cost."""
    return _BASE + _PER_BYTE * size


def _fields(obj: object) -> list[object]:
    """The attribute values a Python-level ``__hash__`` of ``obj`` may hash.

    An allowed class (a frozen dataclass, say) hashes a tuple of its fields,
    and does not cache the result, so its fields count as a tuple's items.
    """
    found: list[object] = []
    try:
        state = object.__getattribute__(obj, "__dict__")
    except AttributeError:
        pass
    else:
        if type(state) is dict:
            found.extend(state.values())
    for klass in type(obj).__mro__:
        slots = klass.__dict__.get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            if isinstance(name, str) and name not in ("__dict__", "__weakref__"):
                try:
                    found.append(object.__getattribute__(obj, name))
                except AttributeError:
                    pass
    return found


#: Types whose hash is cheap and descends into nothing: scalars, ``str`` and ``bytes``
#: (which cache their hash: the first one is paid by their size), ``frozenset`` (its
#: items' hashes are stored, and its own is cached), and the unhashable containers
#: (the insertion fails at once).
_LEAVES: Final = frozenset(
    {int, bool, float, complex, str, bytes, type(None), frozenset, list, dict, set, bytearray}
)


def _leaf_cost(obj: object) -> int:
    """The cost of hashing ``obj``, whose type is one of ``_LEAVES``: an int by its size."""
    if type(obj) is int:
        return 1 + int.bit_length(obj) // _INT_BITS_PER_UNIT
    return 1


class HashBudget:
    """Counts the hashing work of one decode; refuses keys that would go over ``budget``."""

    def __init__(self, budget: int) -> None:
        self.left = budget
        # Per container that took keys with unsalted hashes: hash -> keys so far. The
        # container is kept so that its id is not reused by another for this decode.
        self._hashes: dict[int, tuple[object, dict[int, int]]] = {}

    def spend(self, units: int, what: str) -> None:
        if units > self.left:
            raise HashCostError(
                f"hashing {what} would take more than the {self.left} units of work left"
            )
        self.left -= units

    def cost(self, key: object) -> int:
        """What hashing ``key`` costs: its leaves counted once per path, each object
        visited once. Raises HashCostError as soon as that is over the budget left."""
        if type(key) in _LEAVES:
            return _leaf_cost(key)
        # id -> cost; 0 while the object is being costed (met again then, it is a cycle,
        # which hash() refuses by itself).
        costs: dict[int, int] = {}
        visited = 0
        leaves = _LEAVES
        # Iterative post-order walk (the key may nest a million deep): a frame without its
        # items is expanded, one with them is costed.
        stack: list[tuple[Any, Any]] = [(key, None)]
        pop, push = stack.pop, stack.append
        while stack:
            obj, items = pop()
            if items is None:
                if id(obj) in costs:
                    continue
                costs[id(obj)] = 0
                items = obj if type(obj) is tuple else _fields(obj)
                visited += 1 + len(items)
                if visited > self.left:
                    raise HashCostError(
                        f"hashing a key of type {type(key).__name__} would take more than "
                        f"the {self.left} units of work left"
                    )
                push((obj, items))
                for item in items:
                    if type(item) not in leaves:
                        push((item, None))
                continue
            total = 1
            for item in items:
                total += _leaf_cost(item) if type(item) in leaves else costs[id(item)] or 1
            costs[id(obj)] = total
        return costs[id(key)]

    def insert(self, container: object, key: object) -> None:
        """Account for hashing ``key`` into ``container`` (a dict, set or frozenset being built).

        Raises:
            HashCostError: hashing it, or comparing it with the earlier keys of the same
                hash, would go over the budget.
        """
        cost = self.cost(key)
        self.spend(cost, f"a key of type {type(key).__name__}")
        if type(key) in _SALTED:
            return
        try:
            value = hash(key)  # what the insertion does next anyway, now known to be cheap
        except TypeError:
            return  # unhashable: the insertion raises
        entry = self._hashes.get(id(container))
        if entry is None or entry[0] is not container:
            entry = self._hashes[id(container)] = (container, {})
        counts = entry[1]
        earlier = counts.get(value, 0)
        if earlier:
            # Each earlier key of the same hash is compared with this one.
            self.spend(earlier * cost, f"{earlier + 1} keys that all hash to {value}")
        counts[value] = earlier + 1
