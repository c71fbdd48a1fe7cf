"""`bertqa serve`, tested from outside: a real server on a free loopback port, real HTTP clients (HF's
InferenceClient included) and the page in headless Chromium. Servers with a fake model (slow, failing or
slow to load) run in this process, for the queue, timeout, error and readiness paths."""

import contextlib
import http.client
import http.server
import json
import logging
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

import pytest
from skips import platform_skip

from bertqa.serve import DEFAULTS, _listen, _parameters, create_app, uvicorn_server
from bertqa.squad.features import TooManyWindows

CONTEXT = (
    "Super Bowl 50 was an American football game to determine the champion of the National Football League "
    "for the 2015 season. The Denver Broncos defeated the Carolina Panthers 24–10 to earn their third Super "
    "Bowl title. The game was played on February 7, 2016, at Levi's Stadium in Santa Clara, California."
)
QUESTIONS = [
    "Who won Super Bowl 50?",
    "Who lost Super Bowl 50?",
    "What was the score?",
    "When was the game played?",
    "Where was the game played?",
    "Which season did it end?",
    "How many Super Bowl titles had Denver won?",
    "In which state is Levi's Stadium?",
]
LIMITS = {"max_body_bytes": 65536, "max_context_chars": 5000}


def call(url, method, path, body=None, headers=None, timeout=30):
    """(status, lower-cased headers, text) of one request; a dict or list body is sent as JSON."""
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {}, encode_chunked=not isinstance(body, bytes))
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read().decode()
    finally:
        conn.close()


def post(url, path, payload):
    status, _, text = call(url, "POST", path, payload)
    assert status == 200, text
    return json.loads(text)


def wait_ready(url, seconds=60.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if call(url, "GET", "/readyz", timeout=5)[0] == 200:
                return
        time.sleep(0.1)
    raise AssertionError(f"{url} not ready after {seconds:g} s")


def metric(text: str, name: str) -> float:
    """A sample's value from Prometheus text (`name` with its labels, exactly as written)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def assert_json_error(status, headers, text, expected):
    assert status == expected, text
    assert headers["content-type"].startswith("application/json")
    body = json.loads(text)
    assert list(body) == ["error"] and isinstance(body["error"], str) and body["error"]
    assert "\n" not in body["error"] and "Traceback" not in text


def _command(model, **options):
    """The `bertqa serve` command on a free port, with `options` as its flags."""
    names = {"timeout_s": "timeout"}
    args = [sys.executable, "-m", "bertqa", "serve", "--model", str(model), "--port", "0"]
    for key, value in options.items():
        args += ["--" + names.get(key, key).replace("_", "-"), str(value)]
    return args


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    """`bertqa serve` on a free loopback port; yields its URL once it is ready. It serves tiny_dir's weights and
    tokenizer from a folder without config.json, given by --config: as a checkpoint without one is served."""
    tmp = tmp_path_factory.mktemp("serve")
    shutil.copytree(tiny_dir, tmp / "model", ignore=shutil.ignore_patterns("config.json"))
    log_path = tmp / "stderr.txt"
    command = _command(tmp / "model", config=tiny_dir / "config.json", max_batch_size=8, max_wait_ms=50, device="cpu",
                       precision="fp32", **LIMITS)  # fmt: skip
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        url, deadline = None, time.monotonic() + 60
        while url is None:
            left = deadline - time.monotonic()
            if left <= 0 or proc.poll() is not None:
                raise AssertionError(f"no startup line; stderr:\n{log_path.read_text()}")
            if select.select([proc.stdout], [], [], left)[0]:
                found = re.search(r" on (http://127\.0\.0\.1:\d+) \(", proc.stdout.readline())
                url = found and found.group(1)
        wait_ready(url)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert "Traceback" not in log_path.read_text(), log_path.read_text()


def test_out_of_file_descriptors_the_server_says_so_in_one_line(tiny_dir, tmp_path):
    """(review) Under a low open-files limit (`ulimit -n 32`), 60 connections at once made asyncio log a traceback
    for each connection of uvicorn's 2,048 backlog, retrying each, and after SIGTERM one per retry: 98,148 lines
    of stderr. One line now, and the server answers once the connections close."""
    try:
        import resource
    except ImportError:
        platform_skip("no resource module (Windows): no open-files limit to set")
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    log_path = tmp_path / "stderr.txt"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(_command(tiny_dir, device="cpu"), stdout=subprocess.PIPE, stderr=log, text=True,
                                preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (32, hard)))  # fmt: skip
    try:
        url = re.search(r" on (http://127\.0\.0\.1:\d+) \(", proc.stdout.readline()).group(1)
        wait_ready(url)
        held = [socket.create_connection((urlsplit(url).hostname, urlsplit(url).port)) for _ in range(60)]
        time.sleep(1.5)
        for connection in held:
            connection.close()
        assert call(url, "GET", "/healthz")[0] == 200
    finally:
        proc.terminate()
        proc.wait(20)
    assert log_path.read_text().splitlines() == [
        "bertqa: new connections wait: Too many open files (open files limit, ulimit -n: 32)"
    ]


def test_health_ready_and_model(server):
    assert call(server, "GET", "/healthz")[0] == 200
    status, _, text = call(server, "GET", "/readyz")
    assert status == 200 and json.loads(text) == {"status": "ready"}
    info = json.loads(call(server, "GET", "/v1/model")[2])
    assert info["config"]["hidden_size"] == 32 and info["config"]["num_hidden_layers"] == 2
    assert info["device"] == "cpu" and info["precision"] == "fp32"
    assert info["server"]["max_batch_size"] == 8


def test_unset_window_parameters_take_the_pipelines_defaults(server):
    info = json.loads(call(server, "GET", "/v1/model")[2])
    assert (info["parameters"]["max_seq_len"], info["parameters"]["doc_stride"]) == (384, 128)
    # max_seq_len alone: doc_stride half of it, as HF's pipeline (it was refused: 128 left no room in 160)
    inputs = {"question": QUESTIONS[0], "context": " ".join([CONTEXT] * 6)}
    alone = post(server, "/", {"inputs": inputs, "parameters": {"max_seq_len": 160}})
    assert alone == post(server, "/", {"inputs": inputs, "parameters": {"max_seq_len": 160, "doc_stride": 80}})


def test_inference_client(server):
    from huggingface_hub import InferenceClient

    client = InferenceClient(model=server)
    answer = client.question_answering(question=QUESTIONS[0], context=CONTEXT)
    assert answer.answer and CONTEXT[answer.start : answer.end] == answer.answer
    assert 0 < answer.score <= 1
    top = client.question_answering(question=QUESTIONS[0], context=CONTEXT, top_k=3)
    assert len(top) == 3 and top[0].answer == answer.answer
    assert [a.score for a in top] == sorted((a.score for a in top), reverse=True)
    assert all(CONTEXT[a.start : a.end] == a.answer for a in top)


def test_hf_list_form_and_batch_form_agree(server):
    one = post(server, "/", {"inputs": {"question": QUESTIONS[1], "context": CONTEXT}})
    assert set(one) == {"answer", "score", "start", "end"}
    listed = post(server, "/", {"inputs": [{"question": q, "context": CONTEXT} for q in QUESTIONS[:3]]})
    top2 = post(server, "/", {"inputs": [{"question": QUESTIONS[1], "context": CONTEXT}], "parameters": {"top_k": 2}})
    batch = post(server, "/v1/answer", {"question": QUESTIONS[:3], "context": CONTEXT, "parameters": {"top_k": 2}})
    assert len(listed) == 3 and len(top2) == 1 and len(top2[0]) == 2
    assert [len(a) for a in batch["answers"]] == [2, 2, 2]
    assert listed[1]["answer"] == one["answer"] == batch["answers"][1][0]["answer"] == top2[0][0]["answer"]
    assert batch["answers"][1][0]["score"] == pytest.approx(one["score"], rel=1e-4)
    # No answer is longer than its window: a larger max_answer_len answers as the window's length does (it was
    # refused with 400, where qa(...) takes it).
    inputs = {"question": QUESTIONS[1], "context": CONTEXT}
    answers = [post(server, "/", {"inputs": inputs, "parameters": {"top_k": 5, "max_seq_len": 96, "max_answer_len": n}})
               for n in (96, 5000)]  # fmt: skip
    assert answers[0] == answers[1] and len(answers[0]) == 5
    params = dict(zip(DEFAULTS, _parameters({"max_answer_len": 5000}, 512), strict=True))
    assert params["max_answer_len"] == params["max_seq_len"] == 384
    assert params["max_question_len"] == 64  # unset: as the window leaves room for it (was 400 at 64 tokens)
    params = dict(zip(DEFAULTS, _parameters({"max_seq_len": 64}, 512), strict=True))
    assert (params["max_seq_len"], params["doc_stride"], params["max_question_len"]) == (64, 31, 30)
    pairs = post(server, "/v1/answer", {"question": QUESTIONS[:2], "context": [CONTEXT, CONTEXT[:120]]})
    assert pairs["answers"][0][0]["answer"] == listed[0]["answer"]
    assert pairs["answers"][1][0]["end"] <= 120


def test_concurrent_requests_are_batched(server):
    def batches(text):  # (batches, batches of one question)
        return metric(text, "bertqa_batch_size_count"), metric(text, 'bertqa_batch_size_bucket{le="1.0"}')

    before = batches(call(server, "GET", "/metrics")[2])
    alone = [post(server, "/v1/answer", {"question": q, "context": CONTEXT})["answers"][0][0] for q in QUESTIONS]
    start = threading.Barrier(16)

    def ask(i):
        start.wait()
        return post(server, "/", {"inputs": {"question": QUESTIONS[i % 8], "context": CONTEXT}})

    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, range(16)))
    for i, answer in enumerate(together):  # batching changes nothing in the answers
        assert answer["answer"] == alone[i % 8]["answer"]
        assert answer["score"] == pytest.approx(alone[i % 8]["score"], rel=1e-4)
    text = call(server, "GET", "/metrics")[2]
    after = batches(text)
    assert (after[0] - after[1]) - (before[0] - before[1]) >= 1, "no batch of more than one question"
    assert metric(text, "bertqa_queue_depth") == 0
    assert metric(text, 'bertqa_requests_total{code="200"}') >= 16 + 8
    assert metric(text, "bertqa_request_duration_seconds_count") >= 16 + 8
    assert "# TYPE bertqa_request_duration_seconds histogram" in text


OK_INPUT = {"question": "Who won?", "context": CONTEXT}
BAD_REQUESTS = {
    "malformed JSON": ("POST", "/", b'{"inputs": ', 400),
    "not UTF-8": ("POST", "/", b'\xff\xfe{"inputs"', 400),
    "not an object": ("POST", "/", [OK_INPUT], 400),
    "nested too deeply": ("POST", "/", b"[" * 60000, 400),
    "inputs missing": ("POST", "/", {"parameters": {}}, 400),
    "inputs a string": ("POST", "/", {"inputs": "Who won?"}, 400),
    "inputs empty": ("POST", "/", {"inputs": []}, 400),
    "question missing": ("POST", "/", {"inputs": {"context": CONTEXT}}, 400),
    "question a number": ("POST", "/", {"inputs": {"question": 3, "context": CONTEXT}}, 400),
    "context blank": ("POST", "/", {"inputs": {"question": "Who won?", "context": "  "}}, 400),
    "unknown field": ("POST", "/", {"inputs": OK_INPUT, "parametres": {}}, 400),
    "parameters a list": ("POST", "/", {"inputs": OK_INPUT, "parameters": [1]}, 400),
    "top_k a string": ("POST", "/", {"inputs": OK_INPUT, "parameters": {"top_k": "3"}}, 400),
    "top_k zero": ("POST", "/", {"inputs": OK_INPUT, "parameters": {"top_k": 0}}, 400),
    "top_k a boolean": ("POST", "/", {"inputs": OK_INPUT, "parameters": {"top_k": True}}, 400),
    "impossible not boolean": ("POST", "/", {"inputs": OK_INPUT, "parameters": {"handle_impossible_answer": 1}}, 400),
    "unknown parameter": ("POST", "/", {"inputs": OK_INPUT, "parameters": {"temperature": 1}}, 400),
    "max_seq_len too long": ("POST", "/", {"inputs": OK_INPUT, "parameters": {"max_seq_len": 4096}}, 400),
    "doc_stride too long": ("POST", "/", {"inputs": OK_INPUT, "parameters": {"doc_stride": 400}}, 400),
    "top_k too large": ("POST", "/", {"inputs": OK_INPUT, "parameters": {"top_k": 5000}}, 400),
    "integer of 5000 digits": ("POST", "/", b'{"inputs": ' + b"9" * 5000 + b"}", 400),
    "v1 question a number": ("POST", "/v1/answer", {"question": ["a", 2], "context": CONTEXT}, 400),
    "v1 one context for two": ("POST", "/v1/answer", {"question": ["a", "b"], "context": [CONTEXT]}, 400),
    "v1 context missing": ("POST", "/v1/answer", {"question": "a"}, 400),
    "v1 empty list": ("POST", "/v1/answer", {"question": [], "context": CONTEXT}, 400),
    "body too large": ("POST", "/", {"inputs": {"question": "Who?", "context": "word " * 14000}}, 413),
    "chunked body too large": ("POST", "/", iter([b" " * 40000] * 2), 413),
    "context too large": ("POST", "/", {"inputs": {"question": "Who?", "context": "word " * 1001}}, 413),
    "v1 context too large": ("POST", "/v1/answer", {"question": "Who?", "context": "word " * 1001}, 413),
    "unknown path": ("GET", "/nope", None, 404),
    "unknown path, POST": ("POST", "/v2/answer", {"inputs": OK_INPUT}, 404),
    "wrong method on /": ("PUT", "/", b"{}", 405),
    "wrong method on /v1/answer": ("GET", "/v1/answer", None, 405),
    "wrong method on /healthz": ("POST", "/healthz", b"", 405),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_is_refused_and_server_stays_up(server, case):
    method, path, body, expected = BAD_REQUESTS[case]
    status, headers, text = call(server, method, path, body)
    assert_json_error(status, headers, text, expected)
    if expected == 405:
        assert method not in headers["allow"]
    if "body too large" in case:  # a chunked one, which has no end, ends its connection; a declared rest is read
        assert (headers.get("connection") == "close") == ("chunked" in case)
    assert call(server, "GET", "/healthz")[0] == 200


def test_a_body_is_json_by_its_type_and_utf_8_and_options_are_hfs(server):
    """A form or text/plain body is a 415 (a web page may post those to the loopback server unasked); a whole
    UTF-16 body is not UTF-8 (json.loads took bytes for UTF-16 and answered); HF's `options` are booleans."""
    body = json.dumps({"inputs": OK_INPUT}).encode()
    for media in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        status, headers, text = call(server, "POST", "/", body, {"Content-Type": media})
        assert_json_error(status, headers, text, 415)
        assert json.loads(text)["error"] == f"Content-Type must be application/json, not {media.split(';')[0]!r}"
    for media in ("application/json; charset=utf-8", "APPLICATION/JSON"):
        assert call(server, "POST", "/", body, {"Content-Type": media})[0] == 200
    assert call(server, "POST", "/", b"\xef\xbb\xbf" + body)[0] == 200  # a UTF-8 byte-order mark is UTF-8
    for encoding in ("utf-16", "utf-32"):
        status, headers, text = call(server, "POST", "/", json.dumps({"inputs": OK_INPUT}).encode(encoding))
        assert_json_error(status, headers, text, 400)
        assert "not UTF-8" in text
    for options, error in ((5, "options must be an object, not a number"),
                           ({"anything": 1}, "unknown field in options: 'anything'"),
                           ({"wait_for_model": "yes"}, "options.wait_for_model must be a boolean, not a string")):  # fmt: skip
        status, headers, text = call(server, "POST", "/", {"inputs": OK_INPUT, "options": options})
        assert_json_error(status, headers, text, 400)
        assert json.loads(text)["error"].startswith(error), text
    assert post(server, "/", {"inputs": OK_INPUT, "options": {"wait_for_model": True, "use_cache": False}})["answer"]
    assert metric(call(server, "GET", "/metrics")[2], 'bertqa_errors_total{code="415"}') >= 3
    # Another site's page (a body with no Content-Type needs no CORS preflight); the server's own page is its host.
    for origin in ("http://evil.example", "null"):
        status, headers, text = call(server, "POST", "/v1/answer", json.dumps(OK_INPUT).encode(), {"Origin": origin})
        assert_json_error(status, headers, text, 403)
        assert json.loads(text)["error"] == f"cross-origin request refused: Origin {origin!r} is not this server"
    own = "http://" + urlsplit(server).netloc
    assert call(server, "POST", "/v1/answer", json.dumps(OK_INPUT).encode(), {"Origin": own})[0] == 200
    # Behind a reverse proxy that rewrites Host (nginx's default), the page's own requests name another host: the
    # browser's Sec-Fetch-Site tells them apart (they were refused), or, from an older browser, X-Forwarded-Host.
    site = "https://qa.example.org"
    for headers, status in (({"Sec-Fetch-Site": "same-origin"}, 200), ({"X-Forwarded-Host": "qa.example.org"}, 200),
                            ({"Sec-Fetch-Site": "cross-site", "X-Forwarded-Host": "qa.example.org"}, 403),
                            ({"Sec-Fetch-Site": "same-site"}, 403), ({}, 403),
                            # Browsers send no Sec-Fetch-Site over plain HTTP (but to localhost): the page's JSON
                            # was refused behind nginx; another site's would have been preflighted, and never sent.
                            ({"Content-Type": "application/json"}, 200),
                            ({"Content-Type": "application/json; charset=utf-8"}, 200),
                            ({"Content-Type": "text/plain"}, 403)):  # fmt: skip
        got = call(server, "POST", "/v1/answer", json.dumps(OK_INPUT).encode(), {"Origin": site, **headers})
        assert got[0] == status, (headers, got)
    assert call(server, "OPTIONS", "/v1/answer", b"", {"Origin": site, "Access-Control-Request-Method": "POST",
                                                      "Access-Control-Request-Headers": "content-type"})[0] == 405  # fmt: skip


def test_still_answers_after_bad_requests(server):
    assert post(server, "/", {"inputs": OK_INPUT})["answer"]
    text = call(server, "GET", "/metrics")[2]
    assert metric(text, 'bertqa_errors_total{code="400"}') >= 1
    assert metric(text, 'bertqa_errors_total{code="500"}') == 0


# --- The page, in headless Chromium -----------------------------------------------------------------------


def _browser_or_skip():
    """Chromium and its driver; missing, the test is skipped (a failure under CI, where .ci/run installs them)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or (
        "/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None
    )
    try:
        import selenium  # noqa: F401
    except ImportError:
        chromium = None
    if not (chromium and driver):
        pytest.skip("needs selenium, chromium and chromedriver (apt-get install chromium chromium-driver)")
    return chromium, driver


@contextlib.contextmanager
def chromium_driver(tmp_path):
    """A headless Chromium under Selenium (the test is skipped without one)."""
    chromium, driver_path = _browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1200,900"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_page_answers_in_headless_chromium(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    with chromium_driver(tmp_path) as driver:
        driver.get(server + "/")
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: "cpu" in d.find_element(By.ID, "model").text)  # /v1/model answered
        question, context = QUESTIONS[0], CONTEXT.replace("–", " to ")
        driver.find_element(By.ID, "context").clear()
        driver.find_element(By.ID, "context").send_keys(context)
        driver.find_element(By.ID, "question").clear()
        driver.find_element(By.ID, "question").send_keys(question)
        top_k = int(driver.find_element(By.ID, "top-k").get_attribute("value"))
        driver.find_element(By.ID, "ask").click()
        mark = wait.until(ec.visibility_of_element_located((By.ID, "highlight")))
        expected = post(
            server, "/v1/answer", {"question": question, "context": context, "parameters": {"top_k": top_k}}
        )
        assert mark.text == expected["answers"][0][0]["answer"]
        candidates = driver.find_elements(By.CSS_SELECTOR, "#candidates li")
        assert len(candidates) == len(expected["answers"][0]) == top_k
        assert "%" in driver.find_element(By.ID, "score").text
        assert driver.find_element(By.ID, "status").text.startswith("Answered in ")

        # Another candidate, picked with the keyboard: it is shown, marked, and keeps the focus (the list is rebuilt).
        from selenium.webdriver.common.keys import Keys

        second = expected["answers"][0][1]
        pick = driver.find_elements(By.CSS_SELECTOR, "#candidates button")[1]
        pick.send_keys(Keys.ENTER)
        wait.until(ec.staleness_of(pick))
        focused = driver.switch_to.active_element
        assert focused.get_attribute("aria-current") == "true" and focused.text == (second["answer"] or "(no answer)")
        if second["answer"]:
            assert driver.find_element(By.ID, "highlight").text == second["answer"]

        # Offsets count code points; JavaScript counts UTF-16 units. An emoji up front tells them apart.
        # (ChromeDriver types only the Basic Multilingual Plane, hence the script.)
        context = "🏈 " + context
        box = driver.find_element(By.ID, "context")
        driver.execute_script("arguments[0].value = arguments[1]", box, context)
        driver.find_element(By.ID, "ask").click()
        wait.until(ec.staleness_of(mark))
        mark = wait.until(ec.visibility_of_element_located((By.ID, "highlight")))
        expected = post(
            server, "/v1/answer", {"question": question, "context": context, "parameters": {"top_k": top_k}}
        )
        assert mark.text == expected["answers"][0][0]["answer"]


@contextlib.contextmanager
def prefix_proxy(target, prefix="/qa", only=None, replace=None):
    """A reverse proxy serving `target` under `prefix`, as a site mounts a service (404 elsewhere, and for paths
    not in `only` if given; `replace` maps paths to the (status, content type, body) it answers in their place);
    yields its URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def forward(self):
            path = self.path[len(prefix) :] or "/"
            if (
                self.path.partition("?")[0] not in (prefix, prefix + "/")
                and not self.path.startswith(prefix + "/")
                or (only is not None and path not in only)
            ):
                self.send_error(404)
                return
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
            # Every header but Host (set to the server's address, as nginx's and Apache's defaults do) and the length.
            kept = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length", "connection")}
            if replace and path in replace:
                status, content_type, text = replace[path]
                headers = {"content-type": content_type}
            else:
                status, headers, text = call(target, self.command, path, body, kept)
            data = text.encode()
            self.send_response(status)
            for name in ("content-type", "retry-after"):
                if name in headers:
                    self.send_header(name, headers[name])
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = forward

        def log_message(self, *args):
            pass

    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{proxy.server_address[1]}{prefix}"
    finally:
        proxy.shutdown()
        proxy.server_close()


def test_page_works_under_a_proxys_path_prefix(server, tmp_path):
    # The page calls the API by relative paths: served as https://site/qa/, it must reach /qa/v1/..., not /v1/...
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    with prefix_proxy(server) as url, chromium_driver(tmp_path) as driver:
        assert call(url.removesuffix("/qa"), "GET", "/v1/model")[0] == 404  # nothing outside the prefix
        driver.get(url)  # as https://site/qa: no slash after the prefix
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: "cpu" in d.find_element(By.ID, "model").text)
        driver.find_element(By.ID, "question").clear()
        driver.find_element(By.ID, "question").send_keys(QUESTIONS[0])
        driver.find_element(By.ID, "ask").click()
        assert wait.until(ec.visibility_of_element_located((By.ID, "highlight"))).text
    # A proxy that routes the page but not the API: a 404 is shown, not waited out as "model loading…".
    with prefix_proxy(server, only={"/"}) as url, chromium_driver(tmp_path) as driver:
        driver.get(url + "/")
        WebDriverWait(driver, 10).until(lambda d: "unavailable" in d.find_element(By.ID, "model").text)
        assert driver.find_element(By.ID, "model").text == "model unavailable: HTTP 404"


def test_page_names_replies_that_are_not_the_apis(server, tmp_path):
    """Something else answering at the API's paths (a proxy's sign-in page, say) is named on the page: not
    "model loading…" forever, nor a JavaScript error about `answers`."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    html = (200, "text/html", "<html><body>Please sign in</body></html>")
    null = (200, "application/json", "null")  # JSON, but nothing in it
    for reply in (html, null):
        with prefix_proxy(server, replace={"/v1/model": reply}) as url, chromium_driver(tmp_path) as driver:
            driver.get(url + "/")
            WebDriverWait(driver, 10).until(lambda d: "unavailable" in d.find_element(By.ID, "model").text)
            assert driver.find_element(By.ID, "model").text == (
                "model unavailable: the reply to /qa/v1/model is not a model's description"
            )
    for reply in (html, null, (200, "application/json", '{"answers": [[1]]}')):
        with prefix_proxy(server, replace={"/v1/answer": reply}) as url, chromium_driver(tmp_path) as driver:
            driver.get(url + "/")
            wait = WebDriverWait(driver, 30)
            wait.until(lambda d: "cpu" in d.find_element(By.ID, "model").text)
            driver.find_element(By.ID, "ask").click()
            wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("class") == "error")
            assert driver.find_element(By.ID, "status").text == (
                "the server's reply (HTTP 200) is not an answer: is something else at this address?"
            )
            assert not driver.find_element(By.ID, "result").is_displayed()


def test_page_shows_a_servers_internal_error_instead_of_loading_for_ever(server, tmp_path):
    """(review) A 500 is the server's own fault, which no retry mends: the page showed "model loading…" and asked
    again every second, for good; a proxy's 502 or 504 (a restart) is still waited out."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    reply = (500, "application/json", '{"error": "internal error"}')
    with prefix_proxy(server, replace={"/v1/model": reply}) as url, chromium_driver(tmp_path) as driver:
        driver.get(url + "/")
        WebDriverWait(driver, 10).until(lambda d: "unavailable" in d.find_element(By.ID, "model").text)
        assert driver.find_element(By.ID, "model").text == "model unavailable: internal error"
    with prefix_proxy(server, replace={"/v1/model": (502, "text/html", "<h1>Bad Gateway</h1>")}) as url:
        with chromium_driver(tmp_path) as driver:
            driver.get(url + "/")
            time.sleep(2.5)  # two retries at least
            assert driver.find_element(By.ID, "model").text == "model loading…"


def test_model_description_of_a_config_with_nan_is_json(tiny_dir, tmp_path):
    """(review) A config.json may hold NaN or Infinity in a key the model does not use (Python's json writes them):
    /v1/model answered 500 (a JSON reply may not hold them), and the page waited for it for good."""
    from bertqa.qa import QuestionAnswerer

    folder = tmp_path / "model"
    shutil.copytree(tiny_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(some_ratio=float("nan"), limits=[float("inf"), -float("inf"), 1.5])
    (folder / "config.json").write_text(json.dumps(config))
    qa = QuestionAnswerer.from_pretrained(folder, device="cpu", precision="fp32")
    with running(create_app(qa)) as (url, _):
        wait_ready(url)
        status, _, text = call(url, "GET", "/v1/model")
        assert status == 200, text
        info = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in the reply"))
        assert info["config"]["some_ratio"] == "NaN"
        assert info["config"]["limits"] == ["Infinity", "-Infinity", 1.5]
        assert info["config"]["hidden_size"] == 32


def test_page_shows_a_model_that_failed_to_load(tmp_path):
    """A failed load is for good (503 without Retry-After): the page says so instead of "model loading…" forever."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def load():
        raise ValueError("model.safetensors: truncated")

    with running(create_app(load)) as (url, _), chromium_driver(tmp_path) as driver:
        driver.get(url + "/")
        WebDriverWait(driver, 10).until(lambda d: "unavailable" in d.find_element(By.ID, "model").text)
        assert driver.find_element(By.ID, "model").text == (
            "model unavailable: model failed to load: model.safetensors: truncated"
        )


# --- In-process servers with a fake model: queue, timeout, bugs, readiness --------------------------------


class Panic(BaseException):
    """As pyo3's PanicException, which a Rust panic in `tokenizers` raises: no Exception."""


class FakeQA:
    """Answers with the context's first word after `delay` seconds; the question "boom" is a bug, "bad value" a
    bug raising ValueError, "huge" runs out of memory, "panic" panics, "windows" needs too many windows. `asked`:
    every question that reached the model."""

    config = SimpleNamespace(max_position_embeddings=512, to_dict=dict)
    precision = SimpleNamespace(name="fp32", describe=lambda: "fp32")
    device, name = "cpu", "fake"

    def __init__(self, delay=0.0):
        self.delay = delay
        self.started = threading.Event()  # set when a batch reaches the model
        self.asked = []

    def answer_pairs(self, pairs, top_k, *rest):
        self.asked += [q for q, _ in pairs]
        self.started.set()
        time.sleep(self.delay)
        if any(q == "boom" for q, _ in pairs):
            raise RuntimeError("secret detail of a bug")
        if any(q == "bad value" for q, _ in pairs):
            raise ValueError("secret detail of a bug in numpy")
        if any(q == "windows" for q, _ in pairs):
            raise TooManyWindows("these inputs need 9000 windows, more than the limit of 2048")
        if any(q == "panic" for q, _ in pairs):
            raise Panic("the tokenizer panicked")
        if any(q == "stop" for q, _ in pairs):
            raise StopIteration("a generator ran dry")
        if any(q == "huge" for q, _ in pairs):
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 98765432100 bytes.")
        return [
            [{"score": 1.0, "start": 0, "end": len(c.split()[0]), "answer": c.split()[0]}] * top_k for _, c in pairs
        ]


@contextlib.contextmanager
def running(app, grace_s=5.0):
    """The app served as `bertqa serve` serves it, on a free port, in a thread; yields its URL and the server (its
    should_exit shuts it down as SIGTERM does)."""
    sock = _listen("127.0.0.1", 0)
    server = uvicorn_server(app, grace_s)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", server
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def test_shutdown_answers_what_it_will_not_finish_with_a_json_503():
    # uvicorn waits grace_s for the requests in flight, then cancels them into its own plain-text 500: those still
    # unanswered a second before that, queued or in the model, get a 503 to retry elsewhere.
    def payload(top_k):
        return {"inputs": {"question": "Who?", "context": "Denver won."}, "parameters": {"top_k": top_k}}

    for delay, expected in ((0.1, 200), (4.0, 503)):
        fake = FakeQA()
        app = create_app(fake, max_batch_size=2, max_wait_ms=300)  # (an app's lifespan runs once)
        batcher = app.state.server.batcher
        with running(app, grace_s=2.0) as (url, server), ThreadPoolExecutor(3) as pool:
            wait_ready(url)
            fake.delay = delay
            fake.started.clear()
            # One batch of two parameter groups (the second waits for the first), and a request queued behind it.
            batch = [pool.submit(call, url, "POST", "/", payload(k)) for k in (1, 2)]
            assert fake.started.wait(10)
            queued = pool.submit(call, url, "POST", "/", payload(1))
            deadline = time.monotonic() + 10
            while batcher.depth() < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert batcher.depth() == 1
            t0 = time.monotonic()
            server.should_exit = True
            for status, headers, text in (*(f.result() for f in batch), queued.result()):
                if expected == 200:
                    assert status == 200 and "Denver" in text
                else:
                    assert_json_error(status, headers, text, 503)
                    assert headers["retry-after"] == "1" and time.monotonic() - t0 < 2.0


def test_a_second_ctrl_c_answers_what_it_will_not_finish_with_a_json_503(caplog):
    """(review) uvicorn forces the exit at a second Ctrl-C within the grace period: the requests in flight were
    cancelled into its plain-text 500s, a traceback logged for each. Now they are refused first, with the 503."""
    import signal

    fake = FakeQA(delay=4.0)
    app = create_app(fake, max_batch_size=1, max_wait_ms=0)
    payload = {"inputs": {"question": "Who?", "context": "Denver won."}}
    with running(app, grace_s=5.0) as (url, server), ThreadPoolExecutor(2) as pool:
        wait_ready(url)
        fake.started.clear()
        answering = pool.submit(call, url, "POST", "/", payload)
        assert fake.started.wait(10)
        t0 = time.monotonic()
        server.handle_exit(signal.SIGINT, None)  # (what the signal handler calls: here the server runs in a thread)
        time.sleep(0.3)
        server.handle_exit(signal.SIGINT, None)
        status, headers, text = answering.result()
        assert_json_error(status, headers, text, 503)
        assert headers["retry-after"] == "1" and time.monotonic() - t0 < 2.0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_full_queue_is_503_with_retry_after():
    fake = FakeQA(delay=0.3)
    app = create_app(fake, max_batch_size=1, max_wait_ms=0, max_queue=2)
    with running(app) as (url, _):
        wait_ready(url)
        payload = {"inputs": {"question": "Who?", "context": "Denver won."}}
        refused_before = metric(call(url, "GET", "/metrics")[2], 'bertqa_errors_total{code="503"}')
        with ThreadPoolExecutor(8) as pool:
            # One request in the model first, so that the other seven meet a busy worker and a queue of two
            # (on a loaded machine all eight could otherwise queue before the worker takes the first).
            fake.started.clear()
            first = pool.submit(call, url, "POST", "/", payload)
            assert fake.started.wait(10)
            results = [first.result(), *pool.map(lambda _: call(url, "POST", "/", payload), range(7))]
        statuses = sorted(status for status, _, _ in results)
        assert statuses.count(200) >= 3 and statuses.count(503) >= 1 and set(statuses) == {200, 503}
        for status, headers, text in results:
            if status == 503:
                assert_json_error(status, headers, text, 503)
                assert int(headers["retry-after"]) >= 1
        assert post(url, "/", payload)["answer"] == "Denver"
        text = call(url, "GET", "/metrics")[2]
        assert metric(text, 'bertqa_errors_total{code="503"}') - refused_before == statuses.count(503)
        assert metric(text, "bertqa_queue_limit") == 2


def test_timeout_is_504_and_server_recovers():
    fake = FakeQA()
    app = create_app(fake, max_wait_ms=0, timeout_s=0.3)
    with running(app) as (url, _):
        wait_ready(url)
        fake.delay = 1.0
        payload = {"inputs": {"question": "Who?", "context": "Denver won."}}
        assert_json_error(*call(url, "POST", "/", payload), 504)
        fake.delay = 0.0
        time.sleep(1.0)  # the timed-out batch still finishes in the worker
        assert post(url, "/", payload)["answer"] == "Denver"


def test_a_timed_out_request_stops_its_work_for_those_queued_behind_it(tiny_dir):
    from bertqa.qa import QuestionAnswerer

    qa = QuestionAnswerer.from_pretrained(tiny_dir, device="cpu", precision="fp32", batch_size=2)
    calls, forward = [], qa.model.forward

    def slow(*args, **kwargs):  # at least 50 ms a batch of 2 windows
        calls.append(len(kwargs.get("input_ids", args[0] if args else ())))
        time.sleep(0.05)
        return forward(*args, **kwargs)

    with running(create_app(qa, max_wait_ms=0, timeout_s=1.0)) as (url, _):
        wait_ready(url)
        qa.model.forward = slow
        parameters = {"max_seq_len": 64, "doc_stride": 8, "max_question_len": 16}
        body = {"inputs": {"question": QUESTIONS[0], "context": " ".join([CONTEXT] * 20)}, "parameters": parameters}
        assert_json_error(*call(url, "POST", "/", body), 504)  # about 140 windows: 70 batches, 3.5 s at least
        time.sleep(0.5)  # the batch in flight at the timeout ends; none starts after it
        stopped = len(calls)
        assert stopped < 50
        # Answered within its own timeout: the 504's work no longer runs ahead of it (it used to, for 2.5 s more).
        assert post(url, "/", {"inputs": {"question": QUESTIONS[0], "context": CONTEXT}})["answer"]
        assert calls[stopped:] == [1]  # one batch since: the second request's one window


@pytest.mark.parametrize("question, status, error, logged", [
    ("boom", 500, "internal error", "secret detail of a bug"),  # a bug: no details reach the client
    ("bad value", 500, "internal error", "secret detail of a bug in numpy"),  # also as a ValueError
    ("windows", 400, "these inputs need 9000 windows, more than the limit of 2048", ""),  # the request's own
    ("panic", 500, "internal error", "Panic: the tokenizer panicked"),  # no Exception: the batcher outlives it
    ("huge", 503, "out of memory answering this request; fewer questions or shorter contexts may fit",
     "can't allocate memory"),
])  # fmt: skip
def test_a_failed_request_gets_its_status_and_spares_its_batch(caplog, question, status, error, logged):
    app = create_app(FakeQA(), max_batch_size=8, max_wait_ms=300)
    with running(app) as (url, _):
        wait_ready(url)
        with ThreadPoolExecutor(2) as pool:  # batched together: the failure must not fail the good request
            bad, good = pool.map(
                lambda q: call(url, "POST", "/v1/answer", {"question": q, "context": "Denver won."}), [question, "ok"]
            )
        assert_json_error(*bad, status)
        assert json.loads(bad[2]) == {"error": error}
        assert status != 503 or int(bad[1]["retry-after"]) >= 1
        assert good[0] == 200 and json.loads(good[2])["answers"] == [
            [{"score": 1.0, "start": 0, "end": 6, "answer": "Denver"}]
        ]
        # One batch of two (it failed), then each alone; a batch refused by its windowing never reached the model.
        text = call(url, "GET", "/metrics")[2]
        ran = 0 if question == "windows" else 1
        assert (
            metric(text, 'bertqa_batch_size_bucket{le="2.0"}') - metric(text, 'bertqa_batch_size_bucket{le="1.0"}')
            == ran
        )
        assert (
            metric(text, "bertqa_batch_size_count")
            == metric(text, "bertqa_batch_duration_seconds_count")
            == 1 + 2 * ran
        )
    assert logged in caplog.text and ("Traceback" in caplog.text) == (status == 500)  # out of memory: one line
    assert status != 400 or not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_body_that_does_not_come_is_408_within_the_timeout():
    app = create_app(FakeQA(), max_wait_ms=0, timeout_s=0.5)
    with running(app) as (url, _):
        wait_ready(url)
        parts = urlsplit(url)
        with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
            sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"inp\r\n")  # fmt: skip
            start = time.monotonic()
            reply = http.client.HTTPResponse(sock)
            reply.begin()
            assert reply.status == 408 and time.monotonic() - start < 5 and reply.getheader("connection") == "close"
            assert json.loads(reply.read()) == {"error": "request body not received within 0.5 s (--timeout)"}
        assert post(url, "/", {"inputs": {"question": "Who?", "context": "Denver won."}})["answer"] == "Denver"


def test_an_address_that_cannot_be_listened_on_is_named():
    with _listen("127.0.0.1", 0) as taken:
        port = taken.getsockname()[1]
        for host, where in (("127.0.0.1", port), ("nosuch.invalid", 0)):  # in use; a host name that resolves nowhere
            with pytest.raises(OSError, match=rf"^cannot listen on {re.escape(host)}:{where}: \S"):
                _listen(host, where)


@pytest.mark.parametrize("windows", [False, True])
def test_a_port_in_use_is_reused_only_where_that_takes_no_live_servers_port(monkeypatch, windows):
    """(review) SO_REUSEADDR was set everywhere: on Windows it lets a second server bind a port another server
    listens on (and the two share its requests), where POSIX allows only a port left in TIME_WAIT."""
    import bertqa.serve

    monkeypatch.setattr(bertqa.serve, "REUSE_ADDRESS", not windows, raising=False)
    with _listen("127.0.0.1", 0) as sock:
        assert bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)) == (not windows)


@pytest.mark.parametrize("error", [ValueError("model.safetensors: truncated"), Panic("the tokenizer panicked")])
def test_a_model_that_failed_to_load_is_503_without_retry_after(error):
    """A Rust panic in the tokenizer (no Exception) too: it left the server "loading" for ever."""
    failures = []

    def load():
        raise error

    with running(create_app(load, on_load_error=failures.append)) as (url, _):
        deadline = time.monotonic() + 10
        while (reply := call(url, "GET", "/readyz"))[2].find("failed") < 0:
            assert time.monotonic() < deadline, reply
            time.sleep(0.05)
        status, headers, text = call(url, "POST", "/", {"inputs": {"question": "Who?", "context": "Denver won."}})
        assert_json_error(status, headers, text, 503)
        assert json.loads(text)["error"] == f"model failed to load: {error}"
        assert "retry-after" not in headers  # for good: a client told to retry in 1 s would retry for ever
    assert len(failures) == 1 and str(error) in str(failures[0]) and isinstance(failures[0], Exception)


def test_a_request_whose_client_hung_up_stops_counting_and_is_not_answered():
    """It used to wait in the queue, count towards the 503 limit and be answered in full, for nobody."""
    fake = FakeQA()
    app = create_app(fake, max_batch_size=1, max_wait_ms=0)

    def depth():
        return metric(call(url, "GET", "/metrics")[2], "bertqa_queue_depth")

    with running(app) as (url, _):
        wait_ready(url)
        fake.delay = 2.0
        fake.started.clear()
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(call, url, "POST", "/v1/answer", {"question": "first", "context": "Denver won."})
            assert fake.started.wait(10)  # in the model for a second: the next request queues
            body = json.dumps({"question": "gone", "context": "Denver won."}).encode()
            parts = urlsplit(url)
            with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
                sock.sendall(b"POST /v1/answer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
                deadline = time.monotonic() + 5
                while depth() < 1:
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
            deadline = time.monotonic() + 3  # hung up: out of the queue at once, not after the 30 s timeout
            while depth() > 0:
                assert time.monotonic() < deadline, "a request whose client left still counts in the queue"
                time.sleep(0.01)
            assert first.result()[0] == 200
        fake.delay = 0.0
        assert post(url, "/v1/answer", {"question": "next", "context": "Denver won."})["answers"]
        assert "gone" not in fake.asked and fake.asked[-2:] == ["first", "next"]
        assert metric(call(url, "GET", "/metrics")[2], 'bertqa_errors_total{code="499"}') == 1


def test_a_request_that_hung_up_while_an_earlier_group_of_its_batch_ran_is_not_answered():
    """A batch of two parameter groups runs one group after the other: a request of the second whose client left
    meanwhile used to go through the model with its group."""
    fake = FakeQA()
    app = create_app(fake, max_batch_size=8, max_wait_ms=1000)

    def ask(question, top_k):
        return {"question": question, "context": "Denver won.", "parameters": {"top_k": top_k}}

    def queued(n):  # in this order, within the batch's 1,000 ms
        deadline = time.monotonic() + 0.8
        while app.state.server.batcher.depth() < n:
            assert time.monotonic() < deadline
            time.sleep(0.002)

    with running(app) as (url, _), ThreadPoolExecutor(2) as pool:
        wait_ready(url)
        fake.delay, fake.asked = 1.5, []
        fake.started.clear()
        slow = pool.submit(call, url, "POST", "/v1/answer", ask("slow", 1))
        queued(1)
        body = json.dumps(ask("gone", 2)).encode()
        parts = urlsplit(url)
        with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
            sock.sendall(b"POST /v1/answer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
            queued(2)
            live = pool.submit(call, url, "POST", "/v1/answer", ask("live", 2))
            assert fake.started.wait(10) and fake.asked == ["slow"]  # the first group runs,
            taken = app.state.server.batcher.taken
            assert [job.pairs[0][0] for job in taken] == ["slow", "gone", "live"]  # the three in one batch
        deadline = time.monotonic() + 5
        while metric(call(url, "GET", "/metrics")[2], 'bertqa_errors_total{code="499"}') < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert slow.result()[0] == live.result()[0] == 200
    assert fake.asked == ["slow", "live"]


def test_a_model_raising_stop_iteration_fails_its_request_not_the_server():
    """asyncio cannot hand a StopIteration to the awaiting request: the batcher waited for ever, and every later
    request timed out."""
    app = create_app(FakeQA(), max_batch_size=1, max_wait_ms=0, timeout_s=5.0)
    with running(app) as (url, _):
        wait_ready(url)
        assert 'bertqa_errors_total{code="499"} 0' in call(url, "GET", "/metrics")[2]  # from zero, as the others
        status, headers, text = call(url, "POST", "/v1/answer", {"question": "stop", "context": "Denver won."})
        assert_json_error(status, headers, text, 500)
        assert post(url, "/v1/answer", {"question": "next", "context": "Denver won."})["answers"]


def test_a_body_still_coming_at_shutdown_is_a_json_503(monkeypatch):
    """uvicorn cancels what is left when its grace period ends, into its own plain-text 500: a request still
    sending its body gets the 503 to retry elsewhere, as queued ones do."""
    import bertqa.serve

    reading, read_json = threading.Event(), bertqa.serve._read_json

    async def noted(*args):
        reading.set()
        return await read_json(*args)

    monkeypatch.setattr(bertqa.serve, "_read_json", noted)
    app = create_app(FakeQA(), timeout_s=30.0)
    with running(app, grace_s=3.0) as (url, server):
        wait_ready(url)
        parts = urlsplit(url)
        with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
            sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"inp\r\n")  # fmt: skip
            assert reading.wait(10)  # the server has the request, and waits for the rest of its body
            t0 = time.monotonic()
            server.should_exit = True
            reply = http.client.HTTPResponse(sock)
            reply.begin()
            assert reply.status == 503 and time.monotonic() - t0 < 3.0  # before uvicorn would cancel it
            assert reply.getheader("retry-after") == "1" and reply.getheader("connection") == "close"
            assert json.loads(reply.read()) == {"error": "server shutting down; retry"}


def test_nan_logits_are_a_500_that_says_so_and_spare_their_batch(zebra_nan_dir, caplog):
    from bertqa.qa import QuestionAnswerer

    qa = QuestionAnswerer.from_pretrained(zebra_nan_dir, device="cpu", precision="fp32")
    app = create_app(qa, max_batch_size=8, max_wait_ms=300)
    with running(app) as (url, _):
        wait_ready(url)
        with ThreadPoolExecutor(2) as pool:  # batched together: only the request with "zebra" fails
            bad, good = pool.map(
                lambda c: call(url, "POST", "/v1/answer", {"question": "Who won?", "context": c}),
                ["The zebra won.", "Denver won."],
            )
        assert_json_error(*bad, 500)
        assert json.loads(bad[2])["error"].startswith("the model's logits are NaN or infinite for window 0")
        assert good[0] == 200 and json.loads(good[2])["answers"][0][0]["answer"]
        text = call(url, "GET", "/metrics")[2]  # the two were one batch (it failed), then each ran alone
        assert (
            metric(text, 'bertqa_batch_size_bucket{le="2.0"}') - metric(text, 'bertqa_batch_size_bucket{le="1.0"}') == 1
        )
    assert "NaN or infinite" in caplog.text


@pytest.mark.parametrize("settings, message", [
    ({"max_wait_ms": float("inf")}, "max_wait_ms (--max-wait-ms) must be >= 0 and under the timeout (30 s)"),
    ({"max_wait_ms": 40_000}, "max_wait_ms (--max-wait-ms) must be >= 0 and under the timeout (30 s)"),
    ({"max_wait_ms": float("nan")}, "max_wait_ms (--max-wait-ms) must be >= 0"),
    ({"timeout_s": float("inf")}, "timeout_s (--timeout) must be a positive number of seconds, got inf"),
    ({"timeout_s": 0}, "timeout_s (--timeout) must be a positive number of seconds, got 0"),
    ({"max_batch_size": 0}, "max_batch_size (--max-batch-size) must be a positive integer, got 0"),
    ({"max_body_bytes": -1}, "max_body_bytes (--max-body-bytes) must be a positive integer, got -1"),
])  # fmt: skip
def test_bad_server_settings_are_refused_naming_the_flag(settings, message):
    # A batch that waits past the timeout (or forever) would turn every lone request into a 504.
    with pytest.raises(ValueError, match=re.escape(message)):
        create_app(FakeQA(), **{"max_wait_ms": 5.0, "timeout_s": 30.0, **settings})


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--port", "70000"], "--port 70000: must be between 0 and 65535"),
        (["--host", ""], "--host '': empty; name an address (127.0.0.1, or 0.0.0.0 for every interface)"),
        (["--threads", "0"], "--threads must be a positive integer, got 0"),
        (["--threads", "3000000000"], "--threads 3000000000: more than the CPUs this process may use (2)"),
        # (review) Under taskset or a batch scheduler's allocation, the CPUs the process may use, not the machine's
        (["--threads", "3"], "--threads 3: more than the CPUs this process may use (2)"),
    ],
)
def test_bad_serve_flags_are_named_before_serves_imports(monkeypatch, capsys, flags, message):
    # Checked first, in no time: without the serve extra this was the install hint instead.
    from bertqa.cli import main

    monkeypatch.setattr(os, "cpu_count", lambda: 64)  # (a node of 64, of which this process is given 2)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.delattr(os, "process_cpu_count", raising=False)
    monkeypatch.setitem(sys.modules, "bertqa.serve", None)  # as if starlette and uvicorn were not installed
    assert main(["serve", "--model", "nowhere", *flags]) == 1
    assert capsys.readouterr().err.strip() == f"bertqa: error: {message}"


def test_a_question_answerer_given_without_a_window_limit_gets_the_servers():
    """A tiny doc_stride over a long context multiplies the windows; a QuestionAnswerer made by the caller
    (max_windows None) is bounded as `bertqa serve`'s own is."""
    fake, bounded = FakeQA(), FakeQA()
    fake.max_windows, bounded.max_windows = None, 100
    for qa, expected in ((fake, 64 * 40), (bounded, 100)):
        with running(create_app(qa, max_batch_size=40)) as (url, _):
            wait_ready(url)
        assert qa.max_windows == expected


def test_ready_only_after_loading():
    loaded = threading.Event()

    def load():
        loaded.wait(30)
        return FakeQA()

    with running(create_app(load)) as (url, _):
        assert call(url, "GET", "/healthz")[0] == 200  # alive at once
        assert_json_error(*call(url, "GET", "/readyz"), 503)
        status, headers, text = call(url, "POST", "/", {"inputs": {"question": "Who?", "context": "Denver won."}})
        assert_json_error(status, headers, text, 503)
        assert headers["retry-after"] == "1"
        assert metric(call(url, "GET", "/metrics")[2], "bertqa_ready") == 0
        loaded.set()
        wait_ready(url, 10)
        assert post(url, "/", {"inputs": {"question": "Who?", "context": "Denver won."}})["answer"] == "Denver"
        assert metric(call(url, "GET", "/metrics")[2], "bertqa_ready") == 1


def test_serve_warns_of_an_emulated_precision_once(tiny_dir, monkeypatch, caplog, capsys):
    """serve resolves the precision for its start-up line, then loads the model: an emulated bf16 was warned of
    twice (the precision's name, not the resolved one, was passed on to the load)."""
    import bertqa.runtime
    import bertqa.serve

    monkeypatch.setattr(bertqa.runtime, "native_precision", lambda *args: (False, "this CPU (mocked) lacks bf16"))
    loaded = []

    class Server:  # uvicorn's, reduced to the load it starts
        def __init__(self, app):
            self.app = app

        def run(self, sockets):
            loaded.append(self.app.state.server.loader())

    monkeypatch.setattr(bertqa.serve, "uvicorn_server", Server)
    with caplog.at_level("WARNING", logger="bertqa"):
        bertqa.serve.serve(tiny_dir, port=0, device="cpu", precision="bf16")
    assert "precision bf16" in capsys.readouterr().out and loaded[0].precision.name == "bf16"
    warned = [r.getMessage() for r in caplog.records]
    assert warned.count("this CPU (mocked) lacks bf16: bf16 will be emulated, far slower than fp32") == 1, warned


@pytest.mark.parametrize(
    "missing, hint", [("starlette", True), ("uvicorn", True), ("anyio", True), ("h11", True), ("bertqa.qa", False)]
)
def test_only_a_missing_serve_extra_gets_the_install_hint(monkeypatch, capsys, missing, hint):
    """(review) Any import error was blamed on starlette and uvicorn: a broken torch was told to install them. A
    module they need (anyio, starlette's) is theirs: reinstalling the extra mends it. h11 (uvicorn's HTTP parser,
    imported only as the server starts) was found missing after the model had loaded, as an internal error."""
    from bertqa.cli import main

    extra = ("starlette", "uvicorn")
    for name in [name for name in sys.modules if name == "bertqa.serve" or name.partition(".")[0] in extra]:
        monkeypatch.delitem(sys.modules, name)  # (imported again, from scratch)
    for name in {missing, *(name for name in sys.modules if name.startswith(missing + "."))}:
        monkeypatch.setitem(sys.modules, name, None)  # (what an install without it looks like)
    before = set(sys.modules)
    try:
        assert main(["serve", "--model", "nowhere"]) == 1
    finally:  # (modules the failed import made anew must not stand beside the ones put back after the test)
        for name in set(sys.modules) - before:
            del sys.modules[name]
    err = capsys.readouterr().err
    assert ("pip install 'bertqa[serve]'" in err) == hint and missing in err and err.count("\n") == 1, err


def test_requests_that_stop_waiting_leave_the_queue_and_let_go_of_their_text():
    """A request whose client hung up (or that timed out) stayed queued until the front reached it, holding its
    text (up to 1 MB each: 400 hung-up requests during one long batch grew a server by 530 MB) and counted again by
    every submit's depth() (quadratic in them)."""
    import asyncio

    from bertqa.serve import Batcher, Metrics

    async def scenario():
        batcher = Batcher(max_batch_size=4, max_wait_s=0.01, max_queue=8, metrics=Metrics())
        params = tuple(DEFAULTS.values())
        live = batcher.submit([("q", "c")], params)
        gone = []
        for _ in range(1000):  # each within the queue's limit (8) only if those before it stopped counting
            job = batcher.submit([("q", "x" * 1000)] * 7, params)
            job.future.cancel()
            batcher.withdraw(job)
            gone.append(job)
        assert batcher.depth() == 1 and len(batcher.queue) <= 2 * 1 + 32 + 1
        assert all(job.pairs == [] for job in gone)
        assert batcher._take() == [live] and batcher.depth() == 0
        batcher.withdraw(live)  # answered: taken into a batch, its pairs stay for the batch to slice its answers by
        assert live.pairs == [("q", "c")] and batcher.depth() == 0
        batcher.worker.shutdown()

    asyncio.run(scenario())


class BatchedFakeQA(FakeQA):
    """FakeQA that also records how many questions each model call had."""

    def __init__(self, delay=0.0):
        super().__init__(delay)
        self.batches = []

    def answer_pairs(self, pairs, top_k, *rest):
        self.batches.append(len(pairs))
        return super().answer_pairs(pairs, top_k, *rest)


def test_requests_of_several_questions_batched_together_each_get_their_own_answers():
    """(mutation review) The answers of one model call are cut back into requests by their question counts."""
    fake = BatchedFakeQA()
    app = create_app(fake, max_batch_size=5, max_wait_ms=3000)
    payloads = [{"question": ["q", "q"], "context": ["Alpha won.", "Beta won."]},
                {"question": ["q", "q", "q"], "context": ["Gamma won.", "Delta won.", "Omega won."]}]  # fmt: skip
    with running(app) as (url, _), ThreadPoolExecutor(2) as pool:
        wait_ready(url)
        fake.batches.clear()
        results = list(pool.map(lambda payload: post(url, "/v1/answer", payload), payloads))
    assert fake.batches == [5]  # one model call for both
    assert [[answers[0]["answer"] for answers in r["answers"]] for r in results] == [
        ["Alpha", "Beta"],
        ["Gamma", "Delta", "Omega"],
    ]


def test_each_request_limit_takes_what_is_at_it_and_refuses_one_past_it_naming_it():
    """(mutation review) The limits are inclusive, and what is refused is named: a request of more questions than
    the queue holds is a 413 (a 503 would have its client retry for ever)."""
    limit = 400
    app = create_app(FakeQA(), max_queue=2, max_body_bytes=limit, max_context_chars=11)

    def body(size):  # a JSON request of exactly `size` bytes
        raw = json.dumps({"inputs": {"question": "Who?", "context": "Denver won."}}).encode()
        return raw[:-1] + b" " * (size - len(raw)) + b"}"

    with running(app) as (url, _):
        wait_ready(url)
        assert call(url, "POST", "/", body(limit))[0] == 200
        assert call(url, "POST", "/", iter([body(limit)]))[0] == 200  # chunked: no length up front
        for sent in (body(limit + 1), iter([body(limit + 1)])):
            status, headers, text = call(url, "POST", "/", sent)
            assert_json_error(status, headers, text, 413)
            assert json.loads(text)["error"] == f"request body exceeds the limit of {limit} bytes (--max-body-bytes)"
        questions = {"question": ["Who?"] * 2, "context": "Denver won."}
        assert len(post(url, "/v1/answer", questions)["answers"]) == 2
        for payload, status, error in (
            ({**questions, "question": ["Who?"] * 3}, 413,
             "3 questions in one request exceed the limit of 2 (--max-queue)"),
            ({"question": "Who?", "context": "Denver won!!"}, 413,
             "a context of 12 characters exceeds the limit of 11 (--max-context-chars)"),
            ({**questions, "parameters": {"top_k": 101}}, 400, "parameters.top_k 101 exceeds the limit of 100"),
            ({"question": ["Who?", 3], "context": "Denver won."}, 400, "question[1] must be a string, not a number"),
        ):  # fmt: skip
            got = call(url, "POST", "/v1/answer", payload)
            assert_json_error(*got, status)
            assert json.loads(got[2])["error"] == error
        assert [len(a) for a in post(url, "/v1/answer", {**questions, "parameters": {"top_k": 100}})["answers"]] == [
            100,
            100,
        ]
        got = call(url, "POST", "/", {"inputs": [{"question": "Who?", "context": "Denver won."}, {"context": "x"}]})
        assert_json_error(*got, 400)
        assert json.loads(got[2])["error"] == "inputs[1].question is missing"
        got = call(url, "GET", "/nope")
        assert_json_error(*got, 404)
        assert json.loads(got[2])["error"] == "no such path: /nope"


def test_what_hfs_clients_and_browsers_send_is_taken():
    """(mutation review) JSON null for an option is its default (HF's clients send them); a `+json` media type is
    JSON; a request a user typed into the address bar (Sec-Fetch-Site: none) is no other site's."""
    with running(create_app(FakeQA())) as (url, _):
        wait_ready(url)
        payload = {"inputs": {"question": "Who?", "context": "Denver won."}, "parameters": {"top_k": None}}
        assert post(url, "/", payload) == {"score": 1.0, "start": 0, "end": 6, "answer": "Denver"}  # top_k 1
        body = json.dumps(payload).encode()
        for headers in ({"Content-Type": "application/vnd.api+json"},
                        {"Origin": "https://elsewhere.example", "Sec-Fetch-Site": "none"}):  # fmt: skip
            assert call(url, "POST", "/", body, headers)[0] == 200, headers


def test_the_metrics_time_only_answering_requests_and_the_page_has_its_security_headers():
    """(mutation review) The latency histogram counts POST / and /v1/answer, nothing else; its last bucket is
    Prometheus's +Inf; GET / sends the page with its Content-Security-Policy; Retry-After is at least one batch's time."""
    app = create_app(FakeQA())
    with running(app) as (url, _):
        wait_ready(url)

        def answered():
            return metric(call(url, "GET", "/metrics")[2], "bertqa_request_duration_seconds_count")

        before = answered()
        status, headers, page = call(url, "GET", "/")
        assert status == 200 and "<html" in page.lower()
        assert headers["content-security-policy"].startswith("default-src 'none';")
        assert "connect-src 'self'" in headers["content-security-policy"]
        assert headers["x-content-type-options"] == "nosniff" and headers["cache-control"] == "no-cache"
        call(url, "GET", "/healthz")
        assert answered() == before
        post(url, "/", {"inputs": {"question": "Who?", "context": "Denver won."}})
        call(url, "POST", "/v1/answer", {"question": "Who?"})  # a 400 is timed too
        text = call(url, "GET", "/metrics")[2]
        assert metric(text, "bertqa_request_duration_seconds_count") == before + 2
        for name in ("bertqa_request_duration_seconds", "bertqa_batch_size"):
            assert metric(text, f'{name}_bucket{{le="+Inf"}}') == metric(text, f"{name}_count")
        batcher = app.state.server.batcher
        batcher.seconds_per_batch = 3.0  # nothing queued: one batch's time (a request's own)
        assert batcher.retry_after() == 3


def test_the_startup_url_of_an_ipv6_address_has_its_brackets():
    from bertqa.serve import _url

    assert _url("::1", 8000) == "http://[::1]:8000"
    assert _url("127.0.0.1", 8000) == "http://127.0.0.1:8000"
