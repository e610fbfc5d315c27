"""A running cell seen where users look (issue 24): `card server` opened in Debian's headless
Chromium while the cell trains, its train step's card reloaded twice, its loss curve longer the
second time."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml

from steps.flow.launcher import free_port
from tests.conftest import METAFLOW_ROOT, REPO
from tests.test_report_browser import CHROMIUM, FLAGS

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make setup installs it)")]
FLOW = str(REPO / "flows" / "finetune_matrix.py")
LONG = {"name": "live", "models": "llama-debug", "peft": "lora", "strategy": "single", "lr": 1e-3,
        "micro_batch": 4, "seq_len": 32, "train": {"max_steps": 3000, "timing_warmup_steps": 2, "timeout_s": 600},
        "data": {"train_samples": 256, "val_samples": 32}}
# The card's train-loss points: the page's embedded card data (base64 JSON), its Vega-Lite chart.
POINTS = """() => {
  const blob = Object.values(window.__MF_DATA__ || {})[0];
  if (!blob) return -1;
  const data = JSON.parse(atob(blob));
  const walk = (x) => {
    if (Array.isArray(x)) { for (const y of x) { const n = walk(y); if (n >= 0) return n; } return -1; }
    if (x && typeof x === 'object') {
      if (x.type === 'vegaChart') return x.spec.data.values.filter(p => p.split === 'train').length;
      for (const v of Object.values(x)) { const n = walk(v); if (n >= 0) return n; }
    }
    return -1;
  };
  return walk(data);
}"""


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


@contextlib.contextmanager
def _process(cmd, env, log):
    proc = subprocess.Popen(cmd, cwd=str(METAFLOW_ROOT), env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)


def test_card_server_shows_a_training_cell_s_loss_curve_growing(tmp_path):
    from playwright.sync_api import sync_playwright

    path = tmp_path / "matrix.yaml"
    path.write_text(yaml.safe_dump(LONG))
    env = {**os.environ, "FINETUNE_MATRIX_REPORTS": str(tmp_path / "reports"), "FINETUNE_MATRIX_LIVE_CARD_S": "2"}
    port = free_port()
    base = [sys.executable, FLOW, "--config", "matrix", str(path)]
    with contextlib.ExitStack() as stack:
        run_log, server_log = (stack.enter_context(open(tmp_path / n, "w")) for n in ("run.log", "server.log"))
        run = stack.enter_context(_process([*base, "run"], env, run_log))
        deadline = time.monotonic() + 240
        while "/train/" not in (tmp_path / "run.log").read_text() and time.monotonic() < deadline:
            time.sleep(0.5)  # the card server reads the run's datastore: it must exist
        stack.enter_context(_process([*base, "card", "server", "--port", str(port)], env, server_log))
        card = None
        while card is None and time.monotonic() < deadline and run.poll() is None:
            time.sleep(1)
            with contextlib.suppress(OSError, ValueError):
                info = _get(f"http://127.0.0.1:{port}/runinfo")
                card = next((c for c in info.get("cards", []) if "/train/" in c["task"]
                             and c["card_object"]["id"] == "live" and not c["finished"]), None)
        assert card is not None, (tmp_path / "run.log").read_text()[-3000:] + (tmp_path / "server.log").read_text()[-2000:]
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
            page = browser.new_page()
            seen = []
            # Until the curve has points, then until a reload shows more: the card is redrawn from a
            # thread of low priority (steps/flow/priority.py), later when the machine is busy.
            for _ in range(40):
                page.goto(f"http://127.0.0.1:{port}/card/{card['card']}", wait_until="load")
                seen.append(page.evaluate(POINTS))
                grown = [n for n in seen if n > 0]
                if len(grown) >= 2 and grown[-1] > grown[0]:
                    break
                time.sleep(3)
            page.screenshot(path=str(tmp_path / "live.png"), full_page=True)
            browser.close()
        assert run.poll() is None, "the cell finished before the card was read twice: train it longer"
        assert run.wait(timeout=300) == 0, (tmp_path / "run.log").read_text()[-3000:]  # and it ends well
    grown = [n for n in seen if n > 0]
    assert len(grown) >= 2 and grown[-1] > grown[0], seen
