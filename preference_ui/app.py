"""The labelling app: `build_app(store, config) -> gr.Blocks`, served by `rlhf label serve`.

Labellers sign in against the store, see one comparison at a time (sides in random order, models hidden, items
named by an opaque label), and answer with buttons or the keys 1 2 3 4 s; with a vote they may write the answer
they wanted (a demonstration for SFT, and a pair preferring it, in the export). A ranking item shows its 2 to 6
answers numbered, and the labeller orders them best first: the keys 1-6 (or a click on an answer's button) add an
answer to the order, = ties it with the next one, Backspace takes the last one back and Enter sends the ranking.
Admins also get a tab with progress, agreement, per-labeller throughput, gold accuracy, the accounts (add,
disable, enable) and an export button. Every handler looks the user up in the store on each request, so a
labeller calling an admin endpoint directly is refused just as the hidden tab suggests, and a disabled account is
refused from its next request on.

Model output is untrusted: prompts and responses are shown by `preference_ui.render` (markdown without raw HTML,
or plain text), each in a box of fixed height with its own scroll bar, so the vote buttons stay in view.
"""
import functools
import html
import ipaddress
import time
from pathlib import Path

import gradio as gr
from starlette.middleware import Middleware

from rlhf.errors import UserError
from rlhf.rankings import MAX_K, ranks_from_order
from rlhf.schema import PREFERENCE_CHOICES
from rlhf.store import (MAX_NOTE_CHARS, MAX_WRITTEN_CHARS, DuplicateVote, LabellerDisabled, Store, StoreError, User,
                        shown_url)
from preference_ui.config import PreferencesStageConfig
from preference_ui.queue import BatchClosed, Item, ItemGone, LabelQueue, unswap
from preference_ui.render import conversation_html, shown_html
from preference_ui.signin import ClientAddress, SameOrigin, SessionExpiry, SignInGuard

DEFAULT_STRENGTH = "clear"  # shown anew with every item
BUTTONS = (("a", "A is better  [1]", "vote-a"), ("b", "B is better  [2]", "vote-b"), ("tie", "Tie  [3]", "vote-tie"),
           ("both_bad", "Both bad  [4]", "vote-both-bad"))
ANSWER_BUTTONS = len(BUTTONS) + 1  # and skip
# Keys click the buttons of the panel on screen (a pair's, or a ranking's); typing in a text box (the note, the
# order) never votes.
SHORTCUTS_JS = """
() => {
  const pairKeys = {"1": "vote-a", "2": "vote-b", "3": "vote-tie", "4": "vote-both-bad", "s": "skip"};
  const rankingKeys = {"=": "tie-previous", "backspace": "undo-order", "enter": "send-ranking", "s": "skip-ranking"};
  for (let i = 1; i <= 6; i++) rankingKeys[String(i)] = "pick-" + i;
  document.addEventListener("keydown", (event) => {
    const target = event.target;
    if (event.ctrlKey || event.metaKey || event.altKey || event.repeat) return;
    const typing = target && (target.tagName === "TEXTAREA" || target.isContentEditable ||
                              (target.tagName === "INPUT" && !["radio", "checkbox", "button"].includes(target.type)));
    if (typing) return;  // keys typed into a box; a strength picked with the mouse leaves the keys working
    const ranking = document.getElementById("send-ranking")?.offsetParent != null;
    const id = (ranking ? rankingKeys : pairKeys)[event.key.toLowerCase()];
    const button = id && document.getElementById(id);
    if (!button || button.disabled) return;
    // an answer's number counts only for an answer on screen (a ranking has 2 to 6)
    if (id.startsWith("pick-") && document.getElementById("answer-" + id.slice(5))?.offsetParent == null) return;
    event.preventDefault();
    button.click();
  });
}
"""
# The order box, edited in the page: an answer's number appended (after a space, or straight after "=" to tie),
# "=" after the last number, the last number (with its "=") taken back.
PICK_JS = ("(order) => (order.trim() === '' ? '' : order.trimEnd().endsWith('=') ? order.trimEnd() : "
           "order.trimEnd() + ' ') + '{n}'")
TIE_JS = "(order) => order.trim() === '' || order.trimEnd().endsWith('=') ? order : order.trimEnd() + '='"
UNDO_JS = "(order) => order.trimEnd().replace(/[=\\s]*[^=\\s]+$/, '')"
# Answers scroll inside boxes of fixed height, so the buttons below them stay on screen at 1280x720. One view
# of each text is shown: rendered markdown, or with body.plain-text the text as it is (!important: Gradio adds a
# copy of each rule under its container's classes, which would outrank a rule on <body>).
CSS = """
#progress progress { width: 100%; height: 0.8em; }
.answer, .prompt { overflow-y: auto; overflow-wrap: anywhere; border: 1px solid var(--border-color-primary);
  border-radius: var(--radius-md); padding: 0.4em 0.7em; }
.answer { height: 34vh; }
.prompt { max-height: 14vh; }
.conversation { max-height: 28vh; }
.turn + .turn { border-top: 1px dashed var(--border-color-primary); margin-top: 0.3em; }
.speaker { font-size: 0.8em; font-weight: bold; opacity: 0.7; }
.ranked .answer { height: 22vh; }
.answer pre, .prompt pre { white-space: pre-wrap; }
.as-text { display: none; margin: 0; font-family: ui-monospace, monospace; }
body.plain-text .as-markdown { display: none !important; }
body.plain-text .as-text { display: block !important; }
"""
PLAIN_TEXT_JS = "(plain) => { document.body.classList.toggle('plain-text', plain); }"


def progress_html(user: User, progress: dict) -> str:
    done, left = progress["votes"], progress["remaining"]
    seconds = "" if progress["mean_seconds"] is None else f" · {progress['mean_seconds']:.0f} s per vote"
    line = f"{user.name}: {done} vote{'' if done == 1 else 's'} · {left} left in your queue{seconds}"
    return f'<div>{html.escape(line)}</div><progress value="{done}" max="{max(done + left, 1)}"></progress>'


def opaque(refused: StoreError, state: dict) -> str:
    """The store's refusal as a labeller may read it: the item by its label, not its database id (gold items are
    stored first: a low id would give them away)."""
    return str(refused).replace(f"comparison {state['comparison_id']}", f"item {state['label']}")


NOT_SIGNED_IN = "not signed in, or this account is disabled"


class LabellingApp:
    """The handlers behind the Blocks; each one resolves the signed-in user from the request."""

    def __init__(self, store: Store, config: PreferencesStageConfig, batch: str | None = None,
                 local_user: str | None = None, export_root: Path = Path("runs/exports")):
        self.store, self.local_user, self.export_root = store, local_user, export_root
        self.queue = LabelQueue(store, config.overlap, config.gold_rate, batch, config.assignment_timeout)
        self.batch = batch

    def user(self, request: gr.Request) -> User:
        """The signed-in user, read from the store on every request: disabling an account takes effect at once."""
        name = request.username if request is not None and request.username else self.local_user
        user = self.store.user(name) if name else None
        if user is None or user.disabled:
            raise gr.Error(NOT_SIGNED_IN)
        return user

    def admin(self, request: gr.Request) -> User:
        user = self.user(request)
        if user.role != "admin":
            raise gr.Error("this is for admins only")
        return user

    def show(self, user: User, message: str = "", before: dict | None = None) -> tuple:
        """Outputs of every labelling event: state, item title, prompt, left, right, progress, message, the
        strength back at its default (a strength picked for one item must not carry over to the next), whether
        the five answer buttons are live (not once the queue is empty); then which panel shows (a pair's or a
        ranking's), the ranking's answer boxes and their pick buttons (as many shown as it has answers), and its
        order box, the note and the written answer, emptied for the next item. (Emptied here, in the event's own
        outputs: an event chained after it would hold the buttons, and a key pressed as the next item appears would
        be lost.) Last, the item's label, which the page sends back with its answer. When the item answered
        (`before`, its state) and the next are both pairs, the panels and the ranking's boxes are left as they are:
        fewer outputs to apply, so the page is ready for the next key sooner. When the same item is shown again
        (an answer refused as not on the page yet, a skip of the one item left), what the labeller has chosen or
        written for it so far is left as it is, and its time counts from when it was first shown."""
        item: Item | None = self.queue.next_item(user)
        counted = self.queue.progress(user)  # its remaining count may be seconds old: none once the queue says so
        progress = progress_html(user, counted if item else {**counted, "remaining": 0})
        if item is None:
            done = ("Your queue is empty for now: every item has its votes, is held by another labeller or is in a "
                    "batch already closed (an item held too long comes back: reload the page later). Thank you!")
            return (None, "### Nothing left to label", "", "", "", progress, f"{message} {done}".strip(),
                    DEFAULT_STRENGTH, *[gr.Button(interactive=False)] * ANSWER_BUTTONS,
                    *self.panels(None, before), "")
        again = before is not None and before.get("comparison_id") == item.comparison_id
        state = {"comparison_id": item.comparison_id, "label": self.store.item_label(item.comparison_id),
                 "shown_at": before["shown_at"] if again else time.time(), "answers": len(item.answers),
                 "user_id": user.id}
        return (state, f"### Item {state['label']}", conversation_html(item.prompt),
                shown_html(item.left), shown_html(item.right), progress, message,
                gr.skip() if again else DEFAULT_STRENGTH, *[gr.Button(interactive=True)] * ANSWER_BUTTONS,
                *self.panels(item, before, again), state["label"])

    def not_on_the_page(self, user: User, state: dict, page_label: str) -> tuple | None:
        """The next item shown instead of counting an answer the page did not give to `state`'s item: a second key
        pressed before the page showed the item it answers (the page still held the item before, `page_label`;
        empty from API callers, who do not say), or an item shown to another account (another tab signed in as
        someone else since: its side swap and answer order are that account's)."""
        if state.get("user_id") != user.id:
            return self.show(user, f"Not counted: this page showed another account's item; you are signed in as "
                                   f"{user.name}. Here is your next item.")
        if page_label and page_label != state["label"]:
            return self.show(user, f"Not counted: item {state['label']} was not on the page yet when you answered. "
                                   "Here it is.", state)
        return None

    @staticmethod
    def panels(item: Item | None, before: dict | None, again: bool = False) -> tuple:
        """The panels, the ranking's boxes and pick buttons, then the order, note and written boxes (emptied for a
        new item, left as they are for the same one `again`)."""
        answers = item.answers if item else []
        typed = [gr.skip() if again else ""] * 3
        if not answers and before is not None and not before.get("answers"):  # a pair after a pair
            return (*[gr.skip()] * (2 + 2 * MAX_K), *typed)
        return (gr.Column(visible=not answers), gr.Column(visible=bool(answers)),
                *[gr.HTML(shown_html(answers[i]) if i < len(answers) else "", visible=i < len(answers))
                  for i in range(MAX_K)],
                *[gr.Button(visible=i < len(answers)) for i in range(MAX_K)], *typed)

    def load(self, request: gr.Request):
        user = self.user(request)
        return (*self.show(user), gr.Tab(visible=user.role == "admin"))

    def next_item(self, request: gr.Request):
        return self.show(self.user(request))

    def answer(self, choice: str):
        def handler(strength: str, note: str, written: str, page_label: str, state: dict | None,
                    request: gr.Request):
            user = self.user(request)
            if not state:
                return self.show(user, "Nothing was shown to answer; here is your next item.")
            if refused := self.not_on_the_page(user, state, page_label):
                return refused
            if note and len(note) > MAX_NOTE_CHARS:
                raise gr.Error(f"the note is {len(note)} characters; the limit is {MAX_NOTE_CHARS}")
            try:
                self.queue.vote(user, state["comparison_id"], choice,
                                (strength or DEFAULT_STRENGTH) if choice in PREFERENCE_CHOICES else None, note or None,
                                seconds=round(time.time() - state["shown_at"], 2), written=written or None)
            except DuplicateVote:
                if self.voted_so(user, state["comparison_id"], choice):  # a double click: the first one counted
                    return self.show(user, f"Saved your vote on item {state['label']} (once).", state)
                return self.show(user, f"Not counted: you have already voted on item {state['label']}. Here is your "
                                       "next item.", state)
            except ItemGone as gone:
                return self.no_longer_yours(user, state, "vote on", gone)
            except LabellerDisabled:  # disabled between this request's account check and its vote
                raise gr.Error(NOT_SIGNED_IN) from None
            except StoreError as refused:  # a request the UI cannot make: a strength outside the vocabulary
                raise gr.Error(opaque(refused, state)) from None
            return self.show(user, f"Saved your vote on item {state['label']}.", state)
        handler.__name__ = f"vote_{choice}"
        return handler

    def voted_so(self, user: User, comparison_id: int, shown_choice: str) -> bool:
        """Whether the labeller's stored vote on the item is this choice, as the page showed the sides."""
        return any(vote.user_id == user.id and unswap(vote.choice, vote.swapped) == shown_choice
                   for vote in self.store.votes(comparison_id))

    def rank(self, order: str, note: str, page_label: str, state: dict | None, request: gr.Request):
        """The ranking typed or clicked as an order of the answers shown, best first."""
        user = self.user(request)
        if not state or not state.get("answers"):
            return self.show(user, "Nothing was shown to rank; here is your next item.")
        if refused := self.not_on_the_page(user, state, page_label):
            return refused
        try:
            ranks = ranks_from_order(order or "", state["answers"])
        except ValueError as problem:
            raise gr.Error(f"{problem}: order every answer, best first, = between tied ones") from None
        try:
            self.queue.rank(user, state["comparison_id"], ranks, note or None,
                            seconds=round(time.time() - state["shown_at"], 2))
        except DuplicateVote:  # (a second Enter: the first one's ranking stands)
            return self.show(user, f"Your ranking of item {state['label']} was saved already; the first one stands. "
                                   "Here is your next item.", state)
        except ItemGone as gone:
            return self.no_longer_yours(user, state, "rank", gone)
        except LabellerDisabled:
            raise gr.Error(NOT_SIGNED_IN) from None
        except StoreError as refused:
            raise gr.Error(opaque(refused, state)) from None
        return self.show(user, f"Saved your ranking of item {state['label']}.", state)

    def skip(self, page_label: str, state: dict | None, request: gr.Request):
        user = self.user(request)
        if state and (refused := self.not_on_the_page(user, state, page_label)):
            return refused
        if state:
            try:
                self.queue.skip(user, state["comparison_id"])
            except (DuplicateVote, ItemGone):
                return self.show(user, f"Not skipped: item {state['label']} is no longer yours.", state)
        return self.back_again(self.show(user, "Skipped; someone else will take that item.", state), state)

    def no_longer_yours(self, user: User, state: dict, what: str, gone: ItemGone) -> tuple:
        """The next item, after an answer (`what`: "vote on", "rank") on an item the labeller no longer holds."""
        why = ("its batch has been closed, so it takes no more answers" if isinstance(gone, BatchClosed)
               else "skipped, or timed out and taken by another labeller")
        return self.back_again(self.show(user, f"Not counted: item {state['label']} is no longer yours to {what} "
                                               f"({why}). Here is your next item.", state), state)

    @staticmethod
    def back_again(shown: tuple, state: dict | None) -> tuple:
        """`shown`, said otherwise when it shows `state`'s item again: skipped (here or in another tab), it was
        the only item left for the labeller, and the queue handed it straight back."""
        if state and shown[0] and shown[0]["comparison_id"] == state["comparison_id"]:
            return (*shown[:6], f"Item {state['label']} was set aside, but it is the only item left for you: here "
                                "it is again.", *shown[7:])
        return shown

    def admin_stats(self, request: gr.Request):
        from preference_ui.stats import batch_rows, labeller_rows, load_labels, summarise

        self.admin(request)
        labels = load_labels(self.store)
        report = summarise(labels, self.batch)
        rankings = f" and {report['rankings']} rankings" if report["rankings"] else ""
        summary = (f"**{report['votes']} votes{rankings}** on {report['voted']}/{report['comparisons']} comparisons · "
                   f"Krippendorff's alpha {fmt(report['krippendorff_alpha'])} · pairwise agreement "
                   f"{fmt(report['pairwise_agreement'])}")
        return summary, batch_rows(labels), labeller_rows(report)

    def admin_users(self, request: gr.Request):
        self.admin(request)
        return users_table(self.store)

    def admin_set_disabled(self, disabled: bool):
        def handler(name: str, request: gr.Request):
            admin = self.admin(request)
            name = (name or "").strip()
            if disabled and name == admin.name:
                raise gr.Error("you cannot disable your own account")
            try:
                self.store.set_disabled(name, disabled)
            except StoreError as err:
                raise gr.Error(str(err)) from None
            return users_table(self.store), f"{name} is {'disabled' if disabled else 'enabled'}."
        handler.__name__ = "disable_user" if disabled else "enable_user"
        return handler

    def admin_add_user(self, name: str, role: str, password: str, request: gr.Request):
        self.admin(request)
        try:
            self.store.add_user((name or "").strip(), role, password or "")
        except StoreError as err:
            raise gr.Error(str(err)) from None
        return users_table(self.store), f"Added {role} {name.strip()}.", ""

    def admin_export(self, name: str, min_votes: float, request: gr.Request):
        from rlhf.label_export import export

        self.admin(request)
        if not name or Path(name).name != name or name.startswith("."):
            raise gr.Error(f"give the export a plain folder name; it is written under {self.export_root}/")
        try:
            manifest = export(self.store, self.export_root / name, self.batch, int(min_votes or 1))
        except UserError as err:
            raise gr.Error(str(err)) from None
        state = "unchanged" if manifest.get("unchanged") else "written"
        return (f"{self.export_root / name}: {manifest['rows']} pairs ({manifest['ties']} ties, {manifest['both_bad']} "
                f"both bad), content hash `{manifest['content_hash'][:16]}`, {state}")


def users_table(store: Store) -> list[list]:
    return [[user.name, user.role, "DISABLED" if user.disabled else "active"] for user in store.users()]


def fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def guidelines_markdown(path: str) -> str:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"{path}: guidelines file not found (set labels.guidelines)")
    return file.read_text(encoding="utf-8")


def on_event_loop(handler):
    """The handler as a coroutine, so Gradio runs it on the server's event loop instead of a worker thread."""
    @functools.wraps(handler)
    async def run(*args, **kwargs):
        return handler(*args, **kwargs)
    return run


def build_app(store: Store, config: PreferencesStageConfig, batch: str | None = None, local_user: str | None = None,
              export_root: Path = Path("runs/exports")) -> gr.Blocks:
    handlers = LabellingApp(store, config, batch, local_user, export_root)
    # With SQLite a labelling event is a few milliseconds of work in this process, done fastest on the event loop
    # itself: in a worker thread it would hand the interpreter lock back and forth at every database call
    # (measured in docs/benchmarks.md). A database server's round trips would stall the loop: threads for those.
    inline = on_event_loop if store.engine.dialect.name == "sqlite" else (lambda handler: handler)
    with gr.Blocks(title="RLHF labelling") as app:
        state = gr.State(None)
        with gr.Tab("Label"):
            with gr.Row(equal_height=True):
                title = gr.Markdown(elem_id="title")
                progress = gr.HTML(elem_id="progress")
                plain_text = gr.Checkbox(label="Show as plain text", elem_id="plain-text", scale=0, min_width=180)
                gr.Button("Sign out", link="/logout", elem_id="sign-out", size="sm", scale=0, min_width=100,
                          visible=local_user is None)
            prompt = gr.HTML(label="Prompt", show_label=True, container=True, elem_id="prompt")
            with gr.Column(elem_id="pair-panel") as pair_panel:
                with gr.Row():
                    left = gr.HTML(label="Response A", show_label=True, container=True, elem_id="response-a")
                    right = gr.HTML(label="Response B", show_label=True, container=True, elem_id="response-b")
                with gr.Row():
                    # off until the page draws its first item (the keys press only live buttons): a key pressed
                    # after a reload would answer the item the server had assigned before the page showed it
                    buttons = {choice: gr.Button(text, elem_id=elem_id, interactive=False,
                                                 variant="primary" if choice in ("a", "b") else "secondary")
                               for choice, text, elem_id in BUTTONS}
                    skip = gr.Button("Skip  [s]", elem_id="skip", variant="stop", interactive=False)
                # a pair's own: a ranking has no strength, and no written answer to prefer over its order
                strength = gr.Radio(["clear", "slight"], value=DEFAULT_STRENGTH, elem_id="strength",
                                    label="How much better? (for A or B; a tie or both bad has no strength)")
                with gr.Accordion("Write a better answer (optional, sent with your vote)", open=False,
                                  elem_id="write-answer"):
                    written = gr.Textbox(label="The answer you would want to this prompt: it becomes a "
                                               "demonstration for the next SFT run and is preferred to the answer "
                                               "the votes choose", lines=5, max_length=MAX_WRITTEN_CHARS,
                                         elem_id="written")
                    with gr.Row():
                        edit_a = gr.Button("Start from A (to edit it)", elem_id="edit-a", size="sm")
                        edit_b = gr.Button("Start from B (to edit it)", elem_id="edit-b", size="sm")
            with gr.Column(visible=False, elem_id="ranking-panel", elem_classes="ranked") as ranking_panel:
                gr.Markdown("Order the answers, best first: press their numbers (or click their buttons), **=** to "
                            "tie the next one with the last, **Backspace** to take one back, **Enter** to send.")
                boxes, picks = [], []
                for row in range(0, MAX_K, 3):
                    with gr.Row():
                        for n in range(row + 1, row + 4):
                            with gr.Column(min_width=200):
                                boxes.append(gr.HTML(label=f"Answer {n}", show_label=True, container=True,
                                                     elem_id=f"answer-{n}", visible=False))
                                picks.append(gr.Button(f"{n}: next best  [{n}]", elem_id=f"pick-{n}", size="sm"))
                with gr.Row():
                    order = gr.Textbox(label="Your order, best first (e.g. 3 1=4 2)", elem_id="ranking-order",
                                       scale=3)
                    tie_previous = gr.Button("= tie", elem_id="tie-previous", scale=0, min_width=80)
                    undo = gr.Button("Take back [Backspace]", elem_id="undo-order", scale=0, min_width=160)
                    send = gr.Button("Send ranking  [Enter]", elem_id="send-ranking", variant="primary", scale=1)
                    skip_ranking = gr.Button("Skip  [s]", elem_id="skip-ranking", variant="stop", scale=0,
                                             min_width=100)
            message = gr.Markdown(elem_id="message")
            note = gr.Textbox(label=f"Note (optional, up to {MAX_NOTE_CHARS} characters)", lines=1,
                              max_length=MAX_NOTE_CHARS, elem_id="note")
            with gr.Accordion("Guidelines", open=False):
                gr.Markdown(guidelines_markdown(config.guidelines))
        with gr.Tab("Admin", visible=False) as admin_tab:
            refresh = gr.Button("Refresh statistics")
            summary = gr.Markdown()
            batches = gr.Dataframe(headers=["batch", "comparisons", "voted", "votes and rankings", "alpha",
                                            "pairwise", "closed"],
                                   label="Progress per batch", interactive=False)
            labellers = gr.Dataframe(headers=["labeller", "votes and rankings", "s each", "gold votes",
                                              "gold accuracy", "gold passed"],
                                     label="Labellers (gold accuracy over every gold item answered; passed: skipped "
                                           "or timed out, never shown again)", interactive=False)
            with gr.Row():
                export_name = gr.Textbox(label=f"Export folder name (under {export_root}/)")
                min_votes = gr.Number(value=1, precision=0, minimum=1, label="Minimum votes per comparison")
            export_button = gr.Button("Export preference dataset")
            export_result = gr.Markdown()
            accounts = gr.Dataframe(headers=["user", "role", "state"], label="Accounts", interactive=False,
                                    elem_id="accounts")
            with gr.Row():
                account = gr.Textbox(label="User name", elem_id="account-name")
                disable = gr.Button("Disable", elem_id="disable-user", variant="stop")
                enable = gr.Button("Enable", elem_id="enable-user")
            with gr.Row():
                new_name = gr.Textbox(label="New user's name", elem_id="new-user-name")
                new_role = gr.Radio(["labeller", "admin"], value="labeller", label="Role", elem_id="new-user-role")
                new_password = gr.Textbox(label="Password (8 characters or more)", type="password",
                                          elem_id="new-user-password")
                add = gr.Button("Add user", elem_id="add-user")
            accounts_result = gr.Markdown(elem_id="accounts-result")

        # Labelling events are a few milliseconds of database work each: they skip Gradio's queue, whose
        # bookkeeping costs more than the work (bench/label_load.py).
        # the label of the item on the page, sent with every answer: the server's state may already hold the next
        page_label = gr.Textbox(visible=False, value="")
        shown = [state, title, prompt, left, right, progress, message, strength, *buttons.values(), skip,
                 pair_panel, ranking_panel, *boxes, *picks, order, note, written, page_label]
        app.load(inline(handlers.load), None, [*shown, admin_tab], api_name="load", queue=False)
        app.load(None, js=SHORTCUTS_JS)
        plain_text.change(None, plain_text, None, js=PLAIN_TEXT_JS)
        for choice, button in buttons.items():
            button.click(inline(handlers.answer(choice)), [strength, note, written, page_label, state], shown,
                         api_name=f"vote_{choice}", queue=False)
        skip.click(inline(handlers.skip), [page_label, state], shown, api_name="skip", queue=False)
        skip_ranking.click(inline(handlers.skip), [page_label, state], shown, api_name="skip_ranking", queue=False)
        for n, pick in enumerate(picks, start=1):
            pick.click(None, order, order, js=PICK_JS.replace("{n}", str(n)))
        tie_previous.click(None, order, order, js=TIE_JS)
        for button, side in ((edit_a, "response-a"), (edit_b, "response-b")):  # the answer as stored: its plain view
            button.click(None, None, written, js=f"() => document.querySelector('#{side} .as-text').dataset.raw")
        undo.click(None, order, order, js=UNDO_JS)
        send.click(inline(handlers.rank), [order, note, page_label, state], shown, api_name="rank", queue=False)
        order.submit(inline(handlers.rank), [order, note, page_label, state], shown, api_visibility="private",
                     queue=False)
        gr.Button(visible=False).click(inline(handlers.next_item), None, shown, api_name="next_item", queue=False)
        refresh.click(handlers.admin_stats, None, [summary, batches, labellers], api_name="admin_stats").then(
            handlers.admin_users, None, accounts, api_name="admin_users")
        export_button.click(handlers.admin_export, [export_name, min_votes], export_result, api_name="admin_export",
                            concurrency_limit=1)
        disable.click(handlers.admin_set_disabled(True), account, [accounts, accounts_result],
                      api_name="disable_user")
        enable.click(handlers.admin_set_disabled(False), account, [accounts, accounts_result], api_name="enable_user")
        add.click(handlers.admin_add_user, [new_name, new_role, new_password], [accounts, accounts_result,
                                                                               new_password], api_name="add_user")
    return app


def check_host(host: str, auth: bool) -> None:
    """Sign-in may only be switched off on the loopback interface."""
    if auth:
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise UserError(f"refusing to serve without sign-in on {host}: --no-auth is only allowed on 127.0.0.1")


def serve(store: Store, config: PreferencesStageConfig, host: str = "127.0.0.1", port: int = 7860, auth: bool = True,
          local_user: str | None = None, batch: str | None = None, ssl_keyfile: str | None = None,
          ssl_certfile: str | None = None, export_root: Path = Path("runs/exports")) -> None:
    check_host(host, auth)
    if bool(ssl_keyfile) != bool(ssl_certfile):
        raise UserError("HTTPS needs both --ssl-keyfile and --ssl-certfile")
    for path in (ssl_keyfile, ssl_certfile):
        if path and not Path(path).is_file():
            raise UserError(f"{path}: no such file (--ssl-keyfile / --ssl-certfile)")
    if not auth and (local_user is None or store.user(local_user) is None):
        raise UserError("--no-auth needs --user NAME, an existing user everyone on this machine will act as")
    if auth and not store.users():
        raise UserError("the store has no users yet: add one with `rlhf label users add NAME --role admin`")

    def password_checks(name: str, password: str) -> bool:
        return store.authenticate(name, password) is not None

    guard = SignInGuard(password_checks, config.sign_in_free_failures, config.sign_in_delay,
                          config.sign_in_lockout, 60 * config.sign_in_lockout_minutes, config.sign_in_workers,
                          log=lambda line: print(f"[label serve] {line}", flush=True))
    app = build_app(store, config, batch, local_user, export_root)
    app.queue(default_concurrency_limit=config.concurrency)
    print(f"[label serve] {shown_url(store.url)} on http://{host}:{port}"
          f" ({'sign-in required' if auth else 'no sign-in, acting as ' + local_user})", flush=True)
    app.launch(server_name=host, server_port=port, auth=guard.sign_in if auth else None, css=CSS, show_error=False,
               auth_message="Sign in with the account your admin made for you.", ssl_keyfile=ssl_keyfile,
               ssl_certfile=ssl_certfile, quiet=True, footer_links=[],
               max_threads=config.concurrency,
               app_kwargs={"middleware": [Middleware(SameOrigin), Middleware(ClientAddress),
                                          Middleware(SessionExpiry, seconds=3600 * config.session_hours)]})
