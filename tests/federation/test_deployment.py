"""Flower's deployment engine end to end: a TLS SuperLink with SuperNode authentication, two
SuperNodes each holding only its own site directory, and ``flwr run`` of the fedvlm app."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from flwr.serverapp import Grid

import fedvlm
from fedvlm.commands.deploy import export_site, prepare_run
from fedvlm.data.prepared import save_bundle
from fedvlm.errors import ConfigError, FederationError
from fedvlm.federation.app import run_dir_from_config, wait_for_nodes
from fedvlm.federation.certs import make_certificates
from fedvlm.federation.secure import CLIPPED_FRACTION
from fedvlm.runs import RunLayout
from tests.tasks.test_sites import make_all_idb2

REPO_ROOT = Path(fedvlm.__file__).resolve().parents[1]
CONNECTION = "fedvlm-test"
RUN_DEADLINE_S = 420.0


def _tool(name: str) -> str:
    """A Flower executable of this interpreter's environment (not whatever ``PATH`` finds first)."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else (shutil.which(name) or name)


def _fake_run(run_dir: Path) -> None:
    data = run_dir / "data"
    data.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("task: leukemia\nfederation: {num_clients: 3}\n")
    (run_dir / "partition.json").write_text("{}")
    (run_dir / "tokenizer").mkdir()
    (run_dir / "tokenizer" / "tokenizer.json").write_text("{}")
    (data / "meta.json").write_text(json.dumps({"vocab_size": 9}))
    (data / "prompts.pt").write_bytes(b"prompts")
    (data / "stray.pt").write_bytes(b"not something a site needs")  # only named coordinator files travel
    own = run_dir / "clients" / "client_001" / "data"  # a simulation's site folder: never exported
    own.mkdir(parents=True)
    save_bundle({"index": torch.tensor([1])}, own / "train.pt")


def test_export_site_holds_the_run_config_and_no_data(tmp_path: Path) -> None:
    _fake_run(tmp_path / "run")
    site = export_site(tmp_path / "run", 1, tmp_path / "site1")
    files = sorted(str(p.relative_to(site)) for p in site.rglob("*") if p.is_file())
    assert files == ["config.yaml", "data/meta.json", "data/prompts.pt", "site.json", "tokenizer/tokenizer.json"]
    assert json.loads((site / "data" / "meta.json").read_text()) == {"vocab_size": 9}
    assert json.loads((RunLayout(site).site_file).read_text())["partition_id"] == 1
    with pytest.raises(ConfigError, match="partition id 3 is not a client"):
        export_site(tmp_path / "run", 3, tmp_path / "site3")
    with pytest.raises(ConfigError, match="not empty"):
        export_site(tmp_path / "run", 1, tmp_path / "site1")


def test_server_app_needs_a_prepared_run_dir_in_its_run_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="run-dir=''"):
        run_dir_from_config({})
    with pytest.raises(ConfigError, match="not a prepared run directory"):
        run_dir_from_config({"run-dir": str(tmp_path)})
    _fake_run(tmp_path / "run")
    assert run_dir_from_config({"run-dir": str(tmp_path / "run")}) == tmp_path / "run"


class _Grid:
    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return self.node_ids


def test_the_server_waits_for_the_expected_supernodes() -> None:
    assert wait_for_nodes(cast(Grid, _Grid([7, 3])), 2, timeout=0) == [3, 7]
    with pytest.raises(FederationError, match="1 SuperNodes connected after 0s, 2 expected"):
        wait_for_nodes(cast(Grid, _Grid([3])), 2, timeout=0)


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def _marked_processes(marker: str) -> list[int]:
    """Live (non-zombie) processes whose environment carries ``marker``: everything this test started,
    including what Flower's processes started in turn (SuperExec, flwr-serverapp, flwr-clientapp)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker.encode() not in (entry / "environ").read_bytes():
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state not in ("Z", "X"):
            found.append(int(entry.name))
    return found


class Processes:
    """Processes started in their own sessions, stopped group by group (SIGINT, then SIGKILL)."""

    def __init__(self, logs: Path, marker: str) -> None:
        self.logs = logs
        self.marker = marker
        self.started: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("wb")
        process = subprocess.Popen(
            argv, env={**env, "FEDVLM_TEST_MARKER": self.marker}, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        log.close()
        self.started[name] = process
        return process

    def log_tail(self, name: str, lines: int = 25) -> str:
        text = (self.logs / f"{name}.log").read_text(errors="replace").splitlines()
        return f"--- {name} ---\n" + "\n".join(text[-lines:])

    def all_logs(self) -> str:
        return "\n".join(self.log_tail(name) for name in self.started)

    def stop_all(self) -> list[int]:
        """Stop everything; returns the pids that survived a graceful stop and had to be killed."""
        for process in self.started.values():  # Flower's servers shut down cleanly on SIGINT
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGINT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (
            any(p.poll() is None for p in self.started.values()) or _marked_processes(self.marker)
        ):
            time.sleep(0.5)
        for process in self.started.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        survivors = _marked_processes(self.marker)
        for pid in survivors:  # detached descendants (own sessions): killed by pid, one by one
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return survivors


def _flwr(args: list[str], env: dict[str, str], timeout: float = 120) -> str:
    result = subprocess.run(
        [_tool("flwr"), *args], env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    assert result.returncode == 0, f"flwr {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _json_tail(text: str) -> dict[str, Any]:
    """The JSON object ``flwr ... --format json`` prints (after any plain log lines)."""
    return json.loads(text[text.index("{") :])


def _wait_for_port(port: int, process: subprocess.Popen[bytes], deadline_s: float, why: str) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"{why} exited with {process.returncode}"
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.5)
    raise AssertionError(f"{why} did not open port {port} within {deadline_s:g}s")


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    (tmp_path / "logs").mkdir()
    tracked = Processes(tmp_path / "logs", f"fedvlm-deployment-{uuid.uuid4().hex}")
    try:
        yield tracked
    finally:
        survivors = tracked.stop_all()
        assert not _marked_processes(tracked.marker), "processes survived SIGKILL"
        assert not survivors, f"processes outlived a graceful stop of their SuperLink/SuperNode: {survivors}"


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(not (REPO_ROOT / "pyproject.toml").is_file(), reason="needs the source checkout's pyproject.toml")
@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secagg"])
def test_flwr_run_on_tls_superlink_with_authenticated_supernodes(
    tmp_path: Path, tiny_overrides: list[str], processes: Processes, secure: bool
) -> None:
    started = time.monotonic()
    certs = make_certificates(tmp_path / "certs", ["127.0.0.1", "localhost"], num_supernodes=2)
    overrides = [o for o in tiny_overrides if not o.startswith("federation.num_clients=")]
    overrides += [
        "federation.num_clients=2", "federation.rounds=2", "federation.evaluate_clients=false",
        "federation.round_timeout=300",
    ]  # fmt: skip
    if secure:  # SecAgg+ across processes: the key-agreement stages each start a fresh ClientApp
        overrides.append("federation.secure_aggregation.enabled=true")
    coordinator_run = tmp_path / "coordinator" / "run"
    prepare_run("leukemia_demo", overrides, coordinator_run)  # names no data
    sites = [export_site(coordinator_run, pid, tmp_path / f"site{pid}" / "run") for pid in range(2)]
    # each hospital's own ALL-IDB2 folder, named only in its SuperNode's node config
    site_data = [make_all_idb2(tmp_path / f"hospital{pid}_data", 12 + 2 * pid) for pid in range(2)]

    superlink_port, *node_ports = _free_ports(3)
    base_env = {
        **os.environ,
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    coordinator_env = {**base_env, "FLWR_HOME": str(tmp_path / "coordinator" / "flwr")}
    superlink = processes.start(
        "superlink",
        [
            _tool("flower-superlink"), "--host", "127.0.0.1", "--port", str(superlink_port),
            "--ssl-ca-certfile", str(certs.ca_cert), "--ssl-certfile", str(certs.server_cert),
            "--ssl-keyfile", str(certs.server_key), "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
        ],
        coordinator_env,
    )  # fmt: skip
    _wait_for_port(superlink_port, superlink, 90, "flower-superlink")

    flwr_home = Path(coordinator_env["FLWR_HOME"])
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{superlink_port}"\nroot-certificates = "{certs.ca_cert}"\n'
    )
    for key in certs.supernode_keys:
        _flwr(["supernode", "register", str(key.public_key), CONNECTION], coordinator_env)

    for pid, (site, port, key) in enumerate(zip(sites, node_ports, certs.supernode_keys, strict=True)):
        processes.start(
            f"supernode{pid}",
            [
                _tool("flower-supernode"), "--superlink", f"127.0.0.1:{superlink_port}",
                "--root-certificates", str(certs.ca_cert), "--auth-supernode-private-key", str(key.private_key),
                "--port", str(port), "--node-config",
                f"run-dir='{site}' partition-id={pid} site-name='hospital_{pid}' data-format='all_idb2' "
                f"data-root='{site_data[pid]['root']}' data-reports='{site_data[pid]['reports']}'",
            ],
            {**base_env, "FLWR_HOME": str(site.parent / "flwr")},
        )  # fmt: skip

    started_run = _json_tail(
        _flwr(
            ["run", str(REPO_ROOT), CONNECTION, "--run-config", f"run-dir='{coordinator_run}'", "--format", "json"],
            coordinator_env,
        )
    )
    assert started_run["success"], started_run
    run_id = str(started_run["run-id"])

    status = ""
    deadline = time.monotonic() + RUN_DEADLINE_S
    while time.monotonic() < deadline:
        runs = _json_tail(_flwr(["ls", CONNECTION, "--run-id", run_id, "--format", "json"], coordinator_env))
        status = runs["runs"][0]["status"]
        if status.startswith("finished"):
            break
        for name, process in processes.started.items():
            assert process.poll() is None, f"{name} exited early\n{processes.all_logs()}"
        time.sleep(3)
    assert status == "finished:completed", f"run {run_id}: {status}\n{processes.all_logs()}"

    rows = [json.loads(line) for line in (coordinator_run / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [1, 2]
    for row in rows:
        assert row["num_clients"] == 2
        assert sorted(row["clients"]) == ["0", "1"]
        assert row["failed_clients"] == {}
        assert (f"{CLIPPED_FRACTION}_max" in row) == secure
    assert 0.0 <= rows[-1]["test/accuracy"] <= 1.0  # federated over the hospitals' test splits
    assert {"test/site/hospital_0/accuracy", "test/site/hospital_1/accuracy"} <= set(rows[-1])
    assert (coordinator_run / "checkpoints" / "last.ckpt").is_file()
    # the coordinator holds no per-sample data: counts in partition.json, nothing else
    assert sorted(p.name for p in (coordinator_run / "data").iterdir()) == ["meta.json"]
    assert not (coordinator_run / "clients").exists()
    partition = json.loads((coordinator_run / "partition.json").read_text())
    assert [(c["site"], c["num_samples"]) for c in partition["clients"]] == [("hospital_0", 12), ("hospital_1", 14)]
    for pid, site in enumerate(sites):  # each site prepared its own data, in its own folder
        assert (site / "clients" / f"client_{pid:03d}" / "data" / "counts.json").is_file()
    print(f"deployment run took {time.monotonic() - started:.0f}s")


def test_deploy_cli_prepares_a_run_and_exports_one_site(tmp_path: Path) -> None:
    from fedvlm.cli import main
    from tests.conftest import TINY_OVERRIDES

    run_dir = tmp_path / "run"
    assert main(["deploy", "prepare", "--recipe", "leukemia_demo", "--out", str(run_dir), *TINY_OVERRIDES]) == 0
    assert sorted(p.name for p in (run_dir / "data").iterdir()) == ["meta.json"]  # no data on the coordinator
    assert not (run_dir / "metrics.jsonl").exists()  # prepared, not trained
    assert main(["deploy", "export-site", str(run_dir), "--partition", "2", "--out", str(tmp_path / "site")]) == 0
    site = tmp_path / "site"
    assert sorted(p.name for p in (site / "data").iterdir()) == ["meta.json"]
    assert json.loads((site / "site.json").read_text())["partition_id"] == 2
    assert (site / "tokenizer").is_dir() and (site / "config.yaml").is_file()
    bad = ["deploy", "prepare", "--recipe", "leukemia_demo", "--out", str(tmp_path / "x"), "federation.strategy=nope"]
    assert main(bad) == 2  # unknown components fail before anything is written
    assert main(["deploy", "prepare", "--recipe", "leukemia_demo", "--out", str(run_dir)]) == 2  # not empty
