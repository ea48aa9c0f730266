"""`edgeota keys generate` / `write_keypair`: parent folders are made, bad paths are one line, nothing half-written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edgeota_contract.errors import SignatureError
from edgeota_contract.signing import load_private_key, load_public_key, write_keypair


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgeota.cli", *args], capture_output=True, text=True, timeout=60)


def _assert_one_line_error(done: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert fragment in lines[0], lines[0]


def test_missing_folders_are_created(tmp_path: Path) -> None:
    target = tmp_path / "fresh" / "keys" / "release.pem"
    done = _cli("keys", "generate", str(target))
    assert done.returncode == 0, done.stderr
    assert load_public_key(target.with_name("release.pub.pem")) == load_private_key(target).public_key


def test_a_file_in_the_path_is_one_line_and_nothing_written(tmp_path: Path) -> None:
    blocker = tmp_path / "keys"
    blocker.write_text("a file, not a folder")
    done = _cli("keys", "generate", str(blocker / "release.pem"))
    _assert_one_line_error(done, f"cannot create {blocker}: {blocker} is a file, not a folder")
    deeper = blocker / "a" / "release.pem"
    _assert_one_line_error(_cli("keys", "generate", str(deeper)), f"{blocker} is a file, not a folder")
    assert blocker.read_text() == "a file, not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys"]


def test_key_path_that_is_a_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "release.pem").mkdir()
    _assert_one_line_error(_cli("keys", "generate", str(tmp_path / "release.pem")), "is a folder, not a key file path")


def test_an_existing_public_key_is_not_overwritten(tmp_path: Path) -> None:
    pub = tmp_path / "release.pub.pem"
    pub.write_text("someone's public key")
    with pytest.raises(SignatureError, match=r"refusing to overwrite existing key .*release\.pub\.pem"):
        write_keypair(tmp_path / "release.pem")
    assert pub.read_text() == "someone's public key"
    assert not (tmp_path / "release.pem").exists()


def test_a_failed_public_key_write_leaves_nothing(tmp_path: Path) -> None:
    # The private key name fits the file system's 255-byte limit, the public one (+4 bytes) does not.
    target = tmp_path / "new" / "sub" / ("k" * 250 + ".pem")
    with pytest.raises(SignatureError, match="cannot write key file") as info:
        write_keypair(target)
    assert "\n" not in str(info.value)
    assert not target.exists()
    assert not (tmp_path / "new").exists()  # the folders this call made are gone too
    assert list(tmp_path.iterdir()) == []
