"""Names from files and users are data: never a spreadsheet formula, never a terminal escape."""

from fisherlab.io.tables import markdown_table, read_csv, safe_text, text_table, write_csv


def test_formula_like_cells_are_guarded_and_round_trip(tmp_path):
    rows = [{"name": "=HYPERLINK(\"http://x\",\"y\")", "v": -1.5, "w": "-2"}, {"name": "@SUM(A1)", "v": 2.0, "w": "ok"}]
    path = write_csv(rows, tmp_path / "t.csv")
    text = path.read_text()
    assert "'=HYPERLINK" in text and "'@SUM" in text
    assert "-1.5" in text and "'-2" not in text  # numbers are not text
    back = read_csv(path)
    assert back[0]["name"] == rows[0]["name"] and back[1]["name"] == "@SUM(A1)"


def test_control_characters_are_shown_not_interpreted():
    evil = "ckpt\x1b[2J\x1b]0;owned\x07"
    assert "\x1b" not in safe_text(evil) and "\\x1b" in safe_text(evil)
    assert all("\x1b" not in line for line in text_table([["name"], [evil]]))
    assert all("\x1b" not in line for line in markdown_table(["name"], [[evil]]))
