"""The labelling app: `build_app(store, config) -> gr.Blocks`, served by `rlhf label serve`.

Labellers sign in against the store, see one comparison at a time (sides in random order, models hidden), and
answer with buttons or the keys 1 2 3 4 s. Admins also get a tab with progress, agreement, per-labeller
throughput and gold accuracy, and an export button. Every handler looks the user up from the request, so a
labeller calling an admin endpoint directly is refused just as the hidden tab suggests.

Model output is untrusted: prompts and responses go into read-only text boxes, whose value the browser shows as
text; nothing from a response is ever rendered as HTML or markdown.
"""
import functools
import html
import ipaddress
import time
from pathlib import Path

import gradio as gr

from rlhf.errors import UserError
from rlhf.schema import PREFERENCE_CHOICES
from rlhf.store import MAX_NOTE_CHARS, DuplicateVote, Store, StoreError, User
from preference_ui.config import LabelsConfig
from preference_ui.queue import Item, ItemGone, LabelQueue

DEFAULT_STRENGTH = "clear"  # shown anew with every item
BUTTONS = (("a", "A is better  [1]", "vote-a"), ("b", "B is better  [2]", "vote-b"), ("tie", "Tie  [3]", "vote-tie"),
           ("both_bad", "Both bad  [4]", "vote-both-bad"))
# Keys click the buttons; typing in a text box (the note) never votes.
SHORTCUTS_JS = """
() => {
  const keys = {"1": "vote-a", "2": "vote-b", "3": "vote-tie", "4": "vote-both-bad", "s": "skip"};
  document.addEventListener("keydown", (event) => {
    const target = event.target;
    if (event.ctrlKey || event.metaKey || event.altKey || event.repeat) return;
    if (target && (target.tagName === "TEXTAREA" || target.tagName === "INPUT" || target.isContentEditable)) return;
    const button = keys[event.key.toLowerCase()] && document.getElementById(keys[event.key.toLowerCase()]);
    if (button && !button.disabled) { event.preventDefault(); button.click(); }
  });
}
"""
CSS = """
#progress progress { width: 100%; height: 0.8em; }
.response textarea { font-family: ui-monospace, monospace; }
"""


def prompt_text(messages: list[dict]) -> str:
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n\n".join(f"[{message['role']}]\n{message['content']}" for message in messages)


def progress_html(user: User, progress: dict) -> str:
    done, left = progress["votes"], progress["remaining"]
    seconds = "" if progress["mean_seconds"] is None else f" · {progress['mean_seconds']:.0f} s per vote"
    line = f"{user.name}: {done} vote{'' if done == 1 else 's'} · {left} left in your queue{seconds}"
    return f'<div>{html.escape(line)}</div><progress value="{done}" max="{max(done + left, 1)}"></progress>'


class UserCache:
    """Accounts by name, re-read after `seconds`: disabling a user takes effect within that time."""

    def __init__(self, store: Store, seconds: float = 10.0):
        self.store, self.seconds, self.entries = store, seconds, {}

    def get(self, name: str) -> User | None:
        user, read_at = self.entries.get(name, (None, float("-inf")))
        if time.monotonic() - read_at > self.seconds:
            user = self.store.user(name)
            self.entries[name] = (user, time.monotonic())
        return user


class LabellingApp:
    """The handlers behind the Blocks; each one resolves the signed-in user from the request."""

    def __init__(self, store: Store, config: LabelsConfig, batch: str | None = None, local_user: str | None = None,
                 export_root: Path = Path("runs/exports")):
        self.store, self.local_user, self.export_root = store, local_user, export_root
        self.queue = LabelQueue(store, config.overlap, config.gold_rate, batch, config.assignment_timeout)
        self.batch = batch
        self.users = UserCache(store)

    def user(self, request: gr.Request) -> User:
        name = request.username if request is not None and request.username else self.local_user
        user = self.users.get(name) if name else None
        if user is None or user.disabled:
            raise gr.Error("not signed in, or this account is disabled")
        return user

    def admin(self, request: gr.Request) -> User:
        user = self.user(request)
        if user.role != "admin":
            raise gr.Error("this is for admins only")
        return user

    def show(self, user: User, message: str = "") -> tuple:
        """Outputs of every labelling event: state, item title, prompt, left, right, progress, message, and the
        strength back at its default (a strength picked for one item must not carry over to the next)."""
        item: Item | None = self.queue.next_item(user)
        progress = progress_html(user, self.queue.progress(user))
        if item is None:
            return (None, "### Nothing left to label", "", "", "", progress,
                    message or "Your queue is empty: every item has its votes. Thank you!", DEFAULT_STRENGTH)
        state = {"comparison_id": item.comparison_id, "shown_at": time.time()}
        return (state, f"### Item {item.comparison_id}", prompt_text(item.prompt), item.left, item.right,
                progress, message, DEFAULT_STRENGTH)

    def load(self, request: gr.Request):
        user = self.user(request)
        return (*self.show(user), gr.Tab(visible=user.role == "admin"))

    def next_item(self, request: gr.Request):
        return self.show(self.user(request))

    def answer(self, choice: str):
        def handler(strength: str, note: str, state: dict | None, request: gr.Request):
            user = self.user(request)
            if not state:
                return self.show(user, "Nothing was shown to answer; here is your next item.")
            if note and len(note) > MAX_NOTE_CHARS:
                raise gr.Error(f"the note is {len(note)} characters; the limit is {MAX_NOTE_CHARS}")
            try:
                self.queue.vote(user, state["comparison_id"], choice,
                                (strength or DEFAULT_STRENGTH) if choice in PREFERENCE_CHOICES else None, note or None,
                                seconds=round(time.time() - state["shown_at"], 2))
            except (DuplicateVote, ItemGone) as refused:
                return self.show(user, f"Not counted: {refused}. Here is your next item.")
            except StoreError as refused:  # a request the UI cannot make: a strength outside the vocabulary
                raise gr.Error(str(refused)) from None
            return self.show(user, f"Saved your vote on item {state['comparison_id']}.")
        handler.__name__ = f"vote_{choice}"
        return handler

    def skip(self, state: dict | None, request: gr.Request):
        user = self.user(request)
        if state:
            try:
                self.queue.skip(user, state["comparison_id"])
            except (DuplicateVote, ItemGone) as refused:
                return self.show(user, f"Not skipped: {refused}.")
        return self.show(user, "Skipped; someone else will take that item.")

    def admin_stats(self, request: gr.Request):
        from preference_ui.stats import batch_rows, labeller_rows, load_labels, summarise

        self.admin(request)
        labels = load_labels(self.store)
        report = summarise(labels, self.batch)
        summary = (f"**{report['votes']} votes** on {report['voted']}/{report['comparisons']} comparisons · "
                   f"Krippendorff's alpha {fmt(report['krippendorff_alpha'])} · pairwise agreement "
                   f"{fmt(report['pairwise_agreement'])}")
        return summary, batch_rows(labels), labeller_rows(report)

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


def build_app(store: Store, config: LabelsConfig, batch: str | None = None, local_user: str | None = None,
              export_root: Path = Path("runs/exports")) -> gr.Blocks:
    handlers = LabellingApp(store, config, batch, local_user, export_root)
    # With SQLite a labelling event is a few milliseconds of work in this process, done fastest on the event loop
    # itself: in a worker thread it would hand the interpreter lock back and forth at every database call
    # (measured in docs/benchmarks.md). A database server's round trips would stall the loop: threads for those.
    inline = on_event_loop if store.engine.dialect.name == "sqlite" else (lambda handler: handler)
    with gr.Blocks(title="RLHF labelling") as app:
        state = gr.State(None)
        with gr.Tab("Label"):
            title = gr.Markdown()
            progress = gr.HTML(elem_id="progress")
            prompt = gr.Textbox(label="Prompt", interactive=False, lines=2, max_lines=16, elem_id="prompt")
            with gr.Row():
                left = gr.Textbox(label="Response A", interactive=False, lines=10, max_lines=40,
                                  elem_id="response-a", elem_classes="response")
                right = gr.Textbox(label="Response B", interactive=False, lines=10, max_lines=40,
                                   elem_id="response-b", elem_classes="response")
            with gr.Row():
                buttons = {choice: gr.Button(text, elem_id=elem_id,
                                             variant="primary" if choice in ("a", "b") else "secondary")
                           for choice, text, elem_id in BUTTONS}
                skip = gr.Button("Skip  [s]", elem_id="skip", variant="stop")
            with gr.Row():
                strength = gr.Radio(["clear", "slight"], value=DEFAULT_STRENGTH, elem_id="strength",
                                    label="How much better? (for A or B; a tie or both bad has no strength)")
                note = gr.Textbox(label=f"Note (optional, up to {MAX_NOTE_CHARS} characters)", lines=1,
                                  max_length=MAX_NOTE_CHARS, elem_id="note")
            message = gr.Markdown(elem_id="message")
            with gr.Accordion("Guidelines", open=False):
                gr.Markdown(guidelines_markdown(config.guidelines))
        with gr.Tab("Admin", visible=False) as admin_tab:
            refresh = gr.Button("Refresh statistics")
            summary = gr.Markdown()
            batches = gr.Dataframe(headers=["batch", "comparisons", "voted", "votes", "alpha", "pairwise"],
                                   label="Progress per batch", interactive=False)
            labellers = gr.Dataframe(headers=["labeller", "votes", "s/vote", "gold votes", "gold accuracy"],
                                     label="Labellers (gold accuracy over every gold item)", interactive=False)
            with gr.Row():
                export_name = gr.Textbox(label=f"Export folder name (under {export_root}/)")
                min_votes = gr.Number(value=1, precision=0, minimum=1, label="Minimum votes per comparison")
            export_button = gr.Button("Export preference dataset")
            export_result = gr.Markdown()

        # Labelling events are a few milliseconds of database work each: they skip Gradio's queue, whose
        # bookkeeping costs more than the work (bench/label_load.py).
        shown = [state, title, prompt, left, right, progress, message, strength]
        app.load(inline(handlers.load), None, [*shown, admin_tab], api_name="load", queue=False)
        app.load(None, js=SHORTCUTS_JS)
        for choice, button in buttons.items():
            button.click(inline(handlers.answer(choice)), [strength, note, state], shown, api_name=f"vote_{choice}",
                         queue=False).success(lambda: "", None, note, api_visibility="private", queue=False)
        skip.click(inline(handlers.skip), [state], shown, api_name="skip", queue=False)
        gr.Button(visible=False).click(inline(handlers.next_item), None, shown, api_name="next_item", queue=False)
        refresh.click(handlers.admin_stats, None, [summary, batches, labellers], api_name="admin_stats")
        export_button.click(handlers.admin_export, [export_name, min_votes], export_result, api_name="admin_export",
                            concurrency_limit=1)
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


def serve(store: Store, config: LabelsConfig, host: str = "127.0.0.1", port: int = 7860, auth: bool = True,
          local_user: str | None = None, batch: str | None = None, ssl_keyfile: str | None = None,
          ssl_certfile: str | None = None, export_root: Path = Path("runs/exports")) -> None:
    check_host(host, auth)
    if not auth and (local_user is None or store.user(local_user) is None):
        raise UserError("--no-auth needs --user NAME, an existing user everyone on this machine will act as")
    if auth and not store.users():
        raise UserError("the store has no users yet: add one with `rlhf label users add NAME --role admin`")

    def sign_in(name: str, password: str) -> bool:
        return store.authenticate(name, password) is not None

    app = build_app(store, config, batch, local_user, export_root)
    app.queue(default_concurrency_limit=config.concurrency)
    print(f"[label serve] {store.engine.url.render_as_string(hide_password=True)} on http://{host}:{port}"
          f" ({'sign-in required' if auth else 'no sign-in, acting as ' + local_user})", flush=True)
    app.launch(server_name=host, server_port=port, auth=sign_in if auth else None, css=CSS, show_error=True,
               auth_message="Sign in with the account your admin made for you.", ssl_keyfile=ssl_keyfile,
               ssl_certfile=ssl_certfile, quiet=True, footer_links=[],
               max_threads=config.concurrency)
