"""The HTTP application: routes, the API key, body limits, streams and errors, on Starlette (the ASGI toolkit FastAPI
is built on, without FastAPI's own 422 error shape, which neither OpenAI's nor Anthropic's clients read).

Every failure is answered in the shape of the API that was called, and none stops the server: a malformed request
is a 400 naming the field, a prompt over the context a 400 saying by how much, a body over the limit a 413, a full
queue a 429 (before any of a stream is sent), a failed generation a 500; a client that disconnects, streaming or not,
has its generation stopped before the next token.
Prompts are rendered and tokenized off the event loop, so a long conversation does not stall the other streams.
"""
import asyncio
import hmac
import json
from collections.abc import AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from runtime.errors import K2Error
from runtime.serve import anthropic_api, openai_api
from runtime.serve.errors import RequestError
from runtime.serve.metrics import CONTENT_TYPE
from runtime.serve.service import Done, Service

RETRY_AFTER_S = 1
DISCONNECT_POLL_S = 0.1  # how often a request that is not streamed checks that its client is still there


def _error_response(request: Request, error: RequestError) -> JSONResponse:
    anthropic = request.url.path.startswith("/v1/messages")
    body = anthropic_api.error_body(error) if anthropic else openai_api.error_body(error)
    # A full queue empties as requests finish: the official clients wait Retry-After seconds before they retry.
    headers = {"Retry-After": str(RETRY_AFTER_S)} if error.status == 429 else None
    return JSONResponse(body, status_code=error.status, headers=headers)


async def _read_json(request: Request, limit: int):
    """The body as JSON, refused with a 413 once it passes `limit` bytes (before the rest is read)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise RequestError(f"the request body is {int(length):,} bytes; the server takes at most {limit:,} "
                           "(k2 serve --max-body)", status=413)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(f"the request body is over {limit:,} bytes, the most the server takes "
                               "(k2 serve --max-body)", status=413)
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(f"the request body is not JSON: {e}") from None
    except RecursionError:
        raise RequestError("the request body is nested too deeply") from None


def _sse(data, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def _until_disconnected(request: Request, work):
    """Run the coroutine `work`, cancelling it (and so its generation) if the client leaves first."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                return Response(status_code=499)
    finally:
        task.cancel()


class Server:
    """The routes over one `Service`; `api_key` (if set) is required on every route but /health."""

    def __init__(self, service: Service, api_key: str | None = None, max_body: int = 8 << 20):
        self.service, self.api_key, self.max_body = service, api_key, max_body

    def app(self, lifespan=None) -> Starlette:
        routes = [Route("/health", self.health, methods=["GET"]),
                  Route("/metrics", self._api(self.metrics), methods=["GET"]),
                  Route("/v1/models", self._api(self.models), methods=["GET"]),
                  Route("/v1/chat/completions", self._api(self.chat_completions), methods=["POST"]),
                  Route("/v1/completions", self._api(self.completions), methods=["POST"]),
                  Route("/v1/messages", self._api(self.messages), methods=["POST"]),
                  Route("/v1/messages/count_tokens", self._api(self.count_tokens), methods=["POST"])]
        return Starlette(routes=routes, lifespan=lifespan,
                         exception_handlers={HTTPException: self._http_error, Exception: self._crash})

    # Plumbing ---------------------------------------------------------------------------------------------------

    def _authorized(self, request: Request) -> bool:
        if self.api_key is None:
            return True
        bearer = request.headers.get("authorization", "")
        given = bearer[7:] if bearer.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
        return hmac.compare_digest(given.encode(), self.api_key.encode())

    def _api(self, handler: Callable) -> Callable:
        async def endpoint(request: Request) -> Response:
            try:
                if not self._authorized(request):
                    raise RequestError("missing or wrong API key (send Authorization: Bearer KEY or x-api-key: KEY)",
                                       status=401)
                if request.method == "GET":
                    return await handler(request)
                return await handler(request, await _read_json(request, self.max_body))
            except RequestError as e:
                return _error_response(request, e)
            except K2Error as e:  # a template that refuses the conversation, sampling settings out of range
                return _error_response(request, RequestError(str(e)))
            except ClientDisconnect:  # it left while sending its body: no one to answer, nothing gone wrong
                return Response(status_code=499)
        return endpoint

    async def _http_error(self, request: Request, e: HTTPException) -> Response:
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return _error_response(request, RequestError(message.get(e.status_code, e.detail), status=e.status_code))

    async def _crash(self, request: Request, e: Exception) -> Response:
        return _error_response(request, RequestError(f"internal error: {type(e).__name__}: {e}", status=500))

    def _stream(self, request: Request, events: AsyncIterator[str]) -> StreamingResponse:
        """A server-sent event stream; a generation error after the headers went out is the stream's last event."""
        async def body():
            try:
                async for event in events:
                    yield event
            except K2Error as e:
                error = RequestError(str(e), status=500)
                if request.url.path.startswith("/v1/messages"):
                    yield _sse(anthropic_api.error_body(error), "error")
                else:
                    yield _sse(openai_api.error_body(error))
        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _collect(self, request: Request, steps: AsyncIterator, add: Callable, finish: Callable) -> Response:
        """A reply that is not streamed: each step of the generation goes to `add`, its Done to `finish`, which gives
        the body; the generation stops if the client leaves first."""
        async def work():
            async for item in steps:
                if isinstance(item, Done):
                    return JSONResponse(finish(item))
                add(item)

        try:
            return await _until_disconnected(request, work())
        except RequestError:
            raise
        except K2Error as e:
            raise RequestError(str(e), status=500) from None

    # Routes -----------------------------------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def metrics(self, request: Request) -> Response:
        return Response(self.service.worker.metrics.exposition(), media_type=CONTENT_TYPE)

    async def models(self, request: Request) -> Response:
        return JSONResponse(openai_api.models(self.service))

    async def chat_completions(self, request: Request, body) -> Response:
        api, chat = openai_api.chat_request(body, self.service)
        prompt = await asyncio.to_thread(self.service.render, chat)
        reply = openai_api.ChatReply(self.service, api, chat, prompt.ids)
        steps = self.service.chat(chat, prompt)
        if api.stream:
            async def events():
                yield _sse(reply.first_chunk())
                async for item in steps:
                    chunks = reply.last_chunks(item) if isinstance(item, Done) else reply.chunks(item)
                    for chunk in chunks:
                        yield _sse(chunk)
                yield _sse("[DONE]")
            return self._stream(request, events())
        return await self._collect(request, steps, reply.add, reply.message)

    async def completions(self, request: Request, body) -> Response:
        api, ids = await asyncio.to_thread(openai_api.completion_request, body, self.service)
        reply = openai_api.CompletionReply(self.service, api, ids)
        params = api.sampling(self.service)
        steps = self.service.complete(ids, params, api.max_tokens, api.stops(), api.logprobs, api.ignore_eos)
        if api.stream:
            async def events():
                async for item in steps:
                    chunks = reply.last_chunks(item) if isinstance(item, Done) else [reply.chunk(*item)]
                    for chunk in chunks:
                        yield _sse(chunk)
                yield _sse("[DONE]")
            return self._stream(request, events())
        return await self._collect(request, steps, lambda item: reply.chunk(*item), reply.response)

    async def messages(self, request: Request, body) -> Response:
        api, chat = anthropic_api.messages_request(body, self.service)
        prompt = await asyncio.to_thread(self.service.render, chat)
        reply = anthropic_api.MessageReply(self.service, api, chat, len(prompt.ids))
        steps = self.service.chat(chat, prompt)
        if api.stream:
            async def events():
                for event in reply.start():
                    yield _sse(event, event["type"])
                async for item in steps:
                    for event in (reply.stop(item) if isinstance(item, Done) else reply.events(item)):
                        yield _sse(event, event["type"])
            return self._stream(request, events())
        return await self._collect(request, steps, reply.events, reply.message)

    async def count_tokens(self, request: Request, body) -> Response:
        _, chat = anthropic_api.messages_request(body, self.service, count_only=True)
        prompt = await asyncio.to_thread(self.service.render, chat)
        return JSONResponse({"input_tokens": len(prompt.ids)})
