"""Writes the real-world-shaped message corpus and its expectations (expected.json).

Run once (``python -m tests.corpus.make_corpus``); the .eml files are committed. The
expectations are written here by hand, per message: which destinations must come out
as tracked links (in order), which hrefs must stay exactly as written, and whether the
copy gets a pixel. They never come from the code under test.
"""

from __future__ import annotations

import base64
import json
import quopri
import zlib
from pathlib import Path

HERE = Path(__file__).parent
SITE_URL = "https://track.example.test"
EXPECTED: dict[str, dict[str, object]] = {}
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYGD4DwABBAEAwS2OUAAAAABJRU5ErkJggg=="
)
PDF = b"%PDF-1.4\n" + bytes(range(256)) * 40 + b"\n%%EOF\n"


def b64(data: bytes) -> str:
    encoded = base64.b64encode(data).decode()
    return "\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))


def qp(text: str, charset: str = "utf-8") -> str:
    return quopri.encodestring(text.encode(charset)).decode("ascii")


def headers(subject: str, extra: str = "") -> str:
    return (
        "From: Example Shop <news@shop.example.com>\n"
        "To: Ann Example <ann@example.com>\n"
        f"Subject: {subject}\n"
        "Date: Tue, 03 Mar 2026 10:00:00 +0000\n"
        f"Message-ID: <{zlib.crc32(subject.encode())}@shop.example.com>\n"
        "MIME-Version: 1.0\n" + extra
    )


def write(name: str, content: str | bytes, tracked: list[str], untracked: list[str] = (), *,
          pixel: int = 1, rewritten: bool = True, crlf: bool = False, unparsable: bool = False) -> None:  # fmt: skip
    data = content.encode("utf-8") if isinstance(content, str) else content
    if crlf:
        data = data.replace(b"\n", b"\r\n")
    (HERE / f"{name}.eml").write_bytes(data)
    EXPECTED[name] = {
        "tracked": tracked,
        "untracked": list(untracked),
        "pixel": pixel,
        "rewritten": rewritten,
        "unparsable": unparsable,  # relayed byte for byte, without even a tracking header
    }


def alternative(text: str, html: str, boundary: str = "alt-1", cte: str = "quoted-printable",
                charset: str = "utf-8") -> str:  # fmt: skip
    body = (
        qp(html, charset)
        if cte == "quoted-printable"
        else b64(html.encode(charset))
        if cte == "base64"
        else html
    )
    return (
        f'Content-Type: multipart/alternative; boundary="{boundary}"\n\n'
        f"--{boundary}\nContent-Type: text/plain; charset={charset}\nContent-Transfer-Encoding: quoted-printable\n\n"
        f"{qp(text, charset)}\n"
        f"--{boundary}\nContent-Type: text/html; charset={charset}\nContent-Transfer-Encoding: {cte}\n\n"
        f"{body}\n--{boundary}--\n"
    )


def page(inner: str) -> str:
    return f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>News</title></head>\n<body>\n{inner}\n</body>\n</html>\n'


def main() -> None:
    shop = "https://shop.example.com/spring?utm_source=mail&utm_medium=email"
    blog = "https://blog.example.com/post/42"
    # 1-3: the everyday newsletter in its three transfer encodings
    html = page(
        f'<h1>Spring sale</h1>\n<p><a href="{shop.replace("&", "&amp;")}">Shop now</a></p>\n<p><a href="{blog}">Read</a></p>'
    )
    write(
        "newsletter_alternative_qp",
        headers("Spring sale") + alternative("Spring sale " + shop, html),
        [shop, blog],
    )
    write(
        "newsletter_html_base64",
        headers("Spring base64") + alternative("Spring", html, "b64", "base64"),
        [shop, blog],
    )
    write(
        "html_only_7bit",
        headers("HTML only", "Content-Type: text/html; charset=us-ascii\nContent-Transfer-Encoding: 7bit\n")
        + "\n"
        + html,
        [shop, blog],
    )
    # 4: multipart/mixed with a PDF
    write(
        "mixed_with_pdf",
        headers("Your invoice", 'Content-Type: multipart/mixed; boundary="mix-1"\n')
        + "\nThis is a multi-part message in MIME format.\n--mix-1\n"
        + alternative("Invoice attached", page(f'<p>Invoice. <a href="{blog}">Account</a></p>'))
        + '\n--mix-1\nContent-Type: application/pdf; name="invoice.pdf"\nContent-Transfer-Encoding: base64\n'
        'Content-Disposition: attachment; filename="invoice.pdf"\n\n' + b64(PDF) + "\n--mix-1--\n",
        [blog],
    )
    # 5: multipart/related with inline cid: images
    related = (
        'Content-Type: multipart/related; boundary="rel-1"; type="text/html"\n\n--rel-1\n'
        "Content-Type: text/html; charset=utf-8\nContent-Transfer-Encoding: quoted-printable\n\n"
        + qp(page(f'<img src="cid:logo@shop" alt="Logo"><a href="{blog}"><img src="cid:banner@shop"></a>'))
        + "\n--rel-1\nContent-Type: image/png\nContent-Transfer-Encoding: base64\nContent-ID: <logo@shop>\n"
        "Content-Disposition: inline; filename=logo.png\n\n"
        + b64(PNG)
        + "\n--rel-1\nContent-Type: image/png\nContent-Transfer-Encoding: base64\nContent-ID: <banner@shop>\n\n"
        + b64(PNG * 3)
        + "\n--rel-1--\n"
    )
    write("related_cid_images", headers("Inline images") + related, [blog], ["cid:logo@shop"])
    # 6: Apple Mail / Gmail nesting: mixed(related(alternative(text, html), image), attachment)
    nested = (
        'Content-Type: multipart/mixed; boundary="outer"\n\n--outer\n'
        'Content-Type: multipart/related; boundary="inner-rel"\n\n--inner-rel\n'
        + alternative(
            "Nested " + shop,
            page(f'<a href="{shop.replace("&", "&amp;")}">Shop</a><img src="cid:img1">'),
            "inner-alt",
        )
        + "\n--inner-rel\nContent-Type: image/png\nContent-ID: <img1>\nContent-Transfer-Encoding: base64\n\n"
        + b64(PNG)
        + "\n--inner-rel--\n\n--outer\nContent-Type: text/csv; name=report.csv\nContent-Disposition: attachment; filename=report.csv\n"
        'Content-Transfer-Encoding: 7bit\n\nid,total\n1,42\n2,<a href="https://not.a.link.example/">\n--outer--\n'
    )
    write("nested_mixed_related_alternative", headers("Nested") + nested, [shop])
    # 7-9: charsets
    latin = page(f'<p>Caf\u00e9 cr\u00e8me \u00e0 la fran\u00e7aise</p><a href="{blog}">Lire</a>')
    write(
        "iso_8859_1_qp",
        headers("Caf\u00e9".encode("ascii", "xmlcharrefreplace").decode())
        + alternative("Cafe", latin, "l1", "quoted-printable", "iso-8859-1"),
        [blog],
    )
    cp1252 = page(f"<p>\u201cQuoted\u201d \u2013 prices in \u20ac</p><a href='{shop}'>Buy</a>")
    body_1252 = (
        headers(
            "Windows-1252", "Content-Type: text/html; charset=windows-1252\nContent-Transfer-Encoding: 8bit\n"
        ).encode()
        + b"\n"
        + cp1252.encode("windows-1252")
    )
    write("windows_1252_8bit", body_1252, [shop])
    jp = page(f'<p>\u6625\u306e\u30bb\u30fc\u30eb\u3067\u3059\u3002</p><a href="{blog}">\u8aad\u3080</a>')
    write(
        "iso_2022_jp_7bit",
        headers(
            "=?ISO-2022-JP?B?GyRCPVUkTiU7ITwlayEiGyhC?=",
            "Content-Type: text/html; charset=ISO-2022-JP\nContent-Transfer-Encoding: 7bit\n",
        ).encode()
        + b"\n"
        + jp.encode("iso-2022-jp"),
        [blog],
    )
    # 10-11: text only: they gain an HTML alternative with the pixel
    write(
        "text_only_utf8",
        headers("Plain", "Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n")
        + f"\nHello \u00e9t\u00e9,\nnews: {blog}\nshop: {shop}.\n",
        [blog, shop],
    )
    write(
        "text_only_no_mime",
        "From: cron@example.com\nTo: ops@example.com\nSubject: nightly\n\nAll jobs done. See https://ops.example.com/jobs/1\n",
        ["https://ops.example.com/jobs/1"],
    )
    # 12: SMTPUTF8 sender: UTF-8 in headers and addresses
    write(
        "smtputf8_headers",
        "From: J\u00f6rg <j\u00f6rg@b\u00fccher.example>\nTo: ann@example.com\nSubject: Gr\u00fc\u00dfe aus M\u00fcnchen\nMIME-Version: 1.0\n"
        "Content-Type: text/html; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n"
        + page(f'<p>Gr\u00fc\u00dfe</p><a href="{blog}">B\u00fccher</a>'),
        [blog],
    )
    # 13: long lines: a tracked link pushes a 990-character line past 998 -> quoted-printable
    long_html = page("<p>" + "x" * 900 + f'<a href="{blog}">go</a></p>')
    write(
        "long_lines_8bit",
        headers("Long", "Content-Type: text/html; charset=utf-8\nContent-Transfer-Encoding: 8bit\n")
        + "\n"
        + long_html,
        [blog],
    )
    # 14-15: line endings
    write(
        "crlf_line_endings",
        headers("CRLF") + alternative("crlf", page(f'<a href="{blog}">x</a>'), "crlf"),
        [blog],
        crlf=True,
    )
    write("lf_line_endings", headers("LF") + alternative("lf", page(f'<a href="{blog}">x</a>'), "lf"), [blog])
    # 16-19: how links are written
    entity = "https://shop.example.com/p?id=1&amp;ref=mail&amp;x=%20y"
    write(
        "entity_encoded_urls",
        headers("Entities", "Content-Type: text/html; charset=utf-8\n")
        + "\n"
        + page(f'<a href="{entity}">e</a><a href="https://shop.example.com/q?a=1&#38;b=2">n</a>'),
        ["https://shop.example.com/p?id=1&ref=mail&x=%20y", "https://shop.example.com/q?a=1&b=2"],
    )
    # Legacy references without ";" (&sect, &times, &curren, &reg, &not, &copy) stay as
    # written in an attribute when a letter, digit or "=" follows: what a browser opens.
    legacy = "https://shop.example.com/p?id=1&section=2&timestamp=3&currency=eur&region=eu&not=1&copy=2"
    write(
        "legacy_references_in_query",
        headers("Legacy references", "Content-Type: text/html; charset=utf-8\n")
        + "\n"
        + page(
            f'<a href="{legacy}">q</a>'
            "<a href='https://shop.example.com/s?a=1&sect;b'>s</a>"
            "<a href=https://shop.example.com/r?x=1&reg>u</a>"
            '<a href="https://shop.example.com/c?x=&copy-1&amp=2">c</a>'
            '<v:roundrect xmlns:v="urn:schemas-microsoft-com:vml" href="https://shop.example.com/v?a=1&times=2"><center>v</center></v:roundrect>'
            '<a href="https://shop.example.com/e?p=5&euro;&amp;q=&#233;">e</a>'
        ),
        [
            legacy,
            "https://shop.example.com/s?a=1\u00a7b",
            "https://shop.example.com/r?x=1\u00ae",
            "https://shop.example.com/c?x=\u00a9-1&amp=2",
            "https://shop.example.com/v?a=1&times=2",
            "https://shop.example.com/e?p=5\u20ac&q=\u00e9",
        ],
    )
    write(
        "uppercase_tags",
        headers("Upper", "Content-Type: text/html; charset=utf-8\n")
        + "\n"
        + f'<HTML><BODY><A HREF="{blog}">X</A><A\nHREF="https://shop.example.com/">Y</A></BODY></HTML>\n',
        [blog, "https://shop.example.com/"],
    )
    write(
        "unquoted_and_single_quoted",
        headers("Quotes", "Content-Type: text/html; charset=utf-8\n")
        + "\n"
        + page(
            f'<a href={blog}>u</a> <a href=\'https://shop.example.com/s\'>s</a> <a title="x" href = "https://shop.example.com/d">d</a>'
        ),
        [blog, "https://shop.example.com/s", "https://shop.example.com/d"],
    )
    write(
        "image_map_area",
        headers("Map", "Content-Type: text/html; charset=utf-8\n")
        + "\n"
        + page(
            '<img src="https://cdn.example.com/map.png" usemap="#m"><map name="m"><area shape="rect" coords="0,0,10,10" href="https://shop.example.com/left"><area shape="rect" coords="10,0,20,10" href="https://shop.example.com/right" alt="r"></map>'
        ),
        ["https://shop.example.com/left", "https://shop.example.com/right"],
        ["https://cdn.example.com/map.png"],
    )
    # 20: Outlook bullet-proof button in conditional comments
    vml = page(
        '<!--[if mso]>\n<v:roundrect xmlns:v="urn:schemas-microsoft-com:vml" href="https://shop.example.com/cta" style="height:40px;width:200px" arcsize="10%" fillcolor="#0a0">\n'
        "<w:anchorlock/><center>Buy</center></v:roundrect>\n<![endif]-->\n"
        '<!--[if !mso]><!--><a href="https://shop.example.com/cta" style="background:#0a0">Buy</a><!--<![endif]-->'
    )
    write(
        "outlook_vml_button",
        headers(
            "VML", "Content-Type: text/html; charset=utf-8\nContent-Transfer-Encoding: quoted-printable\n"
        )
        + "\n"
        + qp(vml),
        ["https://shop.example.com/cta", "https://shop.example.com/cta"],
    )
    # 21-23: links never wrapped (again)
    tracked_already = f"{SITE_URL}/track/click/1b4e28ba-2fa1-11d2-883f-0016d3cca427/?url=https%3A%2F%2Fa.example&amp;sig=abc"
    write(
        "already_tracked_links",
        headers("Again", "Content-Type: text/html; charset=utf-8\n")
        + "\n"
        + page(f'<a href="{tracked_already}">old</a><a href="{blog}">new</a>'),
        [blog],
        [tracked_already],
    )
    write(
        "data_notrack",
        headers("Notrack", "Content-Type: text/html; charset=utf-8\n")
        + "\n"
        + page(f'<a data-notrack href="https://bank.example.com/login">login</a><a href="{blog}">blog</a>'),
        [blog],
        ['<a href="https://bank.example.com/login">'],
    )
    write(
        "plus_notrack_scheme",
        headers("Plus", "Content-Type: text/html; charset=utf-8\n")
        + "\n"
        + page(f'<a href="https+notrack://bank.example.com/reset?t=1">reset</a><a href="{blog}">blog</a>'),
        [blog],
        ['href="https://bank.example.com/reset?t=1"'],
    )
    # 24: unsubscribe link and List-Unsubscribe header
    unsub = "https://shop.example.com/u/123abc"
    write(
        "unsubscribe_link_and_header",
        headers(
            "Unsub",
            f"List-Unsubscribe: <{unsub}>, <mailto:unsub@shop.example.com>\nContent-Type: text/html; charset=utf-8\n",
        )
        + "\n"
        + page(
            f'<a href="{blog}">blog</a><a href="{unsub}">Stop these mails</a><a href="https://shop.example.com/preferences/unsubscribe?u=1">Unsubscribe</a>'
        ),
        [blog],
        [unsub, "https://shop.example.com/preferences/unsubscribe?u=1"],
    )
    # 25: links that are not web links
    write(
        "mailto_tel_anchor_links",
        headers("Contact", "Content-Type: text/html; charset=utf-8\n")
        + "\n"
        + page(
            '<a href="mailto:help@shop.example.com">mail</a><a href="tel:+15551234">call</a><a href="#top">top</a><a href="{{ unsubscribe_url }}">merge</a><a href="https://shop.example.com/help">help</a>'
        ),
        ["https://shop.example.com/help"],
        ["mailto:help@shop.example.com", "tel:+15551234", "#top", "{{ unsubscribe_url }}"],
    )
    # 26: DKIM-signed by the app: relayed with its body untouched
    write(
        "dkim_signed_untouched",
        "DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=shop.example.com; s=s1;\n h=from:to:subject:date:message-id; bh=47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=;\n b=dGVzdA==\n"
        + headers("Signed", "Content-Type: text/html; charset=utf-8\n")
        + "\n"
        + page(f'<a href="{blog}">x</a>'),
        [],
        [blog],
        pixel=0,
        rewritten=False,
    )
    # 27: calendar invitation next to the HTML
    write(
        "calendar_invite",
        headers("Meeting", 'Content-Type: multipart/alternative; boundary="cal"\n')
        + "\n--cal\nContent-Type: text/plain; charset=utf-8\n\nMeeting\n--cal\nContent-Type: text/html; charset=utf-8\n\n"
        + page(f'<a href="{blog}">agenda</a>')
        + "\n--cal\nContent-Type: text/calendar; charset=utf-8; method=REQUEST\n\n"
        "BEGIN:VCALENDAR\nMETHOD:REQUEST\nBEGIN:VEVENT\nURL:https://meet.example.com/abc\nEND:VEVENT\nEND:VCALENDAR\n--cal--\n",
        [blog],
        ["https://meet.example.com/abc"],
    )
    # 28: a forwarded message is attached content, not ours to track
    write(
        "forwarded_rfc822",
        headers("Fwd", 'Content-Type: multipart/mixed; boundary="fwd"\n')
        + "\n--fwd\nContent-Type: text/html; charset=utf-8\n\n"
        + page(f'<a href="{blog}">see below</a>')
        + '\n--fwd\nContent-Type: message/rfc822\nContent-Disposition: inline\n\nFrom: x@example.org\nSubject: original\nContent-Type: text/html\n\n<a href="https://orig.example.org/">orig</a>\n--fwd--\n',
        [blog],
        ["https://orig.example.org/"],
    )
    # 29: an HTML file attached is an attachment
    write(
        "html_attachment",
        headers("Report", 'Content-Type: multipart/mixed; boundary="att"\n')
        + "\n--att\nContent-Type: text/plain; charset=utf-8\n\nReport attached, also https://ops.example.com/r\n--att\nContent-Type: text/html; name=report.html\nContent-Disposition: attachment; filename=report.html\n\n"
        + '<a href="https://report.example.com/">r</a>\n--att--\n',
        ["https://ops.example.com/r"],
        ["https://report.example.com/"],
    )
    # 30: two HTML parts: links in both, one pixel
    write(
        "two_html_parts",
        headers("Two", 'Content-Type: multipart/mixed; boundary="two"\n')
        + "\n--two\nContent-Type: text/html; charset=utf-8\n\n"
        + page(f'<a href="{blog}">one</a>')
        + "\n--two\nContent-Type: text/html; charset=utf-8\n\n"
        + page('<a href="https://shop.example.com/two">two</a>')
        + "\n--two--\n",
        [blog, "https://shop.example.com/two"],
    )
    # 31-32: HTML without <body>, empty HTML
    write(
        "html_fragment_no_body",
        headers("Fragment", "Content-Type: text/html; charset=utf-8\n")
        + f'\n<p>Hi <a href="{blog}">there</a></p>\n',
        [blog],
    )
    write(
        "html_without_links",
        headers("No links", "Content-Type: text/html; charset=utf-8\n")
        + "\n"
        + page("<p>Nothing to click</p>"),
        [],
    )
    # 33: marketing template with tables, styles, preheader and many links
    many = [f"https://shop.example.com/product/{i}?c=spring&amp;p={i}" for i in range(12)]
    cells = "".join(
        f'<tr><td style="padding:8px"><a href="{u}" target="_blank" style="color:#333">Product {i}</a></td></tr>\n'
        for i, u in enumerate(many)
    )
    template = page(
        '<div style="display:none;max-height:0">Preheader text</div>\n<table role="presentation" width="100%">\n'
        + cells
        + "</table>\n<style>a{color:red}</style>"
    )
    write(
        "marketing_table_template",
        headers("Products") + alternative("Products", template, "mkt"),
        [u.replace("&amp;", "&") for u in many],
    )
    # 34-40: broken MIME, relayed as it came
    write(
        "broken_no_closing_boundary",
        headers("Broken 1", 'Content-Type: multipart/alternative; boundary="never"\n')
        + f'\n--never\nContent-Type: text/html; charset=utf-8\n\n<a href="{blog}">x</a>\n',
        [blog],
    )
    write(
        "broken_multipart_without_boundary",
        headers("Broken 2", "Content-Type: multipart/mixed\n") + f'\n<a href="{blog}">x</a>\n',
        [],
        [blog],
        pixel=0,
        rewritten=False,
    )
    write(
        "broken_bad_base64",
        headers("Broken 3", "Content-Type: text/html; charset=utf-8\nContent-Transfer-Encoding: base64\n")
        + "\n"
        + b64(page(f'<a href="{blog}">x</a>').encode())
        + "\n!!!not base64 at all***\n",
        [blog],
    )
    write(
        "broken_unknown_charset",
        headers("Broken 4", "Content-Type: text/html; charset=x-unknown-42\n")
        + "\n"
        + page(f'<a href="{blog}">x</a>'),
        [blog],
    )
    write(
        "broken_headers_only",
        "From: a@example.com\nTo: b@example.com\nSubject: no body at all\n",
        [],
        pixel=0,
        rewritten=False,
        unparsable=True,
    )
    write(
        "broken_garbage_header_lines",
        "From: a@example.com\nthis is not a header\nSubject: junk\nContent-Type: text/html\n\n"
        + f'<a href="{blog}">x</a>\n',
        [],
        [blog],
        pixel=0,
        rewritten=False,
        unparsable=True,
    )
    write(
        "broken_binary_junk",
        headers("Broken 7", "Content-Type: application/octet-stream\n").encode()
        + b"\n"
        + bytes(range(1, 256)).replace(b"\r", b"").replace(b"\n", b"")
        + b"\n",
        [],
        pixel=0,
        rewritten=False,
    )
    (HERE / "expected.json").write_text(
        json.dumps({"site_url": SITE_URL, "messages": EXPECTED}, indent=1, ensure_ascii=False) + "\n"
    )
    print(f"wrote {len(EXPECTED)} messages")


if __name__ == "__main__":
    main()
