"""Every named preset builds, has its published parameter count, and is saveable as its HF family.

Published figures are compared at the precision they are published in: a figure written "0.49B" passes when
our exact count rounds to 0.49B (so the tolerance is half a unit of its last digit), an exact integer must be
equal. Where a published figure is known not to round from the real model, the entry carries an explicit
relative tolerance and says why. Counts come from `gptlab.models.stats.count_params` (meta device, tie-aware).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal

import pytest
import torch

from gptlab.models.config import Config
from gptlab.formats.hfconfig import config_from_hf, config_to_hf
from gptlab.models.presets import FAMILIES, PRESETS
from gptlab.models.stats import count_params, flops_per_token, kv_cache_bytes, mfu, weight_bytes


@dataclass(frozen=True)
class Published:
    source: str
    total: str
    non_embedding: str | None = None
    active: str | None = None  # MoE: parameters used per token
    rel_tol: float | None = None  # None: the count must round to the figure as written
    why: str = ""


QWEN25 = "Qwen2.5 HF model card (Qwen/Qwen2.5-*), 'Number of Parameters' and '(Non-Embedding)'"
QWEN2 = "Qwen2 release blog (qwenlm.github.io/blog/qwen2), '#Params' and '#Non-Emb Params'"
QWEN15_MOE = "Qwen/Qwen1.5-MoE-A2.7B model card ('14.3B parameters in total and 2.7B activated') and blog"
QWEN3 = "Qwen3 HF model card (Qwen/Qwen3-*), 'Number of Parameters' and '(Non-Embedding)'"
PYTHIA = "Pythia README / paper Table 1 (EleutherAI/pythia), 'Total Params' and 'Non-Embedding Params'"
GPT3 = "GPT-3 paper (Brown et al. 2020), Table 2.1 'n_params'"

PUBLISHED: dict[str, Published] = {
    "openai-gpt": Published("GPT-2 paper Table 2: the smallest model 'is equivalent to the original GPT'", "117M"),
    # exact counts of the released checkpoints (nanoGPT README: 124M, 350M, 774M, 1558M); the GPT-2 paper's
    # Table 2 figures (117M, 345M, 762M, 1542M) were miscounted and are not used
    "gpt2": Published("openai-community/gpt2 checkpoint (nanoGPT README '124M')", "124,439,808"),
    "gpt2-medium": Published("openai-community/gpt2-medium checkpoint ('355M')", "354,823,168"),
    "gpt2-large": Published("openai-community/gpt2-large checkpoint ('774M')", "774,030,080"),
    "gpt2-xl": Published("openai-community/gpt2-xl checkpoint (nanoGPT README '1558M')", "1,557,611,200"),
    # Table 2.1's sizes are nominal names; ours differ in details the paper leaves open (see presets.py)
    "gpt3-125m": Published(GPT3, "125M", rel_tol=0.02, why="nominal size"),
    "gpt3-350m": Published(GPT3, "350M", rel_tol=0.02, why="nominal size; the same shape as GPT-2 medium (354.8M)"),
    "gpt3-760m": Published(GPT3, "760M", rel_tol=0.02, why="nominal size"),
    "gpt3-1.3b": Published(GPT3, "1.3B", rel_tol=0.02, why="nominal size"),
    "gpt3-2.7b": Published(GPT3, "2.7B", rel_tol=0.02, why="nominal size"),
    "gpt3-6.7b": Published(GPT3, "6.7B", rel_tol=0.02, why="nominal size"),
    "gpt3-13b": Published(GPT3, "13B", rel_tol=0.02, why="nominal size; d_model 5120 for the table's 5140"),
    "gpt3-175b": Published(GPT3, "175B", rel_tol=0.02, why="nominal size"),
    "gpt-neo-125m": Published("EleutherAI/gpt-neo-125m model card", "125M"),
    "gpt-neo-1.3b": Published("EleutherAI/gpt-neo-1.3B model card", "1.3B"),
    "gpt-neo-2.7b": Published("EleutherAI/gpt-neo-2.7B model card", "2.7B"),
    "gpt-j-6b": Published("EleutherAI/gpt-j-6b model card, 'n_parameters'", "6,053,381,344", rel_tol=5e-4,
                          why="the card's figure is 2,498,560 (0.04%) above the checkpoint's tensors, which "
                              "transformers counts as we do"),
    "gpt-neox-20b": Published("GPT-NeoX-20B paper (Black et al. 2022), sec. 2.1", "20,554,567,680"),
    "pythia-70m": Published(PYTHIA, "70,426,624", "18,915,328"),
    "pythia-160m": Published(PYTHIA, "162,322,944", "85,056,000"),
    "pythia-410m": Published(PYTHIA, "405,334,016", "302,311,424"),
    "pythia-1b": Published(PYTHIA, "1,011,781,632", "805,736,448"),
    "pythia-1.4b": Published(PYTHIA, "1,414,647,808", "1,208,602,624"),
    "pythia-2.8b": Published(PYTHIA, "2,775,208,960", "2,517,652,480"),
    "pythia-6.9b": Published(PYTHIA, "6,857,302,016", "6,444,163,072"),
    "pythia-12b": Published(PYTHIA, "11,846,072,320", "11,327,027,200"),
    "qwen2-0.5b": Published(QWEN2, "0.49B", "0.35B", rel_tol=0.025,
                            why="blog says 0.35B non-embedding; the checkpoint has 0.358B"),
    "qwen2-1.5b": Published(QWEN2, "1.54B", "1.31B"),
    "qwen2-7b": Published(QWEN2 + " (7.07B / 5.98B there: one 152064 x 3584 embedding, 0.545B, too few)",
                          "7.62B", "6.53B"),
    "qwen2-72b": Published(QWEN2, "72.71B", "70.21B"),
    "qwen2-57b-a14b": Published(QWEN2 + "; the report's 'A14B' activated", "57.41B", "56.32B", active="14B",
                                rel_tol=0.02, why="activated 14.25B, named A14B"),
    "qwen1.5-moe-a2.7b": Published(QWEN15_MOE, "14.3B", active="2.7B"),
    "qwen2.5-0.5b": Published(QWEN25, "0.49B", "0.36B"),
    "qwen2.5-1.5b": Published(QWEN25, "1.54B", "1.31B"),
    "qwen2.5-3b": Published(QWEN25, "3.09B", "2.77B"),
    "qwen2.5-7b": Published(QWEN25, "7.61B", "6.53B", rel_tol=0.01, why="card truncates 7.616B to 7.61B"),
    "qwen2.5-14b": Published(QWEN25, "14.7B", "13.1B", rel_tol=0.01,
                             why="card says 13.1B non-embedding; the checkpoint has 13.21B"),
    "qwen2.5-32b": Published(QWEN25, "32.5B", "31.0B", rel_tol=0.01,
                             why="card says 32.5B / 31.0B; the checkpoint has 32.76B / 31.21B"),
    "qwen2.5-72b": Published(QWEN25, "72.7B", "70.0B", rel_tol=0.01,
                             why="card says 70.0B non-embedding; the checkpoint has 70.21B"),
    "qwen3-0.6b": Published(QWEN3, "0.6B", "0.44B"),
    "qwen3-1.7b": Published(QWEN3, "1.7B", "1.4B"),
    "qwen3-4b": Published(QWEN3, "4.0B", "3.6B"),
    "qwen3-8b": Published(QWEN3, "8.2B", "6.95B"),
    "qwen3-14b": Published(QWEN3, "14.8B", "13.2B"),
    "qwen3-32b": Published(QWEN3, "32.8B", "31.2B"),
    "qwen3-30b-a3b": Published(QWEN3 + ", 'Number of Activated Parameters'", "30.5B", "29.9B", active="3.3B",
                               rel_tol=0.02, why="card says 3.3B activated; 128 experts choose 8 -> 3.35B"),
    "qwen3-235b-a22b": Published(QWEN3 + ", 'Number of Activated Parameters'", "235B", "234B", active="22B"),
}

_UNITS = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9}


def _matches(count: int, figure: str, rel_tol: float | None) -> bool:
    """Does an exact count agree with a published figure ("124,439,808", "0.49B", "175B")?"""
    m = re.fullmatch(r"([\d.,]+)([KMB]?)", figure)
    assert m, figure
    digits, unit = Decimal(m.group(1).replace(",", "")), _UNITS[m.group(2)]
    value = digits * unit
    if rel_tol is not None:
        return abs(count - value) <= Decimal(str(rel_tol)) * value
    half_unit = Decimal(1).scaleb(digits.as_tuple().exponent) / 2 * unit  # "0.49B" -> 0.005B
    return abs(count - value) <= half_unit


def test_every_preset_has_a_published_figure():
    assert set(PUBLISHED) == set(PRESETS)
    assert set(FAMILIES) == set(PRESETS)


@pytest.mark.parametrize("name", list(PRESETS))
def test_parameter_count_matches_published(name):
    config = Config.from_name(name)
    counts = count_params(config)  # builds the model on the meta device
    pub = PUBLISHED[name]
    assert _matches(counts["total"], pub.total, pub.rel_tol), (name, counts["total"], pub)
    if pub.non_embedding:
        assert _matches(counts["non_embedding"], pub.non_embedding, pub.rel_tol), (name, counts["non_embedding"], pub)
    if pub.active:
        assert _matches(counts["active"], pub.active, pub.rel_tol), (name, counts["active"], pub)
    assert (counts["active"] < counts["total"]) == (config.mlp == "moe")


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_is_saveable_as_its_hf_family(name):
    """config.json written for the preset reads back as the same Config (all fields but name / hf_repo)."""
    config = Config.from_name(name)
    back = config_from_hf(config_to_hf(config))
    ignore = {"name", "hf_repo"}
    ours = {k: v for k, v in config.to_dict().items() if k not in ignore}
    assert {k: v for k, v in back.to_dict().items() if k not in ignore} == ours


# one preset per architecture variant (model_type x tied head x MoE): transformers builds that config.json
# into exactly as many parameters as we do, so the preset's counts are the HF checkpoint's counts
HF_CHECKED = ["openai-gpt", "gpt2", "gpt3-125m", "gpt-neo-125m", "gpt-j-6b", "pythia-70m", "qwen2.5-0.5b",
              "qwen2.5-7b", "qwen3-0.6b", "qwen3-8b", "qwen3-30b-a3b", "qwen2-57b-a14b", "qwen1.5-moe-a2.7b"]


@pytest.mark.parametrize("name", HF_CHECKED)
def test_transformers_builds_the_same_number_of_parameters(name):
    transformers = pytest.importorskip("transformers")
    config = Config.from_name(name)
    hf_config = transformers.AutoConfig.for_model(**config_to_hf(config))
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    assert sum(p.numel() for p in model.parameters()) == count_params(config)["total"]


def test_from_name_overrides_and_unknown_name():
    from gptlab.errors import GptlabError

    c = Config.from_name("gpt2", n_layer=2)
    assert (c.name, c.n_layer, c.n_embd, c.hf_repo) == ("gpt2", 2, 768, "openai-community/gpt2")
    with pytest.raises(GptlabError, match="unknown preset"):
        Config.from_name("gpt5")


# ---- stats ----


def test_flops_match_nanogpt_estimate_for_gpt2():
    # nanoGPT estimate_mfu: 6N + 12*L*H*Q*T with N = params minus position embeddings (tied head counted once)
    c = Config.from_name("gpt2")
    n = count_params(c)["total"] - c.context_length * c.n_embd
    L, H, Q, T = c.n_layer, c.n_head, c.head_dim, 1024
    assert flops_per_token(c, T, training=True) == 6 * n + 12 * L * H * Q * T
    assert flops_per_token(c, T, training=True) == 3 * flops_per_token(c, T)


@pytest.mark.parametrize("name, overrides", [
    ("gpt2", {}), ("openai-gpt", {}), ("gpt-j-6b", {"n_layer": 3}), ("gpt-neo-125m", {}),
    ("qwen3-30b-a3b", {"n_layer": 5, "dense_layers": [1, 4]}),  # MoE and dense layers mixed
])
def test_count_params_equals_a_whole_model_build(name, overrides):
    """count_params builds one block per layer kind; the whole model on the meta device agrees."""
    from gptlab.models.model import GPT

    config = Config.from_name(name, **overrides)
    with torch.device("meta"):
        model = GPT(config)
    counts = count_params(config)
    assert counts["total"] == model.num_params()
    assert counts["total"] - counts["embedding"] == model.num_params(exclude_embeddings=True) - (
        0 if config.tie_embeddings else model.lm_head.weight.numel())


def test_moe_active_params_count_only_the_routed_experts():
    c = Config.from_name("qwen3-30b-a3b")
    counts = count_params(c)
    expert = 3 * c.moe_intermediate_size * c.n_embd  # gate, up and down of one expert
    inactive = c.n_layer * (c.n_expert - c.n_expert_per_token) * expert
    assert counts["total"] - counts["active"] == inactive
    # FLOPs follow the active parameters, not the total
    assert flops_per_token(c, 1) < 2.1 * (counts["active_non_embedding"] + counts["head"])


def test_local_windows_cap_the_attention_flops():
    def attention(c: Config) -> float:
        return flops_per_token(c, 2048) - 2 * (count_params(c)["non_embedding"] + count_params(c)["head"])

    dense = Config.from_name("gpt3-125m", layer_windows=[])
    local = Config.from_name("gpt3-125m")  # every other layer sees at most 256 keys
    assert attention(local) == (attention(dense) + attention(dense) * 256 / 2048) / 2


def test_memory_and_mfu():
    c = Config.from_name("qwen3-0.6b")
    assert weight_bytes(c, "bfloat16") == 2 * count_params(c)["total"]
    assert weight_bytes(c, torch.float32) == 4 * count_params(c)["total"]
    # K and V, 28 layers, 8 kv heads x 128, 2 bytes each, per token
    assert kv_cache_bytes(c, seq_len=1000, batch_size=3) == 2 * 28 * 8 * 128 * 2 * 1000 * 3
    per_token = flops_per_token(c, 2048, training=True)
    assert mfu(1000.0, per_token, peak_flops=per_token * 4000) == pytest.approx(0.25)


# ---- docs/models.md ----

# fields that vary within a family, left out of the docs' table (as it says)
_PER_MODEL = {"name", "hf_repo", "vocab_size", "context_length", "n_layer", "n_head", "n_embd", "n_kv_head", "head_dim",
              "intermediate_size", "moe_intermediate_size", "n_expert", "n_expert_per_token", "norm_eps",
              "layer_windows", "bos_token_id", "eos_token_id", "pad_token_id"}


def test_docs_family_table_matches_the_presets():
    """Each family's row in docs/models.md names exactly the fields all its presets set apart from defaults."""
    import ast
    from pathlib import Path

    doc = (Path(__file__).parents[2] / "docs" / "models.md").read_text()
    rows = {}
    for line in doc.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] in set(FAMILIES.values()):
            items = [item.split("=", 1) for item in re.findall(r"`([^`]+)`", cells[2])]
            rows[cells[0]] = {k: ast.literal_eval(v) for k, v in items}
    assert set(rows) == set(FAMILIES.values())
    defaults = Config().to_dict()
    for fam, stated in rows.items():
        configs = [Config.from_name(n).to_dict() for n in PRESETS if FAMILIES[n] == fam]
        for c in configs:
            assert {k: c[k] for k in stated} == stated, fam
        common = {k for k in defaults
                  if k not in _PER_MODEL and all(c[k] == configs[0][k] != defaults[k] for c in configs)}
        assert common <= set(stated), (fam, common - set(stated))
