"""A pre-quantized model directory: every linear layer's weight in NF4 (or int8), written the way transformers'
``save_pretrained`` writes a bitsandbytes model (``mindspore_llm.quant``), so that ``from_pretrained(DST)`` (ours,
or transformers' with bitsandbytes installed) loads it without the original. Streamed: one weight is held in
float32 at a time, everything else goes through the 64 MB chunks of the converter.
"""
from __future__ import annotations

from pathlib import Path

from ckpt_tools.convert import (DTYPES, LAYOUTS, open_files, plan, read_config, read_float32, source_chunks,
                                view_of, write_side_files)
from mindspore_llm.checkpoint_writer import OutTensor, write_checkpoint
from mindspore_llm.fileio import atomic_directory
from mindspore_llm.models.config import config_from_hf
from mindspore_llm.models.naming import OURS, LayoutOptions, tensor_layout
from mindspore_llm.models.quantized import quantized_weight_shapes
from mindspore_llm.quant import (QuantizationConfig, bnb_shapes, bnb_tensors, check_shape, hf_quantization_config,
                                 quantize)


def quantize_checkpoint(src: str | Path, dst: str | Path, config: QuantizationConfig, *, dtype: str | None = None,
                        max_shard_bytes: int = 4 << 30, overwrite: bool = False, quiet: bool = False,
                        workers: int = 2, fsync: bool = False) -> dict:
    """Model directory `src` (Hugging Face, `msllm-ckpt hf2ms` output, any naming) -> directory `dst` in Hugging
    Face names with its linear weights quantized; the other tensors as stored (or cast to `dtype`). Returns the
    manifest written."""
    from tqdm import tqdm

    src = Path(src)
    hf_config = read_config(src)
    source_file = str(src / "config.json")
    model_config = config_from_hf(hf_config, source_file)
    view = view_of(open_files(src, allow_pickle=False), model_config, LayoutOptions(), source_file)
    view.notice()
    sources = plan(view, tensor_layout(model_config, OURS), DTYPES.get(dtype))
    targets = dict(quantized_weight_shapes(model_config))
    for name, shape in targets.items():  # every weight checked before anything is written
        check_shape(shape, f"{source_file}: {name}")
    outputs, origin = [], {}  # output name -> (its source, the bitsandbytes tensor it is, None: as the source)
    for source in sources:
        name = source.out.name
        if name not in targets:
            outputs.append(source.out)
            origin[name] = (source, None)
            continue
        module = name[:-len(".weight")]
        for suffix, (shape, tag) in bnb_shapes(config, targets[name], source.out.dtype).items():
            outputs.append(OutTensor(f"{module}.{suffix}", shape, tag))
            origin[f"{module}.{suffix}"] = (source, suffix)
    quantized = {}  # the bitsandbytes tensors of the weight being written (its tensors are written one after another)

    def chunks(tensor: OutTensor):
        source, suffix = origin[tensor.name]
        if suffix is None:
            yield from source_chunks(source)
            return
        if quantized.get("source") is not source:
            quantized.clear()
            arrays = quantize(read_float32(source), config)
            quantized.update(source=source, tensors=bnb_tensors(arrays, config, targets[source.out.name],
                                                                source.out.dtype))
        yield quantized["tensors"][suffix]

    compute = next((s.out.dtype for s in sources if s.out.name in targets), "F32")
    description = f"quantize {config.method}" + (" double-quant" if config.double_quant else "")
    with atomic_directory(dst, overwrite=overwrite, fsync=fsync) as tmp, \
            tqdm(total=sum(t.nbytes for t in outputs), unit="B", unit_scale=True, unit_divisor=1024,
                 desc=description, disable=quiet) as bar:
        manifest = write_checkpoint(tmp, outputs, LAYOUTS[("safetensors", "hf")], max_shard_bytes, chunks, bar,
                                    {"format": "safetensors", "naming": OURS, "source": str(src),
                                     "quantization": {"method": config.method, "double_quant": config.double_quant}},
                                    workers)
        # the source's own quantization_config (FP8 DeepSeek) gives way: its weights are dequantized on the way
        write_side_files({**hf_config, "quantization_config": hf_quantization_config(config, compute)}, [src], tmp,
                         dequantized=False)
    return manifest
