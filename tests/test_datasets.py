import json
import subprocess
import sys
import time

import datasets
import pytest

from rlhf.datasets import CHARS_PER_TOKEN_BOUND, cut_long_texts, deduplicate, load_rows, split_train_eval
from rlhf.errors import DataError
from tests.conftest import REPO

CHAT = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def problem(path, kind="sft") -> str:
    with pytest.raises(DataError) as caught:
        load_rows(path, kind)
    return str(caught.value)


def test_seed_data_loads_with_ids_categories_and_no_overlap():
    sft = load_rows(REPO / "data/sft_demonstrations.jsonl", "sft")
    rl = load_rows(REPO / "data/rl_prompts.jsonl", "prompt")
    held_out = load_rows(REPO / "data/eval_prompts.jsonl", "prompt")
    assert len(sft) >= 200 and len(rl) >= 200 and len(held_out) >= 100
    assert {"explain", "summarise", "list", "rewrite", "advise", "code", "arithmetic"} <= {r["category"] for r in sft}
    def texts(rows):
        return {r["prompt"][-1]["content"].strip().lower() for r in rows}

    assert not texts(rl) & texts(held_out)
    assert all(r["id"].startswith("eval-") for r in held_out)


def test_jsonl_messages_and_prompt_completion_become_the_same_canonical_row(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "category": "x", "messages": CHAT},
                                              {"id": "b", "prompt": "Hi there?", "completion": "Hello."}])
    rows = load_rows(path, "sft")
    assert rows[0] == {"id": "a", "category": "x", "messages": CHAT}
    assert rows[1]["messages"] == [{"role": "user", "content": "Hi there?"},
                                   {"role": "assistant", "content": "Hello."}]
    assert rows[1]["category"] == "general"


def test_json_array_reports_the_line_where_the_bad_row_starts(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"messages": %s},\n  {"messages": [\n    {"role": "user", "content": 7}]}\n]\n'
                    % json.dumps(CHAT))
    assert problem(path) == f"{path}:3: messages[0].content: expected a string, got int"


def test_csv_with_json_messages_and_plain_columns(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('id,prompt,completion\n1,"Say hi, please",Hi.\n2,"[{""role"": ""user"", ""content"": '
                    '""Q?""}]",A.\n')
    rows = load_rows(path, "sft")
    assert [r["messages"][0]["content"] for r in rows] == ["Say hi, please", "Q?"]
    path.write_text("id,prompt,completion\n1,Q?,A.\n2,Q2?,\n")
    assert problem(path) == f"{path}:3: completion: expected a string or a list of messages, got null"
    # text that starts with "[" stays text: a tagged prompt, an answer that is a JSON list of strings
    path.write_text('prompt,completion\n[INST] say hi,Hi.\nColours as JSON?,"[""red"", ""green""]"\n')
    assert [[m["content"] for m in r["messages"]] for r in load_rows(path, "sft")] == [
        ["[INST] say hi", "Hi."], ["Colours as JSON?", '["red", "green"]']]
    path.write_text('prompt,completion\n"[{""role"": ""user"", ""content"": ""Q?""",A.\n')  # messages, cut short
    assert problem(path).startswith(f"{path}:2: prompt: looks like a JSON list of messages but does not parse")
    # a cell longer than the csv module's default limit (131072 characters) is read, not called bad quoting
    path.write_text(f'prompt,completion\nQ?,"{"word " * 40000}"\n')
    assert len(load_rows(path, "sft")[0]["messages"][1]["content"]) == 200000


def test_a_long_json_array_is_read_in_linear_time_with_each_items_line(tmp_path):
    path = tmp_path / "d.json"
    rows = [{"prompt": f"Question {i}?", "completion": "An answer.\n" * 20} for i in range(20000)]
    path.write_text("[\n" + ",\n".join(json.dumps(row, indent=1) for row in rows) + "\n]\n")
    started = time.perf_counter()
    assert len(load_rows(path, "sft")) == 20000
    assert time.perf_counter() - started < 10  # about 1 s; counting lines from the start each time took minutes
    rows[-1]["prompt"] = 7
    path.write_text("[\n" + ",\n".join(json.dumps(row, indent=1) for row in rows) + "\n]\n")
    assert problem(path) == f"{path}:{2 + 4 * 19999}: prompt: expected a string or a list of messages, got int"


def test_parquet_and_saved_dataset_folder(tmp_path):
    table = datasets.Dataset.from_list([{"id": "p1", "prompt": "Q?", "chosen": "Good.", "rejected": "Bad."}])
    table.to_parquet(tmp_path / "pairs.parquet")
    datasets.DatasetDict({"train": table}).save_to_disk(tmp_path / "saved")
    for source in (tmp_path / "pairs.parquet", tmp_path / "saved"):
        [pair] = load_rows(source, "preference")
        assert pair["chosen"] == [{"role": "assistant", "content": "Good."}]
        assert pair["prompt"] == [{"role": "user", "content": "Q?"}]
        assert (pair["tie"], pair["both_bad"], pair["margin"]) == (False, False, None)


def test_parquet_wrong_type_names_the_row(tmp_path):
    datasets.Dataset.from_list([{"prompt": "Q?", "completion": "A."}, {"prompt": "Q2?", "completion": "B."}]
                               ).to_parquet(tmp_path / "ok.parquet")
    datasets.Dataset.from_list([{"messages": CHAT}, {"messages": [{"role": "robot", "content": "x"}]}]
                               ).to_parquet(tmp_path / "bad.parquet")
    assert len(load_rows(tmp_path / "ok.parquet", "sft")) == 2
    assert problem(tmp_path / "bad.parquet") == \
        f"{tmp_path / 'bad.parquet'}:2: messages[0].role: 'robot' is not one of system, user, assistant"


def test_conversational_completions_and_pairs_start_with_the_assistant(tmp_path):
    answer = [{"role": "assistant", "content": "Hello."}]
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": CHAT[:1], "completion": answer}])
    assert load_rows(path, "sft")[0]["messages"] == CHAT
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": CHAT[:1], "chosen": answer,
                                               "rejected": [{"role": "assistant", "content": "No."}]}])
    assert load_rows(path, "preference")[0]["chosen"] == answer
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": CHAT[:1], "completion": CHAT[:1]}])
    assert problem(path) == f"{path}:1: prompt+completion[1].role: roles out of order: expected assistant, " \
                            "got user (an optional system message, then user and assistant alternating)"


def test_a_json_file_may_hold_one_object(tmp_path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps({"id": "solo", "messages": CHAT}, indent=2))
    assert load_rows(path, "sft") == [{"id": "solo", "category": "general", "messages": CHAT}]
    path.write_text('\n\n  [ {"messages": %s} ,\n {"text": "[x]"} ]' % json.dumps(CHAT))
    assert problem(path).startswith(f"{path}:4: text: plain 'text' rows")


def test_implicit_prompt_preference_pairs_are_split_at_the_shared_turns(tmp_path):
    chosen = CHAT[:1] + [{"role": "assistant", "content": "Hello!"}]
    rejected = CHAT[:1] + [{"role": "assistant", "content": "Go away."}]
    path = write_jsonl(tmp_path / "p.jsonl", [{"chosen": chosen, "rejected": rejected, "tie": False,
                                               "margin": 2, "labeller": "ann"}])
    [pair] = load_rows(path, "preference")
    assert pair["prompt"] == CHAT[:1] and pair["chosen"] == chosen[1:] and pair["rejected"] == rejected[1:]
    assert pair["margin"] == 2.0 and pair["labeller"] == "ann"


@pytest.mark.parametrize("content, expected", [
    (b"", "{path}: rows: no rows (the file is empty)"),
    (b'{"id": "1", "messages": []}\n', "{path}:1: messages: is empty"),
    (b'{"id": "1", "answer": "x"}\n', "{path}:1: messages: missing (found columns: answer, id; expected "
                                      "'messages' or 'prompt' and 'completion')"),
    (b'{"messages": "hello"}\n', "{path}:1: messages: expected a list of messages, got str"),
    (b'{"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}\n',
     "{path}:1: messages[0].role: roles out of order: expected user, got assistant (an optional system "
     "message, then user and assistant alternating)"),
    (b'{"messages": [{"role": "user", "content": "x"}]}\n',
     "{path}:1: messages[0].role: the last message must be from the assistant, got user"),
    (b'{"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "y"}]}\n',
     "{path}:1: messages[0].content: is empty"),
    (b'\n{"text": "just text"}\n', "{path}:2: text: plain 'text' rows have no assistant turn to train on; "
                                   "give 'messages' or 'prompt' and 'completion'"),
    (b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "b"}\n',
     "{path}:2: encoding: not valid UTF-8 (byte 0xe9 at column 16)"),
    (b'{"prompt": "a", "completion": "b"}\n{"prompt": "a",\n', "{path}:2: json: Expecting property name "
                                                                 "enclosed in double quotes at column 16"),
    (b'[1, 2]', "{path}:1: row: expected an object, got int"),
    (b'{"id": "1", "messages": null}\n', "{path}:1: messages: is null (expected 'messages' or 'prompt' and "
                                        "'completion')"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, content, expected):
    path = tmp_path / ("d.json" if content.startswith(b"[") else "d.jsonl")
    path.write_bytes(content)
    assert problem(path) == expected.format(path=path)


def test_a_lone_surrogate_is_refused_in_every_text_field_not_only_the_messages(tmp_path):
    path = tmp_path / "d.jsonl"
    for kind, row, field in (("sft", {"id": "p\ud800", "prompt": "Hi?", "completion": "Yes."}, "id"),
                             ("prompt", {"prompt": "Hi?", "category": "c\ud800"}, "category"),
                             ("preference", {"prompt": "Q?", "chosen": "A.", "rejected": "B.",
                                             "labeller": "\ud800"}, "labeller"),
                             ("preference", {"prompt": "Q?", "chosen": "A.", "rejected": "B.", "labeller_votes": [
                                 {"labeller": "ann\ud800", "verdict": "chosen"}]}, "labeller_votes[0].labeller")):
        write_jsonl(path, [row])  # json.dumps writes the escape, as a JSON writer may
        assert problem(path, kind).startswith(f"{path}:1: {field}: holds a lone surrogate"), (kind, field)


def test_a_byte_order_mark_is_read_past_in_jsonl_json_and_csv(tmp_path):
    bom = b"\xef\xbb\xbf"
    files = {"d.jsonl": b'{"prompt": "Hi?", "completion": "Hello."}\n',
             "d.json": b'[{"prompt": "Hi?", "completion": "Hello."}]',
             "d.csv": b'prompt,completion\r\nHi?,Hello.\r\n'}
    for name, content in files.items():
        (tmp_path / name).write_bytes(bom + content)
        [row] = load_rows(tmp_path / name, "sft")
        assert row["messages"] == [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]


def test_csv_is_parsed_strictly_and_names_the_line_a_bad_quote_starts_on(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('prompt,completion\nHi?,Hello.\n"Unclosed,quote\nMore?,Yes.\nLast?,No.\n')
    assert problem(path) == f"{path}:3: csv: a quoted cell that starts on this line is never closed"
    path.write_text('prompt,completion\nHi?,Hello.\nA "quoted" word?,Yes.\n"Say "hi"",No.\n')
    assert problem(path).startswith(f"{path}:4: csv: bad quoting (")
    path.write_text('prompt,completion\n"Unclosed,quote\nMore?,Yes.\n')  # in the first row, read with the header
    assert problem(path) == f"{path}:2: csv: a quoted cell that starts on this line is never closed"
    path.write_text('prompt,"completion\nHi?,Hello.\n')
    assert problem(path) == f"{path}:1: csv: a quoted cell that starts on this line is never closed"
    path.write_text('prompt,completion\n\nHi?,Hello.\n\n"Unclosed,quote\n')  # blank lines counted
    assert problem(path) == f"{path}:5: csv: a quoted cell that starts on this line is never closed"


def test_a_csv_cell_is_never_lost_to_a_short_row_or_a_repeated_column(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,chosen,rejected,margin\nHi?,Hello.,Go away.,2\nHi again?,Hello.,Go away.\n")
    assert problem(path, "preference") == f"{path}:3: row: has 3 cells but the header has 4"
    path.write_text("prompt,completion,prompt\nHi?,Hello.,Other?\n")
    assert problem(path) == f"{path}:1: header: names the column 'prompt' more than once"
    path.write_text("\nprompt,completion\n\nHi?,Hello.\n")
    [row] = load_rows(path, "sft")
    assert row["messages"][1]["content"] == "Hello."


def test_json_a_reader_cannot_hold_and_text_after_an_array_are_named_not_raised(tmp_path):
    deep, digits, row = "[" * 100_000, "1" * 5000, '{"prompt": "Hi?", "completion": "Yes."}'
    for name, content, expected in (
            ("d.jsonl", f"{row}\n{deep}\n", "{path}:2: json: nested too deeply to read"),
            ("d.json", deep, "{path}: json: nested too deeply to read"),
            ("d.jsonl", '{"id": %s, "prompt": "a", "completion": "b"}\n' % digits,
             "{path}:1: json: Exceeds the limit (4300 digits) for integer string conversion: value has 5000 digits"),
            ("d.json", f"[{row}]\nxyz\n", "{path}:2: json: Extra data at column 1"),
            ("d.json", f"{row}\nxyz\n", "{path}:2: json: Expecting value at column 1")):
        path = tmp_path / name
        path.write_text(content)
        assert problem(path) == expected.format(path=path), name


def test_a_nul_character_is_refused_in_texts_and_ids(tmp_path):
    path = tmp_path / "d.jsonl"
    for kind, row, field in (("sft", {"id": "p\x00", "prompt": "Hi?", "completion": "Yes."}, "id"),
                             ("preference", {"prompt": "Q?", "chosen": "A\x00.", "rejected": "B."}, "chosen")):
        write_jsonl(path, [row])
        assert problem(path, kind) == (f"{path}:1: {field}: holds a NUL character (\\u0000) at character 2: not "
                                       "text a label store can keep"), kind


def test_a_pair_whose_two_answers_are_the_same_is_refused(tmp_path):
    rows = [{"prompt": "Hi?", "chosen": "Hello.", "rejected": "Hey."},
            {"prompt": "Hi?", "chosen": "Yo.", "rejected": "Yo."}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    assert problem(path, "preference") == (f"{path}:2: rejected: is the same answer as 'chosen': a pair needs two "
                                           "different answers")
    missing = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "Hi?", "chosen": "Hello.", "rejected": None}])
    assert problem(missing, "preference") == f"{missing}:1: rejected: is null"


def test_text_past_what_max_length_tokens_can_cover_is_cut_before_tokenizing_and_keeps_the_same_tokens(
        tiny_tokenizer, capsys):
    from sft.train import tokenize_conversation

    longest = max(len(tiny_tokenizer.convert_tokens_to_string([token])) for token in tiny_tokenizer.get_vocab())
    assert longest <= CHARS_PER_TOKEN_BOUND
    long_answer = "the quick brown fox jumps over the lazy dog " * 5000  # 220,000 characters
    short = {"id": "s", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    long = {"id": "l", "messages": [{"role": "user", "content": "Tell a story."},
                                    {"role": "assistant", "content": long_answer}]}
    kept_short, kept_long = cut_long_texts([short, long], 64, "data.jsonl", "sft")
    assert kept_short == short and len(kept_long["messages"][1]["content"]) == 64 * CHARS_PER_TOKEN_BOUND
    assert "[sft] 1 row(s) of data.jsonl hold text longer than max_length (64 tokens)" in capsys.readouterr().out
    whole = tokenize_conversation(tiny_tokenizer, long["messages"])["input_ids"]
    assert tokenize_conversation(tiny_tokenizer, kept_long["messages"])["input_ids"][:64] == whole[:64]
    assert cut_long_texts([long], None, "data.jsonl", "sft") == [long]  # no max_length: nothing cut


def test_missing_file_and_unknown_type(tmp_path):
    assert problem(tmp_path / "nope.jsonl") == f"{tmp_path / 'nope.jsonl'}: file: not found"
    (tmp_path / "d.txt").write_text("x")
    assert "unsupported type '.txt'" in problem(tmp_path / "d.txt")


def test_a_path_in_a_local_folder_is_a_missing_file_not_a_hub_dataset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    assert problem("data/gold") == "data/gold: file: not found"


def test_offline_hub_id_fails_with_a_clear_error():
    assert problem("someone/some-dataset").startswith("someone/some-dataset: source: not a local file or folder, "
                                                      "and not loadable from the hub")


def test_duplicates_are_removed_and_conflicting_ids_refused(tmp_path):
    rows = [{"id": "a", "messages": CHAT}, {"id": "b", "messages": CHAT}, {"id": "a", "messages": CHAT}]
    assert [r["id"] for r in load_rows(write_jsonl(tmp_path / "d.jsonl", rows), "sft")] == ["a"]
    other = [{"role": "user", "content": "Other?"}, {"role": "assistant", "content": "Yes."}]
    path = write_jsonl(tmp_path / "e.jsonl", [{"id": "a", "messages": CHAT}, {"id": "a", "messages": other}])
    assert problem(path) == f"{path}:2: id: duplicate id 'a' with different content (first at 1)"
    assert len(deduplicate([{"id": "x", "messages": CHAT}, {"id": "y", "messages": CHAT}])) == 1
    # the same row filed under two categories: refused, not one category silently kept
    path = write_jsonl(tmp_path / "f.jsonl", [{"id": "a", "category": "code", "messages": CHAT},
                                              {"id": "a", "category": "maths", "messages": CHAT}])
    assert problem(path) == f"{path}:2: category: duplicate id 'a' with another category ('maths', 'code' at 1)"
    path = write_jsonl(tmp_path / "g.jsonl", [{"category": "code", "messages": CHAT},
                                              {"category": "maths", "messages": CHAT}])
    assert problem(path) == (f"{path}:2: category: the same text as the row at 1, with another category: give each "
                             "row an id, or keep one of them")


def test_one_preference_row_per_vote_keeps_each_labellers_vote_and_csv_numbers_are_numbers(tmp_path):
    """Without ids, the same pair voted on by two labellers is two rows (the same labeller twice is one), and
    CSV cells of margin and pair_weight are read as numbers."""
    vote = {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."}
    path = write_jsonl(tmp_path / "votes.jsonl", [{**vote, "labeller": "ann"}, {**vote, "labeller": "bob"},
                                                  {**vote, "labeller": "ann"}, vote])
    assert [row["labeller"] for row in load_rows(path, "preference")] == ["ann", "bob", None]
    path = write_jsonl(tmp_path / "conflict.jsonl", [{**vote, "labeller": "ann"}, {**vote, "labeller": "ann",
                                                                                    "margin": 2.0}])
    assert problem(path, "preference") == (f"{path}:2: margin: the same text as the row at 1, with another margin: "
                                           "give each row an id, or keep one of them")  # (not a made-up id)
    path = write_jsonl(tmp_path / "answers.jsonl", [{"prompt": "2+2?", "answer": 4}, {"prompt": "2+2?", "answer": 5}])
    assert problem(path, "prompt") == (f"{path}:2: answer: the same text as the row at 1, with another answer: "
                                       "give each row an id, or keep one of them")
    path = tmp_path / "ranked.csv"
    path.write_text("prompt,chosen,rejected,margin,ranking,pair_weight\nHi?,Hello.,Go away.,1.5,r1,0.5\n")
    [row] = load_rows(path, "preference")
    assert (row["margin"], row["pair_weight"]) == (1.5, 0.5)
    path.write_text("prompt,chosen,rejected,ranking,pair_weight\nHi?,Hello.,Go away.,r1,half\n")
    assert problem(path, "preference") == f"{path}:2: pair_weight: expected a number, got 'half'"


def test_split_is_deterministic_independent_of_order_and_disjoint():
    rows = [{"id": f"r{i}", "messages": CHAT} for i in range(50)]
    train, held_out = split_train_eval(rows, 0.2, seed=3)
    train2, held_out2 = split_train_eval(list(reversed(rows)), 0.2, seed=3)
    assert len(held_out) == 10 and len(train) == 40
    assert {r["id"] for r in held_out} == {r["id"] for r in held_out2}
    assert not {r["id"] for r in train} & {r["id"] for r in held_out}
    assert {r["id"] for r in split_train_eval(rows, 0.2, seed=4)[1]} != {r["id"] for r in held_out}
    assert split_train_eval(rows[:3], 0.01)[1] and not split_train_eval(rows, 0.0)[1]
    assert [len(part) for part in split_train_eval(rows[:2], 0.9)] == [1, 1]  # training always keeps a row


def test_a_grouped_split_keeps_each_group_on_one_side():
    rows = [{"id": f"r{i}", "prompt": f"p{i // 4}"} for i in range(40)]  # 10 prompts, 4 rows each
    train, held_out = split_train_eval(rows, 0.2, seed=1, group=lambda row: row["prompt"])
    assert len(held_out) == 8 and len({row["prompt"] for row in held_out}) == 2
    assert not {row["prompt"] for row in train} & {row["prompt"] for row in held_out}


def test_bad_data_on_the_command_line_exits_2_with_one_line_and_writes_nothing(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": CHAT}, {"messages": [{"role": "user"}]}])
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "sft", "--config", "configs/tiny.yaml",
                             f"--run.output_root={tmp_path / 'runs'}", f"--sft.train_data={bad}"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {bad}:2: messages[0].content: missing"
    assert not (tmp_path / "runs").exists()


def test_an_output_root_that_cannot_be_written_exits_2_with_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "sft", "--config", "configs/tiny.yaml",
                             f"--run.output_root={blocker / 'runs'}", "--run.tracking=none"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {blocker / 'runs' / 'tiny'}: Not a directory"
    assert blocker.read_text() == "not a folder"
