"""A client for the deployed Open Inference Protocol API: it signs (SigV4) or carries a bearer JWT.

Why it exists: the deployed HTTP API sits behind API Gateway with IAM (SigV4) authorization by
default, or a JWT authorizer (``template.yaml``'s ``JwtIssuer``), and ``tritonclient`` signs nothing,
so against AWS it gets 403. This client keeps tritonclient's objects (``InferInput``,
``InferRequestedOutput``, ``InferResult``) and adds the one thing missing: authentication.

* ``SigV4()`` signs each request with the standard AWS credential chain (environment, shared
  files, SSO, container or instance role; on a Greengrass device the Token Exchange Service), for
  the ``execute-api`` service, in the region named in the API's host name unless told otherwise.
* ``Bearer(token)`` sends ``Authorization: Bearer <token>``; ``token`` may be a callable, so a
  token that expires can be refreshed (a Cognito client-credentials flow, for example).

Two layers, so that callers pay only for what they use:

* ``Client.request(method, path, body, headers)`` -> :class:`Response`: the raw, signed HTTP call on
  a pooled keep-alive connection; any HTTP answer comes back as it is. The edge runtime forwards a
  client's body untouched with it (no tritonclient, no numpy). Transport failures raise
  :class:`~tierserve.errors.BackendUnavailableError` / :class:`~tierserve.errors.BackendTimeoutError`.
* ``Client.infer(model, inputs, outputs)`` and the health and metadata calls build requests with
  tritonclient's objects (JSON or binary tensors) and raise :class:`ApiError` for an error answer.
* ``Client.chat(model, messages, **params)`` and ``Client.complete(model, prompt, **params)`` (issue 17): OpenAI's
  chat completions and completions; ``stream=True`` yields each chunk (a dict) as it arrives, and an error event
  in the stream is raised as :class:`ApiError`. ``Client.stream(...)`` is the raw streamed call under them (the
  edge relays a stream from the cloud with it). ``ApiKey(key)`` sends a tierserve API key as the bearer token
  (the streaming REST API's default authorizer), as the ``openai`` SDK sends its ``api_key``.

Example::

    import numpy as np
    import tritonclient.http as httpclient
    from tierserve.client import Client, SigV4

    api = Client("https://abc123.execute-api.us-east-1.amazonaws.com", auth=SigV4())
    x = httpclient.InferInput("input", [1, 64], "FP32")
    x.set_data_from_numpy(np.zeros((1, 64), np.float32), binary_data=True)
    result = api.infer("digits", [x], [httpclient.InferRequestedOutput("label", binary_data=True)])
    print(result.as_numpy("label"), result.served_by)

    llm = Client(stack_outputs["StreamingApiUrl"], auth=ApiKey(os.environ["TIERSERVE_API_KEY"]))
    for chunk in llm.chat("tiny-llama", [{"role": "user", "content": "Hi"}], stream=True, max_tokens=32):
        print(chunk["choices"][0]["delta"].get("content", "") if chunk["choices"] else "", end="", flush=True)
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import quote, urlsplit

from tierserve import errors

#: The service name API Gateway verifies SigV4 signatures for.
EXECUTE_API = "execute-api"
#: ``{api-id}.execute-api.{region}.amazonaws.com`` (and .com.cn): the region is in the host name.
_EXECUTE_API_HOST = re.compile(r"[a-z0-9]+\.execute-api\.([a-z0-9-]+)\.amazonaws\.com(?:\.cn)?")


class Auth(Protocol):
    """Adds authentication headers to one request (they are sent with it, nothing else is changed)."""

    def headers(self, method: str, url: str, headers: Mapping[str, str], body: bytes) -> dict[str, str]: ...


class NoAuth:
    """No authentication: the local stack without IAM, or a device's own edge runtime."""

    def headers(self, method: str, url: str, headers: Mapping[str, str], body: bytes) -> dict[str, str]:
        return {}


class Bearer:
    """``Authorization: Bearer <token>`` for an API behind a JWT authorizer (issuer and audience checked there)."""

    def __init__(self, token: str | Callable[[], str]) -> None:
        if isinstance(token, str) and not token.strip():
            raise errors.ConfigurationError("the bearer token is empty; pass the JWT the identity provider issued")
        self._token = token

    def headers(self, method: str, url: str, headers: Mapping[str, str], body: bytes) -> dict[str, str]:
        token = self._token() if callable(self._token) else self._token
        return {"Authorization": f"Bearer {token.strip()}"}


class ApiKey(Bearer):
    """A tierserve API key (``tierserve keys create``) as ``Authorization: Bearer ts-...``: the streaming REST
    API's REQUEST authorizer checks it, as it does the ``openai`` SDK's ``api_key``."""

    def __init__(self, key: str | Callable[[], str]) -> None:
        if isinstance(key, str) and key.strip() and not key.strip().startswith("ts-"):
            raise errors.ConfigurationError("a tierserve API key starts with 'ts-' (tierserve keys create prints it "
                                            "once); for a JWT use Bearer(token)")
        super().__init__(key)


class SigV4:
    """Signs with AWS Signature Version 4 from the standard credential chain (botocore's).

    ``region``: by default the one in an ``execute-api`` host name, else ``AWS_REGION``, else the session's
    region (``AWS_DEFAULT_REGION`` or the profile's). botocore reads only ``AWS_DEFAULT_REGION``; Lambda and
    the AWS SDKs read ``AWS_REGION`` first, and so does this.
    Credentials are resolved once and refreshed by botocore when they are temporary; each request is
    signed with a frozen copy, so a refresh never mixes a key with another key's secret."""

    def __init__(self, region: str | None = None, service: str = EXECUTE_API, session: Any = None) -> None:
        import botocore.session  # lazy: only signing clients pay for botocore

        self._session = session or botocore.session.get_session()
        self.region = region
        self.service = service
        self._credentials: Any = None
        self._lock = threading.Lock()

    def _frozen(self) -> Any:
        with self._lock:
            if self._credentials is None:
                self._credentials = self._session.get_credentials()
            if self._credentials is None:
                raise errors.ConfigurationError(
                    "no AWS credentials found for SigV4 signing; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                    "AWS_PROFILE, or run with a role (on Greengrass: depend on aws.greengrass.TokenExchangeService)")
            return self._credentials.get_frozen_credentials()

    def region_for(self, url: str) -> str:
        if self.region:
            return self.region
        host = (urlsplit(url).hostname or "").lower()
        m = _EXECUTE_API_HOST.fullmatch(host)
        region = m.group(1) if m else (os.environ.get("AWS_REGION", "").strip()
                                       or self._session.get_config_variable("region"))
        if not region:
            raise errors.ConfigurationError(
                f"cannot tell the AWS region to sign for from {host!r}; pass SigV4(region=...) or set AWS_REGION "
                "(or AWS_DEFAULT_REGION)")
        return str(region)

    def headers(self, method: str, url: str, headers: Mapping[str, str], body: bytes) -> dict[str, str]:
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest

        request = AWSRequest(method=method, url=url, data=body, headers=dict(headers))
        SigV4Auth(self._frozen(), self.service, self.region_for(url)).add_auth(request)
        # Only what signing added: Authorization, X-Amz-Date and (temporary credentials) the session token.
        return {k: v for k, v in request.headers.items() if k not in headers}


@dataclass
class Response:
    """One HTTP answer, as it came: status, lower-cased headers, body bytes."""

    status: int
    headers: dict[str, str]
    body: bytes

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    @property
    def served_by(self) -> str | None:
        """``x-served-by``: edge, cpu or gpu."""
        return self.header("x-served-by")

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


class ApiError(errors.TierserveError):
    """The API answered with an error: its HTTP status, the protocol's ``error`` and ``code``, and Retry-After."""

    def __init__(self, status: int, message: str, code: str = "http_error", retry_after_s: float | None = None,
                 served_by: str | None = None) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.code = code
        self.retry_after_s = retry_after_s
        self.served_by = served_by
        self.param: str | None = None  # OpenAI's error names the parameter at fault

    @classmethod
    def from_response(cls, resp: Response) -> ApiError:
        try:
            obj = resp.json()
        except ValueError:
            obj = None
        obj = obj if isinstance(obj, dict) else {}
        retry = resp.header("retry-after")
        return cls.from_document(resp.status, obj, resp.body, retry, resp.served_by)

    @classmethod
    def from_document(cls, status: int, obj: Any, raw: bytes = b"", retry: str | None = None,
                      served_by: str | None = None) -> ApiError:
        """From an error document: the protocol's ``{"error", "code"}``, OpenAI's ``{"error": {"message", "type",
        "param", "code"}}`` (``param`` kept) or API Gateway's own ``{"message"}`` (403, 429, 5xx)."""
        obj = obj if isinstance(obj, dict) else {}
        error = obj.get("error")
        nested = error if isinstance(error, dict) else {}
        message = str(nested.get("message") or (error if not nested else "") or obj.get("message")
                      or raw[:200].decode("utf-8", "replace") or f"HTTP {status}")
        code = str(nested.get("code") or obj.get("code") or "http_error")
        out = cls(status, message, code, float(retry) if retry and retry.replace(".", "", 1).isdigit() else None,
                  served_by)
        out.param = nested.get("param")
        return out


@dataclass
class InferResult:
    """tritonclient's ``InferResult`` (``as_numpy``, ``get_output``, ``get_response``) plus the tier that served it."""

    result: Any
    served_by: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def as_numpy(self, name: str) -> Any:
        return self.result.as_numpy(name)

    def get_output(self, name: str) -> Any:
        return self.result.get_output(name)

    def get_response(self) -> Any:
        return self.result.get_response()


class Client:
    """The deployed API (or the local stack, or an edge runtime) at ``url``, signed with ``auth``.

    Thread-safe: one pool of keep-alive connections (``pool_size`` per host) shared by all threads."""

    def __init__(self, url: str, auth: Auth | None = None, timeout_s: float = 30.0, connect_timeout_s: float = 5.0,
                 pool_size: int = 8) -> None:
        parts = urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise errors.ConfigurationError(
                f"API URL {url!r} must be http(s)://host[:port][/stage], e.g. the stack's ApiUrl output")
        import urllib3  # botocore's own HTTP library: no new dependency

        self.url = url.strip().rstrip("/")
        self.auth: Auth = auth or NoAuth()
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._http = urllib3.PoolManager(num_pools=4, maxsize=pool_size, block=False, retries=False)

    def close(self) -> None:
        self._http.clear()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the raw, signed call ---------------------------------------------------------------------------

    def _send(self, method: str, path: str, body: bytes, headers: Mapping[str, str] | None, timeout_s: float | None,
              **options: Any) -> Any:
        """One signed urllib3 request (``options``: more of ``PoolManager.request``'s, ``preload_content``), never
        retried nor redirected. Unreachable -> BackendUnavailableError; no answer in time -> BackendTimeoutError."""
        import urllib3

        url = f"{self.url}{path}"
        sent = {k: v for k, v in (headers or {}).items()}
        sent.update(self.auth.headers(method, url, sent, body))
        read = self.timeout_s if timeout_s is None else max(0.001, timeout_s)
        timeout = urllib3.Timeout(connect=min(self.connect_timeout_s, read), read=read)
        try:
            return self._http.request(method, url, body=body or None, headers=sent, timeout=timeout, retries=False,
                                      redirect=False, **options)
        except urllib3.exceptions.NewConnectionError as exc:  # refused, DNS (a ConnectTimeoutError subclass)
            raise errors.BackendUnavailableError(f"cannot reach {self.url}: {exc}") from exc
        except urllib3.exceptions.TimeoutError as exc:  # connect or read timeout
            raise errors.BackendTimeoutError(f"{self.url} did not answer {method} {path} within {read:g} s") from exc
        except urllib3.exceptions.HTTPError as exc:  # reset, protocol, TLS
            reason = getattr(exc, "reason", None) or exc
            raise errors.BackendUnavailableError(f"cannot reach {self.url}: {reason}") from exc

    def request(self, method: str, path: str, body: bytes = b"", headers: Mapping[str, str] | None = None,
                timeout_s: float | None = None) -> Response:
        """Send one signed request; every HTTP answer is returned as it is (never retried: an inference
        may already have run). Unreachable -> BackendUnavailableError; no answer in time -> BackendTimeoutError."""
        r = self._send(method, path, body, headers, timeout_s)
        return Response(r.status, {k.lower(): v for k, v in r.headers.items()}, r.data)

    def stream(self, method: str, path: str, body: bytes = b"", headers: Mapping[str, str] | None = None,
               timeout_s: float | None = None) -> StreamedResponse:
        """Send one signed request and return as soon as the answer's head is in: its body is read as it
        arrives (``StreamedResponse.chunks()``). ``timeout_s`` bounds the wait for each read, not the whole
        stream. Close it (or read it to the end) to free the connection; closing early drops the connection, so
        the server sees its client go away."""
        r = self._send(method, path, body, headers, timeout_s, preload_content=False)
        return StreamedResponse(r.status, {k.lower(): v for k, v in r.headers.items()}, r, self.url)

    # --- OpenAI's routes (issue 17) -----------------------------------------------------------------------

    def _v1(self, route: str) -> str:
        """``/v1/<route>`` below this client's URL (a URL that already ends in ``/v1``, the stack's OpenAIBaseUrl,
        is taken as the OpenAI base URL, as the ``openai`` SDK takes it)."""
        return f"/{route}" if self.url.endswith("/v1") else f"/v1/{route}"

    def chat(self, model: str, messages: list[dict[str, Any]], *, stream: bool = False,
             timeout_s: float | None = None, **params: Any) -> Any:
        """``POST /v1/chat/completions``: the ``chat.completion`` document, or with ``stream=True`` an iterator of
        ``chat.completion.chunk`` documents as they arrive. ``params`` are OpenAI's (``max_tokens``,
        ``temperature``, ``top_p``, ``seed``, ``stop``, ``stream_options``...). Raises :class:`ApiError`."""
        return self._openai(self._v1("chat/completions"), {"model": model, "messages": messages, **params}, stream,
                            timeout_s)

    def complete(self, model: str, prompt: str | list[int], *, stream: bool = False, timeout_s: float | None = None,
                 **params: Any) -> Any:
        """``POST /v1/completions``: the ``text_completion`` document, or with ``stream=True`` its chunks."""
        return self._openai(self._v1("completions"), {"model": model, "prompt": prompt, **params}, stream, timeout_s)

    def models(self) -> list[dict[str, Any]]:
        """``GET /v1/models``: every model id (``NAME`` and ``NAME:VERSION``) this API serves."""
        return list(self._ok(self.request("GET", self._v1("models"))).json()["data"])

    def _openai(self, path: str, body: dict[str, Any], stream: bool, timeout_s: float | None) -> Any:
        if stream:
            body = {**body, "stream": True}
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if not stream:
            return self._ok(self.request("POST", path, data, headers, timeout_s)).json()
        streamed = self.stream("POST", path, data, {**headers, "Accept": "text/event-stream"}, timeout_s)
        if streamed.status >= 400:
            raise ApiError.from_response(streamed.read())
        return sse_documents(streamed)

    def _ok(self, resp: Response) -> Response:
        if resp.status >= 400:
            raise ApiError.from_response(resp)
        return resp

    # --- the protocol, with tritonclient's objects ------------------------------------------------------

    def live(self) -> bool:
        return self.request("GET", "/v2/health/live").status == 200

    def ready(self) -> bool:
        return self.request("GET", "/v2/health/ready").status == 200

    def server_metadata(self) -> Any:
        return self._ok(self.request("GET", "/v2")).json()

    def model_metadata(self, model_name: str, model_version: str = "") -> Any:
        return self._ok(self.request("GET", _model_path(model_name, model_version))).json()

    def model_ready(self, model_name: str, model_version: str = "") -> bool:
        return self.request("GET", f"{_model_path(model_name, model_version)}/ready").status == 200

    def infer(self, model_name: str, inputs: list[Any], outputs: list[Any] | None = None, model_version: str = "",
              request_id: str = "", parameters: dict[str, Any] | None = None, target: str | None = None,
              timeout_s: float | None = None) -> InferResult:
        """Run an inference from tritonclient.http ``InferInput`` / ``InferRequestedOutput`` objects.

        ``target`` is the client hint (``x-target: cpu|gpu|edge``). Raises :class:`ApiError` on an error answer."""
        import tritonclient.http as httpclient

        body, json_size = httpclient.InferenceServerClient.generate_request_body(
            inputs, outputs=outputs, request_id=request_id, parameters=parameters)
        body = body.encode() if isinstance(body, str) else body
        headers = {"Content-Type": "application/json" if json_size is None else "application/octet-stream"}
        if json_size is not None:
            headers["Inference-Header-Content-Length"] = str(json_size)
        if target:
            headers["x-target"] = target
        resp = self._ok(self.request("POST", f"{_model_path(model_name, model_version)}/infer", body, headers,
                                     timeout_s))
        length = resp.header("inference-header-content-length")
        result = httpclient.InferenceServerClient.parse_response_body(
            resp.body, header_length=int(length) if length else None)
        return InferResult(result, resp.served_by, resp.headers)


class StreamedResponse:
    """An answer whose body is still arriving: ``status`` and ``headers`` now, ``chunks()`` as they come."""

    def __init__(self, status: int, headers: dict[str, str], raw: Any, url: str) -> None:
        self.status = status
        self.headers = headers
        self._raw = raw
        self._url = url
        self._done = False

    @property
    def served_by(self) -> str | None:
        return self.headers.get("x-served-by")

    def chunks(self) -> Iterator[bytes]:
        """The body's bytes as they arrive (each HTTP chunk of a chunked answer as it comes); the connection is
        released at the end, dropped if the iteration stops early. A broken connection or a read past the timeout
        raises BackendUnavailableError / BackendTimeoutError."""
        import urllib3

        raw = self._raw
        try:
            if raw.chunked and raw.supports_chunked_reads():
                parts: Iterator[bytes] = raw.read_chunked(decode_content=True)
            else:
                parts = iter(lambda: raw.read1(65536), b"")
            yield from (p for p in parts if p)
            self._done = True
        except urllib3.exceptions.TimeoutError as exc:
            raise errors.BackendTimeoutError(f"{self._url} stopped sending its stream ({exc})") from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise errors.BackendUnavailableError(f"the stream from {self._url} broke: {exc}") from exc
        finally:
            self.close()

    def read(self) -> Response:
        """The whole body, as a :class:`Response`."""
        return Response(self.status, self.headers, b"".join(self.chunks()))

    def close(self) -> None:
        """Release the connection when the answer was read to its end, else drop it (the server sees its
        client go away, and a generation there stops)."""
        raw, self._raw = self._raw, None
        if raw is None:
            return
        if self._done:
            raw.release_conn()
        else:
            raw.close()


def sse_documents(streamed: StreamedResponse) -> Iterator[Any]:
    """The JSON documents of an SSE stream (``data: {...}`` events), until ``data: [DONE]``; an error event (OpenAI's
    ``{"error": {...}}`` or Triton's ``{"error": "..."}``) is raised as :class:`ApiError`."""
    buffer = b""
    try:
        for chunk in streamed.chunks():
            buffer += chunk
            while True:
                end = _event_end(buffer)
                if end is None:
                    break
                event, buffer = buffer[:end[0]], buffer[end[1]:]
                data = b"\n".join(line[5:].lstrip(b" ") for line in event.replace(b"\r\n", b"\n").split(b"\n")
                                  if line.startswith(b"data:"))
                if not data:
                    continue
                if data.strip() == b"[DONE]":
                    return
                doc = json.loads(data)
                if isinstance(doc, dict) and "error" in doc:
                    raise ApiError.from_document(200, doc, data, None, streamed.served_by)
                yield doc
    finally:
        streamed.close()


def _event_end(buffer: bytes) -> tuple[int, int] | None:
    """Where the first SSE event in ``buffer`` ends (its blank line), as (end of event, start of the next)."""
    ends = [(i, i + len(sep)) for sep in (b"\n\n", b"\r\n\r\n") if (i := buffer.find(sep)) >= 0]
    return min(ends) if ends else None


def _model_path(name: str, version: str = "") -> str:
    path = f"/v2/models/{quote(name, safe='')}"
    return f"{path}/versions/{quote(str(version), safe='')}" if version else path


def _token_source(token: str | None, token_file: str | None, missing: str) -> str | Callable[[], str]:
    """The token itself, or a function that re-reads ``token_file`` on every request; ``missing``: the error
    when neither is given."""
    if token_file:
        from pathlib import Path

        path = Path(token_file)
        return lambda: path.read_text().strip()
    if token:
        return token
    raise errors.ConfigurationError(missing)


def auth_from(kind: str, *, region: str | None = None, token: str | None = None,
              token_file: str | None = None) -> Auth:
    """The Auth for ``kind`` (``none``, ``iam``, ``jwt``, ``key``): what a command line or a recipe names.

    ``jwt`` and ``key`` (a tierserve API key) take the token itself or a file re-read on every request (a sidecar
    can rotate it)."""
    if kind == "none":
        return NoAuth()
    if kind == "iam":
        return SigV4(region=region)
    if kind == "jwt":
        return Bearer(_token_source(token, token_file,
                                    "jwt auth needs a token or a token file (--cloud-token-file)"))
    if kind == "key":
        return ApiKey(_token_source(token, token_file,
                                    "key auth needs a tierserve API key or a file holding one (--cloud-token-file)"))
    raise errors.ConfigurationError(f"auth {kind!r} is not known; use none, iam, jwt or key")
