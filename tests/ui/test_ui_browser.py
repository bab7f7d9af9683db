"""The UI as a person uses it: ``make dev``, the asset graph in a real browser, a range of days launched
from its *Materialize all…* dialog, the plots.

Headless Chromium (the Debian package, ``/usr/bin/chromium``) is driven by Playwright's sync API;
Playwright never downloads a browser here. Screenshots are kept under ``test-artifacts/ui/``.
"""

from __future__ import annotations

import base64
import shutil
import time
from datetime import date
from pathlib import Path
from urllib.parse import quote

import dagster_dev as dd
import pytest

from anomaly_dagster.generate import generate_clickstream
from anomaly_dagster.plots import compact_png

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
VIEWPORT = {"width": 1600, "height": 1000}
START = date(2020, 7, 7)
DAYS = ["2020-07-07", "2020-07-08", "2020-07-09"]
UI_TIMEOUT_MS = 60_000
GRAPH_PNG = dd.ARTIFACTS / "asset_graph.png"
DIALOG_PNG = dd.ARTIFACTS / "materialize_dialog.png"
SCORES_PNG = dd.ARTIFACTS / "scores_plot.png"
ATTRIBUTION_PNG = dd.ARTIFACTS / "scores_attribution.png"


def _playwright_or_fail():
    """Playwright's sync API with the system Chromium present; a missing browser fails, never skips."""
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} not found: `make test` installs it (apt-get install -y chromium); "
            "this test fails rather than skip without a browser"
        )
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: `make test` installs it (the test extra of pyproject.toml)")
    return sync_playwright, expect


def _skip_community_dialog(page, wait_ms: int) -> None:
    """Click Skip on the "Join the Dagster community" greeting, as a person does.

    A fresh instance shows it a second after the page loads, whenever its lazily loaded chunk arrives.
    Should it appear later than ``wait_ms``, the locator handler skips it before the next action or
    assertion, so it can never cover what a check looks at.
    """
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    greeting = page.get_by_text("Join the Dagster community")
    skip = page.get_by_role("button", name="Skip", exact=True)
    page.add_locator_handler(greeting, lambda: skip.click())
    try:
        greeting.wait_for(state="visible", timeout=wait_ms)
    except PlaywrightTimeout:
        return
    skip.click()
    greeting.wait_for(state="hidden", timeout=10_000)


def _check_asset_graph(context, expect, url: str):
    """Every clickstream asset is drawn in the group's graph: its name on screen, in the window, uncovered."""
    page = context.new_page()
    page.goto(url, wait_until="networkidle")
    _skip_community_dialog(page, wait_ms=20_000)  # the first page of a fresh instance
    graph = page.locator("svg foreignObject")
    for asset in dd.ASSETS:
        node = graph.get_by_text(asset, exact=True)
        expect(node).to_have_count(1)
        expect(node).to_be_visible()
        node.click(trial=True)  # actionability only: on screen, stable, and the topmost element there
        box = node.bounding_box()
        assert box and box["width"] > 0 and box["height"] > 0, (asset, box)
        assert box["x"] >= 0 and box["x"] + box["width"] <= VIEWPORT["width"], (asset, box)
        assert box["y"] >= 0 and box["y"] + box["height"] <= VIEWPORT["height"], (asset, box)
    expect(page.get_by_role("dialog")).to_have_count(0)
    page.screenshot(path=str(GRAPH_PNG))
    return page


def _materialize_days_from_graph(page, expect, first: str, last: str) -> None:
    """*Materialize all…* on the asset graph, a custom range of days, *Launch backfill*: as a person does."""
    page.get_by_role("button", name="Materialize all…").click()
    dialog = page.get_by_role("dialog").filter(has_text="Partition selection")
    expect(dialog).to_be_visible()
    dialog.get_by_text("Show all partitions").click()  # 2020 is older than the default last 90 days
    days = dialog.locator("input:not([type=checkbox])").first  # the partition-range text box
    days.fill(f"[{first}...{last}]")
    days.press("Enter")
    expect(dialog.get_by_text(f"{len(DAYS)} partitions", exact=True)).to_be_visible()
    page.screenshot(path=str(DIALOG_PNG))
    dialog.get_by_role("button", name="Launch backfill").click()
    expect(dialog).to_have_count(0)


def _check_plot(page, expect, key: str, plot_file: Path, screenshot: Path) -> tuple[int, int]:
    """Open a markdown plot of the selected materialization and check the image renders; natural size."""
    row = page.locator("tr", has=page.get_by_text(key, exact=True))
    expect(row).to_have_count(1)
    row.get_by_text("[Show Markdown]").click()
    dialog = page.get_by_role("dialog").filter(has_text=key)
    image = dialog.locator('img[src^="data:image/png;base64,"]')
    expect(image).to_be_visible()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
    width, height = image.evaluate("img => [img.naturalWidth, img.naturalHeight]")
    shown = image.bounding_box()
    assert shown and shown["width"] > 100 and shown["height"] > 100, (key, shown)
    # what is drawn is the compact copy of the plot the run saved beside the warehouse, byte for byte
    source = image.get_attribute("src")
    assert base64.b64decode(source.split(",", 1)[1]) == compact_png(plot_file.read_bytes()), key
    page.screenshot(path=str(screenshot))
    page.keyboard.press("Escape")
    expect(dialog).to_have_count(0)
    return width, height


def _check_scores_page(context, expect, url: str, run_id: str, plots: Path) -> dict[str, tuple[int, int]]:
    """The scores asset's events view selects its latest materialization; both plots render from it."""
    page = context.new_page()
    page.goto(url, wait_until="networkidle")
    _skip_community_dialog(page, wait_ms=2_000)
    expect(page.get_by_text(f"Partition {DAYS[-1]} materialized in run {run_id[:8]}")).to_be_visible()
    window = f"{DAYS[0]}_{DAYS[-1]}.png"
    sizes = {
        "plot_scores": _check_plot(page, expect, "plot_scores", plots / "scores" / window, SCORES_PNG),
        "plot_attribution": _check_plot(
            page, expect, "plot_attribution", plots / "attribution" / window, ATTRIBUTION_PNG
        ),
    }
    page.close()
    return sizes


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_asset_graph_backfill_and_plots_in_a_real_browser(tmp_path):
    sync_playwright, expect = _playwright_or_fail()
    shutil.rmtree(dd.ARTIFACTS, ignore_errors=True)
    dd.ARTIFACTS.mkdir(parents=True)
    landing, warehouse = tmp_path / "landing", tmp_path / "warehouse"
    generate_clickstream(landing, days=len(DAYS), start=START, seed=7)

    began = time.monotonic()
    timings: dict[str, float] = {}
    dev = dd.start(tmp_path, landing, warehouse)
    try:
        location = dd.wait_until_loaded(dev)["name"]
        timings["loaded"] = time.monotonic() - began
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
            )
            try:
                context = browser.new_context(viewport=VIEWPORT)  # one browser profile, as a person has
                context.set_default_timeout(UI_TIMEOUT_MS)
                graph = _check_asset_graph(
                    context, expect, f"{dev.url}/locations/{quote(location)}/asset-groups/{dd.SOURCE}"
                )
                timings["graph"] = time.monotonic() - began

                _materialize_days_from_graph(graph, expect, DAYS[0], DAYS[-1])
                graph.close()  # no live polling while the backfill runs: the two cores are the run's
                (backfill_id,) = dd.backfill_ids(dev)
                dd.assert_targets(dev, backfill_id, DAYS[0], DAYS[-1])
                states = dd.wait_for_backfills(dev, [backfill_id], timeout=420)
                runs = dd.assert_backfills_succeeded(dev, states)
                (chain,) = [run for run in runs if dd.chain_run(run)]
                evaluated = [
                    run for run in runs if {"path": [dd.SOURCE, "evaluation"]} in run["assetSelection"]
                ]
                assert evaluated, runs  # the dialog selects every asset, the labelled evaluation too
                timings["backfill"] = time.monotonic() - began

                sizes = _check_scores_page(
                    context,
                    expect,
                    f"{dev.url}/assets/{dd.SOURCE}/scores?view=events",
                    chain["runId"],
                    warehouse / dd.SOURCE / "plots",
                )
                timings["plots"] = time.monotonic() - began
                context.close()
            finally:
                browser.close()

        for key, (width, height) in sizes.items():
            assert width > 100 and height > 100, (key, width, height)
        for screenshot in (GRAPH_PNG, DIALOG_PNG, SCORES_PNG, ATTRIBUTION_PNG):
            assert dd.assert_png(screenshot) == (VIEWPORT["width"], VIEWPORT["height"])

        # Ctrl-C: make dev stops, dagster dev shuts its services down, nothing is left on the port
        returncode = dd.stop(dev, timeout=90)
        timings["stopped"] = time.monotonic() - began
        dd.assert_clean_exit(dev, returncode)
    finally:
        if dev.process.poll() is None or dev.processes():
            dd.kill(dev)
    print(f"make dev exited with {returncode}; seconds: { {k: round(v, 1) for k, v in timings.items()} }")
