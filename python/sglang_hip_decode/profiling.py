"""A short decode profile of a running SGLang server, for the A/B runner's kernel table.

``decode_profile(base_url, out_dir, ...)`` opens ``concurrency`` streamed ``/generate`` requests
(``input_len`` fixed token ids each, ``ignore_eos``, at least enough new tokens to outlast the
profile), waits until every stream has produced two tokens (all of them decoding), asks SGLang's
``/start_profile`` for ``num_steps`` forward steps into ``out_dir`` (CPU and GPU activity, file
prefix ``prefix``), waits until rank 0's trace (``*TP-0*.trace.json.gz``) is complete and holds
decode steps, then closes the streams (SGLang aborts a request whose client went away). The server
writes the trace itself, so ``out_dir`` must be a path the server can write and the runner can
read (the same host; a container needs it mounted).

Anything that goes wrong raises :class:`ProfileError` with what was seen; the streams are closed
on every path.
"""

from __future__ import annotations

import json
import random
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from . import tracediff


class ProfileError(RuntimeError):
    """The profile could not be taken (the message says at which step and why)."""


class _Stream(threading.Thread):
    """One streamed /generate request; counts the chunks it receives until told to stop."""

    def __init__(self, url: str, body: dict, timeout: float):
        super().__init__(daemon=True)
        self.url, self.body, self.timeout = url, body, timeout
        self.chunks, self.error, self.done = 0, None, False
        self.stop = threading.Event()
        self._resp = None

    def run(self) -> None:
        req = urllib.request.Request(self.url, data=json.dumps(self.body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            self._resp = urllib.request.urlopen(req, timeout=self.timeout)
            for line in self._resp:
                if self.stop.is_set():
                    break
                if line.startswith(b"data:") and not line.startswith(b"data: [DONE]"):
                    self.chunks += 1
        except Exception as exc:  # noqa: BLE001 - reported by the caller, whatever it was
            if not self.stop.is_set():
                self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.done = True
            self.close()

    def close(self) -> None:
        resp, self._resp = self._resp, None
        if resp is not None:
            try:
                resp.close()
            except Exception:  # noqa: BLE001 - closing a connection the server already dropped
                pass


def rank0_traces(out_dir: Path) -> list[Path]:
    """Rank 0's finished trace files in ``out_dir`` (hidden files are ones still being written), newest last."""
    found = [p for p in out_dir.glob("*TP-0*.trace.json*") if not p.name.startswith(".")]
    return sorted(found, key=lambda p: p.stat().st_mtime)


def decode_profile(base_url: str, out_dir: Path, *, num_steps: int, concurrency: int, input_len: int,
                   output_len: int, prefix: str, timeout: float, poll: float = 0.5,
                   check: Callable[[], None] = lambda: None) -> Path:
    """Profile ``num_steps`` decode steps at ``concurrency``; return rank 0's trace. ``check()`` runs
    every poll (the runner's signal and server-alive checks: whatever it raises propagates)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in rank0_traces(out_dir):
        old.unlink()
    deadline = time.monotonic() + timeout
    new_tokens = max(output_len, 32 * num_steps + 64)  # the streams must outlast the profile (and its start)
    streams = []
    for i in range(concurrency):
        rng = random.Random(i)
        body = {"input_ids": [rng.randrange(100, 10000) for _ in range(input_len)],
                "sampling_params": {"max_new_tokens": new_tokens, "ignore_eos": True, "temperature": 0.0},
                "stream": True}
        streams.append(_Stream(base_url + "/generate", body, timeout))
    try:
        for s in streams:
            s.start()
        while not all(s.chunks >= 2 for s in streams):  # every request is past its prefill
            check()
            failed = [s for s in streams if s.done and s.chunks < 2]
            if failed:
                raise ProfileError(f"a decode-load request ended after {failed[0].chunks} tokens before the profile "
                                   f"started: {failed[0].error or 'the stream closed'}")
            if time.monotonic() > deadline:
                raise ProfileError(f"the {concurrency} decode-load requests were not all decoding within {timeout:.0f} s")
            time.sleep(poll / 5)
        body = {"output_dir": str(out_dir), "num_steps": num_steps, "activities": ["CPU", "GPU"],
                "profile_prefix": prefix}
        req = urllib.request.Request(base_url + "/start_profile", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=min(timeout, 300)) as resp:
                resp.read()
        except urllib.error.HTTPError as exc:
            with exc:
                detail = exc.read()[:300].decode(errors="replace")
            raise ProfileError(f"/start_profile answered HTTP {exc.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise ProfileError(f"/start_profile failed: {exc}") from None
        last = "no rank-0 trace file yet"
        while time.monotonic() < deadline:
            check()
            for path in reversed(rank0_traces(out_dir)):
                try:
                    tracediff.load_events(path)
                except tracediff.TraceError as exc:  # still being written
                    last = str(exc)
                    continue
                try:
                    tracediff.read_steps(path)
                except tracediff.TraceError as exc:  # complete, but nothing to compare in it
                    raise ProfileError(f"rank 0's profile holds no decode step to compare: {exc}") from None
                return path
            time.sleep(poll)
        _stop_profile(base_url)  # so the server does not keep profiling after the runner gave up on it
        raise ProfileError(f"no complete rank-0 decode trace in {out_dir} within {timeout:.0f} s ({last}); "
                           "asked the server to /stop_profile")
    finally:
        for s in streams:
            s.stop.set()
            s.close()
        until = time.monotonic() + 10  # one shared grace period, not 10 s per stream
        for s in streams:
            s.join(timeout=max(0.0, until - time.monotonic()))


def _stop_profile(base_url: str) -> None:
    """Best effort: SGLang's ``/stop_profile`` (its answer, or its absence, changes nothing here)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(base_url + "/stop_profile", data=b"{}",
                                                           headers={"Content-Type": "application/json"}), timeout=30):
            pass
    except (urllib.error.URLError, OSError):
        pass
