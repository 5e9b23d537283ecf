"""Quantized base models: AWQ and GPTQ checkpoints packed offline by the formats' own rules
(tests/tiny.py), and load-time int8 / int4 / fp8, each against its dequantized float32 reference.

The reference of a quantized model is a dense folder whose projections hold the weights the codes
stand for, (q - zero) * scale in float32: the two engines then compute the same function, so
their logits agree to float32 rounding (tolerance: max |diff| <= 1e-5 * max |logit| per row and
step, measured ~1e-6) and greedy tokens are equal, with adapters, mixes and the base on one batch.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import (
    QUANT_PROJECTIONS,
    build_tiny_model,
    dequantize_4bit_groups,
    pack_awq,
    pack_gptq,
    quantize_4bit_groups,
    write_quantized_model,
    write_text_adapter,
)

from daemon.adapters.loader import read_adapter_files
from daemon.engines.text.config import UnsupportedModel
from daemon.engines.text.engine import TextEngine
from daemon.engines.text.quant import QuantWeight, quantize_rtn
from daemon.engines.text.quant_formats import awq_to_quant, gptq_to_quant
from daemon.engines.text.request import EngineConfig, SamplingParams, TextRequest

DEVICES = ["cpu", "cpu-torch", *(["cuda"] if torch.cuda.is_available() else [])]
TOLERANCE = 1e-5  # relative to the row's largest logit
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
    ("llama", "gptq-asym", "cpu"), ("llama", "gptq-v2-asym", "cpu"),
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
    src = dense_dirs["llama"]
    qdir, ref = write_quantized_model(src, tmp_path / "q", tmp_path / "ref", method="awq")
    tensors, dense = load_file(str(qdir / "model.safetensors")), load_file(str(src / "model.safetensors"))
    for key in ("model.layers.0.self_attn.k_proj.", "model.layers.1.mlp.down_proj."):
        for part in ("qweight", "qzeros", "scales"):
            del tensors[key + part]
        tensors[key + "weight"] = dense[key + "weight"]
    save_file(tensors, str(qdir / "model.safetensors"))
    ref_tensors = load_file(str(ref / "model.safetensors"))
    for key in ("model.layers.0.self_attn.k_proj.", "model.layers.1.mlp.down_proj."):
        ref_tensors[key + "weight"] = dense[key + "weight"]
    save_file(ref_tensors, str(ref / "model.safetensors"))
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

        expand, matmul = triton_lora.expand_fused, triton_quant.matmul

        def counted_expand(*args: object, **kw: object) -> bool:
            launches.append(expand(*args, **kw))  # type: ignore[arg-type]
            return launches[-1]

        def counted_matmul(*args: object, **kw: object) -> torch.Tensor | None:
            y = matmul(*args, **kw)  # type: ignore[arg-type]
            launches.append(y is not None)
            return y

        triton_lora.expand_fused, triton_quant.matmul = counted_expand, counted_matmul  # type: ignore[assignment]
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


def triton_matmul_error() -> float:
    """triton_quant.matmul against QuantWeight.linear (float32: the interpreter's dots take no bf16):
    int4 and int8, groups of 128, 48 and per row, 1 to 40 rows, with and without bias."""
    from daemon.engines.text.triton_quant import matmul

    g, worst = torch.Generator().manual_seed(0), 0.0
    for kind in ("int4", "int8"):
        for n, k, group in ((96, 256, 128), (80, 48, 48), (40, 384, None)):
            w = quantize_rtn(torch.randn(n, k, generator=g), kind, torch.float32, group if kind == "int4" else None)
            for m in (1, 17, 40):
                x, bias = torch.randn(m, k, generator=g), torch.randn(n, generator=g) if m != 17 else None
                y, want = matmul(x, w, bias), w.linear(x, bias)
                assert y is not None, (kind, n, k)
                worst = max(worst, float((y - want).abs().max() / want.abs().max()))
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

    @pytest.mark.parametrize("kind", ["int4", "int8"])
    @pytest.mark.parametrize("rows", [1, 16, 100])
    def test_triton_matmul_on_cuda_equals_reference(kind: str, rows: int) -> None:
        """The Triton matmul in bf16 on a GPU against the dequantized float32 product."""
        from daemon.engines.text.triton_quant import matmul

        w = quantize_rtn(torch.randn(512, 1024, device="cuda"), kind, torch.bfloat16)  # type: ignore[arg-type]
        x, bias = torch.randn(rows, 1024, device="cuda").bfloat16(), torch.randn(512, device="cuda").bfloat16()
        y = matmul(x, w, bias)
        assert y is not None
        want = x.float() @ w.dequantize(torch.float32).t() + bias.float()
        assert float((y.float() - want).abs().max() / want.abs().max()) < 2e-2


# -- quantizing at load time --------------------------------------------------------------------------------

def rtn_reference(src: Path, dst: Path, kind: str) -> Path:
    """`src` with each projection replaced by its round-to-nearest weights, dequantized (float32)."""
    import shutil

    shutil.copytree(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    for key in [k for k in tensors if k.endswith(".weight") and any(p in k for p in QUANT_PROJECTIONS)]:
        tensors[key] = quantize_rtn(tensors[key], kind, torch.float32).dequantize(torch.float32)  # type: ignore[arg-type]
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


@pytest.mark.parametrize("kind", ["int8", "int4", "fp8"])
def test_quantize_at_load_matches_its_dequantized_reference(kind: str, dense_dirs: dict[str, Path],
                                                            tmp_path: Path) -> None:
    """`quantize` int8/int4/fp8 on a float32 folder: the same function as the folder holding the
    dequantized round-to-nearest weights, adapters and mixes included; and not the original function."""
    src = dense_dirs["qwen2"]
    adapters = adapters_for(src, tmp_path)
    engine = make_engine(src, "cpu", quantize=kind)
    qkv = engine.model.layers[0]["qkv"]
    assert isinstance(qkv, QuantWeight) and qkv.kind == kind and engine.stats()["weights"] == kind
    got = run_batch(engine, adapters)
    assert_same_function(got, run_batch(make_engine(rtn_reference(src, tmp_path / "ref", kind), "cpu"), adapters))
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


# -- memory ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["awq", "gptq", "int8", "int4", "fp8"])
def test_weight_bytes_per_format(fmt: str, dense_dirs: dict[str, Path], tmp_path: Path) -> None:
    """The weights held: the projections' codes, scales (compute dtype) and zero points, exactly;
    embeddings, norms and lm_head stay dense."""
    src = dense_dirs["llama"]
    if fmt in ("awq", "gptq"):
        folder, _ = write_quantized_model(src, tmp_path / "q", tmp_path / "ref", method=fmt)
        engine = make_engine(folder, "cpu")
    else:
        engine = make_engine(src, "cpu", quantize=fmt)
    dense = make_engine(src, "cpu").model
    spec, itemsize = dense.spec, 4
    proj = 0
    for inp, out in spec.target_dims().values():
        group = inp if fmt == "int8" else 128
        codes = {"int8": 1.0, "fp8": 1.0}.get(fmt, 0.5) * inp * out
        proj += int(codes) + out * (inp // group) * (itemsize + (1 if fmt in ("awq", "gptq", "int4") else 0))
    rest = dense.nbytes() - sum(inp * out for inp, out in spec.target_dims().values()) * itemsize * spec.num_layers
    assert engine.model.nbytes() == rest + proj * spec.num_layers
    assert engine.model.nbytes() < dense.nbytes()


# -- what is refused ------------------------------------------------------------------------------------------

REFUSED = {  # quantization_config changes -> what the error says
    "desc_act": ({"desc_act": True}, "act-order GPTQ (desc_act true) is not supported"),
    "8-bit": ({"bits": 8}, "GPTQ with 8-bit weights is not supported"),
    "group 64": ({"group_size": 64}, "group size 64 is not supported"),
    "per-channel": ({"group_size": -1}, "per-channel scales (group_size -1) is not supported"),
    "marlin": ({"checkpoint_format": "marlin"}, "GPTQ checkpoint format 'marlin' is packed for one kernel"),
    "bitsandbytes": ({"quant_method": "bitsandbytes"}, "quantization method 'bitsandbytes' is not supported"),
    "awq gemv": ({"quant_method": "awq", "version": "gemv"}, "AWQ version 'gemv' packs its weights for another"),
    "awq no zero": ({"quant_method": "awq", "zero_point": False}, "AWQ without zero points"),
}


@pytest.fixture(scope="module")
def gptq_dir(dense_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gptq")
    return write_quantized_model(dense_dirs["llama"], root / "q", root / "ref", method="gptq")[0]


def edited_copy(folder: Path, dst: Path, config: dict | None = None) -> Path:
    import shutil

    shutil.copytree(folder, dst)
    if config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        cfg["quantization_config"].update(config)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("case", list(REFUSED))
def test_unsupported_layouts_are_refused_with_the_reason(case: str, gptq_dir: Path, tmp_path: Path) -> None:
    """Each unsupported quantization config is refused at load with a message naming it."""
    change, message = REFUSED[case]
    with pytest.raises(UnsupportedModel, match=message.replace("(", r"\(").replace(")", r"\)")):
        make_engine(edited_copy(gptq_dir, tmp_path / "m", change), "cpu")


def test_act_order_indices_without_the_flag_are_refused(gptq_dir: Path, tmp_path: Path) -> None:
    """A g_idx that is not input // 128 (act order) is refused even where desc_act says false."""
    folder = edited_copy(gptq_dir, tmp_path / "m")
    tensors = load_file(str(folder / "model.safetensors"))
    key = "model.layers.0.mlp.down_proj.g_idx"  # 256 inputs: two groups to permute
    tensors[key] = tensors[key][torch.randperm(tensors[key].numel(), generator=torch.Generator().manual_seed(0))]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(UnsupportedModel, match="g_idx' is not input // 128"):
        make_engine(folder, "cpu")


def test_quantized_tensors_without_a_config_and_exl2_are_refused(gptq_dir: Path, tmp_path: Path) -> None:
    """Packed tensors with no quantization_config, and ExLlamaV2's EXL2 tensors, are refused by name."""
    folder = edited_copy(gptq_dir, tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["quantization_config"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModel, match="names no quantization method"):
        make_engine(folder, "cpu")
    tensors = load_file(str(folder / "model.safetensors"))
    prefix = "model.layers.0.self_attn.q_proj."
    tensors[prefix + "q_weight"] = tensors.pop(prefix + "qweight")
    tensors[prefix + "q_groups"] = torch.zeros(2, dtype=torch.int16)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(UnsupportedModel, match="ExLlamaV2"):
        make_engine(folder, "cpu")


def test_quantize_setting_is_checked(gptq_dir: Path, dense_dirs: dict[str, Path]) -> None:
    """quantize on an already quantized folder, or an unknown kind, is refused with the reason."""
    with pytest.raises(UnsupportedModel, match="already quantized"):
        make_engine(gptq_dir, "cpu", quantize="int8")
    with pytest.raises(UnsupportedModel, match="unknown quantize 'int3'"):
        make_engine(dense_dirs["llama"], "cpu", quantize="int3")
