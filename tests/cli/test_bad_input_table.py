"""The bad-input table: every case issue 20 reported, and more of our own, across all commands and the server.

Each CLI case states the command line, and the one `error:` line it must end with (exit status non-zero, no
traceback). It runs in a fresh copy of one workspace (a model, a tokenizer, prepared data, a finished run, a
stopped LoRA run, data files, a directory of the user's own notes), and nothing that was there before may
change: every file's bytes and mode, and every directory's mode, are compared before and after, and nothing
new may appear unless the case says where. Server cases send a request and expect OpenAI's error body with a
4xx status; the server keeps serving.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from gptlab.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------------
# the shared helper


def run_refused(capsys, argv: list[str], stdin: str | None = None, monkeypatch=None) -> str:
    """Run a command in this process; assert one `error:` line, no traceback, a non-zero exit; return it."""
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own usage errors exit 2
        code = e.code
    captured = capsys.readouterr()
    err = captured.err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert code not in (0, None), f"exit 0 for {argv}: {captured.out[-500:]} {err[-500:]}"
    assert "Traceback" not in err and "Traceback" not in captured.out, err
    assert len(lines) == 1, err
    return lines[0]


def snapshot(root: Path) -> dict[str, tuple]:
    """path -> (kind, mode, sha256 of the bytes) for everything under root."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else ""
            out[str(p.relative_to(root))] = ("dir" if stat.S_ISDIR(st.st_mode) else "file", stat.S_IMODE(st.st_mode),
                                            digest)
    return out


# ---------------------------------------------------------------------------------------------------------
# the workspace


def _write_jsonl(path: Path, rows) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_gpt2_dir, tiny_tokenizer, corpus_text):
    from gptlab.data.shards import prepare
    from tests.conftest import make_hf_model, save_hf_model

    ws = tmp_path_factory.mktemp("workspace")
    shutil.copytree(tiny_gpt2_dir, ws / "model")
    tiny_tokenizer.save(ws / "tok")
    (ws / "corpus.txt").write_text(corpus_text[:60_000])
    prepare(ws / "corpus.txt", tiny_tokenizer, ws / "data", val_fraction=0.05, show_progress=False)
    save_hf_model(make_hf_model("gpt2", vocab_size=300, n_positions=64, bos_token_id=0, eos_token_id=0),
                  ws / "smallvocab", tiny_tokenizer)  # a 512-id tokenizer on a 300-id model
    rope = json.loads((ws / "model" / "config.json").read_text())
    save_hf_model(make_hf_model("qwen2", vocab_size=512), ws / "longrope", tiny_tokenizer)
    cfg = json.loads((ws / "longrope" / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "longrope", "factor": 4.0, "short_factor": [1.0], "long_factor": [1.0]}
    (ws / "longrope" / "config.json").write_text(json.dumps(cfg))
    del rope
    (ws / "recipe.yaml").write_text(
        "data: data\nout_dir: run\nmax_steps: 4\nbatch_size: 4\nwarmup_steps: 0\neval_every: 2\n"
        "eval_batches: 2\nsample_tokens: 4\nprecision: fp32\nquiet: true\n"
        "model:\n  n_layer: 1\n  n_head: 2\n  n_embd: 32\n  context_length: 32\n")
    (ws / "list.yaml").write_text("- max_steps: 3\n- lr: 0.1\n")
    (ws / "unknown.yaml").write_text("max_steps: 3\nlearning_rate: 0.1\n")
    cwd = Path.cwd()
    os.chdir(ws)
    try:
        assert main(["train", "recipe.yaml"]) == 0  # a finished run in run/
        assert main(["train", "recipe.yaml", "--out-dir", "stopped", "--stop-at-step", "2"]) == 0
        rules = [{"instruction": f"What is {w}?", "output": f"{w} is a word."} for w in ("tuple", "list", "set")] * 4
        _write_jsonl(ws / "sft.jsonl", rules)
        assert main(["finetune", "model", "--data", "sft.jsonl", "--method", "lora", "--max-steps", "4",
                     "--stop-at-step", "2", "--out-dir", "lora", "--precision", "fp32", "--quiet",
                     "--val-fraction", "0"]) == 0
    finally:
        os.chdir(cwd)
    _write_jsonl(ws / "cls.jsonl", [{"text": f"a {w}", "label": lab} for w, lab in
                                    (("cat", "animal"), ("dog", "animal"), ("saw", "tool"), ("drill", "tool"))] * 3)
    _write_jsonl(ws / "mc.jsonl", [{"context": "The sky is", "choices": [" blue", " green"], "label": 0}] * 3)
    _write_jsonl(ws / "qa.jsonl", [{"question": "What is 2 + 2?", "answer": "4"}] * 3)
    _write_jsonl(ws / "ent.jsonl", [{"premise": "a cat sat", "hypothesis": "an animal sat", "label": "yes"},
                                    {"premise": "a saw cut", "label": "no"}])
    _write_jsonl(ws / "choice.jsonl", [{"context": "pick", "choices": ["a", "b"], "label": 0},
                                       {"context": "pick", "choices": ["a", "b", "c"], "label": 1}])
    (ws / "latin1.jsonl").write_bytes(json.dumps({"instruction": "caf", "output": "ok"}).encode() + b"\n" +
                                      '{"instruction": "caf\xe9", "output": "ok"}\n'.encode("latin-1"))
    (ws / "empty.txt").write_text("")
    (ws / "empty.jsonl").write_text("")
    (ws / "bad.json").write_text("{not json")
    (ws / "userdir").mkdir(mode=0o750)
    os.chmod(ws / "userdir", 0o750)
    (ws / "userdir" / "notes.txt").write_text("my notes\n")
    (ws / "afile.txt").write_text("a file of mine\n")
    (ws / "outdir").mkdir()
    return ws


@pytest.fixture
def ws(workspace, tmp_path, monkeypatch):
    """A fresh copy of the workspace as the current directory."""
    dest = tmp_path / "ws"
    shutil.copytree(workspace, dest, symlinks=True)
    os.chmod(dest / "userdir", 0o750)
    monkeypatch.chdir(dest)
    return dest


# ---------------------------------------------------------------------------------------------------------
# damage done to the copy before a case runs


def _truncate_shard(ws: Path, even: bool = True) -> None:
    manifest = json.loads((ws / "data" / "manifest.json").read_text())
    shard = ws / "data" / manifest["splits"]["train"]["shards"][0]["file"]
    data = shard.read_bytes()
    shard.write_bytes(data[: (len(data) // 2) // 2 * 2 + (0 if even else 1)])


def _shard_ids_past_vocab(ws: Path) -> None:
    import numpy as np

    manifest = json.loads((ws / "data" / "manifest.json").read_text())
    for s in manifest["splits"]["train"]["shards"]:
        s.pop("sha256", None)  # as a manifest from before checksums: the vocabulary check is what catches it
    (ws / "data" / "manifest.json").write_text(json.dumps(manifest))
    shard = ws / "data" / manifest["splits"]["train"]["shards"][0]["file"]
    arr = np.fromfile(shard, dtype=np.uint16)
    arr[5] = 40000
    arr.tofile(shard)


def _edit_shard(ws: Path) -> None:
    import numpy as np

    manifest = json.loads((ws / "data" / "manifest.json").read_text())
    shard = ws / "data" / manifest["splits"]["train"]["shards"][0]["file"]
    arr = np.fromfile(shard, dtype=np.uint16)
    arr[5] = (int(arr[5]) + 1) % 512
    arr.tofile(shard)


def _remove_shard(ws: Path) -> None:
    manifest = json.loads((ws / "data" / "manifest.json").read_text())
    (ws / "data" / manifest["splits"]["train"]["shards"][0]["file"]).unlink()


def _damage_trainer(what: str):
    def damage(ws: Path) -> None:
        trainer = ws / "stopped" / "last" / "trainer"
        if what == "optimizer":
            data = (trainer / "optimizer.pt").read_bytes()
            (trainer / "optimizer.pt").write_bytes(data[: len(data) // 2])
        elif what == "state":
            (trainer / "state.json").write_text("{not json")
        elif what == "step":
            state = json.loads((trainer / "state.json").read_text())
            (trainer / "state.json").write_text(json.dumps({**state, "step": "four"}))
        else:
            (trainer / "rng-0.pt").unlink()
    return damage


def _nan_weights(ws: Path) -> None:
    from safetensors.torch import load_file, save_file

    f = ws / "model" / "model.safetensors"
    tensors = load_file(f)
    tensors = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(tensors, f, metadata={"format": "pt"})


def _bad_config(ws: Path) -> None:
    (ws / "model" / "config.json").write_text("{not json")


def _int8_dir(ws: Path, damage: str | None = None) -> None:
    """q8/: the model as a gptlab int8 dir (`gptlab export model --format int8 -o q8`), damaged as named."""
    import gptlab

    gptlab.save(gptlab.load(ws / "model", quantize="int8"), ws / "q8", tokenizer=gptlab.load_tokenizer(ws / "model"))
    cfg_file, weights = ws / "q8" / "config.json", ws / "q8" / "model.safetensors"
    cfg = json.loads(cfg_file.read_text())
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "no-block":  # a quantization_config deleted by hand: the integers are still there
        del cfg["quantization_config"]
        cfg["model_type"] = "gpt2"
    elif damage == "gptq":
        cfg["quantization_config"]["quant_method"] = "gptq"
    cfg_file.write_text(json.dumps(cfg))


def _gptj_dir(ws: Path) -> None:
    from tests.conftest import make_hf_model, save_hf_model

    save_hf_model(make_hf_model("gptj", vocab_size=512), ws / "gptj")


# ---------------------------------------------------------------------------------------------------------
# the table


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]
    says: str  # a piece of the one error line
    setup: object = None  # damage done to the workspace copy first (then part of "before")
    stdin: str | None = None
    creates: tuple[str, ...] = ()  # paths the case may create (a run that starts, then stops on bad data)


def C(id, argv, says, **kw) -> Case:
    return Case(id, tuple(argv.split()) if isinstance(argv, str) else tuple(argv), says, **kw)


TRAIN = "train recipe.yaml --out-dir new"
GEN = "generate model --prompt hello --max-new-tokens 4"
FT = "finetune model --data sft.jsonl --out-dir ft --max-steps 2 --quiet --val-fraction 0"
EVAL_PPL = "eval model --task perplexity --data corpus.txt --no-progress"

REPORTED = [  # issue 20, as written there
    C("prepare-into-user-dir", "prepare corpus.txt --tokenizer tok -o userdir --quiet", "holds files gptlab did not write"),
    C("prepare-onto-a-file", "prepare corpus.txt --tokenizer tok -o afile.txt --quiet", "is a file"),
    C("train-again-without-resume", "train recipe.yaml", "holds a run"),
    C("grad-accum-0", f"{TRAIN} --grad-accum 0", "grad-accum must be an integer >= 1, got 0"),
    C("max-steps-negative", f"{TRAIN} --max-steps -5", "max-steps must be an integer >= 1, got -5"),
    C("val-fraction-1.5", f"{FT} --val-fraction 1.5", "val-fraction must be a finite number in [0, 1), got 1.5"),
    C("max-len-negative", f"{FT} --max-len -3", "seq-len must be an integer >= 0"),
    C("generate-empty-stop", [*GEN.split(), "--stop", ""], "stop strings must not be empty"),
    C("eval-empty-stop", ["eval", "model", "--task", "qa", "--data", "qa.jsonl", "--stop", "", "--no-progress"],
      "stop strings must not be empty"),
    C("perplexity-of-an-empty-file", "eval model --task perplexity --data empty.txt --no-progress", "empty.txt"),
    C("stride-0", f"{EVAL_PPL} --stride 0", "stride must be an integer >= 1, got 0"),
    C("window-0", f"{EVAL_PPL} --window 0", "window must be an integer >= 1, got 0"),
    C("num-fewshot-negative", "eval model --task multiple_choice --data mc.jsonl --num-fewshot -1 --no-progress",
      "num-fewshot must be an integer >= 0, got -1"),
    C("duplicate-labels", "eval model --task classification --data cls.jsonl --labels animal animal --no-progress",
      "labels must be distinct"),
    C("temperature-inf", f"{GEN} --temperature inf", "temperature must be a finite number >= 0, got inf"),
    C("chat-max-new-tokens-negative", "chat model --plain --max-new-tokens -1", "max-new-tokens must be an integer >= 1",
      stdin="hello\n"),
    C("truncated-shard-even-size", TRAIN, "truncated or replaced", setup=_truncate_shard),
    C("diverging-run", f"{TRAIN} --lr 1e30 --min-lr 0 --grad-clip 0 --max-steps 40",
      "training stopped before this step changed the weights", creates=("new",)),
    C("nan-weights-generate", GEN, "holds NaN or infinite values", setup=_nan_weights),
    C("tokenizer-bigger-than-model", "generate smallvocab --prompt the_with_statement_is --max-new-tokens 2",
      "outside the model's vocabulary of 300"),
    C("temperature-nan", f"{GEN} --temperature nan", "temperature must be a finite number >= 0, got nan"),
    C("device-cuda-absent", f"{GEN} --device cuda", "CUDA is not available"),
    C("tokenizer-train-onto-a-file", "tokenizer train corpus.txt --vocab-size 300 -o afile.txt --quiet", "is a file"),
    C("train-out-dir-a-file", "train recipe.yaml --out-dir afile.txt", "afile.txt"),
    C("prepare-into-cwd", "prepare corpus.txt --tokenizer tok -o . --quiet", "current directory"),
    C("prepare-into-proc", "prepare corpus.txt --tokenizer tok -o /proc/gptlab-data --quiet", "/proc"),
    C("train-into-proc", "train recipe.yaml --out-dir /proc/gptlab-run", "/proc"),
    C("batch-size-0", f"{TRAIN} --batch-size 0", "batch-size must be an integer >= 1, got 0"),
    C("lr-nan", f"{TRAIN} --lr nan", "lr must be a finite number > 0, got nan"),
    C("lr-negative", f"{TRAIN} --lr -1", "lr must be a finite number > 0, got -1"),
    C("recipe-a-yaml-list", "train list.yaml", "list.yaml"),
    C("resume-truncated-optimizer", "train recipe.yaml --out-dir stopped --resume", "optimizer.pt cannot be read",
      setup=_damage_trainer("optimizer")),
    C("resume-state-not-json", "train recipe.yaml --out-dir stopped --resume", "state.json is not valid JSON",
      setup=_damage_trainer("state")),
    C("resume-step-four", "train recipe.yaml --out-dir stopped --resume", "'step' is missing or not a number",
      setup=_damage_trainer("step")),
    C("resume-missing-rng", "train recipe.yaml --out-dir stopped --resume", "rng-0.pt is missing",
      setup=_damage_trainer("rng")),
    C("odd-sized-shard", TRAIN, "truncated or replaced", setup=lambda ws: _truncate_shard(ws, even=False)),
    C("missing-shard", TRAIN, "is missing", setup=_remove_shard),
    C("shard-ids-past-vocab", TRAIN, "outside the vocabulary", setup=_shard_ids_past_vocab),
    C("finetune-non-utf8", "finetune model --data latin1.jsonl --out-dir ft --quiet", "latin1.jsonl:2"),
    C("resume-lora-run-as-full", "finetune model --data sft.jsonl --out-dir lora --method full --resume --quiet",
      "was written by a run with --method lora"),
    C("eval-out-a-directory", f"{EVAL_PPL} --out outdir", "is a directory"),
    C("truncate-without-room", "generate model --prompt a_b_c --max-new-tokens 1000 --truncate",
      "leaves no room for the prompt"),
]

OURS = [  # 30+ more, across every command
    C("generate-missing-model", "generate nowhere --prompt x", "nowhere"),
    C("generate-top-p-0", f"{GEN} --top-p 0", "top-p must be a finite number in (0, 1], got 0"),
    C("generate-top-p-1.5", f"{GEN} --top-p 1.5", "top-p must be a finite number in (0, 1], got 1.5"),
    C("generate-top-k-0", f"{GEN} --top-k 0", "top-k must be an integer >= 1, got 0"),
    C("generate-num-samples-0", f"{GEN} --num-samples 0", "num-samples must be an integer >= 1, got 0"),
    C("generate-repetition-penalty-0", f"{GEN} --repetition-penalty 0", "repetition-penalty must be a finite number > 0"),
    C("generate-max-new-tokens-0", "generate model --prompt x --max-new-tokens 0", "max-new-tokens must be an integer >= 1"),
    C("generate-missing-schema", f"{GEN} --json-schema nothere.json", "nothere.json"),
    C("generate-bad-regex", [*GEN.split(), "--regex", "(ab"], "regex"),
    C("generate-malformed-config", GEN, "config.json", setup=_bad_config),
    C("generate-unsupported-rope", "generate longrope --prompt x", "rope_type='longrope' is not supported"),
    C("chat-temperature-negative", "chat model --plain --temperature -1", "temperature must be a finite number >= 0",
      stdin="hi\n"),
    C("eval-unknown-task", "eval model --task nope --data qa.jsonl", "nope"),
    C("eval-limit-0", f"{EVAL_PPL} --limit 0", "limit must be an integer >= 1, got 0"),
    C("eval-batch-size-0", f"{EVAL_PPL} --batch-size 0", "batch-size must be an integer >= 1, got 0"),
    C("eval-missing-data", "eval model --task qa --data missing.jsonl --no-progress", "missing.jsonl"),
    C("eval-qa-max-new-tokens-0", "eval model --task qa --data qa.jsonl --max-new-tokens 0 --no-progress",
      "max-new-tokens must be an integer >= 1"),
    C("eval-option-of-another-task", f"{EVAL_PPL} --num-fewshot 2", "do not apply to task perplexity"),
    C("eval-windows-repeated", f"{EVAL_PPL} --window 16,16", "--window sizes must be distinct"),
    C("eval-window-past-context", f"{EVAL_PPL} --window 16,4096", "past the model's context"),
    C("finetune-lora-r-0", f"{FT} --lora-r 0", "lora-r must be an integer >= 1, got 0"),
    C("finetune-lora-dropout-1", f"{FT} --lora-dropout 1", "lora-dropout must be a finite number in [0, 1)"),
    C("finetune-lm-loss-weight-negative", f"{FT} --lm-loss-weight -1", "lm-loss-weight must be a finite number >= 0"),
    C("finetune-entailment-missing-field", "finetune model --data ent.jsonl --task entailment --method full --quiet",
      "ent.jsonl:2: field 'hypothesis' must be a non-empty string"),
    C("finetune-choice-counts-differ", "finetune model --data choice.jsonl --task choice --method full --quiet",
      "choice.jsonl:2"),
    C("finetune-gpt1-task-with-lora", "finetune model --data ent.jsonl --task entailment --method lora --quiet",
      "use --method full"),
    C("finetune-missing-data", "finetune model --data nothere.jsonl --quiet", "nothere.jsonl"),
    C("finetune-empty-data", "finetune model --data empty.jsonl --quiet", "empty.jsonl"),
    C("finetune-unknown-task", f"{FT} --task poetry", "poetry"),
    C("train-beta2-1.5", f"{TRAIN} --beta2 1.5", "beta2 must be a finite number in [0, 1), got 1.5"),
    C("train-grad-clip-inf", f"{TRAIN} --grad-clip inf", "grad-clip must be a finite number >= 0"),
    C("train-warmup-negative", f"{TRAIN} --warmup-steps -1", "warmup-steps must be an integer >= 0"),
    C("train-eval-batches-0", f"{TRAIN} --eval-batches 0", "eval-batches must be an integer >= 1"),
    C("train-skip-nonfinite-negative", f"{TRAIN} --skip-nonfinite -1", "skip-nonfinite must be an integer >= 0"),
    C("train-heads-do-not-divide", f"{TRAIN} --model.n_head 5", "not divisible by n_head=5"),
    C("train-unknown-model-field", f"{TRAIN} --model.n_wings 2", "--model.n-wings"),
    C("train-recipe-unknown-key", "train unknown.yaml", "learning_rate"),
    C("train-missing-recipe", "train nothere.yaml", "nothere.yaml"),
    C("train-muon-with-fsdp", f"{TRAIN} --optimizer muon --fsdp", "cannot run with --fsdp"),
    C("train-muon-lr-0", f"{TRAIN} --muon-lr 0", "muon-lr must be a finite number > 0, got 0"),
    C("finetune-lora-with-fsdp", f"{FT} --fsdp", "--fsdp shards full fine-tuning"),
    C("generate-draft-with-stream", f"{GEN} --draft model --stream", "drop --stream"),
    C("generate-draft-missing", f"{GEN} --draft nowhere", "nowhere"),
    C("generate-draft-tokens-0", f"{GEN} --draft model --draft-tokens 0", "draft-tokens must be an integer in [1, 16], got 0"),
    C("generate-draft-with-regex", f"{GEN} --draft model --regex a+", "drop --regex"),
    C("serve-draft-with-lora", "serve model --draft model --lora a=lora/last", "the draft proposes the base model's tokens"),
    C("serve-draft-missing", "serve model --draft ./nowhere", "model directory ./nowhere does not exist"),
    C("serve-draft-shorter-context", "serve model --draft smallvocab", "context (64) is shorter than the model's (128)"),
    C("serve-draft-tokens-17", "serve model --draft model --draft-tokens 17", "draft-tokens must be an integer in [1, 16]"),
    C("export-without-out", "export model", "pass -o FILE.gguf"),
    C("export-not-a-gguf-name", "export model -o model.bin", "should end in .gguf"),
    C("serve-quantize-with-lora", "serve model --quantize int8 --lora a=lora/last", "cannot be combined with --lora"),
    C("export-int8-without-out", "export model --format int8", "pass -o DIR"),
    C("export-int8-with-outtype", "export model --format int8 -o q --outtype q8_0", "--outtype chooses the GGUF"),
    C("export-int8-onto-the-model", "export model --format int8 -o model", "is the model being exported"),
    C("export-int4-into-user-dir", "export model --format int4 -o userdir", "holds files gptlab did not write"),
    C("export-int4-of-an-int8-dir", "export q8 --format int4 -o q4", "already holds int8 weights", setup=_int8_dir),
    C("export-gguf-of-an-int8-dir", "export q8 -o q8.gguf", "already holds int8 weights", setup=_int8_dir),
    C("export-gguf-of-gptj", "export gptj -o gptj.gguf", "llama.cpp has no graph for gptj", setup=_gptj_dir),
    C("generate-int8-dir-as-bf16", "generate q8 --prompt hello --dtype bfloat16", "loads only as that dtype",
      setup=_int8_dir),
    C("generate-int8-dir-as-int4", "generate q8 --prompt hello --quantize int4", "round the rounded values",
      setup=_int8_dir),
    C("finetune-int8-dir", "finetune q8 --data sft.jsonl --out-dir ft --max-steps 2 --quiet --val-fraction 0 "
      "--method full", "cannot be trained", setup=_int8_dir),
    C("finetune-lora-on-int8-dir", "finetune q8 --data sft.jsonl --out-dir ft --max-steps 2 --quiet --val-fraction 0",
      "LoRA adapters attach to full-precision layers", setup=_int8_dir),
    C("generate-truncated-int8-dir", "generate q8 --prompt hello", "truncated or not a safetensors file",
      setup=lambda ws: _int8_dir(ws, "truncated")),
    C("generate-int8-dir-without-its-block", "generate q8 --prompt hello", "has no quantization_config",
      setup=lambda ws: _int8_dir(ws, "no-block")),
    C("generate-gptq-dir", "generate q8 --prompt hello", "quant_method='gptq' is not supported",
      setup=lambda ws: _int8_dir(ws, "gptq")),
    C("train-into-user-dir", "train recipe.yaml --out-dir userdir", "userdir"),
    C("prepare-missing-corpus", "prepare nothere.txt --tokenizer tok -o d2 --quiet", "nothere.txt"),
    C("prepare-val-fraction-1.5", "prepare corpus.txt --tokenizer tok -o d2 --val-fraction 1.5 --quiet",
      "val-fraction must be a finite number in (0, 0.5), got 1.5"),
    C("prepare-dedup-threshold-0", "prepare corpus.txt --tokenizer tok -o d2 --dedup minhash --dedup-threshold 0 --quiet",
      "dedup-threshold must be a finite number in (0, 1], got 0"),
    C("prepare-unknown-filter", "prepare corpus.txt --tokenizer tok -o d2 --filter bogus --quiet", "unknown rule 'bogus'"),
    C("prepare-missing-tokenizer", "prepare corpus.txt --tokenizer nothere -o d2 --quiet", "nothere"),
    C("tokenizer-vocab-too-small", "tokenizer train corpus.txt --vocab-size 10 -o t2 --quiet", "vocab"),
    C("contamination-ngram-0", "contamination corpus.txt qa.jsonl --ngram 0 -o c2 --quiet",
      "ngram must be an integer >= 8"),
    C("contamination-missing-eval", "contamination corpus.txt nothere.jsonl -o c2 --quiet", "nothere.jsonl"),
    C("info-missing-model", "info nothere", "nothere"),
    C("models-unknown-family", "models --family martian", "martian"),
    C("serve-max-batch-0", "serve model --max-batch 0", "max-batch must be an integer >= 1, got 0"),
    C("serve-port-past-65535", "serve model --port 70000", "port must be an integer in [0, 65535], got 70000"),
    C("contamination-max-train-docs-0", "contamination corpus.txt qa.jsonl --max-train-docs 0 -o c2 --quiet",
      "max-train-docs must be an integer >= 1, got 0"),
    C("prepare-num-perm-8", "prepare corpus.txt --tokenizer tok -o d2 --dedup minhash --num-perm 8 --quiet",
      "num-perm must be an integer in [16, 1024], got 8"),
    C("serve-lora-without-name", "serve model --lora justadir", "NAME=DIR"),
    C("synth-missing-doc", "synth qa nothere.md -o qa2 --no-progress", "document nothere.md does not exist"),
    C("synth-empty-doc", "synth qa empty.txt -o qa2 --no-progress", "empty.txt: empty document"),
    C("synth-unreadable-pdf", "synth qa scan.pdf -o qa2 --no-progress", "scan.pdf: not a readable PDF",
      setup=lambda ws: (ws / "scan.pdf").write_bytes(b"%PDF-1.4 junk")),
    C("synth-pairs-per-page-0", "synth qa corpus.txt --pairs-per-page 0 -o qa2",
      "pairs-per-page must be an integer in [1, 200], got 0"),
    C("synth-numeric-share-1.5", "synth qa corpus.txt --numeric-share 1.5 -o qa2",
      "numeric-share must be a finite number in [0, 1], got 1.5"),
    C("synth-split-by-chapter", "synth qa corpus.txt --split-by chapter -o qa2", "split-by must be pair or page"),
    C("synth-teacher-not-a-url", "synth qa corpus.txt --teacher gpt-4o --teacher-model m -o qa2", "http(s) URL"),
    C("synth-teacher-refuses-connections", "synth qa corpus.txt --teacher http://127.0.0.1:9/v1 --teacher-model m "
      "--max-retries 0 -o qa2 --no-progress", "cannot reach the teacher at http://127.0.0.1:9/v1"),
    C("synth-into-user-dir", "synth qa corpus.txt -o userdir", "holds files gptlab did not write"),
    C("synth-demo-lora-r-0", "synth demo --lora-r 0 -o demo2", "lora-r must be an integer >= 1, got 0"),
    C("train-time-budget-in-words", [*TRAIN.split(), "--time-budget", "4 minutes"],
      "--time-budget must be a duration such as 240, 90s, 4m or 1h30m, got '4 minutes'"),
    C("train-time-budget-and-max-flops", f"{TRAIN} --time-budget 4m --max-flops 1e9", "choose one"),
]

CASES = REPORTED + OURS


def test_the_table_is_as_big_as_promised():
    assert len(REPORTED) >= 40 and len(OURS) >= 30
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_clear_error_and_changes_nothing(case, ws, capsys, monkeypatch):
    if case.id == "device-cuda-absent" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    if case.setup is not None:
        case.setup(ws)
    before = snapshot(ws)
    line = run_refused(capsys, list(case.argv), case.stdin, monkeypatch)
    assert case.says in line, line
    after = snapshot(ws)
    changed = sorted(k for k in before if after.get(k) != before[k])
    assert not changed, f"changed: {changed}"
    new = sorted(k for k in after if k not in before and not any(k == c or k.startswith(c + "/") for c in case.creates))
    assert not new, f"created: {new}"
    if "diverging" in case.id:  # stopped before the bad step: no final/, and what it saved is finite
        import gptlab

        assert not (ws / "new" / "final").exists()
        for ckpt in ("last", "best"):
            if (ws / "new" / ckpt).exists():
                assert all(torch.isfinite(p).all() for p in gptlab.load(ws / "new" / ckpt).parameters())


# ---------------------------------------------------------------------------------------------------------
# the server's endpoints

SERVER = [  # (id, path, body (dict, or raw bytes), status, a piece of the message or the param named)
    ("completion-temperature-3", "/v1/completions", {"prompt": "x", "temperature": 3}, 400, "temperature"),
    ("completion-top-p-0", "/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("completion-n-0", "/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("completion-max-tokens-0", "/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("completion-empty-prompt", "/v1/completions", {"prompt": []}, 400, "prompt"),
    ("completion-logprobs-25", "/v1/completions", {"prompt": "x", "logprobs": 25}, 400, "logprobs"),
    ("completion-too-many-stops", "/v1/completions", {"prompt": "x", "stop": [str(i) for i in range(17)]}, 400,
     "stop"),
    ("completion-presence-5", "/v1/completions", {"prompt": "x", "presence_penalty": 5}, 400, "presence_penalty"),
    ("completion-past-context", "/v1/completions", {"prompt": "x", "max_tokens": 100000}, 400, "max_tokens"),
    ("completion-unknown-model", "/v1/completions", {"model": "nope", "prompt": "x"}, 404, "nope"),
    ("completion-not-json", "/v1/completions", b"{not json", 400, ""),
    ("completion-nan-temperature", "/v1/completions", b'{"model": "m", "prompt": "x", "temperature": NaN}', 400,
     "temperature"),
    ("chat-no-messages", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("chat-bad-role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    ("chat-without-a-template", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, 400,
     "no chat template"),
    ("completion-bad-schema", "/v1/completions",
     {"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"name": "s",
                                                                               "schema": {"type": "nonsense"}}}},
     400, "schema"),
    ("completion-bad-regex", "/v1/completions", {"prompt": "x", "structured_outputs": {"regex": "(ab"}}, 400, "regex"),
]


@pytest.fixture(scope="module")
def server(workspace):
    import gptlab
    from gptlab.serve.app import ServeConfig, create_app
    from tests.serve.conftest import running

    model, tok = gptlab.load(workspace / "model"), gptlab.load_tokenizer(workspace / "model")
    with running(create_app(ServeConfig(model="m", max_n=4), model, tok)) as url:
        yield url


@pytest.mark.parametrize("id, path, body, status, names", SERVER, ids=[s[0] for s in SERVER])
def test_bad_requests_get_an_openai_error_and_never_a_500(server, id, path, body, status, names):
    import httpx

    if isinstance(body, dict):
        body = json.dumps({"model": "m", **body}).encode()
    r = httpx.post(server + path, content=body, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and "Traceback" not in err["message"]
    assert names in (err["message"] + " " + str(err["param"])), err
    assert httpx.get(server + "/health", timeout=10).status_code == 200  # still serving
