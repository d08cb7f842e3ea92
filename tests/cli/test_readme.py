"""The README's two commands are the ones CI runs, and its placeholders are all filled."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, re.S)


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    test_cmd = next(b.strip() for b in _bash_blocks(readme) if "pytest" in b)
    install_and_test = test_cmd.split("&&", 1)[1].strip()  # after creating the venv, which CI does itself
    assert install_and_test in ci


def test_readme_first_command_is_the_main_job():
    first = _bash_blocks((ROOT / "README.md").read_text())[0]
    assert first.strip().endswith("gptlab train")


def test_readme_has_no_unfilled_placeholders():
    assert not re.findall(r"\b[A-Z_]{8,}\b", (ROOT / "README.md").read_text().replace("README", ""))


def _documented(doc: str) -> set[str]:
    return set(re.findall(r"`(\w+)`", (ROOT / "docs" / doc).read_text()))


def test_docs_list_every_option_and_every_model_field():
    import dataclasses

    from gptlab.models.config import Config
    from gptlab.train import LoopConfig
    from gptlab.train.finetune import FinetuneConfig
    from gptlab.train.pretrain import TrainConfig

    loop = {f.name for f in dataclasses.fields(LoopConfig)}
    for fields, doc in (({f.name for f in dataclasses.fields(TrainConfig)}, "training.md"),  # the loop's too
                        ({f.name for f in dataclasses.fields(FinetuneConfig)} - loop, "finetune.md"),
                        ({f.name for f in dataclasses.fields(Config)}, "models.md")):
        missing = fields - _documented(doc)
        assert not missing, f"docs/{doc} does not list {sorted(missing)}"
