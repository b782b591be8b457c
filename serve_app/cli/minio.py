"""MinIO for clusters without S3: its volume, server, service, and a Job that creates the model bucket."""

from __future__ import annotations

from typing import Any

from serve_app.cli import kube
from serve_app.cli.deploy_settings import DeploySettings

MINIO_PORTS = {"api": 9000, "console": 9001}


def minio_objects(settings: DeploySettings) -> list[dict[str, Any]]:
    """PVC, Deployment and Service for MinIO, and a Job creating the model bucket (idempotent)."""
    name, minio, labels = settings.minio_service, settings.minio, kube.labels(settings, "minio")
    credentials = [
        kube.secret_env("MINIO_ROOT_USER", settings.secrets.s3, kube.S3_SECRET_KEYS[0]),
        kube.secret_env("MINIO_ROOT_PASSWORD", settings.secrets.s3, kube.S3_SECRET_KEYS[1]),
    ]
    claim: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": f"{minio.storage_gib}Gi"}},
    }
    if minio.storage_class:
        claim["storageClassName"] = minio.storage_class
    probe = {"httpGet": {"path": "/minio/health/live", "port": "api"}, "periodSeconds": 10}
    server = {
        "name": "minio",
        "image": minio.image,
        "args": ["server", "/data", "--console-address", ":9001"],
        "env": credentials,
        "ports": [{"name": port, "containerPort": number} for port, number in MINIO_PORTS.items()],
        "readinessProbe": {**probe, "httpGet": {"path": "/minio/health/ready", "port": "api"}},
        "livenessProbe": probe,
        "resources": kube.resources(0.5, 1),
        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
    }
    internal_endpoint = f"http://{name}.{settings.namespace}.svc.cluster.local:9000"
    create_bucket = (
        'until mc alias set modelserve "$S3_ENDPOINT" "$AWS_ACCESS_KEY_ID" "$AWS_SECRET_ACCESS_KEY" >/dev/null; do\n'
        '  echo "waiting for $S3_ENDPOINT"; sleep 3\n'
        "done\n"
        'mc mb --ignore-existing "modelserve/$BUCKET"\n'
    )
    init = {
        "name": "mc",
        "image": minio.mc_image,
        "command": ["/bin/sh", "-c", create_bucket],
        "env": [
            {"name": "S3_ENDPOINT", "value": internal_endpoint},
            {"name": "BUCKET", "value": minio.bucket},
            {"name": "MC_CONFIG_DIR", "value": "/tmp/mc"},
            *[kube.secret_env(key, settings.secrets.s3) for key in kube.S3_SECRET_KEYS],
        ],
        "resources": kube.resources(0.25, 0.25),
    }
    pod = {"containers": [server], "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": name}}]}
    service_ports = [{"name": port, "port": number, "targetPort": port} for port, number in MINIO_PORTS.items()]
    job = {
        "backoffLimit": 4,
        "activeDeadlineSeconds": 900,
        "ttlSecondsAfterFinished": 600,  # re-apply recreates it; `mc mb --ignore-existing` is idempotent
        "template": {
            "metadata": {"labels": kube.labels(settings, "minio-bucket-init")},
            "spec": {"restartPolicy": "OnFailure", "containers": [init]},
        },
    }
    return [
        kube.k8s_object(settings, "v1", "PersistentVolumeClaim", name, "minio", claim),
        kube.k8s_object(
            settings,
            "apps/v1",
            "Deployment",
            name,
            "minio",
            # Recreate: one pod at a time owns the ReadWriteOnce volume.
            {
                "replicas": 1,
                "strategy": {"type": "Recreate"},
                "selector": {"matchLabels": labels},
                "template": {"metadata": {"labels": labels}, "spec": pod},
            },
        ),
        kube.k8s_object(settings, "v1", "Service", name, "minio", {"selector": labels, "ports": service_ports}),
        kube.k8s_object(settings, "batch/v1", "Job", f"{name}-bucket-init", "minio-bucket-init", job),
    ]
