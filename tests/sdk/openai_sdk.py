"""The official OpenAI Python SDK against the tokenledger router.

Run by tests/router_sdk.rs with ROUTER_URL and API_KEY set; prints one JSON object of what
the SDK saw, which the Rust test compares with the billing API.
"""

import json
import os
import sys

import openai

client = openai.OpenAI(
    base_url=os.environ["ROUTER_URL"] + "/v1", api_key=os.environ["API_KEY"], max_retries=0
)
messages = [
    {"role": "system", "content": "You are a careful assistant for a billing team."},
    {"role": "user", "content": "In one sentence: why must every usage event be counted exactly once?"},
]
out = {"sdk_version": openai.__version__}

# plain
raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=messages)
completion = raw.parse()
exact = json.loads(raw.http_response.text, parse_float=str)  # the cost as sent, digit for digit
out["plain"] = {
    "request_id": raw.headers["x-tokenledger-request-id"],
    "content": completion.choices[0].message.content,
    "prompt_tokens": completion.usage.prompt_tokens,
    "completion_tokens": completion.usage.completion_tokens,
    "cached_tokens": completion.usage.prompt_tokens_details.cached_tokens,
    "cost": exact["usage"]["cost"],
    "sdk_cost": completion.usage.model_dump()["cost"],
}

# streamed, usage asked for
raw = client.chat.completions.with_raw_response.create(
    model="gpt-4o-mini", messages=messages, stream=True, stream_options={"include_usage": True}
)
text, usage, chunks = "", None, 0
for chunk in raw.parse():
    chunks += 1
    if chunk.choices:
        text += chunk.choices[0].delta.content or ""
    if chunk.usage is not None:
        usage = chunk.usage
out["stream"] = {
    "request_id": raw.headers["x-tokenledger-request-id"],
    "content": text,
    "chunks": chunks,
    "prompt_tokens": usage.prompt_tokens,
    "completion_tokens": usage.completion_tokens,
    "cached_tokens": usage.prompt_tokens_details.cached_tokens,
    "sdk_cost": usage.model_dump()["cost"],
}

# streamed, usage not asked for: none reaches the client
raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=messages, stream=True)
text, saw_usage = "", False
for chunk in raw.parse():
    if chunk.choices:
        text += chunk.choices[0].delta.content or ""
    if chunk.usage is not None:
        saw_usage = True
out["stream_no_usage"] = {
    "request_id": raw.headers["x-tokenledger-request-id"],
    "content": text,
    "saw_usage": saw_usage,
}

# errors arrive as the SDK's typed exceptions
try:
    client.chat.completions.create(model="no-such-model", messages=messages)
    out["not_found"] = None
except openai.NotFoundError as e:
    out["not_found"] = {"status": e.status_code, "code": e.code}

json.dump(out, sys.stdout)
