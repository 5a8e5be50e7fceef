"""Serving configuration (``configs/serving.yaml``), validated once at the edge."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from cxr_core.config import YamlConfig
from serving.schemas import MODEL_NAME

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "serving.yaml"


class PackageConfig(BaseModel):
    """What ``config/config.properties`` of the model package says about the model."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_name: str = MODEL_NAME
    workers: int = Field(1, ge=1)
    batch_size: int = Field(4, ge=1, le=64)
    max_batch_delay_ms: int = Field(20, ge=0)
    response_timeout_s: int = Field(120, ge=1)
    max_request_mb: int = Field(64, ge=1, description="TorchServe's request/response cap: the front's 48 MB body "
                                                       "limit as base64 (x4/3)")
    job_queue_size: int = Field(100, ge=1, description="TorchServe's queue per model: beyond it 503, not memory")
    install_py_dep_per_model: bool = False


class LocalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    front_port: int = 8080
    inference_port: int = 8085
    management_port: int = 8081
    metrics_port: int = 8082
    grpc_inference_port: int = 7070
    grpc_management_port: int = 7071
    state_dir: str = ".cache/serving-stack"
    audit_log: str = "logs/audit.jsonl"
    torch_threads: int | None = 1


class FrontConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_body_mb: float = Field(48, gt=0)
    request_timeout_s: float = Field(120, gt=0)
    body_timeout_s: float = Field(30, gt=0, description="to receive a whole body (48 MB needs > 1.6 MB/s)")
    header_timeout_s: float = Field(10, gt=0, description="to receive the request headers (slowloris)")
    max_connections_per_client: int = Field(32, ge=1, description="open sockets per client address")
    api_keys_file: str | None = None


class ServingConfig(YamlConfig):
    model_config = ConfigDict(extra="forbid")

    package: PackageConfig = PackageConfig()
    local: LocalConfig = LocalConfig()
    front: FrontConfig = FrontConfig()

    @classmethod
    def load(cls, path: Path | str | None = None) -> "ServingConfig":
        path = Path(path) if path else DEFAULT_CONFIG
        if not path.exists():
            return cls()
        return cls.from_yaml(path)
