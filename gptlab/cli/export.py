"""`gptlab export`: a model dir in another runtime's format (gptlab/formats/gguf_export.py)."""

from __future__ import annotations

from typing import Literal

from gptlab.cli import command
from gptlab.errors import GptlabError


@command("export")
def export_command(model: str, out: str | None = None, format: Literal["gguf"] = "gguf",
                   outtype: Literal["f32", "f16", "bf16", "q8_0"] = "f32") -> int:
    """Export MODEL (an HF model dir or hub id) as a GGUF file llama.cpp runs.

      gptlab export out/python-docs/final -o python-docs.gguf --outtype q8_0

    GPT-2, Qwen2 and Qwen3 (dense) models; weights, hyperparameters, the tokenizer and its chat template.

    Args:
        model: HF model dir or hub id
        out: the .gguf file to write
        format: gguf
        outtype: f32, f16, bf16, or q8_0 (llama.cpp's 8-bit blocks); 1-D tensors stay f32
    """
    from gptlab.formats import hf
    from gptlab.formats.gguf_export import export_gguf
    from gptlab.tokenizer import load_tokenizer

    if out is None:
        raise GptlabError("pass -o FILE.gguf, the file to write")
    tok = load_tokenizer(model)
    m = hf.load(model, dtype="float32")
    path = hf.resolve(model)
    template = None
    cfg_file = path / "tokenizer_config.json"
    if cfg_file.is_file():
        from gptlab.formats.files import read_json

        template = read_json(cfg_file).get("chat_template")
        template = template if isinstance(template, str) else None
    written = export_gguf(m, tok, out, outtype=outtype, chat_template=template, name=path.name)
    print(f"wrote {written} ({written.stat().st_size / 1e6:.1f} MB, {outtype})")
    return 0
