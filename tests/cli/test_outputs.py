"""Outputs never destroy what the user had: `prepare`, `tokenizer train` and `contamination` refuse a
destination that is a file, the current directory, or a directory of the user's own files (unless
--overwrite), before any work; they replace their own earlier output; the destination keeps its mode."""

from __future__ import annotations

import os
import stat

import pytest

from tests.cli.test_cli import assert_one_line_error, run


@pytest.fixture
def tok(tmp_path, tiny_tokenizer):
    tiny_tokenizer.save(tmp_path / "tok")
    return str(tmp_path / "tok")


def _prepare(capsys, tok, out, *extra):
    return run(capsys, "prepare", "python-docs", "--tokenizer", tok, "-o", str(out), "--quiet", *extra)


def test_prepare_refuses_a_dir_of_user_files_and_keeps_them(capsys, tmp_path, tok):
    user = tmp_path / "userdir"
    user.mkdir()
    (user / "notes.txt").write_text("notes")
    os.chmod(user, 0o755)
    code, _, err = _prepare(capsys, tok, user)
    assert_one_line_error(code, err, "already holds files gptlab did not write (notes.txt)", "--overwrite")
    assert (user / "notes.txt").read_text() == "notes" and stat.S_IMODE(user.stat().st_mode) == 0o755
    code, _, _ = _prepare(capsys, tok, user, "--overwrite")  # meant: replaced, mode kept
    assert code == 0 and not (user / "notes.txt").exists() and (user / "manifest.json").is_file()
    assert stat.S_IMODE(user.stat().st_mode) == 0o755


def test_prepare_replaces_its_own_output_and_makes_new_dirs_as_mkdir_would(capsys, tmp_path, tok):
    out = tmp_path / "data"
    assert _prepare(capsys, tok, out)[0] == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~_umask()
    assert _prepare(capsys, tok, out)[0] == 0  # its own manifest: a rerun replaces it


@pytest.mark.parametrize("where", ["file", "cwd", "parent"])
def test_prepare_refuses_a_file_or_the_current_dir(capsys, tmp_path, tok, monkeypatch, where):
    (tmp_path / "f.txt").write_text("keep")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    (tmp_path / "work" / "mine.txt").write_text("mine")
    dest = {"file": tmp_path / "f.txt", "cwd": ".", "parent": ".."}[where]
    code, _, err = _prepare(capsys, tok, dest, "--overwrite")
    assert_one_line_error(code, err, "is a file" if where == "file" else "current directory")
    assert (tmp_path / "f.txt").read_text() == "keep" and (tmp_path / "work" / "mine.txt").read_text() == "mine"


def test_tokenizer_train_and_contamination_refuse_a_file(capsys, tmp_path):
    (tmp_path / "f").write_text("keep")
    code, _, err = run(capsys, "tokenizer", "train", "python-docs", "--vocab-size", "300", "-o", str(tmp_path / "f"),
                       "--quiet")
    assert_one_line_error(code, err, "is a file")
    (tmp_path / "e.jsonl").write_text('{"id": 1, "text": "a b c d e f g h i j k l m n"}\n')
    code, _, err = run(capsys, "contamination", "python-docs", str(tmp_path / "e.jsonl"), "-o", str(tmp_path / "f"))
    assert_one_line_error(code, err, "is a file")
    assert (tmp_path / "f").read_text() == "keep"


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


@pytest.mark.parametrize("args, says", [
    (["--task", "perplexity", "--stride", "0"], "stride must be an integer >= 1"),
    (["--task", "perplexity", "--window", "0"], "window must be an integer >= 1"),
    (["--task", "multiple_choice", "--num-fewshot", "-1"], "num-fewshot must be an integer >= 0"),
    (["--task", "classification", "--labels", "a", "b", "a"], "'a' appears more than once"),
    (["--task", "qa", "--stop", ""], "stop strings must not be empty"),
    (["--task", "perplexity", "--out", "."], "is a directory"),
])
def test_eval_values_that_would_run_wrong_are_refused_first(capsys, tmp_path, tiny_gpt2_dir, args, says):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a b c", "question": "q", "answer": "1", "context": "c", "choices": ["x", "y"], '
                    '"label": 0}\n')
    code, _, err = run(capsys, "eval", str(tiny_gpt2_dir), "--data", str(data), *args)
    assert_one_line_error(code, err, says)


def test_eval_perplexity_of_an_empty_file_is_an_error_not_nan(capsys, tmp_path, tiny_gpt2_dir):
    (tmp_path / "empty.txt").write_text("\n \n")
    code, _, err = run(capsys, "eval", str(tiny_gpt2_dir), "--task", "perplexity", "--data", str(tmp_path / "empty.txt"))
    assert_one_line_error(code, err, "no text to measure perplexity on")


def test_a_place_that_cannot_be_written_is_one_error_before_the_work(capsys, tok):
    code, _, err = _prepare(capsys, tok, "/proc/gptlab-test/data")
    assert_one_line_error(code, err, "cannot be written")
    code, _, err = run(capsys, "tokenizer", "train", "python-docs", "--vocab-size", "300", "-o", "/proc/gptlab-tok",
                       "--quiet")
    assert_one_line_error(code, err, "cannot be written")


def test_a_non_utf8_byte_in_a_finetune_file_is_named_by_line(capsys, tmp_path, tiny_gpt2_dir):
    data = tmp_path / "d.jsonl"
    data.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff", "completion": "c"}\n')
    code, _, err = run(capsys, "finetune", str(tiny_gpt2_dir), "--data", str(data), "--out-dir", str(tmp_path / "ft"))
    assert_one_line_error(code, err, "d.jsonl:2: not UTF-8 text (invalid byte 0xff")
