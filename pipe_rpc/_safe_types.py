"""``SAFE_TYPES``: standard library value types an untrusted child may send back.

Each of them pickles as a call of the class itself with plain arguments (or,
for ``UUID``, as the class and a state of one int), so allowing the class is
all the restricted unpickler needs; and building one from whatever arguments
a hostile child chose is harmless: the constructors check their arguments,
and those whose work grows faster than their input (``Fraction``,
``Decimal``) take only arguments of a bounded size (``_untrusted``).
Members of an ``enum.Enum`` subclass need that class in ``allowed_types``.
"""

from __future__ import annotations

import datetime
import decimal
import fractions
import pathlib
import uuid
from typing import Final

__all__ = ["SAFE_TYPES"]

SAFE_TYPES: Final[tuple[type, ...]] = (
    datetime.datetime,
    datetime.date,
    datetime.time,
    datetime.timedelta,
    datetime.timezone,
    decimal.Decimal,
    fractions.Fraction,
    uuid.UUID,
    pathlib.PurePosixPath,
    pathlib.PureWindowsPath,
)
