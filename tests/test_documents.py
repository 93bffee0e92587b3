"""Documents: a report a client would accept, and untrusted data that stays data."""

from __future__ import annotations

import io
from datetime import UTC, datetime

import pytest
from pypdf import PdfReader

from reportflow.shared.documents import (
    AssetsOnlyFetcher,
    DocumentRenderer,
    UnknownTemplate,
)
from reportflow.shared.models import Report
from tests.helpers import sample_request


@pytest.fixture(scope="module")
def renderer():
    return DocumentRenderer()


def report(**overrides) -> Report:
    request = sample_request(**overrides)
    return Report(
        id="rpt-abc123",
        title=request["title"],
        template=request["template"],
        status="created",
        submitter=request["submitter"],
        client=request["client"],
        data=request["data"],
        created_at=datetime(2026, 11, 24, tzinfo=UTC),
    )


def pages(pdf: bytes) -> list[str]:
    return [p.extract_text() for p in PdfReader(io.BytesIO(pdf)).pages]


def test_a_long_table_repeats_its_header_and_every_page_has_page_x_of_y_and_the_report_id(renderer):
    data = sample_request()["data"]
    data["table"]["rows"] = [[f"m{i}", "North", "Analytics", f"{i:,}", "1.0%"] for i in range(300)]
    rendered = renderer.render(report(data=data))
    text = pages(rendered.pdf)
    assert rendered.pages == len(text) > 3
    for number, page in enumerate(text, start=1):
        assert f"Page {number} of {len(text)}" in page
        assert "rpt-abc123" in page
        assert "Revenue (EUR)" in page  # the header row, on every page of the table
    assert "m299" in text[-1]


def test_report_data_is_escaped_not_interpreted(renderer):
    data = {
        "summary": '<img src="file:///etc/passwd"><b>bold</b>',
        "sections": [{"heading": "{{ 7*7 }}", "body": "<script>alert(1)</script>"}],
    }
    html = renderer.html(report(data=data))
    assert "&lt;img src=&#34;file:///etc/passwd&#34;&gt;" in html
    assert "<script>" not in html and "{{ 7*7 }}" in html
    text = "\n".join(pages(renderer.pdf(html).pdf))
    assert '<img src="file:///etc/passwd">' in text and "{{ 7*7 }}" in text


def test_templates_come_from_a_known_set_by_name(renderer):
    with pytest.raises(UnknownTemplate):
        renderer.html(report(template="../../etc/passwd"))


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "http://127.0.0.1:1/x.css", "https://example.com/a.png", "data:text/css,body{}"]
)
def test_the_fetcher_serves_only_the_projects_assets(url):
    with pytest.raises(ValueError):
        AssetsOnlyFetcher().fetch(url)


def test_the_fetcher_serves_the_projects_own_stylesheet():
    fetcher = AssetsOnlyFetcher()
    from reportflow.shared.documents import ASSETS

    response = fetcher.fetch((ASSETS / "report.css").as_uri())
    assert b"@page" in response.read()
    response.close()


KILLED_MID_LIFE = """
import os, signal, sys
from reportflow.shared.documents import IsolatedRenderer
renderer = IsolatedRenderer(60)
renderer.pdf("<p>one page</p>")
print(" ".join(str(p.pid) for p in renderer._pool._processes.values()), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_render_process_stops_when_its_generation_process_is_killed_outright():
    """kill -9 (or the OOM killer) gives a generation process no chance to stop its render process: the
    render process must notice it is orphaned and stop, not live on with its memory."""
    import subprocess
    import sys
    import time

    # Not run() with its output captured: an orphaned child keeps the pipe open, so read one line and wait.
    killed = subprocess.Popen([sys.executable, "-c", KILLED_MID_LIFE], stdout=subprocess.PIPE, text=True)
    children = [int(pid) for pid in killed.stdout.readline().split()]
    killed.wait(timeout=60)
    killed.stdout.close()
    assert children

    def alive(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                return stat.read().split(")")[-1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in children if alive(pid)], "render processes outlived their generation process"


RECYCLED = """
import json
from reportflow.shared.documents import IsolatedRenderer

def children(renderer):
    return sorted(renderer._pool._processes)

if __name__ == "__main__":
    kept = IsolatedRenderer(60, recycle_above_mb=10_000)
    first = children(kept)
    kept.pdf("<p>one page</p>")
    recycled = IsolatedRenderer(60, recycle_above_mb=1)  # any render leaves a child bigger than that
    before = children(recycled)
    pdf = recycled.pdf("<p>one page</p>")
    second = recycled.pdf("<p>again</p>")  # rendered by the replacement
    print(json.dumps({"kept": first == children(kept), "before": before, "after": children(recycled),
                      "rendered": pdf.pages == second.pages == 1}))
    kept.close()
    recycled.close()
"""


def test_a_render_process_left_too_large_is_replaced_and_the_next_render_uses_the_new_one(tmp_path):
    import json
    import subprocess
    import sys

    script = tmp_path / "recycled.py"
    script.write_text(RECYCLED)
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout)
    assert seen["kept"] and seen["rendered"]
    assert seen["before"] and seen["after"] and not set(seen["before"]) & set(seen["after"])
