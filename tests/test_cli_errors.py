"""Every file and flag mistake through the real CLI: exit code 2, one line on stderr naming the
file, column or flag, no traceback, nothing written, and Ray never even imported.

Each case runs `python -m pipeline.run` in a fresh empty directory with a stand-in `ray`
package first on PYTHONPATH that exits loudly if imported: an error found after Ray is
imported (let alone started) fails the test.

Two mistakes can only be seen by reading every row, which the load's Ray tasks do (the list
never lands on the driver): a broken data page and repeated ids. They are found before
anything is sent or recorded, and give the same one line and exit 2 (DATA_CASES).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest

from pipeline import generate
from pipeline.lab.sink import free_port

from .conftest import cli, shared_ray_address

RAY_TRAP = "ray was imported before the error was found"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("inputs")
    trap = d / "fake-ray" / "ray"
    trap.mkdir(parents=True)
    (trap / "__init__.py").write_text(f"raise SystemExit({RAY_TRAP!r})\n")
    good = d / "good.parquet"
    generate.generate(200, seed=1).write_parquet(good, compression="zstd")
    raw = good.read_bytes()
    (d / "truncated.parquet").write_bytes(raw[: len(raw) // 2])
    footer = int.from_bytes(raw[-8:-4], "little")
    pages = bytearray(raw)
    for i in range(64, len(raw) - 8 - footer - 64, 7):  # the footer (schema) stays readable
        pages[i] ^= 0x5A
    (d / "pages.parquet").write_bytes(bytes(pages))
    (d / "renamed.parquet").write_text("id,email\n1,a@example.com\n")
    (d / "nodata").mkdir()
    (d / "nodata" / "recipients.csv").write_text("id,email\n")
    pl.DataFrame({"id": [1, 2], "mail": ["a@x.com", "b@x.com"]}).write_parquet(d / "noemail.parquet")
    pl.DataFrame({"id": [1, 2], "email": [1, 2]}).write_parquet(d / "intemail.parquet")
    pl.DataFrame({"id": [5, 5], "email": ["a@x.com", "b@x.com"], "name": ["A", "B"]}).write_parquet(
        d / "dupids.parquet")
    generate.generate(0).write_parquet(d / "empty.parquet")
    return {p.stem: p for p in d.iterdir()} | {"trap": trap.parent}


Case = tuple[Callable[[dict[str, Path]], list[str]], str]
GOOD: Callable[[dict[str, Path]], list[str]] = lambda f: ["--input", str(f["good"])]  # noqa: E731

CASES: dict[str, Case] = {
    "missing path": (lambda f: ["--input", str(f["good"].parent / "nope.parquet")],
                     "nope.parquet: no such file or directory"),
    "directory without parquet": (lambda f: ["--input", str(f["nodata"])],
                                  "nodata: the directory holds no .parquet files"),
    "csv renamed .parquet": (lambda f: ["--input", str(f["renamed"])],
                             "renamed.parquet: not a readable Parquet file"),
    "truncated parquet": (lambda f: ["--input", str(f["truncated"])],
                          "truncated.parquet: not a readable Parquet file"),
    "no email column": (lambda f: ["--input", str(f["noemail"])],
                        "no 'email' column (columns found: id, mail)"),
    "email not text": (lambda f: ["--input", str(f["intemail"])],
                       "column 'email' must be text, found Int64"),
    "actors zero": (lambda f: [*GOOD(f), "--actors", "0"], "--actors must be at least 1"),
    "actors negative": (lambda f: [*GOOD(f), "--actors=-3"], "--actors must be at least 1"),
    "threads zero": (lambda f: [*GOOD(f), "--threads-per-actor", "0"],
                     "--threads-per-actor must be at least 1"),
    "max attempts zero": (lambda f: [*GOOD(f), "--max-attempts", "0"],
                          "--max-attempts must be at least 1"),
    "actors not a number": (lambda f: [*GOOD(f), "--actors", "many"], "--actors"),
    "negative latency": (lambda f: [*GOOD(f), "--latency=-0.5"], "--latency must not be negative"),
    "fail rate above 1": (lambda f: [*GOOD(f), "--fail-rate", "1.5"], "--fail-rate must be within [0, 1]"),
    "fail rate below 0": (lambda f: [*GOOD(f), "--fail-rate=-0.1"], "--fail-rate must be within [0, 1]"),
    "unknown flag": (lambda f: [*GOOD(f), "--bogus", "1"], "unrecognized arguments: --bogus"),
    "campaign escapes runs": (lambda f: [*GOOD(f), "--campaign", "../x"], "--campaign '../x'"),
    "campaign absolute": (lambda f: [*GOOD(f), "--campaign", "/tmp/x"], "--campaign '/tmp/x'"),
    # Tests run as root, for whom chmod stops nothing: a path through a regular file fails for all.
    "runs dir under a file": (lambda f: [*GOOD(f), "--runs-dir", "somefile/runs"],
                              "--runs-dir somefile/runs: not a writable directory"),
    "runs dir is a file": (lambda f: [*GOOD(f), "--runs-dir", "somefile"],
                           "--runs-dir somefile: not a writable directory"),
    "suppress file missing": (lambda f: [*GOOD(f), "--suppress", "unsub.txt"],
                              "--suppress unsub.txt: no such file"),
    "dashboard address": (lambda f: [*GOOD(f), "--address", "http://127.0.0.1:8265"],
                          "not the dashboard's; that one is for `ray job submit`"),
    # ray.init would retry such an address for minutes, silently.
    "address where nothing listens": (lambda f: [*GOOD(f), "--address", f"127.0.0.1:{free_port()}"],
                                      "no Ray cluster answers there (Connection refused)"),
    "suppress without email column": (lambda f: [*GOOD(f), "--suppress", str(f["noemail"])],
                                      "no 'email' column"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_user_error_is_one_line_exit_2_nothing_written(case: str, files: dict[str, Path],
                                                       tmp_path: Path) -> None:
    make_args, expected = CASES[case]
    (tmp_path / "somefile").write_text("a regular file\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    res = cli(*make_args(files), "--no-dashboard", "--no-charts", cwd=tmp_path,
              env={"PYTHONPATH": str(files["trap"])}, timeout=60)
    assert RAY_TRAP not in res.stderr, res.stderr
    assert res.returncode == 2, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("bulkmail: error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in res.stderr and res.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no runs/, no data/
    assert (tmp_path / "somefile").read_text() == "a regular file\n"


def test_data_error_found_by_the_load_is_one_line_exit_2_nothing_left(
        files: dict[str, Path], tmp_path: Path) -> None:
    """Repeated ids, seen only by the load's tasks: through the real CLI, the same one line and
    exit 2, and the campaign this run would have created is not there."""
    res = cli("--input", str(files["dupids"]), "--campaign", "c", "--no-dashboard", "--no-charts",
              cwd=tmp_path, timeout=120)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("bulkmail: error: ") and (
        "column 'id' repeats (1 ids; e.g. id 5 on rows 0 and 1" in lines[0]), lines[0]
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "runs" / "c").exists()


def test_joining_a_token_cluster_without_its_token_is_one_line_exit_2(
        files: dict[str, Path], tmp_path: Path) -> None:
    """The session's Ray wants a token (as Ray 2.60's `ray start` does). A machine without it
    (another HOME, no $RAY_AUTH_TOKEN) cannot join: one line naming the address and the token,
    exit 2, no campaign left behind; not a traceback after a silent wait."""
    address = shared_ray_address()
    home = tmp_path / "home"
    home.mkdir()
    res = cli(*GOOD(files), "--campaign", "c", "--address", address, "--no-dashboard",
              "--no-charts", cwd=tmp_path, env={"HOME": str(home)}, own_ray=False, timeout=120)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(f"bulkmail: error: --address {address}: cannot join") and (
        "~/.ray/auth_token" in lines[0]), lines[0]
    assert not (tmp_path / "runs" / "c").exists()


@pytest.mark.usefixtures("ray_session")
def test_corrupt_pages_and_zero_rows_in_a_run(files: dict[str, Path], tmp_path: Path) -> None:
    """Corrupt data pages end the run before anything is written; an empty list is no error."""
    from pipeline.campaign import run_campaign
    from pipeline.errors import UsageError

    from .conftest import campaign
    with pytest.raises(UsageError, match=r"pages\.parquet: cannot read the recipients"):
        run_campaign(campaign(tmp_path, files["pages"], campaign="c"))
    assert not (tmp_path / "runs" / "c").exists()
    rep = run_campaign(campaign(tmp_path, files["empty"], campaign="e"))
    assert rep.counts.input_rows == 0 and rep.counts.reconciled  # type: ignore[union-attr]
    assert json.loads((tmp_path / "runs" / "e" / "report.json").read_text())["counts"]["reconciled"]


@pytest.mark.usefixtures("ray_session")
def test_a_later_wave_that_cannot_be_read_stops_the_run_after_the_waves_before_it(
        tmp_path: Path) -> None:
    """Waves of 250, 500 and 750 rows; the second holds a file whose data pages are broken (and
    no id column, so no id check reads that file before the first wave sends). The first wave
    is sent and recorded, the run ends with one line and code 2, the campaign stays, stopped;
    once the file is fixed, the same command sends the rest, everyone exactly once."""
    from .test_faults import send_log
    from .test_recipients import _corrupt_pages
    folder = tmp_path / "in"
    folder.mkdir()
    df = generate.generate(1500, seed=3, duplicate_fraction=0.1, invalid_fraction=0.05).drop("id")
    for name, rows in (("a", df[:500]), ("b", df[500:1000]), ("c", df[1000:])):
        rows.write_parquet(folder / f"{name}.parquet", row_group_size=250)
    good = (folder / "b.parquet").read_bytes()
    _corrupt_pages(folder / "b.parquet")
    log = tmp_path / "sends.log"
    args = ("--input", str(folder), "--campaign", "c", "--wave-rows", "250", "--latency", "0.01",
            "--actors", "2", "--threads-per-actor", "10", "--no-dashboard", "--no-charts",
            "--send-log", str(log))
    res = cli(*args, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(f"bulkmail: error: --input {folder / 'b.parquet'}: cannot read "
                               "the recipients"), lines[0]
    assert "the rows before it were sent and recorded" in lines[0]
    first = pl.read_parquet(tmp_path / "runs" / "c" / "ledger.parquet")
    # The first wave, once; nothing of the broken wave or the one after it, sent or settled.
    assert sorted(first["id"].to_list()) == list(range(250))
    sent = first.filter(pl.col("status") == "sent")["id"]
    assert 0 < sent.len() < 250 and sorted(send_log(log).to_list()) == sorted(sent.to_list())
    manifest = json.loads((tmp_path / "runs" / "c" / "campaign.json").read_text())
    assert manifest["state"] == "stopped" and manifest["input_rows"] == 1500

    (folder / "b.parquet").write_bytes(good)
    res = cli(*args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    # Only the first wave's are known as the send starts; the report counts every wave's.
    assert "250 recipients already done are skipped in the first wave" in res.stdout, res.stdout
    led = pl.read_parquet(tmp_path / "runs" / "c" / "ledger.parquet")
    assert sorted(led["id"].to_list()) == list(range(1500))
    sent = led.filter(pl.col("status") == "sent")["id"]
    assert sorted(send_log(log).to_list()) == sorted(sent.to_list())  # the rest, once
    assert set(led["status"].unique()) == {"sent", "duplicate", "invalid"}
    assert json.loads((tmp_path / "runs" / "c" / "campaign.json").read_text())["state"] == "finished"
