"""The API's sandbox HMAC secret comes from a file or the environment, never an argument."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpucloud.api.main import parse_args, sandbox_secret


def test_the_secret_on_the_command_line_is_refused_naming_the_alternatives(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(["--sandbox-secret", "s3cret"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--sandbox-secret: secrets are not accepted on the command line" in err
    assert "--sandbox-secret-file" in err and "GPUCLOUD_SANDBOX_SECRET" in err


def test_a_file_wins_over_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUCLOUD_SANDBOX_SECRET", "from-env")
    assert sandbox_secret(parse_args([])) == "from-env"
    secret = tmp_path / "secret"
    secret.write_text("from-file\n")
    assert sandbox_secret(parse_args(["--sandbox-secret-file", str(secret)])) == "from-file"
    monkeypatch.delenv("GPUCLOUD_SANDBOX_SECRET")
    assert sandbox_secret(parse_args([])) is None
    secret.write_text("")
    with pytest.raises(SystemExit, match=r"--sandbox-secret-file: .* is empty"):
        sandbox_secret(parse_args(["--sandbox-secret-file", str(secret)]))
    with pytest.raises(SystemExit, match="--sandbox-secret-file: cannot read it"):
        sandbox_secret(parse_args(["--sandbox-secret-file", str(tmp_path / "none")]))
