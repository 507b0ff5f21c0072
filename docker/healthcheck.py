"""Container healthcheck: exit 0 when the URL answers 200 (API: /healthz, worker: its /metrics)."""

import sys
import urllib.request

url = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000/healthz"
try:
    with urllib.request.urlopen(url, timeout=3) as response:
        sys.exit(0 if response.status == 200 else 1)
except Exception as exc:  # noqa: BLE001 - any failure is "unhealthy", with the reason on stderr
    print(f"unhealthy: {url}: {exc}", file=sys.stderr)
    sys.exit(1)
