"""Verify webhook deliveries with the Standard Webhooks reference library (from PyPI).

Reads a JSON list of {"secret", "headers", "body"} on stdin; exits non-zero naming the
first delivery whose signature the library rejects.
"""
import json
import sys

from standardwebhooks.webhooks import Webhook

deliveries = json.load(sys.stdin)
for i, d in enumerate(deliveries):
    try:
        Webhook(d["secret"]).verify(d["body"], d["headers"])
    except Exception as e:  # noqa: BLE001 - report whatever the library raised
        print(f"delivery {i}: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
print(f"{len(deliveries)} deliveries verified")
