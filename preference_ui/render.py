"""Model output as labellers see it: markdown rendered without any HTML of its own, or the same text plain.

Prompts and responses are untrusted. `shown_html` renders them with markdown-it's CommonMark rules and raw HTML
off, so any tag in the text comes out as visible characters; only absolute http(s) and mailto links stay links
(no `javascript:`, `data:` or links into the app itself), and they open in a new tab without a referrer; images
become links, so nothing is fetched when an item is shown. Invisible characters that change what text looks like
or says (control characters, bidirectional overrides, zero-width and tag characters) are shown as `⟨U+XXXX⟩` in
both views, written as characters or as HTML character references (`&#x202E;`), so what a labeller reads is what
is stored; link reference definitions (`[a]: http://...`) stay text too. The zero-width joiner is the one
exception: emoji are built with it.

Both views are sent; the page shows one, switched by the app's plain-text toggle (a class on <body>).
"""
import html
import re
import sys
import unicodedata

from markdown_it import MarkdownIt

KEPT = {"\n", "\t", "\u200d"}
INVISIBLE = re.compile("[" + "".join(re.escape(chr(code)) for code in range(sys.maxunicode + 1)
                                     if unicodedata.category(chr(code)) in ("Cc", "Cf") and chr(code) not in KEPT)
                       + "]")
MARKDOWN = MarkdownIt("commonmark", {"html": False}).disable(["image", "reference"])
# a web link names its host: "https:/logout" or "https:logout" is resolved by browsers against the page, so into
# the app (a backslash counts as a slash there)
LINK_SCHEMES = re.compile(r"https?://[^/\\\s]|mailto:", re.IGNORECASE)
MARKDOWN.validateLink = lambda url: LINK_SCHEMES.match(url.strip()) is not None


def open_links_apart(renderer, tokens, index, options, env):
    tokens[index].attrSet("target", "_blank")
    tokens[index].attrSet("rel", "noopener noreferrer nofollow")
    return renderer.renderToken(tokens, index, options, env)


MARKDOWN.add_render_rule("link_open", open_links_apart)


def visible_controls(text: str) -> str:
    text = text.replace("\r\n", "\n")
    return INVISIBLE.sub(lambda match: f"⟨U+{ord(match.group()):04X}⟩", text)


def views(text: str) -> str:
    """The text as rendered markdown and as plain text (the page shows one); the plain view keeps the text as
    stored in `data-raw`, for "Start from A/B" to copy (its shown form names invisible characters)."""
    shown = visible_controls(text)
    # character references (`&#x202E;`) become characters in the rendering: shown there as well
    return (f'<div class="as-markdown">{visible_controls(MARKDOWN.render(shown))}</div>'
            f'<pre class="as-text" data-raw="{html.escape(text, quote=True)}">{html.escape(shown)}</pre>')


def shown_html(text: str, css_class: str = "answer") -> str:
    """The text's two views in one scrolling box."""
    return f'<div class="{css_class}">{views(text)}</div>'


def conversation_html(messages: list[dict]) -> str:
    """A prompt in its scrolling box: one message as its text; with earlier turns, the whole conversation, each
    turn under its speaker's role (a label of ours, outside the untrusted text), the question answered last."""
    if len(messages) == 1:
        return shown_html(messages[0]["content"], "prompt")
    turns = "".join(f'<div class="turn"><div class="speaker">{html.escape(message["role"].title())}</div>'
                    f'{views(message["content"])}</div>' for message in messages)
    return f'<div class="prompt conversation">{turns}</div>'

