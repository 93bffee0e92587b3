"""Reports as documents: Jinja2 templates from a known set, WeasyPrint PDFs, and where they are kept."""

from __future__ import annotations

import contextlib
import hashlib
import io
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import jinja2
from opentelemetry import trace
from prometheus_client import Counter, Histogram
from weasyprint import CSS, HTML
from weasyprint.text.fonts import FontConfiguration
from weasyprint.urls import URLFetcher

ASSETS = Path(__file__).resolve().parent / "templates"
RENDERS = Counter("reportflow_renders", "PDF renders, by outcome (ok, failed)", ["outcome"])
RENDER_SECONDS = Histogram(
    "reportflow_render_seconds",
    "Laying out and writing one PDF",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
RECYCLES = Counter(
    "reportflow_render_process_recycles", "Render processes replaced because a render left them too large"
)
TEMPLATES = {"standard": "standard.html"}
_tracer = trace.get_tracer("reportflow.documents")


class UnknownTemplate(ValueError):
    pass


class RenderTimeout(TimeoutError):
    """A render ran past its time limit and was stopped; worth another try, later."""


class AssetsOnlyFetcher(URLFetcher):
    """Report data is untrusted: WeasyPrint may load the project's own assets and nothing else."""

    def __init__(self, root: Path = ASSETS):
        super().__init__(allowed_protocols={"file"}, allow_redirects=False)
        self._root = root.resolve()

    def fetch(self, url, headers=None):
        if not url.startswith("file://"):
            raise ValueError(f"refused to fetch {url!r}: only the project's own assets are loaded")
        path = Path(url.removeprefix("file://").split("?")[0].split("#")[0]).resolve()
        if not path.is_relative_to(self._root) or not path.is_file():
            raise ValueError(f"refused to fetch {url!r}: outside the project's assets")
        return super().fetch(path.as_uri(), headers)


@dataclass(frozen=True)
class RenderedDocument:
    pdf: bytes
    pages: int

    @property
    def size_bytes(self) -> int:
        return len(self.pdf)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.pdf).hexdigest()


class DocumentRenderer:
    """Renders a report to PDF. Built once per process: templates, stylesheet and fonts stay loaded."""

    def __init__(self, assets: Path = ASSETS):
        self._jinja = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(assets)),
            autoescape=True,  # every template, whatever its name: report data is untrusted
            undefined=jinja2.StrictUndefined,
        )
        self._base_url = assets.as_uri() + "/"
        self._fetcher = AssetsOnlyFetcher(assets)
        self._fonts = FontConfiguration()
        self._stylesheet = CSS(filename=str(assets / "report.css"), font_config=self._fonts, url_fetcher=self._fetcher)

    def html(self, report) -> str:
        name = TEMPLATES.get(report.template)
        if name is None:
            raise UnknownTemplate(f"unknown template {report.template!r}; known: {', '.join(sorted(TEMPLATES))}")
        with _tracer.start_as_current_span("render template") as span:
            span.set_attribute("report.id", report.id)
            span.set_attribute("report.template", report.template)
            return self._jinja.get_template(name).render(report=report, data=report.data)

    def final_version(self, report, draft_pdf: bytes, draft_pages: int, approval: list[dict]) -> RenderedDocument:
        """The final version, the one the client gets: the approved draft's pages, unchanged, and an approval
        record after them. Only the record is rendered; the client receives exactly the pages the approvers approved."""
        with _tracer.start_as_current_span("render template") as span:
            span.set_attribute("report.id", report.id)
            html = self._jinja.get_template("approval.html").render(report=report, approval=approval, pages=draft_pages)
        record = self.pdf(html)
        with _tracer.start_as_current_span("append approval record") as span:
            combined = append_pdf(draft_pdf, record.pdf)
            span.set_attribute("document.size_bytes", len(combined))
        return RenderedDocument(pdf=combined, pages=draft_pages + record.pages)

    def pdf(self, html: str) -> RenderedDocument:
        with _tracer.start_as_current_span("render pdf") as span, _counted(RENDERS), RENDER_SECONDS.time():
            rendered = self._layout_and_write(html)
            span.set_attribute("document.pages", rendered.pages)
            span.set_attribute("document.size_bytes", rendered.size_bytes)
            return rendered

    def _layout_and_write(self, html: str) -> RenderedDocument:
        document = HTML(string=html, base_url=self._base_url, url_fetcher=self._fetcher).render(
            stylesheets=[self._stylesheet], font_config=self._fonts
        )
        return RenderedDocument(pdf=document.write_pdf(), pages=len(document.pages))

    def render(self, report) -> RenderedDocument:
        return self.pdf(self.html(report))


class IsolatedRenderer(DocumentRenderer):
    """Lays out PDFs in a child process, so a render can be bounded in time: past the limit the child
    is killed and RenderTimeout raised. The child keeps fonts and stylesheet loaded between renders,
    and the consumer's I/O thread never waits on WeasyPrint for the interpreter lock.

    A big report (5,000 table rows) leaves the child holding half a gigabyte that neither Python nor
    pango gives back. A child whose resident memory is above recycle_above_mb after a render is replaced:
    the new one starts while the stage commits and acknowledges, so no render waits for it."""

    def __init__(self, time_limit_seconds: float, assets: Path = ASSETS, recycle_above_mb: float = 250):
        super().__init__(assets)
        self.time_limit = time_limit_seconds
        self.recycle_above_mb = recycle_above_mb
        self._assets = assets
        self._pool = self._start()

    def _start(self, wait: bool = True) -> ProcessPoolExecutor:
        # spawn, not fork: the parent has threads (pika I/O, workers) that a fork would copy mid-flight.
        pool = ProcessPoolExecutor(
            max_workers=1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_child_renderer,
            initargs=(str(self._assets), os.getpid()),
        )
        warm = pool.submit(int)  # start the child and load WeasyPrint now, not on the first report
        if wait:
            warm.result()
        return pool

    def _layout_and_write(self, html: str) -> RenderedDocument:
        future = self._pool.submit(_render_in_child, html)
        try:
            rendered, child_mb = future.result(timeout=self.time_limit)
        except FutureTimeout:
            self._restart()
            raise RenderTimeout(f"render took longer than {self.time_limit:g}s and was stopped") from None
        except BrokenProcessPool:
            self._restart()
            raise RenderTimeout("the render process died") from None
        if child_mb > self.recycle_above_mb:
            RECYCLES.inc()
            self._restart(wait=False)
        return rendered

    def _restart(self, wait: bool = True) -> None:
        for process in list(getattr(self._pool, "_processes", {}).values()):
            process.kill()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = self._start(wait)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


_child_renderer: DocumentRenderer | None = None


def _start_child_renderer(assets: str, parent: int) -> None:
    global _child_renderer
    # The parent's pid comes from the parent: one killed while this child was still starting is gone
    # already, and asking os.getppid() here would name init.
    threading.Thread(target=_exit_with_parent, args=(parent,), name="parent-watch", daemon=True).start()
    _child_renderer = DocumentRenderer(Path(assets))


def _exit_with_parent(parent: int) -> None:
    """A generation process killed outright (kill -9, the OOM killer) cannot stop its render process: the
    render process stops itself once it is orphaned, instead of living on with its memory."""
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(0)


def _render_in_child(html: str) -> tuple[RenderedDocument, float]:
    """The document, and this process's resident memory after making it, in MB."""
    if _child_renderer is None:
        raise RuntimeError("the render process was started without its renderer")
    rendered = _child_renderer._layout_and_write(html)
    return rendered, _resident_mb()


def _resident_mb() -> float:
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE") / 1_048_576
    except (OSError, ValueError, IndexError):  # not Linux: the peak is the best there is
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextlib.contextmanager
def _counted(counter: Counter):
    try:
        yield
    except Exception:
        counter.labels("failed").inc()
        raise
    counter.labels("ok").inc()


def append_pdf(first: bytes, second: bytes) -> bytes:
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(first)))
    writer.append(PdfReader(io.BytesIO(second)))
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def document_key(report_id: str, kind: str, revision: int = 1) -> str:
    """Where a document is kept; each revision's beside the others, so earlier revisions stay readable."""
    return f"reports/{report_id}/{kind}.pdf" if revision == 1 else f"reports/{report_id}/revision-{revision}/{kind}.pdf"
