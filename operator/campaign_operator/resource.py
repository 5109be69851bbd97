"""Names the operator shares with the CRD in ``deploy/helm/mailbeacon/crds/``."""

from __future__ import annotations

from mailbeacon.contract.campaigns import API_GROUP, KIND

GROUP = API_GROUP
VERSION = "v1alpha1"
PLURAL = "campaigns"
RESOURCE_KIND = KIND

# kopf keeps its bookkeeping (finalizer, last handled spec, handler progress) under our
# own prefix, in annotations: the CRD's status schema is closed, so a status.kopf stanza
# would be pruned by the API server.
ANNOTATION_PREFIX = f"operator.{GROUP}"
FINALIZER = f"{GROUP}/campaign-operator"

BOUNCE_RATE_HIGH = "BounceRateHigh"
COMPLAINT_RATE_HIGH = "ComplaintRateHigh"
STATISTICS_AVAILABLE = "StatisticsAvailable"
