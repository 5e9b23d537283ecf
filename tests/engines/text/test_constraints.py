"""Constrained output in the engine: JSON schemas, regexes, choices and Lark grammars in one batch
with unconstrained rows, adapters and mixes; every output valid; the free rows untouched."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import jsonschema
import pytest
import torch
from tiny import write_text_adapter

from daemon.adapters.loader import read_adapter_files
from daemon.engines.text.constraints import Constraint, ConstraintError
from daemon.engines.text.engine import TextEngine
from daemon.engines.text.request import EngineConfig, SamplingParams, TextDoneEvent, TextRequest

QUEST = {"type": "object", "additionalProperties": False, "required": ["title", "reward", "steps", "kind"],
         "properties": {"title": {"type": "string", "minLength": 1, "maxLength": 24},
                        "reward": {"type": "integer", "minimum": 10, "maximum": 500},
                        "kind": {"enum": ["fetch", "escort", "slay"]},
                        "steps": {"type": "array", "minItems": 1, "maxItems": 3,
                                  "items": {"type": "object", "required": ["where"], "additionalProperties": False,
                                            "properties": {"where": {"type": "string", "maxLength": 12},
                                                           "done": {"type": "boolean"}}}}}}
ACTION = {"type": "object", "properties": {"action": {"enum": ["attack", "flee", "talk"]},
                                           # bounded digits: a random model may write a fraction's forever
                                           "confidence": {"type": "integer", "minimum": -5, "maximum": 100}},
          "required": ["action", "confidence"], "additionalProperties": False}
REGEX = r"(Ahoy|Halt), [A-Z][a-z]{1,8}[.!]"
CHOICES = ["attack", "flee", "talk to the guard", "trade"]
GRAMMAR = 'start: "say " WORD " to " WORD\nWORD: /[a-z]{2,6}/\n'


# CUDA where there is one (bf16, CUDA graphs, Triton kernels: the masks go onto the graph's logits;
# the matchers take each token one step late). On the CPU both ways.
DEVICES = ["cpu", "cpu-deferred", *(["cuda"] if torch.cuda.is_available() else [])]
CPU_CONFIG = EngineConfig(device="cpu", dtype="float32", max_seqs=12, max_context=512, lora_slots=4, max_lora_rank=8)


@pytest.fixture(scope="module", params=DEVICES)
def engine(tiny_model_dir: Path, request: pytest.FixtureRequest) -> TextEngine:
    if request.param == "cuda":
        return TextEngine.from_folder(tiny_model_dir, dataclasses.replace(CPU_CONFIG, device="cuda",
                                                                          dtype="bfloat16"))
    engine = TextEngine.from_folder(tiny_model_dir, CPU_CONFIG)
    engine.defer_grammar = request.param == "cpu-deferred"
    return engine


def versions(engine: TextEngine, model_dir: Path, tmp_path: Path) -> list:
    out = []
    for i, (rank, targets) in enumerate([(4, ("q_proj", "v_proj")), (8, ("gate_proj", "up_proj", "down_proj"))]):
        folder = write_text_adapter(tmp_path / f"a{i}", model_dir, rank=rank, targets=targets, seed=40 + i)
        files = read_adapter_files(folder, "text")
        prepared = engine.prepare_adapter(files)
        out.append(files.to_version(folder.name, 1, prepared.payload, prepared.rank, prepared.targets))
    return out


def run(engine: TextEngine, requests: list[TextRequest]) -> dict:
    done: dict = {}
    for r in requests:
        engine.submit(r, lambda e: done.__setitem__(e.key, e) if not type(e).__name__.endswith("ChunkEvent") else None)
    engine.run_until_idle()
    return done


def check(kind: str, text: str) -> None:
    if kind == "quest":
        jsonschema.validate(json.loads(text), QUEST)
    elif kind == "action":
        jsonschema.validate(json.loads(text), ACTION)
    elif kind == "regex":
        assert re.fullmatch(REGEX, text), text
    elif kind == "choices":
        assert text in CHOICES, text
    else:
        assert re.fullmatch(r"say [a-z]{2,6} to [a-z]{2,6}", text), text


def test_constrained_rows_in_one_batch_with_free_rows_adapters_and_mixes(engine: TextEngine, tiny_model_dir: Path,
                                                                        tmp_path: Path) -> None:
    a, b = versions(engine, tiny_model_dir, tmp_path)
    grammars = {"quest": engine.prepare_constraint(Constraint("json_schema", json.dumps(QUEST))),
                "action": engine.prepare_constraint(Constraint("json_schema", json.dumps(ACTION))),
                "regex": engine.prepare_constraint(Constraint("regex", REGEX)),
                "choices": engine.prepare_constraint(Constraint("choices", json.dumps(CHOICES))),
                "grammar": engine.prepare_constraint(Constraint("grammar", GRAMMAR))}
    mixes = [[], [(a, 1.0)], [(b, 1.0)], [(a, 0.6), (b, -0.5)]]
    prompt = engine.encode_prompt("The guard looks at you and says")

    def free(key: str, i: int) -> TextRequest:
        return TextRequest(key=key, prompt_ids=prompt, adapters=mixes[i % 4],
                           sampling=SamplingParams(temperature=0.9, seed=100 + i, max_tokens=24))

    alone = {f"free{i}": run(engine, [free(f"free{i}", i)])[f"free{i}"].token_ids for i in range(4)}
    requests = [free(f"free{i}", i) for i in range(4)]
    kinds = list(grammars)
    for i in range(20):
        kind = kinds[i % len(kinds)]
        requests.append(TextRequest(key=(kind, i), prompt_ids=prompt, adapters=mixes[i % 4],
                                    sampling=SamplingParams(temperature=[0.0, 0.8, 1.3][i % 3], seed=i, top_k=i % 7,
                                                            top_p=[1.0, 0.9][i % 2], max_tokens=320),
                                    constraint=grammars[kind]))
    done = run(engine, requests)
    for key, event in done.items():
        assert isinstance(event, TextDoneEvent), event
        if isinstance(key, str):
            assert event.constraint is None
            if engine.device.type == "cpu":  # on CUDA the batch's shape moves bf16 logits (issue 20's mode)
                assert event.token_ids == alone[key]  # untouched by its companions
        else:
            assert event.constraint == "satisfied" and event.finish_reason == "stop", (key, event)
            check(key[0], event.text)
    assert engine.runner.masks is not None and engine.runner.masks.masked_rows > 100


def test_invalid_constraints_are_refused_with_the_library_reason(engine: TextEngine) -> None:
    for constraint, words in [(Constraint("regex", "[a-"), "unclosed character class"),
                              (Constraint("json_schema", json.dumps({"type": "nonsense"})), "nonsense"),
                              (Constraint("json_schema", "{not json"), "json_schema"),
                              (Constraint("grammar", "start: missing_rule\n"), "missing_rule")]:
        with pytest.raises(ConstraintError) as info:
            engine.prepare_constraint(constraint)
        assert words in str(info.value), info.value


def test_a_constraint_cut_short_by_max_tokens_says_so(engine: TextEngine) -> None:
    grammar = engine.prepare_constraint(Constraint("json_schema", json.dumps(QUEST)))
    prompt = engine.encode_prompt("Give me a quest")
    done = run(engine, [TextRequest(key="short", prompt_ids=prompt, constraint=grammar,
                                    sampling=SamplingParams(temperature=0.0, max_tokens=3))])["short"]
    assert (done.finish_reason, done.constraint) == ("length", "incomplete")
    assert done.text.startswith("{")


def test_compiled_grammars_are_cached_by_their_exact_text(engine: TextEngine) -> None:
    before = dict(engine.grammars.stats)
    first = engine.prepare_constraint(Constraint("regex", "[0-9]{3}"))
    again = engine.prepare_constraint(Constraint("regex", "[0-9]{3}"))
    other = engine.prepare_constraint(Constraint("regex", "[0-9]{4}"))
    assert first is again and other is not first
    assert engine.grammars.stats["compiled"] == before["compiled"] + 2
    assert engine.grammars.stats["cache_hits"] == before["cache_hits"] + 1


def test_a_matcher_taking_tokens_one_step_late_changes_nothing(tiny_model_dir: Path) -> None:
    """The same constrained requests (grammars that end on their own, one cut short by max_tokens, one
    whose grammar ends exactly at max_tokens, stop strings) with the matchers taking each token at once
    and one step late (also with their text made a step late): the same tokens, text, finish reasons
    and constraint states."""
    engine = TextEngine.from_folder(tiny_model_dir, CPU_CONFIG)
    prompt = engine.encode_prompt("The guard looks at you and says")
    kinds = {"action": Constraint("json_schema", json.dumps(ACTION)), "regex": Constraint("regex", REGEX),
             "choices": Constraint("choices", json.dumps(CHOICES)), "grammar": Constraint("grammar", GRAMMAR)}

    def requests() -> list[TextRequest]:
        out = []
        for i, (kind, c) in enumerate(kinds.items()):
            for j, max_tokens in enumerate((320, 3)):
                out.append(TextRequest(key=(kind, j), prompt_ids=prompt, constraint=engine.prepare_constraint(c),
                                       sampling=SamplingParams(temperature=0.8, seed=i, max_tokens=max_tokens,
                                                               stop=["!"] if kind == "regex" else [])))
        out.append(TextRequest(key="free", prompt_ids=prompt, sampling=SamplingParams(temperature=0.8, seed=9,
                                                                                      max_tokens=20)))
        return out

    at_once = run(engine, requests())
    exact = {k: len(e.token_ids) for k, e in at_once.items() if k != "free" and k[1] == 0 and e.finish_reason == "stop"}

    def edge() -> list[TextRequest]:  # a grammar that completes on the last token max_tokens allows
        return [TextRequest(key=("edge", k), prompt_ids=prompt, constraint=engine.prepare_constraint(kinds[k[0]]),
                            sampling=SamplingParams(temperature=0.8, seed=list(kinds).index(k[0]), max_tokens=n))
                for k, n in exact.items()]

    at_once |= run(engine, edge())
    engine.defer_grammar = True
    late = run(engine, requests()) | run(engine, edge())
    engine.defer_text = True  # and the text made while the next step runs (a GPU's default too)
    try:
        behind = run(engine, requests()) | run(engine, edge())
    finally:
        engine.defer_text = False
    assert exact and any(e.finish_reason == "length" and e.constraint == "incomplete" for e in at_once.values())
    for key, event in at_once.items():
        for other in (late[key], behind[key]):
            assert (other.token_ids, other.text, other.finish_reason, other.constraint) == (
                event.token_ids, event.text, event.finish_reason, event.constraint), key
    boundary = [k for k in exact if at_once[("edge", k)].finish_reason == "stop"
                and len(at_once[("edge", k)].token_ids) == exact[k]]
    assert boundary, "no grammar ended on the last token max_tokens allowed"  # `stop` there, not `length`
    assert engine.grammar_late_stops > 0  # grammars' ends were seen a step late, and their extra token dropped
