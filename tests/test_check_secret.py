"""`controlplane check-secret`: the bad-rotation corpus, as files and as Secret manifests; any input
gives lines that say what to do, never a traceback."""

from __future__ import annotations

import base64
import os
import subprocess
import sys

import pytest
import yaml

from controlplane import check_secret
from tests.certs import MutualTlsWorld, bad_rotations, issue

WORLD = MutualTlsWorld()
# What the control plane checks against the last valid version, check-secret checks against
# --trusted-by (what clients trust); a dropped client CA needs the last valid bundle: not here.
AS_CHECKED_HERE = {"NewIssuer": "ClientsTrust"}
CORPUS = [case for case in bad_rotations(WORLD) if case.check != "CaDropped"]


def run(*argv: str, capsys) -> tuple[int, list[str]]:
    code = check_secret.main(list(argv))
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    return code, captured.out.splitlines()


def common(tmp_path) -> list[str]:
    (tmp_path / "clients-trust.pem").write_bytes(WORLD.server_ca.cert_pem)
    return ["--hostname", WORLD.hostname, "--trusted-by", str(tmp_path / "clients-trust.pem")]


def parts_as_files(secret: dict, tmp_path) -> list[str]:
    argv = []
    for part, option in (("tls.crt", "--cert"), ("tls.key", "--key"), ("ca.crt", "--ca")):
        path = tmp_path / part
        path.write_bytes(base64.b64decode(secret["data"][part]))
        argv += [option, str(path)]
    return argv


@pytest.mark.parametrize("case", CORPUS, ids=[case.name for case in CORPUS])
@pytest.mark.parametrize("given_as", ["files", "manifest"])
def test_every_bad_rotation_fails_with_its_check_and_what_to_do(case, given_as, tmp_path, capsys):
    if given_as == "files":
        argv = parts_as_files(case.secret, tmp_path)
    else:
        (tmp_path / "secret.yaml").write_text(yaml.safe_dump(case.secret))
        argv = ["--secret", str(tmp_path / "secret.yaml")]
    code, lines = run(*argv, *common(tmp_path), capsys=capsys)
    check = AS_CHECKED_HERE.get(case.check, case.check)
    assert code == 1 and lines, lines
    assert all(line.startswith("FAIL ") for line in lines)
    assert any(line.startswith(f"FAIL {check}: ") for line in lines), lines


def test_several_failures_are_all_listed(tmp_path, capsys):
    bad = WORLD.server(dns_names=("other.example.test",), valid_days=1.2, starts_days_ago=1)
    secret = WORLD.certificate_secret(bad, key_pem=issue("x").key_pem)
    code, lines = run(*parts_as_files(secret, tmp_path), *common(tmp_path), capsys=capsys)
    assert code == 1
    assert [line.split(":")[0] for line in lines] == ["FAIL KeyMismatch", "FAIL Hostname", "FAIL ExpiresSoon"]
    assert "issue one with edge.example.test in its DNS subjectAltNames" in lines[1]


def test_a_good_secret_passes_as_files_and_as_a_manifest_with_string_data(tmp_path, capsys):
    good = WORLD.certificate_secret(WORLD.server())
    code, lines = run(*parts_as_files(good, tmp_path), *common(tmp_path), capsys=capsys)
    assert (code, lines[0].startswith("OK: certificate")) == (0, True), lines
    manifest = {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls", "metadata": {"name": "edge-cert"},
                "stringData": {part: base64.b64decode(value).decode() for part, value in good["data"].items()}}
    (tmp_path / "secret.yaml").write_text(yaml.safe_dump(manifest))
    code, lines = run("--secret", str(tmp_path / "secret.yaml"), "--hostname", WORLD.hostname, capsys=capsys)
    assert (code, lines) == (0, [f"OK: Secret edge-cert passes every check (usage server, at least 24 h left, covers "
                                 f"{WORLD.hostname}, chains to its ca.crt)"])


def test_usage_client_wants_client_auth_and_the_minimum_lifetime_is_an_option(tmp_path, capsys):
    agent = issue("agent-7", issuer=WORLD.agents_ca, client=True, valid_days=1.5, starts_days_ago=1)  # 12 h left
    (tmp_path / "a.crt").write_bytes(agent.cert_pem)
    (tmp_path / "a.key").write_bytes(agent.key_pem)
    files = ["--cert", str(tmp_path / "a.crt"), "--key", str(tmp_path / "a.key")]
    assert run(*files, "--usage", "client", "--min-lifetime", "6h", capsys=capsys)[0] == 0
    code, lines = run(*files, "--min-lifetime", "6h", capsys=capsys)
    assert code == 1 and lines[0].startswith("FAIL ExtendedKeyUsage: ") and "issue it with serverAuth" in lines[0]
    code, lines = run(*files, "--usage", "client", capsys=capsys)
    assert code == 1 and lines[0].startswith("FAIL ExpiresSoon: ") and "under the minimum remaining lifetime of 24 h" \
        in lines[0]


HOSTILE_FILES = {
    "missing": None,
    "a directory": "DIR",
    "binary": bytes(range(256)) * 64,
    "empty": b"",
    "garbage YAML": b"{ [ : :",
    "a YAML list": b"- a\n- b\n",
    "two documents": b"kind: Secret\n---\nkind: Secret\n",
    "another kind": b"kind: ConfigMap\ndata: {}\n",
    "data not base64": b"kind: Secret\ntype: kubernetes.io/tls\ndata: {tls.crt: '%%%', tls.key: 3}\n",
    "data a list": b"kind: Secret\ntype: kubernetes.io/tls\ndata: [1, 2]\nmetadata: 7\n",
    "too large": b"#" * ((1 << 20) + 10),
}


@pytest.mark.parametrize("content", list(HOSTILE_FILES.values()), ids=list(HOSTILE_FILES))
@pytest.mark.parametrize("option", ["--secret", "--cert", "--key", "--ca", "--trusted-by"])
def test_hostile_files_give_a_failure_line_not_a_traceback(option, content, tmp_path, capsys):
    path = tmp_path / "input"
    if content == "DIR":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    good = WORLD.certificate_secret(WORLD.server())
    argv = [] if option == "--secret" else parts_as_files(good, tmp_path)
    if option != "--secret":
        position = argv.index(option) + 1 if option in argv else None
        if position is None:
            argv += [option, str(path)]
        else:
            argv[position] = str(path)
    else:
        argv = ["--secret", str(path)]
    code, lines = run(*argv, capsys=capsys)
    assert code == 1 and lines and all(line.startswith("FAIL ") for line in lines), lines


@pytest.mark.parametrize("argv", [[], ["--cert", "a"], ["--secret", "s", "--cert", "c", "--key", "k"]])
def test_wrong_usage_says_how_to_call_it(argv, capsys):
    assert check_secret.main(argv) == 2
    assert "give --cert and --key" in capsys.readouterr().err


def test_a_bad_duration_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exited:
        check_secret.main(["--cert", "c", "--key", "k", "--min-lifetime", "a day"])
    assert exited.value.code == 2 and "is not a duration such as 24h" in capsys.readouterr().err


def test_it_runs_as_a_module(tmp_path):
    secret = WORLD.certificate_secret(WORLD.server(dns_names=("other.example.test",)))
    (tmp_path / "secret.yaml").write_text(yaml.safe_dump(secret))
    done = subprocess.run([sys.executable, "-m", "controlplane.check_secret", "--secret", str(tmp_path / "secret.yaml"),
                           "--hostname", WORLD.hostname], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert done.returncode == 1 and done.stdout.startswith("FAIL Hostname: "), done.stdout + done.stderr
