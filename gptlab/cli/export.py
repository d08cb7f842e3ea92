"""`gptlab export`: a model dir in another runtime's format (GGUF: gptlab/formats/gguf_export.py) or as gptlab's own
int8 / int4 model dir (gptlab/formats/quantized.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from gptlab.cli import command
from gptlab.errors import GptlabError


@command("export")
def export_command(model: str, out: str | None = None, format: Literal["gguf", "int8", "int4"] = "gguf",
                   outtype: Literal["f32", "f16", "bf16", "q8_0"] | None = None, overwrite: bool = False) -> int:
    """Export MODEL (an HF model dir or hub id) as a GGUF file llama.cpp runs, or as an int8 / int4 model dir.

      gptlab export out/python-docs/final -o python-docs.gguf --outtype q8_0
      gptlab export out/python-docs/final --format int8 -o out/python-docs/int8

    GGUF: GPT-2, GPT-NeoX, Qwen2, Qwen3, Qwen2-MoE and Qwen3-MoE models; weights, hyperparameters, the tokenizer and
    its chat template. int8 / int4: the model's integer weights and scales as `--quantize` makes them, in a dir
    that gptlab opens directly (generate, chat, eval, serve, info) and other tools refuse (docs/export.md).

    Args:
        model: HF model dir or hub id
        out: the .gguf file (--format gguf) or the directory (int8, int4) to write
        format: gguf, int8 (one scale per output channel) or int4 (one scale per 32 weights)
        outtype: gguf only: f32 (default), f16, bf16, or q8_0 (llama.cpp's 8-bit blocks); 1-D tensors stay f32
        overwrite: replace an existing -o directory that gptlab did not write (int8, int4)
    """
    from gptlab.formats import hf
    from gptlab.formats.files import read_json

    if out is None:
        raise GptlabError("pass -o FILE.gguf, the file to write" if format == "gguf" else
                          f"pass -o DIR, the {format} model directory to write")
    if format != "gguf" and outtype is not None:
        raise GptlabError(f"--outtype chooses the GGUF tensor type; --format {format} writes {format} weights")
    path = hf.resolve(model)
    stored = _stored_scheme(path)
    if stored:  # gptlab's integers: rounding them again, or widening them for llama.cpp, only loses precision
        raise GptlabError(f"{model} already holds {stored} weights (a gptlab {stored} dir); export from the original "
                          f"model it was made from")
    if format == "gguf":
        return _gguf(model, path, out, outtype or "f32")

    from gptlab.formats.files import check_destination
    from gptlab.formats.quantized import dir_model_type
    from gptlab.models.quant import SCHEMES
    from gptlab.tokenizer import load_tokenizer

    dest = Path(out)
    if dest.exists() and dest.resolve() == path.resolve():
        raise GptlabError(f"-o {out} is the model being exported; choose a new directory")
    ours = (dest / "config.json").is_file() and \
        read_json(dest / "config.json").get("model_type") in [dir_model_type(s) for s in SCHEMES]  # an earlier export
    check_destination(dest, (), f"the {format} model dir", overwrite or ours)
    tok = load_tokenizer(model)
    m = hf.load(model, quantize=format)  # in the checkpoint's dtype, as `--quantize` loads it
    hf.save(m, dest, tokenizer=tok)
    size = (dest / "model.safetensors").stat().st_size
    before = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    print(f"wrote {dest} ({format}: model.safetensors {size / 1e6:.1f} MB; the original's weights "
          f"{before / 1e6:.1f} MB)")
    return 0


def _stored_scheme(path: Path) -> str | None:
    """int8 / int4 for a gptlab-quantized dir, else None."""
    from gptlab.formats.quantized import stored_in

    stored = stored_in(path)
    return stored.scheme if stored else None


def _gguf(model: str, path: Path, out: str, outtype: str) -> int:
    from gptlab.formats import hf
    from gptlab.formats.files import read_json
    from gptlab.formats.gguf_export import check_exportable, export_gguf
    from gptlab.tokenizer import load_tokenizer

    check_exportable(hf.read_config(path))  # a family or layout llama.cpp cannot run: said before any loading
    tok = load_tokenizer(model)
    m = hf.load(model, dtype="float32")
    template = None
    cfg_file = path / "tokenizer_config.json"
    if cfg_file.is_file():
        template = read_json(cfg_file).get("chat_template")
        template = template if isinstance(template, str) else None
    written = export_gguf(m, tok, out, outtype=outtype, chat_template=template, name=path.name)
    print(f"wrote {written} ({written.stat().st_size / 1e6:.1f} MB, {outtype})")
    return 0
