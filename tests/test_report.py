import json
import os
from html.parser import HTMLParser

import pytest

from leanlm.eval.report import (
    format_markdown,
    format_table,
    load_results,
    render_html,
    write_report,
)

SETUP = {"model": "smollm2-135m", "data": "wiki", "eval_tokens": 8192, "window": 512, "stride": 512}


def result(name, ppl, weight_bytes, **extra):
    return {**SETUP, "name": name, "recipe": None, "perplexity": ppl, "bits_per_byte": 0.987,
            "weight_bytes": weight_bytes, **extra}


@pytest.fixture
def results():
    base = result("float", 10.0, 400_000_000, prefill_tokens_per_s=350.1,
                  decode_tokens_per_s=25.3, peak_rss_bytes=900_000_000)
    # Speed and RSS keys absent: speed was not measured.
    quant = result("w4a16_rtn", 11.0, 100_000_000, recipe="w4a16_rtn")
    return [base, quant]


def table_row(table, name):
    return next(line.split() for line in table.splitlines() if line.startswith(name + " "))


# ---------------------------------------------------------------- tables

def test_table_delta_ratio_and_missing_speed(results):
    table = format_table(results)
    assert table_row(table, "w4a16_rtn") == ["w4a16_rtn", "11.00", "+10.00%", "0.987", "100.0",
                                             "4.00x", "–", "–", "–"]
    assert table_row(table, "float") == ["float", "10.00", "–", "0.987", "400.0", "1.00x",
                                         "350.1", "25.3", "900.0"]


def test_table_negative_delta_and_right_alignment(results):
    results[1]["perplexity"] = 9.0
    table = format_table(results)
    assert "-10.00%" in table_row(table, "w4a16_rtn")
    # Right-aligned numeric columns end in the same column on every line.
    assert len({len(line) for line in table.splitlines()}) == 1


def test_table_size_ratio_unavailable_without_weights(results):
    results[0]["weight_bytes"] = None
    results[1]["weight_bytes"] = 0
    table = format_table(results)
    assert table_row(table, "w4a16_rtn")[5] == "–"


def test_markdown_rows_and_setup_line(results):
    results.append(result("a|<b", 12.0, 50_000_000))
    md = format_markdown(results)
    first = md.splitlines()[0]
    for fragment in ("wiki", "8192", "window 512", "stride 512"):
        assert fragment in first
    rows = [line for line in md.splitlines() if line.startswith("|")]
    assert len(rows) == 2 + len(results)  # header + alignment row + one per result
    # The pipe in the name is escaped, so every row has the same number of cell separators.
    counts = {line.replace(r"\|", "").count("|") for line in rows}
    assert counts == {10}
    assert r"| a\|\<b |" in rows[-1]
    assert "+10.00%" in rows[3]


# ---------------------------------------------------------------- HTML

VOID = {"meta", "br", "hr", "img", "input", "link"}


class StrictParser(HTMLParser):
    """Fails on any end tag that does not close the innermost open element."""

    def __init__(self):
        super().__init__()
        self.stack, self.text, self.svgs = [], [], 0

    def handle_starttag(self, tag, attrs):
        self.svgs += tag == "svg"
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        pass

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def parse(page):
    parser = StrictParser()
    parser.feed(page)
    parser.close()
    assert parser.stack == []
    return parser


def test_html_well_formed_two_plots_escaped(results):
    results[1]["decode_tokens_per_s"] = 40.0
    results.append(result("a<b&c", 12.0, 50_000_000, decode_tokens_per_s=60.0))
    page = render_html(results, title="t<i>tle")
    assert page.startswith("<!DOCTYPE html>")
    parser = parse(page)
    assert parser.svgs == 2 and page.count("<svg") == 2
    assert "a<b&c" not in page and "t<i>tle" not in page
    assert "a&lt;b&amp;c" in page
    assert "a<b&c" in "".join(parser.text)  # rendered as the real name once unescaped
    assert 'class="point baseline"' in page
    assert "http" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "<script" not in page


def test_html_speed_not_measured(results):
    page = render_html(results[1:])  # only the result without speed
    parse(page)
    assert page.count("<svg") == 1
    assert "speed not measured" in page


@pytest.mark.parametrize("count", [0, 1, 3])
def test_html_single_result_and_equal_values(count):
    same = [result(f"r{i}", 10.0, 100_000_000, decode_tokens_per_s=5.0) for i in range(count)]
    page = render_html(same)
    parse(page)
    assert "nan" not in page and "inf" not in page
    assert page.count("<svg") == (2 if count else 0)


# ---------------------------------------------------------------- files

def test_write_report_files_and_round_trip(results, tmp_path):
    out = tmp_path / "nested" / "dir"
    paths = write_report(results, out, title="my report")
    assert set(paths) == {"json", "md", "html"}
    assert sorted(os.listdir(out)) == ["report.html", "report.json", "report.md"]
    assert json.loads(paths["json"].read_text())["title"] == "my report"
    assert paths["md"].read_text().startswith("# my report")
    assert "<svg" in paths["html"].read_text()
    assert load_results([paths["json"]]) == results


def test_write_report_failure_leaves_old_report_and_no_temp_files(results, tmp_path, monkeypatch):
    write_report(results, tmp_path)
    before = (tmp_path / "report.json").read_text()

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        write_report(results[:1], tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["report.html", "report.json", "report.md"]
    assert (tmp_path / "report.json").read_text() == before


def test_load_results_accepts_all_shapes_in_order(results, tmp_path):
    one, many, report = tmp_path / "one.json", tmp_path / "many.json", tmp_path / "report.json"
    one.write_text(json.dumps(results[1]))
    many.write_text(json.dumps(results))
    report.write_text(json.dumps({"title": "x", "results": results[:1]}))
    loaded = load_results([one, str(many), report])
    assert [r["name"] for r in loaded] == ["w4a16_rtn", "float", "w4a16_rtn", "float"]


def load_error(path):
    with pytest.raises(ValueError) as info:
        load_results([path])
    message = str(info.value)
    assert f"'{path}'" in message and "\n" not in message
    return message


def test_load_results_missing_file(tmp_path):
    assert "does not exist" in load_error(tmp_path / "nope.json")


def test_load_results_bad_json(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "name": "x",\n  "perplexity": oops\n}')
    message = load_error(bad)
    assert "not valid JSON (line 3)" in message and "leanlm eval --json" in message


@pytest.mark.parametrize("content", ["42", '"text"', '[{"name": "a"}, 3]',
                                     '{"dependencies": {}}', '{"results": "nope"}'])
def test_load_results_wrong_shape(tmp_path, content):
    path = tmp_path / "shape.json"
    path.write_text(content)
    assert "does not hold evaluation results" in load_error(path)
