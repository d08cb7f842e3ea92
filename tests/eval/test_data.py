"""Data loading: JSONL rows and their errors, and standard benchmarks converted as the harness converts them.

The conversions are checked offline against the harness's own task definitions (its YAML templates and
hellaswag's process_docs) on rows shaped like the published datasets.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from gptlab.errors import GptlabError
from gptlab.eval.data import BENCHMARKS, fewshot_examples, load_docs, read_jsonl

lm_eval = pytest.importorskip("lm_eval")
TASKS = Path(lm_eval.__file__).parent / "tasks"

ARC_ROW = {"question": "Which gas do plants take in?", "answerKey": "B",
           "choices": {"text": ["oxygen", "carbon dioxide", "helium", "neon"], "label": ["A", "B", "C", "D"]}}
PIQA_ROW = {"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Paint the lid.", "label": 0}
MMLU_ROW = {"question": "  What is 2 + 2? ", "choices": ["3", "4", "5", "6"], "answer": 1, "subject": "math"}
HELLASWAG_ROW = {"activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow.",
                 "ctx_b": "then", "endings": [", the man [title] continues.", " is  cleaning.", "x", "y"],
                 "label": "2"}


def _harness_fields(yaml_path: Path, row: dict) -> tuple[str, list[str], int]:
    from lm_eval.utils import apply_template

    cfg = yaml.safe_load(yaml_path.read_text())
    text = apply_template(cfg["doc_to_text"], row)
    choice = cfg["doc_to_choice"]
    choices = choice if isinstance(choice, list) else ast.literal_eval(apply_template(choice, row))
    target = cfg["doc_to_target"]
    label = row[target] if target in row else int(apply_template(target, row))
    return text, choices, int(label)


@pytest.mark.parametrize("name,yaml_file,row", [
    ("arc_easy", "arc/arc_easy.yaml", ARC_ROW),
    ("piqa", "piqa/piqa.yaml", PIQA_ROW),
    ("mmlu", "mmlu/default/_default_template_yaml", MMLU_ROW),
])
def test_standard_conversions_render_the_harness_prompts(name, yaml_file, row):
    doc = BENCHMARKS[name].convert(row)
    assert (doc["context"], doc["choices"], doc["label"]) == _harness_fields(TASKS / yaml_file, row)


def test_hellaswag_conversion_is_the_harness_preprocessing():
    import datasets
    from lm_eval.tasks.hellaswag.utils import process_docs

    theirs = process_docs(datasets.Dataset.from_list([HELLASWAG_ROW]))[0]
    ours = BENCHMARKS["hellaswag"].convert(HELLASWAG_ROW)
    assert ours == {"context": theirs["query"], "choices": theirs["choices"], "label": int(theirs["gold"])}


def test_jsonl_rows_keep_their_line_numbers_and_skip_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert [(d["a"], d["_line"]) for d in read_jsonl(path)] == [(1, 1), (2, 3)]
    assert len(read_jsonl(path, limit=1)) == 1


def test_text_files_are_one_document_only_where_the_task_reads_text(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("hello\nworld")
    assert load_docs(path, text_ok=True) == [{"text": "hello\nworld"}]
    with pytest.raises(GptlabError, match="reads JSONL"):
        load_docs(path)


def test_fewshot_draw_leaves_the_question_out_and_is_seeded():
    docs = [{"i": i} for i in range(6)]
    a = fewshot_examples(docs, None, 3, seed=7)
    assert a == fewshot_examples(docs, None, 3, seed=7)
    assert a != fewshot_examples(docs, None, 3, seed=8)
    for doc, picked in zip(docs, a):
        assert len(picked) == 3 and all(p is not doc for p in picked)
    with pytest.raises(GptlabError, match="needs at least"):
        fewshot_examples(docs[:3], None, 3, seed=0)
