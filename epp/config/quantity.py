"""Kubernetes resource quantities ("1Gi", "500M", "1k", "1e3"), as flowControl limits use them."""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation

_SUFFIX = {
    "Ki": Decimal(2) ** 10, "Mi": Decimal(2) ** 20, "Gi": Decimal(2) ** 30,
    "Ti": Decimal(2) ** 40, "Pi": Decimal(2) ** 50, "Ei": Decimal(2) ** 60,
    "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": Decimal(1),
    "k": Decimal("1e3"), "M": Decimal("1e6"), "G": Decimal("1e9"),
    "T": Decimal("1e12"), "P": Decimal("1e15"), "E": Decimal("1e18"),
}
_QUANTITY = re.compile(r"([+-]?(?:\d+(?:\.\d*)?|\.\d+))(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?\d{1,3})?")


def parse_quantity(value: object) -> int:
    """The integer value of a quantity, rounded up like Kubernetes' ``Quantity.Value()``.

    Raises ValueError naming the input; negative quantities are rejected (every quantity
    in this config is a limit).
    """
    if isinstance(value, bool):
        raise ValueError(f"invalid quantity {value!r}: expected e.g. '100', '1k', '1Gi'")
    if isinstance(value, int):
        number = Decimal(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"invalid quantity {value!r}: must be finite")
        number = Decimal(repr(value))
    elif isinstance(value, str):
        m = _QUANTITY.fullmatch(value.strip())
        if m is None:
            raise ValueError(f"invalid quantity {value!r}: expected e.g. '100', '1k', '500M', '1Gi'")
        try:
            base = Decimal(m.group(1))
        except InvalidOperation:
            raise ValueError(f"invalid quantity {value!r}") from None
        suffix = m.group(2) or ""
        if suffix[:1] in ("e", "E"):
            number = base * (Decimal(10) ** int(suffix[1:]))
        else:
            number = base * _SUFFIX[suffix]
    else:
        raise ValueError(f"invalid quantity of type {type(value).__name__}: expected e.g. '100', '1k', '1Gi'")
    if number < 0:
        raise ValueError(f"invalid quantity {value!r}: must not be negative")
    if number > Decimal(2) ** 63 - 1:
        raise ValueError(f"invalid quantity {value!r}: too large")
    return int(number.to_integral_value(rounding="ROUND_CEILING"))
