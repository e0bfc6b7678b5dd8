"""The Kubernetes resource types the EPP reads or writes, and their URL paths."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ResourceType:
    group: str  # "" = the core API
    version: str
    plural: str
    kind: str
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def group_version_path(self) -> str:
        return f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"

    def path(self, namespace: str | None = None, name: str | None = None) -> str:
        """``/api/v1/namespaces/ns/pods[/name]`` (cluster-wide without a namespace)."""
        out = self.group_version_path
        if self.namespaced and namespace:
            out += f"/namespaces/{namespace}"
        out += f"/{self.plural}"
        return f"{out}/{name}" if name else out

    def __str__(self) -> str:
        return f"{self.plural}.{self.group or 'core'}/{self.version}"


PODS = ResourceType("", "v1", "pods", "Pod")
LEASES = ResourceType("coordination.k8s.io", "v1", "leases", "Lease")
EVENTS = ResourceType("", "v1", "events", "Event")

POOL_GROUP = "inference.networking.k8s.io"
LEGACY_GROUP = "inference.networking.x-k8s.io"
LLMD_GROUP = "llm-d.ai"

INFERENCE_POOLS = {
    POOL_GROUP: ResourceType(POOL_GROUP, "v1", "inferencepools", "InferencePool"),
    LEGACY_GROUP: ResourceType(LEGACY_GROUP, "v1alpha2", "inferencepools", "InferencePool"),
}
# Preferred first: upstream uses llm-d.ai when its CRD is installed, else the legacy group.
OBJECTIVES = (ResourceType(LLMD_GROUP, "v1alpha2", "inferenceobjectives", "InferenceObjective"),
              ResourceType(LEGACY_GROUP, "v1alpha2", "inferenceobjectives", "InferenceObjective"))
REWRITES = (ResourceType(LLMD_GROUP, "v1alpha2", "inferencemodelrewrites", "InferenceModelRewrite"),
            ResourceType(LEGACY_GROUP, "v1alpha2", "inferencemodelrewrites", "InferenceModelRewrite"))

ALL = (PODS, LEASES, EVENTS, *INFERENCE_POOLS.values(), *OBJECTIVES, *REWRITES)
