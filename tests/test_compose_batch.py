"""The batch path (compose_batch.prepare) against the one-by-one path, the reference: every row
of a batch gives the very bytes (or the very ComposeError) the same values give one by one, and
the rows with plain headers do get their header block from the batch, the others their header
templates rendered there. test_compose.py checks the one-by-one path against the `email`
package.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from pipeline import compose, compose_batch, generate
from pipeline.compose import ComposeError, Composer
from pipeline.config import MessageConfig
from pipeline.messages import Message, batch_row, from_batch

from .test_compose import ADDRESSES, FROM, body_text, header_text

TEMPLATES = {
    "plain": dict(subject="{{ s }}", body="Dear {{ name }},\n{{ t }}\n-- {{ campaign }}\n"),
    "html+url": dict(subject="News for {{ name }}: {{ s }}", body="{{ t }}",
                     html_body="<p>{{ t }}</p><a href='x/{{ id }}'>{{ email }}</a>\n",
                     unsubscribe_url="https://u.example/{{ id }}/{{ u }}"),
    "mailto, no body": dict(subject="{{ s }}", unsubscribe_url="mailto:x@u.example?s={{ u }}"),
    "fixed": dict(subject="Spring news", body="The same for all.\n"),
}
COMPOSERS = {k: Composer(MessageConfig(from_addr=FROM, **v), campaign="spring")  # type: ignore[arg-type]
             for k, v in TEMPLATES.items()}
FIELDS = ("name", "s", "t", "u")


@pytest.fixture(autouse=True)
def _one_second(monkeypatch: pytest.MonkeyPatch) -> None:
    # Both paths stamp Date with the current second: the same second for both.
    monkeypatch.setattr(compose, "time", SimpleNamespace(time=lambda: 1_780_000_000.0))


def outcome(c: Composer, m: Message) -> tuple[str, str, bytes, bool] | str:
    try:
        env = c.envelope(m)
    except ComposeError as exc:
        return f"ComposeError: {exc}"
    return env.sender, env.recipient, env.data, env.smtputf8


def both(c: Composer, table: pa.Table) -> tuple[list[Any], list[Any], list[Message]]:
    """Each row by the batch path and by the one-by-one path (the same values in a dict)."""
    batch = from_batch(table, campaign="spring", domain="bulkmail.example", fields=FIELDS)
    alone = [Message(m.id, m.to, m.message_id, dict(m.fields)) for m in batch]
    return [outcome(c, m) for m in batch], [outcome(c, m) for m in alone], batch


def prepared(c: Composer, m: Message) -> Any:
    row = batch_row(m.fields)
    assert row is not None
    cols, i = row
    done = cols.derived.get(c)  # none for a composer without a batch plan; () for a batch
    return done[i] if done else None  # that names a global


# ASCII values too, most of which take the batch's own path: printable, with the pieces that
# send a row one by one (edge spaces, "=?", quotes, controls, CR, "From " lines, long runs).
ASCII_BITS = st.sampled_from([" ", "  ", "\t", "=?", "\x00", "\x0b", "\x1b", "\x7f", '"', "\\", ".",
                              "\n", "\r", "From ", "\nFrom ", "--=_bulkmail_alt_1", "<", "&", "'", "Ada",
                              "x" * 70, "y" * 1000])
ASCII = st.lists(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=12)
                 | ASCII_BITS, max_size=6).map("".join)
def kind(got: Any) -> str:
    return type(got).__name__


VALUE = header_text() | ASCII | st.none() | st.integers(-10**6, 10**6).map(str)
ROW = st.fixed_dictionaries({"email": st.sampled_from([*ADDRESSES, "bo@example.org"]),
                             "name": VALUE, "s": VALUE, "t": body_text() | ASCII | st.none(),
                             "u": st.text(alphabet="abc-_.~%?=&/é <\"", max_size=8)})


@settings(max_examples=200, deadline=None)
@given(rows=st.lists(ROW, min_size=1, max_size=12), which=st.sampled_from(sorted(TEMPLATES)),
       split=st.integers(0, 12))
def test_every_row_as_the_one_by_one_path_writes_it(rows: list[dict[str, Any]], which: str,
                                                    split: int) -> None:
    table = pa.table({"id": pa.array(range(1, len(rows) + 1), pa.int64()),
                      **{k: pa.array([r[k] for r in rows], pa.large_string())
                         for k in ("email", *FIELDS)}})
    table = pa.concat_tables([table.slice(0, split), table.slice(split)])  # chunks too
    batch, alone, msgs = both(COMPOSERS[which], table)
    assert batch == alone
    row = batch_row(msgs[0].fields)
    assert row is not None and row[0].derived.get(COMPOSERS[which]) != ()  # no silent fallback
    for m in msgs:
        event(f"row {kind(prepared(COMPOSERS[which], m))}")


def test_a_generated_list_as_the_benchmark_sends_it() -> None:
    """The embedded default's recipients (names and cities from many languages) with the
    benchmark's templates: the same bytes, most rows by the batch's own path."""
    c = Composer(MessageConfig(from_addr=FROM, subject="Hello {{ name }}, news for {{ city }}",
                               body="Dear {{ name }},\n\nthe {{ plan }} plan for {{ city }}.\n",
                               unsubscribe_url="https://u.example/{{ id }}"), campaign="spring")
    table = generate.generate(2000, seed=3).to_arrow()
    msgs = from_batch(table, campaign="spring", domain="bulkmail.example",
                      fields=("name", "city", "plan"))
    alone = [Message(m.id, m.to, m.message_id, dict(m.fields)) for m in msgs]
    assert [outcome(c, m) for m in msgs] == [outcome(c, m) for m in alone]
    kinds = [kind(prepared(c, m)) for m in msgs]
    assert kinds.count("bytes") > 1000 and kinds.count("Rendered") > 200


def test_plain_rows_are_prepared_by_the_batch_and_the_others_rendered_there() -> None:
    c = COMPOSERS["html+url"]
    names = ["Ada Lovelace", "Dr. Who", "José García", "", None, "Ada\r\nBcc: x@y", " Ada"]
    table = pa.table({"id": range(1, 8), "email": ["ada@example.com"] * 6 + ["ñandú@example.com"],
                      "name": names, "s": ["Hi"] * 7, "t": ["a & b"] * 7, "u": ["k"] * 7})
    batch, alone, msgs = both(c, table)
    assert batch == alone
    kinds = [kind(prepared(c, m)) for m in msgs]
    assert kinds == ["bytes", "bytes", "Rendered", "bytes", "bytes", "Rendered", "Rendered"]
    assert batch[5] == "ComposeError: To display name would contain a line break or control " \
        "character (header injection refused)"
    assert prepared(c, msgs[2]) == ("News for José García: Hi", "https://u.example/3/k")
    assert b'To: "Dr. Who" <ada@example.com>\r\n' in prepared(c, msgs[1])
    assert b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n" in prepared(c, msgs[0])
    assert b"<p>a &amp; b</p><a href='x/1'>ada@example.com</a>\r\n" in batch[0][2]


def test_values_of_any_column_type_print_as_str_does() -> None:
    c = Composer(MessageConfig(from_addr=FROM, subject="{{ n }} {{ f }} {{ b }} {{ d }}",
                               body="{{ n }}|{{ f }}|{{ b }}|{{ d }}|{{ missing }}\n"),
                 campaign="spring")
    table = pa.table({"id": [1, 2], "email": ["a@example.com", "b@example.com"],
                      "n": pa.array([7, None], pa.int16()), "f": [1.0, 2.5], "b": [True, None],
                      "d": pa.array([19000, 19001], pa.date32())})
    batch = from_batch(table, campaign="spring", domain="bulkmail.example", fields=("n", "f", "b", "d"))
    alone = [Message(m.id, m.to, m.message_id, dict(m.fields)) for m in batch]
    assert [outcome(c, m) for m in batch] == [outcome(c, m) for m in alone]
    # The second row's Subject starts with a space (a null prints as nothing): one by one.
    assert [kind(prepared(c, m)) for m in batch] == ["bytes", "Rendered"]
    assert b"Subject: 7 1.0 True 2022-01-08\r\n" in outcome(c, batch[0])[2]


def test_bodies_that_go_quoted_printable_keep_the_batch_headers() -> None:
    c = COMPOSERS["plain"]
    table = pa.table({"id": [1, 2, 3, 4], "email": ["a@example.com"] * 4,
                      "name": ["Ada"] * 4, "s": ["Hi"] * 4,
                      "t": ["x" * 999, "ok", "x\nFrom here", "a\r\nb"], "u": [""] * 4})
    batch, alone, msgs = both(c, table)
    assert batch == alone
    assert [kind(prepared(c, m)) for m in msgs] == ["bytes"] * 4
    assert [b"quoted-printable" in b[2] for b in batch] == [True, False, True, False]


def test_templates_the_batch_cannot_fill_go_one_by_one() -> None:
    jinja = Composer(MessageConfig(from_addr=FROM, subject="{{ s|upper }}", body="{{ t }}\n"),
                     campaign="spring")
    assert jinja._plan is None  # a filter: Jinja2 renders it, row by row
    with_global = Composer(MessageConfig(from_addr=FROM, subject="{{ range }}", body="x\n"),
                           campaign="spring")
    table = pa.table({"id": [1], "email": ["a@example.com"], "name": ["Ada"], "s": ["Hi"],
                      "t": ["x"], "u": [""]})
    for c in (jinja, with_global):
        batch, alone, msgs = both(c, table)
        assert batch == alone and prepared(c, msgs[0]) is None


def test_a_batch_prepares_once_for_all_its_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = compose_batch.prepare

    def counted(plan: Any, cols: Any) -> Any:
        calls.append(cols.table.num_rows)
        return real(plan, cols)

    monkeypatch.setattr(compose_batch, "prepare", counted)
    table = pa.table({"id": range(1, 51), "email": ["a@example.com"] * 50, "name": ["Ada"] * 50,
                      "s": ["Hi"] * 50, "t": ["x"] * 50, "u": [""] * 50})
    batch, alone, _ = both(COMPOSERS["plain"], table)
    assert batch == alone and calls == [50]


def test_each_limit_on_both_sides() -> None:
    """Where a rule changes branch (the address onto its own line, a name or Subject that
    must fold, a value over 900, a body line over 998), one row on each side of it."""
    addr = "ada@example.com"  # "To: " + name + " <" + addr + ">": 78 with a name of 56
    names = ["N" * n for n in (55, 56, 57, 73, 74, 75)] + ['"' * 35, "a" * 36 + " ." * 18]
    subjects = ["S" * n for n in (68, 69, 70)]
    ids = ["u" * n for n in (878, 879, 880)]  # "https://u.example/1x/" is 21 characters
    texts = ["t" * n + "\n" for n in (997, 998, 999)]  # bodies: encoded per message
    rows = ([(n, "s", "u", "t\n") for n in names] + [("A", s, "u", "t\n") for s in subjects]
            + [("A", "s", u, "t\n") for u in ids] + [("A", "s", "u", t) for t in texts])
    c = Composer(MessageConfig(from_addr=FROM, subject="{{ s }}", body="{{ t }}",
                               unsubscribe_url="https://u.example/{{ id }}/{{ u }}"),
                 campaign="spring")
    table = pa.table({"id": range(10, len(rows) + 10), "email": [addr] * len(rows),
                      "name": [r[0] for r in rows], "s": [r[1] for r in rows],
                      "u": [r[2] for r in rows], "t": [r[3] for r in rows]})
    batch, alone, msgs = both(c, table)
    assert batch == alone
    kinds = [kind(prepared(c, m))[0] for m in msgs]  # b(ytes), R(endered)
    assert "".join(kinds) == "bbbbbRbb" "bbR" "bbR" "bbb"
    assert [b"quoted-printable" in b[2] for b in batch[-3:]] == [False, False, True]
    to = [b[2].split(b"\r\nSubject")[0].split(b"\r\n", 2)[2] for b in batch[:3]]
    assert [t.count(b"\r\n") for t in to] == [0, 0, 1]  # the address moved to a line of its own


@pytest.mark.parametrize("html", [False, True])
def test_each_rule_that_sends_a_row_one_by_one(html: bool) -> None:
    """One row per rule of the batch's own path, each breaking that rule alone, between rows
    that keep them all."""
    c = Composer(MessageConfig(from_addr=FROM, subject="{{ s }}", body="{{ t }}",
                               html_body="<p>{{ t }}</p>\n" if html else None,
                               unsubscribe_url="{{ u }}"), campaign="spring")
    ok = {"email": "ada@example.com", "name": "Ada", "s": "Hi", "t": "x\n", "u": "https://u/1"}
    breaking = [{"s": "\tHi"}, {"s": "Hi\t"}, {"s": " Hi"}, {"s": "Hi "}, {"s": "a =?b"},
                {"name": "=?Ada"}, {"name": "Ada\t"}, {"name": "Ada\tL"}, {"name": " Ada"},
                {"s": "Hi\x7f"}, {"s": "a\x00"}, {"name": "A\x0bB"}, {"u": "https://u/\x1b"},
                {"u": "https://u/ 1"}, {"u": "=?utf-8?q?x?="}, {"u": ""},
                {"email": "adá@example.com"}, {"email": "ada.example.com"}]
    plain_too = [{"t": "From x\n"}, {"t": "a\nFrom b\n"}, {"t": "a\r\nb\n"},
                 {"t": "a=_bulkmail_alt_1\n"}, {"t": "é\n"}, {"t": "no line break at the end"},
                 {"u": "HTTPS://U/1"}, {"u": "mailto:x@u.example"}, {"name": "Dr. Who"},
                 {"name": 'A "q" \\ b'}, {"t": "it's <b> & \"q\"\n.\n..\n"}, {"s": ""}]
    rows = [dict(ok)]
    for change in breaking:
        rows += ({**ok, **change}, dict(ok))
    rows += ({**ok, **change} for change in plain_too)
    table = pa.table({"id": range(1, len(rows) + 1),
                      **{k: [r[k] for r in rows] for k in ("email", "name", "s", "t", "u")}})
    batch, alone, msgs = both(c, table)
    assert batch == alone
    kinds = [kind(prepared(c, m)) for m in msgs]
    assert kinds == ["bytes"] + ["Rendered", "bytes"] * len(breaking) + ["bytes"] * len(plain_too)


def test_a_field_named_like_a_builtin_and_a_message_id_over_the_limit() -> None:
    """A row's own `campaign` field wins over the builtin, as in Jinja2; a campaign name long
    enough to push the Message-ID over 900 characters fails each row as one by one."""
    c = Composer(MessageConfig(from_addr=FROM, subject="{{ campaign }} {{ id }}", body="x\n"),
                 campaign="spring")
    table = pa.table({"id": [1], "email": ["a@example.com"], "campaign": ["autumn"]})
    msgs = from_batch(table, campaign="spring", domain="bulkmail.example", fields=("campaign",))
    alone = [Message(m.id, m.to, m.message_id, dict(m.fields)) for m in msgs]
    assert [outcome(c, m) for m in msgs] == [outcome(c, m) for m in alone]
    assert b"\r\nSubject: autumn 1\r\n" in prepared(c, msgs[0])
    for n in (870, 880):  # "<" + campaign + ".1@bulkmail.example>" is 22 characters more
        long = "c" * n
        table = pa.table({"id": [1], "email": ["a@example.com"], "name": ["Ada"], "s": ["Hi"],
                          "t": ["x"], "u": [""]})
        msgs = from_batch(table, campaign=long, domain="bulkmail.example", fields=FIELDS)
        alone = [Message(m.id, m.to, m.message_id, dict(m.fields)) for m in msgs]
        got = [outcome(COMPOSERS["plain"], m) for m in msgs]
        assert got == [outcome(COMPOSERS["plain"], m) for m in alone]
        assert kind(prepared(COMPOSERS["plain"], msgs[0])) == ("bytes" if n + 22 <= 900 else "Rendered")
