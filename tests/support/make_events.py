"""Regenerate events/*.json from the shapes `sam local generate-event` prints.

The *_template.json files beside this script are verbatim output of
`sam local generate-event apigateway http-api-proxy`, `s3 put` and `sqs receive-message`
(SAM CLI 1.170). Run: python -m tests.support.make_events
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

HERE = Path(__file__).parent
EVENTS = HERE.parent.parent / "events"
DEMO_MODEL = "digits"


def http_event(method: str, path: str, route: str, body: str | None = None, path_params: dict | None = None,
               headers: dict | None = None) -> dict:
    ev = copy.deepcopy(json.loads((HERE / "http_api_proxy_template.json").read_text()))
    ev["routeKey"] = route
    ev["rawPath"] = path
    ev["rawQueryString"] = ""
    ev.pop("cookies", None)
    ev["headers"] = {"accept": "application/json", "host": "id.execute-api.us-east-1.amazonaws.com",
                     **(headers or {})}
    ev.pop("queryStringParameters", None)
    ev["requestContext"]["routeKey"] = route
    ev["requestContext"]["http"]["method"] = method
    ev["requestContext"]["http"]["path"] = path
    ev["requestContext"]["requestId"] = "c6af9ac6-7b61-11e6-9a41-93e8deadbeef"
    ev["requestContext"].pop("authentication", None)
    ev["requestContext"]["authorizer"] = {"iam": {
        "accessKey": "AKIAIOSFODNN7EXAMPLE", "accountId": "123456789012", "callerId": "AIDACKCEVSQ6C2EXAMPLE",
        "cognitoIdentity": None, "principalOrgId": None,
        "userArn": "arn:aws:iam::123456789012:user/tierserve-client", "userId": "AIDACKCEVSQ6C2EXAMPLE"}}
    ev["pathParameters"] = path_params or {}
    ev.pop("stageVariables", None)
    if body is None:
        ev.pop("body", None)
        ev["isBase64Encoded"] = False
    else:
        ev["body"] = body
        ev["isBase64Encoded"] = False
    return ev


def digits_rows(n: int) -> list[list[float]]:
    from sklearn.datasets import load_digits

    x = load_digits().data.astype("float32")
    return x[-n:].tolist()  # the last rows belong to the held-out split of the demo model


def main() -> None:
    EVENTS.mkdir(exist_ok=True)
    rows = digits_rows(2)
    infer = {"id": "demo-1", "inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP32",
                                         "data": [v for r in rows for v in r]}],
             "outputs": [{"name": "label"}, {"name": "probabilities"}]}
    write("http_infer.json", http_event("POST", f"/v2/models/{DEMO_MODEL}/infer", "POST /v2/models/{name}/infer",
                                        json.dumps(infer), {"name": DEMO_MODEL},
                                        {"content-type": "application/json"}))
    write("http_model_metadata.json", http_event("GET", f"/v2/models/{DEMO_MODEL}", "GET /v2/models/{name}",
                                                 None, {"name": DEMO_MODEL}))
    write("http_health_ready.json", http_event("GET", "/v2/health/ready", "GET /v2/health/ready"))
    # The router's Invoke payload (tierserve.direct): the client's body as API Gateway handed it over.
    write("cpu_direct_infer.json", {"model_name": DEMO_MODEL, "model_version": "1",
                                    "headers": {"content-type": "application/json"},
                                    "body": json.dumps(infer), "isBase64Encoded": False})


def write(name: str, obj: dict) -> None:
    (EVENTS / name).write_text(json.dumps(obj, indent=2) + "\n")
    print("wrote", EVENTS / name)


if __name__ == "__main__":
    main()
