"""The labelling app, served for real: `rlhf label serve` on a loopback port, driven by gradio_client."""
import threading
from pathlib import Path

import pytest
from gradio_client import Client
from gradio_client.exceptions import AuthenticationError

from pipeline.cli import main as cli
from preference_ui.app import check_host
from preference_ui.loadtest import (PASSWORD, audit, free_port, good_side, item_label, prepare_store, start_server,
                                    stop_server)
from rlhf.errors import UserError
from rlhf.store import Store

LABELLERS, VOTES_EACH = 20, 50
# Every Client gets ssl_verify=False: the server is plain HTTP on loopback, and with verification on,
# gradio_client builds a TLS context (reading the CA bundle) for each request, ~140 ms of CPU apiece.


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    db_url = f"sqlite:///{root / 'labels.db'}"
    # 600 comparisons x overlap 2 = 1200 slots for 1000 votes: nobody runs dry before their 50th vote.
    names = prepare_store(db_url, LABELLERS, comparisons=600)
    port = free_port()
    process = start_server(db_url, port, overlap=2, log=root / "serve.log", output_root=root / "runs")
    yield {"url": f"http://127.0.0.1:{port}/", "db": db_url, "names": names, "root": root}
    stop_server(process)


def label(url: str, name: str, votes: int, claimed: dict, errors: list) -> None:
    try:
        client = Client(url, auth=(name, PASSWORD), verbose=False, ssl_verify=False)
        title, _, left, right, *_ = client.predict(api_name="/next_item")
        for _ in range(votes):
            shown = item_label(title)
            title, _, left, right, _, message, strength, *_ = client.predict("slight", "", "",
                                                                             api_name=f"/{good_side(left, right)}")
            assert message == f"Saved your vote on item {shown}.", message
            assert strength == "clear"  # every item starts from the default strength
            claimed[name].append(shown)
    except Exception as err:  # reported by the test, with the labeller's name
        errors.append(f"{name}: {err!r}")


def test_twenty_concurrent_labellers_cast_exactly_a_thousand_votes(server):
    claimed, errors = {name: [] for name in server["names"]}, []
    threads = [threading.Thread(target=label, args=(server["url"], name, VOTES_EACH, claimed, errors))
               for name in server["names"]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not errors, errors
    report = audit(server["db"], claimed)
    assert report == {"stored": 1000, "claimed": 1000, "lost": 0, "unexpected": 0, "duplicated": 0,
                      "wrong_side": 0, "max_labellers_per_item": 2}


def test_two_tabs_of_one_labeller_show_the_same_item_and_count_one_vote(server):
    """The third tab answers as the first did (a double click, where the store lets both requests through): the
    vote counts once and the page says it is saved, not "not counted"."""
    name = server["names"][-1]
    tabs = [Client(server["url"], auth=(name, PASSWORD), verbose=False, ssl_verify=False) for _ in range(3)]
    first, second, third = (tab.predict(api_name="/next_item") for tab in tabs)
    assert first[:4] == second[:4] == third[:4]  # same item, same sides
    shown = item_label(first[0])
    assert tabs[0].predict("clear", "", "", api_name="/vote_a")[5] == f"Saved your vote on item {shown}."
    refused = tabs[1].predict("slight", "", "", api_name="/vote_b")
    assert refused[5] == f"Not counted: you have already voted on item {shown}. Here is your next item."
    assert item_label(refused[0]) != shown
    again = tabs[2].predict("clear", "", "", api_name="/vote_a")
    assert again[5] == f"Saved your vote on item {shown} (once)." and item_label(again[0]) != shown
    report = audit(server["db"], {name: [shown]})
    assert report["lost"] == 0 and report["duplicated"] == 0


def test_an_answer_counts_only_for_the_item_on_its_page_and_for_the_account_it_was_shown_to(server, tmp_path):
    """A second key pressed before the page shows the next item sends the label of the item before: not counted,
    the item shown (with the browser's hidden page label; API callers may leave it empty). A page whose item was
    shown to another account (signed in as someone else in another tab since) counts nothing either."""
    from types import SimpleNamespace

    from preference_ui.app import LabellingApp
    from preference_ui.config import PreferencesStageConfig

    tab = Client(server["url"], auth=(server["names"][3], PASSWORD), verbose=False, ssl_verify=False)
    shown = item_label(tab.predict(api_name="/next_item")[0])
    refused = tab.predict("clear", "", "", "00000000", api_name="/vote_a")  # the page still showed item 00000000
    assert refused[5] == f"Not counted: item {shown} was not on the page yet when you answered. Here it is."
    assert item_label(refused[0]) == shown and refused[-1] == shown  # the page's label now that item's
    assert tab.predict("clear", "", "", shown, api_name="/vote_a")[5] == f"Saved your vote on item {shown}."
    assert audit(server["db"], {server["names"][3]: [shown]})["lost"] == 0

    store = Store(f"sqlite:///{tmp_path / 'accounts.db'}")
    for name in ("ann", "bob"):
        store.add_user(name, "labeller", PASSWORD)
    prompt = store.add_prompt("p", "chat", [{"role": "user", "content": "Hi?"}])
    store.add_comparison(store.add_response(prompt, "x", "m", {}), store.add_response(prompt, "y", "m", {}), batch="b")
    handlers = LabellingApp(store, PreferencesStageConfig())
    anns = handlers.show(store.user("ann"))[0]  # ann's page; bob signs in in another tab, the cookie is his now
    after = handlers.answer("a")("clear", "", "", anns["label"], anns, SimpleNamespace(username="bob"))
    assert after[6].startswith("Not counted: this page showed another account's item") and not store.votes()
    # a refusal names the item by its label, never by its database id (gold items, stored first, have low ids)
    [ranked] = store.add_ranking_items([[store.add_response(prompt, text, "m", {}) for text in "uvw"]], batch="b")
    bobs = {**handlers.show(store.user("bob"))[0], "comparison_id": ranked.id, "label": "RANKED01"}
    with pytest.raises(Exception, match="item RANKED01 is a ranking item: it takes a ranking, not a vote"):
        handlers.answer("a")("clear", "", "", "RANKED01", bobs, SimpleNamespace(username="bob"))
    # an account disabled between a request's account check and its vote: refused as signed out, and the store's
    # URL (a path or a server) is not shown to the labeller
    bobs = handlers.show(store.user("bob"))[0]
    checked, handlers.user = handlers.user, lambda request: store.user("bob")  # the check passed a moment ago
    store.set_disabled("bob", True)
    with pytest.raises(Exception, match="not signed in, or this account is disabled") as refused:
        handlers.answer("a")("clear", "", "", bobs["label"], bobs, SimpleNamespace(username="bob"))
    assert "sqlite" not in str(refused.value) and "rlhf label users" not in str(refused.value)
    handlers.user = checked
    assert not store.votes()


def test_an_answer_refused_as_early_leaves_the_items_choices_as_the_labeller_left_them(tmp_path):
    """A late reply to a second key press shows the same item again: the strength, note and written answer the
    labeller has picked for it since are left as they are (they were reset to the defaults, and the next key
    stored "clear"), and its time still counts from when it was first shown. Skipping the one item left says it
    comes straight back, and a second Enter on a ranking says the first one stands."""
    from types import SimpleNamespace

    import gradio as gr

    from preference_ui.app import LabellingApp
    from preference_ui.config import PreferencesStageConfig

    store = Store(f"sqlite:///{tmp_path / 'l.db'}")
    store.add_user("ann", "labeller", PASSWORD)
    prompt = store.add_prompt("p", "chat", [{"role": "user", "content": "Hi?"}])
    for pair in ("xy", "uv"):
        store.add_comparison(*(store.add_response(prompt, text, "m", {}) for text in pair), batch="b")
    handlers, ann = LabellingApp(store, PreferencesStageConfig(overlap=1)), SimpleNamespace(username="ann")
    first = handlers.show(store.user("ann"))[0]
    again = handlers.answer("a")("slight", "a note", "", "00000000", first, ann)  # the page held another item
    assert again[0] == first and again[6].startswith("Not counted") and again[7] == gr.skip()
    assert again[-4:-1] == (gr.skip(),) * 3  # the order, note and written boxes as the labeller left them
    assert not store.votes()
    second = handlers.answer("b")("slight", "", "", first["label"], first, ann)[0]
    assert second["comparison_id"] != first["comparison_id"] and store.votes()[0].strength == "slight"
    back = handlers.skip(second["label"], second, ann)
    assert back[0]["comparison_id"] == second["comparison_id"]
    assert back[6] == f"Item {second['label']} was set aside, but it is the only item left for you: here it is again."

    [ranked] = store.add_ranking_items([[store.add_response(prompt, text, "m", {}) for text in "uvw"]], batch="b")
    handlers.queue.vote(store.user("ann"), second["comparison_id"], "a")
    item = handlers.show(store.user("ann"))[0]
    assert item["comparison_id"] == ranked.id
    assert handlers.rank("1 2 3", "", item["label"], item, ann)[6].startswith("Saved your ranking")
    assert handlers.rank("1 2 3", "", item["label"], item, ann)[6].startswith(
        f"Your ranking of item {item['label']} was saved already; the first one stands.")
    # the answer buttons start off, so no key answers an item before the page has drawn it (the item shown
    # turns them on: every browser test votes through them)
    from preference_ui.app import build_app

    blocks = build_app(store, PreferencesStageConfig())
    starting = {block.elem_id: block.interactive for block in blocks.blocks.values() if isinstance(block, gr.Button)}
    assert [starting[name] for name in ("vote-a", "vote-b", "vote-tie", "vote-both-bad", "skip")] == [False] * 5


def test_an_empty_queue_shows_nothing_left_even_while_the_remaining_count_is_seconds_old(tmp_path):
    from preference_ui.app import LabellingApp
    from preference_ui.config import PreferencesStageConfig

    store = Store(f"sqlite:///{tmp_path / 'l.db'}")
    ann, bob = (store.add_user(name, "labeller", PASSWORD) for name in ("ann", "bob"))
    prompt = store.add_prompt("p", "chat", [{"role": "user", "content": "Hi?"}])
    store.add_comparison(store.add_response(prompt, "x", "m", {}), store.add_response(prompt, "y", "m", {}), batch="b")
    handlers = LabellingApp(store, PreferencesStageConfig(overlap=1))
    assert handlers.queue.progress(bob)["remaining"] == 1  # counted now, kept for a few seconds
    assert handlers.show(ann)[0] is not None  # ann takes the one slot
    empty = handlers.show(bob)
    assert empty[1] == "### Nothing left to label" and "bob: 0 votes · 0 left in your queue" in empty[5]


def test_wrong_passwords_and_anonymous_visitors_are_refused(server):
    with pytest.raises(ValueError, match="Could not login"):
        Client(server["url"], auth=(server["names"][0], "not-the-password"), verbose=False, ssl_verify=False)
    with pytest.raises(ValueError, match="Could not login"):
        Client(server["url"], auth=("nobody", PASSWORD), verbose=False, ssl_verify=False)
    with pytest.raises(AuthenticationError, match="credentials were not provided"):
        Client(server["url"], verbose=False, ssl_verify=False).predict(api_name="/next_item")


def test_a_labeller_calling_admin_endpoints_is_refused_and_an_admin_is_served(server):
    labeller = Client(server["url"], auth=(server["names"][0], PASSWORD), verbose=False, ssl_verify=False)
    for api_name, args in (("/admin_stats", ()), ("/admin_export", ("stolen", 1))):
        with pytest.raises(Exception, match="admins only"):
            labeller.predict(*args, api_name=api_name)
    admin = Client(server["url"], auth=("load-admin", PASSWORD), verbose=False, ssl_verify=False)
    summary, batches, labellers = admin.predict(api_name="/admin_stats")
    assert "votes** on" in summary and batches["data"][0][0] == "load"
    assert {row[0] for row in labellers["data"]} <= set(server["names"])
    written = admin.predict("votes", 1, api_name="/admin_export")
    export_dir = server["root"] / "runs" / "exports" / "votes"
    assert written.startswith(f"{export_dir}: ") and (export_dir / "export.json").exists()
    assert admin.predict("votes", 1, api_name="/admin_export").endswith("unchanged")
    with pytest.raises(Exception, match="plain folder name"):
        admin.predict("../elsewhere", 1, api_name="/admin_export")


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "::"])
def test_sign_in_can_only_be_switched_off_on_loopback(host, tmp_path, capsys):
    with pytest.raises(UserError, match="only allowed on 127.0.0.1"):
        check_host(host, auth=False)
    check_host(host, auth=True)
    code = cli(["label", "serve", "--db", f"sqlite:///{tmp_path / 'l.db'}", "--host", host, "--no-auth",
                "--user", "ann"])
    assert code == 2 and "refusing to serve without sign-in" in capsys.readouterr().err
    check_host("127.0.0.1", auth=False)
    check_host("localhost", auth=False)


def test_serve_refuses_a_missing_or_empty_store_and_no_auth_without_a_user(tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 'l.db'}"
    assert cli(["label", "serve", "--db", db]) == 2  # a mistyped --db is not a new, empty store
    assert f"no label store at {tmp_path / 'l.db'}" in capsys.readouterr().err and not (tmp_path / "l.db").exists()
    Store(db)
    assert cli(["label", "serve", "--db", db]) == 2
    assert "no users yet" in capsys.readouterr().err
    assert cli(["label", "serve", "--db", db, "--no-auth"]) == 2
    assert "--no-auth needs --user NAME" in capsys.readouterr().err


def test_without_sign_in_everyone_acts_as_the_named_user(tmp_path):
    from preference_ui.app import LabellingApp
    from preference_ui.config import PreferencesStageConfig
    from rlhf.store import Store

    store = Store(f"sqlite:///{tmp_path / 'l.db'}")
    store.add_user("ann", "labeller", PASSWORD)
    assert LabellingApp(store, PreferencesStageConfig(), local_user="ann").user(None).name == "ann"


def test_an_admin_disables_enables_and_adds_accounts_and_disabling_holds_from_the_next_request(server):
    name = server["names"][1]
    labeller = Client(server["url"], auth=(name, PASSWORD), verbose=False, ssl_verify=False)
    assert labeller.predict(api_name="/next_item")[0].startswith("### Item ")
    admin = Client(server["url"], auth=("load-admin", PASSWORD), verbose=False, ssl_verify=False)
    for api_name in ("/disable_user", "/enable_user"):
        with pytest.raises(Exception, match="admins only"):
            labeller.predict(server["names"][2], api_name=api_name)
    with pytest.raises(Exception, match="admins only"):
        labeller.predict("mallory", "admin", "password123", api_name="/add_user")

    accounts, result = admin.predict(name, api_name="/disable_user")
    assert result == f"{name} is disabled." and [name, "labeller", "DISABLED"] in accounts["data"]
    with pytest.raises(Exception, match="disabled"):  # the session signed in before is refused at once
        labeller.predict("clear", "", "", api_name="/vote_a")
    with pytest.raises(ValueError, match="Could not login"):
        Client(server["url"], auth=(name, PASSWORD), verbose=False, ssl_verify=False)
    accounts, result = admin.predict(name, api_name="/enable_user")
    assert [name, "labeller", "active"] in accounts["data"]
    assert labeller.predict("clear", "", "", api_name="/vote_a")[5].startswith("Saved your vote on item ")

    Store(server["db"]).disable_user(name)  # `rlhf label users disable`, from another process, holds as fast
    with pytest.raises(Exception, match="disabled"):
        labeller.predict(api_name="/next_item")
    admin.predict(name, api_name="/enable_user")

    with pytest.raises(Exception, match="cannot disable your own account"):
        admin.predict("load-admin", api_name="/disable_user")
    with pytest.raises(Exception, match="no user 'ghost'"):
        admin.predict("ghost", api_name="/disable_user")
    accounts, result, password = admin.predict("newcomer", "labeller", "newcomer-password", api_name="/add_user")
    assert result == "Added labeller newcomer." and password == ""
    assert ["newcomer", "labeller", "active"] in accounts["data"]
    with pytest.raises(Exception, match="at least 8 characters"):
        admin.predict("shorty", "labeller", "short", api_name="/add_user")
    newcomer = Client(server["url"], auth=("newcomer", "newcomer-password"), verbose=False, ssl_verify=False)
    assert newcomer.predict(api_name="/next_item")[0].startswith("### Item ")


def test_item_labels_are_opaque_and_the_same_for_everyone(server):
    store = Store(server["db"])
    labels = {store.item_label(comparison) for comparison in range(1, 601)}
    assert len(labels) == 600 and all(len(label) == 8 and label.isalnum() for label in labels)
    assert store.item_label(1) == Store(server["db"]).item_label(1)  # a second process reads the same key
    assert store.item_label(1) != Store(f"sqlite:///{server['root'] / 'other.db'}").item_label(1)


def test_a_scratch_postgres_that_cannot_start_says_why_and_leaves_no_folder(monkeypatch):
    """Its port already taken (a listening socket on loopback): `pg_ctl start` fails after a real initdb."""
    import socket
    import tempfile

    from preference_ui import loadtest

    made = []

    def recorded_mkdtemp(**kwargs):
        made.append(Path(tempfile_mkdtemp(**kwargs)))
        return str(made[-1])

    tempfile_mkdtemp = tempfile.mkdtemp
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    monkeypatch.setattr(loadtest.tempfile, "mkdtemp", recorded_mkdtemp)
    monkeypatch.setattr(loadtest, "free_port", lambda: taken.getsockname()[1])
    try:
        with pytest.raises(RuntimeError, match=r"pg_ctl start failed \(exit \d+\): .+"):
            with loadtest.scratch_postgres():
                pass
    finally:
        taken.close()
    assert made and not made[0].exists()


def test_a_request_from_another_sites_page_is_refused_and_the_apps_own_are_served(server):
    """Served on a name other than localhost, Gradio would let any site's page read its answers with a signed-in
    labeller's cookie (their session token among them): a request naming another origin is refused."""
    import httpx

    port = server["url"].rstrip("/").rsplit(":", 1)[1]
    page = server["url"]  # the sign-in page
    for origin, host, status in (("https://evil.example", "labels.example.org", 403),
                                 ("null", f"127.0.0.1:{port}", 403),
                                 (f"http://127.0.0.1:{port}", f"127.0.0.1:{port}", 200),
                                 ("https://labels.example.org", "labels.example.org:443", 200),
                                 (None, "labels.example.org", 200)):
        headers = {"host": host, **({"origin": origin} if origin else {})}
        answer = httpx.get(page, headers=headers, timeout=30)
        assert answer.status_code == status, (origin, host, answer.status_code)
        assert answer.text.startswith("Refused: a request from another site's page.") == (status == 403)
    behind_proxy = {"host": f"127.0.0.1:{port}", "x-forwarded-host": "labels.example.org",
                    "origin": "https://labels.example.org"}
    assert httpx.get(page, headers=behind_proxy, timeout=30).status_code == 200
    token = httpx.get(f"{server['url']}gradio_api/token", timeout=30,
                      headers={"host": "labels.example.org", "origin": "https://evil.example"})
    assert token.status_code == 403 and "token" not in token.text
