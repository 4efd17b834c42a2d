"""Playing the kubelet for one pod: materialise its volumes on disk the way the kubelet does
(timestamped folder, ``..data`` symlink, one symlink per key) and run a container's command
with its mount paths mapped into that folder. No container runtime exists here; this is the
part of the kubelet keyhole depends on."""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from pathlib import Path

from tests.cluster.kube import Kube
from tests.support.kubelet_files import write_atomically

_FIELD = re.compile(r"metadata\.annotations\['([^']+)'\]")


@dataclass
class Kubelet:
    kube: Kube
    root: Path

    def volume_files(self, pod: dict, volume: dict) -> dict[str, bytes]:
        namespace = pod["metadata"]["namespace"]
        if "secret" in volume:
            source = volume["secret"]
            data = {k: base64.b64decode(v) for k, v in
                    (self.kube.get("secret", source["secretName"], namespace).get("data") or {}).items()}
            return _items(data, source.get("items"))
        if "configMap" in volume:
            source = volume["configMap"]
            found = self.kube.get("configmap", source["name"], namespace)
            data = {k: v.encode() for k, v in (found.get("data") or {}).items()}
            data.update({k: base64.b64decode(v) for k, v in (found.get("binaryData") or {}).items()})
            return _items(data, source.get("items"))
        if "downwardAPI" in volume:
            current = self.kube.get("pod", pod["metadata"]["name"], namespace)
            files = {}
            for item in volume["downwardAPI"]["items"]:
                key = _FIELD.fullmatch(item["fieldRef"]["fieldPath"]).group(1)
                files[item["path"]] = (current["metadata"].get("annotations") or {}).get(key, "").encode()
            return files
        if "projected" in volume:
            return self._projected(pod, volume["projected"])
        raise AssertionError(f"volume kind not handled: {sorted(volume)}")

    def _projected(self, pod: dict, projected: dict) -> dict[str, bytes]:
        """The ServiceAccount token volume the API server adds. There is no token controller
        or kubelet here to mint one, so the token file holds a stand-in; keyhole never reads it."""
        files: dict[str, bytes] = {}
        for source in projected.get("sources") or []:
            if "serviceAccountToken" in source:
                files[source["serviceAccountToken"]["path"]] = b"stand-in-token"
            elif "configMap" in source:
                for item in source["configMap"].get("items") or []:
                    files[item["path"]] = b""
            elif "downwardAPI" in source:
                for item in source["downwardAPI"].get("items") or []:
                    if item.get("fieldRef", {}).get("fieldPath") == "metadata.namespace":
                        files[item["path"]] = pod["metadata"]["namespace"].encode()
        return files

    def __post_init__(self) -> None:
        self._folders: dict[str, Path] = {}

    def mount(self, pod: dict, container: dict) -> None:
        """Materialise every volume ``container`` mounts at ``root`` + its mountPath, so the
        container's view of the file system (parents included) is kept."""
        volumes = {v["name"]: v for v in pod["spec"].get("volumes") or []}
        for mount in container.get("volumeMounts") or []:
            folder = self.root / mount["mountPath"].lstrip("/")
            write_atomically(folder, self.volume_files(pod, volumes[mount["name"]]))
            self._folders[mount["name"]] = folder

    def path(self, container_path: str) -> str:
        """Where a path inside the container is on this machine."""
        return str(self.root / container_path.lstrip("/"))

    def refresh(self, pod: dict, volume_name: str) -> None:
        """What the kubelet does when a watched source changes (e.g. a pod annotation)."""
        volume = next(v for v in pod["spec"]["volumes"] if v["name"] == volume_name)
        write_atomically(self._folders[volume_name], self.volume_files(pod, volume))


def _items(data: dict[str, bytes], items: list[dict] | None) -> dict[str, bytes]:
    if not items:
        return data
    return {item["path"]: data[item["key"]] for item in items}


def map_paths(text: str, kubelet: Kubelet, prefix: str) -> str:
    """Rewrite container paths under ``prefix`` in an argument or variable value."""
    return text.replace(prefix, kubelet.path(prefix))
