"""A small real HTTP server that answers the subset of SGLang's endpoints the real clients use
(sglang.test.few_shot_gsm8k through RuntimeEndpoint, sglang.bench_serving --backend sglang), for
the A/B runner's tests. Started the way the runner starts ``sglang.launch_server`` (same flags);
like SGLang, it calls the installed plugin's ``register()`` at start-up (the entry point
``load_plugins()`` would call), so the status file is the real plugin's.

GSM8K: answers the last "Question: ... What is A plus B?" in the prompt with A+B. /generate streams one token (a word) every
``--token-ms`` milliseconds (at most ``--max-tokens`` of them when set). ``/server_info`` reports the
parsed launch flags as SGLang's does (its server arguments as a dict). It starts one process per
TP rank (``--workers N`` to change that) that calls ``register()`` too, as SGLang's scheduler
processes do, with ``--worker-env K=V`` added to their environment. Failure modes: ``--never-healthy``,
``--die-after N`` (exit after N
/generate requests), ``--fail-streams-after N`` (streamed requests after the first N get HTTP 500),
``--skip-plugin``. ``--slowdown-pct P``: with the plugin switched on (``SGLANG_HIP_DECODE=1``, the
runner's 'on' arm) every token takes P% longer: a known difference for the runner's statistics.

``/start_profile`` (SGLang's JSON body: ``output_dir``, ``num_steps``, ``profile_prefix``) waits
``num_steps`` token intervals, then writes one synthetic chrome trace per TP rank,
``<prefix>-<id>-TP-<rank>.trace.json.gz`` (test/trace_fixtures.py): ``num_steps`` decode steps at the
batch of the streams open when the profile started, 4 layers, with the copy each patch removes present only where that
patch is not applied in this process (``CatArrayBatchedCopy`` for nsa-cat-skip on an NSA server, the
flatten ``direct_copy`` for mxfp4-vbmm-layout on an aiter one). ``--no-profile`` answers it with 404,
as a server without the endpoint would; ``--profile-writes-nothing`` accepts it and never writes a
trace (a profile that times out); ``GET /standin_state`` says how often ``/stop_profile`` was called.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

p = argparse.ArgumentParser()
p.add_argument("--model-path", required=True)
p.add_argument("--tp-size", type=int, default=1)
p.add_argument("--host", default="127.0.0.1")
p.add_argument("--port", type=int, required=True)
p.add_argument("--never-healthy", action="store_true")
p.add_argument("--die-after", type=int, default=0)
p.add_argument("--skip-plugin", action="store_true")
p.add_argument("--token-ms", type=float, default=1.0)
p.add_argument("--max-tokens", type=int, default=0)
p.add_argument("--fail-streams-after", type=int, default=-1)
p.add_argument("--workers", type=int, default=None)  # default: one per TP rank, as SGLang's schedulers
p.add_argument("--worker-env", action="append", default=[])
p.add_argument("--no-profile", action="store_true")
p.add_argument("--profile-writes-nothing", action="store_true")  # accepts /start_profile, never writes a trace
p.add_argument("--slowdown-pct", type=float, default=0.0)  # the 'on' arm (SGLANG_HIP_DECODE=1) streams this much slower
# Launch flags SGLang reports back in /server_info (the rest are accepted and ignored).
p.add_argument("--trust-remote-code", action="store_true")
p.add_argument("--attention-backend", default=None)
p.add_argument("--decode-attention-backend", default=None)
p.add_argument("--nsa-decode-backend", default=None)
p.add_argument("--nsa-prefill-backend", default=None)
p.add_argument("--dsa-decode-backend", default=None)  # 0.5.13 and later
p.add_argument("--dsa-prefill-backend", default=None)
p.add_argument("--kv-cache-dtype", default="auto")
args, _unknown = p.parse_known_args()  # launch_server flags this stand-in does not model
if os.environ.get("SGLANG_HIP_DECODE") == "1":
    args.token_ms *= 1 + args.slowdown_pct / 100.0

if not args.skip_plugin:
    import sglang_hip_decode

    sglang_hip_decode.register()
    worker_env = dict(os.environ, **dict(kv.split("=", 1) for kv in args.worker_env))
    workers = [subprocess.Popen([sys.executable, "-c", "import sglang_hip_decode; sglang_hip_decode.register()"],
                                env=worker_env) for _ in range(args.tp_size if args.workers is None else args.workers)]
    if any(w.wait() != 0 for w in workers):  # scheduler processes register too, before the server is healthy
        sys.exit("stand-in: a worker failed")

def _sglang_version():
    from importlib import metadata

    try:
        return metadata.version("sglang")
    except metadata.PackageNotFoundError:
        return "stand-in"


# As the installed sglang reports them: its version, and nsa_* backend fields before 0.5.13, dsa_* from it.
VERSION = _sglang_version()
DSA = VERSION != "stand-in" and tuple(int(x) for x in VERSION.split("+")[0].split(".")[:3]) >= (0, 5, 13)
SERVER_INFO = {
    "model_path": args.model_path, "tp_size": args.tp_size, "host": args.host, "port": args.port,
    "trust_remote_code": args.trust_remote_code, "attention_backend": args.attention_backend,
    "decode_attention_backend": args.decode_attention_backend, "kv_cache_dtype": args.kv_cache_dtype,
    "internal_states": [{}], "version": VERSION,
}
if DSA:
    SERVER_INFO.update(dsa_decode_backend=args.dsa_decode_backend, dsa_prefill_backend=args.dsa_prefill_backend)
else:
    SERVER_INFO.update(nsa_decode_backend=args.nsa_decode_backend, nsa_prefill_backend=args.nsa_prefill_backend)

state = {"generates": 0, "streams": 0, "open_streams": 0, "stop_profile": 0}
lock = threading.Lock()


def _applied(name: str) -> bool:
    """Whether the plugin applied ``name`` in this process (what the synthetic trace shows)."""
    if args.skip_plugin:
        return False
    from sglang_hip_decode import patching
    from sglang_hip_decode.patches import catalog

    entry = next(e for e in catalog() if e.name == name)
    return entry.patch is not None and any(name in patching.active_patches(t) for t in entry.patch.targets)


def write_profile(body: dict) -> None:
    """After ``num_steps`` token intervals, one trace per TP rank into ``output_dir``."""
    from trace_fixtures import CAT_CUDA, COPY_CUDA, Trace

    steps = int(body.get("num_steps") or 5)
    with lock:  # the batch decoding when the profile starts
        batch = max(state["open_streams"], 1)
    time.sleep(steps * args.token_ms / 1000.0)
    out = body.get("output_dir") or os.environ.get("SGLANG_TORCH_PROFILER_DIR", "/tmp")
    os.makedirs(out, exist_ok=True)
    layer = [("_fused_qk_rope_cat_kernel", 2.0)]
    if args.attention_backend == "nsa" and not _applied("nsa-cat-skip"):
        layer.append((CAT_CUDA.format(n=64), 2.5))
    layer.append(("_sparse_mla_splitk_kernel", 30.0 + batch))
    if args.attention_backend == "aiter" and not _applied("mxfp4-vbmm-layout"):
        layer.append((COPY_CUDA, 3.0))
    layer.append(("nvjet_tst_64x8_o_proj", 4.0))
    prefix = (body.get("profile_prefix") + "-") if body.get("profile_prefix") else ""
    for rank in range(args.tp_size):
        trace = Trace(rocm=True)
        for _ in range(steps):
            trace.step(f"step[DECODE bs={batch}]", layer * 4 + [("_sampler_kernel", 1.0)], graph=True)
        name = f"{prefix}{time.time():.0f}-TP-{rank}.trace.json.gz"
        part = os.path.join(out, "." + name)  # written whole, then renamed: never seen half-written
        trace.write(Path(part), gz=True)
        os.replace(part, os.path.join(out, name))


def answer(prompt: str) -> str:
    last = prompt.rsplit("Question:", 1)[-1]
    nums = [int(n) for n in re.findall(r"What is (\d+) plus (\d+)", last)[-1]] if "plus" in last else [0, 0]
    value = nums[0] + nums[1]
    return f" We add the numbers. The answer is {value}."


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def log_message(self, *a):
        pass

    def _json(self, obj, code=200):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path.startswith("/health"):
            return self._json({}, 503 if args.never_healthy else 200)
        if self.path == "/get_model_info":
            return self._json({"model_path": args.model_path, "tokenizer_path": args.model_path, "is_generation": True})
        if self.path == "/v1/models":  # bench_serving's readiness check
            return self._json({"object": "list", "data": [{"id": args.model_path, "object": "model"}]})
        if self.path in ("/server_info", "/get_server_info"):
            return self._json(SERVER_INFO)
        if self.path == "/standin_state":  # for the tests: what the stand-in was asked
            with lock:
                return self._json(dict(state))
        return self._json({"error": "not found"}, 404)

    def do_POST(self):
        length = int(self.headers.get("Content-Length", 0))
        payload = json.loads(self.rfile.read(length) or b"{}")
        if self.path == "/flush_cache":
            return self._json({})
        if self.path == "/start_profile" and not args.no_profile:
            if not args.profile_writes_nothing:
                threading.Thread(target=write_profile, args=(payload,), daemon=True).start()
            return self._json({"message": "Start profiling."})
        if self.path == "/stop_profile" and not args.no_profile:
            with lock:
                state["stop_profile"] += 1
            return self._json({"message": "Stop profiling."})
        if self.path != "/generate":
            return self._json({"error": "not found"}, 404)
        with lock:
            state["generates"] += 1
            if args.die_after and state["generates"] > args.die_after:
                os._exit(3)
        prompt = payload.get("text") or " ".join("t" for _ in payload.get("input_ids") or [])
        params = payload.get("sampling_params", {})
        max_new = int(params.get("max_new_tokens", 16))
        if payload.get("stream"):
            with lock:
                state["streams"] += 1
                failing = 0 <= args.fail_streams_after < state["streams"]
            if failing:
                return self._json({"error": "stand-in: this request fails"}, 500)
            words = [f" w{i}" for i in range(min(max_new, args.max_tokens) if args.max_tokens else max_new)]
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            text = ""
            with lock:
                state["open_streams"] += 1
            try:
                for i, word in enumerate(words, start=1):
                    time.sleep(args.token_ms / 1000.0)
                    text += word
                    chunk = {"text": text, "meta_info": {"prompt_tokens": len(prompt.split()), "completion_tokens": i}}
                    self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                    self.wfile.flush()
                self.wfile.write(b"data: [DONE]\n\n")
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client went away (SGLang aborts the request)
            finally:
                with lock:
                    state["open_streams"] -= 1
            return
        text = answer(prompt)
        meta = {"prompt_tokens": len(prompt.split()), "completion_tokens": len(text.split()), "finish_reason": {"type": "stop"}}
        return self._json({"text": text, "meta_info": meta})


ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()
