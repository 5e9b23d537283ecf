"""How a model folder's projection weights load: dense, from an AWQ or GPTQ checkpoint, or quantized
at load time (`EngineConfig.quantize`). Owns the list of quantized layouts read and the refusals.

Read (Hugging Face layouts, every family `config` supports; see `quant.QuantWeight` for the target):

- AWQ, GEMM version, 4-bit, group 128, zero point: `qweight` int32 [in, out / 8] and `qzeros`
  int32 [in / 128, out / 8] hold eight 4-bit codes per word along the outputs, in AWQ's interleaved
  order (output column c of a word sits at bits 4 * (0, 4, 1, 5, 2, 6, 3, 7)[c]); `scales` fp16
  [in / 128, out]. W[o, i] = (q[i, o] - z[i / 128, o]) * s[i / 128, o].
- GPTQ, 4-bit, group 128, desc_act false: `qweight` int32 [in / 8, out] holds eight codes per
  word along the inputs (input 8r + j at bits 4j), `qzeros` int32 [in / 128, out / 8] eight per
  word along the outputs (same order), `scales` fp16 [in / 128, out], `g_idx` int32 [in] (i / 128).
  The v1 checkpoint format (checkpoint_format "gptq", AutoGPTQ's) stores each zero point minus one;
  GPTQModel's "gptq_v2" stores it as is.

Refused, with the reason: other methods, bit widths and group sizes, AWQ GEMV/Marlin/ExLlama
packings and llm-awq's, act-order GPTQ (desc_act true: the groups are a permutation of the
inputs), GPTQ packed for one kernel (Marlin, BitBLAS...), ExLlamaV2's EXL2 tensors, and
quantizing a quantized folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from .config import UnsupportedModel
from .quant import QUANTIZE_KINDS, QuantKind, QuantWeight, Weight, quantize_rtn

__all__ = ["AWQ_SHIFTS", "DENSE", "QuantScheme", "load_linear", "read_quantization_config", "scheme_for"]

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # the output column held by the code at bits 4i of an AWQ word
AWQ_SHIFTS = tuple(4 * AWQ_ORDER.index(c) for c in range(8))  # bits of output column c: 0, 16, 4, 20, ...
_GPTQ_FORMATS = {"gptq": 1, "gptq_v2": 0}  # checkpoint_format -> what was subtracted from each zero point
_SUPPORTED = ("AWQ (GEMM, 4-bit, group 128, zero point) and GPTQ (4-bit, group 128, desc_act false, "
              "checkpoint format gptq or gptq_v2)")


@dataclass(frozen=True)
class QuantScheme:
    """How the projection weights of one folder load."""

    method: Literal["dense", "awq", "gptq", "rtn"]
    kind: QuantKind | None = None  # rtn: what to quantize into
    zero_offset: int = 0  # gptq: added to each stored zero point (1 for the v1 format)

    @property
    def weight_kind(self) -> QuantKind | None:
        """What the projections hold once loaded (None: dense), for `quant.planned_nbytes`."""
        return "int4" if self.method in ("awq", "gptq") else self.kind

    @property
    def head_kind(self) -> QuantKind | None:
        """What the embedding table and an untied vocab head hold: quantizing at load takes them too
        (each is 1 GiB of an 8B model in bf16, a fifth of its int4 weights); an AWQ/GPTQ folder's dense
        ones stay dense."""
        return self.kind if self.method == "rtn" else None

    @property
    def label(self) -> str:
        """What the engine reports: dense, awq-int4-g128, gptq-int4-g128, int8, int4, fp8."""
        if self.method in ("awq", "gptq"):
            return f"{self.method}-int4-g128"
        return self.kind or "dense"


DENSE = QuantScheme("dense")


def read_quantization_config(path: Path) -> dict[str, Any] | None:
    """The folder's quantization settings: config.json's quantization_config, else AutoGPTQ's
    quantize_config.json or AutoAWQ's quant_config.json; None for a dense folder."""
    config = path / "config.json"
    if config.exists():
        q = json.loads(config.read_text(encoding="utf-8")).get("quantization_config")
        if q:
            return dict(q)
    for name, method in (("quantize_config.json", "gptq"), ("quant_config.json", "awq")):
        f = path / name
        if f.exists():
            q = json.loads(f.read_text(encoding="utf-8"))
            return {"quant_method": method, **q}
    return None


def scheme_for(path: Path, quantize: str | None) -> QuantScheme:
    """The scheme of a folder, or UnsupportedModel saying why it cannot load."""
    if quantize is not None and quantize not in QUANTIZE_KINDS:
        raise UnsupportedModel(f"unknown quantize '{quantize}' (supported: {', '.join(QUANTIZE_KINDS)})")
    cfg = read_quantization_config(path)
    if cfg is None:
        return DENSE if quantize is None else QuantScheme("rtn", kind=quantize)  # type: ignore[arg-type]
    method = str(cfg.get("quant_method", "")).lower()
    if quantize is not None:
        raise UnsupportedModel(f"{path} is already quantized ({method or 'unknown method'}); quantize "
                               f"'{quantize}' applies to bf16/fp16/fp32 folders only")
    if method == "awq":
        return _awq_scheme(cfg)
    if method == "gptq":
        return _gptq_scheme(cfg)
    raise UnsupportedModel(f"quantization method '{method or 'unknown'}' is not supported; loraloom reads "
                           f"{_SUPPORTED}, or quantizes a bf16 folder at load (quantize {'|'.join(QUANTIZE_KINDS)})")


def _common(cfg: dict[str, Any], method: str, bits_key: str, group_key: str) -> None:
    bits = cfg.get("bits", cfg.get(bits_key))
    group = cfg.get("group_size", cfg.get(group_key))
    if bits != 4:
        raise UnsupportedModel(f"{method} with {bits}-bit weights is not supported: only 4-bit ({_SUPPORTED})")
    if group != 128:
        what = "per-channel scales (group_size -1)" if group == -1 else f"group size {group}"
        raise UnsupportedModel(f"{method} with {what} is not supported: only groups of 128 ({_SUPPORTED})")


def _awq_scheme(cfg: dict[str, Any]) -> QuantScheme:
    _common(cfg, "AWQ", "w_bit", "q_group_size")
    version = str(cfg.get("version", "gemm")).lower()
    if version != "gemm":
        raise UnsupportedModel(f"AWQ version '{version}' packs its weights for another kernel; only the GEMM "
                               "version is read (re-export the model with version 'gemm')")
    if str(cfg.get("backend", "")).lower() == "llm-awq":
        raise UnsupportedModel("AWQ packed by llm-awq (MIT's original kernels) orders its words differently; only "
                               "AutoAWQ's GEMM layout is read")
    if not cfg.get("zero_point", True):
        raise UnsupportedModel("AWQ without zero points (zero_point false) is not supported; only the "
                               "default zero-point quantization is read")
    return QuantScheme("awq")


def _gptq_scheme(cfg: dict[str, Any]) -> QuantScheme:
    _common(cfg, "GPTQ", "w_bit", "q_group_size")
    if cfg.get("desc_act") or cfg.get("act_order"):
        raise UnsupportedModel("act-order GPTQ (desc_act true) is not supported: its groups are a permutation of "
                               "the input columns (g_idx), which the group-wise kernels do not follow; use a "
                               "checkpoint quantized with desc_act false")
    fmt = str(cfg.get("checkpoint_format", cfg.get("format", "gptq"))).lower()
    if fmt not in _GPTQ_FORMATS:
        raise UnsupportedModel(f"GPTQ checkpoint format '{fmt}' is packed for one kernel; only the plain 'gptq' "
                               "and 'gptq_v2' formats are read")
    return QuantScheme("gptq", zero_offset=_GPTQ_FORMATS[fmt])


# -- loading one projection ----------------------------------------------------------------------

def load_linear(tensors: dict[str, torch.Tensor], prefix: str, scheme: QuantScheme, *, device: torch.device,
                dtype: torch.dtype) -> Weight:
    """The weight of projection `prefix` (e.g. model.layers.0.self_attn.q_proj.) as the scheme says,
    on `device`; its entries leave `tensors`. A dense weight in a quantized checkpoint (AWQ's
    modules_to_not_convert) loads dense."""
    if prefix + "weight" in tensors:
        weight = tensors.pop(prefix + "weight")
        if scheme.method == "rtn":
            assert scheme.kind is not None
            return quantize_rtn(weight.to(device), scheme.kind, dtype)
        return weight.to(device=device, dtype=dtype)
    if prefix + "q_weight" in tensors or prefix + "q_groups" in tensors:
        raise UnsupportedModel(f"'{prefix}' holds ExLlamaV2 (EXL2) tensors; loraloom reads {_SUPPORTED}")
    if prefix + "qweight" not in tensors:
        raise UnsupportedModel(f"weight '{prefix}weight' is missing from the model files")
    if scheme.method not in ("awq", "gptq"):
        raise UnsupportedModel(f"'{prefix}qweight' is a quantized tensor but the folder's config names no "
                               f"quantization method (quantization_config); loraloom reads {_SUPPORTED}")
    parts = {k: tensors.pop(prefix + k) for k in ("qweight", "qzeros", "scales", "g_idx") if prefix + k in tensors}
    for k in ("qzeros", "scales"):
        if k not in parts:
            raise UnsupportedModel(f"'{prefix}{k}' is missing from the {scheme.method.upper()} checkpoint")
    parts = {k: v.to(device) for k, v in parts.items()}
    if scheme.method == "awq":
        return awq_to_quant(parts["qweight"], parts["qzeros"], parts["scales"], dtype=dtype, name=prefix)
    return gptq_to_quant(parts["qweight"], parts["qzeros"], parts["scales"], parts.get("g_idx"),
                         zero_offset=scheme.zero_offset, dtype=dtype, name=prefix)


def _unpack_words(words: torch.Tensor, shifts: tuple[int, ...]) -> torch.Tensor:
    """int32 [..., n] -> uint8 [..., n, 8]: the 4-bit codes at `shifts` of each word."""
    s = torch.tensor(shifts, dtype=torch.int32, device=words.device)
    return ((words.contiguous().unsqueeze(-1) >> s) & 0xF).to(torch.uint8)


def _pack_inputs(q_in_out: torch.Tensor) -> torch.Tensor:
    """Codes [in, out] -> QuantWeight's [out, in / 2] bytes."""
    q = q_in_out.t()
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def _check(name: str, t: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
    if tuple(t.shape) != shape:
        raise UnsupportedModel(f"'{name}{what}' has shape {tuple(t.shape)}, expected {shape} for 4-bit groups "
                               "of 128; the checkpoint is not in the layout its config names")


def _shape_in_out(name: str, scales: torch.Tensor, words: torch.Tensor) -> tuple[int, int, int]:
    if words.dtype != torch.int32:
        raise UnsupportedModel(f"'{name}qweight' is {words.dtype}; 4-bit checkpoints pack into int32")
    groups, out = scales.shape
    return groups * 128, out, groups


def awq_to_quant(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, *, dtype: torch.dtype,
                 name: str = "") -> QuantWeight:
    """An AWQ GEMM projection (see the module docstring) as a QuantWeight."""
    inp, out, groups = _shape_in_out(name, scales, qweight)
    _check(name, qweight, (inp, out // 8), "qweight")
    _check(name, qzeros, (groups, out // 8), "qzeros")
    q = _unpack_words(qweight, AWQ_SHIFTS).view(inp, out)
    z = _unpack_words(qzeros, AWQ_SHIFTS).view(groups, out)
    return QuantWeight("int4", _pack_inputs(q), scales.t().to(dtype).contiguous(), z.t().contiguous(), 128, inp)


def gptq_to_quant(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
                  *, zero_offset: int, dtype: torch.dtype, name: str = "") -> QuantWeight:
    """A GPTQ projection (see the module docstring) as a QuantWeight."""
    inp, out, groups = _shape_in_out(name, scales, qweight)
    _check(name, qweight, (inp // 8, out), "qweight")
    _check(name, qzeros, (groups, out // 8), "qzeros")
    if g_idx is not None:
        want = torch.arange(inp, device=g_idx.device) // 128
        if g_idx.shape != want.shape or not torch.equal(g_idx.to(want.dtype), want):
            raise UnsupportedModel(f"'{name}g_idx' is not input // 128: an act-order (desc_act) checkpoint, "
                                   "which is not supported")
    shifts = tuple(range(0, 32, 4))
    q = _unpack_words(qweight.t(), shifts).view(out, inp)  # word r of column o: inputs 8r..8r+7
    z = _unpack_words(qzeros, shifts).view(groups, out) + zero_offset
    codes = (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()
    return QuantWeight("int4", codes, scales.t().to(dtype).contiguous(), z.t().contiguous(), 128, inp)
