"""Sample models that use every annotation the generators support, for tests of the generators.

They are not the protocol: they stand in for messages that later issues will add (tool calls with
JSON-schema objects and free-form arguments, nested lists, optional binaries), so the C# and
GDScript output for those annotations is compiled, linted and round-tripped before any real
message needs it. tests/unity/test_generated.py imports it too.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from bridge import gen_schema
from bridge.errors import CLIENT_ONLY, MEANINGS, ErrorCode

__all__ = ["EXAMPLES", "Answer", "Everything", "Tool", "sample_spec"]


class _Sample(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Tool(_Sample):
    """A function the model may call; a part with a `type` field of its own."""

    type: Literal["function"] = "function"
    name: Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[a-z_]+$")]
    parameters: dict[str, Any] = Field(default={}, description="a JSON schema object")


class Everything(_Sample):
    """A request with one field of every supported kind."""

    type: Literal["everything"] = "everything"
    id: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    text: str | None = None
    count: int = Field(default=3, ge=0, le=100)
    big: Annotated[int, Field(ge=0, le=2**40)] = 0
    ratio: float = Field(default=0.5, gt=0.0, lt=1.0)
    flag: bool | None = None
    blob: bytes | None = None
    mode: Literal["plain", "dash-mode"] = "plain"
    tool: Tool | None = None
    tools: list[Tool] = Field(default=[], max_length=8)
    matrix: list[list[int | None]] = []
    tags: dict[str, int] = {}
    named: dict[str, Tool] = {}
    blobs: list[bytes] = []
    arguments: dict[str, Any] = Field(default={}, description="free-form, as a model calls a tool")
    value: Any = None
    values: list[Any] = []
    modes: list[Literal["x", "y"]] = ["x"]
    scores: list[float | None] | None = None


class Answer(_Sample):
    """An event with a required part, a required list and an optional id."""

    type: Literal["answer"] = "answer"
    id: str | None = None
    tool: Tool
    calls: list[dict[str, Any]]
    seed: Annotated[int, Field(ge=0, le=2**63 - 1)]


EXAMPLES: dict[str, BaseModel] = {
    "everything_full": Everything(
        id="e-1", text="héllo ✓", count=7, big=2**39, ratio=0.25, flag=False, blob=b"\x00\x01",
        mode="dash-mode", tool=Tool(name="lookup", parameters={"type": "object", "required": ["q"]}),
        tools=[Tool(name="a"), Tool(name="b", parameters={"n": -5})], matrix=[[1, None], [], [2**31 - 1]],
        tags={"a": 1, "b": -2}, named={"first": Tool(name="c")}, blobs=[b"", b"\xff"],
        arguments={"q": "where", "limit": 3, "deep": {"list": [1, 2.5, None, True, "s"]}, "nothing": None},
        value=[1, "two", {"three": 3.0}], values=[None, 1, "x"], modes=["y", "x"], scores=[0.5, None]),
    "everything_defaults": Everything(id="e-2"),
    "answer": Answer(id="a-1", tool=Tool(name="lookup"), calls=[{"name": "lookup", "arguments": {}}],
                     seed=2**63 - 1),
    "answer_no_id": Answer(tool=Tool(name="x"), calls=[], seed=0),
}


def sample_spec() -> gen_schema.ProtocolSpec:
    return gen_schema.describe([Everything], [Answer], version=99,
                               meanings={c: MEANINGS[c] for c in ErrorCode}, client_only=CLIENT_ONLY)
