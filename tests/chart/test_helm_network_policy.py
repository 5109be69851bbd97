"""Who may reach each component (issue 16, defect 7), from the rendered NetworkPolicies.

:func:`allowed` evaluates ingress the way the NetworkPolicy API defines it: a pod no policy
selects takes everything; a selected pod takes a connection only when some rule of a policy
selecting it names the port (or no ports) and the source (or no ``from``); a peer with only a
podSelector means pods of the policy's own namespace, with only a namespaceSelector any pod of
those namespaces, with both the pods of those namespaces. Every policy is also validated with
kubernetes-validate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.chart.test_helm_chart import NAMESPACE, Manifest, by_kind, manifests, render, validate

RELEASE = {"app.kubernetes.io/name": "mailbeacon", "app.kubernetes.io/instance": "mb"}
PROXY = {
    "proxy": {"enabled": True, "relayNetworks": ["10.244.0.0/16"]},
    "secrets": {"upstreamSmtp": "smtp://relay:587"},
}


@dataclass
class Pod:
    namespace: str
    labels: dict[str, str] = field(default_factory=dict)
    namespace_labels: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.namespace_labels = {"kubernetes.io/metadata.name": self.namespace, **self.namespace_labels}


def component(name: str) -> Pod:
    return Pod(NAMESPACE, {**RELEASE, "app.kubernetes.io/component": name})


STRANGER = Pod("apps", {"app": "anything"})
PROMETHEUS = Pod("monitoring", {"app.kubernetes.io/name": "prometheus"})
HELM_TEST = component("test")
OPERATOR = component("operator")
INGRESS = Pod("ingress-nginx", {"app.kubernetes.io/name": "ingress-nginx"})


def matches(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    if selector is None:
        return True
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and labels.get(key) in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def _peer_allows(peer: dict[str, Any], source: Pod) -> bool:
    if "ipBlock" in peer:
        return False  # pods are addressed by selectors here
    if "namespaceSelector" in peer:
        namespace_ok = matches(peer["namespaceSelector"], source.namespace_labels)
    else:
        namespace_ok = source.namespace == NAMESPACE
    return namespace_ok and matches(peer.get("podSelector"), source.labels)


def allowed(docs: list[Manifest], source: Pod, target: Pod, port: str) -> bool:
    policies = [
        p
        for p in by_kind(docs, "NetworkPolicy").values()
        if p["metadata"].get("namespace", NAMESPACE) == target.namespace
        and matches(p["spec"]["podSelector"], target.labels)
        and "Ingress" in p["spec"]["policyTypes"]
    ]
    if not policies:
        return True
    for policy in policies:
        for rule in policy["spec"].get("ingress") or []:
            ports = rule.get("ports")
            if ports and not any(p.get("port") == port for p in ports):
                continue
            if "from" not in rule or any(_peer_allows(peer, source) for peer in rule["from"]):
                return True
    return False


@pytest.fixture(scope="module")
def default_docs() -> list[Manifest]:
    return manifests(render(PROXY))


def test_policies_are_on_by_default_and_valid(default_docs: list[Manifest]) -> None:
    policies = by_kind(default_docs, "NetworkPolicy")
    assert set(policies) == {f"mb-mailbeacon-{c}" for c in ("tracker", "aggregator", "operator", "proxy")}
    for policy in policies.values():
        assert policy["spec"]["policyTypes"] == ["Ingress"]  # egress only when asked for
        validate(policy)


def test_the_aggregator_is_reached_only_by_the_operator_prometheus_and_helm_test(
    default_docs: list[Manifest],
) -> None:
    aggregator = component("aggregator")
    assert allowed(default_docs, OPERATOR, aggregator, "http")
    assert allowed(default_docs, PROMETHEUS, aggregator, "http")
    assert allowed(default_docs, HELM_TEST, aggregator, "http")
    assert not allowed(default_docs, STRANGER, aggregator, "http")
    assert not allowed(default_docs, component("tracker"), aggregator, "http")
    # The operator's labels in another namespace are not the operator.
    assert not allowed(default_docs, Pod("apps", OPERATOR.labels), aggregator, "http")


def test_the_tracker_is_public_and_the_operator_is_not(default_docs: list[Manifest]) -> None:
    tracker = component("tracker")
    assert allowed(default_docs, STRANGER, tracker, "http")
    assert allowed(default_docs, INGRESS, tracker, "http")
    operator = component("operator")
    assert allowed(default_docs, PROMETHEUS, operator, "http")
    assert not allowed(default_docs, STRANGER, operator, "http")


def test_the_api_server_reaches_the_injection_webhook_only_when_injection_is_on(
    default_docs: list[Manifest],
) -> None:
    operator = component("operator")
    assert not allowed(default_docs, STRANGER, operator, "webhook")
    injecting = manifests(render({**PROXY, "operator": {"injection": {"enabled": True}}}))
    # The API server's address is the cluster's own: the webhook port is open to any source,
    # the operator's other port still only to its observers.
    assert allowed(injecting, STRANGER, operator, "webhook")
    assert not allowed(injecting, STRANGER, operator, "http")
    for policy in by_kind(injecting, "NetworkPolicy").values():
        validate(policy)


def test_only_labelled_clients_reach_the_shared_proxy(default_docs: list[Manifest]) -> None:
    """relayNetworks holds the whole pod CIDR; the policy decides who can connect at all."""
    proxy = component("proxy")
    assert not allowed(default_docs, STRANGER, proxy, "smtp")
    client = Pod("shop", {"app": "shop", "mailbeacon.io/smtp-client": "true"})
    assert allowed(default_docs, client, proxy, "smtp")
    assert not allowed(default_docs, client, proxy, "proxy-http")
    assert allowed(default_docs, PROMETHEUS, proxy, "proxy-http")
    assert not allowed(default_docs, PROMETHEUS, proxy, "smtp")


def test_customised_sources() -> None:
    oauth2 = Pod(NAMESPACE, {"app.kubernetes.io/name": "oauth2-proxy"})
    shop = Pod("shop", {"app": "shop"})
    values = {
        **PROXY,
        "networkPolicy": {
            "trackerFrom": [
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}
            ],
            "aggregatorFrom": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "oauth2-proxy"}}}],
            "proxyClientsFrom": [
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "shop"}}}
            ],
            "prometheus": [
                {
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
                    "podSelector": {},
                }
            ],
        },
    }
    docs = manifests(render(values))
    tracker, aggregator, proxy = component("tracker"), component("aggregator"), component("proxy")
    assert allowed(docs, INGRESS, tracker, "http") and allowed(docs, PROMETHEUS, tracker, "http")
    assert not allowed(docs, STRANGER, tracker, "http")
    assert allowed(docs, oauth2, aggregator, "http") and not allowed(docs, STRANGER, aggregator, "http")
    assert allowed(docs, shop, proxy, "smtp")
    assert not allowed(docs, Pod("apps", {"mailbeacon.io/smtp-client": "true"}), proxy, "smtp")
    assert not allowed(docs, Pod("other", {"app.kubernetes.io/name": "prometheus"}), aggregator, "http")
    for doc in by_kind(docs, "NetworkPolicy").values():
        validate(doc)


def test_nobody_to_scrape_still_never_means_everybody() -> None:
    docs = manifests(render({"networkPolicy": {"prometheus": []}, "helmTest": {"enabled": False}}))
    operator = by_kind(docs, "NetworkPolicy")["mb-mailbeacon-operator"]
    assert operator["spec"]["ingress"] == []  # a rule without "from" would admit everyone
    assert not allowed(docs, PROMETHEUS, component("operator"), "http")
    assert allowed(docs, OPERATOR, component("aggregator"), "http")


def _egress(docs: list[Manifest], name: str) -> list[tuple[tuple[int, ...], bool]]:
    """Each egress rule as (its ports, whether it names destinations)."""
    policy = by_kind(docs, "NetworkPolicy")[f"mb-mailbeacon-{name}"]
    assert "Egress" in policy["spec"]["policyTypes"]
    return [(tuple(p["port"] for p in rule["ports"]), "to" in rule) for rule in policy["spec"]["egress"]]


def test_egress_is_opt_in_with_sensible_targets() -> None:
    extra = {"to": [{"ipBlock": {"cidr": "192.0.2.10/32"}}], "ports": [{"port": 8200, "protocol": "TCP"}]}
    docs = manifests(render({**PROXY, "networkPolicy": {"egress": {"enabled": True, "extraRules": [extra]}}}))
    everyone = [((53, 53), True), ((4222,), False)]  # DNS to kube-dns; NATS on its port
    assert _egress(docs, "tracker") == [*everyone, ((443,), False), ((8200,), True)]
    assert _egress(docs, "aggregator") == [*everyone, ((5432,), False), ((8200,), True)]
    assert _egress(docs, "proxy") == [*everyone, ((25, 465, 587, 2525), False), ((8200,), True)]
    operator = by_kind(docs, "NetworkPolicy")["mb-mailbeacon-operator"]["spec"]["egress"]
    assert {"podSelector": {"matchLabels": {**RELEASE, "app.kubernetes.io/component": "aggregator"}}} in [
        peer for rule in operator for peer in rule.get("to", [])
    ]
    assert _egress(docs, "operator")[2] == ((443, 6443), False)  # the Kubernetes API
    for doc in by_kind(docs, "NetworkPolicy").values():
        validate(doc)


def test_policies_can_be_turned_off() -> None:
    assert not by_kind(manifests(render({"networkPolicy": {"enabled": False}})), "NetworkPolicy")
