"""Documents -> pages: Markdown split at headings, PDF pages, JSONL rows, chunks; bad documents refused."""

import json

import pytest

from gptlab.errors import GptlabError
from gptlab.synth.documents import chunks, language_of, read_documents
from tests.synth.conftest import pdf_bytes


def test_markdown_split_at_headings_and_comments_dropped(tmp_path):
    f = tmp_path / "rules.md"
    f.write_text("<!-- note: 99 -->\nIntro line.\n\n# Fees\nThe fee is 8 yuan.\n\n## 收费\n手续费为6元。\n", encoding="utf-8")
    pages = read_documents([str(f)])
    assert [(p.where, p.language) for p in pages] == [("start", "en"), ("Fees", "en"), ("收费", "zh")]
    assert pages[1].text == "Fees\nThe fee is 8 yuan." and "99" not in "".join(p.text for p in pages)
    assert pages[2].source == str(f)


def test_pdf_one_page_each(tmp_path):
    f = tmp_path / "book.pdf"
    f.write_bytes(pdf_bytes(["The limit is 50,000 yuan.", "Refunds take 3 days."]))
    pages = read_documents([str(f)])
    assert [p.where for p in pages] == ["page 1", "page 2"]
    assert "50,000" in pages[0].text and "3 days" in pages[1].text


def test_jsonl_rows_and_folders(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_text(json.dumps({"text": "Fee 5 yuan.", "title": "Fees"}) + "\n"
                                            + json.dumps({"text": "Limit 7."}) + "\n")
    (tmp_path / "d" / "b.txt").write_text("Plain text with 3 numbers 4 and 5.")
    (tmp_path / "d" / "skip.csv").write_text("ignored")
    pages = read_documents([str(tmp_path / "d")])
    assert [p.where for p in pages] == ["Fees (line 1)", "line 2", "start"]


def test_long_sections_are_chunked_at_sentences():
    text = " ".join(f"Rule {i} sets the fee at {i} yuan." for i in range(200))
    parts = chunks(text, 300)
    assert all(len(p) <= 300 for p in parts) and len(parts) > 10
    assert all(p.endswith(".") for p in parts)  # cut at sentence ends
    zh = "。".join(f"第{i}条规定手续费为{i}元" for i in range(100)) + "。"
    assert all(len(p) <= 100 for p in chunks(zh, 100))
    assert "".join(chunks(zh, 100)) == zh


def test_language_detection():
    assert language_of("个人账户单日转账限额为5万元。") == "zh"
    assert language_of("The limit is 50,000 yuan (约5万元).") == "en"


@pytest.mark.parametrize("name,content,message", [
    ("empty.md", b"  \n\n", "empty document"),
    ("bad.pdf", b"this is not a pdf at all", "not a readable PDF"),
    ("latin1.txt", "caf\xe9".encode("latin-1"), "not UTF-8"),
    ("x.docx", b"PK", "unsupported document type"),
])
def test_bad_documents_get_one_clear_error(tmp_path, name, content, message):
    f = tmp_path / name
    f.write_bytes(content)
    with pytest.raises(GptlabError, match=message):
        read_documents([str(f)])


def test_missing_document_and_no_documents(tmp_path):
    with pytest.raises(GptlabError, match="does not exist"):
        read_documents([str(tmp_path / "nope.md")])
    with pytest.raises(GptlabError, match="at least one document"):
        read_documents([])
    (tmp_path / "empty").mkdir()
    with pytest.raises(GptlabError, match="no .txt"):
        read_documents([str(tmp_path / "empty")])
