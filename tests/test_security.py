"""CURVE keys and the exposure rule: ``sam3-stream keys``, and real capture and tracker processes on tcp
loopback that answer only allow-listed clients."""

from __future__ import annotations

import re
import shutil
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
import zmq.auth
from helpers import free_port, get_json, launched, run_cli, wait_for

from models import Prompt
from streamer import keys as keys_module
from streamer.keys import KeyFolder, make_keys
from streamer.protocol import PromptRequest, decode_result, new_request_id, peek_kind
from streamer.security import CurveClient, check_exposure, is_loopback
from streamer.transport import PromptClient, drain, frames_publisher, results_subscriber

pytestmark = pytest.mark.timeout(120)

SECURITY_CAUSE = re.compile(
    r"WARNING streamer.healing: \S+ \S+: (security mismatch|handshake failed: .*security settings)"
)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ------------------------------------------------------------------------------------------------
# sam3-stream keys


def test_keys_command_makes_the_documented_layout(tmp_path: Path) -> None:
    folder = tmp_path / "keys"
    done = run_cli("keys", str(folder), "--client", "robot1")
    assert done.returncode == 0, done.stderr
    assert mode(folder) == 0o700 and mode(folder / "clients") == 0o700
    for secret in ["server.key_secret", "client.key_secret", "exported/robot1/client.key_secret"]:
        assert mode(folder / secret) == 0o600, secret
        public, secret_key = zmq.auth.load_certificate(folder / secret)
        assert zmq.curve_public(secret_key) == public
    allowed = {zmq.auth.load_certificate(p)[0] for p in (folder / "clients").glob("*.key")}
    mine = zmq.auth.load_certificate(folder / "client.key")[0]
    robot = zmq.auth.load_certificate(folder / "exported/robot1/client.key")[0]
    assert allowed == {mine, robot}
    server = zmq.auth.load_certificate(folder / "server.key")
    assert server[1] is None, "the public certificate holds no secret"
    assert zmq.auth.load_certificate(folder / "exported/robot1/server.key") == server
    assert not (folder / "exported/robot1/server.key_secret").exists(), "a client host gets no server secret"

    again = run_cli("keys", str(folder))
    assert again.returncode == 0 and "nothing written" in again.stdout
    assert zmq.auth.load_certificate(folder / "server.key") == server, "never overwritten"
    twice = run_cli("keys", str(folder), "--client", "robot1")
    assert twice.returncode == 2 and "--client 'robot1': already made" in twice.stderr
    bad = run_cli("keys", str(folder), "--client", "../x")
    assert bad.returncode == 2 and "--client '../x'" in bad.stderr


def test_key_folder_refuses_unsafe_or_missing_files(tmp_path: Path) -> None:
    make_keys(tmp_path / "k")
    folder = KeyFolder.open(tmp_path / "k")
    (tmp_path / "k" / "server.key_secret").chmod(0o644)
    with pytest.raises(ValueError, match=r"server.key_secret: a secret key readable by others \(mode 0644\)"):
        folder.server_pair()
    (tmp_path / "k" / "client.key_secret").unlink()
    with pytest.raises(ValueError, match="client.key_secret: missing"):
        CurveClient(folder)
    (tmp_path / "k" / "server.key").write_text('curve\n    public-key = "short"\n')
    with pytest.raises(ValueError, match="server.key: no valid public key"):
        folder.server_public()
    with pytest.raises(ValueError, match="not a folder"):
        KeyFolder.open(tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------------
# Exposure


@pytest.mark.parametrize(
    "endpoint, loopback",
    [
        ("tcp://127.0.0.1:5555", True),
        ("tcp://127.8.9.1:5555", True),
        ("tcp://[::1]:5555", True),
        ("tcp://localhost:5555", True),
        ("ipc:///tmp/x/frames", True),
        ("tcp://*:5555", False),
        ("tcp://0.0.0.0:5555", False),
        ("tcp://[::]:5555", False),
        ("tcp://eth0:5555", False),
        ("tcp://192.168.1.4:5555", False),
    ],
)
def test_is_loopback(endpoint: str, loopback: bool) -> None:
    assert is_loopback(endpoint) is loopback


def test_check_exposure_passes_with_keys_or_insecure(tmp_path: Path) -> None:
    make_keys(tmp_path)
    check_exposure(["tcp://0.0.0.0:1"], KeyFolder.open(tmp_path), False, "x")
    check_exposure(["tcp://0.0.0.0:1"], None, True, "x")
    check_exposure(["tcp://127.0.0.1:1", "ipc:///tmp/a"], None, False, "x")


@pytest.mark.parametrize(
    "args",
    [
        ["track", "--model", "passthrough", "--results-endpoint", "tcp://0.0.0.0:{port}"],
        ["track", "--model", "passthrough", "--control-endpoint", "tcp://*:{port}"],
        ["capture", "--source", "synthetic", "--frames-endpoint", "tcp://0.0.0.0:{port}"],
    ],
)
def test_exposed_binds_without_keys_refuse_to_start_with_one_line(args: list[str]) -> None:
    # Refused before anything is bound (a test only ever binds loopback).
    done = run_cli(*[a.format(port=free_port()) for a in args])
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "reachable from other hosts" in errors[0] and "--insecure" in errors[0], done.stderr
    assert "Traceback" not in done.stderr


# ------------------------------------------------------------------------------------------------
# Capture and tracker processes with keys, over tcp loopback


def add_click(stream: str = "cam0") -> PromptRequest:
    return PromptRequest(
        new_request_id(), stream, "add_prompt", Prompt.from_dict({"points": [[4, 4]], "point_labels": [1]})
    )


@pytest.fixture
def keyed_pipeline(tmp_path: Path) -> Iterator[dict]:
    """A capture and a tracker (passthrough), both with --keys, meeting on tcp loopback."""
    folder = tmp_path / "keys"
    make_keys(folder)
    frames, results, control = (f"tcp://127.0.0.1:{free_port()}" for _ in range(3))
    capture_log, tracker_log = tmp_path / "capture.log", tmp_path / "tracker.log"
    capture = ["capture", "--source", "synthetic:64x48@15", "--frames-endpoint", frames, "--keys", str(folder)]
    track = ["track", "--model", "passthrough", "--keys", str(folder), "--frames-endpoint", frames]
    track += ["--results-endpoint", results, "--control-endpoint", control]
    with launched(capture, capture_log) as capture_proc, launched(track, tracker_log) as tracker_proc:
        yield {
            "keys": folder,
            "results": results,
            "control": control,
            "log": tracker_log,
            "procs": (capture_proc, tracker_proc),
        }
        assert capture_proc.poll() is None, capture_log.read_text()[-3000:]
        assert tracker_proc.poll() is None, tracker_log.read_text()[-3000:]


def test_curve_admits_only_clients_on_the_allow_list(keyed_pipeline: dict, tmp_path: Path) -> None:
    folder: Path = keyed_pipeline["keys"]
    stranger = tmp_path / "stranger"  # knows the server's public key, but its own key was never allowed
    make_keys(stranger)
    (stranger / "server.key").unlink()
    shutil.copy(folder / "server.key", stranger / "server.key")
    ctx = zmq.Context()
    allowed = CurveClient(KeyFolder.open(folder))
    keyed_sub = results_subscriber(keyed_pipeline["results"], context=ctx, security=allowed)
    plain_sub = results_subscriber(keyed_pipeline["results"], context=ctx)
    try:

        def a_result() -> bool:
            return any(peek_kind(m) == "result" for m in drain(keyed_sub, 200))

        wait_for(a_result, 60, "results over CURVE (frames from the keyed capture)", keyed_pipeline["log"])
        assert drain(plain_sub, 500) == [], "a subscriber without keys hears nothing"

        control = keyed_pipeline["control"]
        for security in (None, CurveClient(KeyFolder.open(stranger))):
            with (
                PromptClient(control, timeout_s=0.5, retries=2, context=ctx, security=security) as refused,
                pytest.raises(TimeoutError),
            ):
                refused.request(add_click())

        with PromptClient(keyed_pipeline["control"], timeout_s=5, retries=2, context=ctx, security=allowed) as client:
            answer = client.request(add_click())
            assert answer.ok and answer.obj_ids == [0], "the refused requests were never applied"

            # A client added while the tracker runs is admitted without a restart.
            assert run_cli("keys", str(folder), "--client", "robot1").returncode == 0
            robot = CurveClient(KeyFolder.open(folder / "exported" / "robot1"))
            with PromptClient(keyed_pipeline["control"], timeout_s=5, retries=2, context=ctx, security=robot) as bot:
                assert bot.request(add_click()).obj_ids == [1]
            assert client.request(add_click()).obj_ids == [2], "the server stays healthy"

        refusal = "refused a client whose key is not on the allow-list"

        # The tracker logs what its monitor saw at its next loop: waited for, not slept on.
        def log_with_refusal() -> str | None:
            text = keyed_pipeline["log"].read_text()
            return text if refusal in text else None

        log = wait_for(log_with_refusal, 30, "the tracker to log the refused client", keyed_pipeline["log"])
        assert log.count(refusal) == 1, log[-3000:]
        causes = [line.split(" ", 2)[2] for line in log.splitlines() if "streamer.healing" in line]
        assert any(c.startswith("WARNING streamer.healing: control") for c in causes), log[-3000:]
        assert len(causes) == len(set(causes)), "one line per socket and cause"
        frames = [m for m in drain(keyed_sub, 500) if peek_kind(m) == "result"]
        assert frames and decode_result(frames[-1])[0].stream == "cam0"
    finally:
        keyed_sub.close()
        plain_sub.close()
        ctx.term()


def test_a_tracker_without_keys_gets_no_frames_from_a_keyed_capture(tmp_path: Path) -> None:
    make_keys(tmp_path / "keys")
    frames, results = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    capture = [
        "capture",
        "--source",
        "synthetic:64x48@15",
        "--frames-endpoint",
        frames,
        "--keys",
        str(tmp_path / "keys"),
    ]
    track = ["track", "--model", "passthrough", "--frames-endpoint", frames, "--results-endpoint", results]
    track += ["--control-endpoint", f"tcp://127.0.0.1:{free_port()}"]
    ctx = zmq.Context()
    sub = results_subscriber(results, context=ctx)
    try:
        with (
            launched(capture, tmp_path / "capture.log"),
            launched(track, tmp_path / "tracker.log"),
        ):
            kinds: set[str] = set()

            def both_sides_said_why() -> bool:
                # Each side says why, whichever of the two libzmq events it got. Waited for rather than
                # looked for after a fixed window: a loaded machine can start the capture seconds after
                # the tracker, and no handshake is tried before the capture has bound its endpoint.
                kinds.update(peek_kind(m) for m in drain(sub, 200))
                return "status" in kinds and all(SECURITY_CAUSE.search(log.read_text()) for log in logs)

            logs = [tmp_path / "tracker.log", tmp_path / "capture.log"]
            wait_for(both_sides_said_why, 60, "a heartbeat, and both sides to log the security mismatch", logs[0])
            deadline = time.monotonic() + 1.0  # the failed handshakes go on; still nothing may cross
            while time.monotonic() < deadline:
                kinds.update(peek_kind(m) for m in drain(sub, 200))
            assert kinds == {"status"}, "no frame crossed from a keyed capture to a tracker without keys"
    finally:
        sub.close()
        ctx.term()


def test_keys_env_variable_is_the_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from streamer.cli import build_parser

    monkeypatch.setenv(keys_module.KEYS_ENV, str(tmp_path))
    for command in (["track"], ["serve"], ["capture", "--source", "synthetic"]):
        assert build_parser().parse_args(command).keys == str(tmp_path)


# ------------------------------------------------------------------------------------------------
# ipc:// stays plain, in private folders


def test_ipc_folders_are_private(tmp_path: Path) -> None:
    ctx = zmq.Context()
    pub = frames_publisher(f"ipc://{tmp_path}/new/deeper/frames", context=ctx)
    pub.close()
    ctx.term()
    assert mode(tmp_path / "new") == 0o700 and mode(tmp_path / "new" / "deeper") == 0o700


def test_run_keeps_its_ipc_sockets_in_a_private_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(keys_module.KEYS_ENV, str(tmp_path / "nowhere"))  # keys never apply to ipc://
    log_path = tmp_path / "run.log"
    port = free_port()
    args = ["run", "--model", "passthrough", "--source", "synthetic:64x48@5", "--http-port", str(port)]
    with launched(args, log_path) as run:
        results = wait_for(
            lambda: (m := re.search(r"subscribe to results at ipc://(\S+)", log_path.read_text())) and m[1],
            60,
            "the results endpoint",
            log_path,
        )
        folder = Path(results).parent
        assert mode(folder) == 0o700
        url = f"http://127.0.0.1:{port}/health"
        wait_for(lambda: (h := get_json(url)) and h["state"] == "live", 60, "a live feed", log_path)
        assert {p.name for p in folder.iterdir()} >= {"frames", "results", "control"}
        assert run.poll() is None
