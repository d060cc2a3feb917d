"""`mmcl data import` / `mmcl data convert` against hostile or broken inputs, without Ray:
what a table cell may read (confinement), how much memory one cell may take, a tokenizer
folder with its own code, concurrent and interrupted writes to one `--out`, and the inputs
that used to end in a traceback or be silently accepted. Each bad input is one DataError
(one `mmcl: error:` line from the CLI) and damages nothing already written. The decode step
is the same callable Ray Data runs, called here in-process (tests/test_import_inputs.py)."""

from __future__ import annotations

import errno
import hashlib
import http.server
import json
import os
import struct
import subprocess
import sys
import threading
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from import_files import make_tokenizer, write_spec
from mmcl import cli
from mmcl.data import ingest
from mmcl.data.ingest import (SUMMARY_COLUMN, _SPLIT_COLUMN, ImportSpec, _ImportBlock,
                              build_manifest)
from mmcl.data.schema import DataError
from mmcl.data.shards import read_manifest, read_split

ROOT = Path(__file__).resolve().parents[1]


def run_block(spec: dict, rows: list[dict], base, out, ids=None) -> dict:
    """One decode task over `rows` (ids 0.., all train): its summary."""
    spec = ImportSpec.model_validate(spec)
    manifest = build_manifest(spec)
    ids = list(range(len(rows))) if ids is None else ids
    table = pa.Table.from_pylist([{**r, "id": i, _SPLIT_COLUMN: "train"}
                                  for i, r in zip(ids, rows)])
    block = _ImportBlock(spec.model_dump_json(), manifest.to_json(), str(base), str(out),
                         None, None)
    return json.loads(block(table).column(SUMMARY_COLUMN)[0].as_py())


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def text_spec(tok, holds="path", **extra) -> dict:
    return {"modalities": {"doc": {"column": "doc", "holds": holds, "kind": "text",
                                   "tokenizer": tok, "max_len": 64, "truncation": True,
                                   **extra.pop("modality", {})}}, **extra}


class _Recorder(http.server.BaseHTTPRequestHandler):
    requests: list = []

    def do_GET(self):  # noqa: N802 - http.server's name
        type(self).requests.append(self.path)
        body = b"secret from the server"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def loopback():
    """An HTTP server on 127.0.0.1 that records every request it gets."""
    _Recorder.requests = []
    server = http.server.HTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", _Recorder.requests
    server.shutdown()
    server.server_close()


@pytest.fixture
def outside(tmp_path):
    """A table folder `table/` with one good text file, and a secret beside it."""
    (tmp_path / "table").mkdir()
    (tmp_path / "table" / "ok.txt").write_text("a small red square")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.txt").write_text("a big blue photo")
    os.symlink(tmp_path / "outside" / "secret.txt", tmp_path / "table" / "link.txt")
    return tmp_path


# --------------------------------------------------------------------- 1. confinement


@pytest.mark.parametrize("case", ["dotdot", "absolute", "symlink", "file_url", "http"])
def test_a_cell_cannot_read_outside_the_table_folder(outside, tok, loopback, case):
    server, requests = loopback
    cell = {"dotdot": "../outside/secret.txt",
            "absolute": str(outside / "outside" / "secret.txt"),
            "symlink": "link.txt",
            "file_url": f"file://{outside / 'outside' / 'secret.txt'}",
            "http": f"{server}/secret.txt"}[case]
    with pytest.raises(DataError, match=r"row id 1, column 'doc': .*(outside the table's "
                                        r"folder|URL)") as err:
        run_block(text_spec(tok), [{"doc": "ok.txt"}, {"doc": cell}], outside / "table",
                  outside / "out")
    assert "root:" in str(err.value) or "urls:" in str(err.value)  # how to allow it
    assert requests == []  # the loopback server was never asked
    assert not (outside / "out").exists()


def test_a_root_named_by_the_spec_widens_the_confinement(outside, tok):
    spec = text_spec(tok, root=str(outside))
    part = run_block(spec, [{"doc": "../outside/secret.txt"}, {"doc": "ok.txt"}],
                     outside / "table", outside / "out")["splits"]["train"]
    assert part["rows"] == 2
    with pytest.raises(DataError, match="outside"):
        run_block(text_spec(tok, root=str(outside / "outside")), [{"doc": "/etc/hostname"}],
                  outside / "table", outside / "out2")


def test_urls_need_their_scheme_allowed_and_file_urls_never(outside, tok, loopback):
    server, requests = loopback
    part = run_block(text_spec(tok, urls=["http"]), [{"doc": f"{server}/x.txt"}],
                     outside / "table", outside / "out")["splits"]["train"]
    assert part["rows"] == 1 and requests == ["/x.txt"]
    with pytest.raises(Exception, match="urls"):
        ImportSpec.model_validate(text_spec(tok, urls=["file"]))


def test_never_the_trust_keys_folder_even_inside_the_root(tmp_path, tok, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    (tmp_path / "cfg" / "mmcl").mkdir(parents=True)
    (tmp_path / "cfg" / "mmcl" / "trust.key").write_text("k" * 64)
    (tmp_path / "t").mkdir()
    with pytest.raises(DataError, match="trust key"):
        run_block(text_spec(tok, root=str(tmp_path)), [{"doc": "../cfg/mmcl/trust.key"}],
                  tmp_path / "t", tmp_path / "out")


# ------------------------------------------------------------------ 2. memory bounded


def test_a_long_silent_flac_decodes_only_the_frames_kept(tmp_path):
    import soundfile as sf

    # 3 minutes of silence at 8 kHz (1.44 M frames, a few KB of FLAC); 1 s is kept.
    sf.write(str(tmp_path / "long.flac"), np.zeros(8000 * 180, np.int16), 8000,
             subtype="PCM_16")
    spec = ImportSpec.model_validate({"modalities": {"wav": {
        "column": "wav", "kind": "audio", "sample_rate": 16000, "length": 16000}}})
    decoder = ingest.Decoder(spec, build_manifest(spec), str(tmp_path), None, None)
    import scipy.signal  # noqa: F401 - imported before the measurement, not counted in it

    tracemalloc.start()
    try:
        out, _ = decoder.decode("wav", "long.flac", 0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.shape == (16000,) and not out.any()
    # The whole file as float32 would be 5.8 MB; what is kept is 64 KB.
    assert peak < 1_000_000, f"decode peak {peak} bytes"


def test_a_huge_text_cell_is_tokenized_in_bounded_pieces(tmp_path, tok, monkeypatch):
    spec = ImportSpec.model_validate(text_spec(tok, holds="text"))
    decoder = ingest.Decoder(spec, build_manifest(spec), str(tmp_path), None, None)
    seen = []
    real = type(decoder.tokenizers["doc"]).__call__

    def spy(self, text, *a, **k):
        seen.append(len(text))
        return real(self, text, *a, **k)

    monkeypatch.setattr(type(decoder.tokenizers["doc"]), "__call__", spy)
    cell = "a small red square " * 400_000  # 7.6 MB, under the default per-cell limit
    tracemalloc.start()
    try:
        out, length = decoder.decode("doc", cell, 0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert length == 64 and out[:4].tolist() == [3, 4, 9, 6]
    assert max(seen) <= 65_536, f"the tokenizer got {max(seen)} characters at once"
    assert peak < 2_000_000, f"decode peak {peak} bytes"


def test_a_cell_over_the_byte_limit_is_refused(tmp_path, tok):
    (tmp_path / "big.txt").write_text("a " * 1000)
    with pytest.raises(DataError, match=r"row id 0, column 'doc': .*more than "
                                        r"max_cell_bytes=1000"):
        run_block(text_spec(tok, max_cell_bytes=1000), [{"doc": "big.txt"}], tmp_path,
                  tmp_path / "out")
    with pytest.raises(DataError, match=r"row id 0, column 'doc': .*max_cell_bytes"):
        run_block(text_spec(tok, holds="text"), [{"doc": "a " * 40_000_000}], tmp_path,
                  tmp_path / "out")  # 80 MB inline: over the default limit


# ------------------------------------------------------- 4. a tokenizer folder's code


def test_a_tokenizer_folder_with_its_own_code_is_refused_without_a_prompt(tmp_path, tok,
                                                                         monkeypatch):
    folder = tmp_path / "evil"
    make_tokenizer(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    marker = tmp_path / "ran"
    (folder / "tokenization_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    prompts = []
    monkeypatch.setattr("builtins.input", lambda *a: prompts.append(a) or "y")
    spec = ImportSpec.model_validate(text_spec(str(folder), holds="text"))
    with pytest.raises(DataError, match=r"tokenizer .*evil.* its own code"):
        build_manifest(spec)
    assert prompts == [] and not marker.exists()


# --------------------------------------------------- 5./6. leases and whole overwrites


def npz(path: Path, n: int = 40, value: float = 1.0, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    np.savez(path, a=rng.normal(value, 1, (n, 4)).astype(np.float32),
             y=(np.arange(n) % 2).astype(np.int64))
    return str(path)


def folder_hash(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        h.update(str(path.relative_to(root)).encode())
        if path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()


def cli_error(argv, capsys) -> str:
    capsys.readouterr()
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("mmcl: error:"), err
    return err[0]


def test_a_second_convert_or_import_to_a_busy_out_is_refused(tmp_path, capsys, monkeypatch):
    from mmcl.train.lease import Lease

    out = tmp_path / "ds"
    holder = ingest.output_lease(str(out))  # another command writing `out` (a live pid)
    holder.acquire()
    try:
        line = cli_error(["data", "convert", npz(tmp_path / "a.npz"), "--out", str(out)],
                         capsys)
        assert "another mmcl command is writing" in line and f"pid {os.getpid()}" in line
        monkeypatch.setattr(ingest, "connect", lambda *a, **k: pytest.fail("Ray started"))
        spec = write_spec(tmp_path / "s.yaml", {"modalities": {"x": {
            "column": "x", "holds": "numbers", "kind": "vector", "shape": [2]}}})
        (tmp_path / "t.csv").write_text("x\n1 2\n")
        line = cli_error(["data", "import", str(tmp_path / "t.csv"), "--out", str(out),
                          "--spec", spec], capsys)
        assert "another mmcl command is writing" in line
    finally:
        holder.release()
    assert not (out / "manifest.json").exists()
    assert isinstance(holder, Lease)


def test_a_full_disk_during_convert_overwrite_keeps_the_old_data_set(tmp_path, capsys,
                                                                     monkeypatch):
    out = tmp_path / "ds"
    assert cli.main(["data", "convert", npz(tmp_path / "a.npz"), "--out", str(out)]) == 0
    before = folder_hash(out)
    import pyarrow.parquet as pq

    calls = []

    def full(self, *a, **k):
        calls.append(1)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pq.ParquetWriter, "write_table", full)
    line = cli_error(["data", "convert", npz(tmp_path / "b.npz", value=5.0), "--out",
                      str(out), "--overwrite"], capsys)
    assert calls and "No space left on device" in line and str(out) in line
    assert folder_hash(out) == before
    assert sorted(os.listdir(tmp_path)) == ["a.npz", "b.npz", "ds"]  # no temp folder left


KILL_SCRIPT = r"""
import os, sys
sys.path.insert(0, {root!r})
from mmcl.data import shards
point, src, out = sys.argv[1:4]
if point == "writing":
    real = shards.ShardWriter.write
    def write(self, cols):
        real(self, cols)
        os._exit(137)
    shards.ShardWriter.write = write
else:
    real_swap = shards._exchange
    def swap(*a):
        if point == "after-swap":
            real_swap(*a)
        os._exit(137)
    shards._exchange = swap
from mmcl.data.convert import convert_npz
convert_npz(src, out, overwrite=True)
"""


@pytest.mark.parametrize("point", ["writing", "before-swap", "after-swap"])
def test_a_convert_overwrite_killed_at_any_point_leaves_a_whole_data_set(tmp_path, point):
    out = tmp_path / "ds"
    assert cli.main(["data", "convert", npz(tmp_path / "a.npz"), "--out", str(out)]) == 0
    old = read_manifest(str(out))
    old_rows = read_split(str(out), "train")["a"]
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT.format(root=str(ROOT)))
    proc = subprocess.run([sys.executable, str(script), point,
                           npz(tmp_path / "b.npz", value=5.0), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 137, proc.stderr
    got = read_split(str(out), "train")["a"]  # the old data set, or the whole new one
    if point == "after-swap":
        assert got.mean() > 3
    else:
        assert read_manifest(str(out)) == old and np.array_equal(got, old_rows)
    # The next run cleans what the killed one stranded.
    assert cli.main(["data", "convert", str(tmp_path / "b.npz"), "--out", str(out),
                     "--overwrite"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["a.npz", "b.npz", "ds", "kill.py"]
    assert read_split(str(out), "train")["a"].mean() > 3


# ------------------------------------------- tracebacks and silently accepted inputs


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (no pixel data: never decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height,
                                                             8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def npy_claiming(shape) -> bytes:
    header = {"descr": "<f8", "fortran_order": False, "shape": tuple(shape)}
    text = repr(header).encode()
    text += b" " * (63 - (len(text) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + b"\0" * 64


def test_an_image_over_pillows_pixel_limit_is_one_error(tmp_path):
    (tmp_path / "bomb.png").write_bytes(png_claiming(20_000, 20_000))
    spec = {"modalities": {"img": {"column": "f", "kind": "image", "size": [8, 8]}}}
    with pytest.raises(DataError, match=r"row id 0, column 'f': file .*bomb.png: the image is "
                                        r"too large"):
        run_block(spec, [{"f": "bomb.png"}], tmp_path, tmp_path / "out")


def test_an_npy_header_claiming_terabytes_is_refused_before_allocating(tmp_path):
    (tmp_path / "huge.npy").write_bytes(npy_claiming((1 << 40,)))  # 8 TB of float64
    spec = {"modalities": {"seq": {"column": "f", "kind": "sequence", "max_len": 5,
                                   "features": 2}}}
    with pytest.raises(DataError, match=r"row id 0, column 'f': file .*huge.npy: not a "
                                        r"readable .npy array \(its header declares"):
        run_block(spec, [{"f": "huge.npy"}], tmp_path, tmp_path / "out")


def test_a_truncated_wav_is_refused_not_zero_padded(tmp_path):
    import soundfile as sf

    sf.write(str(tmp_path / "a.wav"), np.full(16000, 0.5, np.float32), 16000)
    data = (tmp_path / "a.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(data[:len(data) // 2])
    spec = {"modalities": {"wav": {"column": "wav", "kind": "audio", "sample_rate": 16000,
                                   "length": 16000}}}
    with pytest.raises(DataError, match=r"row id 0, column 'wav': file .*cut.wav: the audio "
                                        r"file is truncated"):
        run_block(spec, [{"wav": "cut.wav"}], tmp_path, tmp_path / "out")
    sf.write(str(tmp_path / "short.wav"), np.full(800, 0.5, np.float32), 16000)
    part = run_block(spec, [{"wav": "short.wav"}], tmp_path, tmp_path / "out2")
    assert part["splits"]["train"]["rows"] == 1  # a short (whole) clip is still padded


@pytest.mark.parametrize("holds", ["path", "bytes"])
def test_text_that_is_not_utf8_is_refused_not_unk(tmp_path, tok, holds):
    bad = "a small r\xe9d square".encode("latin-1")
    (tmp_path / "latin.txt").write_bytes(bad)
    cell = "latin.txt" if holds == "path" else bad
    with pytest.raises(DataError, match=r"row id 0, column 'doc': .*not valid UTF-8 \(byte 9\)"):
        run_block(text_spec(tok, holds=holds), [{"doc": cell}], tmp_path, tmp_path / "out")


@pytest.mark.parametrize("label, task, match", [
    ("inf", "classification", r"'inf' is not a class id"),
    ("1.5", "classification", r"'1.5' is not a class id"),
    ("-0.5", "classification", r"'-0.5' is not a class id"),
    ("inf", "regression", r"the regression label is inf"),
    ("nan", "regression", r"the regression label is nan"),
    (b"\xff\xfe", "classification", r"the label is not valid UTF-8"),
])
def test_labels_that_are_not_what_they_claim_are_refused(tmp_path, label, task, match):
    lab = {"column": "y", "task": task} | ({"num_classes": 3} if task != "regression" else {})
    spec = {"modalities": {"x": {"column": "x", "holds": "numbers", "kind": "vector",
                                 "shape": [2]}}, "labels": {"y": lab}}
    with pytest.raises(DataError, match=r"row id 1, column 'y': " + match):
        run_block(spec, [{"x": "1 2", "y": "1"}, {"x": "1 2", "y": label}], tmp_path,
                  tmp_path / "out")


def test_inline_nan_or_inf_numbers_are_refused_or_dropped_and_counted(tmp_path):
    spec = {"modalities": {"x": {"column": "x", "holds": "numbers", "kind": "vector",
                                 "shape": [2]}}}
    rows = [{"x": "1 2"}, {"x": "nan 2"}, {"x": "[1.0, inf]"}]
    with pytest.raises(DataError, match=r"row id 1, column 'x': 1 value\(s\) are nan or inf"):
        run_block(spec, rows, tmp_path, tmp_path / "out")
    summary = run_block({**spec, "bad_rows": "drop"}, rows, tmp_path, tmp_path / "out2")
    assert summary["dropped"] == {"non-finite numbers": 2}
    stats = summary["splits"]["train"]["stats"]["x"]
    assert all(np.isfinite(v).all() for v in stats.values() if isinstance(v, list))


@pytest.mark.parametrize("value", ["abc", "", None, "9223372036854775808", "2.5", 2.5])
def test_ids_that_are_not_int64_integers_are_refused(value):
    table = pa.table({"key": pa.array(["7", value if not isinstance(value, float) else "2.5"]),
                      "x": ["1 2", "3 4"]})
    if isinstance(value, float):
        table = pa.table({"key": [7.0, value], "x": ["1 2", "3 4"]})
    spec = ImportSpec.model_validate({"modalities": {"x": {
        "column": "x", "holds": "numbers", "kind": "vector", "shape": [2]}},
        "id_column": "key"})
    with pytest.raises(DataError, match=r"column 'key' \(the tuple ids\): .* is not an "
                                        r"integer id"):
        ingest._add_split(table, spec.model_dump_json())


def test_repeated_ids_are_refused(tmp_path):
    import fsspec

    spec = {"modalities": {"x": {"column": "x", "holds": "numbers", "kind": "vector",
                                 "shape": [2]}}, "id_column": "id"}
    one = run_block(spec, [{"x": "1 2"}, {"x": "3 4"}], tmp_path, tmp_path / "out", ids=[0, 1])
    two = run_block(spec, [{"x": "1 2"}, {"x": "3 4"}], tmp_path, tmp_path / "out", ids=[5, 1])
    parsed = ImportSpec.model_validate(spec)
    with pytest.raises(DataError, match=r"column 'id' \(the tuple ids\) repeats 1 id\(s\), "
                                        r"e.g. \[1\]"):
        ingest._finish(str(tmp_path / "out"), str(tmp_path / "out"),
                       fsspec.filesystem("file"), build_manifest(parsed), [one, two], parsed)


def test_a_csv_header_that_is_not_utf8_is_one_error(tmp_path):
    import fsspec

    (tmp_path / "t.csv").write_bytes(b"x,\xff\xfelabel\n1 2,a\n")
    with pytest.raises(DataError, match=r"t.csv: cannot read the table"):
        ingest._table_columns(str(tmp_path / "t.csv"), "csv", fsspec.filesystem("file"),
                              str(tmp_path / "t.csv"))


def test_an_npz_with_nan_is_refused_by_convert(tmp_path, capsys):
    arrays = {"a": np.ones((20, 3), np.float32), "y": np.arange(20) % 2}
    arrays["a"][4, 1] = np.nan
    np.savez(tmp_path / "nan.npz", **arrays)
    line = cli_error(["data", "convert", str(tmp_path / "nan.npz"), "--out",
                      str(tmp_path / "ds")], capsys)
    assert "array 'a'" in line and "nan or inf" in line and "row 4" in line
    assert not (tmp_path / "ds").exists()


def test_a_swap_cut_between_its_two_renames_is_restored_by_the_next_run(tmp_path, monkeypatch,
                                                                       capsys):
    """Where the filesystem cannot exchange two folders atomically, the old data set is
    renamed aside first: a kill between the two renames leaves no data set at OUT, and the
    next import or convert of OUT puts the old one back before anything else."""
    from mmcl.data import shards

    out = tmp_path / "ds"
    assert cli.main(["data", "convert", npz(tmp_path / "a.npz"), "--out", str(out)]) == 0
    (out / "NOTES.md").write_text("mine")  # not part of the data set: kept by overwrites
    old = folder_hash(out)

    def no_exchange(a, b):
        raise OSError(errno.EINVAL, "Invalid argument")

    real_rename, calls = os.rename, []

    def killed_at_second(a, b):
        calls.append(a)
        if len(calls) == 2 and ".converting-" in str(a):
            raise SystemExit("killed")  # nothing after this runs, as with SIGKILL
        real_rename(a, b)

    monkeypatch.setattr(shards, "_exchange", no_exchange)
    monkeypatch.setattr(os, "rename", killed_at_second)
    with pytest.raises(SystemExit):
        shards.write_dataset(str(out), *_small(tmp_path), overwrite=True)
    monkeypatch.setattr(os, "rename", real_rename)
    assert not out.exists()
    assert [p for p in os.listdir(tmp_path) if ".replaced-" in p]
    capsys.readouterr()
    assert cli.main(["data", "convert", str(tmp_path / "a.npz"), "--out", str(out),
                     "--overwrite"]) == 0  # the next run: restores, then overwrites
    assert "restored the data set" in capsys.readouterr().out
    assert (out / "NOTES.md").read_text() == "mine"
    assert folder_hash(out) == old  # the same npz again: byte-identical
    assert sorted(os.listdir(tmp_path)) == ["a.npz", "ds"]


def _small(tmp_path):
    from mmcl.data.convert import infer_manifest, load_npz, split_arrays

    arrays = load_npz(npz(tmp_path / "c.npz", value=9.0))
    os.remove(tmp_path / "c.npz")
    manifest = infer_manifest(arrays)
    return manifest, split_arrays(arrays, manifest, (0.8, 0.1, 0.1), 0)


def test_an_import_killed_mid_swap_by_an_older_mmcl_is_restored(tmp_path, capsys):
    """The state issue 34 found: OUT lost its manifest and test/, the new data set stranded
    in OUT.importing-*. The next writer of OUT restores the stranded data set."""
    out = tmp_path / "ds"
    assert cli.main(["data", "convert", npz(tmp_path / "a.npz"), "--out", str(out)]) == 0
    stranded = tmp_path / "ds.importing-0badc0de"
    os.rename(out, stranded)
    out.mkdir()
    os.rename(stranded / "train", out / "train")  # the old swap had moved one folder
    capsys.readouterr()
    assert cli.main(["data", "convert", str(tmp_path / "a.npz"), "--out", str(out),
                     "--overwrite"]) == 0
    assert "restored the data set" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["a.npz", "ds"]
    assert read_manifest(str(out)).splits["train"] > 0


def test_a_full_disk_in_an_import_block_is_one_error(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pq.ParquetWriter, "write_table", full)
    spec = {"modalities": {"x": {"column": "x", "holds": "numbers", "kind": "vector",
                                 "shape": [2]}}}
    with pytest.raises(DataError, match=r"cannot write the import's shards .*No space left"):
        run_block(spec, [{"x": "1 2"}], tmp_path, tmp_path / "out")


def test_an_out_that_is_a_symlink_replaces_the_folder_it_names(tmp_path):
    (tmp_path / "disk").mkdir()
    os.symlink(tmp_path / "disk", tmp_path / "ds")
    out = tmp_path / "ds"
    assert cli.main(["data", "convert", npz(tmp_path / "a.npz"), "--out", str(out)]) == 0
    assert cli.main(["data", "convert", npz(tmp_path / "b.npz", value=5.0), "--out",
                     str(out), "--overwrite"]) == 0
    assert out.is_symlink() and (tmp_path / "disk" / "manifest.json").exists()
    assert read_split(str(out), "train")["a"].mean() > 3
    assert sorted(os.listdir(tmp_path)) == ["a.npz", "b.npz", "disk", "ds"]
