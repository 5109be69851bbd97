"""The library chart mailbeacon-sidecar as an app chart uses it, rendered by real Helm.

``LibraryApp`` writes a minimal app chart that depends on the library by ``file://`` (as
``deploy/examples/newsletter-job`` does), builds the dependency once, and renders a Pod whose
proxy, app environment and volumes come from the library's templates with the parameters a
test gives: what an app chart author gets for those inputs.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ROOT / "deploy" / "helm" / "mailbeacon-sidecar"

POD_TEMPLATE = """\
apiVersion: v1
kind: Pod
metadata:
  name: app
spec:
  initContainers:
    {{- include "mailbeacon-sidecar.initContainer" .Values.proxy | nindent 4 }}
  containers:
    - name: app
      image: registry.example.com/app:1.0.0
      env:
        {{- include "mailbeacon-sidecar.appEnv" .Values.proxy | nindent 8 }}
  volumes:
    {{- include "mailbeacon-sidecar.volumes" .Values.proxy | nindent 4 }}
"""


def app_chart(directory: Path, templates: dict[str, str], **chart: Any) -> Path:
    """An app chart depending on the library (by its absolute file:// path), dependency built."""
    import helm_python

    (directory / "templates").mkdir(parents=True)
    metadata = {
        "apiVersion": "v2",
        "name": directory.name,
        "version": "1.0.0",
        "dependencies": [
            {"name": "mailbeacon-sidecar", "version": "0.1.0", "repository": f"file://{LIBRARY}"}
        ],
        **chart,
    }
    (directory / "Chart.yaml").write_text(yaml.safe_dump(metadata))
    for name, text in templates.items():
        (directory / "templates" / name).write_text(text)
    helm_python.dependency_build(str(directory))
    return directory


class LibraryApp:
    def __init__(self, directory: Path) -> None:
        self.directory = app_chart(directory, {"pod.yaml": POD_TEMPLATE})

    def pod(self, **params: Any) -> dict[str, Any]:
        import helm_python

        rendered = helm_python.Chart.load(str(self.directory)).render(
            {"proxy": copy.deepcopy(params)}, name="app", namespace="shop"
        )
        pod: dict[str, Any] = yaml.safe_load(rendered[f"{self.directory.name}/templates/pod.yaml"])
        return pod
