"""`diladiff serve` (issue 31): the samplers' on_step hooks observe without changing a draw, a
streamed generation gives Model.generate's tokens step by step, bad requests are 4xx messages
that leave the server serving, a bounded load test on the real command, and (e2e) a headless
Chromium driving the page: an MDLM and a DiLaDiff side by side on an infill canvas."""

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_gaussian import gaussian_posterior_mean
from test_sampler import MASK, make_decoder

import diladiff
from diladiff.cli import main
from diladiff.sampling.latent import LATENT_SAMPLERS, LatentSettings, sample_latent
from diladiff.sampling.masked import SamplerSettings, sample_masked
from diladiff.serve import Playground, stream

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- helpers


def post(url: str, body, timeout: float = 60) -> tuple[int, list[dict] | dict]:
    """POST JSON to url: (status, the events of a 200 stream | the JSON of an error)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as res:
            return res.status, [json.loads(line) for line in res.read().splitlines() if line]
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def get(url: str, timeout: float = 10):
    with urllib.request.urlopen(url, timeout=timeout) as res:
        return res.status, res.headers.get("Content-Type"), res.read()


def by_kind(events: list[dict], kind: str) -> list[dict]:
    return [e for e in events if e["event"] == kind]


@pytest.fixture(scope="module")
def served(trained_run):
    """An in-process playground over the tiny MDLM on a free port: (base url, its Model)."""
    playground = Playground.load([str(trained_run)], device="cpu")
    server = playground.make_server("127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    yield url, trained_run.name, playground.models[trained_run.name]
    server.shutdown()
    server.server_close()


def start_command(log: Path, *runs, timeout: float = 180):
    """`diladiff serve RUN ... --port 0` as a subprocess, its stderr to `log`: (process, base
    url) once it serves."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "diladiff", "serve", *map(str, runs), "--port", "0"]
    cmd += ["--device", "cpu"]
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    proc.log = log
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            line = proc.stdout.readline()
            found = re.search(r"at (http://127\.0\.0\.1:\d+)/", line)
            if found:
                return proc, found.group(1)
        if proc.poll() is not None:
            raise AssertionError(f"diladiff serve exited: {log.read_text()[-3000:]}")
    proc.kill()
    raise AssertionError("diladiff serve did not start")


def stop_command(proc) -> str:
    """Ctrl-C (SIGINT), as a user stops it: returns stderr; asserts a clean exit."""
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    err = proc.log.read_text()
    assert proc.returncode == 0, err[-3000:]
    return err


# --------------------------------------------------------------------------- the hooks


@pytest.mark.parametrize("strategy", ["ancestral", "topk", "threshold"])
def test_masked_hook_sees_every_step_and_changes_nothing(strategy):
    decoder, _ = make_decoder()
    settings = SamplerSettings(steps=5, strategy=strategy)
    canvas = torch.tensor([3, MASK, MASK, 1, MASK, MASK, MASK, MASK, 0, MASK, MASK, MASK])
    plain, stats = sample_masked(
        decoder, 4, 12, MASK, settings, torch.Generator().manual_seed(3), canvas=canvas
    )
    seen = []
    hooked, hooked_stats = sample_masked(
        decoder,
        4,
        12,
        MASK,
        settings,
        torch.Generator().manual_seed(3),
        canvas=canvas,
        on_step=lambda i, x: seen.append((i, x.clone())),
    )
    assert torch.equal(plain, hooked) and stats == hooked_stats
    assert [i for i, _ in seen] == list(range(1, stats.steps + 1))
    assert torch.equal(seen[-1][1], hooked)
    masked = [int((x == MASK).sum()) for _, x in seen]
    assert masked == sorted(masked, reverse=True) and masked[-1] == 0
    for (_, before), (_, after) in zip(seen, seen[1:], strict=False):  # revealed stays
        assert torch.equal(after[before != MASK], before[before != MASK])


def _toy_latent_model():
    """A model with every method a latent sampler calls: the exact x0 of a Gaussian prior and a
    made-up average velocity (only the hooks are tested here)."""
    mu = torch.tensor([[1.0, -2.0, 0.5]])
    std = torch.tensor([[0.5, 1.5, 1.0]])
    x0 = gaussian_posterior_mean(mu, std, 10.0)
    return SimpleNamespace(
        x0=lambda z, t, sc=None: x0(z, t, sc).float(),
        self_conditioned_u=lambda z, t, r: 0.4 * z - mu,
        cfg=SimpleNamespace(diffusion=SimpleNamespace(d=10.0)),
        latent_shape=(1, 3),
    )


@pytest.mark.parametrize("name", sorted(LATENT_SAMPLERS))
def test_latent_hooks_see_every_step_and_change_nothing(name):
    model = _toy_latent_model()
    settings = LatentSettings(name, 6, 0.3 if name == "meanflow" else 0.0)
    z, calls = sample_latent(model, 5, settings, torch.Generator().manual_seed(2), "cpu")
    seen = []
    z2, calls2 = sample_latent(
        model,
        5,
        settings,
        torch.Generator().manual_seed(2),
        "cpu",
        on_step=lambda i, zz: seen.append((i, zz.clone())),
    )
    assert torch.equal(z, z2) and calls == calls2
    assert [i for i, _ in seen] == list(range(1, 7))
    assert torch.equal(seen[-1][1], z)  # the last step reports the latent returned
    assert not torch.equal(seen[0][1], seen[-1][1])


def test_a_plugin_sampler_without_the_hook_reports_its_result_once(monkeypatch):
    model = _toy_latent_model()

    def old_style(model, shape, settings, generator, device):
        return torch.full(shape, 2.0), 1

    monkeypatch.setitem(LATENT_SAMPLERS, "old_style", old_style)
    seen = []
    z, _ = sample_latent(
        model, 2, LatentSettings("old_style", 3), None, "cpu", on_step=lambda i, zz: seen.append(i)
    )
    assert seen == [3] and z.shape == (2, 1, 3)


# --------------------------------------------------------------------------- the stream


CASES = [
    {"mode": "infill", "text": "the history of [MASK] [MASK] is", "disc_steps": 6},
    {"mode": "prompt", "prompt": "the city", "suffix": "in the north", "strategy": "topk"},
    {"mode": "prompt", "disc_steps": 32, "temperature": 0.8, "top_p": 0.9, "seed": 7},
    {"mode": "infill", "text": "a [MASK] b", "strategy": "threshold", "disc_steps": 3},
]


def _generate_kwargs(case: dict) -> dict:
    keys = ("disc_steps", "temperature", "top_p", "strategy", "seed", "prompt", "suffix")
    kwargs = {k: case[k] for k in keys if k in case}
    if case.get("mode") == "infill":
        kwargs["infill"] = case["text"]
    return kwargs


def check_stream(events: list[dict], model, kwargs: dict) -> dict:
    """The stream's tokens equal Model.generate's for the same settings; its steps reveal each
    masked position once, given tokens never; returns the done event."""
    start, done = events[0], events[-1]
    assert start["event"] == "start" and done["event"] == "done", events[-1]
    expected = model.generate(num_samples=1, **{"seed": start["seed"], **kwargs})
    assert done["ids"] == expected.ids[0]
    assert done["text"] == expected.texts[0]
    steps = by_kind(events, "step")
    assert [s["step"] for s in steps] == list(range(1, len(steps) + 1))
    assert len(steps) == done["disc_steps_taken"] == expected.stats["disc_steps_taken"]
    tokens = list(start["tokens"])
    for step in steps:
        for pos, label in step["revealed"]:
            assert tokens[pos] is None, "a position revealed twice, or a given token changed"
            tokens[pos] = label
        assert step["masked"] == sum(t is None for t in tokens)
    assert tokens == done["tokens"]  # every position revealed, as the final tokens
    given = [i for i, t in enumerate(start["tokens"]) if t is not None]
    assert start["masked"] == len(tokens) - len(given) == done["generated"]
    assert done["seconds"] > 0 and done["tokens_per_s"] == pytest.approx(
        len(tokens) / done["seconds"]
    )
    return done


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['mode']}-{c.get('strategy', 'anc')}")
def test_stream_gives_the_tokens_of_model_generate(served, case):
    url, name, model = served
    status, events = post(url + "/api/generate", {"run": name, **case})
    assert status == 200, events
    start = events[0]
    assert start["disc_steps"] == case.get("disc_steps", model.stage.cfg.sample.disc_steps or 32)
    assert not start["latent"] and not by_kind(events, "latent")
    check_stream(events, model, _generate_kwargs(case))


def test_a_kind_without_step_reports_streams_its_result_in_one_step(served, monkeypatch):
    """DUO's and LADD's samplers report no steps: sample_batch itself, one event (here the
    MDLM taken through that path: still Model.generate's tokens)."""
    url, name, model = served
    monkeypatch.delitem(stream.STEPPED, "masked")
    status, events = post(url + "/api/generate", {"run": name, "disc_steps": 5, "seed": 2})
    assert status == 200 and not events[0]["steps_reported"]
    assert [e["event"] for e in events] == ["start", "step", "done"]
    assert len(events[1]["revealed"]) == events[0]["masked"]
    assert events[-1]["ids"] == model.generate(num_samples=1, disc_steps=5, seed=2).ids[0]


def test_a_failure_inside_a_generation_is_an_error_event(served, monkeypatch):
    url, name, _ = served

    def broken(*args):
        raise RuntimeError("the sampler broke")

    with monkeypatch.context() as patch:
        patch.setitem(stream.STEPPED, "masked", broken)
        status, events = post(url + "/api/generate", {"run": name, "disc_steps": 4})
    assert status == 200 and [e["event"] for e in events] == ["start", "error"]
    assert "RuntimeError: the sampler broke" in events[-1]["message"]
    status, events = post(url + "/api/generate", {"run": name, "disc_steps": 4})
    assert status == 200 and events[-1]["event"] == "done"  # still serving


def test_page_and_runs_are_served(served):
    url, name, model = served
    status, ctype, page = get(url + "/")
    assert status == 200 and ctype.startswith("text/html")
    assert b"/api/generate" in page and b"<script" in page
    assert b"http://" not in page.replace(b"http://www.w3.org/2000/svg", b"")  # nothing fetched
    status, ctype, body = get(url + "/api/runs")
    info = json.loads(body)
    assert info["runs"][0]["name"] == name and info["runs"][0]["L"] == model.stage.seq_len
    assert info["runs"][0]["kind"] == "mdlm" and not info["runs"][0]["latent"]
    assert "topk" in info["strategies"]


BAD = [
    ({"mode": "infill", "text": "  "}, 400, "canvas is empty"),
    ({"mode": "prompt", "prompt": "word " * 40}, 400, "of the 32 positions"),
    ({"mode": "infill", "text": "word " * 40}, 400, "L is 32"),
    ({"disc_steps": 0}, 400, "disc_steps must be in [1, 32]"),
    ({"disc_steps": 33}, 400, "disc_steps must be in [1, 32]"),
    ({"disc_steps": "4"}, 400, "disc_steps must be a number"),
    ({"disc_steps": True}, 400, "disc_steps must be a number"),
    ({"cont_steps": 0}, 400, "cont_steps must be in"),
    ({"temperature": 0}, 400, "temperature must be in (0"),
    ({"top_p": 1.5}, 400, "top_p must be in (0, 1]"),
    ({"gamma": -0.1}, 400, "gamma must be in [0, 1]"),
    ({"seed": -1}, 400, "seed must be in"),
    ({"strategy": "greedy"}, 400, "strategy must be one of"),
    ({"strategy": ["topk"]}, 400, "strategy must be one of"),
    ({"temperature": float("nan")}, 400, "temperature must be a number"),
    ({"mode": "sideways"}, 400, "mode must be one of"),
    ({"latent_from": "a reference text"}, 400, "no latent"),
    ({"temperatur": 1.0}, 400, "unknown field"),
    ({"prompt": 3}, 400, "prompt must be a string"),
]


@pytest.mark.parametrize("body,status,message", BAD, ids=[m for _, _, m in BAD])
def test_bad_input_is_a_4xx_message_and_the_server_keeps_serving(served, body, status, message):
    url, name, model = served
    code, answer = post(url + "/api/generate", {"run": name, **body})
    assert code == status and message in answer["error"], answer
    code, events = post(url + "/api/generate", {"run": name, "disc_steps": 4})
    assert code == 200 and events[-1]["event"] == "done"


def test_unknown_runs_paths_and_bodies_are_4xx(served):
    url, name, _ = served
    code, answer = post(url + "/api/generate", {"run": "nope"})
    assert code == 404 and "unknown run 'nope'" in answer["error"] and name in answer["error"]
    assert post(url + "/api/generate", {"run": ["x"]})[0] == 404
    assert post(url + "/api/generate", b"{not json")[0] == 400
    assert post(url + "/api/generate", [1, 2])[0] == 400
    assert post(url + "/api/other", {})[0] == 404
    with pytest.raises(urllib.error.HTTPError) as err:
        get(url + "/nothing")
    assert err.value.code == 404


def test_a_latent_run_streams_its_latent_steps_first(latent_chain, tmp_path):
    """LaDiff (the chain's): N_cont latent events with the latent's energy, then N_disc
    decoding steps, the tokens of Model.generate; with a reference text, its encoder latent
    (one latent event, step 0) and no latent steps."""
    playground = Playground.load([str(latent_chain["ladiff"])], device="cpu")
    name = latent_chain["ladiff"].name
    server = playground.make_server("127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/api/generate"
    model = playground.models[name]
    try:
        case = {"mode": "infill", "text": "the [MASK] of", "disc_steps": 5, "cont_steps": 4}
        status, events = post(url, {"run": name, **case, "seed": 3})
        assert status == 200, events
        kinds = [e["event"] for e in events]
        assert kinds == ["start"] + ["latent"] * 4 + ["step"] * 5 + ["done"]
        latent = by_kind(events, "latent")
        assert [e["step"] for e in latent] == [1, 2, 3, 4]
        energies = [e["energy"] for e in latent]
        assert all(e > 0 and e == e for e in energies) and len(set(energies)) == 4
        assert events[0]["latent"] and events[0]["cont_steps"] == 4
        kwargs = {"infill": case["text"], "disc_steps": 5, "cont_steps": 4, "seed": 3}
        done = check_stream(events, model, kwargs)
        assert done["cont_nfe"] > 0 and done["latent_s"] > 0

        ref = "the river runs through the old town"
        status, events = post(url, {"run": name, "disc_steps": 4, "latent_from": ref})
        assert status == 200, events
        latent = by_kind(events, "latent")
        assert len(latent) == 1 and latent[0]["step"] == 0 and events[0]["latent_from"]
        done = check_stream(events, model, {"disc_steps": 4, "latent_from": ref})
        assert done["cont_nfe"] == 0
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------- the command


def test_load_20_requests_from_4_threads_with_a_bad_one_in_the_middle(trained_run, tmp_path):
    """The real `diladiff serve`: 20 requests from 4 threads all answered (the same seed the
    same text, whatever ran beside it), the 10th a bad one answered 400, none lost."""
    proc, url = start_command(tmp_path / "serve.log", trained_run)
    try:
        status, _, page = get(url + "/")
        assert status == 200
        bodies = [
            {"run": trained_run.name, "disc_steps": 8, "seed": i % 5, "prompt": "the"}
            for i in range(20)
        ]
        bodies[10] = {"run": trained_run.name, "disc_steps": 0}
        t0 = time.perf_counter()
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda b: post(url + "/api/generate", b, 60), bodies))
        elapsed = time.perf_counter() - t0
        assert answers[10][0] == 400 and "disc_steps" in answers[10][1]["error"]
        good = [a for i, a in enumerate(answers) if i != 10]
        assert all(status == 200 and ev[-1]["event"] == "done" for status, ev in good)
        texts = {}
        for body, (_, events) in zip(bodies, answers, strict=True):
            if body.get("seed") is not None:
                texts.setdefault(body["seed"], set()).add(events[-1]["text"])
        assert all(len(t) == 1 for t in texts.values()) and len(texts) == 5
        assert elapsed < 20, elapsed
    finally:
        err = stop_command(proc)
    assert "POST /api/generate" in err  # the access log


def test_serve_refuses_a_missing_run_in_one_line(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


# --------------------------------------------------------------------------- the browser


def chromium_driver():
    """Selenium on Debian's chromium and chromium-driver (`make browser` installs them)."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (binary and driver):
        pytest.fail("chromium and chromedriver are not installed: run `make browser`")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument("--window-size=1500,960")
    return webdriver.Chrome(options=options, service=Service(driver))


@pytest.mark.e2e
def test_browser_runs_mdlm_and_diladiff_side_by_side(latent_chain, tmp_path):
    """A headless Chromium drives the page: an infill canvas, N_disc 6, top-k, seed 5; the MDLM
    and a DiLaDiff (trained on the chain's LaDiff) run side by side; each shows 6 decoding
    steps, keeps the given tokens in place and ends with Model.generate's text; a bad N_disc
    is a message in the page; a screenshot is saved (DILADIFF_SCREENSHOT=docs/serve.png for the
    README's)."""
    from latent_fixtures import train
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    dl = tmp_path / "diladiff"
    assert train("diladiff", dl, "--teacher", latent_chain["ladiff"], "train.max_steps=2") == 0
    mdlm = latent_chain["mdlm"]
    text, n_disc, seed = "the history of [MASK] [MASK] [MASK] is the story of", 6, 5
    proc, url = start_command(tmp_path / "serve.log", mdlm, dl)
    driver = chromium_driver()
    try:
        driver.get(url + "/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
        Select(driver.find_element(By.ID, "run_a")).select_by_value(mdlm.name)
        Select(driver.find_element(By.ID, "run_b")).select_by_value(dl.name)
        Select(driver.find_element(By.ID, "mode")).select_by_value("infill")
        box = driver.find_element(By.ID, "text")
        box.clear()
        box.send_keys(text)
        Select(driver.find_element(By.ID, "strategy")).select_by_value("topk")
        fields = {"disc_steps": n_disc, "seed": seed, "cont_steps": 3, "delay": 40}
        for field, value in fields.items():
            el = driver.find_element(By.ID, field)
            el.clear()
            el.send_keys(str(value))

        # out of range first: a message in the page, then the same page works
        steps = driver.find_element(By.ID, "disc_steps")
        steps.clear()
        steps.send_keys("99")
        driver.find_element(By.ID, "go").click()
        panel_a = driver.find_element(By.ID, "panel_a")
        wait.until(lambda d: panel_a.get_attribute("data-state") == "error")
        assert "disc_steps must be in [1, 32]" in panel_a.find_element(By.CLASS_NAME, "error").text
        wait.until(lambda d: d.find_element(By.ID, "go").is_enabled())
        steps.clear()
        steps.send_keys(str(n_disc))

        driver.find_element(By.ID, "go").click()
        panels = [driver.find_element(By.ID, p) for p in ("panel_a", "panel_b")]
        for panel in panels:
            wait.until(lambda d, p=panel: p.get_attribute("data-state") in ("done", "error"))
            assert panel.get_attribute("data-state") == "done", panel.text

        tok = diladiff.load(mdlm, device="cpu").tokenizer
        given = tok(text, add_special_tokens=False)["input_ids"]
        for panel, run, latent in zip(panels, (mdlm, dl), (False, True), strict=True):
            counter = panel.find_element(By.CLASS_NAME, "steps")
            assert counter.get_attribute("data-steps") == str(n_disc)
            assert f"decoding step {n_disc} / {n_disc}" in counter.text
            spans = panel.find_elements(By.CSS_SELECTOR, ".canvas span")
            assert len(spans) == 32 and not panel.find_elements(By.CSS_SELECTOR, ".canvas .mask")
            for pos, token_id in enumerate(given):  # the given tokens, kept in place
                if token_id != tok.mask_token_id:
                    assert "given" in spans[pos].get_attribute("class")
                    assert spans[pos].text == tok.decode([token_id])
            expected = diladiff.load(run, device="cpu").generate(
                num_samples=1,
                infill=text,
                disc_steps=n_disc,
                strategy="topk",
                seed=seed,
                **({"cont_steps": 3} if latent else {}),
            )
            assert panel.find_element(By.CLASS_NAME, "final").text == expected.texts[0].strip()
            stats = panel.find_element(By.CLASS_NAME, "stats").text
            assert re.search(r"wall [\d.e-]+ s · [\d.e+]+ tokens/s", stats), stats
            if latent:
                assert "latent step 3 / 3" in panel.find_element(By.CLASS_NAME, "latent-count").text
                assert len(panel.find_elements(By.CSS_SELECTOR, ".energy rect")) == 3
                assert panel.find_element(By.CLASS_NAME, "energy").is_displayed()
            else:
                assert not panel.find_element(By.CLASS_NAME, "energy").is_displayed()
        # the step slider replays the steps: halfway, masked positions are grey again
        for panel in panels:
            scrub = panel.find_element(By.CLASS_NAME, "scrub")
            driver.execute_script(
                "arguments[0].value = 3; arguments[0].dispatchEvent(new Event('input'))", scrub
            )
            masked = len(panel.find_elements(By.CSS_SELECTOR, ".canvas .mask"))
            assert 0 < masked < 32 - len(given) + given.count(tok.mask_token_id)
            assert (
                f"3 / {n_disc} · {masked} masked"
                in panel.find_element(By.CLASS_NAME, "scrub-at").text
            )
            assert panel.find_elements(By.CSS_SELECTOR, ".canvas .new")
        # tmp_path, not the checkout (a test never rewrites tracked files);
        # DILADIFF_SCREENSHOT=docs/serve.png refreshes the README's picture
        shot = Path(os.environ.get("DILADIFF_SCREENSHOT") or tmp_path / "serve.png")
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    finally:
        driver.quit()
        stop_command(proc)
