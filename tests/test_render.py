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
