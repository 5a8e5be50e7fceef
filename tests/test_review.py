"""The review app on a real audit log: HTTP behaviour (TestClient) and a real headless Chromium run.

The log is written by serving's own writer (:class:`serving.audit.AuditLog`) from real Predictions
of the shipped champion (with its gate), so the pages read exactly what serving writes.
``REVIEW_SCREENSHOTS=1`` also saves the browser test's pages to docs/review-{worklist,case}.png.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from cxr_core.audit import AuditLogWriter, prediction_record, utc_timestamp
from cxr_core.bundle import load_bundle
from cxr_core.explain import LUNG_ZONES
from cxr_core.image_cache import ImageCache
from monitoring.drift import n_labelled, run_drift
from monitoring.features import load_features
from monitoring.feedback import FeedbackStore, join_labels
from review.app import create_app
from review.audit import read_review_events
from review.config import ReviewConfig
from review.index import TRIAGE_RANK, WorklistIndex
from serving.audit import AuditLog, read_audit_log as read_audit_log_dicts
from tests.conftest import REPO_ROOT, free_port

CHAMPION = REPO_ROOT / "models" / "champion"
REVIEWER, KEY = "dr.test", "test-key-0123456789"
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
OLD_TIME = "2026-01-05T08:00:00.000Z"


@pytest.fixture(scope="module")
def answers(data_dir):
    """Real answers of the champion: 4 test images per class and one blank frame its gate refuses."""
    predictor = load_bundle(CHAMPION)
    images = [path.read_bytes() for label in predictor.manifest.classes
              for path in sorted((data_dir / "test" / label).glob("*.jpg"))[:4]]
    blank = io.BytesIO()
    Image.new("L", (512, 512), 128).save(blank, format="PNG")
    return predictor.predict_many(images + [blank.getvalue()])


def write_log(answers, path: Path, copies: int = 10) -> Path:
    """``copies`` x the answers through serving's writer, one refused request, and old lines (since filter)."""
    log = AuditLog(path)
    for copy in range(copies):
        for number, answer in enumerate(answers):
            log.prediction(answer, request_id=f"req-{copy:02d}-{number:02d}", model_name="cxr-screen", model_version="3",
                           caller_id="hospital-a", latency_ms=25.0, protocol="v2", item=0, n_items=1)
    log.error(request_id="req-refused", model_name="cxr-screen", model_version="3", caller_id="hospital-a",
              latency_ms=1.0, protocol="v1", status=415, code="not_an_image", stage="front")
    AuditLogWriter(path).write(prediction_record(answers[0], request_id="req-old", time=OLD_TIME,
                                                 model_name="cxr-screen", model_version="3", caller_id="hospital-a",
                                                 latency_ms=25.0, protocol="v2", item=0, n_items=1))
    return path


@pytest.fixture()
def stack(answers, tmp_path):
    config = ReviewConfig(audit_log=str(write_log(answers, tmp_path / "logs" / "audit.jsonl")),
                          feedback_db=str(tmp_path / "feedback.db"), review_audit_log=str(tmp_path / "review.log"),
                          reviewers_file=str(tmp_path / "reviewers.json"), page_size=10)
    return config, create_app(config, {REVIEWER: KEY}, secret="test-secret")


def logged_in(app) -> TestClient:
    client = TestClient(app)
    response = client.post("/login", data={"reviewer": REVIEWER, "key": KEY}, follow_redirects=False)
    assert response.status_code == 303
    return client


def token_of(html: str) -> str:
    marker = 'name="token" value="'
    return html.split(marker, 1)[1].split('"', 1)[0]


def rows_of(html: str) -> list[str]:
    return [part.split('"', 1)[0] for part in html.split('data-request-id="')[1:]]


def test_every_page_refuses_without_a_session_and_a_wrong_key(stack):
    config, app = stack
    client = TestClient(app)
    for url in ("/", "/case/req-00-00", "/?page=2"):
        response = client.get(url)
        assert response.status_code == 401 and 'action="/login"' in response.text and "req-00-00" not in response.text
    assert client.post("/case/req-00-00/label", data={"label": "normal", "token": "x"}).status_code == 401
    refused = client.post("/login", data={"reviewer": REVIEWER, "key": "wrong"})
    assert refused.status_code == 401 and "wrong key" in refused.text
    assert client.get("/").status_code == 401
    events = read_review_events(config.review_audit_log)
    assert [e.action for e in events] == ["login_refused"] and "wrong" not in Path(config.review_audit_log).read_text()
    assert len(FeedbackStore(config.feedback_db)) == 0


def test_worklist_is_ordered_by_triage_and_paged(stack, answers):
    config, app = stack
    client = logged_in(app)
    total = 10 * len(answers) + 2
    seen: list[str] = []
    pages = -(-total // config.page_size)
    for page in range(1, pages + 1):
        response = client.get(f"/?page={page}")
        assert response.status_code == 200 and f"page {page} of {pages}" in response.text
        rows = rows_of(response.text)
        assert len(rows) == (config.page_size if page < pages else total - config.page_size * (pages - 1))
        seen += rows
    assert len(seen) == len(set(seen)) == total  # every line once, no overlap between pages
    index = app.state.index
    ranks = [TRIAGE_RANK[index.case(request_id)[0][0].triage] for request_id in seen]
    assert ranks == sorted(ranks) and ranks[0] == TRIAGE_RANK["urgent"] and seen[-1] == "req-refused"
    expected_urgent = sum(answer.decision.triage == "urgent" for answer in answers) * 10 + (
        answers[0].decision.triage == "urgent")  # + req-old
    assert f"urgent {expected_urgent}" in client.get("/").text
    assert client.get(f"/?page={pages + 5}").text.count("data-request-id") == total - config.page_size * (pages - 1)


def test_filters_gray_zone_ungradable_and_since(stack, answers):
    config, app = stack
    client = logged_in(app)
    frame = load_features(config.audit_log).frame  # the drift job's reader, independent of the index
    ungradable = set(frame.loc[frame["gate_code"].notna(), "request_id"])
    assert ungradable, "the blank frame must be refused by the champion's gate"
    gray = set(frame.loc[frame["gray_zone"].fillna("") != "", "request_id"])

    def all_rows(query: str) -> set[str]:
        found, page = [], 1
        while True:
            html = client.get(f"/?{query}&page={page}").text
            found += rows_of(html)
            if 'id="next-page"' not in html:
                return set(found)
            page += 1

    assert all_rows("ungradable=1") == ungradable
    assert all_rows("gray=1") == gray
    assert "req-old" not in all_rows("since=2026-02-01") and "req-old" in all_rows("since=2026-01-01")
    codes = set(frame.loc[frame["gate_code"].notna(), "gate_code"])
    html = client.get("/?ungradable=1").text
    assert all(f"gate: {code}" in html for code in codes)


def test_case_view_labels_and_audits(stack, answers):
    config, app = stack
    client = logged_in(app)
    assert client.get("/case/no-such-request").status_code == 404
    urgent = next(f"req-00-{n:02d}" for n, a in enumerate(answers) if a.decision.triage == "urgent")
    page = client.get(f"/case/{urgent}")
    assert page.status_code == 200 and "Calibrated probabilities" in page.text and "hospital-a" in page.text
    assert client.post(f"/case/{urgent}/label", data={"label": "normal", "token": "forged"}).status_code == 401
    assert client.post(f"/case/{urgent}/label", data={"label": "cat", "token": token_of(page.text)}).status_code == 422
    assert client.post("/case/no-such-request/label", data={"label": "normal", "token": token_of(page.text)}
                       ).status_code == 404
    saved = client.post(f"/case/{urgent}/label", data={"label": "normal", "token": token_of(page.text)})
    assert saved.status_code == 200 and 'id="saved"' in saved.text and 'id="current-label">normal<' in saved.text
    entry = FeedbackStore(config.feedback_db).get(urgent)
    assert entry is not None and (entry.label, entry.reviewer) == ("normal", REVIEWER)
    actions = [(e.action, e.request_id) for e in read_review_events(config.review_audit_log)]
    assert ("view_case", urgent) in actions and ("label", urgent) in actions and actions[0] == ("login", None)
    text = Path(config.review_audit_log).read_text()
    assert KEY not in text and "image" not in text


def test_without_the_cache_a_case_says_its_image_is_not_stored(stack):
    config, app = stack
    assert config.image_cache is None  # the default
    page = logged_in(app).get("/case/req-00-00")
    assert 'id="image-state-0">image not stored (privacy default)<' in page.text and "overlay.png" not in page.text
    assert logged_in(app).get("/case/req-00-00/0/overlay.png").status_code == 404


def test_a_cached_image_is_shown_with_its_overlay_and_lung_zones(answers, tmp_path, data_dir):
    """Serving's cache holds a real radiograph: the case shows its Grad-CAM and lung-zone shares, behind the login."""
    image = sorted((data_dir / "test" / "pneumonia").glob("*.jpg"))[0].read_bytes()
    path = write_log(answers[:1], tmp_path / "audit.jsonl", copies=1)
    answer = load_bundle(CHAMPION).predict_many([image])[0]
    AuditLog(path).prediction(answer, request_id="cached", model_name="cxr-screen", model_version="3",
                              caller_id="hospital-a", latency_ms=1.0, protocol="v2", item=0, n_items=1)
    cache = ImageCache(tmp_path / "image-cache", ttl_s=600)
    cache.put("cached", 0, image)
    config = ReviewConfig(audit_log=str(path), feedback_db=str(tmp_path / "fb.db"), image_cache=str(cache.root),
                          image_cache_ttl_s=600, review_audit_log=str(tmp_path / "review.log"),
                          reviewers_file=str(tmp_path / "r.json"))
    app = create_app(config, {REVIEWER: KEY}, secret="s")
    client = logged_in(app)
    page = client.get("/case/cached")
    assert page.status_code == 200 and 'id="overlay-0" src="/case/cached/0/overlay.png"' in page.text
    zones = page.text.split('id="lung-zones-0"', 1)[1].split("</table>", 1)[0]
    assert all(f"<td>{zone}</td>" in zones for zone in LUNG_ZONES) and "outside chest" in zones
    png = client.get("/case/cached/0/overlay.png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content.startswith(b"\x89PNG") and Image.open(io.BytesIO(png.content)).size == Image.open(
        io.BytesIO(image)).size  # the overlay lies on the image the hospital sent, at its size
    assert "no-store" in png.headers["cache-control"]
    anonymous = TestClient(app).get("/case/cached/0/overlay.png")
    assert anonymous.status_code == 401 and b"PNG" not in anonymous.content
    assert client.get("/case/cached/1/overlay.png").status_code == 404  # no such item
    assert client.get("/case/req-00-00").text.count("image not in the cache") == 1  # never cached
    events = [(e.action, e.request_id, e.item) for e in read_review_events(config.review_audit_log)]
    assert ("view_case", "cached", None) in events and ("view_overlay", "cached", 0) in events
    old = time.time() - 601
    os.utime(cache.path_of("cached", 0), (old, old))
    assert 'id="image-state-0">image expired' in client.get("/case/cached").text
    assert client.get("/case/cached/0/overlay.png").status_code == 404 and not cache.path_of("cached", 0).exists()


def test_a_hospital_case_id_is_shown_only_where_the_line_carries_one(answers, tmp_path):
    path = write_log(answers[:1], tmp_path / "audit.jsonl", copies=1)
    record = prediction_record(answers[0], request_id="with-case", time=utc_timestamp(), model_name="cxr-screen",
                               model_version="3", caller_id="hospital-a", latency_ms=1.0, protocol="v2")
    AuditLogWriter(path).write(record.model_copy(update={"case_id": "H-2026-0042"}))
    config = ReviewConfig(audit_log=str(path), feedback_db=str(tmp_path / "fb.db"),
                          review_audit_log=str(tmp_path / "review.log"), reviewers_file=str(tmp_path / "r.json"))
    client = logged_in(create_app(config, {REVIEWER: KEY}, secret="s"))
    assert 'id="case-id">H-2026-0042<' in client.get("/case/with-case").text
    assert "case H-2026-0042" in client.get("/").text
    assert "Hospital case id" not in client.get("/case/req-00-00").text


def test_index_follows_a_growing_log(answers, tmp_path):
    path = write_log(answers[:2], tmp_path / "audit.jsonl", copies=1)
    index = WorklistIndex(path, check_interval_s=0)
    index.refresh(force=True)
    before = len(index.rows)
    AuditLog(path).prediction(answers[0], request_id="late", model_name="cxr-screen", model_version="3",
                              caller_id=None, latency_ms=1.0, protocol="v1", item=0, n_items=1)
    AuditLog(path).request(request_id="metadata", model_name="cxr-screen", model_version="3", caller_id="h",
                           latency_ms=0.3, protocol="v2", status=200, route="v2.model.metadata")
    with open(path, "a") as handle:
        handle.write("not json\n")
    # the prediction is a case; a metadata request is not (and is not malformed either)
    assert index.refresh() and len(index.rows) == before + 1 and index.malformed == 1
    assert index.case("metadata") == []
    assert index.case("late")[0][1].request_id == "late"


def labelled_reference(answers, path: Path) -> Path:
    """A reference feature table for the drift job: the same real answers with their true labels."""
    classes = load_bundle(CHAMPION, gate=False).manifest.classes
    log = AuditLog(path.with_suffix(".jsonl"))
    for number, answer in enumerate(answers[:-1]):  # the 4-per-class images; not the blank frame
        log.prediction(answer, request_id=f"ref-{number}", model_name="cxr-screen", model_version="3",
                       caller_id=None, latency_ms=1.0, protocol="v2", item=0, n_items=1)
    frame = load_features(path.with_suffix(".jsonl")).frame
    frame["label"] = [name for name in classes for _ in range(4)]
    frame.to_csv(path, index=False)
    return path


# --- the browser ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def review_server(audit_dir: Path, tmp_path: Path, extra: list[str] | None = None):
    """`python -m review.app` for real (uvicorn) on a free port, like `make review`; always stopped."""
    reviewers = tmp_path / "reviewers.json"
    reviewers.write_text(json.dumps({REVIEWER: KEY}))
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("CXR_AUDIT_LOG", None), env.pop("CXR_FEEDBACK_DB", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "review.app", "--audit-log", str(audit_dir), "--feedback-db",
         str(tmp_path / "feedback.db"), "--reviewers-file", str(reviewers), "--review-audit-log",
         str(tmp_path / "review.log"), "--port", str(port), *(extra or [])], cwd=REPO_ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, process.stdout.read().decode()
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "review app did not start in 30 s"
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture()
def served(answers, tmp_path):
    audit_log = write_log(answers, tmp_path / "logs" / "audit.jsonl", copies=3)
    with review_server(audit_log.parent, tmp_path) as url:
        yield url, audit_log, tmp_path / "feedback.db", tmp_path / "review.log"


@pytest.fixture()
def browser(tmp_path):
    assert CHROMIUM.exists() and CHROMEDRIVER.exists(), "run `make chromium` (Debian chromium + chromium-driver)"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium-profile'}",
                 "--window-size=1500,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    driver.implicitly_wait(10)  # a click's navigation finishes after click() returns: wait for the next page
    try:
        yield driver
    finally:
        driver.quit()


def test_a_reviewer_corrects_an_urgent_case_in_chromium(served, browser, answers):
    from selenium.webdriver.common.by import By

    url, audit_log, feedback_db, review_log = served
    shots = os.environ.get("REVIEW_SCREENSHOTS") == "1"
    browser.get(url + "/")
    assert "Reviewer log-in" in browser.page_source  # 401 page: the login form
    browser.find_element(By.ID, "reviewer-id").send_keys(REVIEWER)
    browser.find_element(By.ID, "reviewer-key").send_keys(KEY)
    browser.find_element(By.ID, "login-button").click()
    assert browser.find_element(By.ID, "reviewer").text == REVIEWER
    first = browser.find_elements(By.CSS_SELECTOR, "tr.case-row")[0]
    assert "triage-row-urgent" in first.get_attribute("class")
    request_id = first.get_attribute("data-request-id")
    if shots:
        browser.save_screenshot(str(REPO_ROOT / "docs" / "review-worklist.png"))
    first.find_element(By.CSS_SELECTOR, "a.case-link").click()
    assert browser.find_element(By.ID, "case-request-id").text == request_id
    decided = browser.find_element(By.CSS_SELECTOR, "span.decision").text
    correction = next(name for name in ("normal", "pneumonia", "tuberculosis") if name != decided)
    browser.find_element(By.ID, f"label-{correction}").click()
    assert browser.find_element(By.ID, "saved").text == "Label saved."
    assert browser.find_element(By.ID, "current-label").text == correction
    if shots:
        browser.set_window_size(1500, 1750)  # the whole case, its label buttons and history
        browser.save_screenshot(str(REPO_ROOT / "docs" / "review-case.png"))

    entry = FeedbackStore(feedback_db).get(request_id)
    assert entry is not None and (entry.label, entry.reviewer) == (correction, REVIEWER)
    # the drift job's ECE input: the audit log's feature rows joined with the store's labels
    frame = load_features(audit_log.parent).frame
    joined = join_labels(frame, FeedbackStore(feedback_db).labels())
    row = joined[joined["request_id"] == request_id]
    assert len(row) == 1 and row["label"].iloc[0] == correction and row["decision"].iloc[0] == decided
    assert n_labelled(joined, ["normal", "pneumonia", "tuberculosis"]) == 1
    # ... and `make drift` itself (monitoring.drift.run_drift): the correction is its one confirmed label
    summary = run_drift(audit_log.parent, labelled_reference(answers, feedback_db.parent / "reference.csv"),
                        feedback_db.parent / "drift", feedback_db=feedback_db)
    assert summary["current"]["feedback"]["labels"] == 1 and summary["ece"]["current"]["n_labelled"] == 1
    if shots:
        print("drift after the correction:", json.dumps({"feedback": summary["current"]["feedback"],
                                                         "ece_current": summary["ece"]["current"]}))
    actions = [(e.action, e.reviewer) for e in read_review_events(review_log)]
    assert actions[:2] == [("login", REVIEWER), ("view_worklist", REVIEWER)] and ("label", REVIEWER) in actions


def test_a_reviewer_opens_a_case_served_through_the_stack_with_its_overlay(data_dir, browser, tmp_path, monkeypatch):
    """The whole path: real requests (v1 and v2) through the KServe front and TorchServe serving the shipped
    champion with the image cache on, the worklist in Chromium, an urgent case with its Grad-CAM overlay,
    a correction into the feedback store."""
    from selenium.webdriver.common.by import By

    from serving.client import v1_request, v2_request
    from serving.schemas import MODEL_NAME
    from tests.test_serving import serving_stack

    cache_dir = tmp_path / "image-cache"
    monkeypatch.setenv("CXR_IMAGE_CACHE_DIR", str(cache_dir))  # the TorchServe worker inherits it
    images = [path.read_bytes() for label in ("tuberculosis", "pneumonia", "normal")
              for path in sorted((data_dir / "test" / label).glob("*.jpg"))[:2]]
    with serving_stack(CHAMPION, tmp_path / "stack") as stack:
        sent = []
        for number, image in enumerate(images):
            path, body = ((f"/v1/models/{MODEL_NAME}:predict", v1_request([image])) if number % 2 == 0
                          else (f"/v2/models/{MODEL_NAME}/infer", v2_request([image])))
            response = stack.front(path, json_body=body)
            assert response.status_code == 200, response.text
            sent.append(response.headers["x-request-id"])
        audit_log = stack.audit_log
    predictions = [line for line in read_audit_log_dicts(audit_log) if line["event"] == "prediction"]
    assert sorted(line["request_id"] for line in predictions) == sorted(sent)
    assert len(list(cache_dir.iterdir())) == len(images)  # every answered image, under a hashed name

    audit_dir = tmp_path / "served-logs"
    audit_dir.mkdir()
    (audit_dir / "audit.jsonl").write_bytes(audit_log.read_bytes())
    with review_server(audit_dir, tmp_path, ["--image-cache", str(cache_dir), "--bundle", str(CHAMPION)]) as url:
        browser.get(url + "/")
        browser.find_element(By.ID, "reviewer-id").send_keys(REVIEWER)
        browser.find_element(By.ID, "reviewer-key").send_keys(KEY)
        browser.find_element(By.ID, "login-button").click()
        rows = browser.find_elements(By.CSS_SELECTOR, "tr.case-row")
        assert sorted(row.get_attribute("data-request-id") for row in rows) == sorted(sent)
        first = rows[0]
        assert "triage-row-urgent" in first.get_attribute("class")
        request_id = first.get_attribute("data-request-id")
        first.find_element(By.CSS_SELECTOR, "a.case-link").click()
        assert browser.find_element(By.ID, "case-request-id").text == request_id
        overlay = browser.find_element(By.CSS_SELECTOR, "img.overlay")
        assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", overlay) > 0
        assert browser.find_element(By.ID, "lung-zones-0")
        decided = browser.find_element(By.CSS_SELECTOR, "span.decision").text
        correction = next(name for name in ("normal", "pneumonia", "tuberculosis") if name != decided)
        browser.find_element(By.ID, f"label-{correction}").click()
        assert browser.find_element(By.ID, "saved").text == "Label saved."
    entry = FeedbackStore(tmp_path / "feedback.db").get(request_id)
    assert entry is not None and (entry.label, entry.reviewer) == (correction, REVIEWER)
    frame = load_features(audit_dir).frame
    joined = join_labels(frame, FeedbackStore(tmp_path / "feedback.db").labels())
    assert n_labelled(joined, ["normal", "pneumonia", "tuberculosis"]) == 1
