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
    """The texts as stored (the plain-text view, sent with every item) and the progress line."""
    def text(box: str) -> str:
        return page.text_content(f"{box} .as-text")
    return {"left": text("#response-a"), "right": text("#response-b"), "prompt": text("#prompt"),
            "progress": page.inner_text("#progress")}


ITEM_SHOWN = "document.querySelector('#response-a .as-text')?.textContent.length > 0"


def test_a_labeller_signs_in_votes_by_keyboard_and_model_output_stays_inert(browser, app):
    page = browser.new_page()
    sign_in(page, app["url"], "ann", "wrong-password")
    page.get_by_text("Incorrect Credentials").wait_for()

    sign_in(page, app["url"], "ann", "ann-password")
    page.wait_for_function(ITEM_SHOWN)
    first = shown(page)
    assert "ann: 0 votes" in first["progress"]
    assert page.get_by_role("tab", name="Admin").count() == 0

    # untrusted text: tags are visible characters, markdown renders without any HTML of its own, nothing ran
    assert {first["left"][:-2], first["right"][:-2]} == {PAYLOAD, MARKDOWN}
    assert first["prompt"].startswith("Say something") and "<i>odd</i>" in first["prompt"]
    assert page.evaluate("window.__xss") is None
    assert page.evaluate("document.querySelectorAll('.answer script, img[src=\"x\"], .answer b, .prompt i, "
                         "a[href^=\"javascript\"], [onerror]').length") == 0
    assert page.locator(".answer .as-markdown strong").first.inner_text() == "not bold"

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


def store_with_pairs(tmp_path, labeller: str, pairs: list[tuple[str, str, str]]) -> tuple[Store, str]:
    """A store with one labeller (password `<name>-password`) and a comparison per (question, a, b); its URL."""
    db_url = f"sqlite:///{tmp_path / 'labels.db'}"
    store = Store(db_url)
    store.add_user(labeller, "labeller", f"{labeller}-password")
    for n, (question, a, b) in enumerate(pairs):
        prompt = store.add_prompt(f"p-{n}", "test", [{"role": "user", "content": question}])
        store.add_comparison(store.add_response(prompt, a, "m", {}), store.add_response(prompt, b, "m", {}),
                             batch="b1")
    return store, db_url


def test_a_strength_belongs_to_one_vote_and_never_to_a_tie(browser, tmp_path):
    """Slight for one item, then a tie with slight still picked, then A untouched: stored slight, none, clear (a
    strength once stuck to every later vote, ties included). The tie is voted by key right after the mouse picked
    the strength: the keys work with the radio button focused."""
    store, db_url = store_with_pairs(tmp_path, "cat", [(f"Question {n}?", f"First answer {n}.",
                                                        f"Second answer {n}.") for n in range(3)])
    server = start_server(db_url, port := free_port(), overlap=1, log=tmp_path / "serve.log")
    try:
        page = browser.new_page()
        sign_in(page, f"http://127.0.0.1:{port}/", "cat", "cat-password")
        page.wait_for_function(ITEM_SHOWN)
        strength = page.locator("#strength")
        for votes, button, pick_slight in ((1, "#vote-a", True), (2, "3", True), (3, "#vote-a", False)):
            if pick_slight:
                strength.get_by_label("slight").check()
            if button.startswith("#"):
                page.click(button)
            else:
                page.keyboard.press(button)
            page.wait_for_function(f"document.querySelector('#progress').innerText.includes('cat: {votes} vote')")
            assert strength.get_by_label("clear").is_checked()  # back to the default for the next item
        page.close()
    finally:
        stop_server(server)
    stored = [(vote.choice, vote.strength) for vote in store.votes()]
    assert [choice in ("a", "b") for choice, _ in stored] == [True, False, True]
    assert [strength for _, strength in stored] == ["slight", None, "clear"]
    assert stored[1][0] == "tie"


def test_a_labeller_writes_a_better_answer_with_a_vote_and_the_box_empties_for_the_next_item(browser, tmp_path):
    # a zero-width non-joiner (Persian, Hindi) is named on the page, and copied as stored
    store, db_url = store_with_pairs(tmp_path, "dee", [(f"What is {n} + 1?", f"It is {n + 7}.\u200c",
                                                        "Num\u200cbers are fun.") for n in range(2)])
    server = start_server(db_url, port := free_port(), overlap=1, log=tmp_path / "serve.log")
    try:
        page = browser.new_page()
        sign_in(page, f"http://127.0.0.1:{port}/", "dee", "dee-password")
        page.wait_for_function(ITEM_SHOWN)
        prompt = shown(page)["prompt"]
        page.get_by_text("Write a better answer", exact=False).click()
        page.click("#edit-b")  # an answer shown, to edit: its text as stored
        right = shown(page)["right"]
        assert "⟨U+200C⟩" in right
        stored = right.replace("⟨U+200C⟩", "\u200c")
        page.wait_for_function(f"document.querySelector('#written textarea').value === {stored!r}")
        page.fill("#written textarea", "")
        page.click("#written textarea")
        page.keyboard.type("1 + 1 is 2, so: 2")  # the shortcut keys typed here do not vote
        page.wait_for_timeout(500)
        assert "dee: 0 votes" in shown(page)["progress"]
        page.click("#vote-both-bad")
        page.wait_for_function("document.querySelector('#progress').innerText.includes('dee: 1 vote ')")
        page.wait_for_function("document.querySelector('#written textarea').value === ''", timeout=5000)
        page.close()
    finally:
        stop_server(server)
    [written] = store.written_answers()
    [vote] = store.votes()
    assert written.text == "1 + 1 is 2, so: 2" and (vote.choice, written.comparison_id) == ("both_bad",
                                                                                         vote.comparison_id)
    assert next(c for c in store.comparisons() if c["id"] == vote.comparison_id)["prompt"][0]["content"] == prompt


def test_a_labeller_ranks_four_answers_with_the_keyboard_ties_included(browser, tmp_path):
    store, db_url = store_with_pairs(tmp_path, "eve", [("Then a month?", "May.", "Soup.")])
    prompt = store.add_prompt("r-0", "test", [{"role": "user", "content": "Name a season."}])
    texts = ["Winter.", "Summer, the warm one.", "Autumn.", "Spring."]
    item = store.add_ranking_item([store.add_response(prompt, text, "m", {}) for text in texts], batch="b1")
    server = start_server(db_url, port := free_port(), overlap=1, log=tmp_path / "serve.log")
    try:
        page = browser.new_page()
        sign_in(page, f"http://127.0.0.1:{port}/", "eve", "eve-password")
        page.wait_for_function("document.querySelector('#answer-1 .as-text')?.textContent.length > 0 || "
                               "document.querySelector('#response-a .as-text')?.textContent.length > 0")
        if page.locator("#ranking-panel").is_hidden():  # the pair came first: answer it by key to reach the ranking
            page.click("#prompt")
            page.keyboard.press("1")
            page.wait_for_function("document.querySelector('#answer-1 .as-text')?.textContent.length > 0")
        assert page.locator("#pair-panel").is_hidden() and page.locator("#answer-5").is_hidden()
        assert page.locator("#pick-4").is_visible() and page.locator("#pick-5").is_hidden()  # 4 answers, 4 picks
        # a pair's strength and written answer are not offered: a ranking would drop them
        assert page.locator("#strength").is_hidden() and page.locator("#write-answer").is_hidden()
        shown = [page.text_content(f"#answer-{n} .as-text") for n in range(1, 5)]
        assert sorted(shown) == sorted(texts)
        # best first: Summer, then Spring tied with Winter, then Autumn; a wrong key taken back on the way
        number = {text: str(shown.index(text) + 1) for text in texts}
        page.click("#prompt")
        for key in (number["Summer, the warm one."], number["Autumn."], "Backspace", number["Spring."], "=",
                    number["Winter."], number["Autumn."]):
            page.keyboard.press(key)
        expected = (f"{number['Summer, the warm one.']} {number['Spring.']}={number['Winter.']} "
                    f"{number['Autumn.']}")
        page.wait_for_function(f"document.querySelector('#ranking-order textarea, #ranking-order input').value "
                               f"=== '{expected}'")
        page.keyboard.press("Enter")
        page.wait_for_function("document.querySelector('#message').innerText.includes('Saved your ranking')")
        page.close()
    finally:
        stop_server(server)
    [ranking] = store.rankings()
    assert ranking.comparison_id == item.id and ranking.ranks == [2, 1, 3, 2]  # in the item's own order of answers


LONG = "# A long answer\n\nIt has **bold** words, `code` and a [link](https://example.com).\n\n" + "word " * 4000
HOSTILE = ('<script>window.__xss = 4</script><img src=x onerror="window.__xss = 5"> [run](javascript:window.__xss=6) '
           '[data](data:text/html,<b>x</b>) ![pixel](https://example.com/p.png) ${window.__xss = 7} '
           "reads \u202eright to left\u202c, hidden\u200bspace, a bell\x07")
CONTROLS_SHOWN = "reads ⟨U+202E⟩right to left⟨U+202C⟩, hidden⟨U+200B⟩space, a bell⟨U+0007⟩"
BUTTONS = ("#vote-a", "#vote-b", "#vote-tie", "#vote-both-bad", "#skip")


def test_long_and_hostile_answers_stay_in_their_boxes_and_the_end_of_the_queue_is_plain(browser, tmp_path):
    """At 1280x720 a 20,000-character answer scrolls in its own box with the buttons in view; markdown renders
    with nothing of the answer's own HTML, links or scripts live; invisible characters show; the plain-text toggle
    shows the text as stored; items are named by opaque labels; after the last item the buttons are disabled."""
    db_url = f"sqlite:///{tmp_path / 'labels.db'}"
    store = Store(db_url)
    store.add_user("dee", "labeller", "dee-password")
    for n in range(2):
        prompt = store.add_prompt(f"long-{n}", "test", [{"role": "user", "content": f"Write a lot, **please** {n}"}])
        store.add_comparison(store.add_response(prompt, LONG, "m", {}), store.add_response(prompt, HOSTILE, "m", {}),
                             batch="b1")
    assert len(LONG) > 20_000
    server = start_server(db_url, port := free_port(), overlap=1, log=tmp_path / "serve.log")
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 720})
        sign_in(page, f"http://127.0.0.1:{port}/", "dee", "dee-password")
        page.wait_for_function(ITEM_SHOWN)

        for button in BUTTONS:  # every button on screen, the long answer scrolling in a box of its own
            box = page.locator(button).bounding_box()
            assert box["y"] >= 0 and box["y"] + box["height"] <= 720, (button, box)
        long_side = "#response-a" if "A long answer" in shown(page)["left"] else "#response-b"
        hostile_side = "#response-b" if long_side == "#response-a" else "#response-a"
        sizes = page.evaluate(f"(() => {{ const box = document.querySelector('{long_side} .answer'); "
                              "return [box.scrollHeight, box.clientHeight]; })()")
        assert sizes[0] > 10 * sizes[1] and sizes[1] <= 0.4 * 720

        # markdown rendered, the answer's own markup inert
        assert page.locator(f"{long_side} .as-markdown h1").inner_text() == "A long answer"
        assert page.locator(f"{long_side} .as-markdown strong").inner_text() == "bold"
        link = page.locator(f"{long_side} .as-markdown a")
        assert link.get_attribute("href") == "https://example.com" and link.get_attribute("target") == "_blank"
        assert "noopener" in link.get_attribute("rel")
        assert page.evaluate("window.__xss") is None
        assert page.evaluate(f"document.querySelectorAll('{hostile_side} :is(script, img, b, [onerror])').length") == 0
        assert page.evaluate(f"[...document.querySelectorAll('{hostile_side} a')].map(a => a.href)") == [
            "https://example.com/p.png"]  # an image becomes a link: nothing is fetched; javascript: and data: stay text
        markdown_text = page.inner_text(f"{hostile_side} .as-markdown")
        assert "<script>" in markdown_text and "[run](javascript:" in markdown_text and CONTROLS_SHOWN in markdown_text

        # the plain-text toggle: the text as stored, invisible characters shown the same way
        page.click("#plain-text input")
        page.wait_for_function(f"getComputedStyle(document.querySelector('{hostile_side} .as-text')).display "
                               "!== 'none'")
        assert page.locator(f"{hostile_side} .as-markdown").is_hidden()
        assert page.inner_text(f"{hostile_side} .as-text").startswith("<script>window.__xss = 4</script>")
        assert CONTROLS_SHOWN in page.inner_text(f"{hostile_side} .as-text")
        assert page.locator(f"{long_side} .as-text").inner_text().startswith("# A long answer")

        # opaque item labels, the same the store gives
        labels = {store.item_label(comparison["id"]) for comparison in store.comparisons()}
        title = page.inner_text("#title")
        assert title.removeprefix("Item ") in labels and title.removeprefix("Item ").isalnum()

        page.click("#prompt")
        for votes in (1, 2):
            page.keyboard.press("1")
            page.wait_for_function(f"document.querySelector('#progress').innerText.includes('dee: {votes} vote')")
        page.get_by_text("Nothing left to label").wait_for()
        assert "Your queue is empty" in page.inner_text("#message") and "Saved your vote" in page.inner_text("#message")
        for button in BUTTONS:
            assert page.is_disabled(button), button
        page.keyboard.press("2")  # the shortcut does nothing once the buttons are off
        page.wait_for_timeout(500)
        assert len(store.votes()) == 2

        page.click("#sign-out")  # back to the sign-in form, and the session is gone
        page.get_by_label("username").wait_for()
        page.goto(f"http://127.0.0.1:{port}/")
        page.get_by_label("username").wait_for()
        page.close()
    finally:
        stop_server(server)


def test_an_admin_sees_progress_and_agreement_and_manages_accounts(browser, app):
    page = browser.new_page()
    sign_in(page, app["url"], "boss", "boss-password")
    page.get_by_role("tab", name="Admin").click()
    page.get_by_role("button", name="Refresh statistics").click()
    page.get_by_text("Krippendorff's alpha").wait_for()
    page.wait_for_function("document.querySelector('#accounts').innerText.includes('boss')")
    assert "ann" in page.inner_text("body")

    page.fill("#account-name input, #account-name textarea", "ann")
    page.click("#disable-user")
    page.get_by_text("ann is disabled.").wait_for()
    page.wait_for_function("document.querySelector('#accounts').innerText.includes('DISABLED')")
    assert "\nann\nlabeller\nDISABLED\nboss\nadmin\nactive" in page.inner_text("#accounts")  # the table's cells
    assert app["store"].user("ann").disabled
    page.click("#enable-user")
    page.get_by_text("ann is enabled.").wait_for()
    assert not app["store"].user("ann").disabled

    page.fill("#new-user-name input, #new-user-name textarea", "eve")
    page.fill("#new-user-password input", "eve-password")
    page.click("#add-user")
    page.get_by_text("Added labeller eve.").wait_for()
    assert app["store"].authenticate("eve", "eve-password").role == "labeller"
    page.close()
