"""SynCD's DreamBench evaluation prints the paper's rows (syncd/eval.py PAPER_ROWS) beside ours, in stdout and in
summary.md; with no rows retrieved, only ours and a note saying so."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eval_fixtures import write_dreambench, write_samples  # noqa: E402


def _samples(root: Path) -> Path:
    for subject in ("dog", "backpack"):
        write_samples(root / subject, [f"a sks {subject} in the jungle", f"a sks {subject} in the snow"],
                      per_prompt=1, samples_dir=False)
    return root


def test_paper_rows_printed_beside_ours(tmp_path, capsys, monkeypatch):
    import syncd.eval as ev

    bench = write_dreambench(tmp_path / "db")
    samples = _samples(tmp_path / "samples")
    argv = ["--sample_root", str(samples), "--benchmark_root", str(bench), "--tiny_backbones", "--no-progress"]
    rows = [("SynCD (FLUX), 3 input [test row]", 0.1234, 0.5678, 0.9012), ("JeDi [test row]", 0.25, 0.5, 0.75)]
    monkeypatch.setattr(ev, "PAPER_ROWS", rows)
    result = ev.main(argv)
    out = capsys.readouterr().out
    md = (samples / "eval" / "summary.md").read_text()
    for text in (out, md):
        assert "| SynCD (FLUX), 3 input [test row] (paper) | 0.1234 | 0.5678 | 0.9012 |" in text
        assert "| JeDi [test row] (paper) | 0.2500 | 0.5000 | 0.7500 |" in text
        ours = next(line for line in text.splitlines() if "(ours)" in line)
        assert f"**{result['mean']['clip_t']:.4f}**" in ours and f"**{result['mean']['dino']:.4f}**" in ours
        lines = text.splitlines()
        assert lines.index(ours) > max(i for i, line in enumerate(lines) if "(paper)" in line)  # ours after theirs


def test_no_paper_rows_says_so(tmp_path, capsys, monkeypatch):
    import syncd.eval as ev

    monkeypatch.setattr(ev, "PAPER_ROWS", [])
    bench = write_dreambench(tmp_path / "db")
    samples = _samples(tmp_path / "samples")
    ev.main(["--sample_root", str(samples), "--benchmark_root", str(bench), "--tiny_backbones", "--no-progress"])
    md = (samples / "eval" / "summary.md").read_text()
    assert "(paper)" not in md and "(ours)" in md and "paper rows: not retrieved" in md
