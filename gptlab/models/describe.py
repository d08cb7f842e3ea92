"""A Config in a few words (context "32K", heads "16/8", positions "rope 25% theta 10000", norm, MLP), as
`gptlab models`, `gptlab info` and `gptlab compare` print them."""

from __future__ import annotations

from gptlab.models.config import Config
from gptlab.models.stats import count_params, human



def context_str(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def heads_str(c: Config) -> str:
    return str(c.n_head) if c.n_kv_head == c.n_head else f"{c.n_head}/{c.n_kv_head}"


def positions_str(c: Config, theta: bool = False) -> str:
    if c.positions == "learned":
        return "learned"
    parts = ["rope"]
    if c.rotary_fraction != 1.0:
        parts.append(f"{c.rotary_fraction:.0%}")
    if c.rotary_interleaved:
        parts.append("interleaved")
    if theta:
        parts.append(f"theta {c.rope_theta:.0f}" if c.rope_theta.is_integer() else f"theta {c.rope_theta:g}")
        if c.rope_scaling != "default":
            parts.append(f"{c.rope_scaling} x{c.rope_factor:g} from {c.rope_original_context:,}")
    return " ".join(parts)


def norm_str(c: Config) -> str:
    parts = [c.norm]
    if c.post_norm:
        parts.append("post")
    if c.parallel_residual:
        parts.append("parallel")
    if c.qk_norm:
        parts.append("qk-norm")
    return " ".join(parts)


def mlp_str(c: Config) -> str:
    if c.mlp == "moe":
        return f"moe {c.n_expert_per_token}/{c.n_expert}"
    if c.mlp == "glu":
        return {"silu": "swiglu", "gelu": "geglu", "gelu_new": "geglu"}.get(c.activation, f"glu {c.activation}")
    return c.activation


def params_str(c: Config) -> str:
    counts = count_params(c)
    total = human(counts["total"])
    return f"{total} ({human(counts['active'])} active)" if counts["active"] != counts["total"] else total
