"""Values a user types for a run's size and time: ``--target params=0.3`` and ``--budget 30m``,
parsed once here for the recipe schema and the stages that use them."""
from __future__ import annotations

import re
from dataclasses import dataclass

from dfkd_deploy.core.errors import UsageError

METRICS = ("params", "macs", "latency")


@dataclass(frozen=True)
class Target:
    metric: str        # params | macs | latency
    fraction: float    # of the teacher's

    def __str__(self) -> str:
        return f"{self.metric}={self.fraction:g}"


def parse_target(text: str) -> Target:
    """``"params=0.3"`` -> Target("params", 0.3); one clear line on anything else."""
    metric, sep, value = str(text).partition("=")
    metric = metric.strip().lower()
    if not sep or metric not in METRICS:
        raise UsageError(f"target {text!r}: expected METRIC=FRACTION with METRIC one of {', '.join(METRICS)}, "
                         "e.g. params=0.3")
    try:
        fraction = float(value)
    except ValueError:
        raise UsageError(f"target {text!r}: {value!r} is not a number") from None
    if not 0 < fraction < 1:
        raise UsageError(f"target {text!r}: the fraction of the teacher's {metric} must be between 0 and 1")
    return Target(metric, fraction)


_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600}


def parse_duration(text) -> float:
    """``"30m"``, ``"1h"``, ``"90s"``, ``"1h30m"`` or a number of seconds -> seconds (> 0)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        s = str(text).strip().lower().replace(" ", "")
        parts = re.findall(r"(\d+(?:\.\d+)?)([a-z]*)", s)
        if not parts or "".join(n + u for n, u in parts) != s or any(u not in _UNITS and u for _, u in parts):
            raise UsageError(f"budget {text!r}: expected a duration such as 30m, 1h, 90s or 1h30m")
        seconds = sum(float(n) * _UNITS[u or "s"] for n, u in parts)
    if not seconds > 0:
        raise UsageError(f"budget {text!r}: must be more than 0 seconds")
    return seconds
