"""`Chat` and `gptlab chat`: rendering like transformers, history, template arguments, the context limit,
and the KV cache kept between turns."""

from __future__ import annotations

import io

import pytest

import gptlab
from gptlab.cli import main
from tests.conftest import make_hf_model, save_hf_model


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


CHATML = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory, corpus_text):
    """A tiny random Qwen2 model whose tokenizer knows <|im_start|>/<|im_end|> and has a ChatML template."""
    from gptlab.tokenizer import train_tokenizer

    tok = train_tokenizer([corpus_text[:50_000]], vocab_size=400, show_progress=False,
                          special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.chat_template = CHATML
    model = make_hf_model("qwen2", vocab_size=tok.vocab_size, max_position_embeddings=512, eos_token_id=0)
    return save_hf_model(model, tmp_path_factory.mktemp("tiny-chat"), tok)


@pytest.fixture
def recorded(monkeypatch):
    """Record each prompt chat sends to generate, and the reply it got back."""
    import gptlab.infer.chat
    from gptlab.infer.generate import generate

    calls: list[dict] = []

    def recording_generate(model, tok, prompt, **kw):
        call = {"prompt": prompt, "reply": "", "stop": kw.get("stop")}
        calls.append(call)
        for piece in generate(model, tok, prompt, **kw):
            call["reply"] += piece
            yield piece

    monkeypatch.setattr(gptlab.infer.chat, "generate", recording_generate)
    return calls


def _hf_render(path, messages):
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_chat_renders_like_transformers_and_keeps_history(capsys, monkeypatch, chat_dir, recorded):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\n/reset\nWhat is a tuple?\n\nAnd a list?\n"))
    rc, out, _ = run(capsys, "chat", str(chat_dir), "--temperature", "0", "--max-new-tokens", "6")
    assert rc == 0  # end of input ends the chat cleanly
    assert len(recorded) == 3  # the empty line and /reset are not messages
    first, second, third = recorded
    assert first["prompt"] == _hf_render(chat_dir, [{"role": "user", "content": "Hello there"}])
    # /reset forgot the first exchange
    assert second["prompt"] == _hf_render(chat_dir, [{"role": "user", "content": "What is a tuple?"}])
    assert third["prompt"] == _hf_render(chat_dir, [
        {"role": "user", "content": "What is a tuple?"},
        {"role": "assistant", "content": second["reply"].strip()},
        {"role": "user", "content": "And a list?"},
    ])
    assert first["stop"] == ["<|im_end|>"]  # the template's end-of-turn marker ends a reply
    assert out == "".join(call["reply"] + "\n" for call in recorded)


def test_chat_system_message_and_template_args(capsys, monkeypatch, chat_dir, recorded):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n"))
    rc, _, _ = run(capsys, "chat", str(chat_dir), "--system", "Be brief.", "--temperature", "0",
                   "--max-new-tokens", "2", "--template-arg", "unused_flag=false")
    assert rc == 0
    assert recorded[0]["prompt"] == _hf_render(chat_dir, [{"role": "system", "content": "Be brief."},
                                                          {"role": "user", "content": "Hi"}])


def test_chat_ends_at_eof_and_exit(capsys, monkeypatch, chat_dir, recorded):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert run(capsys, "chat", str(chat_dir))[:2] == (0, "")
    monkeypatch.setattr("sys.stdin", io.StringIO("/exit\nnever sent\n"))
    assert run(capsys, "chat", str(chat_dir))[:2] == (0, "")
    assert recorded == []


def test_chat_without_template_needs_plain(capsys, monkeypatch, tiny_gpt2_dir, recorded):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n"))
    rc, out, err = run(capsys, "chat", str(tiny_gpt2_dir))
    assert rc == 1 and out == "" and err.count("\n") == 1 and "--plain" in err
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\nAgain\n"))
    rc, _, _ = run(capsys, "chat", str(tiny_gpt2_dir), "--plain", "--temperature", "0", "--max-new-tokens", "3")
    assert rc == 0
    assert recorded[0]["prompt"] == "User: Hello\nAssistant:"
    assert recorded[1]["prompt"] == f"User: Hello\nAssistant: {recorded[0]['reply'].strip()}\nUser: Again\nAssistant:"
    assert recorded[0]["stop"] == ["\nUser:"]


def test_chat_drops_oldest_exchanges_to_fit_the_context(chat_dir):
    from gptlab.infer.chat import Chat

    model, tok = gptlab.load(chat_dir), gptlab.load_tokenizer(chat_dir)
    model.config.context_length = 250  # holds about two of the six exchanges below
    chat = Chat(model, tok, system="S", max_new_tokens=20)
    for i in range(6):
        chat.messages += [{"role": "user", "content": f"question {i} " * 5},
                          {"role": "assistant", "content": f"answer {i} " * 5}]
    chat.messages.append({"role": "user", "content": "last"})
    prompt = chat._fit()
    assert len(tok.encode(prompt)) + 20 <= 250
    assert chat.messages[0] == {"role": "system", "content": "S"}
    assert chat.messages[-1] == {"role": "user", "content": "last"}
    kept = [m["content"] for m in chat.messages[1:-1]]
    assert kept and kept[-1] == "answer 5 " * 5  # the newest exchanges stay, the oldest went
    assert len(kept) % 2 == 0 and "question 0 " * 5 not in kept


def test_chat_reuses_the_kv_cache_of_its_history(chat_dir):
    from gptlab.infer.chat import Chat

    model, tok = gptlab.load(chat_dir), gptlab.load_tokenizer(chat_dir)
    chat = Chat(model, tok, max_new_tokens=8, temperature=0)
    "".join(chat.send("What is a tuple?"))
    first_prompt_tokens = len(tok.encode(_hf_render(chat_dir, [{"role": "user", "content": "What is a tuple?"}])))
    second = "".join(chat.send("And a list?"))
    assert chat.cache.reused >= first_prompt_tokens // 16 * 16  # the first prompt's whole blocks were reused
    fresh = Chat(model, tok, max_new_tokens=8, temperature=0)
    fresh.messages = list(chat.messages[:-2])
    fresh.cache = type(chat.cache)()  # the same conversation replayed without a cache
    assert "".join(fresh.send("And a list?")) == second
    chat.reset()
    assert chat.cache.engine is None and chat.cache.reused == 0
