import re

import pytest

from ci_core.errors import BundleError, DataError
from ci_core.files import read_json_object


def test_reads_a_json_object(tmp_path):
    path = tmp_path / "report.json"
    path.write_text('{"target": "cat", "classes": []}')
    assert read_json_object(path, DataError, "a scan report") == {"target": "cat", "classes": []}


@pytest.mark.parametrize("content, problem", [
    (None, "no such file"),
    ("{not json", "not valid JSON"),
    (b"\xff\xfe{}", "not valid JSON"),
    ('["a", "b"]', "holds an array, not a JSON object"),
    ("3.5", "holds a number, not a JSON object"),
    ("null", "holds null, not a JSON object"),
])
def test_errors_name_the_file_and_what_was_expected(tmp_path, content, problem):
    path = tmp_path / "meta.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    for error_cls in (BundleError, DataError):
        with pytest.raises(error_cls, match=rf"^{re.escape(str(path))}: {problem}.*expected a bundle's metadata") as info:
            read_json_object(path, error_cls, "a bundle's metadata")
        assert type(info.value) is error_cls


def test_a_folder_is_not_the_file(tmp_path):
    with pytest.raises(DataError, match=rf"{re.escape(str(tmp_path))}: no such file; expected a scan report"):
        read_json_object(tmp_path, DataError, "a scan report")
