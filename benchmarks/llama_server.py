"""llama.cpp's own ``llama-server``, built from the llama.cpp sources our runtime runs, as a peer to compare with.

The sources are those of the installed llama-cpp-python's source distribution (:mod:`quantize.fixtures.llama_cpp_sdist`),
so both sides run the same llama.cpp. The build is CPU only, of the ``llama-server`` target alone (no web UI, no
HTTPS, no tests), and is kept under ``~/.cache/rank1-local/llama-server/<llama-cpp-python version>/``:
``bin/llama-server`` and ``build.json`` (the CMake arguments, the seconds it took, the load average at the start).
No binary is ever committed.

    python -m benchmarks.llama_server build                  # once (minutes: it compiles llama.cpp)
    python -m benchmarks.llama_server rerank --model X.gguf --query "…" --docs "…" "…"

In Python, ``with LlamaServer(gguf) as server: server.rerank(query, documents)`` starts ``llama-server --reranking``
on a free loopback port, returns the scores in the documents' order, and stops the server on leaving.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from benchmarks.server_process import free_port
from quantize.fixtures.llama_cpp_sdist import extract, llama_cpp_python_version, sdist_archive
from rank1_local.core.errors import ModelNotFoundError, Rank1Error

logger = logging.getLogger(__name__)

# llama.cpp's tree minus what the server build never reads (model vocab files, docs, the web UI's sources: the
# server is built with an empty UI)
_SKIPPED = ("models/", "docs/", "media/", "tools/ui/src/", "tools/ui/static/", "tools/ui/tests/", ".devops/", "ci/")
CMAKE_ARGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",  # one self-contained binary
    "-DGGML_NATIVE=ON",  # this CPU's instructions, as llama-cpp-python's own build
    "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",  # no npm, no download: an empty web UI
    "-DLLAMA_OPENSSL=OFF",
)


def server_cache(version: str | None = None) -> Path:
    return Path.home() / ".cache" / "rank1-local" / "llama-server" / (version or llama_cpp_python_version())


def built_server(cache: Path | None = None) -> Path | None:
    """The ``llama-server`` binary built from the installed llama-cpp-python's sources, or None if not built yet."""
    binary = (cache or server_cache()) / "bin" / "llama-server"
    return binary if binary.is_file() and os.access(binary, os.X_OK) else None


def _wanted(rel: str) -> bool:
    return not rel.startswith(_SKIPPED)


def build_llama_server(cache: Path | None = None, *, jobs: int | None = None) -> Path:
    """Build ``llama-server`` (once) from the sdist's llama.cpp sources; its path. Raises a :class:`Rank1Error` naming
    what is missing when CMake or a C++ compiler is not installed."""
    cache = cache or server_cache()
    found = built_server(cache)
    if found is not None:
        return found
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise Rank1Error(f"building llama-server needs {tool} (apt-get install cmake g++)")
    start, load = time.perf_counter(), os.getloadavg()[0]
    cache.mkdir(parents=True, exist_ok=True)
    src = _sources(cache)
    build = cache / "build"
    jobs = jobs or os.cpu_count() or 1
    logger.info("configuring llama.cpp in %s", build)
    _run(["cmake", "-S", str(src), "-B", str(build), *CMAKE_ARGS], build.parent / "cmake.log")
    logger.info("building llama-server with %d jobs (minutes)", jobs)
    _run(["cmake", "--build", str(build), "--target", "llama-server", "-j", str(jobs)], build.parent / "build.log")
    binary = cache / "bin" / "llama-server"
    binary.parent.mkdir(parents=True, exist_ok=True)
    with open(build / "bin" / "llama-server", "rb") as built, \
            tempfile.NamedTemporaryFile(dir=binary.parent, delete=False) as tmp:
        shutil.copyfileobj(built, tmp)
    os.chmod(tmp.name, 0o755)
    os.replace(tmp.name, binary)
    info = {"llama_cpp_python": llama_cpp_python_version(), "cmake_args": list(CMAKE_ARGS), "jobs": jobs,
            "seconds": round(time.perf_counter() - start, 1), "load_at_start": load,
            "cpus": os.cpu_count(), "built": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    (cache / "build.json").write_text(json.dumps(info, indent=2) + "\n")
    logger.info("built %s in %.0f s", binary, info["seconds"])
    return binary


def _sources(cache: Path) -> Path:
    """llama.cpp's tree from the sdist, unpacked once into ``cache/src``."""
    src = cache / "src"
    marker = src / ".complete"
    if marker.is_file() and marker.read_text() == sdist_archive().name:
        return src
    shutil.rmtree(src, ignore_errors=True)
    extract(src, _wanted)
    marker.write_text(sdist_archive().name)
    return src


def _run(cmd: list[str], log: Path) -> None:
    with open(log, "wb") as out:
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise Rank1Error(f"{' '.join(cmd[:3])} … failed (exit {done.returncode}); the end of {log}:\n{tail}")


@dataclass(frozen=True)
class ServerOptions:
    """llama-server's settings for a rerank comparison: threads, context, batch (prompt tokens per llama_decode; a
    whole prompt must fit one micro-batch for rank pooling) and parallel slots."""

    threads: int = 2
    ctx_size: int = 4096
    batch_size: int = 2048
    parallel: int = 1

    def args(self) -> list[str]:
        return ["--threads", str(self.threads), "--threads-batch", str(self.threads), "--ctx-size", str(self.ctx_size),
                "--batch-size", str(self.batch_size), "--ubatch-size", str(self.batch_size),
                "--parallel", str(self.parallel)]


class LlamaServer:
    """``llama-server --reranking`` serving ``gguf`` on a free loopback port: ``rerank(query, documents)`` gives its
    scores in the documents' order; ``stop()`` (or leaving the ``with`` block) ends it. Its log goes to ``log_path``
    (default: a temporary file)."""

    def __init__(self, gguf: Path, *, options: ServerOptions = ServerOptions(), binary: Path | None = None,
                 log_path: Path | None = None, startup_timeout: float = 120.0) -> None:
        binary = binary or built_server()
        if binary is None:
            raise ModelNotFoundError("llama-server is not built: python -m benchmarks.llama_server build")
        if not Path(gguf).is_file():
            raise ModelNotFoundError(f"{gguf}: no such file")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path or Path(tempfile.mkstemp(prefix="llama-server-", suffix=".log")[1])
        cmd = [str(binary), "--model", str(gguf), "--reranking", "--host", "127.0.0.1", "--port", str(self.port),
               "--no-webui", *options.args()]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        self._client = httpx.Client(timeout=600.0)
        try:
            self._wait_ready(startup_timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise Rank1Error(f"llama-server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                if self._client.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise Rank1Error(f"llama-server did not answer /health within {timeout} s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def rerank(self, query: str, documents: list[str]) -> list[float]:
        """``POST /v1/rerank``: the relevance score of each document, in the order given."""
        response = self._client.post(self.url + "/v1/rerank", json={"query": query, "documents": documents})
        if response.status_code != 200:
            raise Rank1Error(f"llama-server answered {response.status_code}: {response.text[:500]}")
        scores: list[float | None] = [None] * len(documents)
        for result in response.json()["results"]:
            scores[result["index"]] = float(result["relevance_score"])
        if any(s is None for s in scores):
            raise Rank1Error(f"llama-server left documents unscored: {response.text[:500]}")
        return [float(s) for s in scores if s is not None]

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, then SIGKILL if it has not ended within ``timeout`` seconds."""
        self._client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def __enter__(self) -> LlamaServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.llama_server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build llama-server from the installed llama-cpp-python's sources (once)")
    b.add_argument("--jobs", type=int, default=None, help="parallel compile jobs (default: all cores)")
    r = sub.add_parser("rerank", help="score documents with llama-server --reranking")
    r.add_argument("--model", required=True, type=Path, help="a reranker GGUF (with its rerank head)")
    r.add_argument("--query", required=True)
    r.add_argument("--docs", required=True, nargs="+")
    r.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "build":
            binary = build_llama_server(jobs=args.jobs)
            info = json.loads((binary.parent.parent / "build.json").read_text())
            print(f"{binary} (built in {info['seconds']:.0f} s with {info['jobs']} jobs, "
                  f"load {info['load_at_start']:.1f} at the start)")
        else:
            with LlamaServer(args.model, options=ServerOptions(threads=args.threads)) as server:
                for doc, score in zip(args.docs, server.rerank(args.query, args.docs), strict=True):
                    print(f"{score:.6f}\t{doc}")
    except Rank1Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
