"""Load JSONL, JSON, Parquet, CSV, a saved HF dataset folder or a hub id into canonical rows (`rlhf.schema`).

A bad row stops the load with `DataError`: `file:line: field: problem`. For JSONL, JSON and CSV the number is
the line in the file where the row starts (CSV: where it ends, for a quoted field over several lines); for
Parquet and saved datasets, which have no lines, it is the row number counted from 1.
"""
import csv
import hashlib
import io
import json
from pathlib import Path
from typing import Callable

from rlhf.errors import DataError
from rlhf.schema import ROW_KINDS, RowProblem, content_hash

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
# CSV cells are text; these columns hold JSON (lists of messages) or typed values when they look like it.
CSV_JSON_COLUMNS = ("messages", "prompt", "completion", "chosen", "rejected")
CSV_BOOL_COLUMNS = ("tie", "both_bad")
CSV_NUMBER_COLUMNS = ("margin", "pair_weight")


def load_rows(source, kind: str) -> list[dict]:
    """Canonical rows of `kind` ("sft", "prompt", "preference" or "gold") from `source`, duplicates removed."""
    to_canonical = ROW_KINDS[kind]
    rows, first_line_of = [], {}
    for line, raw in read_records(source):
        if not isinstance(raw, dict):
            raise DataError(source, line, "row", f"expected an object, got {type(raw).__name__}")
        try:
            row = to_canonical(raw)
        except RowProblem as problem:
            raise DataError(source, line, problem.field, problem.problem) from None
        if row["id"] in first_line_of:
            check_duplicate_id(source, line, row, rows, first_line_of[row["id"]], raw.get("id") not in (None, ""))
            continue
        first_line_of[row["id"]] = (line, len(rows))
        rows.append(row)
    if not rows:
        raise DataError(source, None, "rows", "no rows (the file is empty)")
    return deduplicate(rows)


def line_of(source, row_id: str, kind: str) -> int | None:
    """The line (or row number) where the row `row_id` of a loaded `kind` file starts, for an error found after
    loading."""
    to_canonical = ROW_KINDS[kind]
    return next((line for line, raw in read_records(source) if to_canonical(raw)["id"] == row_id), None)


def first_rows(rows: list[dict], count: int, source, setting: str) -> list[dict]:
    """The first `count` rows (all when 0). More than the file holds is an error naming the setting (the stage
    went on with fewer, its report counting what was there)."""
    if count > len(rows):
        raise DataError(source, None, "rows", f"{setting} is {count}, but the file holds {len(rows)} distinct rows")
    return rows[:count or None]


# No token of the tokenizers we meet spans more characters than this (SmolLM2's longest: 81, a run of spaces), so
# text past max_length times it cannot reach the tokens a stage keeps.
CHARS_PER_TOKEN_BOUND = 128


def cut_long_texts(rows: list[dict], max_tokens: int | None, source, stage: str) -> list[dict]:
    """`rows` with every message text longer than `max_tokens` tokens could span cut there, before tokenization
    (a 10 MB row took 2 GB to tokenize whole, then lost all but its first tokens). The stage truncates, or drops,
    such rows as it did; it says how many it cut."""
    if not max_tokens:
        return rows
    limit, cut, out = max_tokens * CHARS_PER_TOKEN_BOUND, 0, []
    for row in rows:
        if any(len(message["content"]) > limit for value in row.values() if is_messages(value) for message in value):
            cut += 1
            row = {key: [{**m, "content": m["content"][:limit]} for m in value] if is_messages(value) else value
                   for key, value in row.items()}
        out.append(row)
    if cut:
        print(f"[{stage}] {cut} row(s) of {source} hold text longer than max_length ({max_tokens} tokens) can "
              f"cover: cut at {limit:,} characters before tokenizing", flush=True)
    return out


def is_messages(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "content" in m for m in value)


def check_duplicate_id(source, line, row, rows, first, id_given: bool):
    """A row named as an earlier one must hold the same content. A row without an id is named by its texts: one
    repeating an earlier row's texts with something else different (a prompt's reference answer) contradicts it."""
    first_line, index = first
    earlier = rows[index]
    if content_key(earlier) == content_key(row) and earlier.get("category") == row.get("category"):
        return
    if id_given and content_key(earlier) != content_key(row):
        raise DataError(source, line, "id", f"duplicate id '{row['id']}' with different content (first at "
                                            f"{first_line})")
    if id_given:  # the same text filed under two categories: which one holds is not for us to pick
        raise DataError(source, line, "category", f"duplicate id '{row['id']}' with another category "
                                                  f"('{row['category']}', '{earlier['category']}' at {first_line})")
    differing = sorted(key for key in {*row, *earlier} - {"id"} if row.get(key) != earlier.get(key))
    raise DataError(source, line, differing[0], f"the same text as the row at {first_line}, with another "
                                                f"{', '.join(differing)}: give each row an id, or keep one of them")


def content_key(row: dict) -> str:
    return content_hash({k: v for k, v in row.items() if k not in ("id", "category")})


def deduplicate(rows: list[dict]) -> list[dict]:
    """Drops rows whose content (everything but id and category) repeats an earlier row's."""
    seen, kept = set(), []
    for row in rows:
        key = content_key(row)
        if key not in seen:
            seen.add(key)
            kept.append(row)
    return kept


def split_train_eval(rows: list[dict], eval_fraction: float, seed: int = 0,
                     group: Callable[[dict], str] | None = None) -> tuple[list[dict], list[dict]]:
    """A split that depends only on the ids (or the `group` keys) and the seed, not on row order: the keys are
    ranked by a hash of seed and key and the first `eval_fraction` of them go to eval (at least one when the
    fraction is above 0, and never all: training needs one). Rows sharing a group key land on the same side."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    key = group or (lambda row: row["id"])
    keys = sorted({key(row) for row in rows}, key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).hexdigest())
    n_eval = 0
    if eval_fraction > 0 and len(keys) >= 2:
        n_eval = min(len(keys) - 1, max(1, round(len(keys) * eval_fraction)))
    held_out = set(keys[:n_eval])
    return [r for r in rows if key(r) not in held_out], [r for r in rows if key(r) in held_out]


def read_records(source):
    """Yields (line or row number, raw record) from any supported source."""
    path = Path(source)
    if path.is_dir():
        return read_saved_dataset(path)
    if path.suffix in LOCAL_SUFFIXES or path.exists() or str(source).startswith((".", "/")) or in_local_folder(path):
        if not path.is_file():
            raise DataError(source, None, "file", "not found")
        readers = {".jsonl": read_jsonl, ".json": read_json, ".csv": read_csv, ".parquet": read_parquet}
        if path.suffix not in readers:
            raise DataError(source, None, "file", f"unsupported type '{path.suffix}' "
                                                  f"(use {', '.join(LOCAL_SUFFIXES)} or a saved dataset folder)")
        return readers[path.suffix](path)
    return read_hub_dataset(str(source))


def in_local_folder(path: Path) -> bool:
    """`data/gold` names a file in the folder `data` here, not the hub dataset `data/gold` (asking the hub for
    it took 24 s offline, then said it was no hub dataset)."""
    return len(path.parts) > 1 and Path(path.parts[0]).is_dir()


def decode(path: Path, data: bytes, line_offset: int = 0) -> str:
    """UTF-8 text; a byte-order mark at the start of the file (as Windows editors write it) is dropped."""
    try:
        return data.decode("utf-8-sig" if line_offset == 0 else "utf-8")
    except UnicodeDecodeError as err:
        line = line_offset + data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataError(path, line, "encoding", f"not valid UTF-8 (byte 0x{data[err.start]:02x} at column "
                                                f"{column})") from None


def read_jsonl(path: Path):
    for number, raw_line in enumerate(path.read_bytes().split(b"\n"), 1):
        text = decode(path, raw_line, number - 1)
        if not text.strip():
            continue
        try:
            yield number, json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(path, number, "json", f"{err.msg} at column {err.colno}") from None
        except (RecursionError, ValueError) as err:
            raise DataError(path, number, "json", unreadable(err)) from None


def read_json(path: Path):
    """A JSON array of objects, or one object (one row); a .json file of JSON lines also works."""
    text = decode(path, path.read_bytes())
    if not text.strip():
        return
    try:
        document = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data" and text.lstrip().startswith("{"):  # objects one after another: JSON lines
            yield from read_jsonl(path)
            return
        raise DataError(path, err.lineno, "json", f"{err.msg} at column {err.colno}") from None
    except (RecursionError, ValueError) as err:
        raise DataError(path, None, "json", unreadable(err)) from None
    if isinstance(document, dict):
        yield text[:len(text) - len(text.lstrip())].count("\n") + 1, document
    elif isinstance(document, list):
        yield from array_items_with_lines(text)
    else:
        raise DataError(path, 1, "json", f"expected an array of objects or one object, got {type(document).__name__}")


def unreadable(err: Exception) -> str:
    """What Python's JSON reader refuses beyond the grammar: nesting deeper than its recursion limit, an integer
    of more digits than it converts."""
    if isinstance(err, RecursionError):
        return "nested too deeply to read"
    return str(err).split(";")[0]


def array_items_with_lines(text: str):
    """The items of a JSON array (already known to parse) with the line each starts on."""
    decoder, index = json.JSONDecoder(), len(text) - len(text.lstrip()) + 1  # just past the opening "["
    line, counted_to = 1, 0  # the lines counted as the items go (counting from the start each time is quadratic)
    while True:
        while text[index] in " \t\r\n,":
            index += 1
        if text[index] == "]":
            return
        item, end = decoder.raw_decode(text, index)
        line, counted_to = line + text.count("\n", counted_to, index), index
        yield line, item
        index = end


def read_csv(path: Path):
    """Rows of a CSV file with a header line, parsed strictly: a bad quote is an error naming the line its row
    starts on (a lenient parser would swallow the rest of the file into one cell), and so is a row with more or
    fewer cells than the header, or a header naming a column twice (a cell would be lost). Blank lines are
    skipped."""
    text = decode(path, path.read_bytes())
    csv.field_size_limit(max(csv.field_size_limit(), len(text)))  # a long answer is no quoting problem
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header = None
    while True:
        start = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            raise DataError(path, start, "csv", quoting_problem(err)) from None
        if not cells:
            continue
        if header is None:
            header = checked_header(path, reader.line_num, cells)
            continue
        if len(cells) != len(header):
            raise DataError(path, reader.line_num, "row", f"has {len(cells)} cells but the header has {len(header)}")
        yield reader.line_num, {key: csv_value(path, reader.line_num, key, value) for key, value in zip(header, cells)}


def checked_header(path: Path, line: int, names: list[str]) -> list[str]:
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise DataError(path, line, "header", f"names the column {', '.join(map(repr, repeated))} more than once")
    return names


def quoting_problem(err: csv.Error) -> str:
    if "end of data" in str(err):
        return "a quoted cell that starts on this line is never closed"
    return f"bad quoting ({err})"


def csv_value(path, line, key, value):
    if value is None or value == "":
        return None
    if key in CSV_JSON_COLUMNS and value.lstrip().startswith("["):
        return messages_or_text(path, line, key, value)
    if key in CSV_BOOL_COLUMNS and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    if key in CSV_NUMBER_COLUMNS:
        try:
            return float(value)
        except ValueError:
            raise DataError(path, line, key, f"expected a number, got '{value}'") from None
    return value


def messages_or_text(path, line, key, value: str):
    """A cell holding a JSON list of messages is that list; other text stays text, "[INST] say hi" or an answer
    that is a JSON list of strings among it. A cell that names a "role" but does not parse is an error."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as err:
        if '"role"' in value:
            raise DataError(path, line, key, f"looks like a JSON list of messages but does not parse: {err.msg}"
                            ) from None
        return value
    return parsed if isinstance(parsed, list) and all(isinstance(item, dict) for item in parsed) else value


def read_parquet(path: Path):
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.read_table(path)
    except Exception as err:  # pyarrow raises several types for damaged files
        raise DataError(path, None, "file", f"not a readable Parquet file ({err})") from None
    yield from enumerate(table.to_pylist(), 1)


def read_saved_dataset(path: Path):
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:  # load_from_disk raises FileNotFoundError or ValueError for non-datasets
        raise DataError(path, None, "folder", f"not a saved HF dataset ({err})") from None
    yield from enumerate(train_split(loaded, path), 1)


def read_hub_dataset(name: str):
    import datasets

    try:
        loaded = datasets.load_dataset(name)
    except Exception as err:  # network, auth and missing-dataset errors all end here
        raise DataError(name, None, "source", "not a local file or folder, and not loadable from the hub "
                                              f"({type(err).__name__}: {err})") from None
    yield from enumerate(train_split(loaded, name), 1)


def train_split(loaded, where):
    if hasattr(loaded, "keys"):  # a DatasetDict
        if "train" in loaded:
            return loaded["train"]
        if len(loaded) == 1:
            return next(iter(loaded.values()))
        raise DataError(where, None, "split", f"several splits ({', '.join(loaded)}) and none is 'train'")
    return loaded
