"""What keeps a training run from harming or misleading: one writing process per run dir (RunLock, in
gptlab/formats/files.py, shared with prepare), and loop settings that would train nothing refused before any
work (check_loop_config)."""

from __future__ import annotations

from gptlab.errors import GptlabError
from gptlab.limits import check_fields

RUN_ENTRIES = ("last", "best", "final", "merged", "metrics.jsonl", "tb")  # what a run writes in out_dir


LOOP_LIMITS = ("max_steps", "batch_size", "grad_accum", "warmup_steps", "eval_every", "eval_batches", "log_every",
               "save_every", "patience", "stop_at_step", "skip_nonfinite", "lr", "min_lr", "weight_decay", "eps",
               "grad_clip", "beta1", "beta2", "muon_lr")


def check_loop_config(cfg) -> None:
    """One clear error for a loop setting that would train nothing or train wrong (run before any work);
    the bounds are gptlab.limits.LIMITS, shared with the server and the other commands."""
    check_fields(cfg, LOOP_LIMITS)
    if getattr(cfg, "optimizer", "adamw") == "muon" and getattr(cfg, "fsdp", False):
        raise GptlabError("--optimizer muon cannot run with --fsdp: Muon orthogonalises whole matrices and FSDP "
                          "keeps only a shard of each; use --optimizer adamw, or DDP (no --fsdp)")
    if getattr(cfg, "time_budget", ""):
        from gptlab.train.budget import parse_duration

        parse_duration(cfg.time_budget)  # a malformed duration fails before any work
