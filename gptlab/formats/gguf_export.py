"""`gptlab export MODEL --format gguf`: a model dir as one GGUF file that llama.cpp (and what embeds it:
llama-cpp-python, ollama, LM Studio) runs, written with the `gguf` package from llama.cpp's repository.

Families: GPT-2, GPT-NeoX / Pythia, Qwen2, Qwen3, Qwen2-MoE, Qwen3-MoE: those llama.cpp has a graph for (it names a
gptj arch but builds no model for it, and has no GPT-Neo or GPT-1 arch). Each family module's GGUFSpec says what
llama.cpp's loader reads for the arch and which Config values its graph computes; a model outside those (a
Qwen3-MoE without renormalised top-k weights, dense layers in an MoE stack, a ReLU NeoX, ...) is refused by field
rather than written as a file that computes something else.

What goes in: the hyperparameters llama.cpp reads for the family (`{arch}.context_length`, ..., the expert
counts, use_parallel_residual), every weight under llama.cpp's name (fused q/k/v and gate/up rows split where
llama.cpp keeps them apart; stacked experts as its 3-D ffn_*_exps; a tied head copied and absent biases written
as zeros where its loader requires them), and the tokenizer: a byte-level BPE as `tokenizer.ggml.model = gpt2`
with its tokens, merges, token types (special tokens are CONTROL), BOS / EOS ids and the chat template.
llama.cpp picks its pre-tokenizer (the regex that splits text before BPE) by name, so the tokenizer's own split
is matched to one llama.cpp knows: GPT-2's (`gpt-2`; every tokenizer `gptlab train` makes) or Qwen2's (`qwen2`);
anything else is refused rather than written with a split that would give other token ids.

outtype: f32, f16 or bf16 for every matrix, or q8_0 (llama.cpp's 8-bit blocks of 32 with an fp16 scale; rows not
a multiple of 32 stay f16); norms, biases and other 1-D tensors, MoE routers and position tables stay f32, as
llama.cpp's own converter writes them. A gptlab int8 / int4 model is refused: GGUF is written from the original.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from gptlab.errors import GptlabError
from gptlab.formats import families

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
# the pre-tokenizer regex of Qwen2's tokenizer.json, as llama.cpp's `qwen2` pre-tokenizer implements it
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer, or a GptlabError saying what it is instead."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False):
        return "gpt-2"
    if pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers") or []
        kinds = [s.get("type") for s in steps]
        if kinds == ["Split", "ByteLevel"] and (steps[0].get("pattern") or {}).get("Regex") == QWEN2_SPLIT \
                and not steps[1].get("use_regex", True):
            return "qwen2"
    raise GptlabError(f"llama.cpp knows no pre-tokenizer matching this tokenizer's ({json.dumps(pre)[:200]}); only "
                      f"GPT-2's byte-level split and Qwen2's can be exported to GGUF")


def _tokenizer_json(tok) -> dict:
    backend = getattr(tok, "backend", None)
    if backend is None or not hasattr(backend, "to_str"):
        raise GptlabError("GGUF export needs a tokenizer.json tokenizer (byte-level BPE)")
    d = json.loads(backend.to_str())
    if (d.get("model") or {}).get("type") != "BPE":
        raise GptlabError(f"GGUF export writes byte-level BPE tokenizers; this one is {d.get('model', {}).get('type')}")
    return d


def _write_tokenizer(w, tok, config, chat_template: str | None) -> None:
    import gguf

    d = _tokenizer_json(tok)
    vocab: dict[str, int] = dict(d["model"]["vocab"])
    special = set()
    for added in d.get("added_tokens") or []:
        vocab[added["content"]] = added["id"]
        if added.get("special"):
            special.add(added["id"])
    n = max(config.vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(n)]  # ids the model has but the tokenizer never emits
    types = [gguf.TokenType.UNUSED] * n
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in d["model"].get("merges") or []]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre_tokenizer_name(d))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    eos = config.eos_token_id if config.eos_token_id is not None else getattr(tok, "eos_id", None)
    eos = eos[0] if isinstance(eos, list) else eos
    bos = config.bos_token_id if config.bos_token_id is not None else eos
    if eos is not None:
        w.add_eos_token_id(int(eos))
    if bos is not None:
        w.add_bos_token_id(int(bos))
    w.add_add_bos_token(False)  # GPT-2 and Qwen prompts start without one
    if chat_template:
        w.add_chat_template(chat_template)


def _split(name: str, t: torch.Tensor, config, parts: int) -> list[torch.Tensor]:
    """The GGUF tensors of one of ours: its output rows (dim 0 of a matrix or vector, dim 1 of stacked experts)
    split into q, k, v (three parts) or halves (two: a GLU's [gate; up])."""
    rows = 0 if t.ndim == 1 else -2
    if parts == 1:
        return [t]
    if parts == 3:  # fused q, k, v rows
        q, kv = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
        return list(t.split((q, kv, kv), dim=rows))
    if parts == 2:
        return list(t.chunk(2, dim=rows))
    raise GptlabError(f"cannot split {name} into {parts} GGUF tensors")


# tensors llama.cpp keeps in f32 whatever the file type (its converter's list): routers and position tables
F32_TENSORS = ("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight", "position_embd.weight")


def check_exportable(config, quantization: str | None = None):
    """The family's GGUFSpec, or one GptlabError saying why llama.cpp could not run this model as it is (checked
    from the config alone, before any weight is read). quantization: the model's gptlab int8 / int4, if any."""
    spec = families.get(config.model_type).gguf
    if quantization:
        raise GptlabError(f"this model holds {quantization} weights (gptlab's own format); export GGUF from the "
                          f"original model (--outtype q8_0 is llama.cpp's 8-bit form)")
    if spec is None:
        raise GptlabError(f"llama.cpp has no graph for {config.model_type} models, so they have no GGUF export (GGUF "
                          f"export: {', '.join(sorted(t for t, f in families.registry().items() if f.gguf))})")
    if any(config.window(i) for i in range(config.n_layer)):
        raise GptlabError("GGUF export of models with sliding-window layers is not supported")
    if config.positions == "rotary" and (config.rope_scaling != "default" or config.rotary_interleaved):
        raise GptlabError("GGUF export writes plain rotary positions rotating halves of each head; this model "
                          "scales them or rotates interleaved pairs")
    for field, allowed in spec.requires:
        value = getattr(config, field)
        if value not in allowed:
            raise GptlabError(f"llama.cpp's {spec.arch} graph cannot run this model: it computes {field}="
                              f"{' or '.join(repr(a) for a in allowed)}, this model has {value!r}")
    return spec


def _gguf_tensors(model, spec):
    """(GGUF name, tensor) for every tensor llama.cpp's loader reads for the arch, in the spec's order."""
    c, state = model.config, model.state_dict()
    written = set()
    for pattern, names in spec.tensors:
        for i in range(c.n_layer) if "{i}" in pattern else [None]:
            ours = pattern.format(i=i) if i is not None else pattern
            if ours == "lm_head.weight" and c.tie_embeddings and not spec.head_required:
                continue  # llama.cpp takes a missing head from the embedding
            t = state.get(ours)
            if t is None and ours.endswith(".bias"):
                if not spec.biases_required:
                    continue  # a bias the model has not
                t = torch.zeros(state[ours.removesuffix(".bias") + ".weight"].shape[0])  # adds nothing
            if t is None:
                raise GptlabError(f"llama.cpp's {spec.arch} graph needs {ours}, which this model has not")
            for gname, part in zip(names, _split(ours, t, c, len(names))):
                yield (gname.format(i=i) if i is not None else gname), part
            written.add(ours)
    missing = sorted(k for k in state if k not in written and not (k == "lm_head.weight" and c.tie_embeddings))
    if missing:
        raise GptlabError(f"GGUF export has no llama.cpp name for {', '.join(missing[:4])}")


def export_gguf(model, tok, out: str | Path, outtype: str = "f32", chat_template: str | None = None,
                name: str | None = None) -> Path:
    """Write `model` (a gptlab GPT) and its tokenizer as one GGUF file; returns its path."""
    import gguf

    if outtype not in OUTTYPES:
        raise GptlabError(f"--outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    c = model.config
    spec = check_exportable(c, getattr(model, "quantization", None))
    out = Path(out)
    if out.suffix != ".gguf":
        raise GptlabError(f"the output file should end in .gguf, got {out.name}")
    out.parent.mkdir(parents=True, exist_ok=True)
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[outtype]
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]

    tmp = out.with_name(f".{out.name}.tmp")
    w = gguf.GGUFWriter(str(tmp), spec.arch)
    try:
        w.add_name(name or c.name)
        w.add_context_length(c.context_length)
        w.add_embedding_length(c.n_embd)
        w.add_block_count(c.n_layer)
        w.add_feed_forward_length(c.intermediate_size)
        w.add_head_count(c.n_head)
        w.add_head_count_kv(c.n_kv_head)
        if c.head_dim != c.n_embd // c.n_head:
            w.add_key_length(c.head_dim)
            w.add_value_length(c.head_dim)
        if c.norm == "rmsnorm":
            w.add_layer_norm_rms_eps(c.norm_eps)
        else:
            w.add_layer_norm_eps(c.norm_eps)
        if c.positions == "rotary":
            w.add_rope_freq_base(c.rope_theta)
            w.add_rope_dimension_count(c.rotary_dim)
        if spec.hparams is not None:
            spec.hparams(w, c)
        w.add_file_type(ftype)
        _write_tokenizer(w, tok, c, chat_template)

        for gname, part in _gguf_tensors(model, spec):
            arr = part.detach().to(torch.float32).contiguous().numpy()
            if arr.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32 or gname.endswith(F32_TENSORS):
                w.add_tensor(gname, arr)
            elif qtype == gguf.GGMLQuantizationType.F16 or arr.shape[-1] % 32:  # q8_0 blocks need rows of 32k
                w.add_tensor(gname, arr.astype(np.float16))
            else:  # bf16 / q8_0 bytes: the writer reads the logical shape back from the byte shape
                w.add_tensor(gname, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    w.close()
    tmp.replace(out)
    return out
