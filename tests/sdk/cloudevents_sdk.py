"""The CloudEvents Python SDK (PyPI `cloudevents`) against tokenledger's ingest API.

Run by tests/ledger.rs with API_URL, API_KEY and TENANT set. The SDK builds the usage
events (its own ids, times and attribute checks) and writes them in structured mode,
binary mode (with and without a datacontenttype) and as a JSON batch, sent with httpx.
Prints one JSON object of what was sent and answered, which the Rust test compares with
the ledger.
"""

import json
import os

import httpx
from cloudevents.core.bindings import http
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

URL = os.environ["API_URL"] + "/v1/events"
KEY = os.environ["API_KEY"]
TENANT = os.environ["TENANT"]
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def post(headers, body):
    # httpx adds no Content-Type of its own to a bytes body, so the request carries
    # exactly the SDK's headers
    r = httpx.post(URL, content=body, headers={**headers, "Authorization": "Bearer " + KEY})
    return r.status_code, r.json()


def usage(request_id, extra=None, datacontenttype="application/json"):
    attributes = {
        "type": "tokenledger.usage.v1",
        "source": "https://gw.example.com/router/eu-1",
        "subject": request_id,
        "traceparent": TRACEPARENT,
    }
    if datacontenttype:
        attributes["datacontenttype"] = datacontenttype
    attributes.update(extra or {})
    data = {
        "tenant_id": TENANT,
        "request_id": request_id,
        "model": "gpt-4o",
        "provider": "openai",
        "input_tokens": 1200,
        "cached_input_tokens": 200,
        "output_tokens": 300,
        "status": "ok",
        "latency_ms": 850,
    }
    return CloudEvent(attributes=attributes, data=data)


fmt = JSONFormat()
out = {}

structured = usage("sdk-structured")
m = http.to_structured(structured, fmt)
out["structured"] = {"id": structured.get_id(), "answer": post(m.headers, m.body)}

binary = usage("sdk-binary", {"sampled": True, "retries": 2})
m = http.to_binary(binary, fmt)
out["binary"] = {"id": binary.get_id(), "headers": m.headers, "answer": post(m.headers, m.body)}

# no datacontenttype: the SDK sends no Content-Type at all
bare = usage("sdk-bare", datacontenttype=None)
m = http.to_binary(bare, fmt)
out["bare"] = {"id": bare.get_id(), "headers": m.headers, "answer": post(m.headers, m.body)}

# the structured event again, in binary mode: the same event
m = http.to_binary(structured, fmt)
out["again"] = {"answer": post(m.headers, m.body)}

batch = [usage(f"sdk-batch-{i}") for i in range(3)]
body = ("[" + ",".join(fmt.write(e).decode() for e in batch) + "]").encode()
out["batch"] = {
    "ids": [e.get_id() for e in batch],
    "answer": post({"Content-Type": "application/cloudevents-batch+json"}, body),
}
out["empty"] = {"answer": post({"Content-Type": "application/cloudevents-batch+json"}, b"[]")}

print(json.dumps(out))
