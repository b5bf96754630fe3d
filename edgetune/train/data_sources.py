"""Read the rows of a data set from wherever it is: a file, a ``save_to_disk`` folder or the Hugging Face hub.

``read_data`` returns a ``RawData``: the whole text of a ``.txt`` file, or one plain-Python dict per row of every
other source, with the numbers that error messages show for each row. Deciding what the rows mean is
``edgetune.train.data_formats``' job.

``datasets`` and ``pyarrow`` are the optional extra ``edgetune[data]``; they are imported only for the sources that
need them, so .txt, .jsonl, .json and .csv files read without them.
"""

import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgetune.errors import EdgetuneError

SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".parquet")
# A hub repo id is `name` or `org/name` of letters, digits, '-', '_' and '.' (huggingface_hub's validate_repo_id).
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}(/[\w.-]{1,96})?")
_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number"}


@dataclass(frozen=True)
class RawData:
    """The rows of one data source, not yet interpreted.

    Args:
        source: how messages name the data: the path as given, or "hub data set org/name (split train)".
        text: the whole text of a .txt file (BOM dropped, newlines normalised to \\n); None for other sources.
        rows: one plain-Python dict per row; [] for a .txt file.
        row_word: "line" where row numbers are file lines (.jsonl, .csv, a .json file of JSON Lines), else "row".
        row_numbers: the number messages show for ``rows[i]``: the file line where a row starts (.jsonl, .csv;
            blank lines skipped), else i + 1.
    """

    source: str
    text: str | None
    rows: list[dict]
    row_word: str
    row_numbers: list[int]

    def where(self, index: int) -> str:
        """Where ``rows[index]`` is, for messages, e.g. "data.jsonl line 7" or "train.parquet row 3"."""
        return f"{self.source} {self.row_word} {self.row_numbers[index]}"


def read_data(path: str | Path, *, split: str = "train", subset: str | None = None) -> RawData:
    """Read a data file, a ``save_to_disk`` folder, or a hub data set.

    Args:
        path: a .txt, .jsonl, .json, .csv or .parquet file; a folder written by ``Dataset.save_to_disk`` or
            ``DatasetDict.save_to_disk``; or, when no such path exists, a hub data set id (``name`` or ``org/name``).
        split: the split of a saved DatasetDict or a hub data set (a saved Dataset is one split; it ignores this).
        subset: the hub data set's subset (its config name), if it has several.

    Returns:
        The text (.txt) or the rows, with how to name each row in messages.

    Raises:
        EdgetuneError: the source is missing, unreadable, empty, not UTF-8, malformed, of an unsupported type, or
            needs the ``datasets`` package that is not installed; or the split or subset does not exist.
    """
    given = str(path)
    if not given.strip():
        raise EdgetuneError("data path is empty", "give a file, a save_to_disk folder or a hub data set id")
    file = Path(given).expanduser()
    if not file.exists():
        if _looks_like_hub_id(given):
            return _read_hub(given, split, subset)
        raise EdgetuneError(f"data file {given} does not exist", "check the path, or leave path unset for the default")
    if file.is_dir():
        return _read_saved(file, given, split)
    suffix = file.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise EdgetuneError(
            f"data file {given} has unsupported type {file.suffix or '(no suffix)'!r}",
            f"use one of {', '.join(SUPPORTED_SUFFIXES)}, a save_to_disk folder or a hub data set id",
        )
    if suffix == ".parquet":
        return _read_parquet(file, given)
    text = _read_text(file, given)
    if suffix == ".txt":
        return RawData(source=given, text=text, rows=[], row_word="row", row_numbers=[])
    if suffix == ".jsonl":
        return _jsonl(text, given)
    if suffix == ".json":
        return _json(text, given)
    return _csv(text, given)


def show_keys(keys: Any) -> str:
    """Keys or column names for a message: at most 20, each cut to 40 characters, so a wide header stays short."""
    keys = list(keys)
    shown = ", ".join(repr(k if not isinstance(k, str) or len(k) <= 40 else k[:37] + "...") for k in keys[:20])
    return f"[{shown}{', ...' if len(keys) > 20 else ''}]"


def needs_datasets(what: str) -> EdgetuneError:
    """The error for a source that needs the optional ``datasets`` extra."""
    return EdgetuneError(f"reading {what} needs the datasets package", "pip install 'edgetune[data]'")


def _looks_like_hub_id(given: str) -> bool:
    # A missing path that is written like a file (a known suffix, ./, ~, absolute, several folders) is a typo,
    # not a hub id; reporting "does not exist" is more useful than a hub lookup.
    if given.lower().endswith(SUPPORTED_SUFFIXES) or given.startswith((".", "~", "/")):
        return False
    return _HUB_ID.fullmatch(given) is not None and ".." not in given and "--" not in given


def _read_text(file: Path, given: str) -> str:
    """The file's text with newlines normalised, or an EdgetuneError saying why it cannot be used."""
    raw = _read_bytes(file, given)
    try:
        # utf-8-sig drops the byte-order mark that spreadsheet programs put in front of exported CSVs.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise EdgetuneError(f"data file {given} is not UTF-8 (bad byte at {exc.start})", "save it as UTF-8") from None
    if not text.strip():
        raise EdgetuneError(f"data file {given} is empty", "put data in it or point path at another file")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _read_bytes(file: Path, given: str) -> bytes:
    try:
        return file.read_bytes()
    except OSError as exc:
        raise _unreadable(given, exc) from None


def _read_head(file: Path, given: str) -> bytes:
    """The first bytes of a file, which also proves it readable before pyarrow gives a vaguer error."""
    try:
        with file.open("rb") as handle:
            return handle.read(4)
    except OSError as exc:
        raise _unreadable(given, exc) from None


def _unreadable(given: str, exc: OSError) -> EdgetuneError:
    if isinstance(exc, PermissionError):
        return EdgetuneError(f"data file {given} is not readable (permission denied)", "fix its permissions")
    return EdgetuneError(f"data file {given} cannot be read ({exc})", "check the file and its disk")


def _json_type(value: Any) -> str:
    return "null" if value is None else _JSON_TYPES.get(type(value), f"a {type(value).__name__}")


def _jsonl(text: str, given: str) -> RawData:
    rows, numbers = [], []
    # split("\n"), not splitlines(): JSON strings may hold a raw U+2028, which splitlines() would break apart.
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EdgetuneError(
                f"{given} line {line_no} is not valid JSON ({exc.msg} at column {exc.colno})",
                "write one JSON object per line",
            ) from None
        if not isinstance(row, dict):
            raise EdgetuneError(
                f"{given} line {line_no} is {_json_type(row)}, not a JSON object", "write one JSON object per line"
            )
        rows.append(row)
        numbers.append(line_no)
    return RawData(source=given, text=None, rows=rows, row_word="line", row_numbers=numbers)


def _json(text: str, given: str) -> RawData:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        # `datasets` reads a .json file that holds one object per line as JSON Lines; so do we.
        if exc.msg == "Extra data":
            return _jsonl(text, given)
        raise EdgetuneError(
            f"{given} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})",
            "write a JSON array of objects, or one JSON object per line",
        ) from None
    if not isinstance(data, list):
        raise EdgetuneError(
            f"{given} holds {_json_type(data)}, not an array of rows",
            "write the rows as a JSON array, [{...}, {...}], or one JSON object per line in a .jsonl file",
        )
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise EdgetuneError(
                f"{given} row {i + 1} is {_json_type(row)}, not a JSON object", "make every array item an object"
            )
    _check_not_empty(data, given)
    return RawData(source=given, text=None, rows=data, row_word="row", row_numbers=list(range(1, len(data) + 1)))


def _csv(text: str, given: str) -> RawData:
    reader = csv.reader(io.StringIO(text))
    rows, numbers = [], []
    try:
        header = next(cells for cells in reader if cells)  # the text is not blank, so a non-empty line exists
        _check_header(header, given)
        end = reader.line_num
        for cells in reader:
            start, end = end + 1, reader.line_num
            if not cells:
                continue  # a blank line, as csv.DictReader skips them
            if len(cells) > len(header) and any(c.strip() for c in cells[len(header) :]):
                raise EdgetuneError(
                    f"{given} line {start} has {len(cells)} cells but the header has {len(header)} columns",
                    "quote cells that contain commas, or add the missing column names to the header",
                )
            # Every column is a string, as spreadsheets write them; a short row's missing cells are empty.
            cells += [""] * (len(header) - len(cells))
            rows.append(dict(zip(header, cells, strict=False)))
            numbers.append(start)
    except csv.Error as exc:
        # csv refuses a field over csv.field_size_limit() (131,072 characters); raising the limit would change
        # the process-wide setting of whatever application embeds edgetune.
        raise EdgetuneError(
            f"{given} is not valid CSV near line {reader.line_num} ({exc})",
            "fix that line; put texts longer than 131,072 characters in a .txt or .jsonl file",
        ) from None
    _check_not_empty(rows, given)
    # "line", not "row": the numbers are file lines (a quoted cell may span several), as in a text editor.
    return RawData(source=given, text=None, rows=rows, row_word="line", row_numbers=numbers)


def _check_header(header: list[str], given: str) -> None:
    seen = set()
    for name in header:
        if name in seen and name:
            raise EdgetuneError(
                f"{given} has the column {name!r} twice (columns: {show_keys(header)})",
                "give every column its own name",
            )
        seen.add(name)


def _check_not_empty(rows: list, source: str) -> None:
    if not rows:
        raise EdgetuneError(f"{source} has no rows", "point data.path at a data set with at least one row")


def _read_parquet(file: Path, given: str) -> RawData:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise needs_datasets(".parquet files") from None
    if not _read_head(file, given):
        raise EdgetuneError(f"data file {given} is empty", "put data in it or point path at another file")
    try:
        table = pq.read_table(file)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
        detail = " ".join(str(exc).split())[:200]
        raise EdgetuneError(
            f"{given} is not a readable Parquet file ({detail})", "write it again with pyarrow"
        ) from None
    rows = table.to_pylist()
    _check_not_empty(rows, given)
    return RawData(source=given, text=None, rows=rows, row_word="row", row_numbers=list(range(1, len(rows) + 1)))


def _read_saved(folder: Path, given: str, split: str) -> RawData:
    is_dict = (folder / "dataset_dict.json").is_file()
    if not is_dict and not ((folder / "state.json").is_file() and (folder / "dataset_info.json").is_file()):
        raise EdgetuneError(
            f"data path {given} is a directory, not a data set saved with save_to_disk",
            f"point path at a {'/'.join(SUPPORTED_SUFFIXES)} file or a save_to_disk folder",
        )
    try:
        import datasets
    except ImportError:
        raise needs_datasets(f"the saved data set {given}") from None
    try:
        loaded = datasets.load_from_disk(str(folder))
    except PermissionError:
        raise EdgetuneError(f"data path {given} is not readable (permission denied)", "fix its permissions") from None
    except (OSError, ValueError) as exc:
        detail = " ".join(str(exc).split())[:200]
        raise EdgetuneError(f"the saved data set {given} cannot be read ({detail})", "save it again") from None
    source = given
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise EdgetuneError(
                f"the saved data set {given} has no split {split!r} (splits: {', '.join(loaded)})",
                "set data.split to one of them",
            )
        loaded, source = loaded[split], f"{given} (split {split})"
    return _dataset_rows(loaded, source)


def _dataset_rows(dataset: Any, source: str) -> RawData:
    # with_format(None): a data set saved with set_format("numpy"/"torch") would otherwise hand out arrays.
    rows = dataset.with_format(None).to_list()
    _check_not_empty(rows, source)
    return RawData(source=source, text=None, rows=rows, row_word="row", row_numbers=list(range(1, len(rows) + 1)))


def _read_hub(name: str, split: str, subset: str | None) -> RawData:
    source = f"hub data set {name} ({'' if subset is None else f'subset {subset}, '}split {split})"
    try:
        import datasets
        from datasets.exceptions import DatasetNotFoundError
    except ImportError:
        raise needs_datasets(f"the {source}") from None
    try:
        dataset = datasets.load_dataset(name, name=subset, split=split)
    except (DatasetNotFoundError, FileNotFoundError):
        raise EdgetuneError(
            f"no file or folder {name} exists and there is no {source}",
            "check the path, or the hub id (org/name) and that you are logged in for a private or gated data set",
        ) from None
    except Exception as exc:
        error = _hub_error(exc, source, split, subset)
        if error is None:
            raise
        raise error from None
    return _dataset_rows(dataset, source)


def _hub_error(exc: Exception, source: str, split: str, subset: str | None) -> EdgetuneError | None:
    """One line for a failed hub load, or None for a failure that is not the user's to fix."""
    detail = " ".join(str(exc).split())[:300]
    names = " ".join(cls.__name__ for cls in type(exc).__mro__)
    # Offline mode and network failures come from huggingface_hub, requests or httpx, depending on versions;
    # their class names are the common ground.
    if isinstance(exc, ConnectionError | TimeoutError) or re.search("Connect|Timeout|Offline", names):
        return EdgetuneError(
            f"cannot reach the {source} ({detail})",
            "connect to the internet and unset HF_HUB_OFFLINE, or download the data set and point path at it",
        )
    if isinstance(exc, ValueError) and "split" in detail.lower():
        return EdgetuneError(f"the {source} has no split {split!r} ({detail})", "set data.split to one of its splits")
    if isinstance(exc, ValueError) and "config" in detail.lower():
        what = "needs a subset" if subset is None else f"has no subset {subset!r}"
        return EdgetuneError(f"the {source} {what} ({detail})", "set data.subset to one of its subsets")
    return None
