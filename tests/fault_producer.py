"""An HTTP producer in its own OS process, for the crash tests (tests/test_faults.py).

    python -m tests.fault_producer BASE_URL STREAM_ID FIRST COUNT LOG_FILE

Appends one event per request, {"n": counter}, counting from FIRST, through the
native producer API. Every answer is written to LOG_FILE at once (one line, one
unbuffered write, so a SIGKILL loses nothing that was acknowledged):

    ok <n> <seq>          HTTP 200: the append is acknowledged with its seq
    fail <n> <status> <retry-after> <message>
                          any other answer: its HTTP status, Retry-After ("-" if
                          none) and the error's message on one line; or
    fail <n> conn         when the request got no answer at all (the service was away)

A counter is never sent twice: after a failure the producer moves on to the next
one, since an unanswered append may or may not have been committed.
"""

from __future__ import annotations

import os
import sys
import time

import httpx


def produce(base: str, stream_id: str, first: int, count: int, log_path: str) -> None:
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    url = f"{base}/v1/streams/{stream_id}/events"
    with httpx.Client(timeout=10) as client:
        for n in range(first, first + count):
            try:
                response = client.post(url, json={"type": "count", "data": {"n": n}})
            except httpx.HTTPError:
                os.write(fd, f"fail {n} conn\n".encode())
                time.sleep(0.05)
                continue
            if response.status_code == 200:
                os.write(fd, f"ok {n} {response.json()['last_seq']}\n".encode())
            else:
                retry = response.headers.get("retry-after", "-")
                # The message says which failure it was when a test finds a wrong status.
                message = " ".join(response.text.split())[:300]
                os.write(fd, f"fail {n} {response.status_code} {retry} {message}\n".encode())
                time.sleep(0.05)
    os.close(fd)


if __name__ == "__main__":
    base, stream_id, first, count, log_path = sys.argv[1:6]
    produce(base, stream_id, int(first), int(count), log_path)
