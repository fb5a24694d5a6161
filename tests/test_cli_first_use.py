"""What a first-time user trips over: each defect of the first-use review, through the real CLI on real files."""

import pytest

from service.cli import main


def merge_args(base, tasks, method, out, *extra):
    args = ["merge", "--base", str(base), "--method", method, "--out", str(out)]
    for name, path in tasks.items():
        args += ["--model", f"{name}={path}"]
    return args + list(extra)


def assert_user_error(code, err, *phrases):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "—" in lines[0], err
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


@pytest.mark.parametrize("kind", ["vit", "llama"])
def test_ties_dry_run_with_model_scope_forecasts(kind, families, tmp_path, capsys):
    """The forecast samples one tensor: its whole-model trim rank must be the sample's, not the model's."""
    base, tasks = families(kind)
    out = tmp_path / "merged"
    assert main(merge_args(base, tasks, "ties", out, "--dry-run", "--set", "scope=model")) == 0
    text = capsys.readouterr().out
    assert "trim thresholds (1/2)" in text and "predicted wall time" in text
    assert not out.exists()
