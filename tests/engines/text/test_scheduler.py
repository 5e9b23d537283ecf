"""The text scheduler on its own, without a model: priorities, budgets, KV blocks and the prefix
cache, preemption, cancellation. Steps are simulated: every sampled sequence gets a token."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

from support import ROOT

from daemon.engines.text.blocks import BlockPool, block_key, mix_key
from daemon.engines.text.request import SamplingParams, TextRequest
from daemon.engines.text.scheduler import Scheduler, Sequence


class FakeSlots:
    """Every adapter fits; nothing to load."""

    def resident(self) -> dict[str, int]:
        return {}

    def acquire(self, versions: list) -> list[int]:
        return list(range(len(versions)))

    def release(self, versions: list) -> None: ...


@dataclass(frozen=True)
class FakeVersion:
    name: str
    number: int = 1

    @property
    def key(self) -> str:
        return f"{self.name}@{self.number}"


def request(key: str, prompt: int = 20, *, priority: str = "normal", tokens: int = 4, arrival: float = 0.0,
            adapters: list | None = None, first: int = 1) -> TextRequest:
    return TextRequest(key=key, prompt_ids=list(range(first, first + prompt)), priority=priority, arrival=arrival,
                       sampling=SamplingParams(max_tokens=tokens), adapters=adapters or [])


def scheduler(*, blocks: int = 64, max_seqs: int = 4, step_tokens: int = 64, chunk: int = 16,
              cache: bool = True, priorities: bool = True, max_chunks: int | None = None) -> Scheduler:
    return Scheduler(max_seqs=max_seqs, slots=FakeSlots(), pool=BlockPool(blocks, 4, prefix_cache=cache),
                     max_step_tokens=step_tokens, prefill_chunk=chunk, priorities=priorities, max_chunks=max_chunks)


def step(s: Scheduler) -> tuple[list[Sequence], list[Sequence]]:
    """Schedule and commit one step; sampled sequences get a token, finished ones end. (started, ended)"""
    started, plan = s.schedule()
    ended = []
    if plan is None:
        return started, ended
    s.commit(plan)
    for seq in plan.sample:
        seq.tokens.append(100 + len(seq.tokens))
        if len(seq.tokens) >= seq.request.sampling.max_tokens:
            s.finish(seq)
            ended.append(seq)
    return started, ended


def run(s: Scheduler, limit: int = 500) -> list[str]:
    """Steps until idle; the keys in the order they finished."""
    order = []
    for _ in range(limit):
        if not s.has_work():
            return order
        order += [seq.key for seq in step(s)[1]]
    raise AssertionError("the scheduler did not drain")


def test_it_needs_no_torch() -> None:
    code = "import sys, daemon.engines.text.scheduler; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.stdout.strip() == "False", r.stderr


def test_tokens_at_is_the_context_token_by_token() -> None:
    seq = Sequence(request("s", prompt=7, first=40))
    seq.tokens = [1, 2, 3, 4]
    for start in range(11):
        for end in range(start, 12):
            assert seq.tokens_at(start, end) == [seq.token(p) for p in range(start, min(end, 11))], (start, end)


def test_admission_goes_by_priority_then_arrival() -> None:
    s = scheduler(max_seqs=2)
    for key, prio, t in [("bg", "background", 0.0), ("n1", "normal", 1.0), ("p", "player", 2.0), ("n2", "normal", 3.0)]:
        s.enqueue(request(key, priority=prio, arrival=t))
    started, _ = s.schedule()
    assert [q.key for q in started] == ["p", "n1"]
    assert [q.key for q in s.waiting] == ["n2", "bg"]


def test_without_priorities_arrival_alone_decides() -> None:
    s = scheduler(max_seqs=2, priorities=False)
    for key, prio, t in [("bg", "background", 0.0), ("p", "player", 1.0), ("n", "normal", 2.0)]:
        s.enqueue(request(key, priority=prio, arrival=t))
    assert [q.key for q in s.schedule()[0]] == ["bg", "p"]


def test_a_step_plans_every_decode_and_prompt_chunks_within_the_budget() -> None:
    """Decode tokens first, then chunks by priority: never more than max_step_tokens in one step."""
    s = scheduler(max_seqs=6, step_tokens=24, chunk=16)
    for i in range(3):
        s.enqueue(request(f"d{i}", prompt=3, tokens=50, arrival=i))
    step(s)  # the three short prompts in one step
    s.enqueue(request("long", prompt=100, arrival=10))
    s.enqueue(request("player", prompt=100, priority="player", arrival=11))
    for _ in range(6):
        _, plan = s.schedule()
        assert plan is not None
        assert len(plan.decode) == 3 and sum(c.length for c in plan.chunks) + len(plan.decode) <= 24
        assert all(c.length <= 16 for c in plan.chunks)
        if plan.chunks:
            assert plan.chunks[0].seq.key == "player" or not any(c.seq.key == "player" for c in plan.chunks)
        s.commit(plan)
        for seq in plan.sample:
            seq.tokens.append(1)


def test_a_step_time_budget_bounds_prompt_tokens_and_not_the_decode_rows() -> None:
    """`prompt_tokens` (a GPU budget's step-time bound) limits the step's prompt tokens only: with
    more decode rows than that bound, a prompt still gets its tokens (it once got 1 a step, and a
    player waited 3 s for a 256-token prompt at 120 Hz frame sync)."""
    s = scheduler(max_seqs=40, blocks=256, step_tokens=512, chunk=256)
    for i in range(32):
        s.enqueue(request(f"d{i}", prompt=2, tokens=100, arrival=i))
    step(s)
    s.enqueue(request("player", prompt=256, priority="player", tokens=4, arrival=100))
    _, plan = s.schedule(prompt_tokens=48)
    assert plan is not None and len(plan.decode) == 32
    assert [(c.seq.key, c.length) for c in plan.chunks] == [("player", 48)]
    s.commit(plan)
    _, plan = s.schedule(prompt_tokens=1000)  # the configured max_step_tokens still holds
    assert plan is not None and sum(c.length for c in plan.chunks) == min(256 - 48, 512 - 32)


def test_a_crowd_of_new_prompts_is_spread_over_steps_of_at_most_max_chunks() -> None:
    """Many prompts at once (a crowd starting new lines): each step carries at most `max_chunks`
    of them (what one CUDA graph takes), by priority then arrival, and every one still finishes."""
    s = scheduler(max_seqs=12, blocks=256, step_tokens=512, chunk=16, max_chunks=4)
    for i in range(10):
        s.enqueue(request(f"npc{i}", prompt=8, tokens=2, arrival=i))
    s.enqueue(request("player", prompt=8, tokens=2, priority="player", arrival=20))
    _, plan = s.schedule()
    assert plan is not None and [c.seq.key for c in plan.chunks] == ["player", "npc0", "npc1", "npc2"]
    s.commit(plan)
    for seq in plan.sample:
        seq.tokens.append(1)
    _, plan = s.schedule()
    assert plan is not None and [c.seq.key for c in plan.chunks] == ["npc3", "npc4", "npc5", "npc6"]
    assert len(plan.decode) == 4
    s.commit(plan)
    for seq in plan.sample:
        seq.tokens.append(1)
    assert sorted(run(s)) == sorted([f"npc{i}" for i in range(10)] + ["player"])


def test_a_player_line_pauses_background_chatter_which_resumes_from_the_cache() -> None:
    """Full: a player request pauses the latest background sequence; that one keeps its tokens,
    comes back after, reuses its cached blocks and finishes with all its tokens."""
    s = scheduler(max_seqs=2, blocks=64)
    s.enqueue(request("bg1", prompt=12, priority="background", tokens=20, arrival=0.0))
    s.enqueue(request("bg2", prompt=12, priority="background", tokens=20, arrival=1.0, first=50))
    for _ in range(6):
        step(s)
    bg2 = next(q for q in s.running if q.key == "bg2")
    made = list(bg2.tokens)
    s.enqueue(request("player", prompt=8, priority="player", tokens=3, arrival=2.0, first=200))
    started, _ = s.schedule()
    assert [q.key for q in started] == ["player"] and bg2 not in s.running and bg2.preemptions == 1
    assert bg2.tokens == made and s.preempted == 1
    order = run(s)
    assert order[0] == "player" and set(order) == {"player", "bg1", "bg2"}
    assert bg2.tokens[:len(made)] == made and len(bg2.tokens) == 20
    assert s.pool.stats.hits >= 12  # it came back on its cached blocks


def test_when_blocks_run_out_the_lowest_priority_pauses_and_everything_still_finishes() -> None:
    s = scheduler(max_seqs=4, blocks=14, chunk=8)  # 13 usable blocks of 4 positions
    for i, prio in enumerate(["background", "normal", "player", "normal"]):
        s.enqueue(request(f"r{i}", prompt=10, priority=prio, tokens=12, arrival=i, first=10 * i + 1))
    order = run(s)
    assert sorted(order) == ["r0", "r1", "r2", "r3"] and s.preempted > 0
    assert s.pool.in_use == 0


def test_the_prefix_cache_keys_tokens_with_the_exact_adapter_versions_and_scales() -> None:
    """Same prompt and mix: the second starts after the first's full blocks. Another version of the
    adapter, another scale, or the base model: no reuse. Turned off: never."""
    def cached(s: Scheduler, adapters: list, key: str) -> int:
        s.enqueue(request(key, prompt=17, adapters=adapters, tokens=2))
        started, _ = s.schedule()
        seq = started[0]
        run(s)
        return seq.cached_tokens

    v1, v2 = FakeVersion("pirate", 1), FakeVersion("pirate", 2)
    s = scheduler()
    assert cached(s, [(v1, 1.0)], "a") == 0
    assert cached(s, [(v1, 1.0)], "b") == 16  # 4 full blocks of the 17-token prompt
    assert cached(s, [(v2, 1.0)], "c") == 0
    assert cached(s, [(v1, 0.5)], "d") == 0
    assert cached(s, [], "e") == 0
    assert cached(s, [(v1, 1.0), (FakeVersion("elf"), 0.0)], "f") == 16  # a zero scale is no adapter
    off = scheduler(cache=False)
    assert cached(off, [], "g") == 0 and cached(off, [], "h") == 0
    assert mix_key([("a@1", 1.0), ("b@2", 0.5)]) == mix_key([("b@2", 0.5), ("a@1", 1.0)])
    assert block_key(b"", b"", [1, 2]) != block_key(b"", b"x", [1, 2])


def test_cancel_waiting_paused_and_running() -> None:
    s = scheduler(max_seqs=1)
    s.enqueue(request("run", priority="background", tokens=50))
    s.enqueue(request("wait", priority="background", arrival=1.0))
    s.schedule()
    cancelled = s.cancel("wait")
    assert cancelled is not None and cancelled.key == "wait" and s.waiting == []
    s.enqueue(request("player", priority="player", arrival=2.0))
    s.schedule()  # "run" is paused for the player
    paused = s.cancel("run")
    assert paused is not None and paused.preemptions == 1
    assert s.cancel("player") is None and [q.key for q in s.take_cancelled()] == ["player"]


def test_steps_planned_with_a_token_in_flight() -> None:
    """Overlapped steps (the engine plans step N+1 before step N's tokens are known): a sequence
    whose input token is in flight decodes at its next position; one whose in-flight token is its
    last (`ends_in_flight`) is not planned again; one paused with a token in flight, then ended by
    that token, leaves the queue holding nothing."""
    s = scheduler(max_seqs=2, blocks=64)
    for i, key in enumerate(("a", "b")):
        s.enqueue(request(key, prompt=8, tokens=6, arrival=float(i)))
    _, plan = s.schedule()
    assert plan is not None and len(plan.sample) == 2
    s.commit(plan)  # launched; the tokens are still on the device
    _, plan = s.schedule()
    assert plan is not None and [q.fed for q in plan.decode] == [8, 8]  # fed == context: the input is in flight
    assert all(q.fed == q.context_len for q in plan.decode)
    a, b = plan.decode
    s.commit(plan)
    for q in (a, b):
        q.tokens.append(1)  # the first step's tokens land
    a.ends_in_flight = True  # the second step's token is a's last
    _, plan = s.schedule()
    assert plan is not None and plan.decode == [b]
    s.commit(plan)
    b.tokens.append(2)
    # A player's line pauses b, the latest (its token in flight); that token then ends b while it waits.
    s.enqueue(request("player", prompt=8, tokens=2, priority="player", arrival=2.0))
    started, _ = s.schedule()
    assert [q.key for q in started] == ["player"] and b in s.waiting and b.table == []
    in_use = s.pool.in_use
    s.finish(b)
    assert b.finished and b not in s.waiting and b not in s.running and s.pool.in_use == in_use
    s.finish(a)  # its last token lands
    assert run(s) == ["player"] and not s.has_work()
