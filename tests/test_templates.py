"""The composer on its own: rendering, sandboxing, header safety, encodings; template checks and
the dry run through the real CLI (neither starts Ray)."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.compose import ComposeError, Composer
from pipeline.config import MessageConfig
from pipeline.errors import UsageError
from pipeline.lab.sink import Sink
from pipeline.messages import Message
from pipeline.templates import (
    check_fields,
    environment,
    fill,
    header_fields,
    referenced_fields,
)

from .conftest import cli, write_recipients

FROM = "News Desk <news@bulkmail.example>"


def message(name: object = "Ada Lovelace", to: str = "ada@example.com", **fields: object) -> Message:
    return Message(7, to, "<spring.7@bulkmail.example>", {"name": name, "city": "Łódź", **fields})


@pytest.fixture
def body(tmp_path: Path) -> Path:
    (tmp_path / "body.txt").write_text("Dear {{ name }},\nsee you in {{ city }}.\n")
    (tmp_path / "body.html").write_text("<p>Dear {{ name }}, see you in {{ city }}.</p>\n")
    return tmp_path / "body.txt"


def test_renders_headers_and_both_bodies(body: Path) -> None:
    c = Composer(MessageConfig(from_addr=FROM, subject="Hi {{ name }} ({{ campaign }})",
                               template=str(body),
                               unsubscribe_url="https://bulkmail.example/u/{{ id }}"), campaign="spring")
    m = c.compose(message())
    assert m["From"] == FROM
    assert m["To"] == "Ada Lovelace <ada@example.com>"
    assert m["Subject"] == "Hi Ada Lovelace (spring)"  # the campaign passed to the composer
    assert m["Message-ID"] == "<spring.7@bulkmail.example>"
    assert m["Date"].datetime is not None
    assert m["List-Unsubscribe"] == "<https://bulkmail.example/u/7>"
    assert m["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert m.get_content_type() == "multipart/alternative"
    assert m.get_body(("plain",)).get_content() == "Dear Ada Lovelace,\nsee you in Łódź.\n"
    assert m.get_body(("html",)).get_content() == "<p>Dear Ada Lovelace, see you in Łódź.</p>\n"


def test_plain_only_without_html_sibling_and_mailto_has_no_one_click(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("Hello {{ name }}")
    c = Composer(MessageConfig(from_addr=FROM, template=str(tmp_path / "b.txt"),
                               unsubscribe_url="mailto:unsub@bulkmail.example?subject={{ id }}"),
                 campaign="spring")
    m = c.compose(message())
    assert m.get_content_type() == "text/plain"
    assert m.get_content() == "Hello Ada Lovelace"
    assert m["List-Unsubscribe"] == "<mailto:unsub@bulkmail.example?subject=7>"
    assert m["List-Unsubscribe-Post"] is None  # RFC 8058 one-click needs an HTTP(S) URI


def test_values_are_data_not_template_code(body: Path) -> None:
    c = Composer(MessageConfig(from_addr=FROM, subject="Hi {{ name }}", template=str(body)),
                 campaign="spring")
    for name in ["{{ 7*7 }}", "{% for x in range(3) %}{{ x }}{% endfor %}", "{{ config }}"]:
        m = c.compose(message(name))
        assert m["Subject"] == f"Hi {name}"
        assert m["To"].addresses[0].display_name == name
        assert m.get_body(("plain",)).get_content().startswith(f"Dear {name},")
        assert "49" not in m.get_body(("plain",)).get_content()


def test_html_is_autoescaped_text_is_not(body: Path) -> None:
    c = Composer(MessageConfig(from_addr=FROM, template=str(body)), campaign="spring")
    m = c.compose(message('<script>alert("x")</script> & co'))
    assert m.get_body(("plain",)).get_content().startswith('Dear <script>alert("x")</script> & co,')
    html = m.get_body(("html",)).get_content()
    assert "<script>" not in html
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; &amp; co" in html


def test_sandbox_blocks_unsafe_template_code() -> None:
    c = Composer(MessageConfig(from_addr=FROM,
                               subject="{{ name.__class__.__mro__[1].__subclasses__() }}"), campaign="spring")
    with pytest.raises(ComposeError, match="--subject template failed"):
        c.envelope(message())


@pytest.mark.parametrize("bad", ["Eve\r\nBcc: victim@example.org", "Eve\nBcc: x@y.z", "Eve\rX: 1",
                                 "Eve\x00", "Eve\u2028Bcc: x@y.z", "Eve\x85"])
def test_line_breaks_in_any_header_value_are_refused(bad: str) -> None:
    c = Composer(MessageConfig(from_addr=FROM, subject="About {{ city }}",
                               unsubscribe_url="https://u.example/{{ token }}"), campaign="spring")
    with pytest.raises(ComposeError, match="header injection refused"):
        c.envelope(message(name=bad, token="t"))  # To display name
    with pytest.raises(ComposeError, match="header injection refused"):
        c.envelope(message(city=bad, token="t"))  # Subject
    with pytest.raises(ComposeError, match="header injection refused|not a usable URL"):
        c.envelope(message(token=bad))  # List-Unsubscribe


@settings(max_examples=200, deadline=None)
@given(name=st.text(max_size=40), city=st.text(max_size=40))
def test_no_value_ever_adds_a_header(name: str, city: str) -> None:
    c = Composer(MessageConfig(from_addr=FROM, subject="{{ city }}"), campaign="spring")
    try:
        data = c.envelope(message(name=name, city=city)).data
    except ComposeError:
        return  # refused, which is safe
    head = data.split(b"\r\n\r\n", 1)[0]
    names = [line.split(b":", 1)[0] for line in head.split(b"\r\n")
             if line and not line.startswith((b" ", b"\t"))]
    assert sorted(names) == sorted([b"Content-Type", b"MIME-Version",
                                    b"Content-Transfer-Encoding", b"From", b"To", b"Subject",
                                    b"Date", b"Message-ID"])
    assert data.isascii()  # 7-bit on the wire: non-ASCII goes as RFC 2047 / quoted-printable


def test_non_ascii_names_are_encoded_and_read_back() -> None:
    c = Composer(MessageConfig(from_addr="Zoë Øster <zoe@bulkmail.example>", subject="Für {{ name }}"),
                 campaign="spring")
    env = c.envelope(message("José García, Jr."))
    assert env.data.isascii() and not env.smtputf8
    assert b"=?utf-8?" in env.data
    m = c.compose(message("José García, Jr."))
    assert m["To"].addresses[0].display_name == "José García, Jr."
    assert m["From"].addresses[0].display_name == "Zoë Øster"
    assert m["Subject"] == "Für José García, Jr."


def test_international_addresses() -> None:
    c = Composer(MessageConfig(from_addr=FROM), campaign="spring")
    idn = c.envelope(message(to="ana@bücher.example"))
    assert idn.recipient == "ana@xn--bcher-kva.example" and not idn.smtputf8
    utf8 = c.envelope(message(to="ñandú@example.com"))
    assert utf8.smtputf8 and utf8.recipient == "ñandú@example.com"
    assert "ñandú@example.com".encode() in utf8.data


def test_null_fields_render_empty() -> None:
    c = Composer(MessageConfig(from_addr=FROM, subject="Hi {{ name }}!"), campaign="spring")
    m = c.compose(message(name=None))
    assert m["Subject"] == "Hi !" and m["To"] == "ada@example.com"


_TEXT = st.text(st.characters(blacklist_characters="{", blacklist_categories=("Cs",)), max_size=12)
_VALUE = st.one_of(st.none(), st.text(max_size=8), st.text("<>&\"' aé\n", min_size=1, max_size=6),
                   st.integers(), st.floats(), st.booleans())
_NAMES = ("name", "city", "id", "email", "campaign", "absent", "range", "cycler")


@settings(max_examples=300, deadline=None)
@given(texts=st.lists(_TEXT, min_size=1, max_size=5), names=st.lists(st.sampled_from(_NAMES), max_size=4),
       fields=st.dictionaries(st.sampled_from(_NAMES), _VALUE, max_size=4), autoescape=st.booleans())
def test_a_fill_renders_what_jinja2_renders(texts: list[str], names: list[str],
                                            fields: dict[str, object], autoescape: bool) -> None:
    """templates.Fill, the composer's path for text and bare names, against Jinja2 itself: any
    text, values of every column type (null included), names that are builtins, globals
    (`range`, `cycler`) or nothing at all."""
    source = "".join(t + "{{ " + n + " }}" for t, n in zip(texts, names, strict=False))
    source += texts[-1]  # zip stops at the shorter list
    env = environment(autoescape)
    template = env.from_string(source)
    builtins = {"id": 7, "email": "a@example.com", "campaign": "spring"}
    f = fill(env, source)
    assert f is not None
    out = f(fields, builtins, template.globals)
    if out is None:  # left to Jinja2: a name only a global answers
        assert any(n in template.globals and n not in fields and n not in builtins for n in names)
    else:
        assert out == template.render({**builtins, **fields})


@pytest.mark.parametrize("source", ["{{ name|upper }}", "{% if name %}x{% endif %}", "{{ 'a' }}",
                                    "{{ user.name }}", "{{ name }}{% for i in range(2) %}{% endfor %}",
                                    "Hi {{ self }}"])
def test_anything_but_text_and_bare_names_is_left_to_jinja2(source: str) -> None:
    assert fill(environment(False), source) is None


def test_check_fields(tmp_path: Path) -> None:
    cols = ["id", "email", "name", "city"]
    check_fields(MessageConfig(subject="{{ name }} {{ city }} {{ email }} {{ id }} {{ campaign }}"),
                 cols)
    with pytest.raises(UsageError, match="--subject: names field 'plan'"):
        check_fields(MessageConfig(subject="{{ plan }}"), cols)
    with pytest.raises(UsageError, match="--unsubscribe-url: names field 'token'"):
        check_fields(MessageConfig(unsubscribe_url="https://x/{{ token }}"), cols)
    (tmp_path / "b.txt").write_text("ok {{ name }}")
    (tmp_path / "b.html").write_text("{{ shoe_size }}")
    with pytest.raises(UsageError, match=r"b\.html: names field 'shoe_size'"):
        check_fields(MessageConfig(template=str(tmp_path / "b.txt")), cols)
    with pytest.raises(UsageError, match="does not parse"):
        check_fields(MessageConfig(subject="{{ name "), cols)
    with pytest.raises(UsageError, match="no such file"):
        check_fields(MessageConfig(template=str(tmp_path / "missing.txt")), cols)
    with pytest.raises(UsageError, match="--from"):
        check_fields(MessageConfig(from_addr="not an address"), cols)
    assert referenced_fields("{{ a }}{% if b %}{{ c|upper }}{% endif %}") == {"a", "b", "c"}
    assert header_fields(MessageConfig(subject="{{ city }}", unsubscribe_url="u/{{ t }}")) == {
        "name", "city", "t"}


def test_missing_template_field_fails_in_the_cli_before_ray(tmp_path: Path) -> None:
    path = write_recipients(tmp_path / "in.parquet", 10)
    (tmp_path / "body.txt").write_text("Dear {{ name }}, your {{ loyalty_tier }} status")
    res = cli("--input", str(path), "--runs-dir", str(tmp_path / "runs"),
              "--template", str(tmp_path / "body.txt"), cwd=tmp_path, timeout=60)
    assert res.returncode == 2
    assert "'loyalty_tier'" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.parquet"))


def test_dry_run_writes_eml_files_and_sends_nothing(tmp_path: Path, body: Path) -> None:
    path = write_recipients(tmp_path / "in.parquet", 50)
    people = pl.read_parquet(path)
    with Sink() as sink:
        res = cli("--input", str(path), "--runs-dir", str(tmp_path / "runs"), "--campaign", "dry",
                  "--dry-run", "5", "--template", str(body), "--subject", "For {{ name }}",
                  "--from", FROM, "--sender", "smtp", "--smtp-port", str(sink.port),
                  cwd=tmp_path, timeout=60)
        assert res.returncode == 0, res.stderr
        assert sink.stats.connections == 0 and sink.stats.messages == 0
    files = sorted((tmp_path / "runs/dry/dry-run").glob("*.eml"))
    assert [f.name for f in files] == [f"{i}.eml" for i in range(5)]
    import email
    from email import policy
    for i, f in enumerate(files):
        m = email.message_from_bytes(f.read_bytes().replace(b"\r\n", b"\n"), policy=policy.default)
        row = people.row(i, named=True)
        assert m["To"].addresses[0].addr_spec == row["email"]
        assert m["Subject"] == f"For {row['name']}"
        assert m["Message-ID"] == f"<dry.{i}@bulkmail.example>"
        assert row["city"] in m.get_body(("plain",)).get_content()
