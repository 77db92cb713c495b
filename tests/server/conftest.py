"""Live servers for the server tests: `tokenloom serve` subprocesses on free ports of 127.0.0.1.

Every server is launched when the session starts (so their model loads overlap) and waited for when a
test first needs it; each is stopped at the end of the session.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.encoder_models import minilm_path, tiny_encoder_path

TINY_FLAGS = ["--dtype", "float32", "--kv-cache-gib", "0.05", "--served-model-name", "tiny", "--num-threads", "1"]
GEMMA_FLAGS = ["--kv-cache-gib", "0.25", "--num-threads", "2"]
# Fuzzed servers generate little: every generated request stays cheap however many tokens or prompts it asks for.
FUZZ_FLAGS = [*TINY_FLAGS, "--max-tokens-default", "2", "--max-tokens-limit", "16", "--max-prompts-per-request", "4"]


@dataclass
class Server:
    """One `tokenloom serve` process."""

    proc: subprocess.Popen
    port: int
    log: Path

    @property
    def url(self) -> str:
        """Base URL, without /v1."""
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 180.0) -> Server:
        """Block until /health answers 200; fail with the server's log if it dies or never gets there."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        pytest.fail(f"server not ready after {timeout}s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A free port between Ray's worker ports (10002–19999) and the kernel's ephemeral range: the server binds
    it a few seconds after this returns, and a port from the ephemeral range could meanwhile become the local
    end of some process's outbound connection (Ray's make many), as one did in a CI run."""
    low, high = 20000, _ephemeral_low()
    rng = random.SystemRandom()
    for _ in range(200 if high > low else 0):
        port = rng.randrange(low, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(model: str | None, flags: list[str], log_dir: Path, name: str, env: dict[str, str] | None = None
           ) -> Server:
    """Start `tokenloom serve [MODEL]` in the background (with `env` added to the environment)."""
    port = free_port()
    log = log_dir / f"{name}.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    positional = [model] if model is not None else []
    proc = subprocess.Popen([sys.executable, "-m", "tokenloom.cli", "serve", *positional, "--port", str(port),
                             *flags], stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    return Server(proc, port, log)


@pytest.fixture(scope="session")
def tiny_path(tiny_models) -> str:
    """The tiny random Gemma 3 checkpoint every tiny server and offline reference uses."""
    return str(tiny_models["gemma3"])


MODEL_FLAGS = ["--dtype", "float32", "--kv-cache-gib", "0.05", "--num-threads", "1"]
# Under this budget one tiny model (0.05 GiB of KV cache plus well under 1 MiB of weights) fits, two do not.
ONE_MODEL_BUDGET_GIB = 0.075


@pytest.fixture(scope="session")
def models_dir(tiny_models, tiny_seq2seq_models, tmp_path_factory) -> Path:
    """A --models-dir (symlinked folders) of four tiny decoders, a tiny BART, the real all-MiniLM-L6-v2 and a
    tiny BERT classifier, and a .gguf file that is not a GGUF."""
    root = tmp_path_factory.mktemp("models")
    for name, arch in (("llama", "llama"), ("gemma", "gemma3"), ("qwen", "qwen2"), ("mistral", "mistral")):
        (root / name).symlink_to(tiny_models[arch], target_is_directory=True)
    (root / "bart").symlink_to(tiny_seq2seq_models["bart"], target_is_directory=True)
    (root / "minilm").symlink_to(minilm_path(), target_is_directory=True)
    (root / "classifier").symlink_to(tiny_encoder_path(tmp_path_factory, "bert-ForSequenceClassification"),
                                     target_is_directory=True)
    (root / "broken.gguf").write_bytes(b"GGUF" + b"\0" * 20)
    return root


@pytest.fixture(scope="session")
def budget_catalog(tiny_models, tmp_path_factory) -> Path:
    """A models.yaml of two tiny models, one with default sampling and a chat template of its own."""
    path = tmp_path_factory.mktemp("catalog") / "models.yaml"
    path.write_text(f"""models:
  - name: first
    source: {tiny_models["llama"]}
  - name: second
    source: {tiny_models["gemma3"]}
    sampling: {{max_tokens: 3, temperature: 0}}
    chat_template: "{{% for m in messages %}}<{{{{ m['role'] }}}}>{{{{ m['content'] }}}}{{% endfor %}}"
""")
    return path


@pytest.fixture(scope="session")
def server_adapters(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """Adapters of the tiny Llama saved by PEFT, by the name the adapters server gives them: a1 a LoRA, a2 a
    prefix (prefix tuning)."""
    from tests.adapters.peft_lora import save_peft_lora
    from tests.adapters.peft_prompt import save_peft_prompt

    root = tmp_path_factory.mktemp("server-adapters")
    save_peft_lora(tiny_models["llama"], root / "a1", 1, 4, "llama")
    save_peft_prompt(tiny_models["llama"], root / "a2", "prefix-tuning", 2)
    return {"a1": root / "a1", "a2": root / "a2"}


@pytest.fixture(scope="session")
def _servers(request, tiny_path, tiny_models, tmp_path_factory, models_dir, budget_catalog):
    """The session servers the selected tests use, launched together."""
    logs = tmp_path_factory.mktemp("server-logs")
    wanted = {name for item in request.session.items for name in item.fixturenames}
    specs = {
        "tiny": (tiny_path, TINY_FLAGS),
        "restricted": (tiny_path, [*TINY_FLAGS, "--api-key", "sekrit", "--max-waiting", "1", "--max-num-seqs", "1",
                                   "--max-body-bytes", "65536"]),
        "hardened": (tiny_path, [*TINY_FLAGS, "--max-num-seqs", "4", "--max-waiting", "1", "--max-tokens-default", "8",
                                 "--max-tokens-limit", "64", "--max-prompts-per-request", "4", "--header-timeout",
                                 "1", "--body-timeout", "1", "--max-connections", "16"]),
        "fuzz": (tiny_path, FUZZ_FLAGS),
        "fuzz_keyed": (tiny_path, [*FUZZ_FLAGS, "--api-key", "sekrit"]),
        "gemma": ("gemma-3-270m", GEMMA_FLAGS),
        "speculative": (tiny_path, [*TINY_FLAGS, "--speculative-method", "ngram", "--speculative-max-batch", "0",
                                    "--prompt-lookup-min", "1"]),
        "replicas": (tiny_path, [*TINY_FLAGS, "--replicas", "2", "--api-key", "sekrit"]),
        "multi": (None, [*MODEL_FLAGS, "--models-dir", str(models_dir)]),
        "budget": (None, [*MODEL_FLAGS, "--models-config", str(budget_catalog),
                          "--memory-budget-gib", str(ONE_MODEL_BUDGET_GIB)]),
    }
    if "adapters_server" in wanted:
        paths = request.getfixturevalue("server_adapters")
        specs["adapters"] = (str(tiny_models["llama"]), [*MODEL_FLAGS, "--served-model-name", "base", "--adapters",
                                                          ",".join(f"{n}={p}" for n, p in paths.items()),
                                                          "--adapter-dir", str(paths["a1"].parent)])
    servers = {name: launch(model, flags, logs, name) for name, (model, flags) in specs.items()
               if f"{name}_server" in wanted}
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture(scope="session")
def tiny_server(_servers) -> Server:
    """A server on the tiny model, served as 'tiny'."""
    return _servers["tiny"].wait_ready()


@pytest.fixture(scope="session")
def restricted_server(_servers) -> Server:
    """The tiny model behind an API key ('sekrit'), one running sequence, a waiting queue of one, 64 KiB bodies."""
    return _servers["restricted"].wait_ready()


@pytest.fixture(scope="session")
def hardened_server(_servers) -> Server:
    """The tiny model with tight guards: 4 running sequences and a waiting queue of 1, max_tokens 8 by default
    and 64 at most, 4 prompts a request, 1 s for headers and for a body, 16 connections."""
    return _servers["hardened"].wait_ready()


@pytest.fixture(scope="session")
def replicas_server(_servers) -> Server:
    """The tiny model as 'tiny' on two Ray replicas (one thread each) behind one endpoint, API key 'sekrit'."""
    pytest.importorskip("ray")
    return _servers["replicas"].wait_ready(timeout=300)


@pytest.fixture(scope="session")
def speculative_server(_servers) -> Server:
    """The tiny model with speculative decoding (prompt lookup, never paused), served as 'tiny'."""
    return _servers["speculative"].wait_ready()


@pytest.fixture(scope="session")
def fuzz_server(_servers) -> Server:
    """The tiny model for tests/server/test_fuzz.py alone (fuzzing changes its keep_alive and unloads it): at most
    16 generated tokens (2 by default) and 4 prompts a request."""
    return _servers["fuzz"].wait_ready()


@pytest.fixture(scope="session")
def fuzz_keyed_server(_servers) -> Server:
    """`fuzz_server`'s twin behind an API key ('sekrit')."""
    return _servers["fuzz_keyed"].wait_ready()


@pytest.fixture(scope="session")
def multi_server(_servers) -> Server:
    """Every model of `models_dir`, loaded on demand, no memory budget."""
    return _servers["multi"].wait_ready()


@pytest.fixture(scope="session")
def budget_server(_servers) -> Server:
    """The two models of `budget_catalog` under a memory budget that fits one."""
    return _servers["budget"].wait_ready()


@pytest.fixture(scope="session")
def adapters_server(_servers) -> Server:
    """The tiny Llama as 'base' with two adapters, the LoRA 'a1' and the prefix 'a2' (`server_adapters`)."""
    return _servers["adapters"].wait_ready()


@pytest.fixture(scope="session")
def gemma_server(_servers) -> Server:
    """The default model, gemma-3-270m."""
    return _servers["gemma"].wait_ready()


@pytest.fixture(scope="session")
def tiny_llm(tiny_path):
    """The offline reference for the tiny server."""
    from tokenloom.llm import LLM

    return LLM(tiny_path, dtype="float32", kv_cache_gib=0.05, num_threads=1)


@pytest.fixture(scope="session")
def gemma_llm(_servers):
    """The offline reference for the gemma server (same engine options)."""
    from tokenloom.llm import LLM

    return LLM("gemma-3-270m", kv_cache_gib=0.25, num_threads=2)


def offline(llm, method: str, inputs, params):
    """Run `llm.generate` or `llm.chat` with the thread count the LLM was built with (torch's is global)."""
    import torch

    torch.set_num_threads(llm.engine.config.device_config.num_threads)
    return getattr(llm, method)(inputs, params, use_tqdm=False)
