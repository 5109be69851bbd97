"""Send a sample campaign message through the proxy: `python -m mailbeacon.app.sendtest`."""

from __future__ import annotations

import argparse
import smtplib
from email.message import EmailMessage

HTML = """<html><body>
<h1>Hello from mailbeacon</h1>
<p>Read <a href="https://example.com/news">the news</a> or
<a href="https://example.com/offer?ref=mail&amp;id=7">see the offer</a>.</p>
<p><a href="https://example.com/unsubscribe">Unsubscribe</a></p>
</body></html>"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smtp", default="127.0.0.1:2525", help="proxy address host:port")
    parser.add_argument("--campaign", default="welcome", help="value of the X-Campaign header")
    parser.add_argument("--to", nargs="+", default=["alice@example.com", "bob@example.com"])
    args = parser.parse_args()
    host, _, port = args.smtp.rpartition(":")
    message = EmailMessage()
    message["From"] = "News <news@example.com>"
    message["To"] = ", ".join(args.to)
    message["Subject"] = "Welcome to mailbeacon"
    message["X-Campaign"] = args.campaign
    message.set_content("Hello from mailbeacon. Read the news: https://example.com/news")
    message.add_alternative(HTML, subtype="html")
    with smtplib.SMTP(host, int(port), timeout=30) as smtp:
        smtp.send_message(message)
    print(f"sent to {', '.join(args.to)} in campaign {args.campaign!r}")


if __name__ == "__main__":
    main()
