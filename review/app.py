"""The review web app: worklist and case view over the audit log, labels into the feedback store.

    python -m review.app [--config configs/review.yaml] [--audit-log logs] [--feedback-db monitoring/feedback.db]
                         [--reviewers-file F] [--host 127.0.0.1] [--port 8090]
                         [--image-cache DIR [--image-cache-ttl-s 3600] [--bundle models/champion]]

Server-rendered pages (FastAPI + Jinja2; no JavaScript, nothing to build). The audit log is read
only through the shared core (:mod:`review.index`), labels go through
:class:`monitoring.feedback.FeedbackStore` — the rows the drift job joins for ECE. Reviewers log
in with their id and key (:mod:`review.auth`); the session is a signed cookie (SameSite=strict,
HttpOnly) and every form carries a per-session token. Every view, login and label is a line of
the review audit log (:mod:`review.audit`). No image is stored by default, so a case shows what
its audit record holds; where the deployment enables serving's short-lived image cache
(``--image-cache`` / ``CXR_IMAGE_CACHE_DIR``), it also shows the image with its Grad-CAM overlay and
lung-zone shares (:mod:`review.images`), served by an authenticated, audited route.
"""

from __future__ import annotations

import argparse
import hmac
import logging
import os
import secrets
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Form, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from starlette.middleware.sessions import SessionMiddleware

from cxr_core.errors import InputError
from cxr_core.explain import ExplanationUnavailableError
from cxr_core.gate import REASONS
from cxr_core.image_cache import ImageCache
from monitoring.feedback import FeedbackError, FeedbackStore
from review.audit import ReviewAudit
from review.auth import check_key, ensure_reviewers_file, load_reviewers
from review.config import REPO_ROOT, SECRET_ENV, ReviewConfig
from review.images import CaseImages
from review.index import TRIAGE_ORDER, WorklistIndex

log = logging.getLogger(__name__)
TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
FEEDBACK_NOTE = "review app"


class NotLoggedIn(Exception):
    """No valid session: answered 401 with the login form (never a redirect loop, never the page)."""


def _flag(value: str | None) -> bool:
    return (value or "").lower() in ("1", "true", "on", "yes")


def _bundle_path(bundle: str) -> Path:
    """A relative bundle path from the working directory, else from the checkout (``models/champion``)."""
    path = Path(bundle)
    return path if path.is_absolute() or path.exists() else REPO_ROOT / path


def create_app(config: ReviewConfig, reviewers: dict[str, str], secret: str | None = None) -> FastAPI:
    """The app for one audit log, one feedback store and one reviewer list."""
    if not reviewers:
        raise ValueError("no reviewers: give a reviewers file or CXR_REVIEWERS=id:key")
    app = FastAPI(title="cxr-screen review", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(SessionMiddleware, secret_key=secret or os.environ.get(SECRET_ENV) or secrets.token_urlsafe(32),
                       session_cookie="cxr_review", max_age=config.session_max_age_s, same_site="strict",
                       https_only=config.secure_cookies)
    index = WorklistIndex(Path(config.audit_log))
    index.refresh(force=True)
    store = FeedbackStore(config.feedback_db)
    audit = ReviewAudit(config.review_audit_log)
    cache = ImageCache(config.image_cache, config.image_cache_ttl_s) if config.image_cache else None
    images = CaseImages(cache, _bundle_path(config.bundle))  # cache None: the privacy default, no image
    app.state.index, app.state.store, app.state.audit, app.state.config = index, store, audit, config
    app.state.images = images

    def client_of(request: Request) -> str | None:
        return request.client.host if request.client else None

    def reviewer_of(request: Request) -> str:
        reviewer = request.session.get("reviewer")
        if not reviewer or reviewer not in reviewers:
            raise NotLoggedIn()
        return reviewer

    def check_token(request: Request, token: str) -> None:
        if not hmac.compare_digest(token.encode(), str(request.session.get("token", "")).encode()):
            raise NotLoggedIn()

    def render(request: Request, name: str, context: dict[str, Any], status: int = 200) -> HTMLResponse:
        context = {"reviewer": request.session.get("reviewer"), "token": request.session.get("token"), **context}
        return TEMPLATES.TemplateResponse(request, name, context, status_code=status)

    @app.exception_handler(NotLoggedIn)
    async def not_logged_in(request: Request, _: NotLoggedIn) -> Response:
        return render(request, "login.html", {"error": None}, status=401)

    @app.get("/healthz", response_class=PlainTextResponse)
    def healthz() -> str:
        return "ok"

    @app.get("/login", response_class=HTMLResponse)
    def login_form(request: Request) -> Response:
        return render(request, "login.html", {"error": None})

    @app.post("/login")
    def login(request: Request, reviewer: str = Form(...), key: str = Form(...)) -> Response:
        reviewer = reviewer.strip()
        if not check_key(reviewers, reviewer, key):
            audit.record("login_refused", reviewer if reviewer in reviewers else None, client=client_of(request))
            request.session.clear()
            return render(request, "login.html", {"error": "Unknown reviewer or wrong key."}, status=401)
        request.session.clear()
        request.session.update({"reviewer": reviewer, "token": secrets.token_urlsafe(24)})
        audit.record("login", reviewer, client=client_of(request))
        return RedirectResponse("/", status_code=303)

    @app.post("/logout")
    def logout(request: Request, token: str = Form("")) -> Response:
        reviewer = reviewer_of(request)
        check_token(request, token)
        audit.record("logout", reviewer, client=client_of(request))
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    @app.get("/", response_class=HTMLResponse)
    def worklist(request: Request, since: str | None = None, gray: str | None = None, ungradable: str | None = None,
                 triage: str | None = None, page: int = 1) -> Response:
        reviewer = reviewer_of(request)
        started = time.perf_counter()
        triage = triage if triage in TRIAGE_ORDER else None
        since = (since or "").strip() or None
        rows = index.select(since=since, gray_zone=_flag(gray), ungradable=_flag(ungradable), triage=triage)
        shown = index.page(rows, page, config.page_size)
        labels = store.labels()
        labelled = dict(zip(labels["request_id"].astype(str), labels["label"].astype(str)))
        filters = {key: value for key, value in (("since", since), ("gray", "1" if _flag(gray) else None),
                                                  ("ungradable", "1" if _flag(ungradable) else None),
                                                  ("triage", triage)) if value}
        audit.record("view_worklist", reviewer, filters={**filters, "page": str(shown.page)}, client=client_of(request))
        counts = {level: 0 for level in TRIAGE_ORDER}
        for row in rows:
            counts[row.triage] = counts.get(row.triage, 0) + 1
        return render(request, "worklist.html", {
            "page": shown, "filters": filters, "labelled": labelled, "counts": counts, "classes": index.classes(),
            "index": index, "render_ms": (time.perf_counter() - started) * 1000})

    @app.get("/case/{request_id}", response_class=HTMLResponse)
    def case(request: Request, request_id: str, saved: str | None = None) -> Response:
        reviewer = reviewer_of(request)
        items = index.case(request_id)
        if not items:
            return render(request, "not_found.html", {}, status=404)
        audit.record("view_case", reviewer, request_id=request_id, client=client_of(request))
        return render(request, "case.html", case_context(request_id, items, saved=_flag(saved), error=None))

    def case_context(request_id: str, items: list, saved: bool, error: str | None) -> dict[str, Any]:
        views = [images.view(request_id, record.item or 0, record.time) if record.event == "prediction" else None
                 for _, record in items]
        return {"request_id": request_id, "items": items, "entry": store.get(request_id),
                "history": store.history(request_id), "classes": index.classes(), "reasons": REASONS,
                "saved": saved, "error": error, "images": views, "cache_ttl_s": config.image_cache_ttl_s,
                "cache_on": images.cache is not None}

    @app.get("/case/{request_id}/{item}/overlay.png")
    def overlay(request: Request, request_id: str, item: int) -> Response:
        reviewer = reviewer_of(request)
        if not any(record.event == "prediction" and (record.item or 0) == item for _, record in index.case(request_id)):
            return render(request, "not_found.html", {}, status=404)
        try:
            explanation = images.explanation(request_id, item)
        except (ExplanationUnavailableError, InputError):
            explanation = None
        if explanation is None:  # cache off, expired, or nothing to explain
            return render(request, "not_found.html", {}, status=404)
        audit.record("view_overlay", reviewer, request_id=request_id, item=item, client=client_of(request))
        return Response(explanation.overlay_png, media_type="image/png",
                        headers={"Cache-Control": "no-store, private"})

    @app.post("/case/{request_id}/label")
    def label(request: Request, request_id: str, label: str = Form(...), token: str = Form("")) -> Response:
        reviewer = reviewer_of(request)
        check_token(request, token)
        if not index.case(request_id):
            return render(request, "not_found.html", {}, status=404)
        try:
            entry = store.add(request_id, label, classes=index.classes() or None, reviewer=reviewer, note=FEEDBACK_NOTE)
        except FeedbackError as error:
            return render(request, "case.html", case_context(request_id, index.case(request_id), saved=False,
                                                             error=str(error)), status=422)
        audit.record("label", reviewer, request_id=request_id, label=entry.label, previous_label=entry.previous_label,
                     client=client_of(request))
        return RedirectResponse(f"/case/{request_id}?saved=1", status_code=303)

    return app


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m review.app", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=None, help="YAML (default configs/review.yaml)")
    parser.add_argument("--audit-log", default=None, help="audit log file or folder (default: the config's)")
    parser.add_argument("--feedback-db", default=None, help="SQLite feedback store (default: the config's)")
    parser.add_argument("--reviewers-file", default=None, help='JSON {"reviewer id": "key"} (default: the config\'s)')
    parser.add_argument("--review-audit-log", default=None)
    parser.add_argument("--image-cache", default=None,
                        help="serving's short-lived image cache folder (default off: no image stored)")
    parser.add_argument("--image-cache-ttl-s", type=int, default=None, help="its TTL (default 3600)")
    parser.add_argument("--bundle", default=None, help="bundle for the overlays (default models/champion)")
    parser.add_argument("--host", default=None)
    parser.add_argument("--port", type=int, default=None)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    import uvicorn

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = ReviewConfig.load(args.config)
    overrides = {name: value for name, value in (
        ("audit_log", args.audit_log), ("feedback_db", args.feedback_db), ("reviewers_file", args.reviewers_file),
        ("review_audit_log", args.review_audit_log), ("host", args.host), ("port", args.port),
        ("image_cache", args.image_cache), ("image_cache_ttl_s", args.image_cache_ttl_s), ("bundle", args.bundle))
        if value is not None}
    config = config.model_copy(update=overrides)
    config = ReviewConfig.model_validate(config.model_dump())
    reviewers = load_reviewers(config.reviewers_file) or (
        ensure_reviewers_file(config.reviewers_file) if config.host in ("127.0.0.1", "localhost") else {})
    if not reviewers:
        print(f"error: no reviewers: write {config.reviewers_file} or set CXR_REVIEWERS=id:key", file=sys.stderr)
        return 2
    print(f"review app on http://{config.host}:{config.port}/  (reviewers: {config.reviewers_file}; "
          f"audit log: {config.audit_log}; feedback: {config.feedback_db})", flush=True)
    uvicorn.run(create_app(config, reviewers), host=config.host, port=config.port, log_level="warning",
                access_log=False)  # the access log would print request ids in URLs; the review audit holds views
    return 0


if __name__ == "__main__":
    sys.exit(main())
