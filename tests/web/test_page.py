"""The page at `/` in a real browser against a real server: build a task from real images by setting
files on the page's inputs, classify held-out images, see the evidence, correct a prediction, list and
delete; refused input is shown next to its file.

Screenshots of each screen go to .cache/screenshots/ (git-ignored); the README's copies are refreshed with
`SHOTCACHE_SCREENSHOTS=docs/screenshots`, so an ordinary test run leaves the checkout clean."""

from __future__ import annotations

import base64
import os
import re
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO

from .browser import ConsoleLog, chromium, require_browser
from .conftest import ALICE_KEY, CLASSES, Server, images

pytestmark = pytest.mark.browser

SCREENSHOTS = Path(os.environ.get("SHOTCACHE_SCREENSHOTS", REPO / ".cache" / "screenshots"))
BUILD_TIMEOUT_MS = 180_000
# Drop on the classify zone, or paste on the page, a JPEG given as base64 (what a user's drag or Ctrl+V does).
DISPATCH = """([kind, b64, name]) => {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const data = new DataTransfer();
  data.items.add(new File([bytes], name, { type: "image/jpeg" }));
  if (kind === "drop") {
    const drop = new DragEvent("drop", { dataTransfer: data, bubbles: true });
    document.querySelector("#classify-drop").dispatchEvent(drop);
  } else {
    document.dispatchEvent(new ClipboardEvent("paste", { clipboardData: data, bubbles: true }));
  }
}"""


def shoot(page: object, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)  # type: ignore[attr-defined]


def test_build_classify_correct_delete(open_server: Server, shot_folder: Path, tmp_path: Path) -> None:
    require_browser()
    from playwright.sync_api import expect

    probes = images("test", 2)
    extra_frog = images("train", 1, skip=10, classes=("frog",))["frog"][0]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG" + bytes(200))

    with chromium(tmp_path / "profile") as context:
        page = context.new_page()
        console = ConsoleLog(page)
        page.goto(open_server.url + "/")
        expect(page.locator("#model")).to_contain_text("offline-standin")
        expect(page.locator("#standin-banner")).to_be_visible()
        expect(page.locator("#tasks-empty")).to_be_visible()

        # --- create: a folder with one sub-folder per class, one more image picked for one class
        page.get_by_role("link", name="New task", exact=True).first.click()
        page.get_by_label("Task name").fill("vehicles and frogs")
        page.locator("#classes-folder").set_input_files(shot_folder)
        cards = page.locator(".class-card")
        expect(cards).to_have_count(len(CLASSES))
        names = [cards.nth(i).locator(".class-name").input_value() for i in range(len(CLASSES))]
        assert names == sorted(CLASSES)
        frog = cards.nth(names.index("frog"))
        frog.locator("input.files").set_input_files([extra_frog, broken])
        expect(frog.locator(".count")).to_have_text("6 images")
        expect(page.locator("#create-summary")).to_have_text("3 classes, 14 images")
        frog.locator(".class-prompts").fill("a photo of a green frog")
        page.locator("#task-method").select_option("auto")  # 4-5 shots per class: auto serves its ensemble

        # --- a refused file: the service's message next to that file, nothing lost
        page.get_by_role("button", name="Build the task").click()
        bad = frog.locator(".thumb.bad")
        expect(bad).to_have_count(1, timeout=BUILD_TIMEOUT_MS)
        expect(bad.locator(".thumb-name")).to_have_text("broken.jpg")
        expect(bad.locator(".thumb-error")).to_contain_text("corrupt")
        expect(page.locator("#create-error")).to_contain_text("broken.jpg")
        expect(page.locator("#create-summary")).to_have_text("3 classes, 14 images")
        # The browser logs the refused request itself (a 4xx resource); nothing else may appear.
        assert all("status of 4" in e for e in console.take())
        shoot(page, "create-error")
        bad.get_by_role("button", name="Remove broken.jpg").click()
        expect(page.locator("#create-summary")).to_have_text("3 classes, 13 images")

        # --- build: upload progress, then the background build, then the result
        page.get_by_role("button", name="Build the task").click()
        expect(page.locator("#task-result")).to_be_visible(timeout=BUILD_TIMEOUT_MS)
        expect(page.locator("#task-version")).to_have_text("version 1")
        task_id = page.url.rsplit("/", 1)[-1]
        task = httpx.get(f"{open_server.url}/v1/tasks/{task_id}").json()
        assert task["name"] == "vehicles and frogs"
        assert {c["name"]: c["shots"] for c in task["classes"]} == {"airplane": 4, "automobile": 4, "frog": 5}
        facts = page.locator("#task-facts")
        assert (task["method_requested"], task["method"]) == ("auto", "ensemble")
        first, second = task["methods"]["ensemble"]["members"]
        expect(facts).to_contain_text(f"ensemble of {first} + {second} (asked: auto)")
        expect(page.locator("#per-class tbody tr")).to_have_count(3)
        expect(page.locator("#confusion tbody tr")).to_have_count(3)
        names = [c["name"] for c in task["classes"]]
        confusion = [[0] * len(names) for _ in names]
        for cell in task["loo"]["confusion"]:
            confusion[names.index(cell["actual"])][names.index(cell["predicted"])] = cell["count"]
        shown = page.locator("#confusion tbody tr").evaluate_all(
            "rows => rows.map(r => [...r.querySelectorAll('td')].map(td => Number(td.textContent)))"
        )
        assert shown == confusion
        # why auto chose: its ranking as the task resource gives it, the two it blends marked
        ranking = task["selection"]["ranking"]
        expect(page.locator("#selection")).to_be_visible()
        expect(page.locator("#selection-ranking tbody tr")).to_have_count(len(ranking))
        rows = page.locator("#selection-ranking tbody tr").evaluate_all(
            "rows => rows.map(r => [r.querySelector('th').textContent, r.className])"
        )
        assert rows == [[r["method"], "serving" if r["method"] in (first, second) else ""] for r in ranking]
        expect(page.locator("#selection-note")).to_contain_text(f"{task['selection']['scored_shots']} held-out shots")
        shoot(page, "task")

        # --- classify held-out images; the labels shown are the service's answers
        files = [p for paths in probes.values() for p in paths]
        truth = [name for name, paths in probes.items() for _ in paths]
        page.locator("#classify-files").set_input_files(files)
        results = page.locator(".result-card")
        expect(results).to_have_count(len(files))
        expect(page.locator(".result-card .label")).to_have_count(len(files), timeout=60_000)
        answer = httpx.post(
            f"{open_server.url}/v1/tasks/{task_id}/classify",
            files=[("images", (p.name, p.read_bytes(), "image/jpeg")) for p in files],
            data={"top_k": 3, "abstain": "true"},
        ).json()
        expected = [r["label"] or "Not sure" for r in answer["results"]]
        assert page.locator(".result-card .label").all_inner_texts() == expected
        # Two classes per kind x 3 kinds, a stand-in on 32 px images: at least half right (chance 1/3).
        assert sum(e == t for e, t in zip(expected, truth, strict=True)) >= len(files) / 2
        expect(page.locator(".result-card .topk li").first).to_be_visible()
        assert "null" not in page.locator("#classify-results").inner_text()
        thumbs = page.locator("img.evidence-thumb")
        expect(thumbs).to_have_count(3 * len(files))
        expect(thumbs.first).to_have_attribute("src", re.compile("^blob:"))
        assert thumbs.first.evaluate("img => img.complete && img.naturalWidth > 0")
        shoot(page, "classify")

        # --- drop and paste one image each (the page's two other ways in)
        probe = base64.b64encode(files[0].read_bytes()).decode()
        for event in ("drop", "paste"):
            page.evaluate(DISPATCH, [event, probe, f"{event}.jpg"])
            expect(results).to_have_count(len(files) + (1 if event == "drop" else 2))
            expect(results.first.locator(".filename")).to_have_text(f"{event}.jpg")
            expect(results.first.locator(".label")).to_have_text(expected[0], timeout=60_000)

        # --- correct one prediction: a wrong one if any, else the first; the task re-tunes, version 2
        wrong = [i for i, (e, t) in enumerate(zip(expected, truth, strict=True)) if e != t]
        index = wrong[0] if wrong else 0
        right = truth[index] if wrong else next(c for c in CLASSES if c != expected[index])
        index += 2  # the dropped and pasted cards came first
        results.nth(index).get_by_role("button", name=f"Add this image as a shot of {right}").click()
        expect(page.locator("#task-version")).to_have_text("version 2", timeout=BUILD_TIMEOUT_MS)
        expect(results.nth(index).locator(".correction-status")).to_contain_text("version 2")
        after = httpx.get(f"{open_server.url}/v1/tasks/{task_id}").json()
        assert after["version"] == 2
        assert {c["name"]: c["shots"] for c in after["classes"]}[right] == {"frog": 5}.get(right, 4) + 1

        # --- serve another method: re-tuned on the stored shots (PATCH), version 3, no ranking for a named one
        expect(page.locator("#method-switch")).to_have_value("auto")
        page.get_by_label("Serve another method").select_option("gda")
        page.get_by_role("button", name="Re-tune").click()
        expect(page.locator("#task-version")).to_have_text("version 3", timeout=BUILD_TIMEOUT_MS)
        expect(page.locator("#method-status")).to_have_text("now serving gda")
        expect(facts).to_contain_text("gda")
        expect(page.locator("#selection")).to_be_hidden()
        switched = httpx.get(f"{open_server.url}/v1/tasks/{task_id}").json()
        assert (switched["version"], switched["method"], switched["selection"]) == (3, "gda", None)
        assert switched["classes"] == after["classes"]

        # --- the task list, and delete with confirmation (cancel first: still there)
        page.get_by_role("link", name="Tasks", exact=True).click()
        row = page.locator("#tasks-body tr")
        expect(row).to_have_count(1)
        expect(row).to_contain_text("vehicles and frogs")
        shoot(page, "tasks")
        row.get_by_role("button", name="Delete task vehicles and frogs").click()
        expect(page.locator("#confirm")).to_be_visible()
        page.locator("#confirm-cancel").click()
        expect(row).to_have_count(1)
        row.get_by_role("button", name="Delete task vehicles and frogs").click()
        page.locator("#confirm-ok").click()
        expect(row).to_have_count(0)
        assert httpx.get(f"{open_server.url}/v1/tasks/{task_id}").status_code == 404
        assert console.take() == []


def test_phone_width_and_api_key(keyed_server: Server, tmp_path: Path) -> None:
    """With keys configured the page asks for one, keeps it in sessionStorage, and works on a phone."""
    require_browser()
    from playwright.sync_api import expect

    with chromium(tmp_path / "profile", width=390, height=844) as context:
        page = context.new_page()
        console = ConsoleLog(page)
        page.goto(keyed_server.url + "/")
        expect(page.locator("#key-form")).to_be_visible()
        page.get_by_label("This service needs an API key").fill(ALICE_KEY)
        page.get_by_role("button", name="Use key").click()
        expect(page.locator("#key-form")).to_be_hidden()
        expect(page.locator("#model")).to_contain_text("offline-standin")
        assert page.evaluate("sessionStorage.getItem('shotcache.apiKey')") == ALICE_KEY
        assert page.evaluate("localStorage.length") == 0
        page.get_by_role("link", name="New task", exact=True).first.click()
        expect(page.locator(".class-card").first).to_be_visible()
        # The pickers are keyboard-usable: Enter on the focused picker opens the file chooser.
        # Locator.press focuses the picker and presses in one step: a separate focus() could lose the focus to
        # a re-render of the create screen before the key arrives (seen once on a loaded machine).
        picker = page.locator("label[for=classes-folder]")
        with page.expect_file_chooser() as chooser:
            picker.press("Enter")
        assert chooser.value.is_multiple()
        # Nothing wider than the phone's screen.
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        shoot(page, "phone")
        # The first /v1/info before the key was a 401: the one console error the browser logs itself.
        errors = console.take()
        assert all("status of 401" in e for e in errors), errors
