"""kopf wiring of the sidecar-injection webhook (docs/kubernetes.md "Injection by annotation").

A mutating admission handler for Pods on kopf's own HTTPS server (``kopf.WebhookServer``),
listening on INJECTION_LISTEN. Its certificate is cert-manager's (INJECTION_CERT_FILE and
_KEY_FILE, re-read by kopf when renewed) or one the operator makes at each start, whose CA it
then writes into the chart's MutatingWebhookConfiguration (RBAC: get and patch of that one
object). The chart's configuration says ``failurePolicy: Ignore``, and the handler never
refuses a pod: whatever goes wrong, the pod is created, at worst without the sidecar.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import ssl
from typing import Any

import aiohttp
import kopf

from campaign_operator.injection.sidecar import Injection, SidecarTemplate, inject
from campaign_operator.injection.tls import ca_bundle_patch, make_certificate
from campaign_operator.metrics import INJECTIONS
from mailbeacon.contract.settings import Settings, parse_listen

log = logging.getLogger(__name__)

WEBHOOK_ID = "inject-proxy"  # the URL path the MutatingWebhookConfiguration calls
CONFIGURATIONS = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations"


class InjectionWebhook:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        operator = settings.operator
        # Refused at start, not at the first pod: a broken template is a deployment mistake.
        self.template = SidecarTemplate.parse(operator.injection_template)
        if (operator.injection_cert_file is None) != (operator.injection_key_file is None):
            raise ValueError("MAILBEACON_INJECTION_CERT_FILE and _KEY_FILE go together")
        if operator.injection_cert_file is None and not operator.injection_dns_names:
            raise ValueError(
                "the injection webhook needs MAILBEACON_INJECTION_DNS_NAMES (its Service's names) "
                "for the certificate it makes, or cert-manager's MAILBEACON_INJECTION_CERT_FILE"
            )
        self.ca_installed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def startup(self, settings: kopf.OperatorSettings, **_: Any) -> None:
        operator = self.settings.operator
        host, port = parse_listen(operator.injection_listen or "")
        cert, key = operator.injection_cert_file, operator.injection_key_file
        if cert is not None and key is not None:
            settings.admission.server = kopf.WebhookServer(addr=host, port=port, certfile=cert, pkeyfile=key)
            log.info("injection webhook on %s:%s with the certificate %s", host, port, cert)
            return
        made = make_certificate(operator.injection_dns_names)
        cert, key = made.write(self.settings.data_dir / "webhook")
        settings.admission.server = kopf.WebhookServer(
            addr=host, port=port, certfile=cert, pkeyfile=key, password=made.password, cadata=made.ca_pem
        )
        log.info(
            "injection webhook on %s:%s with a certificate made for %s", host, port, made_for(self.settings)
        )
        if operator.injection_webhook_configuration:
            self._tasks.append(asyncio.create_task(self._install_ca(made.ca_pem, settings)))

    async def cleanup(self, **_: Any) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def _install_ca(self, ca_pem: bytes, settings: kopf.OperatorSettings) -> None:
        """Until the API server has the CA, it cannot verify the webhook and creates pods uninjected."""
        name, delay = self.settings.operator.injection_webhook_configuration or "", 1.0
        while True:
            try:
                await install_ca_bundle(connection(settings), name, ca_pem)
            except Exception as exc:
                log.warning(
                    "cannot write the CA into MutatingWebhookConfiguration %s (%s); pods are created "
                    "without the sidecar until it is there, retrying in %g s",
                    name,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            log.info("MutatingWebhookConfiguration %s trusts this start's certificate", name)
            self.ca_installed.set()
            return

    async def mutate(self, body: kopf.Body, patch: kopf.Patch, warnings: list[str], **_: Any) -> None:
        try:
            result = inject(dict(body), self.template)
            write_patch(body, patch, result)
        except Exception:
            # A refusal would stop the app's pod; failing open leaves it without the sidecar.
            log.exception("injecting the proxy failed; the pod is created without it")
            INJECTIONS.labels("error").inc()
            return
        INJECTIONS.labels(result.outcome).inc()
        warnings.extend(result.warnings)
        if result.pod is not None or result.warnings:
            meta = body.get("metadata") or {}
            log.info(
                "pod %s/%s: %s",
                meta.get("namespace"),
                meta.get("name") or f"{meta.get('generateName', '')}*",
                "; ".join(result.warnings) or result.outcome.replace("_", " "),
            )


def made_for(settings: Settings) -> str:
    return ", ".join(settings.operator.injection_dns_names)


def write_patch(body: kopf.Body, patch: kopf.Patch, result: Injection) -> None:
    """The changed parts of the pod as kopf's patch (kopf answers it as a JSON patch)."""
    if result.pod is None:
        return
    old_spec, new_spec = body.get("spec") or {}, result.pod["spec"]
    for key in ("initContainers", "containers", "volumes"):
        if new_spec.get(key) != old_spec.get(key):
            patch.spec[key] = new_spec[key]
    old_labels = (body.get("metadata") or {}).get("labels") or {}
    for label, value in (result.pod["metadata"].get("labels") or {}).items():
        if old_labels.get(label) != value:
            patch.meta.labels[label] = value


def register_injection(registry: kopf.OperatorRegistry, settings: Settings) -> InjectionWebhook:
    try:
        webhook = InjectionWebhook(settings)
    except ValueError as exc:  # InvalidTemplate too
        raise SystemExit(f"mailbeacon operator: injection webhook: {exc}") from None
    kopf.on.startup(registry=registry, id="injection-webhook-startup")(webhook.startup)
    kopf.on.cleanup(registry=registry, id="injection-webhook-cleanup")(webhook.cleanup)
    kopf.on.mutate(
        "v1", "pods", registry=registry, id=WEBHOOK_ID, operations=["CREATE"], ignore_failures=True
    )(webhook.mutate)
    return webhook


# --- the one API call: the CA into the webhook configuration ---------------------------------


def connection(settings: kopf.OperatorSettings) -> kopf.ConnectionInfo:
    """The credentials kopf itself logs in with: the pod's service account, else KUBECONFIG."""
    info = kopf.login_with_service_account(settings=settings) or kopf.login_with_kubeconfig(settings=settings)
    if info is None:
        raise RuntimeError("no Kubernetes credentials (neither a service account nor KUBECONFIG)")
    return info


def _pem(data: str | bytes) -> str:
    text = data.decode("ascii") if isinstance(data, bytes) else data
    return text if text.startswith("-----BEGIN ") else base64.b64decode(text).decode("ascii")


def _ssl(info: kopf.ConnectionInfo) -> ssl.SSLContext | bool:
    if not info.server.startswith("https:"):
        return False
    if info.insecure:
        return False
    context = ssl.create_default_context(
        cafile=info.ca_path, cadata=_pem(info.ca_data) if info.ca_data is not None else None
    )
    if info.certificate_path and info.private_key_path:
        context.load_cert_chain(info.certificate_path, info.private_key_path)
    return context


def _headers(info: kopf.ConnectionInfo) -> dict[str, str]:
    if info.username and info.password:
        return {"Authorization": aiohttp.BasicAuth(info.username, info.password).encode()}
    if info.token:
        return {"Authorization": f"{info.scheme or 'Bearer'} {info.token}"}
    return {}


async def install_ca_bundle(info: kopf.ConnectionInfo, name: str, ca_pem: bytes) -> None:
    url = f"{info.server.rstrip('/')}{CONFIGURATIONS}/{name}"
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(headers=_headers(info), timeout=timeout) as http:
        async with http.get(url, ssl=_ssl(info)) as response:
            if response.status != 200:
                raise RuntimeError(f"GET answered {response.status}: {(await response.text())[:200]}")
            configuration = await response.json()
        operations = ca_bundle_patch(configuration, ca_pem)
        if not operations:
            return
        headers = {"Content-Type": "application/json-patch+json"}
        body = json.dumps(operations)
        async with http.patch(url, data=body, headers=headers, ssl=_ssl(info)) as response:
            if response.status != 200:
                raise RuntimeError(f"PATCH answered {response.status}: {(await response.text())[:200]}")
