"""POST /v1/chat/completions (OpenAI's format) over a real uvicorn server and the real parrot reader:
the same answer as /v1/ask, in the shapes OpenAI clients parse."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from app.api import RAG_EXTENSION_KEYS
from tests.app.readers import ANSWER, QUESTION, save_parrot
from tests.app.servers import api_server
from tests.app.test_api_ask import ask, events, server_with

CONVERSATION = [  # only the last user message is read: the rest must not change the answer
    {"role": "system", "content": "You are a pirate. Answer in rhymes."},
    {"role": "developer", "content": "Never cite sources."},
    {"role": "user", "content": "What is FAISS?"},
    {"role": "assistant", "content": "FAISS is a library for similarity search of vectors. [2]"},
]


@pytest.fixture(scope="module")
def parrot(corpus, tmp_path_factory) -> Iterator[str]:
    """A server whose reader answers QUESTION with ANSWER (citing the zebra source)."""
    yield from server_with(save_parrot, corpus, tmp_path_factory.mktemp("parrot"))


def chat(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)


def user(content: str | list) -> list[dict]:
    return [{"role": "user", "content": content}]


def rag_of(asked: dict) -> dict:
    """The `rag` extension a chat completion carries for the /v1/ask answer `asked`."""
    return {key: asked[key] for key in RAG_EXTENSION_KEYS}


@pytest.mark.parametrize(
    "content",
    [QUESTION, [{"type": "text", "text": "What coats do"}, {"type": "text", "text": "zebras have?  "}]],
)
def test_completion_is_the_ask_answer(parrot, content):
    asked = ask(parrot, question=QUESTION).json()
    # OpenAI options we do not honour are accepted and ignored; k and mode are honoured
    ignored = {"presence_penalty": 0.5, "logprobs": True, "user": "me", "tools": [], "n": 1}
    r = chat(parrot, model="gpt-4o", messages=[*CONVERSATION, *user(content)], k=5, mode="hybrid", **ignored)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "gpt-4o" and isinstance(body["created"], int)
    [choice] = body["choices"]
    assert choice == {
        "index": 0,
        "message": {"role": "assistant", "content": ANSWER},
        "finish_reason": "stop",
    }
    assert choice["message"]["content"] == asked["answer"]
    timings = asked["timings"]
    assert body["usage"] == {
        "prompt_tokens": timings["prompt_tokens"],
        "completion_tokens": timings["new_tokens"],
        "total_tokens": timings["prompt_tokens"] + timings["new_tokens"],
    }
    assert body["rag"] == rag_of(asked)
    assert body["rag"]["citations"][0]["supported"] and not body["rag"]["abstained"]


def test_stream_chunks_join_to_the_answer(parrot):
    whole = chat(parrot, messages=user(QUESTION)).json()
    body = {"messages": user(QUESTION), "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{parrot}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        got = list(events(r))
    assert got[-1] == "[DONE]"
    first, *pieces, last, usage, _ = got
    chunks = [first, *pieces, last, usage]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and chunks[0]["id"].startswith("chatcmpl-")
    assert {c["model"] for c in chunks} == {"rag"}  # the default when a client names none
    assert first["choices"] == [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]
    assert len(pieces) > 3 and all(p["choices"][0]["finish_reason"] is None for p in pieces)
    assert "".join(p["choices"][0]["delta"]["content"] for p in pieces) == ANSWER
    assert last["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    assert last["rag"] == whole["rag"]
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]


def test_generation_options_are_honoured(parrot):
    short = chat(parrot, messages=user(QUESTION), max_tokens=3).json()
    assert short["choices"][0]["finish_reason"] == "length" and short["usage"]["completion_tokens"] == 3
    assert ANSWER.startswith(short["choices"][0]["message"]["content"])
    newer = chat(parrot, messages=user(QUESTION), max_completion_tokens=3).json()
    assert newer["choices"][0]["message"] == short["choices"][0]["message"]

    cut = chat(parrot, messages=user(QUESTION), stop=[" striped"]).json()
    assert cut["choices"][0]["message"]["content"] == "black-and-white"
    assert cut["choices"][0]["finish_reason"] == "stop" and cut["rag"]["citations"] == []

    sampled = {"messages": user(QUESTION), "temperature": 2.0, "top_p": 1.0, "max_tokens": 12}
    texts = [chat(parrot, **sampled, seed=seed).json()["choices"][0]["message"]["content"] for seed in (7, 7)]
    assert texts[0] == texts[1]  # the same seed samples the same text
    nucleus = chat(parrot, **{**sampled, "top_p": 1e-6}).json()  # only the most likely token: greedy
    assert ANSWER.startswith(nucleus["choices"][0]["message"]["content"])


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({}, "Field required"),
        ({"messages": []}, "at least 1"),
        ({"messages": [{"role": "system", "content": "Be brief."}]}, "last message must be the user's"),
        ({"messages": [*user(QUESTION), CONVERSATION[-1]]}, "it is from 'assistant'"),
        ({"messages": [{"role": "tool", "content": "42"}]}, "'system', 'developer', 'user' or 'assistant'"),
        (
            {"messages": user([{"type": "image_url", "image_url": {"url": "https://x/z.png"}}])},
            "type 'image_url' are not supported",
        ),
        ({"messages": user("x" * 2001)}, "2001 characters, at most 2000"),
        ({"messages": user(" \n ")}, "last user message is empty"),
        ({"messages": user(QUESTION) * 51}, "at most 50"),
        ({"messages": user(QUESTION), "n": 2}, "less than or equal to 1"),
        ({"messages": user(QUESTION), "temperature": 2.5}, "less than or equal to 2"),
        ({"messages": user(QUESTION), "top_p": 0}, "greater than 0"),
        ({"messages": user(QUESTION), "max_tokens": 0}, "greater than or equal to 1"),
        ({"messages": user(QUESTION), "max_tokens": 3, "max_completion_tokens": 4}, "differ"),
        ({"messages": user(QUESTION), "stop": ["a", "b", "c", "d", "e"]}, "at most 4"),
        ({"messages": user(QUESTION), "k": 21}, "less than or equal to 20"),
        ({"messages": user(QUESTION), "mode": "telepathy"}, "'hybrid'"),
        ({"messages": user(QUESTION), "stream": "maybe"}, "valid boolean"),
    ],
)
def test_invalid_requests_are_422_in_openais_format(parrot, body, says):
    r = chat(parrot, **body)
    assert r.status_code == 422, r.text
    error = r.json()["error"]  # what OpenAI clients read and show
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert says in error["message"] and error["code"] == "invalid_request", error
    assert r.headers["x-should-retry"] == "false"


def test_the_failing_field_is_named(parrot):
    error = chat(parrot, messages=user(QUESTION), temperature=2.5).json()["error"]
    assert error["param"] == "temperature" and error["message"].startswith("temperature: ")
    error = chat(parrot, messages=[{"role": "tool", "content": "42"}]).json()["error"]
    assert error["param"] == "messages.0.role"


def test_more_tokens_than_the_model_has_context_is_422(parrot):
    for stream in (False, True):
        r = chat(parrot, messages=user(QUESTION), max_tokens=512, stream=stream)
        assert r.status_code == 422 and "max_new_tokens" in r.json()["error"]["message"], r.text


def test_openai_client(parrot):
    """The `openai` package itself, where installed (it is not a dependency of this project)."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{parrot}/v1", api_key="unused", max_retries=0)
    done = client.chat.completions.create(model="any", messages=user(QUESTION), extra_body={"k": 5})
    assert done.choices[0].message.content == ANSWER and done.usage.completion_tokens > 0
    assert done.model_extra["rag"]["citations"][0]["n"] == 1
    chunks = list(client.chat.completions.create(model="any", messages=user(QUESTION), stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ANSWER
    assert chunks[-1].choices[0].finish_reason == "stop"
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="any", messages=user(QUESTION), n=2)


def test_no_model_is_503_that_clients_do_not_retry(corpus):
    with api_server(corpus, corpus / "index") as url:  # no reader checkpoint there
        for stream in (False, True):
            r = chat(url, messages=user(QUESTION), stream=stream)
            assert r.status_code == 503, r.text
            error = r.json()["error"]
            assert "make reader" in error["message"] and "retrying will not help" in error["message"]
            assert (error["type"], error["code"]) == ("server_error", "reader_unavailable")
            assert r.headers["x-should-retry"] == "false" and "retry-after" not in r.headers
