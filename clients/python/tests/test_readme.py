"""The examples of README.md, run as written against a real agent."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

from harness import HERE, Agent, wait_until
from riftmesh import Client

README = HERE.parent / "README.md"
DEADLINE = 90.0
TESTED = {"quickstart", "async", "publish", "history", "cluster", "blobs", "errors", "asyncclient", "spool"}


def examples() -> Dict[str, str]:
    text = README.read_text(encoding="utf-8")
    found = re.findall(r"<!-- test: (\w+) -->\n```python\n(.*?)```", text, re.S)
    return {name: code for name, code in found}


@pytest.fixture(scope="module")
def readme_agent(tmp_path_factory: pytest.TempPathFactory, swarm_key: Path) -> Iterator[Agent]:
    a = Agent(tmp_path_factory.mktemp("readme"), "py-readme", swarm_key, config='voters = ["py-readme"]\n')
    a.start()
    try:
        yield a
    finally:
        a.kill()


def env_for(agent: Agent) -> Dict[str, str]:
    env = dict(os.environ)
    env["RIFTMESH_API"] = agent.api
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_script(agent: Agent, name: str, tmp_path: Path) -> str:
    p = subprocess.run(
        [sys.executable, "-c", examples()[name]],
        env=env_for(agent),
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert p.returncode == 0, f"README example {name} failed:\n{p.stdout}\n{p.stderr}"
    return p.stdout


class Daemon:
    """A README example that runs until Ctrl-C, its output collected as it comes."""

    def __init__(self, agent: Agent, name: str, cwd: Path) -> None:
        self.lines: List[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-c", examples()[name]],
            env=env_for(agent),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def interrupt(self, sig: int = signal.SIGINT) -> int:
        self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=DEADLINE)
        self.reader.join(10)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def test_every_readme_example_is_tested() -> None:
    assert set(examples()) == TESTED


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_quickstart(readme_agent: Agent, tmp_path: Path, sig: int) -> None:
    mesh = Client(readme_agent.api)
    d = Daemon(readme_agent, "quickstart", tmp_path)
    try:
        wait_until("the evaluator consumer", lambda: mesh.consumer("evaluator") or d.proc.poll() is not None, DEADLINE)
        assert d.proc.poll() is None, "\n".join(d.lines)
        # Its own publish is in the log, with the source it gave.
        own = [e for e in mesh.history("TRAINING_COMPLETED") if e.payload.get("model_path") == "models/hex8_2p.pth"]
        assert len(own) == 1 and own[0].source == "trainer" and own[0].payload["config"] == "hex8_2p"
        path = f"models/{uuid.uuid4().hex}.pth"
        mesh.publish("training.completed", {"config": "hex8_2p", "model_path": path}, source="tests")
        wait_until("the handler's output", lambda: f"evaluating {path} from tests" in d.lines, DEADLINE)
        rc = d.interrupt(sig)
    finally:
        d.kill()
    assert rc == 0, "\n".join(d.lines)
    c = mesh.consumer("evaluator")
    assert c is not None and c.types == ["TRAINING_*"] and c.dead_letters == 0
    last = list(mesh.history("TRAINING_COMPLETED"))[-1]
    assert c.cursor >= last.seq, "acknowledged after the handler returned"


def test_async_example(readme_agent: Agent, tmp_path: Path) -> None:
    mesh = Client(readme_agent.api)
    d = Daemon(readme_agent, "async", tmp_path)
    try:
        wait_until("the promoter consumer", lambda: mesh.consumer("promoter") or d.proc.poll() is not None, DEADLINE)
        assert d.proc.poll() is None, "\n".join(d.lines)
        model = f"m-{uuid.uuid4().hex[:8]}"
        mesh.publish("EVALUATION_COMPLETED", {"model": model, "elo": 1500})
        line = wait_until(
            "the promotion",
            lambda: next((x for x in d.lines if x.startswith(f"promoting {model} with fencing token ")), None),
            DEADLINE,
        )
        assert int(line.rsplit(" ", 1)[1]) > 0
        rc = d.interrupt(signal.SIGTERM)  # how a service manager stops it
    finally:
        d.kill()
    assert rc == 0, "\n".join(d.lines)
    c = mesh.consumer("promoter")
    assert c is not None and c.dead_letters == 0 and c.cursor >= list(mesh.history("EVALUATION_COMPLETED"))[-1].seq


def test_publish_example(readme_agent: Agent, tmp_path: Path) -> None:
    out = run_script(readme_agent, "publish", tmp_path)
    mesh = Client(readme_agent.api)
    promoted = [e for e in mesh.history("MODEL_PROMOTED") if e.payload == {"model": "m-0042"}]
    assert len(promoted) == 1
    chain = [e.type for _, e in mesh.trace(promoted[0].id).events]
    assert chain == ["TRAINING_COMPLETED", "EVALUATION_COMPLETED", "MODEL_PROMOTED"]
    assert "EVALUATION_COMPLETED" in out


def test_spool_example(readme_agent: Agent, tmp_path: Path) -> None:
    out = run_script(readme_agent, "spool", tmp_path).splitlines()
    assert out[0].startswith("published ")
    assert out[1] == "FlushResult(sent=0, duplicates=0, rejected=0, pending=0, error=None)"
    ev = Client(readme_agent.api).event(out[0].split()[1])
    assert ev.type == "DAEMON_STATUS_CHANGED" and ev.idempotency_key


def test_history_example(readme_agent: Agent, tmp_path: Path) -> None:
    out = run_script(readme_agent, "history", tmp_path)
    assert "TRAINING_COMPLETED" in out


def test_cluster_example(readme_agent: Agent, tmp_path: Path) -> None:
    out = run_script(readme_agent, "cluster", tmp_path)
    assert "py-readme alive True" in out and "fencing token" in out


def test_blobs_example(readme_agent: Agent, tmp_path: Path) -> None:
    run_script(readme_agent, "blobs", tmp_path)
    assert Client(readme_agent.api).blob_info("models/hex8_2p").state == "complete"


def test_errors_example(readme_agent: Agent, tmp_path: Path) -> None:
    out = run_script(readme_agent, "errors", tmp_path).splitlines()
    assert out[0] == "127.0.0.1:1"
    assert out[1].startswith("no riftmesh agent is answering at 127.0.0.1:1")
    assert out[2].startswith('400 event type "1abc" is not a well-formed name')


def test_asyncclient_example(readme_agent: Agent, tmp_path: Path) -> None:
    out = run_script(readme_agent, "asyncclient", tmp_path).splitlines()
    assert out[0].endswith(" 32")
    assert any(line.endswith("TRAINING_COMPLETED") for line in out)
    assert any(line.startswith("token ") and int(line.split()[1]) > 0 for line in out)
    assert out[-1].startswith("py-readme ['py-readme'")
