"""The chart's uninstall hook (issue 16, defect 4): a pre-delete Job, with its own ServiceAccount
and the least RBAC it needs, created before it, that runs ``mailbeacon operator
release-campaigns`` with our image (the command itself: tests/operator/test_operator_release.py)."""

from __future__ import annotations

from typing import Any

from mailbeacon.app.cli import _parser
from tests.chart.test_helm_chart import NAMESPACE, PRODUCTION, Manifest, manifests, render, validate

HOOKED = ("ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding", "Job")


def _hook_docs(docs: list[Manifest]) -> list[Manifest]:
    return [d for d in docs if d["metadata"].get("annotations", {}).get("helm.sh/hook") == "pre-delete"]


def _rules(docs: list[Manifest], kind: str) -> list[tuple[str | None, list[dict[str, Any]]]]:
    return [(d["metadata"].get("namespace"), d["rules"]) for d in docs if d["kind"] == kind]


def test_a_pre_delete_job_releases_the_campaigns() -> None:
    docs = manifests(render())
    hooks = _hook_docs(docs)
    assert sorted(d["kind"] for d in hooks) == sorted(HOOKED)
    job = next(d for d in hooks if d["kind"] == "Job")
    weight = lambda d: int(d["metadata"]["annotations"]["helm.sh/hook-weight"])  # noqa: E731
    # Its ServiceAccount and RBAC exist before it runs, and go once it succeeded.
    assert all(weight(d) < weight(job) for d in hooks if d is not job)
    for doc in hooks:
        policy = doc["metadata"]["annotations"]["helm.sh/hook-delete-policy"].split(",")
        assert {"before-hook-creation", "hook-succeeded"} <= set(policy)
        validate(doc)
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    account = next(d for d in hooks if d["kind"] == "ServiceAccount")
    assert (
        pod["serviceAccountName"] == account["metadata"]["name"]
        and pod["automountServiceAccountToken"] is True
    )
    assert container["image"] == "ghcr.io/mailbeacon/mailbeacon:0.1.0"
    assert pod["restartPolicy"] == "Never" and job["spec"]["activeDeadlineSeconds"] <= 300
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    # A real command of our CLI, stopping the release's operator first.
    args = _parser().parse_args(container["args"])
    assert (args.command, args.operator_action) == ("operator", "release-campaigns")
    assert (args.stop_deployment, args.namespace) == ("mb-mailbeacon-operator", NAMESPACE)
    # Exactly what it does: stop that Deployment, list its pods, list and patch Campaigns.
    ((_, role),) = _rules(hooks, "Role")
    assert role == [
        {
            "apiGroups": ["apps"],
            "resources": ["deployments"],
            "resourceNames": ["mb-mailbeacon-operator"],
            "verbs": ["get", "patch"],
        },
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
    ]
    ((_, cluster),) = _rules(hooks, "ClusterRole")
    assert cluster == [
        {"apiGroups": ["mailbeacon.io"], "resources": ["campaigns"], "verbs": ["list", "patch"]}
    ]


def test_with_watched_namespaces_the_job_is_limited_to_them() -> None:
    docs = manifests(render(PRODUCTION))
    hooks = _hook_docs(docs)
    assert not [d for d in hooks if d["kind"] == "ClusterRole"]
    campaign_roles = [ns for ns, rules in _rules(hooks, "Role") if rules[0]["resources"] == ["campaigns"]]
    assert sorted(campaign_roles) == ["marketing", "shop"]
    job = next(d for d in hooks if d["kind"] == "Job")
    env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MAILBEACON_OPERATOR_NAMESPACES"] == "marketing,shop"


def test_no_hook_without_the_operator_or_when_turned_off() -> None:
    assert not _hook_docs(manifests(render({"operator": {"releaseOnUninstall": False}})))
    assert not _hook_docs(manifests(render({"operator": {"enabled": False}})))
