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


def test_short_help_version_and_real_defaults(capsys):
    assert main(["-h"]) == 0 and "bench-step" in capsys.readouterr().out
    assert main(["--version"]) == 0
    from bard_deploy import __version__
    assert capsys.readouterr().out.strip() == f"bard-deploy {__version__}"
    assert main(["train", "-h"]) == 0
    out = " ".join(capsys.readouterr().out.split())          # help lines wrap with the terminal
    # the defaults come from the Recipe dataclass and are printed as written (not eaten as markup)
    assert "[default: runs]" in out and "[default: 0.05]" in out and "[default: (the embedded default)]" in out
    assert main(["generate", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "[default: 0.9]" in out and "[default: 256]" in out and "[default: (the trained block size)]" in out


def test_debug_is_accepted_after_the_subcommand(tmp_path):
    from bard_deploy.errors import CheckpointError
    with pytest.raises(CheckpointError):
        main(["inspect", str(tmp_path / "nope"), "--debug"])
    with pytest.raises(CheckpointError):
        main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "hi", "--debug"])


def test_an_ar_model_given_to_generate_names_the_flag(tmp_path, capsys):
    from bard_deploy.embedded import new_checkpoint
    ar = new_checkpoint(tmp_path / "ar", hidden=64, layers=2)
    assert main(["generate", "--model", str(ar), "--prompt", "hi"]) == 2
    assert "--ar" in capsys.readouterr().err


def test_generate_with_the_reference_semantics(tmp_path, capsys):
    """--reference (even schedule, strict threshold, raw confidences): static with 2 steps, every block of 4 takes
    exactly 2 steps (shares 2, 2); --static alone is accepted; a bad --schedule is a one-line error."""
    from bard_deploy.embedded import new_checkpoint

    b4 = new_checkpoint(tmp_path / "b4", bard={"block_size": 4}, hidden=64, layers=2)
    assert main(["generate", "--model", str(b4), "--prompt", "Describe the picture.", "--reference", "--static",
                 "--max-steps", "2", "--max-new-tokens", "8", "--stats"]) == 0
    out = capsys.readouterr().out
    assert "steps_per_block" in out and "[2, 2]" in out
    assert main(["generate", "--model", str(b4), "--prompt", "x", "--static", "--max-new-tokens", "4"]) == 0
    capsys.readouterr()
    assert main(["generate", "--model", str(b4), "--prompt", "x", "--schedule", "odd"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "schedule" in err[0]


def test_a_recipe_file_is_not_overridden_by_option_defaults(tmp_path, monkeypatch):
    """train --recipe: the file's values stand unless an option is given on the command line (typer's own
    ParameterSource used to make every option count as given, so the defaults overrode the file)."""
    import bard_deploy.cli as cli

    seen = []

    def fake_run(r, **kw):
        seen.append(r)
        return {"train_seconds": 0}

    monkeypatch.setattr(cli, "run_train", fake_run)
    recipe = tmp_path / "r.toml"
    recipe.write_text('seed = 7\nt_min = 0.3\n[[stages]]\nname = "b4"\nblock_size = 4\nsteps = 2\n')
    out = str(tmp_path / "runs")
    assert main(["train", "--recipe", str(recipe), "--out", out, "--no-progress"]) == 0
    assert seen[-1].seed == 7 and seen[-1].t_min == 0.3
    assert main(["train", "--recipe", str(recipe), "--out", out, "--seed", "3", "--no-progress"]) == 0
    assert seen[-1].seed == 3 and seen[-1].t_min == 0.3
