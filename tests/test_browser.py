"""The labelling app in a real browser: Debian's Chromium driven by Playwright against `rlhf label serve`."""
from pathlib import Path

import pytest

from preference_ui.loadtest import free_port, start_server, stop_server
from rlhf.store import Store

CHROMIUM = Path("/usr/bin/chromium")
PAYLOAD = '<script>window.__xss = 1</script><img src="x" onerror="window.__xss = 2"> <b>bold?</b>'
MARKDOWN = "**not bold** [click](javascript:window.__xss=3)"


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():  # a failure, never a skip
        pytest.fail(f"{CHROMIUM} not found: apt-get install chromium (.ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM),
                                              args=["--no-sandbox", "--disable-background-networking"])
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    db_url = f"sqlite:///{root / 'labels.db'}"
    store = Store(db_url)
    store.add_user("ann", "labeller", "ann-password")
    store.add_user("boss", "admin", "boss-password")
    for n in range(3):
        prompt = store.add_prompt(f"xss-{n}", "test", [{"role": "user", "content": f"Say something {n} <i>odd</i>"}])
        a = store.add_response(prompt, f"{PAYLOAD} {n}", "m", {})
        b = store.add_response(prompt, f"{MARKDOWN} {n}", "m", {})
        store.add_comparison(a, b, batch="b1")
    port = free_port()
    server = start_server(db_url, port, overlap=1, log=root / "serve.log")
    yield {"url": f"http://127.0.0.1:{port}/", "store": store}
    stop_server(server)


def sign_in(page, url: str, name: str, password: str) -> None:
    page.goto(url)
    page.get_by_label("username").fill(name)
    page.get_by_label("password").fill(password)
    page.get_by_role("button", name="Login").click()


def shown(page) -> dict:
    return {"left": page.input_value("#response-a textarea"), "right": page.input_value("#response-b textarea"),
            "prompt": page.input_value("#prompt textarea"), "progress": page.inner_text("#progress")}


def test_a_labeller_signs_in_votes_by_keyboard_and_model_output_stays_inert(browser, app):
    page = browser.new_page()
    sign_in(page, app["url"], "ann", "wrong-password")
    page.get_by_text("Incorrect Credentials").wait_for()

    sign_in(page, app["url"], "ann", "ann-password")
    page.wait_for_function("document.querySelector('#response-a textarea')?.value.length > 0")
    first = shown(page)
    assert "ann: 0 votes" in first["progress"]
    assert page.get_by_role("tab", name="Admin").count() == 0

    # untrusted text is shown as text: the tags are visible characters and nothing ran or rendered
    assert {first["left"][:-2], first["right"][:-2]} == {PAYLOAD, MARKDOWN}
    assert first["prompt"].startswith("Say something") and "<i>odd</i>" in first["prompt"]
    assert page.evaluate("window.__xss") is None
    assert page.evaluate("document.querySelectorAll('img[src=\"x\"], b, a[href^=\"javascript\"]').length") == 0

    # typing the shortcut keys into the note does not vote; the key on the page does
    page.click("#note textarea")
    page.keyboard.type("1 and 2 look alike")
    page.wait_for_timeout(500)
    assert "ann: 0 votes" in shown(page)["progress"]
    page.click("#prompt")  # focus back on the page, outside any text box
    page.keyboard.press("1")
    page.wait_for_function("document.querySelector('#progress').innerText.includes('ann: 1 vote ')")
    assert "Saved your vote on item" in page.inner_text("#message")
    page.wait_for_function("document.querySelector('#note textarea').value === ''", timeout=5000)
    assert shown(page)["left"] != first["left"] or shown(page)["prompt"] != first["prompt"]

    [vote] = app["store"].votes()
    voted_for = next(c for c in app["store"].comparisons() if c["id"] == vote.comparison_id)[vote.choice]
    assert voted_for == first["left"]  # "1" means the left response, whichever side it is in the store
    assert vote.note == "1 and 2 look alike" and vote.seconds > 0

    page.keyboard.press("s")
    page.wait_for_function("document.querySelector('#message').innerText.includes('Skipped')")

    page.get_by_text("Guidelines", exact=True).click()  # the panel shows labels.guidelines (data/guidelines.md)
    page.get_by_text("Labelling guidelines: comparing two responses").wait_for()
    page.close()


def test_a_strength_belongs_to_one_vote_and_never_to_a_tie(browser, tmp_path):
    """Slight for one item, then a tie with slight still picked, then A untouched: stored slight, none, clear (a
    strength once stuck to every later vote, ties included)."""
    db_url = f"sqlite:///{tmp_path / 'labels.db'}"
    store = Store(db_url)
    store.add_user("cat", "labeller", "cat-password")
    for n in range(3):
        prompt = store.add_prompt(f"p-{n}", "test", [{"role": "user", "content": f"Question {n}?"}])
        store.add_comparison(store.add_response(prompt, f"First answer {n}.", "m", {}),
                             store.add_response(prompt, f"Second answer {n}.", "m", {}), batch="b1")
    server = start_server(db_url, port := free_port(), overlap=1, log=tmp_path / "serve.log")
    try:
        page = browser.new_page()
        sign_in(page, f"http://127.0.0.1:{port}/", "cat", "cat-password")
        page.wait_for_function("document.querySelector('#response-a textarea')?.value.length > 0")
        strength = page.locator("#strength")
        for votes, button, pick_slight in ((1, "#vote-a", True), (2, "#vote-tie", True), (3, "#vote-a", False)):
            if pick_slight:
                strength.get_by_label("slight").check()
            page.click(button)
            page.wait_for_function(f"document.querySelector('#progress').innerText.includes('cat: {votes} vote')")
            assert strength.get_by_label("clear").is_checked()  # back to the default for the next item
        page.close()
    finally:
        stop_server(server)
    stored = [(vote.choice, vote.strength) for vote in store.votes()]
    assert [choice in ("a", "b") for choice, _ in stored] == [True, False, True]
    assert [strength for _, strength in stored] == ["slight", None, "clear"]
    assert stored[1][0] == "tie"


def test_an_admin_sees_progress_and_agreement(browser, app):
    page = browser.new_page()
    sign_in(page, app["url"], "boss", "boss-password")
    page.get_by_role("tab", name="Admin").click()
    page.get_by_role("button", name="Refresh statistics").click()
    page.get_by_text("Krippendorff's alpha").wait_for()
    assert "ann" in page.inner_text("body")
    page.close()
