"""How a planned step runs and what its tokens become (`TextEngine` inherits it; the engine owns
the scheduler, the runner and the outputs it uses).

A step runs one at a time (`_run_isolated`): launched, its tokens taken, accepted. Or, a GPU's
default (`overlap_steps`), launched before the last one's tokens reach the host
(`_run_overlapped`): the host plans and launches step N+1 while the device runs step N, then
takes step N's tokens; decode rows read their input tokens on the device. A sequence that a
token ends (EOS, a stop string) has then run one more row, whose token is dropped; one at its last
token by length or context is not planned again (`Sequence.ends_in_flight`). A step that fails at
its launch is retried in halves, so a failure one sequence brings ends that sequence alone; one
that fails on the device after its launch ends the sequences it carried. A token's text, stop
strings and chunk event are made while the device runs the next forward (`defer_text`,
`_catch_up`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ...budget import GpuBudget
from ..base import EngineError, EngineErrorCode
from .output import SequenceOutput
from .request import TextChunkEvent, TextRequest
from .runner import Launched, ModelRunner
from .scheduler import Scheduler, StepPlan
from .scheduler import Sequence as Seq

__all__ = ["StepRunning"]

log = logging.getLogger("loraloom.text")


class StepRunning:
    """The step-running half of `TextEngine` (see the module's docstring)."""

    scheduler: Scheduler
    runner: ModelRunner
    budget: GpuBudget | None
    max_context: int
    overlap_steps: bool
    defer_text: bool
    failed_steps: int
    overlapped_steps: int
    late_stops: int
    grammar_late_stops: int
    _in_flight: Launched | None
    _outputs: dict[int, SequenceOutput]
    _behind: list[SequenceOutput]

    if TYPE_CHECKING:
        def _emit(self, req: TextRequest, event: Any) -> None: ...

    def _may_overlap(self) -> bool:
        """Whether this step may be planned and launched before the last one's tokens reach the host
        (`overlap_steps`): not where a running row needs its last token on the host before its next
        forward (a grammar's mask), nor under an active GPU budget (its step times and frame windows
        count one step at a time). A repetition penalty's history takes that token on the device."""
        if not self.overlap_steps or (self.budget is not None and self.budget.spec.active):
            return False
        return not any(s.grammar is not None for s in self.scheduler.running)

    def _run_overlapped(self, plan: StepPlan) -> None:
        """Launch the step; then take the tokens of the one before it (the device runs this one
        meanwhile) and commit this one. Its own tokens land at the next step."""
        try:
            launched = self.runner.launch(plan, self._catch_up)
        except Exception:
            if self._in_flight is not None:  # the retries run one step at a time
                self._land_now()
            self._run_isolated(plan)
            return
        previous, self._in_flight = self._in_flight, launched
        self.overlapped_steps += previous is not None
        for seq, last in zip(plan.sample, self._ends_at(plan), strict=True):
            seq.ends_in_flight = last
        if previous is not None:
            self._land(previous)
        self.scheduler.commit(plan)

    def _ends_at(self, plan: StepPlan) -> list[bool]:
        """For each sequence `plan` samples: whether that token is its last by length (`output`)."""
        return [n + 1 >= s.request.sampling.max_tokens or s.prompt_len + n + 1 >= self.max_context
                for s, n in zip(plan.sample, plan.generated_before(), strict=True)]

    def _land_now(self) -> None:
        """Land the step in flight with no launch between: the text its predecessor's tokens wait
        for first, as a launch would have made it (the same events)."""
        assert self._in_flight is not None
        self._catch_up()
        self._land(self._in_flight)

    def _land(self, launched: Launched) -> None:
        """Take an overlapped step's tokens (waiting for the device) and accept them."""
        if launched is self._in_flight:
            self._in_flight = None
        try:
            tokens = launched.tokens()
        except Exception as exc:  # the device failed the step after its launch: nothing of it is known
            self.failed_steps += 1
            log.error("a step of %d sequences failed on the device", len(launched.plan.sequences), exc_info=True)
            for seq in launched.plan.sequences:
                if not seq.finished and seq.serial in self._outputs:
                    self._fail(seq, exc)
            return
        self._accept_all(launched.sample, tokens, set())

    def _run_isolated(self, plan: StepPlan) -> None:
        """Run a step; if it fails, run halves of it, so a failure that one sequence brings ends that
        sequence alone (with FAILED) and the others' step still happens."""
        try:
            tokens = self.runner.run(plan, self._catch_up)
        except Exception as exc:
            self.failed_steps += 1
            seqs = [s for s in plan.sequences if not s.finished]  # `_catch_up` may have ended some
            if not seqs:
                return
            if len(seqs) == 1:
                log.error("a step failed for request %r alone; ending it", seqs[0].key, exc_info=True)
                self._fail(seqs[0], exc)
                return
            log.warning("a step of %d sequences failed (%s: %s); retrying them in halves", len(seqs),
                        type(exc).__name__, exc)
            half = len(seqs) // 2
            for part in (seqs[:half], seqs[half:]):
                self._run_isolated(plan.only(part))
            return
        self.scheduler.commit(plan)
        self._accept_all(plan.sample, tokens, {s.serial for s in self.runner.grammar_done})

    def _fail(self, seq: Seq, exc: Exception) -> None:
        self._end(seq, EngineError(seq.key, EngineErrorCode.FAILED,
                                   f"the engine failed on this request: {type(exc).__name__}: {exc}"))

    def _accept_all(self, seqs: list[Seq], tokens: list[int], complete: set[int]) -> None:
        now = time.perf_counter()
        for seq, token in zip(seqs, tokens, strict=True):
            if seq.finished:  # ended after its step was launched (a stop string in the text of a token
                continue      # before, `_catch_up`; or its token before, overlapped): this one is dropped
            if seq.serial in complete:  # its grammar ended with its previous token (`output`): this one is dropped
                self.grammar_late_stops += 1
                self._end(seq, "stop")
            else:
                self._accept(seq, token, now)

    def _accept(self, seq: Seq, token: int, now: float) -> None:
        output = self._outputs[seq.serial]
        self._outcome(seq, lambda: output.on_token(token, now, defer_text=self.defer_text))
        if output.behind and not seq.finished:
            self._behind.append(output)

    def _catch_up(self) -> None:
        """The text, stop strings and chunks of the tokens `_accept` deferred (once a step, while
        the device runs the next forward)."""
        behind, self._behind = self._behind, []
        for output in behind:
            seq = output.seq
            if seq.serial in self._outputs and output.behind:
                self.late_stops += self._outcome(seq, output.catch_up) == "stop"

    def _outcome(self, seq: Seq, take: Callable[[], tuple[TextChunkEvent | None, str | None]]) -> str | None:
        """Emit what `take` gives (a chunk, or the end of the sequence); the finish reason, if any."""
        try:
            chunk, reason = take()
        except Exception as exc:  # e.g. a tokenizer that cannot decode this token
            log.exception("turning a token into text failed for request %r", seq.key)
            self._end(seq, EngineError(seq.key, EngineErrorCode.FAILED, f"decoding the output failed: {exc}"))
            return None
        if reason:
            self._end(seq, reason)
        elif chunk is not None:
            self._emit(seq.request, chunk)
        return reason

    def _end(self, seq: Seq, outcome: str | EngineError) -> None:
        """Finish a sequence with a reason (stop, length, cancelled) or an error."""
        if seq in self.scheduler.running or seq in self.scheduler.waiting:
            self.scheduler.finish(seq)
        self.runner.forget(seq)
        output = self._outputs.pop(seq.serial)
        events = [outcome] if isinstance(outcome, EngineError) else output.final_events(outcome, time.perf_counter())
        for event in events:
            self._emit(seq.request, event)
