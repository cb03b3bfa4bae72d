"""The CLI skeleton: commands listed, inspect works, user errors are one line with exit code 2."""

import pytest

from bard_deploy.cli import main
from tiny import hf_qwen3_vl


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    hf_qwen3_vl().save_pretrained(d)
    return d


def test_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("train", "export", "generate", "bench", "inspect"):
        assert cmd in out


def test_inspect_checkpoint(ckpt, capsys):
    assert main(["inspect", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "qwen3_vl" in out and "4 layers, hidden 64" in out and "deepstack [0, 1]" in out
    assert "MRoPE interleaved [4, 2, 2]" in out


def test_user_error_is_one_line(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "nope" in err


def test_debug_shows_the_traceback(tmp_path):
    from bard_deploy.errors import CheckpointError
    with pytest.raises(CheckpointError):
        main(["--debug", "inspect", str(tmp_path / "nope")])


def test_unknown_command_exits_2():
    assert main(["frobnicate"]) == 2
