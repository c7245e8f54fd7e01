"""The trace viewer in a real browser: headless Chromium runs the page's script, we read the DOM back."""
import json
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
from click.testing import CliRunner

from ringpipe.cluster.cli import main
from tests.test_trace_tools import RANK0, RANK1, write_trace

CHROMIUM = next((path for path in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if path), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (run .ci/install_chromium.sh)")


class DomReader(HTMLParser):
    """Collects the rank lanes, the summary cells and the body's ready flag from a dumped DOM."""

    def __init__(self):
        super().__init__()
        self.lanes, self.summary, self.ready, self._rank, self._in_summary = [], {}, None, None, False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "body":
            self.ready = attrs.get("data-ready")
        if tag == "div" and "rank-lane" in (attrs.get("class") or "").split():
            self.lanes.append(attrs)
        if tag == "table":
            self._in_summary = attrs.get("id") == "summary"
        if self._in_summary and tag == "tr" and "data-rank" in attrs:
            self._rank = int(attrs["data-rank"])
            self.summary[self._rank] = {"slowest": attrs.get("data-slowest") == "1"}
        if self._in_summary and tag == "td" and "data-key" in attrs:
            self.summary[self._rank][attrs["data-key"]] = float(attrs["data-value"])

    def handle_endtag(self, tag):
        if tag == "table":
            self._in_summary = False


def dump_dom(page, profile_dir) -> str:
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile_dir}", "--dump-dom", f"file://{page}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_viewer_shows_one_lane_per_rank_and_the_summary_of_the_cli(tmp_path):
    run = write_trace(tmp_path / "run", [RANK0, RANK1, RANK0], offsets_ns={1: 1_000_000},
                      metrics=[{"step": 0, "loss": 4.0}, {"step": 1, "loss": 3.0}])
    runner = CliRunner()
    assert runner.invoke(main, ["trace", "view", run, "-o", str(tmp_path / "view.html")]).exit_code == 0
    expected = json.loads(runner.invoke(main, ["trace", "summary", run, "--json"]).output)

    dom = DomReader()
    dom.feed(dump_dom(tmp_path / "view.html", tmp_path / "profile"))

    assert dom.ready == "1", "the page's script did not finish"
    assert [lane["data-rank"] for lane in dom.lanes] == ["0", "1", "2"]
    assert all(int(lane["data-spans"]) > 0 for lane in dom.lanes)
    for row in expected["ranks"]:
        shown = dom.summary[row["rank"]]
        assert shown.pop("slowest") == row["slowest"]
        assert shown == {key: row[key] for key in shown}
        assert len(shown) >= 6


class LegendReader(HTMLParser):
    def __init__(self):
        super().__init__()
        self.names, self._depth = [], 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "div" and attrs.get("id") == "legend":
            self._depth = 1
        elif self._depth and tag == "span" and "data-name" in attrs:
            self.names.append(attrs["data-name"])


def test_viewer_shows_a_legend_of_the_colours_on_its_canvas(tmp_path):
    run = write_trace(tmp_path / "run", [RANK0, RANK1])
    assert CliRunner().invoke(main, ["trace", "view", run, "-o", str(tmp_path / "view.html")]).exit_code == 0
    legend = LegendReader()
    legend.feed(dump_dom(tmp_path / "view.html", tmp_path / "profile"))
    # forward, send and recv have their own colours; all_reduce is "other comm"; faded = blocked
    assert legend.names == ["forward", "send", "recv", "other comm (collectives)", "blocked"]
