"""The streaming REST API's bearer token as the ``openai`` SDK sends it (its ``api_key``), through `tierserve serve`
(issue 17's acceptance): a tierserve API key (``--auth keys``, made and revoked with the real ``tierserve keys``
command) and a JWT (``--auth jwt``: an ID token of a Cognito user pool on moto_server, checked as API Gateway's
Cognito authorizer checks it) both work, unchanged, for a streamed and an unstreamed chat; a revoked key, a
missing token, a key on the JWT API and a forged JWT get 401 in OpenAI's shape (``openai.AuthenticationError``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.genai_models import TinyLM, export, write_genai_store
from tierserve_tools.serve import LocalStack

pytestmark = pytest.mark.integration
openai = pytest.importorskip("openai")
ROOT = Path(__file__).resolve().parents[2]
CHAT = [{"role": "user", "content": "The with statement"}]


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> TinyLM:
    return export(tmp_path_factory.mktemp("auth-lm"), "llama")


@pytest.fixture(scope="module", params=["keys", "jwt"])
def stack(request: pytest.FixtureRequest, llama: TinyLM, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[LocalStack]:
    store = tmp_path_factory.mktemp(f"auth-store-{request.param}")
    write_genai_store(store, "tiny", llama, context_length=256)
    with LocalStack(store, port=0, triton=False, batch=False, s3=False, auth=request.param,
                    workdir=tmp_path_factory.mktemp(f"auth-serve-{request.param}")) as local:
        yield local


def sdk(stack: LocalStack, api_key: str) -> object:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=api_key, max_retries=0, timeout=120)


def chat_works(stack: LocalStack, api_key: str) -> None:
    client = sdk(stack, api_key)
    whole = client.chat.completions.create(model="tiny", messages=CHAT, temperature=0, max_tokens=8)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=CHAT, temperature=0, max_tokens=8, stream=True) if c.choices)
    assert whole.choices[0].message.content == streamed and whole.usage.completion_tokens > 0


def refused(stack: LocalStack, api_key: str) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        sdk(stack, api_key).chat.completions.create(model="tiny", messages=CHAT, max_tokens=4)
    assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"


def keys_cli(stack: LocalStack, *args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "tierserve_tools.cli", "keys", "--stack", str(stack.workdir), *args,
                           "--json"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


def test_an_api_key_works_as_the_sdks_api_key_and_a_revoked_one_gets_401(stack: LocalStack) -> None:
    if stack.auth != "keys":
        pytest.skip("the keys stack")
    made = keys_cli(stack, "create", "--caller", "team-a")
    chat_works(stack, made["key"])
    refused(stack, "ts-" + "A" * 43)  # well formed, unknown
    keys_cli(stack, "revoke", made["key_id"])
    refused(stack, made["key"])


def test_a_jwt_works_as_the_sdks_api_key_and_a_forged_one_gets_401(stack: LocalStack) -> None:
    if stack.auth != "jwt":
        pytest.skip("the jwt stack")
    token = stack.id_token("alice")
    chat_works(stack, token)
    head, body, signature = token.split(".")
    import base64

    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    forged = base64.urlsafe_b64encode(json.dumps({**claims, "sub": "someone-else"}).encode()).rstrip(b"=").decode()
    refused(stack, f"{head}.{forged}.{signature}")
    refused(stack, "ts-" + "A" * 43)  # a tierserve key is no JWT


def test_no_token_gets_401(stack: LocalStack) -> None:
    import urllib.error
    import urllib.request

    body = json.dumps({"model": "tiny", "messages": CHAT, "max_tokens": 4}).encode()
    request = urllib.request.Request(f"{stack.url}/v1/chat/completions", data=body,
                                     headers={"content-type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=60)
    assert caught.value.code == 401 and caught.value.headers["www-authenticate"] == "Bearer"
    assert json.loads(caught.value.read())["error"]["code"] == "invalid_api_key"
