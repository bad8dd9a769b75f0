"""GLUE TSV files that are not UTF-8 text: one-line errors naming the file, line and byte offset."""

from __future__ import annotations

import gzip
import random
import re
import subprocess
import sys

import pytest

from adaptune.common.errors import ConfigError
from conftest import REPO, glue_overrides, write_glue
from adaptune.tasks.glue_data import get_spec, read_tsv

RTE = get_spec("rte")


def _latin1_on_line_3(directory):
    """rte train.tsv whose line 3 (data row 2) holds 'café' in Latin-1; returns (path, byte offset of 0xe9)."""
    d = write_glue(directory, "rte", n_train=6, n_dev=4)
    lines = (d / "train.tsv").read_text().splitlines()
    cols = lines[2].split("\t")
    cols[1] = "the café " + cols[1]
    lines[2] = "\t".join(cols)
    data = ("\n".join(lines) + "\n").encode("latin-1")
    (d / "train.tsv").write_bytes(data)
    offset = len((lines[0] + "\n" + lines[1] + "\n").encode()) + len(cols[0] + "\tthe caf")
    assert data[offset] == 0xE9
    return d / "train.tsv", offset


def test_latin1_byte_names_file_line_and_offset(tmp_path):
    path, offset = _latin1_on_line_3(tmp_path / "rte")
    with pytest.raises(ConfigError) as err:
        read_tsv(RTE, path)
    assert str(err.value) == (
        f"{path}:3: not UTF-8 text (byte 0xe9 at byte offset {offset}): re-save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
    )
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no chained UnicodeDecodeError


def test_offset_counts_a_utf8_byte_order_mark(tmp_path):
    path, offset = _latin1_on_line_3(tmp_path / "rte")
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    with pytest.raises(ConfigError, match=rf"train.tsv:3: not UTF-8 text \(byte 0xe9 at byte offset {offset + 3}\)"):
        read_tsv(RTE, path)


def test_utf8_with_bom_and_crlf_still_reads(tmp_path):
    d = write_glue(tmp_path / "rte", "rte", n_train=4, n_dev=2)
    text = (d / "train.tsv").read_text().replace("the", "thé")
    (d / "train.tsv").write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    rows = read_tsv(RTE, d / "train.tsv")
    assert len(rows) == 4 and rows[0].label == 0
    assert not rows[0].text_b.endswith("\r")


def test_random_bytes_are_reported_as_binary(tmp_path):
    data = random.Random(0).randbytes(4096)
    nul = data.find(b"\x00")
    assert nul >= 0
    path = tmp_path / "train.tsv"
    path.write_bytes(data)
    line = data.count(b"\n", 0, nul) + 1
    with pytest.raises(ConfigError) as err:
        read_tsv(RTE, path)
    assert str(err.value) == (
        f"{path}:{line}: binary data (a NUL byte at byte offset {nul}), not a text file: expected a GLUE .tsv file in UTF-8"
    )


def test_random_bytes_without_nul_are_not_utf8(tmp_path):
    rng = random.Random(1)
    data = bytes(rng.randrange(1, 256) for _ in range(2000))
    path = tmp_path / "train.tsv"
    path.write_bytes(data)
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        offset = e.start
    line = data.count(b"\n", 0, offset) + 1
    with pytest.raises(
        ConfigError,
        match=rf"^{re.escape(str(path))}:{line}: not UTF-8 text "
        rf"\(byte 0x{data[offset]:02x} at byte offset {offset}\)",
    ):
        read_tsv(RTE, path)


def test_utf16_and_gzip_files_say_what_they_are(tmp_path):
    d = write_glue(tmp_path / "rte", "rte", n_train=4, n_dev=2)
    text = (d / "train.tsv").read_text()
    (d / "train.tsv").write_bytes(text.encode("utf-16"))
    with pytest.raises(ConfigError, match=r"train.tsv: UTF-16 text, not UTF-8: re-save it as UTF-8"):
        read_tsv(RTE, d / "train.tsv")
    (d / "train.tsv").write_bytes(gzip.compress(text.encode()))
    with pytest.raises(ConfigError, match=r"train.tsv: a gzip-compressed file: decompress it \(gunzip\)"):
        read_tsv(RTE, d / "train.tsv")


@pytest.mark.e2e
def test_cli_prints_one_line_and_exits_2(tmp_path):
    path, offset = _latin1_on_line_3(tmp_path / "rte")
    args = [*glue_overrides(path.parent, "rte"), "trainer=cpu_fast", f"hydra.run.dir={tmp_path / 'run'}"]
    out = subprocess.run([sys.executable, "-m", "adaptune", *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert out.stderr.splitlines() == [
        f"adaptune: error: {path}:3: not UTF-8 text (byte 0xe9 at byte offset {offset}): "
        "re-save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
    ], out.stderr
