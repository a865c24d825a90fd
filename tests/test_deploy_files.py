"""deploy/ as a newcomer uses it (issue 9, item 18): every file a deploy/ file or a README link names is in the
repository, and the example configurations pass `gateway check-config` once their variables are set."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "deploy" / "README.md", ROOT / "bench" / "README.md"]
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")
# A repository path written out in a deploy/ file: an install step, a comment, a `-f` argument. Not
# `kubectl ... deploy/tool` (a Kubernetes deployment's short name).
DEPLOY_PATH = re.compile(r"(?<![\w/.-])(?<!rollout status )(deploy/[A-Za-z0-9_./-]*[A-Za-z0-9_])")
# Files the reader makes from one that exists (`cp deploy/docker/.env.example deploy/docker/.env`).
MADE_BY_THE_READER = {"deploy/docker/.env": "deploy/docker/.env.example"}


def deploy_files() -> list[Path]:
    return sorted(p for p in (ROOT / "deploy").rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def named_files() -> list[tuple[Path, str, Path]]:
    """(file that names it, how it was written, the path it resolves to)."""
    found: list[tuple[Path, str, Path]] = []
    for doc in DOCS:
        for target in MARKDOWN_LINK.findall(doc.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            found.append((doc, target, (doc.parent / target.split("#")[0]).resolve()))
    for file in [*deploy_files(), *DOCS]:
        text = file.read_text(encoding="utf-8", errors="replace")
        for written in DEPLOY_PATH.findall(text):
            if "*" in written or written.endswith("/"):
                continue
            found.append((file, written, ROOT / written))
    compose = ROOT / "deploy" / "docker" / "compose.yaml"
    for service in yaml.safe_load(compose.read_text())["services"].values():
        for volume in service.get("volumes", []):
            source = str(volume).split(":")[0]
            if source.startswith("."):  # a bind mount of a file next to compose.yaml
                found.append((compose, source, (compose.parent / source).resolve()))
    return found


def test_every_file_named_by_deploy_or_a_readme_exists() -> None:
    named = named_files()
    assert len(named) > 20  # the scan really reads the links
    missing = [f"{by.relative_to(ROOT)} names {written}" for by, written, path in named
               if not path.exists() and not (ROOT / MADE_BY_THE_READER.get(written, written)).exists()]
    assert missing == []


def test_the_deploy_configurations_are_not_hidden_by_gitignore() -> None:
    # --no-index: the files are tracked now, and a tracked file is never reported as ignored otherwise.
    listed = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "--no-index", "deploy/systemd/gateway.yaml",
                             "deploy/docker/gateway.yaml"], capture_output=True, text=True)
    assert listed.stdout == ""  # neither is ignored (the root's own gateway.yaml still is)
    root = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "--no-index", "gateway.yaml"],
                          capture_output=True, text=True)
    assert root.stdout.strip() == "gateway.yaml"


def secrets_dir(tmp_path: Path, names: list[str]) -> Path:
    from cryptography.fernet import Fernet

    values = {"session": Fernet.generate_key().decode(), "admin": "an-admin-token-0123456789",
              "dsn": "postgresql://gateway:pw@127.0.0.1:5432/gateway", "gitlab": "app-secret"}
    folder = tmp_path / "secrets"
    folder.mkdir()
    for name in names:
        kind = next(k for k in values if k in name.replace("database", "dsn"))
        (folder / name).write_text(values[kind] + "\n")
    return folder


@pytest.mark.parametrize("which", ["systemd", "docker"])
def test_deploy_configurations_pass_check_config(tmp_path: Path, which: str) -> None:
    source = ROOT / "deploy" / which / "gateway.yaml"
    text = source.read_text()
    env = {"PATH": "/usr/bin:/bin"}
    if which == "systemd":
        env["CREDENTIALS_DIRECTORY"] = str(secrets_dir(tmp_path, ["admin-tokens", "gitlab-client-secret",
                                                                  "session-secrets", "database-dsn"]))
    else:
        # The same file, with compose's /run/secrets/ mount point moved to a directory this test owns.
        folder = secrets_dir(tmp_path, ["admin_tokens", "gitlab_client_secret", "session_secrets", "database_dsn"])
        text = text.replace("/run/secrets/", f"{folder}/")
        env.update(GATEWAY_PUBLIC_URL="https://tool.acme.test", GITLAB_URL="https://gitlab.acme.test",
                   GITLAB_CLIENT_ID="4f1c9e", GATEWAY_ALLOWED_GROUP="acme/platform")
    config = tmp_path / "gateway.yaml"
    config.write_text(text)
    done = subprocess.run([sys.executable, "-m", "gateway", "check-config", "-c", str(config)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    if which == "systemd":  # the values to fill in are pointed out, by key
        assert "warning: gitlab.client_id:" in done.stderr and "warning: provisioning.allowed_groups:" in done.stderr
    else:
        assert "warning" not in done.stderr
