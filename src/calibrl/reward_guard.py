"""Reward functions that cannot take a run down, and never fail silently.

`GuardedReward(func)` wraps a TRL reward function (`f(completions, **kwargs) -> list[float | None]`):
- it raises            -> the batch is retried one sample at a time, so only the samples that raise score 0
- a value is NaN / inf -> that sample scores 0
- a value is None      -> kept: TRL reads None as "this function does not apply to this sample"
- it hangs             -> cut after `timeout_s`; the batch scores 0 (the stuck thread is a daemon and is left
                          behind: Python cannot kill a thread)
Every case is counted in a shared `RewardFaults`, which the trainer logs each step
(`calibrl/reward_errors`, `calibrl/reward_nonfinite`, `calibrl/reward_timeouts`, `calibrl/reward_none`)
and totals in the run summary, and the first fault of each kind is logged as a warning.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

logger = logging.getLogger(__name__)

FAULT_KINDS = ("errors", "nonfinite", "timeouts", "none")


@dataclass
class RewardFaults:
    """Thread-safe counters of reward faults since the last `take()`, plus totals for the whole run."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FAULT_KINDS, 0))
    totals: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FAULT_KINDS, 0))
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _warned: set = field(default_factory=set, repr=False)

    def add(self, kind: str, n: int = 1, detail: str = "") -> None:
        if n <= 0:
            return
        with self._lock:
            self.counts[kind] += n
            self.totals[kind] += n
            first = kind not in self._warned
            self._warned.add(kind)
        if first and kind != "none":
            logger.warning("reward fault (%s), the sample scores 0 and is counted: %s", kind, detail)

    def take(self) -> dict[str, int]:
        """Counts since the last call, and reset them."""
        with self._lock:
            out, self.counts = self.counts, dict.fromkeys(FAULT_KINDS, 0)
        return out


class _Timeout(Exception):
    pass


def _call_with_timeout(func: Callable, args: tuple, kwargs: dict, timeout_s: float | None):
    if timeout_s is None:
        return func(*args, **kwargs)
    box: dict[str, Any] = {}

    def target():
        try:
            box["value"] = func(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - handed back to the caller's thread
            box["error"] = e

    t = threading.Thread(target=target, daemon=True, name=f"reward-{getattr(func, '__name__', 'func')}")
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise _Timeout(f"no answer after {timeout_s:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


class GuardedReward:
    """A reward function wrapped so that one bad sample costs that sample, not the run. See module doc."""

    def __init__(self, func: Callable, timeout_s: float | None = 60.0, faults: RewardFaults | None = None):
        self.func = func
        self.timeout_s = timeout_s
        self.faults = faults if faults is not None else RewardFaults()
        self.__name__ = getattr(func, "__name__", type(func).__name__)
        self.__doc__ = getattr(func, "__doc__", None)

    def _clean(self, values: Any, n: int) -> list[float | None]:
        if not isinstance(values, (list, tuple)) or len(values) != n:
            got = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
            self.faults.add("errors", n, f"{self.__name__} returned {got} values for {n} completions")
            return [0.0] * n
        out: list[float | None] = []
        for v in values:
            if v is None:
                self.faults.add("none")
                out.append(None)
                continue
            try:
                f = float(v)
            except (TypeError, ValueError):
                self.faults.add("errors", 1, f"{self.__name__} returned {type(v).__name__}")
                out.append(0.0)
                continue
            if math.isfinite(f):
                out.append(f)
            else:
                self.faults.add("nonfinite", 1, f"{self.__name__} returned {f}")
                out.append(0.0)
        return out

    def __call__(self, completions: list, **kwargs: Any) -> list[float | None]:
        n = len(completions)
        try:
            return self._clean(_call_with_timeout(self.func, (completions,), kwargs, self.timeout_s), n)
        except _Timeout as e:
            self.faults.add("timeouts", n, f"{self.__name__}: {e}")
            return [0.0] * n
        except Exception as e:  # noqa: BLE001 - isolate the samples that raise
            batch_error = e
        out: list[float | None] = []
        for i in range(n):
            one = {k: ([v[i]] if isinstance(v, list) and len(v) == n else v) for k, v in kwargs.items()}
            try:
                out += self._clean(_call_with_timeout(self.func, ([completions[i]],), one, self.timeout_s), 1)
            except _Timeout as e:
                self.faults.add("timeouts", 1, f"{self.__name__}: {e}")
                out.append(0.0)
            except Exception as e:  # noqa: BLE001
                self.faults.add("errors", 1, f"{self.__name__} raised {type(e).__name__}: {e} "
                                              f"(batch: {type(batch_error).__name__})")
                out.append(0.0)
        return out
