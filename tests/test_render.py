"""How prompts and answers are shown (preference_ui/render.py): a prompt with earlier turns as its conversation."""
from preference_ui.render import conversation_html, shown_html

TURNS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a <b>bird</b>."},
         {"role": "assistant", "content": "A robin."}, {"role": "user", "content": "Another **one**?"}]


def test_a_one_turn_prompt_is_its_text_and_a_conversation_shows_every_turn_under_its_speaker():
    assert conversation_html(TURNS[1:2]) == shown_html("Name a <b>bird</b>.", "prompt")
    shown = conversation_html(TURNS)
    assert shown.startswith('<div class="prompt conversation">') and shown.count('<div class="turn">') == 4
    speakers = [part.split("</div>")[0] for part in shown.split('<div class="speaker">')[1:]]
    assert speakers == ["System", "User", "Assistant", "User"]
    assert shown.index("A robin.") < shown.index("Another <strong>one</strong>?")  # the question asked last
    assert "<b>bird</b>" not in shown and "&lt;b&gt;bird&lt;/b&gt;" in shown  # the text stays inert


def markdown_view(text: str) -> str:
    return shown_html(text).split('<pre class="as-text"')[0]


def test_invisible_characters_written_as_character_references_are_named_in_the_markdown_view_too():
    shown = markdown_view("reads &#x202E;backwards, a hidden&#8203;space and a soft&shy;hyphen")
    assert "⟨U+202E⟩" in shown and "⟨U+200B⟩" in shown and "⟨U+00AD⟩" in shown
    assert not any(char in shown for char in "\u202e\u200b\u00ad")


def test_only_absolute_web_and_mail_links_stay_links_and_reference_definitions_stay_text():
    shown = markdown_view("[pixel](data:image/png;base64,AAAA) [out](/logout) [rel](labels?x=1) "
                          "[run](javascript:alert(1)) [web](https://example.com/a) [mail](mailto:a@example.com) "
                          "<HTTP://example.com/b> [same](https:/logout) <https:logout> [three](https:///logout) "
                          "[back](https:\\\\logout)\n\n[a]: https://hidden.example\n\nsee [a]")
    links = [part.split('"')[0] for part in shown.split('<a href="')[1:]]
    assert links == ["https://example.com/a", "mailto:a@example.com", "HTTP://example.com/b"]
    for text in ("[pixel](data:image/png;base64,AAAA)", "[out](/logout)", "[rel](labels?x=1)", "[same](https:/logout)",
                 "&lt;https:logout&gt;", "[three](https:///logout)",
                 "[a]: https://hidden.example", "see [a]"):
        assert text in shown
