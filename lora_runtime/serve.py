"""``lora-runtime serve BUNDLE``: an OpenAI-compatible local server over one runtime (``pip install
'lora_runtime[serve]'``: Starlette and uvicorn).

    GET  /health                 liveness, the bundle
    GET  /v1/models              the bundle's use-cases (the ``model`` a request names)
    POST /v1/chat/completions    messages -> the model's chat template -> tokens (``stream`` by server-sent events)
    POST /v1/completions         raw text -> tokens
    GET  /lora-adapters          the adapters and their strengths in the default mix (llama-server's endpoint)
    POST /lora-adapters          set the default mix: [{"id": "caps" or 0, "scale": 0.5}, ...]

A request picks its use-case by ``model``; ``model`` left out (or "default") uses the default mix, and a
request's own ``"lora": [{"id", "scale"}]`` (llama-server's field) is an ad-hoc mix for that request.
Concurrent requests share the runtime one decode step at a time: each step runs under its own request's
use-case (a hot switch in v3, a slot copy in v1/v2), so each gets exactly the tokens it would get alone. Every
response carries ``usage`` and ``timings`` (time to first token, tokens/s, the switch it caused).

Sampling: a request's ``max_tokens`` (``max_completion_tokens``), ``temperature``, ``top_p``, ``seed``, ``stop``
and llama-server's ``top_k``, ``repeat_penalty``, ``repeat_last_n``; what a request leaves out comes from the
server's defaults (``serve``'s flags, as ``generate``'s). OpenAI fields this server does not implement (``n`` > 1,
``logprobs``, frequency/presence penalties, tools) are refused by name, never ignored.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from lora_runtime import sampling
from lora_runtime.errors import InputError, LoraRuntimeError, UseCaseError
from lora_runtime.llm import Chat, generate, open_llm
from lora_runtime.runtime.switcher import Runtime

DEFAULT = "default"
# generate()'s sampling options, the server's defaults unless told otherwise (``serve``'s flags)
SAMPLING = {"max_new_tokens": 256, "temperature": sampling.TEMPERATURE, "top_k": sampling.TOP_K,
            "top_p": sampling.TOP_P, "repeat_penalty": sampling.REPEAT_PENALTY,
            "repeat_last_n": sampling.REPEAT_LAST_N, "seed": sampling.SEED, "stop": ()}
# request field -> (option, type)
FIELDS = {"max_completion_tokens": ("max_new_tokens", int), "max_tokens": ("max_new_tokens", int),
          "temperature": ("temperature", float), "top_p": ("top_p", float), "top_k": ("top_k", int),
          "repeat_penalty": ("repeat_penalty", float), "repeat_last_n": ("repeat_last_n", int), "seed": ("seed", int)}
# OpenAI fields not implemented, with the values that mean "not used"
UNSUPPORTED = {"n": (1,), "best_of": (1,), "logprobs": (False, None), "top_logprobs": (None, 0), "echo": (False,),
               "frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logit_bias": ({},), "tools": ([],),
               "response_format": ({"type": "text"},), "suffix": (None, "")}


class _Engine:
    """One runtime shared by requests: each run is made under its request's use-case (or mix), atomically."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.lock = threading.Lock()
        self.active: tuple | None = None
        self.default_mix: dict[str, float] = {}

    def key(self, model: str | None, lora: Any) -> tuple:
        """What a request runs under: ("use-case", name) or ("mix", ((adapter, strength), ...))."""
        m = self.rt.manifest
        if lora is not None:
            if not isinstance(lora, list) or not all(isinstance(x, dict) and "id" in x for x in lora):
                raise InputError('"lora" must be a list of {"id": adapter name or index, "scale": number}')
            return "mix", tuple(sorted(self.mix(lora).items()))
        if model in (None, "", DEFAULT):
            return "mix", tuple(sorted(self.default_mix.items()))
        m.use_case(model)  # UseCaseError naming the use-cases
        return "use-case", model

    def mix(self, lora: list[dict[str, Any]]) -> dict[str, float]:
        names = self.rt.manifest.adapter_names
        mix = {}
        for x in lora:
            i = x["id"]
            name = names[i] if isinstance(i, int) and 0 <= i < len(names) else i
            if name not in names:
                raise InputError(f"unknown adapter {i!r} in \"lora\"; this bundle has {', '.join(names)}")
            scale = x.get("scale", 1.0)
            if not isinstance(scale, (int, float)) or isinstance(scale, bool):
                raise InputError(f"scale of adapter {name!r} must be a number, got {scale!r}")
            if scale:
                mix[name] = float(scale)
        self.rt.manifest.strength_value(mix)  # finite, within range, one adapter in v1/v2
        return mix

    def run(self, key: tuple, feeds: dict[str, np.ndarray], switches: list, buffers: Mapping[str, Any] | None = None
            ) -> dict[str, np.ndarray]:
        with self.lock:
            if self.active != key:
                kind, what = key
                report = self.rt.switch(what) if kind == "use-case" else self.rt.set_strengths(dict(what))
                switches.append(report)
                self.active = key
            return self.rt.run(feeds, buffers)


def make_app(bundle: str | Path, *, device: str = "cpu", api_key: str | None = None,
             defaults: Mapping[str, Any] | None = None, system: str | None = None) -> Any:
    """The ASGI app serving ``bundle`` (a Starlette application). ``defaults``: sampling options for what a request
    leaves out (keys of :data:`SAMPLING`); ``system``: a system message for chat requests that have none."""
    try:
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import JSONResponse, StreamingResponse
        from starlette.routing import Route
    except ImportError:
        raise InputError("serve needs Starlette and uvicorn: pip install 'lora_runtime[serve]'") from None
    unknown = sorted(set(defaults or {}) - set(SAMPLING))
    if unknown:
        raise InputError(f"unknown sampling option(s) {unknown}; known: {sorted(SAMPLING)}")
    defaults = SAMPLING | dict(defaults or {})
    rt, chat = open_llm(str(bundle), device)
    engine = _Engine(rt)
    m = rt.manifest

    def error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)

    def authorized(request: Request) -> bool:
        return api_key is None or request.headers.get("authorization", "") == f"Bearer {api_key}"

    async def health(_request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "bundle": str(bundle), "generation": m.generation, "device": device})

    async def models(request: Request) -> JSONResponse:
        if not authorized(request):
            return error(401, "missing or wrong API key (Authorization: Bearer KEY)", "authentication_error")
        data = [{"id": u.name, "object": "model", "created": 0, "owned_by": "lora_runtime",
                 "strengths": dict(u.strengths)} for u in m.use_cases]
        return JSONResponse({"object": "list", "data": data})

    async def adapters(request: Request) -> JSONResponse:
        if not authorized(request):
            return error(401, "missing or wrong API key (Authorization: Bearer KEY)", "authentication_error")
        if request.method == "POST":
            try:
                engine.default_mix = engine.mix(await request.json())
            except (LoraRuntimeError, ValueError, TypeError, KeyError) as e:
                return error(400, str(e))
        return JSONResponse([{"id": i, "path": a, "scale": engine.default_mix.get(a, 0.0)}
                             for i, a in enumerate(m.adapter_names)])

    async def completions(request: Request) -> Any:
        if not authorized(request):
            return error(401, "missing or wrong API key (Authorization: Bearer KEY)", "authentication_error")
        chat_api = request.url.path.endswith("/chat/completions")
        try:
            body = await request.json()
            job = _job(body, chat_api, engine, chat, defaults, system)
        except UseCaseError as e:
            return error(404, str(e), "model_not_found")
        except (LoraRuntimeError, ValueError, TypeError, KeyError) as e:
            return error(400, str(e) if isinstance(e, LoraRuntimeError) else f"bad request body: {e}")
        if body.get("stream"):
            return StreamingResponse(_stream(job, chat_api, body), media_type="text/event-stream")
        try:
            result = await asyncio.to_thread(job.run, None)
        except LoraRuntimeError as e:
            return error(400, str(e))
        return JSONResponse(_response(job, result, chat_api))

    routes = [Route("/health", health), Route("/v1/models", models),
              Route("/v1/chat/completions", completions, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/lora-adapters", adapters, methods=["GET", "POST"])]
    app = Starlette(routes=routes)
    app.state.runtime, app.state.chat = rt, chat
    return app


class _Cancelled(Exception):
    pass


class _Job:
    """One request: its prompt, options and use-case; ``run`` generates, streaming text to a callback."""

    def __init__(self, engine: _Engine, chat: Chat, prompt: Any, key: tuple, model: str, options: dict) -> None:
        self.engine, self.chat, self.prompt, self.key, self.model, self.options = \
            engine, chat, prompt, key, model, options
        self.switches: list = []
        self.id = f"lrt-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.t0 = time.perf_counter()
        self.first: float | None = None
        self.cancelled = threading.Event()  # the client went away: stop at the next token

    def run(self, on_text: Any) -> Any:
        def text(t: str) -> None:
            if self.cancelled.is_set():
                raise _Cancelled
            if self.first is None:
                self.first = time.perf_counter()
            if on_text is not None:
                on_text(t)

        return generate(self.engine.rt, self.chat, self.prompt, on_text=text,
                        run=lambda feeds, buffers=None: self.engine.run(self.key, feeds, self.switches, buffers),
                        **self.options)

    def timings(self, g: Any) -> dict[str, Any]:
        sw = self.switches[0] if self.switches else None
        return {"prompt_ms": round(g.prefill_ms, 2), "ttft_ms": round(((self.first or time.perf_counter()) - self.t0)
                                                                     * 1e3, 2),
                "decode_ms_per_token": round(g.decode_ms_per_token, 2),
                "tokens_per_s": round(1e3 / g.decode_ms_per_token, 1) if g.decode_ms_per_token else None,
                "switch": None if sw is None else {"kind": sw.kind, "us": round(sw.seconds * 1e6, 1),
                                                   "bytes_moved": sw.bytes_moved},
                "switches": len(self.switches)}


def _job(body: Mapping[str, Any], chat_api: bool, engine: _Engine, chat: Chat, defaults: Mapping[str, Any],
         system: str | None) -> _Job:
    if not isinstance(body, Mapping):
        raise InputError("the request body must be a JSON object")
    model = body.get("model")
    key = engine.key(model, body.get("lora"))
    if chat_api:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(x, dict) and isinstance(x.get("role"), str) and isinstance(x.get("content"), str)
                for x in messages):
            raise InputError('"messages" must be a non-empty list of {"role": str, "content": str}')
        prompt: Any = [{"role": x["role"], "content": x["content"]} for x in messages]
        if system is not None and not any(x["role"] == "system" for x in prompt):
            prompt.insert(0, {"role": "system", "content": system})
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise InputError('"prompt" must be a non-empty string')
    return _Job(engine, chat, prompt, key, model or DEFAULT, _options(body, defaults))


def _options(body: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """generate()'s options from a request: its fields over the server's defaults; a field of the wrong type or
    one this server does not implement is an error naming it."""
    for field, unused in UNSUPPORTED.items():
        if field in body and body[field] not in unused:
            raise InputError(f'"{field}" is not supported by this server (leave it out or at {unused[0]!r})')
    options = dict(defaults)
    for field in ("max_tokens", "max_completion_tokens", *[f for f in FIELDS if not f.startswith("max_")]):
        value = body.get(field)
        if value is None:
            continue
        option, kind = FIELDS[field]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
            raise InputError(f'"{field}" must be {"an integer" if kind is int else "a number"}, not {value!r}')
        options[option] = kind(value)
    stop = body.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(x, str) for x in stop):
            raise InputError('"stop" must be a string or a list of strings')
        options["stop"] = stop
    return options


def _response(job: _Job, g: Any, chat_api: bool) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": g.finish}
    if chat_api:
        choice["message"] = {"role": "assistant", "content": g.text}
    else:
        choice["text"] = g.text
    return {"id": job.id, "object": "chat.completion" if chat_api else "text_completion", "created": job.created,
            "model": job.model, "choices": [choice], "usage": _usage(g), "timings": job.timings(g)}


def _usage(g: Any) -> dict[str, int]:
    return {"prompt_tokens": g.prompt_tokens, "completion_tokens": len(g.ids),
            "total_tokens": g.prompt_tokens + len(g.ids)}


async def _stream(job: _Job, chat_api: bool, body: Mapping[str, Any]) -> Any:
    """Server-sent events: a chunk per piece of text, a last one with the finish reason (and usage if asked)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    kind = "chat.completion.chunk" if chat_api else "text_completion"

    def chunk(delta: dict[str, Any] | None, text: str | None = None, finish: str | None = None) -> str:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
        if chat_api:
            choice["delta"] = delta or {}
        else:
            choice["text"] = text or ""
        return "data: " + json.dumps({"id": job.id, "object": kind, "created": job.created, "model": job.model,
                                      "choices": [choice]}) + "\n\n"

    def work() -> None:
        try:
            g = job.run(lambda t: loop.call_soon_threadsafe(queue.put_nowait, ("text", t)))
            loop.call_soon_threadsafe(queue.put_nowait, ("done", g))
        except _Cancelled:
            pass
        except LoraRuntimeError as e:
            loop.call_soon_threadsafe(queue.put_nowait, ("error", str(e)))

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        async for event in _events(queue, chunk, job, chat_api, body):
            yield event
    finally:
        job.cancelled.set()


async def _events(queue: asyncio.Queue, chunk: Any, job: _Job, chat_api: bool, body: Mapping[str, Any]) -> Any:
    if chat_api:
        yield chunk({"role": "assistant", "content": ""})
    while True:
        what, value = await queue.get()
        if what == "text":
            yield chunk({"content": value}, value)
        elif what == "error":
            yield "data: " + json.dumps({"error": {"message": value, "type": "invalid_request_error"}}) + "\n\n"
            break
        else:
            g = value
            last = json.loads(chunk({}, "", g.finish)[6:])
            last["timings"] = job.timings(g)
            if (body.get("stream_options") or {}).get("include_usage"):
                last["usage"] = _usage(g)
            yield "data: " + json.dumps(last) + "\n\n"
            break
    yield "data: [DONE]\n\n"


def serve(bundle: str | Path, *, host: str = "127.0.0.1", port: int = 8080, device: str = "cpu",
          api_key: str | None = None, defaults: Mapping[str, Any] | None = None, system: str | None = None) -> None:
    """Run the server until interrupted (uvicorn); ``defaults``, ``system``: as :func:`make_app`'s."""
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        raise InputError(f"--host {host} exposes the model beyond this machine: pass --api-key KEY too")
    try:
        import uvicorn
    except ImportError:
        raise InputError("serve needs Starlette and uvicorn: pip install 'lora_runtime[serve]'") from None
    app = make_app(bundle, device=device, api_key=api_key, defaults=defaults, system=system)
    uvicorn.run(app, host=host, port=port, log_level="warning")


@contextmanager
def in_background(app: Any, *, timeout: float = 30.0) -> Iterator[str]:
    """``app`` served by uvicorn on a free localhost port in a thread (a bench, a test); yields its base URL."""
    import uvicorn

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    if not server.started:
        raise InputError(f"the server did not start on 127.0.0.1:{port} within {timeout:g} s")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
