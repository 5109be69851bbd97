"""NATS settings: the connection every component makes and the JetStream stream it provisions."""

from __future__ import annotations

from pathlib import Path
from typing import Self

from pydantic import Field, SecretStr, model_validator

from mailbeacon.contract.settings.values import SettingsGroup


class NatsSettings(SettingsGroup):
    """NATS: where it is, how to log in (docs/kubernetes.md "NATS credentials and TLS", NATS credentials), and the
    event stream's retention. Read by every component; the stream's by whichever creates it."""

    url: str | None = Field(
        default=None,
        validation_alias="MAILBEACON_NATS_URL",
        description="NATS server URL (with JetStream), or a cluster's URLs separated by commas; unset means the embedded nats-server of `mailbeacon up`",
    )
    # NATS login and TLS as connect options (docs/kubernetes.md "NATS credentials and TLS", NATS credentials): unlike
    # credentials in NATS_URL they apply to every server of a cluster, learned ones included.
    user: str | None = Field(
        default=None,
        validation_alias="MAILBEACON_NATS_USER",
        description="NATS user name, with NATS_PASSWORD (the two go together); like every NATS login setting it applies to every server of a cluster. One NATS login at a time (user and password, token, nkey seed or creds): a component given two refuses to start",
    )
    password: SecretStr | None = Field(
        default=None, validation_alias="MAILBEACON_NATS_PASSWORD", description="NATS password of NATS_USER"
    )
    token: SecretStr | None = Field(
        default=None, validation_alias="MAILBEACON_NATS_TOKEN", description="NATS authentication token"
    )
    nkey_seed_file: Path | None = Field(
        default=None,
        validation_alias="MAILBEACON_NATS_NKEY_SEED_FILE",
        description="File holding the NATS user's nkey seed (SU...): nkey authentication, the server's nonce signed with it",
    )
    creds_file: Path | None = Field(
        default=None,
        validation_alias="MAILBEACON_NATS_CREDS_FILE",
        description="NATS .creds file (user JWT and nkey seed), for NATS in operator/JWT mode",
    )
    ca_file: Path | None = Field(
        default=None,
        validation_alias="MAILBEACON_NATS_CA_FILE",
        description="CA bundle (PEM) the NATS servers' certificates are verified against; unset: the system's CAs when the server requires TLS",
    )
    tls_cert_file: Path | None = Field(
        default=None,
        validation_alias="MAILBEACON_NATS_TLS_CERT_FILE",
        description="Client certificate (PEM) presented to NATS servers that verify clients, with NATS_TLS_KEY_FILE",
    )
    tls_key_file: Path | None = Field(
        default=None,
        validation_alias="MAILBEACON_NATS_TLS_KEY_FILE",
        description="Private key (PEM) of NATS_TLS_CERT_FILE",
    )

    stream_max_age_days: float = Field(
        default=30.0, gt=0, description="Days the event stream MAILBEACON_EVENTS keeps events"
    )
    stream_duplicate_window_seconds: float = Field(
        default=600.0,
        gt=0,
        description="JetStream's duplicate window: a repeated Nats-Msg-Id inside it is dropped",
    )
    stream_replicas: int = Field(
        default=1,
        ge=1,
        le=5,
        description="Replicas of the stream, the consumer and the KV buckets: 3 on a NATS cluster; set at creation, while that many servers are up, and not changeable in place later",
    )
    # Allow JetStream fast-ingest batches on the stream (nats-server 2.14+); once on, every
    # server running the stream must be 2.14 or newer.
    stream_fast_batches: bool = Field(
        default=True,
        description="Allow JetStream fast-ingest batches on the event stream when the server is 2.14+ (the tracker's pixel and click events then need one acknowledgement per batch). Once allowed, every NATS server running the stream must be 2.14+: set false (chart: nats.fastBatches) while a cluster still has older servers",
    )

    @model_validator(mode="after")
    def _one_login(self) -> Self:
        # One way to log in: NATS refuses a CONNECT mixing them, and a half-given pair is a typo.
        methods = [
            name
            for name, given in (
                ("NATS_USER/NATS_PASSWORD", self.user or self.password),
                ("NATS_TOKEN", self.token),
                ("NATS_NKEY_SEED_FILE", self.nkey_seed_file),
                ("NATS_CREDS_FILE", self.creds_file),
            )
            if given
        ]
        if len(methods) > 1:
            raise ValueError(f"set one NATS login, not {' and '.join(methods)}")
        if bool(self.user) != bool(self.password):
            raise ValueError("MAILBEACON_NATS_USER and MAILBEACON_NATS_PASSWORD go together")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("MAILBEACON_NATS_TLS_CERT_FILE and MAILBEACON_NATS_TLS_KEY_FILE go together")
        return self
