"""The tracker's OpenAPI 3.0 description, served at ``/openapi.json``.

Written by hand next to the routes it describes; the test suite runs schemathesis
against the running app with this document, so every status, media type and body
shape here is one the tracker really answers with.
"""

from __future__ import annotations

from typing import Any

JSON = "application/json"
HTML = "text/html"

_ERROR = {"$ref": "#/components/schemas/Error"}


def _json(description: str, schema: dict[str, Any] = _ERROR) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _html(description: str) -> dict[str, Any]:
    return {"description": description, "content": {HTML: {"schema": {"type": "string"}}}}


def _tracking_id() -> dict[str, Any]:
    return {
        "name": "tracking_id",
        "in": "path",
        "required": True,
        "description": "The recipient copy's tracking id (a UUID)",
        "schema": {"type": "string", "format": "uuid"},
    }


# The examples of docs/esps/generic.md; any time is accepted as stated (docs/tracker.md "Event times").
GENERIC_EXAMPLES: dict[str, Any] = {
    "bounce": {
        "summary": "POST /track/bounce/",
        "value": {
            "tracking_id": "7a3e9c2d-4b1f-4e8a-9d6c-5f0b1a2c3d4e",
            "bounce_type": "hard",
            "reason": "550 5.1.1 user unknown",
            "timestamp": "2026-11-27T10:00:00Z",
        },
    },
    "delivery": {
        "summary": "POST /track/delivery/",
        "value": {"tracking_id": "7a3e9c2d-4b1f-4e8a-9d6c-5f0b1a2c3d4e", "timestamp": "2024-01-01T12:00:00Z"},
    },
}


def _webhook_responses(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    responses = {
        "200": _json(
            "Stored in JetStream (or authentic but unusable, and acknowledged)",
            {"$ref": "#/components/schemas/WebhookAccepted"},
        ),
        "400": _json("Malformed body, or JSON nested deeper than MAX_JSON_DEPTH"),
        "401": _json("Missing or wrong signature / credentials"),
        "403": _json("Stale timestamp, replayed request (same key, another body) or topic not allowed"),
        "413": _json("Body or event larger than MAX_WEBHOOK_BYTES or one NATS message"),
        "503": _json("Not configured, or the event store or replay guard is unavailable: retry later"),
    }
    responses.update(extra or {})
    return responses


def _provider(
    summary: str, description: str, schema: dict[str, Any], headers: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "post": {
            "tags": ["provider webhooks"],
            "summary": summary,
            "description": description,
            "parameters": headers,
            "requestBody": {"required": True, "content": {JSON: {"schema": schema}}},
            "responses": _webhook_responses(),
        }
    }


def _header(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "header",
        "required": False,
        "description": description,
        "schema": {"type": "string"},
    }


def _paths() -> dict[str, Any]:
    pixel_get = {
        "tags": ["recipients"],
        "summary": "Open pixel: a 1x1 GIF; records `opened`",
        "parameters": [_tracking_id()],
        "responses": {
            "200": {
                "description": "The transparent GIF, never cached",
                "content": {"image/gif": {"schema": {"type": "string", "format": "binary"}}},
            },
            "400": _json("The tracking id is not a UUID"),
        },
    }
    click_get = {
        "tags": ["recipients"],
        "summary": "Signed click redirect; records `clicked`",
        "description": "Redirects only when `sig` matches tracking id and `url`: never an open redirect. "
        "The hidden honeypot link answers an empty page.",
        "parameters": [
            _tracking_id(),
            {"name": "url", "in": "query", "required": True, "schema": {"type": "string"}},
            {"name": "sig", "in": "query", "required": True, "schema": {"type": "string"}},
        ],
        "responses": {
            "302": {
                "description": "To the original destination",
                "headers": {"Location": {"schema": {"type": "string"}}},
            },
            "200": _html("The honeypot link: an empty page, no redirect"),
            "400": _html("Invalid link: malformed, not a web address, or signature mismatch"),
        },
    }
    unsubscribe = {
        "get": {
            "tags": ["recipients"],
            "summary": "Unsubscribe confirmation page; changes nothing",
            "parameters": [_tracking_id()],
            "responses": {
                "200": _html("The confirmation page with its button"),
                "400": _html("Malformed link"),
            },
        },
        "post": {
            "tags": ["recipients"],
            "summary": "Unsubscribe (RFC 8058 one-click, or the page's button); records `unsubscribed`",
            "parameters": [_tracking_id()],
            "requestBody": {
                "required": True,
                "content": {
                    media: {"schema": {"$ref": "#/components/schemas/UnsubscribeForm"}}
                    for media in ("application/x-www-form-urlencoded", "multipart/form-data")
                },
            },
            "responses": {
                "200": _html("Unsubscribed"),
                "400": _html(
                    "Neither List-Unsubscribe=One-Click nor the page's confirmation, or a malformed link"
                ),
                "413": _json("Body too large"),
            },
        },
    }
    generic = {
        "post": {
            "tags": ["generic webhooks"],
            "summary": "Generic bounce / delivery / complaint report",
            "security": [{"bearer": []}, {}],
            "parameters": [
                {
                    "name": "kind",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "enum": ["bounce", "delivery", "complaint"]},
                }
            ],
            "requestBody": {
                "required": True,
                "content": {
                    JSON: {
                        "schema": {"$ref": "#/components/schemas/GenericReport"},
                        "examples": GENERIC_EXAMPLES,
                    }
                },
            },
            "responses": {
                "200": _json("Stored", {"$ref": "#/components/schemas/GenericAccepted"}),
                "400": _json("Malformed report, or JSON nested deeper than MAX_JSON_DEPTH"),
                "401": _json("Missing or wrong WEBHOOK_TOKEN"),
                "404": _json("Not one of bounce, delivery, complaint"),
                "413": _json("Body too large"),
                "503": _json(
                    "WEBHOOK_TOKEN not configured off loopback, or event store unavailable: retry later"
                ),
            },
        }
    }
    paths: dict[str, Any] = {}
    for suffix in ("/", ""):
        alias = {"description": "Same as the form with a trailing slash"} if not suffix else {}
        paths[f"/track/pixel/{{tracking_id}}{suffix}"] = {
            "get": {**pixel_get, **alias, "operationId": f"pixel{suffix and '_'}"},
            "head": {
                **pixel_get,
                **alias,
                "operationId": f"pixelHead{suffix and '_'}",
                "summary": "Open pixel, headers only (counted as machine)",
            },
        }
        paths[f"/track/click/{{tracking_id}}{suffix}"] = {
            "get": {**click_get, **alias, "operationId": f"click{suffix and '_'}"},
            "head": {
                **click_get,
                **alias,
                "operationId": f"clickHead{suffix and '_'}",
                "summary": "Click, headers only (counted as machine)",
            },
        }
        paths[f"/track/unsubscribe/{{tracking_id}}{suffix}"] = {
            method: {**operation, **alias, "operationId": f"unsubscribe{method.title()}{suffix and '_'}"}
            for method, operation in unsubscribe.items()
        }
        paths[f"/track/{{kind}}{suffix}"] = {
            "post": {**generic["post"], **alias, "operationId": f"genericWebhook{suffix and '_'}"}
        }
    paths["/webhooks/sendgrid"] = _provider(
        "SendGrid Event Webhook (signed, ECDSA P-256)",
        "An array of events; signature over the timestamp header followed by the raw body.",
        {"type": "array", "items": {"$ref": "#/components/schemas/SendGridEvent"}},
        [
            _header("X-Twilio-Email-Event-Webhook-Signature", "base64 DER ECDSA signature"),
            _header("X-Twilio-Email-Event-Webhook-Timestamp", "Unix seconds, signed with the body"),
        ],
    )
    paths["/webhooks/mailgun"] = _provider(
        "Mailgun webhook (HMAC-SHA256 of timestamp + token)",
        "One event per request; user-variables carry tracking_id.",
        {"$ref": "#/components/schemas/MailgunWebhook"},
        [],
    )
    paths["/webhooks/mailgun"]["post"]["responses"]["406"] = _json(
        "A legacy (form-encoded) Mailgun webhook: not supported, and Mailgun does not retry a 406"
    )
    paths["/webhooks/ses"] = _provider(
        "Amazon SES events through SNS (signature versions 1 and 2)",
        "SubscriptionConfirmation (confirmed for SES_TOPIC_ARNS only) or Notification whose Message is the SES event.",
        {"$ref": "#/components/schemas/SnsMessage"},
        [_header("x-amz-sns-message-type", "Must agree with the body's Type")],
    )
    postmark = _provider(
        "Postmark webhook (optional basic auth)",
        "One record per request; Metadata carries tracking_id.",
        {"$ref": "#/components/schemas/PostmarkRecord"},
        [],
    )
    postmark["post"]["security"] = [{"basic": []}, {}]
    paths["/webhooks/postmark"] = postmark
    paths["/healthz"] = {
        "get": {
            "tags": ["operations"],
            "summary": "Liveness",
            "responses": {"200": _json("Alive", {"type": "object"})},
        }
    }
    paths["/readyz"] = {
        "get": {
            "tags": ["operations"],
            "summary": "Readiness (pixel and click serve even while NATS is down)",
            "responses": {
                "200": _json("Ready", {"type": "object"}),
                "503": _json("Not ready", {"type": "object"}),
            },
        }
    }
    paths["/metrics"] = {
        "get": {
            "tags": ["operations"],
            "summary": "Prometheus metrics",
            "responses": {
                "200": {
                    "description": "Prometheus text format",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
        }
    }
    paths["/openapi.json"] = {
        "get": {
            "tags": ["operations"],
            "summary": "This document",
            "responses": {"200": _json("OpenAPI 3.0", {"type": "object"})},
        }
    }
    return paths


def _schemas() -> dict[str, Any]:
    string = {"type": "string"}
    return {
        "Error": {
            "type": "object",
            "required": ["status", "error"],
            "properties": {"status": {"type": "string", "enum": ["error"]}, "error": string},
        },
        "WebhookAccepted": {
            "type": "object",
            "required": ["status", "message", "stored", "ignored"],
            "properties": {
                "status": {"type": "string", "enum": ["success"]},
                "message": string,
                "stored": {"type": "integer", "minimum": 0},
                "ignored": {"type": "integer", "minimum": 0},
            },
        },
        "GenericAccepted": {
            "type": "object",
            "required": ["status", "message"],
            "properties": {"status": {"type": "string", "enum": ["success"]}, "message": string},
        },
        "GenericReport": {
            "type": "object",
            "properties": {
                "tracking_id": {"type": "string", "format": "uuid"},
                "email": {"type": "string", "format": "email"},
                "bounce_type": {"type": "string", "enum": ["hard", "soft"]},
                "reason": string,
                "timestamp": {"oneOf": [{"type": "string", "format": "date-time"}, {"type": "number"}]},
                "event_id": string,
            },
        },
        "UnsubscribeForm": {
            "type": "object",
            "properties": {"List-Unsubscribe": {"type": "string", "enum": ["One-Click"]}, "confirm": string},
        },
        "SendGridEvent": {
            "type": "object",
            "required": ["event"],
            "properties": {
                "event": string,
                "email": string,
                "timestamp": {"type": "integer"},
                "sg_event_id": string,
                "sg_message_id": string,
                "tracking_id": string,
                "type": string,
                "reason": string,
                "url": string,
                "useragent": string,
                "ip": string,
            },
        },
        "MailgunWebhook": {
            "type": "object",
            "required": ["signature", "event-data"],
            "properties": {
                "signature": {
                    "type": "object",
                    "required": ["timestamp", "token", "signature"],
                    "properties": {"timestamp": string, "token": string, "signature": string},
                },
                "event-data": {"type": "object"},
            },
        },
        "SnsMessage": {
            "type": "object",
            "required": [
                "Type",
                "MessageId",
                "TopicArn",
                "Timestamp",
                "SignatureVersion",
                "Signature",
                "SigningCertURL",
            ],
            "properties": {
                "Type": {
                    "type": "string",
                    "enum": ["Notification", "SubscriptionConfirmation", "UnsubscribeConfirmation"],
                },
                "MessageId": string,
                "TopicArn": string,
                "Subject": string,
                "Message": string,
                "Timestamp": string,
                "SignatureVersion": {"type": "string", "enum": ["1", "2"]},
                "Signature": string,
                "SigningCertURL": string,
                "SubscribeURL": string,
                "Token": string,
            },
        },
        "PostmarkRecord": {
            "type": "object",
            "required": ["RecordType"],
            "properties": {
                "RecordType": {
                    "type": "string",
                    "enum": ["Bounce", "Delivery", "Open", "Click", "SpamComplaint", "SubscriptionChange"],
                },
                "Type": string,
                "ID": {"type": "integer"},
                "MessageID": string,
                "Email": string,
                "Recipient": string,
                "Metadata": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
    }


def openapi_document(site_url: str) -> dict[str, Any]:
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "mailbeacon tracker",
            "version": "1",
            "description": "Open pixel, signed click redirects, unsubscribe, and the ESP webhooks "
            "(SendGrid, Mailgun, Amazon SES through SNS, Postmark) plus the generic JSON webhooks.",
        },
        "servers": [{"url": site_url}],
        "paths": _paths(),
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "WEBHOOK_TOKEN (generic webhooks)",
                },
                "basic": {"type": "http", "scheme": "basic", "description": "POSTMARK_BASIC_AUTH"},
            },
        },
    }
