import builtins
import csv
import json
import pathlib
import sys

import pytest
from conftest import write_file

from edgetune.errors import EdgetuneError
from edgetune.train.data_sources import RawData, read_data

ROWS = [{"prompt": "2+2?", "completion": "4"}, {"prompt": "Capital of France?", "completion": "Paris"}]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    # Every hub test replaces datasets.load_dataset; should one slip through before datasets is first imported,
    # offline mode makes it fail instead of reaching the network.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def error_of(path, **kwargs):
    with pytest.raises(EdgetuneError) as err:
        read_data(path, **kwargs)
    exc = err.value
    assert exc.problem and exc.fix and "\n" not in str(exc) and "\r" not in str(exc)
    return exc


def check_rows(raw, rows, word, numbers):
    assert isinstance(raw, RawData) and raw.text is None
    assert raw.rows == rows and raw.row_word == word and raw.row_numbers == numbers


def test_txt_is_whole_text_with_bom_dropped_and_newlines_normalised(tmp_path):
    path = write_file(tmp_path, "book.txt", "\ufeffone\r\ntwo\rthree\n".encode())
    raw = read_data(path)
    assert raw.text == "one\ntwo\nthree\n" and raw.rows == [] and raw.source == path


def test_jsonl_skips_blank_lines_and_keeps_file_line_numbers(tmp_path):
    path = write_file(tmp_path, "d.jsonl", f"\n{json.dumps(ROWS[0])}\n  \n\n{json.dumps(ROWS[1])}\n")
    raw = read_data(path)
    check_rows(raw, ROWS, "line", [2, 5])
    assert raw.where(1) == f"{path} line 5"


def test_json_array_and_json_that_is_json_lines(tmp_path):
    raw = read_data(write_file(tmp_path, "a.json", json.dumps(ROWS, indent=2)))
    check_rows(raw, ROWS, "row", [1, 2])
    assert raw.where(0).endswith("a.json row 1")
    raw = read_data(write_file(tmp_path, "l.json", "\n".join(json.dumps(r) for r in ROWS) + "\n\n"))
    check_rows(raw, ROWS, "line", [1, 2])


def test_csv_all_strings_with_starting_line_numbers(tmp_path):
    path = tmp_path / "d.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["instruction", "input", "output"])
        writer.writerow(["Add", "", 3])
        writer.writerow(["Say", 'two\nlines, "quoted"', "ok"])
        f.write("\n")
        writer.writerow(["Short"])
    raw = read_data(str(path))
    rows = [
        {"instruction": "Add", "input": "", "output": "3"},
        {"instruction": "Say", "input": 'two\nlines, "quoted"', "output": "ok"},
        {"instruction": "Short", "input": "", "output": ""},
    ]
    check_rows(raw, rows, "line", [2, 3, 6])


def test_parquet_rows_are_plain_python(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "n": 1},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "n": 2},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    raw = read_data(str(tmp_path / "t.parquet"))
    check_rows(raw, rows, "row", [1, 2])
    assert type(raw.rows[0]["n"]) is int and type(raw.rows[0]["messages"]) is list


def test_saved_dataset_and_dataset_dict_with_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(ROWS)
    ds.with_format("numpy").save_to_disk(str(tmp_path / "one"))
    raw = read_data(str(tmp_path / "one"))
    check_rows(raw, ROWS, "row", [1, 2])
    dd = datasets.DatasetDict({"train": ds, "test": datasets.Dataset.from_list(ROWS[:1])})
    dd.save_to_disk(str(tmp_path / "dict"))
    raw = read_data(str(tmp_path / "dict"), split="test")
    check_rows(raw, ROWS[:1], "row", [1])
    assert raw.where(0) == f"{tmp_path / 'dict'} (split test) row 1"
    exc = error_of(str(tmp_path / "dict"), split="validation")
    assert "'validation'" in exc.problem and "train, test" in exc.problem and "data.split" in exc.fix


def test_hub_id_passes_name_subset_and_split(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load(path, name=None, split=None):
        calls.append((path, name, split))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    raw = read_data("org/qa", split="validation", subset="small")
    assert calls == [("org/qa", "small", "validation")]
    check_rows(raw, ROWS, "row", [1, 2])
    assert raw.source == "hub data set org/qa (subset small, split validation)"
    assert read_data("qa").source == "hub data set qa (split train)"


@pytest.mark.parametrize(
    "raised,words",
    [
        ("not_found", ["no file or folder org/missing", "hub data set org/missing", "org/name"]),
        (FileNotFoundError("gone"), ["no file or folder org/missing"]),
        (ValueError("Unknown split \"dev\". Should be one of ['train']."), ["no split 'dev'", "['train']"]),
        (ValueError("Config name is missing.\nPlease pick one among the available configs: ['a', 'b']"), ["subset"]),
        (ConnectionError("Couldn't reach 'org/missing' on the Hub (OfflineModeIsEnabled)"), ["cannot reach"]),
    ],
)
def test_hub_failures_are_one_line(monkeypatch, raised, words):
    datasets = pytest.importorskip("datasets")
    from datasets.exceptions import DatasetNotFoundError

    def fake_load(path, name=None, split=None):
        raise (
            DatasetNotFoundError("Dataset 'org/missing' doesn't exist on the Hub") if raised == "not_found" else raised
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    exc = error_of("org/missing", split="dev")
    text = str(exc)
    assert all(word in text for word in words), text


def test_hub_unknown_subset_names_it(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def fake_load(path, name=None, split=None):
        raise ValueError(f"BuilderConfig '{name}' not found. Available: ['default']")

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    exc = error_of("org/qa", subset="tiny")
    assert "hub data set org/qa (subset tiny, split train) has no subset 'tiny'" in exc.problem
    assert "['default']" in exc.problem and "data.subset" in exc.fix


def test_hub_failure_that_is_not_the_users_passes_through(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def fake_load(path, name=None, split=None):
        raise RuntimeError("bug inside datasets")

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    with pytest.raises(RuntimeError, match="bug inside datasets"):
        read_data("org/qa")


@pytest.mark.parametrize("how", ["none", "import_error"])
def test_missing_datasets_extra_is_one_line(tmp_path, monkeypatch, how):
    if how == "none":
        monkeypatch.setitem(sys.modules, "datasets", None)
        monkeypatch.setitem(sys.modules, "pyarrow", None)
        monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    else:
        real_import = builtins.__import__

        def no_data(name, *args, **kwargs):
            if name.split(".")[0] in ("datasets", "pyarrow"):
                raise ImportError(f"No module named {name!r}")
            return real_import(name, *args, **kwargs)

        monkeypatch.setattr(builtins, "__import__", no_data)
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "dataset_dict.json").write_text("{}")
    for path, what in [
        ("org/qa", "hub data set org/qa"),
        (write_file(tmp_path, "t.parquet", b"PAR1"), ".parquet files"),
        (str(tmp_path / "saved"), "saved data set"),
    ]:
        exc = error_of(path)
        assert what in exc.problem and "needs the datasets package" in exc.problem
        assert exc.fix == "pip install 'edgetune[data]'"


def test_missing_file_directory_and_suffix(tmp_path):
    exc = error_of(str(tmp_path / "nope.jsonl"))
    assert "nope.jsonl" in exc.problem and "does not exist" in exc.problem
    assert "does not exist" in error_of("./data/train").problem  # written as a path, so no hub lookup
    exc = error_of(str(tmp_path))
    assert "is a directory, not a data set saved with save_to_disk" in exc.problem and ".jsonl" in exc.fix
    exc = error_of(write_file(tmp_path, "d.tsv", "a\tb\n"))
    assert "'.tsv'" in exc.problem and all(s in exc.fix for s in (".txt", ".jsonl", ".json", ".csv", ".parquet"))


def test_unreadable_file(tmp_path, monkeypatch):
    path = write_file(tmp_path, "secret.jsonl", json.dumps(ROWS[0]))

    def deny(self):
        raise PermissionError(13, "Permission denied")

    # chmod does not stop root, so the refusal is simulated where the reader reads.
    monkeypatch.setattr(pathlib.Path, "read_bytes", deny)
    exc = error_of(path)
    assert "secret.jsonl" in exc.problem and "permission denied" in exc.problem and "permissions" in exc.fix


@pytest.mark.parametrize(
    "name,content",
    [(name, content) for name in ("e.txt", "e.jsonl", "e.json", "e.csv") for content in (b"", b"  \n\n\t\n")]
    + [("e.parquet", b"")],
)
def test_empty_file(tmp_path, name, content):
    exc = error_of(write_file(tmp_path, name, content))
    assert name in exc.problem and "empty" in exc.problem


def test_non_utf8_names_the_byte(tmp_path):
    exc = error_of(write_file(tmp_path, "latin.csv", "text\ncaf\xe9\n".encode("latin-1")))
    assert "latin.csv is not UTF-8" in exc.problem and "byte at 8" in exc.problem and "UTF-8" in exc.fix


def test_empty_tables(tmp_path):
    assert "has no rows" in error_of(write_file(tmp_path, "h.csv", "text,label\n")).problem
    assert "has no rows" in error_of(write_file(tmp_path, "a.json", "[]")).problem
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "z.parquet")
    assert "z.parquet has no rows" in error_of(str(tmp_path / "z.parquet")).problem


def test_bad_json_names_the_line(tmp_path):
    exc = error_of(write_file(tmp_path, "d.jsonl", '{"text": "fine"}\n\n{"text": "oops"\n'))
    assert "d.jsonl line 3 is not valid JSON" in exc.problem and "one JSON object per line" in exc.fix
    exc = error_of(write_file(tmp_path, "d.jsonl", '{"text": "fine"}\n["a", "list"]\n'))
    assert "d.jsonl line 2 is an array, not a JSON object" in exc.problem
    exc = error_of(write_file(tmp_path, "d.json", '[{"text": "a"},\n {"text": }]'))
    assert "d.json is not valid JSON" in exc.problem and "line 2" in exc.problem
    exc = error_of(write_file(tmp_path, "d.json", '[{"text": "a"}, "b"]'))
    assert "d.json row 2 is a string, not a JSON object" in exc.problem
    exc = error_of(write_file(tmp_path, "d.json", '{"text": ["a", "b"]}'))
    assert "holds an object, not an array of rows" in exc.problem


def test_csv_errors(tmp_path):
    long_cell = "x" * 200_000
    exc = error_of(write_file(tmp_path, "big.csv", f'text\n"{long_cell}"\n'))
    assert "big.csv is not valid CSV near line" in exc.problem and "131,072" in exc.fix
    exc = error_of(write_file(tmp_path, "extra.csv", "a,b\n1,2\n3,4,5\n"))
    assert "extra.csv line 3 has 3 cells but the header has 2 columns" in exc.problem
    wide = ["c" * 60] + [f"col{i}" for i in range(30)]
    exc = error_of(write_file(tmp_path, "dup.csv", ",".join(wide + ["col3"]) + "\n" + ",".join("1" * 32) + "\n"))
    assert "column 'col3' twice" in exc.problem and "c" * 37 + "..." in exc.problem and ", ...]" in exc.problem
    assert "c" * 38 not in exc.problem
    assert read_data(write_file(tmp_path, "trail.csv", "a,b\n1,2,\n")).rows == [{"a": "1", "b": "2"}]


def test_damaged_parquet(tmp_path):
    pytest.importorskip("pyarrow.parquet")
    exc = error_of(write_file(tmp_path, "bad.parquet", b"not parquet at all"))
    assert "bad.parquet is not a readable Parquet file" in exc.problem
