"""Weight quantization for a frozen base (QLoRA): NF4 with optional double quantization, and int8 per output
channel. NumPy only; the numbers are bitsandbytes' on the CPU, bit for bit, and so is the checkpoint layout.

NF4 (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314, section 3): a weight is cut into blocks of 64
consecutive values along its rows; each block keeps its absmax and each value the nearest of the 16 NF4 code values
(quantiles of N(0, 1) scaled to [-1, 1], zero exact) to value / absmax, two codes per byte (the first in the high
nibble). Double quantization stores those absmax values as 8-bit codes of the signed dynamic map (Dettmers 2016)
after subtracting their mean, with one fp32 absmax per block of 256: 0.5 + 8/64/8 + 4/(64*256) bytes per weight
instead of 0.5 + 4/64. The weight is w = NF4[code] * absmax, and with double quantization
absmax = DYNAMIC[absmax_code] * nested_absmax + offset, all in fp32 as bitsandbytes' ``dequantize_4bit``.

int8: one absmax per output row, codes round(w * 127 / absmax) (half to even), w = code * absmax / 127, as
bitsandbytes' ``int8_vectorwise_quant`` / ``int8_vectorwise_dequant`` (LLM.int8 without its outlier columns).

Arrays of one (out, in) weight, by the name the model's quantized weight Cells give them:
  nf4:  codes (out, in/2) uint8, absmax (out, in/64) float32, or with double quantization absmax (out, in/64)
        uint8, nested_absmax (ceil(out*in/64/256),) float32, nested_offset () float32
  int8: codes (out, in) int8, absmax (out,) float32
Blocks never straddle rows (in_features must be a multiple of 64), so a weight split by rows or by whole blocks of
columns splits its codes and absmax the same way (``mindspore_llm.parallel.plan``).

On disk, a quantized checkpoint is what transformers' ``save_pretrained`` writes for a bitsandbytes model
(``weight``, ``weight.absmax``, ``weight.quant_map``, ``weight.nested_absmax``, ``weight.nested_quant_map``,
``weight.quant_state.bitsandbytes__nf4``; int8: ``weight``, ``SCB``, ``weight_format``), with its
``quantization_config`` in config.json: either side loads the other's.
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from typing import Any, Literal, Mapping

import numpy as np

from mindspore_llm.common import CheckpointError, ConfigError
from mindspore_llm.config_utils import require

METHODS = ("nf4", "int8")
BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256
ROWS_BYTES = 16 << 20  # rows of a weight quantized at a time: bounds the float temporaries

# bitsandbytes.functional.get_4bit_type("nf4"): create_normal_map(offset=0.9677083, use_extra_value=True).
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
    0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)
# Nearest code = the number of midpoints below the value (a value on a midpoint takes the lower code), as
# bitsandbytes' quantize_4bit (torch.bucketize over these fp32 midpoints).
_NF4_MIDPOINTS = (NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2)
_PREFIX_BITS = 20


@functools.cache
def _nf4_prefix_codes() -> np.ndarray:
    """The NF4 code of every float32 whose top 20 bits are the index, or 255 for the few prefixes whose floats
    straddle a midpoint: one table lookup instead of a search per value, the same codes (3-4x faster)."""
    shift = np.uint32(32 - _PREFIX_BITS)
    prefixes = np.arange(1 << _PREFIX_BITS, dtype=np.uint32) << shift
    with np.errstate(invalid="ignore"):  # the NaN prefixes: never looked up, values are clipped to [-1, 1]
        low = np.searchsorted(_NF4_MIDPOINTS, prefixes.view(np.float32))
        high = np.searchsorted(_NF4_MIDPOINTS, (prefixes | np.uint32((1 << shift) - 1)).view(np.float32))
    return np.where(low == high, low, 255).astype(np.uint8)


def _nf4_codes(scaled: np.ndarray) -> np.ndarray:
    """The NF4 code (0..15) of each value of `scaled` (float32 in [-1, 1], contiguous)."""
    codes = _nf4_prefix_codes()[scaled.view(np.uint32) >> np.uint32(32 - _PREFIX_BITS)]
    straddling = np.flatnonzero(codes == 255)
    codes.reshape(-1)[straddling] = np.searchsorted(_NF4_MIDPOINTS, scaled.reshape(-1)[straddling], side="left")
    return codes


def dynamic_map() -> np.ndarray:
    """The 256 values of bitsandbytes' signed dynamic map, ``create_dynamic_map()``: for exponents 10^-6 .. 10^0,
    2^i midpoints of an even split of [0.1, 1] each, mirrored, plus 0 and 1, sorted."""
    f32 = np.float32
    values = []
    for i in range(7):
        steps = 2 ** i + 1
        step = (f32(1) - f32(0.1)) / f32(steps - 1)
        k = np.arange(steps, dtype=np.float64)
        # torch.linspace: start + k * step for the first half, end - (steps - 1 - k) * step for the rest, rounded
        # once (a fused multiply-add); float64 holds those products and sums exactly
        bounds = np.where(k < steps // 2, np.float64(f32(0.1)) + k * np.float64(step),
                          1.0 - (steps - 1 - k) * np.float64(step)).astype(f32)
        means = (bounds[:-1] + bounds[1:]) / f32(2)
        scaled = means * f32(10.0 ** (i - 6))
        values += [scaled, -scaled]
    return np.sort(np.concatenate(values + [np.array([0.0, 1.0], f32)])).astype(f32)


DYNAMIC_MAP = dynamic_map()


def _dynamic_lookup() -> np.ndarray:
    """bitsandbytes' CPU kernel (csrc/cpu_ops.cpp, quantize_cpu) does not search the map per value: it rounds the
    normalised value to one of 65536 points evenly spread over [-1, 1] and takes the code nearest that point from a
    table. Its CUDA kernel searches the map itself; the two differ on about 2% of values, by one code step. The
    CPU kernel is the reference here (it is the one that runs where the tests run)."""
    f32 = np.float32
    points = f32(-1) + (f32(2) * np.arange(65536, dtype=f32)) / f32(65535)
    midpoints = f32(0.5) * (DYNAMIC_MAP[:-1] + DYNAMIC_MAP[1:])
    return np.searchsorted(midpoints, points, side="left").astype(np.uint8)


_DYNAMIC_LOOKUP = _dynamic_lookup()


@dataclass(kw_only=True)
class QuantizationConfig:
    """How a frozen base is held: ``nf4`` (4-bit NormalFloat, blocks of 64) or ``int8`` (per output channel)."""

    method: Literal["nf4", "int8"] = "nf4"
    double_quant: bool = False  # nf4: the block absmax values in 8 bits too (QLoRA's double quantization)

    def validate(self) -> None:
        require(self.method in METHODS, f"method: {self.method!r} is not one of {', '.join(METHODS)}")
        require(not (self.double_quant and self.method != "nf4"),
                f"double_quant: applies to nf4 only, not {self.method}")

    @classmethod
    def of(cls, value: str | QuantizationConfig) -> QuantizationConfig:
        """A config from the method name ("nf4", "int8": without double quantization) or a config."""
        config = value if isinstance(value, QuantizationConfig) else cls(method=value)
        try:
            config.validate()
        except ConfigError as err:
            raise ConfigError(f"quantization: {err}") from None
        return config

    def shapes(self, out_features: int, in_features: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """name -> (shape, dtype) of the arrays that hold one (out, in) weight."""
        if self.method == "int8":
            return {"codes": ((out_features, in_features), np.dtype(np.int8)),
                    "absmax": ((out_features,), np.dtype(np.float32))}
        blocks = in_features // BLOCKSIZE
        if not self.double_quant:
            return {"codes": ((out_features, in_features // 2), np.dtype(np.uint8)),
                    "absmax": ((out_features, blocks), np.dtype(np.float32))}
        return {"codes": ((out_features, in_features // 2), np.dtype(np.uint8)),
                "absmax": ((out_features, blocks), np.dtype(np.uint8)),
                "nested_absmax": ((-(-out_features * blocks // NESTED_BLOCKSIZE),), np.dtype(np.float32)),
                "nested_offset": ((), np.dtype(np.float32))}


def check_shape(shape: tuple[int, ...], where: str) -> None:
    """A quantized weight is 2-D with rows made of whole blocks of 64."""
    if len(shape) != 2 or shape[1] % BLOCKSIZE:
        raise ConfigError(f"{where}: a weight of shape {list(shape)} cannot be quantized: in_features must be a "
                          f"multiple of the block size {BLOCKSIZE}")


def _row_chunks(rows: int, columns: int):
    step = max(1, ROWS_BYTES // (4 * columns))
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


def quantize(weight: np.ndarray, config: QuantizationConfig) -> dict[str, np.ndarray]:
    """The arrays holding `weight` (out, in), float32 or anything that converts to it exactly (bf16, fp16)."""
    check_shape(weight.shape, "quantize")
    return (_quantize_int8 if config.method == "int8" else _quantize_nf4)(weight, config)


def _quantize_nf4(weight: np.ndarray, config: QuantizationConfig) -> dict[str, np.ndarray]:
    rows, columns = weight.shape
    codes = np.empty((rows, columns // 2), np.uint8)
    absmax = np.empty((rows, columns // BLOCKSIZE), np.float32)
    for start, stop in _row_chunks(rows, columns):
        blocks = np.asarray(weight[start:stop], np.float32).reshape(-1, BLOCKSIZE)
        block_absmax = np.maximum(blocks.max(axis=1), -blocks.min(axis=1))
        # bitsandbytes: clamp(A * (1 / absmax.clamp(min=1e-38)), -1, 1); an all-zero block gets the code of 0
        inverse = np.float32(1) / np.maximum(block_absmax, np.float32(1e-38))
        scaled = blocks * inverse[:, None]
        np.clip(scaled, np.float32(-1), np.float32(1), out=scaled)
        nibbles = _nf4_codes(scaled).reshape(stop - start, -1)
        codes[start:stop] = (nibbles[:, 0::2] << 4) | nibbles[:, 1::2]
        absmax[start:stop] = block_absmax.reshape(stop - start, -1)
    if not config.double_quant:
        return {"codes": codes, "absmax": absmax}
    # bitsandbytes subtracts absmax.mean() computed by torch in float32, whose rounding depends on the CPU's vector
    # width; the exactly rounded mean is used here (the two agree whenever the float32 sum is exact)
    offset = np.float32(absmax.mean(dtype=np.float64))
    nested_codes, nested_absmax = _quantize_dynamic(absmax.reshape(-1) - offset, NESTED_BLOCKSIZE)
    return {"codes": codes, "absmax": nested_codes.reshape(absmax.shape), "nested_absmax": nested_absmax,
            "nested_offset": np.array(offset, np.float32)}


def _quantize_dynamic(values: np.ndarray, blocksize: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 codes of the dynamic map, float32 absmax per block) of flat `values`: bitsandbytes'
    ``quantize_blockwise`` on the CPU (a shorter last block; an all-zero block gets code 0)."""
    f32 = np.float32
    padded = np.zeros(-(-len(values) // blocksize) * blocksize, f32)
    padded[:len(values)] = values
    blocks = padded.reshape(-1, blocksize)
    absmax = np.abs(blocks).max(axis=1)
    with np.errstate(divide="ignore"):
        inverse = np.where(absmax > 0, f32(1) / absmax, f32(0))
    normalised = np.clip(blocks * inverse[:, None], f32(-1), f32(1))
    points = ((normalised + f32(1)) * f32(0.5) * f32(65535) + f32(0.5)).astype(np.uint16)
    codes = np.where(absmax[:, None] > 0, _DYNAMIC_LOOKUP[points], np.uint8(0))
    return codes.reshape(-1)[:len(values)].astype(np.uint8), absmax.astype(f32)


def _quantize_int8(weight: np.ndarray, config: QuantizationConfig) -> dict[str, np.ndarray]:
    rows, columns = weight.shape
    codes = np.empty((rows, columns), np.int8)
    absmax = np.empty(rows, np.float32)
    for start, stop in _row_chunks(rows, columns):
        values = np.asarray(weight[start:stop], np.float32)
        row_absmax = np.abs(values).max(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            scaled = values * (np.float32(127) / row_absmax)[:, None]
        codes[start:stop] = np.where(row_absmax[:, None] > 0, np.rint(scaled), 0).astype(np.int8)
        absmax[start:stop] = row_absmax
    return {"codes": codes, "absmax": absmax}


# ----------------------------------------------------------------------------------------------------------------
# bitsandbytes' checkpoint layout (transformers' save_pretrained of a load_in_4bit / load_in_8bit model)

QUANT_STATE = "weight.quant_state.bitsandbytes__nf4"
TORCH_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
# A nested offset's repr is at most this long ("-1.2345678901234567e-300"): the JSON of a quant state is padded to
# its longest form, so its size is known before the offset is (a checkpoint writer plans files up front).
_LONGEST_OFFSET = -1.2345678901234567e-300


def bnb_suffixes(config: QuantizationConfig) -> list[str]:
    """Names of the tensors of one quantized linear layer, after its module path and a dot."""
    if config.method == "int8":
        return ["weight", "SCB", "weight_format"]
    return (["weight", "weight.absmax", "weight.quant_map"]
            + (["weight.nested_absmax", "weight.nested_quant_map"] if config.double_quant else []) + [QUANT_STATE])


def _quant_state(config: QuantizationConfig, shape: tuple[int, int], dtype: str, offset: float) -> np.ndarray:
    state = {"quant_type": "nf4", "blocksize": BLOCKSIZE, "dtype": TORCH_DTYPES[dtype], "shape": list(shape)}
    if config.double_quant:
        state.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=offset)
    size = len(json.dumps({**state, "nested_offset": _LONGEST_OFFSET} if config.double_quant else state))
    return np.frombuffer(json.dumps(state).ljust(size).encode(), np.uint8)


def bnb_shapes(config: QuantizationConfig, shape: tuple[int, int],
               dtype: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """suffix -> (shape, safetensors dtype) of each tensor ``bnb_tensors`` writes for an (out, in) weight."""
    out_features, in_features = shape
    if config.method == "int8":
        return {"weight": (shape, "I8"), "SCB": ((out_features,), "F32"), "weight_format": ((), "U8")}
    ours = config.shapes(out_features, in_features)
    shapes = {"weight": ((math.prod(shape) // 2, 1), "U8"),
              "weight.absmax": ((math.prod(ours["absmax"][0]),), "U8" if config.double_quant else "F32"),
              "weight.quant_map": ((16,), "F32")}
    if config.double_quant:
        shapes.update({"weight.nested_absmax": (ours["nested_absmax"][0], "F32"),
                       "weight.nested_quant_map": ((256,), "F32")})
    shapes[QUANT_STATE] = ((len(_quant_state(config, shape, dtype, 0.0)),), "U8")
    return shapes


def bnb_tensors(arrays: Mapping[str, np.ndarray], config: QuantizationConfig, shape: tuple[int, int],
                dtype: str) -> dict[str, np.ndarray]:
    """suffix -> array, as bitsandbytes stores the quantized (out, in) weight `arrays`; `dtype` (a safetensors tag)
    is the weight's own dtype, recorded in the quant state."""
    if config.method == "int8":
        return {"weight": arrays["codes"], "SCB": arrays["absmax"], "weight_format": np.array(0, np.uint8)}  # "row"
    tensors = {"weight": arrays["codes"].reshape(-1, 1), "weight.absmax": arrays["absmax"].reshape(-1),
               "weight.quant_map": NF4_CODE}
    if config.double_quant:
        tensors.update({"weight.nested_absmax": arrays["nested_absmax"], "weight.nested_quant_map": DYNAMIC_MAP})
    offset = float(arrays["nested_offset"]) if config.double_quant else 0.0
    tensors[QUANT_STATE] = _quant_state(config, shape, dtype, offset)
    return tensors


def from_bnb_tensors(tensors: Mapping[str, np.ndarray], shape: tuple[int, int], where: str
                     ) -> tuple[QuantizationConfig, dict[str, np.ndarray]]:
    """(its config, our arrays) of one layer's bitsandbytes tensors (suffix -> array) for an (out, in) weight; a
    format this module does not compute (fp4, another block size, another code) is an error naming `where`."""
    if "SCB" in tensors:
        if int(tensors.get("weight_format", np.array(0))) != 0:
            raise CheckpointError(f"{where}: int8 weight_format {int(tensors['weight_format'])} is not 'row' (0)")
        config = QuantizationConfig(method="int8")
        arrays = {"codes": tensors["weight"], "absmax": tensors["SCB"]}
    else:
        try:
            state = json.loads(bytes(tensors[QUANT_STATE]).decode())
        except (KeyError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{where}: no readable {QUANT_STATE} ({err})") from None
        expected = {"quant_type": "nf4", "blocksize": BLOCKSIZE, "shape": list(shape)}
        if "nested_offset" in state:
            expected["nested_blocksize"] = NESTED_BLOCKSIZE
        for key, value in expected.items():
            if state.get(key) != value:
                raise CheckpointError(f"{where}: quant state {key}={state.get(key)!r}; only {key}={value!r} is "
                                      f"supported (NF4, blocks of {BLOCKSIZE}, nested blocks of {NESTED_BLOCKSIZE})")
        config = QuantizationConfig(method="nf4", double_quant="nested_offset" in state)
        for name, code in (("weight.quant_map", NF4_CODE), ("weight.nested_quant_map", DYNAMIC_MAP)):
            if name in tensors and not np.array_equal(tensors[name], code):
                raise CheckpointError(f"{where}: {name} is not the code this module dequantizes with")
        arrays = {"codes": tensors["weight"], "absmax": tensors["weight.absmax"]}
        if config.double_quant:
            arrays.update(nested_absmax=tensors["weight.nested_absmax"],
                          nested_offset=np.array(state["nested_offset"], np.float32))
    for name, (expected_shape, dtype) in config.shapes(*shape).items():
        arrays[name] = np.asarray(arrays[name])
        if arrays[name].size != math.prod(expected_shape) or arrays[name].dtype != dtype:
            raise CheckpointError(f"{where}: {name} holds {arrays[name].size} {arrays[name].dtype} values, a {shape} "
                                  f"weight needs {math.prod(expected_shape)} {dtype}")
        arrays[name] = arrays[name].reshape(expected_shape)
    return config, arrays


def hf_quantization_config(config: QuantizationConfig, compute_dtype: str = "F32") -> dict[str, Any]:
    """config.json's ``quantization_config`` for transformers' bitsandbytes quantizer."""
    four_bit = config.method == "nf4"
    return {"quant_method": "bitsandbytes", "load_in_4bit": four_bit, "load_in_8bit": not four_bit,
            "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": config.double_quant,
            "bnb_4bit_compute_dtype": TORCH_DTYPES[compute_dtype], "bnb_4bit_quant_storage": "uint8",
            "llm_int8_threshold": 6.0, "llm_int8_has_fp16_weight": False, "llm_int8_skip_modules": None,
            "llm_int8_enable_fp32_cpu_offload": False}


def read_hf_quantization(hf: Mapping[str, Any], source: str) -> QuantizationConfig | None:
    """The quantization a config.json declares (None: not quantized); a kind this module cannot load is an error."""
    section = hf.get("quantization_config")
    if not section:
        return None
    if section.get("quant_method") != "bitsandbytes":
        return None  # e.g. DeepSeek-V3's FP8 (quant_method "fp8"): dequantized on load, not held quantized
    if section.get("load_in_8bit"):
        return QuantizationConfig(method="int8")
    if section.get("load_in_4bit") and section.get("bnb_4bit_quant_type", "fp4") == "nf4":
        return QuantizationConfig(method="nf4", double_quant=bool(section.get("bnb_4bit_use_double_quant")))
    raise ConfigError(f"{source}: quantization_config {dict(section)} is not NF4 or int8 bitsandbytes")
