"""Quantized base models: AWQ and GPTQ checkpoints packed offline by the formats' own rules
(tests/tiny.py), and load-time int8 / int4 / fp8, each against its dequantized float32 reference: a
dense folder holding the weights the codes stand for, (q - zero) * scale. Both compute the same
function, so logits agree to float32 rounding (max |diff| <= 1e-5 * max |logit| per row and step,
measured ~1e-6) and greedy tokens are equal, with adapters, mixes and the base in one batch."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from pathlib import Path

import pytest
import torch
from support import make_adapter_dir, serve_command, start_daemon, stop_daemon
from tiny import (
    build_tiny_model,
    copy_model,
    dequantize_4bit_groups,
    pack_awq,
    pack_gptq,
    quantize_4bit_groups,
    write_quantized_model,
    write_rtn_reference,
    write_text_adapter,
)

import bridge
from daemon.adapters.loader import read_adapter_files
from daemon.engines.text.config import UnsupportedModel
from daemon.engines.text.engine import TextEngine
from daemon.engines.text.quant import QuantWeight, planned_nbytes, quantize_rtn
from daemon.engines.text.quant_formats import awq_to_quant, gptq_to_quant
from daemon.engines.text.request import EngineConfig, SamplingParams, TextRequest
from daemon.memory import text_weight_bytes

DEVICES = ["cpu", "cpu-torch", *(["cuda"] if torch.cuda.is_available() else [])]
# relative to the row's largest logit: float32 rounding (a quantized vocab head is x @ W^T, a dense one W @ x^T)
TOLERANCE = 2e-5
ADAPTERS = {
    "a_qv": dict(rank=4, targets=("q_proj", "v_proj"), seed=31),
    "b_all": dict(rank=8, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                  seed=32),
    "c_mlp": dict(rank=2, targets=("gate_proj", "up_proj", "down_proj"), seed=33),
}
ROWS = [[], [("a_qv", 1.0)], [("b_all", 1.0)], [("c_mlp", 1.0)], [("a_qv", 0.6), ("b_all", -0.5), ("c_mlp", 1.2)]]
PROMPTS = ["Ahoy matey", "The elven archivist keeps the old scrolls", "Hammer", "Gold coins and a map",
           "Hello, who goes there? A traveller"]
FORMATS = {  # name -> write_quantized_model arguments
    "awq": dict(method="awq"),
    "gptq": dict(method="gptq", sym=True, v1=True),
    "gptq-asym": dict(method="gptq", sym=False, v1=True),
    "gptq-v2-asym": dict(method="gptq", sym=False, v1=False),
    "gptq-head": dict(method="gptq", sym=True, v1=True, lm_head=True),  # GPTQModel's quantized lm_head
}


@pytest.fixture(scope="module")
def dense_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny models whose projections' inputs are multiples of the group size 128."""
    root = tmp_path_factory.mktemp("quant")
    return {arch: build_tiny_model(root / arch, arch, hidden=128, intermediate=256, heads=4, kv_heads=2, seed=5)
            for arch in ("llama", "qwen2", "mistral")}


def make_engine(folder: Path, device: str, **config: object) -> TextEngine:
    return TextEngine.from_folder(folder, EngineConfig(
        device=device.removesuffix("-torch"), dtype="float32", max_seqs=8, max_context=96, lora_slots=4,
        max_lora_rank=8, prefill_chunk=6, max_step_tokens=24, kernels=not device.endswith("-torch"),
        **config))  # type: ignore[arg-type]


def run_batch(engine: TextEngine, adapter_dirs: dict[str, Path],
              use_adapters: bool = True) -> tuple[list[list[torch.Tensor]], list[list[int]]]:
    """ROWS on PROMPTS in one continuous batch (rows joining mid-decode): each row's logits per step,
    and its tokens (every row on the base model where `use_adapters` is False)."""
    versions = {}
    for name, folder in adapter_dirs.items():
        files = read_adapter_files(folder, "text")
        prepared = engine.prepare_adapter(files)
        versions[name] = files.to_version(name, 1, prepared.payload, prepared.rank, prepared.targets)
    logits: list[list[torch.Tensor]] = [[] for _ in ROWS]
    done: dict[int, list[int]] = {}

    def hook(keys: list[int], out: torch.Tensor) -> None:
        for k, row in zip(keys, out, strict=True):
            logits[k].append(row.detach().cpu().clone())

    engine.runner.on_logits = hook

    def submit(i: int) -> None:
        engine.submit(TextRequest(key=i, prompt_ids=engine.encode_prompt(PROMPTS[i]),
                                  sampling=SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True),
                                  adapters=[(versions[n], s) for n, s in ROWS[i]] if use_adapters else []),
                      lambda e: done.__setitem__(e.key, list(e.token_ids)) if hasattr(e, "token_ids") else None)

    for i in range(3):
        submit(i)
    for _ in range(2):
        engine.step()
    for i in range(3, len(ROWS)):
        submit(i)
    engine.run_until_idle()
    return logits, [done[i] for i in range(len(ROWS))]


def assert_same_function(got: tuple[list[list[torch.Tensor]], list[list[int]]],
                         want: tuple[list[list[torch.Tensor]], list[list[int]]]) -> None:
    for i, (rows_got, rows_want) in enumerate(zip(got[0], want[0], strict=True)):
        assert len(rows_got) == len(rows_want) == 6
        for j, (g, w) in enumerate(zip(rows_got, rows_want, strict=True)):
            rel = float((g - w).abs().max() / w.abs().max())
            assert rel <= TOLERANCE, f"row {i} {ROWS[i]} step {j}: relative error {rel:.2e}"
    assert got[1] == want[1]


def adapters_for(base: Path, tmp_path: Path) -> dict[str, Path]:
    return {n: write_text_adapter(tmp_path / n, base, **spec) for n, spec in ADAPTERS.items()}


# -- the packed layouts, exactly ----------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", list(FORMATS))
def test_unpacked_checkpoint_tensors_are_the_packed_weights_exactly(fmt: str) -> None:
    """AWQ's interleaved words, GPTQ's input-packed words and zero-point conventions unpack to the
    very weights that were packed (bit-exact dequantization, odd values everywhere)."""
    args = FORMATS[fmt]
    w = torch.randn(96, 384, generator=torch.Generator().manual_seed(3))
    sym = args["method"] == "gptq" and bool(args.get("sym"))
    q, zero, scale = quantize_4bit_groups(w, sym=sym, zero_floor=1 if args.get("v1") else 0)
    assert len(set(q.flatten().tolist())) == 16 and (sym or len(set(zero.flatten().tolist())) > 3)
    if args["method"] == "awq":
        t = pack_awq(q, zero, scale)
        got = awq_to_quant(t["qweight"], t["qzeros"], t["scales"], dtype=torch.float32)
    else:
        t = pack_gptq(q, zero, scale, v1=bool(args["v1"]))
        got = gptq_to_quant(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], zero_offset=int(bool(args["v1"])),
                            dtype=torch.float32)
    assert got.shape == (96, 384) and got.kind == "int4" and got.group == 128
    assert torch.equal(got.dequantize(torch.float32), dequantize_4bit_groups(q, zero, scale))
    x = torch.randn(5, 384)
    assert torch.allclose(got.linear(x), x @ dequantize_4bit_groups(q, zero, scale).t(), atol=1e-5)


def test_matmul_in_row_blocks_equals_one_block(monkeypatch: pytest.MonkeyPatch) -> None:
    """Large weights dequantize a block of output rows at a time: the same product, bias included."""
    from daemon.engines.text import quant

    w = quantize_rtn(torch.randn(200, 256, generator=torch.Generator().manual_seed(4)), "int4", torch.float32)
    x, bias = torch.randn(3, 256), torch.randn(200)
    whole = w.linear(x, bias)
    monkeypatch.setattr(quant, "_BLOCK_ELEMENTS", 256 * 64)  # 64 rows a block: 4 blocks, the last partial
    assert torch.allclose(w.linear(x, bias), whole, atol=1e-5)
    assert torch.allclose(whole, x @ w.dequantize(torch.float32).t() + bias, atol=1e-5)


# -- whole models against their references ------------------------------------------------------------------

@pytest.mark.parametrize(("arch", "fmt", "device"), [
    *((arch, fmt, "cpu") for arch in ("llama", "qwen2", "mistral") for fmt in ("awq", "gptq")),
    ("llama", "gptq-asym", "cpu"), ("llama", "gptq-v2-asym", "cpu"), ("llama", "gptq-head", "cpu"),
    *((arch, fmt, d) for arch, fmt in (("llama", "awq"), ("qwen2", "gptq")) for d in DEVICES if d != "cpu"),
])
def test_checkpoint_matches_its_dequantized_reference(arch: str, fmt: str, device: str, dense_dirs: dict[str, Path],
                                                      tmp_path: Path) -> None:
    """An AWQ/GPTQ checkpoint serving the base, three adapters and a weighted mix in one batch: every
    row's logits equal the dequantized-reference model's within TOLERANCE and its greedy tokens are equal."""
    qdir, ref = write_quantized_model(dense_dirs[arch], tmp_path / "q", tmp_path / "ref", **FORMATS[fmt])
    adapters = adapters_for(ref, tmp_path)
    engine = make_engine(qdir, device)
    assert isinstance(engine.model.layers[0]["qkv"], QuantWeight)
    assert isinstance(engine.model.lm_head, QuantWeight) == ("lm_head" in FORMATS[fmt])  # not taken for tied
    assert engine.stats()["weights"] == f"{FORMATS[fmt]['method']}-int4-g128"
    got = run_batch(engine, adapters)
    assert_same_function(got, run_batch(make_engine(ref, device), adapters))
    base = run_batch(engine, adapters, use_adapters=False)
    for i in range(1, len(ROWS)):  # the adapters really change their rows
        assert float((got[0][i][0] - base[0][i][0]).abs().max()) > 1e-3, ROWS[i]
    original = run_batch(make_engine(dense_dirs[arch], device), adapters)
    assert max(float((g[0] - o[0]).abs().max()) for g, o in zip(got[0], original[0], strict=True)) > 1e-3, \
        "the quantized model computes what the unquantized one does: the test would prove nothing"


@pytest.mark.parametrize("layout", ["bgmv", "dense"])
def test_quantized_base_under_every_lora_layout(layout: str, dense_dirs: dict[str, Path], tmp_path: Path) -> None:
    """bgmv and gathered-row layouts read the A rows that a quantized base keeps apart: same function."""
    qdir, ref = write_quantized_model(dense_dirs["llama"], tmp_path / "q", tmp_path / "ref", method="awq")
    adapters = adapters_for(ref, tmp_path)
    got = run_batch(make_engine(qdir, "cpu-torch", lora_layout=layout), adapters)
    assert_same_function(got, run_batch(make_engine(ref, "cpu-torch", lora_layout=layout), adapters))


def test_modules_left_dense_in_a_checkpoint_load_dense(dense_dirs: dict[str, Path], tmp_path: Path) -> None:
    """A checkpoint that keeps some projections dense (AWQ's modules_to_not_convert): those load as
    they are, a fused group with both kinds is served dense, and the model still matches its reference."""
    keep = ("model.layers.0.self_attn.k_proj.", "model.layers.1.mlp.down_proj.")
    qdir, ref = write_quantized_model(dense_dirs["llama"], tmp_path / "q", tmp_path / "ref", method="awq",
                                      keep_dense=keep)
    engine = make_engine(qdir, "cpu")
    layers = engine.model.layers
    assert not isinstance(layers[0]["qkv"], QuantWeight) and not isinstance(layers[1]["down"], QuantWeight)
    assert isinstance(layers[1]["qkv"], QuantWeight) and isinstance(layers[0]["down"], QuantWeight)
    adapters = adapters_for(ref, tmp_path)
    assert_same_function(run_batch(engine, adapters), run_batch(make_engine(ref, "cpu"), adapters))


# -- the dense LoRA path of every kernel set over a quantized base ------------------------------------------

def quant_fused_error(kernel: str, rows: int = 9) -> float:
    """fused_case's fake layer with int4 base weights (A rows apart): the largest error of
    lora_project on every group, dense over the prefix (every kernel set's path), against the
    dequantized base GEMM plus the plain loop over the adapters, relative to the largest value."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from fused_case import ALL, DIMS, KERNELS, RANKS, FakeModel, make_lora, rows_case, slot_matrix

    from daemon.engines.text.lora import lora_project, lora_reference
    from daemon.engines.text.lora_plan import LoraBatch
    from daemon.engines.text.lora_pool import GROUPS, LoraSlotStorage

    model = FakeModel(torch.float32, "cpu", seed=0)
    quantized = {k: quantize_rtn(w, "int4", torch.float32) for k, w in model.weights.items()}
    model.fuse_rows = lambda layer, key, n: (torch.zeros(n, quantized[key].in_features), None)  # type: ignore[method-assign]
    storage = LoraSlotStorage(model, num_layers=1, target_dims=DIMS, targets=ALL, num_slots=len(RANKS), max_rank=8,
                              device=torch.device("cpu"), dtype=torch.float32)
    loras = [make_lora(rank, ALL, 1 + slot) for slot, rank in enumerate(RANKS)]
    for slot, lora in enumerate(loras):
        storage.load(slot, lora)
    slots, scales = rows_case(rows)
    batch = LoraBatch.plan(slot_matrix(slots, scales), storage, dtype=torch.float32, prefer_prefix=True)
    kernels = KERNELS[kernel](torch.device("cpu"))
    launches: list[bool] = []
    if kernel == "triton":  # record that the kernels ran (they decline shapes they cannot take)
        from daemon.engines.text import triton_lora, triton_quant

        for module, name in ((triton_lora, "expand_fused"), (triton_quant, "matmul")):
            def counted(*args: object, _run=getattr(module, name), **kw: object) -> object:
                out = _run(*args, **kw)
                launches.append(out is not None and out is not False)
                return out

            setattr(module, name, counted)
    worst, g = 0.0, torch.Generator().manual_seed(7)
    for key, members in GROUPS:
        x = torch.randn(rows, DIMS[members[0]][0], generator=g)
        bias = model.bias if key == "qkv" else None
        residual = torch.randn(rows, quantized[key].out_features, generator=g) if key in ("o", "down") else None
        got = lora_project(x, quantized[key], bias, storage.groups[0][key], batch, kernels, residual=residual)
        assert not kernels.failures, kernels.failures
        want = torch.nn.functional.linear(x.double(), quantized[key].dequantize(torch.float64),
                                          None if bias is None else bias.double())
        want += 0 if residual is None else residual.double()
        col = 0
        for t in members:
            mats = [(lo.layers[0][t][0].double(), lo.layers[0][t][1].double()) for lo in loras]
            want[:, col:col + DIMS[t][1]] += lora_reference(x.double(), list(mats), slots, scales)
            col += DIMS[t][1]
        worst = max(worst, float((got.double() - want).abs().max() / want.abs().max()))
    assert kernel != "triton" or (len(launches) == 2 * len(GROUPS) and all(launches)), launches
    return worst


def triton_matmul_error(device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """triton_quant.matmul against the dequantized float32 product (the interpreter's dots take no
    bf16): int4 and int8 (and fp8 on CUDA: the interpreter has no fp8 loads), groups of 128, 48 and per
    row, 1 to 64 rows (more go to the GEMM), with and without bias."""
    from daemon.engines.text.triton_quant import matmul

    g, worst = torch.Generator().manual_seed(0), 0.0
    for kind in ("int4", "int8", *(["fp8"] if device == "cuda" else [])):
        for n, k, group in ((96, 256, 128), (80, 48, 48), (40, 384, None)):
            if kind == "fp8" and group == 48:
                continue  # fp8 groups are 128 (or the largest of 64/32 that divides the inputs)
            w = quantize_rtn(torch.randn(n, k, generator=g).to(device), kind, dtype,  # type: ignore[arg-type]
                             group if kind == "int4" else None)
            for m in (1, 17, 40, 64):
                x, bias = torch.randn(m, k, generator=g), torch.randn(n, generator=g) if m != 17 else None
                x, bias = x.to(device, dtype), None if bias is None else bias.to(device, dtype)
                y, want = matmul(x, w, bias), w.linear(x.float(), None if bias is None else bias.float())
                if y is None:  # on a GPU an int4 row must hold inputs in 32s (the dot's depth)
                    assert device == "cuda" and kind == "int4" and group == 48, (kind, n, k)
                    continue
                worst = max(worst, float((y.float() - want).abs().max() / want.abs().max()))
    return worst


@pytest.mark.parametrize("kernel", ["torch", "numba"])
def test_dense_lora_path_over_a_quantized_base(kernel: str) -> None:
    """The fused-prefix path with int4 base weights: base matmul, shrink as its own matmul, expand."""
    assert quant_fused_error(kernel) < 1e-5


def test_triton_kernels_over_a_quantized_base_under_the_interpreter() -> None:
    """The int4/int8 Triton matmul against the dequantizing reference, and TritonKernels' quantized
    branch (that matmul, then the base and shrinks laid out for the expand kernel), run by Triton's
    interpreter on the CPU: errors under 1e-5. (Never run on a GPU in this suite's CI.)"""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton", reason="Triton is not installed (CI installs it with the dev extra)")
    here = Path(__file__).parent
    root = here.parents[2]
    code = f"import sys; sys.path[:0] = [{str(root)!r}, {str(here)!r}, {str(root / 'tests')!r}]; " \
           "from test_quantized import quant_fused_error, triton_matmul_error; " \
           "print('err=%g' % triton_matmul_error()); print('err=%g' % quant_fused_error('triton'))"
    run = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TRITON_INTERPRET": "1"}, cwd=root,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    errors = [float(line.removeprefix("err=")) for line in run.stdout.split() if line.startswith("err=")]
    assert len(errors) == 2 and max(errors) < 1e-5, run.stdout


if torch.cuda.is_available():  # collected only where it can run (like the CUDA cases of test_correctness)

    def test_triton_matmul_on_cuda_equals_reference() -> None:
        """The Triton matmul in bf16 on a GPU against the dequantized float32 product."""
        assert triton_matmul_error("cuda", torch.bfloat16) < 2e-2


# -- quantizing at load time --------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["qwen2", "llama"])  # tied embeddings; an untied head (quantized too)
@pytest.mark.parametrize("kind", ["int8", "int4", "fp8"])
def test_quantize_at_load_matches_its_dequantized_reference(kind: str, family: str, dense_dirs: dict[str, Path],
                                                            tmp_path: Path) -> None:
    """`quantize` int8/int4/fp8 on a float32 folder: the same function as the folder holding the
    dequantized round-to-nearest weights, adapters and mixes included; and not the original function."""
    src = dense_dirs[family]
    adapters = adapters_for(src, tmp_path)
    engine = make_engine(src, "cpu", quantize=kind)
    qkv = engine.model.layers[0]["qkv"]
    assert isinstance(qkv, QuantWeight) and qkv.kind == kind and engine.stats()["weights"] == kind
    assert isinstance(engine.model.embed, QuantWeight) and engine.model.lm_head is not engine.model.embed \
        if family == "llama" else engine.model.lm_head is engine.model.embed  # tied: one quantized table
    got = run_batch(engine, adapters)
    assert_same_function(got, run_batch(make_engine(write_rtn_reference(src, tmp_path / "ref", kind), "cpu"), adapters))
    original = run_batch(make_engine(src, "cpu"), adapters)
    assert max(float((g[0] - o[0]).abs().max()) for g, o in zip(got[0], original[0], strict=True)) > 1e-4


@pytest.mark.parametrize("kind", ["int8", "int4", "fp8"])
def test_round_to_nearest_error_is_bounded(kind: str) -> None:
    """Each dequantized weight lies within half a step of the original (int8, int4), or within
    e4m3's relative rounding (fp8, 2^-4), of its group's scale."""
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(9)) * torch.linspace(0.01, 3, 256)
    qw = quantize_rtn(w, kind, torch.float32)  # type: ignore[arg-type]
    assert qw.group == (256 if kind == "int8" else 128)
    scale = qw.scales.repeat_interleave(qw.group, dim=1)
    err = (qw.dequantize(torch.float32) - w).abs()
    if kind == "fp8":
        assert bool((err <= w.abs() * 2**-4 + scale * 2**-9 + 1e-7).all())
    else:
        assert bool((err <= scale * 0.5 * (1 + 1e-5) + 1e-7).all())
    assert float(err.max()) > 0  # it did quantize


def test_load_time_groups_fit_input_widths_that_128_does_not_divide(tmp_path: Path) -> None:
    """A width like SmolLM2's 576 (not a multiple of 128) takes groups of 64: int4 loads and runs."""
    src = build_tiny_model(tmp_path / "m", hidden=192, intermediate=320, heads=4, kv_heads=2)
    engine = make_engine(src, "cpu", quantize="int4")
    qkv, down = engine.model.layers[0]["qkv"], engine.model.layers[0]["down"]
    assert isinstance(qkv, QuantWeight) and qkv.group == 64 and isinstance(down, QuantWeight) and down.group == 64
    assert len(run_batch(engine, {n: write_text_adapter(tmp_path / n, src, **s) for n, s in ADAPTERS.items()})[1]) == 5


async def test_a_daemon_serves_an_awq_checkpoint_as_it_serves_the_reference(dense_dirs: dict[str, Path],
                                                                            tmp_path: Path) -> None:
    """A real daemon on an AWQ folder (no setting: the folder's config says what it is) answers the
    real client, on the base, adapters and a mix, with the very text of a daemon on the reference."""
    qdir, ref = write_quantized_model(dense_dirs["qwen2"], tmp_path / "q", tmp_path / "ref", method="awq")
    adapters = make_adapter_dir(tmp_path / "adapters", ref)
    cases: list[tuple[str, list[object]]] = [("Ahoy there", []), ("Where is the rum?", ["alpha"]),
                                             ("Tell me of the map", ["beta"]),
                                             ("Who goes there?", [("alpha", 0.5), ("gamma", 1.5)])]
    texts: dict[str, list[str]] = {}
    for name, folder in (("q", qdir), ("ref", ref)):
        runtime, log, token = tmp_path / f"{name}.json", tmp_path / f"{name}.log", f"token-{name}"
        # float32 on the CPU, where "the very text" holds (in bf16 the two differ by rounding, and so may a token)
        proc = start_daemon(serve_command(folder, adapters, runtime, token=token, extra=["--device", "cpu"]),
                            runtime, log)
        try:
            url = json.loads(runtime.read_text())["url"]
            async with bridge.connect(url, token) as client:
                texts[name] = [(await client.complete(prompt, adapters=a, temperature=0.0, max_tokens=8)).text
                               for prompt, a in cases]
        finally:
            stop_daemon(proc)
        assert ("awq-int4-g128" in log.read_text()) == (name == "q")
    assert texts["q"] == texts["ref"] and len(set(texts["q"])) == len(cases), texts


def test_serve_quantize_loads_the_folder_quantized(dense_dirs: dict[str, Path], tmp_path: Path) -> None:
    """`loraloom serve --quantize int8` reaches the engine: /healthz names the weights, and it answers."""
    src = dense_dirs["llama"]
    runtime, log, token = tmp_path / "d.json", tmp_path / "d.log", "token-q"
    command = serve_command(src, make_adapter_dir(tmp_path / "adapters", src), runtime, token=token)
    proc = start_daemon([*command, "--quantize", "int8"], runtime, log)
    try:
        url = json.loads(runtime.read_text())["url"]
        health = json.loads(urllib.request.urlopen(url.replace("ws://", "http://") + "/healthz", timeout=10).read())
        assert health["text_engine"]["weights"] == "int8"

        async def ask() -> str:
            async with bridge.connect(url, token) as client:
                return (await client.complete("Ahoy", adapters=["alpha"], temperature=0.0, max_tokens=6)).text
        assert asyncio.run(ask())
    finally:
        stop_daemon(proc)


# -- memory ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["awq", "gptq", "int8", "int4", "fp8"])
def test_weight_bytes_per_format(fmt: str, dense_dirs: dict[str, Path], tmp_path: Path) -> None:
    """The weights held: the projections' codes, scales (compute dtype) and zero points, exactly as
    `quant.planned_nbytes` predicts, and the embeddings' and the untied head's too where the engine
    quantizes at load; norms stay dense. The memory plan's count (`memory.text_weight_bytes`) is the same."""
    src = dense_dirs["llama"]
    if fmt in ("awq", "gptq"):
        folder, _ = write_quantized_model(src, tmp_path / "q", tmp_path / "ref", method=fmt)
        engine = make_engine(folder, "cpu")
    else:
        engine = make_engine(src, "cpu", quantize=fmt)
    dense = make_engine(src, "cpu").model
    spec, kind = dense.spec, engine.model.scheme.weight_kind
    qkv = engine.model.layers[0]["qkv"]
    assert isinstance(qkv, QuantWeight) and qkv.kind == kind
    codes = qkv.codes.numel() * qkv.codes.element_size()
    assert codes == qkv.out_features * qkv.in_features // (2 if kind == "int4" else 1)
    proj = sum(planned_nbytes(out, inp, kind, 4) - planned_nbytes(out, inp, None, 4)
               for inp, out in spec.target_dims().values())
    head_kind = engine.model.scheme.head_kind
    assert not spec.tie_word_embeddings and isinstance(engine.model.lm_head, QuantWeight) == (head_kind is not None)
    assert isinstance(engine.model.embed, QuantWeight) == (head_kind is not None)
    head = 2 * (planned_nbytes(spec.vocab_size, spec.hidden_size, head_kind, 4)  # the table and the head
                - planned_nbytes(spec.vocab_size, spec.hidden_size, None, 4))
    assert engine.model.nbytes() == dense.nbytes() + proj * spec.num_layers + head
    assert engine.model.nbytes() == text_weight_bytes(spec, 4, kind, head_kind)  # what memory planning uses
    assert engine.model.nbytes() < dense.nbytes()


# -- what is refused ------------------------------------------------------------------------------------------

def _flip_g_idx(tensors: dict[str, torch.Tensor]) -> None:  # act order: groups no longer input // 128
    key = "model.layers.0.mlp.down_proj.g_idx"  # 256 inputs: two groups
    tensors[key] = tensors[key].flip(0)


def _exl2(tensors: dict[str, torch.Tensor]) -> None:  # ExLlamaV2's tensor names
    prefix = "model.layers.0.self_attn.q_proj."
    tensors[prefix + "q_weight"], tensors[prefix + "q_groups"] = tensors.pop(prefix + "qweight"), torch.zeros(2)


REFUSED: dict[str, dict[str, object]] = {  # changes to a GPTQ folder -> what the error says
    "desc_act": dict(config={"desc_act": True}, message="act-order GPTQ (desc_act true) is not supported"),
    "8-bit": dict(config={"bits": 8}, message="GPTQ with 8-bit weights is not supported"),
    "group 64": dict(config={"group_size": 64}, message="group size 64 is not supported"),
    "per-channel": dict(config={"group_size": -1}, message="per-channel scales (group_size -1) is not supported"),
    "marlin": dict(config={"checkpoint_format": "marlin"}, message="GPTQ checkpoint format 'marlin' is packed"),
    "bitsandbytes": dict(config={"quant_method": "bitsandbytes"},
                         message="quantization method 'bitsandbytes' is not supported"),
    "awq gemv": dict(config={"quant_method": "awq", "version": "gemv"}, message="AWQ version 'gemv' packs its"),
    "awq no zero": dict(config={"quant_method": "awq", "zero_point": False}, message="AWQ without zero points"),
    "llm-awq": dict(config={"quant_method": "awq", "backend": "llm-awq"}, message="AWQ packed by llm-awq"),
    "g_idx act order": dict(edit=_flip_g_idx, message="g_idx' is not input // 128: an act-order"),
    "no config": dict(config={}, message="the folder's config names no quantization method"),
    "exl2": dict(config={}, edit=_exl2, message="holds ExLlamaV2 (EXL2) tensors"),
    "quantize twice": dict(quantize="int8", message="is already quantized (gptq); quantize 'int8' applies"),
    "unknown quantize": dict(quantize="int3", message="unknown quantize 'int3' (supported: int8, int4, fp8)"),
}


@pytest.fixture(scope="module")
def gptq_dir(dense_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gptq")
    return write_quantized_model(dense_dirs["llama"], root / "q", root / "ref", method="gptq")[0]


@pytest.mark.parametrize("case", list(REFUSED))
def test_unsupported_layouts_are_refused_with_the_reason(case: str, gptq_dir: Path, tmp_path: Path) -> None:
    """Each unsupported layout (config, tensors, quantize setting) is refused with a message naming it."""
    c = REFUSED[case]
    folder = copy_model(gptq_dir, tmp_path / "m", c.get("config"), edit=c.get("edit"))  # type: ignore[arg-type]
    with pytest.raises(UnsupportedModel, match=re.escape(str(c["message"]))):
        make_engine(folder, "cpu", quantize=c.get("quantize"))
