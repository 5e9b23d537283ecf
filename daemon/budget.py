"""The GPU budget a game sets: how much of the GPU's time the daemon's engines may take.

A game and the daemon share one GPU. Three limits, each off unless set (settings or a client's
`set_budget`; a client's budget ends with its connection):

- **duty cap** c: the engines' steps may occupy at most a fraction c of wall time. Credit accrues
  at c seconds per second (up to a small burst) and every step spends its duration; a step waits
  while the credit is negative. Over any few seconds busy time <= c x wall + burst.
- **tokens per second** per priority class (player, normal, background): a token bucket per class;
  while a class's bucket is empty its sequences sit out decode steps (they keep their place and
  their cache; their streams just slow down).
- **frame sync**: the game reports each frame's start (`frame`, a few bytes) and how much of the
  frame its own GPU work takes; steps run only in the rest of the frame, and only if the step,
  as predicted from recent steps, ends before the frame's end minus a margin (plus the overlap
  the game allows: how far a step may run into its next frame). Without frame
  reports for 4 periods the mode pauses itself (the duty cap, if any, still holds). The game's part
  is `FrameSync.game_ms`, or, once frames carry the game's measured GPU time of its last frame
  (`frame(game_ms)`, as the plugins send where the engine measures it), the 90th percentile of the
  last 32 such reports: a scene that renders more takes more of the frame, one that renders less
  leaves the daemon more. The overlap backs off the same way: a report of a frame that (nearly)
  missed (its measured time past the period less the margin) halves the overlap in use, and each
  frame within it gives back a sixteenth of the setting: a game whose frames get heavy, or a GPU
  that gets slower, takes its next frames back from the daemon first.

While any limit is set, a step's predicted time is bounded (`step_ms_limit`): the engine shrinks
its prompt chunks to fit the free part of a frame, or `max_step_ms`. Thread-safe; the clock is
`time.monotonic` (the frame reports are stamped on arrival).

Engines use it as:

    wait = budget.delay(predicted_ms)   # seconds to wait before the next step (0: go)
    held = budget.held_classes()        # priority classes that sit out this step
    ... run the step ...
    budget.record(seconds, tokens_by_class)
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

__all__ = ["BudgetSpec", "FrameSync", "GpuBudget", "StepTimer"]

CLASSES = ("player", "normal", "background")
_BURST_S = 0.02  # credit a duty cap may save up: one frame's worth at 60 Hz, two steps of a 1B model
_CATCH_UP_S = 0.1  # credit a waiting engine may carry past its wake-up time (then it runs steps back to back)
_STALE_PERIODS = 4
_REPORTS = 32  # frames' measured game times the game's part is taken from
_MIN_REPORTS = 4  # ... once this many have come
_OVERLAP_BACK = 1 / 16  # of the overlap setting a frame within its time gives back after a back-off


@dataclass(frozen=True)
class FrameSync:
    period_ms: float  # the frame time (16.7 at 60 Hz)
    game_ms: float  # how much of each frame the game's own GPU work takes, from the frame's start
    margin_ms: float = 0.5  # kept free before the next frame
    # How far past that a step may run into the next frame: the game's next frame then shares the
    # GPU with the step's end for up to this long (a little slower, not late, while its frame time
    # is well under the period). 0: never.
    overlap_ms: float = 0.0


@dataclass(frozen=True)
class BudgetSpec:
    duty_cap: float | None = None  # 0 < c <= 1
    tokens_per_s: Mapping[str, float] = field(default_factory=dict)  # class -> tokens per second
    frame_sync: FrameSync | None = None
    max_step_ms: float | None = None  # a bound on one step while any limit is set (None: only frame sync bounds)

    @property
    def active(self) -> bool:
        return self.duty_cap is not None or bool(self.tokens_per_s) or self.frame_sync is not None


class GpuBudget:
    def __init__(self, spec: BudgetSpec | None = None, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._spec = BudgetSpec()
        self._credit = 0.0
        self._credit_at = clock()
        self._buckets: dict[str, float] = {}
        self._bucket_at = clock()
        self._frame_at: float | None = None  # the last frame start reported
        self._game_reports: deque[float] = deque(maxlen=_REPORTS)  # the game's measured ms of recent frames
        self._overlap_scale = 1.0  # of `FrameSync.overlap_ms` in use: halved by a late frame, then regained
        self.owner: int | None = None  # the connection whose set_budget is in force (None: settings)
        self.busy_s = 0.0  # step time recorded
        self.waited_s = 0.0  # time steps were held back
        self.frames = 0
        self.base = spec or BudgetSpec()
        self.set(self.base)

    @property
    def spec(self) -> BudgetSpec:
        return self._spec

    def set(self, spec: BudgetSpec, owner: int | None = None) -> None:
        with self._lock:
            self._spec = spec
            self.owner = owner
            now = self._clock()
            self._credit, self._credit_at = (spec.duty_cap or 1.0) * _BURST_S, now
            self._buckets = {c: self._capacity(r) for c, r in spec.tokens_per_s.items()}
            self._bucket_at = now
            if spec.frame_sync is None:
                self._frame_at = None
            self._game_reports.clear()
            self._overlap_scale = 1.0

    def release(self, owner: int) -> bool:
        """The connection that set the budget is gone: back to the settings' budget."""
        if self.owner != owner:
            return False
        self.set(self.base)
        return True

    def frame(self, game_ms: float | None = None) -> None:
        """A frame started now (the game's report), with its last frame's measured GPU time, if any."""
        with self._lock:
            self._frame_at = self._clock()
            self.frames += 1
            if game_ms is not None:
                self._game_reports.append(game_ms)
                sync = self._spec.frame_sync
                if sync is not None and sync.overlap_ms > 0:
                    if game_ms > sync.period_ms - sync.margin_ms:  # late, or nearly: the overlap gives way first
                        self._overlap_scale *= 0.5
                    else:
                        self._overlap_scale = min(1.0, self._overlap_scale + _OVERLAP_BACK)

    def overlap_ms(self) -> float | None:
        """How far a step may run into the next frame now (None without frame sync)."""
        with self._lock:
            sync = self._spec.frame_sync
            return None if sync is None else self._overlap(sync) * 1000

    def game_ms(self) -> float | None:
        """The game's part of a frame as frame sync uses it now: from its reports once there are
        enough, else the spec's `game_ms` (None without frame sync)."""
        with self._lock:
            sync = self._spec.frame_sync
            return None if sync is None else self._game_part(sync) * 1000

    # ------------------------------------------------------------------ used by engines

    def delay(self, predicted_ms: float = 0.0) -> float:
        """Seconds to wait before a step predicted to take `predicted_ms` (0: run it now)."""
        with self._lock:
            spec = self._spec
            if not spec.active:
                return 0.0
            now = self._clock()
            wait = 0.0
            if spec.duty_cap is not None:
                self._accrue(now)
                if self._credit < 0:
                    wait = -self._credit / spec.duty_cap
            sync = spec.frame_sync
            if sync is not None and self._frame_at is not None:
                wait += self._frame_wait(now + wait, sync, predicted_ms / 1000)
            return wait

    def held_classes(self) -> frozenset[str]:
        """Priority classes whose token bucket is empty now."""
        with self._lock:
            if not self._spec.tokens_per_s:
                return frozenset()
            self._refill(self._clock())
            return frozenset(c for c, v in self._buckets.items() if v < 1.0)

    def step_ms_limit(self) -> float | None:
        """The longest step worth planning now: the free part of a frame, or `max_step_ms`."""
        spec = self._spec
        if not spec.active:
            return None
        limits = [spec.max_step_ms] if spec.max_step_ms is not None else []
        sync = spec.frame_sync
        if sync is not None and self._frame_at is not None:
            limits.append(max(sync.period_ms - self._game_part(sync) * 1000 - sync.margin_ms
                              + self._overlap(sync) * 1000, 0.1))
        return min(limits) if limits else None

    def record(self, seconds: float, tokens: Mapping[str, int] | None = None, *, waited: float = 0.0) -> None:
        """A step took `seconds` and produced `tokens` per priority class."""
        with self._lock:
            self.busy_s += seconds
            self.waited_s += waited
            cap = self._spec.duty_cap
            if cap is not None:
                now = self._clock()
                if waited > 0:
                    # The engine waited for this credit: a late wake-up (a busy CPU, a coarse timer) must not
                    # lose what accrued meanwhile, as idle time would; at most _CATCH_UP_S of it, though.
                    self._accrue(now, limit_s=_CATCH_UP_S)
                # Credit saved up while idle is capped at the burst; what accrues during the step itself is
                # not (capping it would take more than the step back from a step longer than the burst).
                self._accrue(max(now - seconds, self._credit_at))
                self._credit += (now - self._credit_at) * cap - seconds
                self._credit_at = now
            if tokens and self._buckets:
                self._refill(self._clock())
                for c, n in tokens.items():
                    if c in self._buckets:
                        self._buckets[c] -= n

    def describe(self) -> dict[str, object]:
        spec = self._spec
        game = self.game_ms()  # the game's part of a frame in use (its reports', or the spec's)
        overlap = self.overlap_ms()
        return {"active": spec.active, "duty_cap": spec.duty_cap, "tokens_per_s": dict(spec.tokens_per_s),
                "frame_sync": None if spec.frame_sync is None else vars(spec.frame_sync).copy(),
                "max_step_ms": spec.max_step_ms, "set_by_client": self.owner is not None,
                "game_ms_in_use": None if game is None else round(game, 3),
                "overlap_ms_in_use": None if overlap is None else round(overlap, 3),
                "busy_s": round(self.busy_s, 3), "held_back_s": round(self.waited_s, 3), "frames": self.frames}

    # ------------------------------------------------------------------ internals (under the lock)

    def _accrue(self, now: float, limit_s: float = _BURST_S) -> None:
        """Credit for the time since the last accrual, up to `limit_s` worth of it; what an engine
        already holds above that (after waiting for it) it keeps, unless it then sat idle."""
        cap = self._spec.duty_cap or 1.0
        held = self._credit if now - self._credit_at <= _CATCH_UP_S else 0.0
        self._credit = min(self._credit + (now - self._credit_at) * cap, max(held, cap * limit_s))
        self._credit_at = now

    def _capacity(self, rate: float) -> float:
        return max(1.0, rate * 0.25)  # a quarter second's tokens at most

    def _refill(self, now: float) -> None:
        dt = now - self._bucket_at
        self._bucket_at = now
        for c, rate in self._spec.tokens_per_s.items():
            self._buckets[c] = min(self._buckets.get(c, 0.0) + dt * rate, self._capacity(rate))

    def _game_part(self, sync: FrameSync) -> float:
        """Seconds of each frame the game's own work takes: its reports' 90th percentile, or the spec's."""
        reports = self._game_reports
        if len(reports) < _MIN_REPORTS:
            return sync.game_ms / 1000
        ordered = sorted(reports)
        return ordered[int(0.9 * (len(ordered) - 1))] / 1000

    def _overlap(self, sync: FrameSync) -> float:
        """Seconds a step may run into the next frame now (the setting, backed off after late frames)."""
        return sync.overlap_ms * self._overlap_scale / 1000

    def _frame_wait(self, at: float, sync: FrameSync, step_s: float) -> float:
        """Seconds after `at` until a step of `step_s` fits the free part of a frame."""
        assert self._frame_at is not None
        period, game = sync.period_ms / 1000, self._game_part(sync)
        margin = sync.margin_ms / 1000 - self._overlap(sync)
        since = at - self._frame_at
        if since > _STALE_PERIODS * period:  # the game stopped reporting: do not wait for frames
            return 0.0
        phase = since % period
        start, end = game, period - margin
        if step_s > end - start:  # longer than any free part: start it right where one starts
            end = start + 0.001
            step_s = 0.0
        if start <= phase and phase + step_s <= end:
            return 0.0
        # The next window: the free part of this frame if it has not begun yet, else the next frame's.
        return start - phase if phase < start else period - phase + start


class StepTimer:
    """Predicts a step's time from recent steps: a decode part (an EWMA of steps without prompt
    tokens), plus, for a step that carries n prompt tokens, a fixed part and a per-token part fitted
    over the last `window` such steps (least squares). On a GPU the fixed part is large: a step
    with any prompt chunk runs another graph or eager path, and 16 tokens cost nearly what 64 do; a
    per-token rate alone would read that overhead as a cost per token and shrink chunks to nothing."""

    def __init__(self, alpha: float = 0.2, window: int = 32) -> None:
        self.alpha = alpha
        self.decode_ms = 0.0
        self.fixed_ms = 0.0  # what carrying any prompt chunk adds
        self.per_token_ms = 0.0
        self._seen = False
        self._chunk_steps: deque[tuple[int, float]] = deque(maxlen=window)  # (prompt tokens, ms over decode)

    def predict(self, chunk_tokens: int) -> float:
        if chunk_tokens == 0:
            return self.decode_ms
        return self.decode_ms + self.fixed_ms + self.per_token_ms * chunk_tokens

    def tokens_for(self, limit_ms: float, floor: int = 16) -> int:
        """Prompt tokens a step may carry to stay within `limit_ms` (at least `floor`)."""
        if self.per_token_ms <= 0:
            return floor
        return max(floor, int((limit_ms - self.decode_ms - self.fixed_ms) / self.per_token_ms))

    def observe(self, ms: float, chunk_tokens: int) -> None:
        if not self._seen:
            self.decode_ms, self._seen = ms, True
        if chunk_tokens == 0:
            self.decode_ms += self.alpha * (ms - self.decode_ms)
            return
        self._chunk_steps.append((chunk_tokens, max(ms - self.decode_ms, 0.0)))
        self._fit()

    def _fit(self) -> None:
        points = self._chunk_steps
        count = len(points)
        mean_n = sum(n for n, _ in points) / count
        mean_e = sum(e for _, e in points) / count
        var_n = sum((n - mean_n) ** 2 for n, _ in points)
        slope = sum((n - mean_n) * (e - mean_e) for n, e in points) / var_n if var_n > 0 else -1.0
        if slope > 0 and mean_e - slope * mean_n >= 0:
            self.per_token_ms, self.fixed_ms = slope, mean_e - slope * mean_n
        else:  # one chunk size only (or noise): the extra time as a cost per token, as if nothing were fixed
            self.per_token_ms, self.fixed_ms = mean_e / mean_n, 0.0
