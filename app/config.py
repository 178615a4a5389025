"""Every setting of the service, read once from CNNSERVE_* environment variables (or a .env file).

Plain values only: what follows from them and the machine (processes, threads, workers) is decided
in ``app/sizing.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CNNSERVE_", env_file=".env", extra="ignore")

    models_dir: Path = Field(Path("models"), description="the model repository: one folder per model")
    default_model: str = Field("efficientnet_lite0", description="served when a request names no model")
    providers: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: CUDA when onnxruntime-gpu and a GPU are there, else CPU; cuda: fail without it"
    )
    intra_op_threads: int = Field(
        0, ge=0, description="ONNX Runtime threads per inference; 0: chosen per model at load (see README)"
    )
    inference_workers: int = Field(
        0, ge=0, le=64, description="batches run at once per model; 0: chosen per model at load (see README)"
    )
    max_batch_size: int = Field(8, ge=1, le=1024, description="most images joined into one ONNX Runtime call")
    max_queue_delay_ms: float = Field(
        0.0, ge=0, le=10_000, description="how long a request may wait for company; 0: batch only what is waiting"
    )
    max_queue: int = Field(32, ge=1, description="requests waiting per model before 429")
    request_timeout_s: float = Field(30.0, gt=0, description="a queued request older than this is dropped (503)")
    max_body_bytes: int = Field(20 * 1024 * 1024, gt=0, description="largest request body accepted (413 above)")
    body_timeout_s: float = Field(
        30.0, gt=0, description="seconds a request's whole body may take to arrive, from its start (408, then closed)"
    )
    max_pixels: int = Field(50_000_000, gt=0, description="largest image, width x height, decoded (413 above)")
    max_top_k: int = Field(100, ge=1, description="largest top_k a client may ask for")
    model_control: Literal["none", "explicit", "poll"] = Field(
        "none",
        description="none: every model at start, no management API; explicit: the models named by "
        "CNNSERVE_LOAD_MODELS at start, then load and unload through /v2/repository; poll: every model at "
        "start, then the repository is watched (and the API is on)",
    )
    load_models: str = Field(
        "", description="explicit mode: comma-separated models loaded at start (cnnserve serve --load-model NAME)"
    )
    poll_interval_s: float = Field(2.0, gt=0, le=3600, description="poll mode: seconds between looks at the repository")
    featuremaps: bool = Field(
        True, description="serve /featuremaps and /cam (a second session per model, built lazily)"
    )
    max_feature_channels: int = Field(256, ge=1, description="most channels one /featuremaps request returns")
    max_feature_values: int = Field(1_000_000, ge=1, description="most raw values one JSON feature-map response holds")
    max_explain_passes: int = Field(
        512, ge=1, description="most forward passes one /explain request may cost (Score-CAM, Ablation-CAM, occlusion)"
    )
    api_key: SecretStr | None = Field(
        None, description="when set, every endpoint but the probes needs 'Authorization: Bearer KEY' or 'X-API-Key'"
    )
    keys_file: Path | None = Field(
        None,
        description="named API keys with their scopes, rate and expiry (TOML, see README 'Access control'); "
        "read again when it changes",
    )
    jwt_secret: SecretStr | None = Field(None, description="accept HS256 bearer tokens signed with this secret")
    jwt_jwks_file: Path | None = Field(None, description="accept RS256/ES256 tokens signed by a key of this JWKS")
    jwt_audience: str = Field("cnnserve", description="the aud a bearer token must name")
    rate_limit: float = Field(
        0.0,
        ge=0,
        description="requests a second per credential without a rate of its own (per client address when the "
        "service is open); 0: none",
    )
    rate_burst: int = Field(0, ge=0, description="requests at once above the rate; 0: the rate, at least 1")
    tls_cert: Path | None = Field(None, description="PEM certificate chain: serve HTTPS and gRPC over TLS")
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert")
    tls_client_ca: Path | None = Field(None, description="PEM CA bundle: require client certificates it signed (mTLS)")
    worker_nice: int = Field(
        0,
        ge=0,
        le=19,
        description="nice value of every thread of a server process but its event loop's (cnnserve serve, Linux): "
        "the loop answers probes and refusals first under load; 0: all equal",
    )
    header_timeout_s: float = Field(
        10.0, gt=0, description="a connection that has not sent a request's complete headers within this is closed"
    )
    cors_origins: str = Field("", description="comma-separated origins allowed to call from browsers; * for any")
    drain_seconds: float = Field(
        0.0, ge=0, le=300, description="after SIGTERM: answer /readyz 503 this long, still serving, before stopping"
    )
    processes: int = Field(
        0,
        ge=0,
        le=64,
        description="server processes sharing the port, each with every model; 0: one per core (at most "
        "4) on the CPU provider, one with CUDA (app/sizing.py decides)",
    )
    feed: Literal["auto", "shared", "per-process"] = Field(
        "auto",
        description="auto: shared on an accelerator, per-process on the CPU; shared: server processes (one per "
        "core) decode and hand tensors through shared memory to one inference process per GPU that batches for all "
        "of them (the CPU provider too); per-process: every server process runs its own session (on CUDA, a CUDA "
        "context each, at most CNNSERVE_MAX_CUDA_PROCESSES)",
    )
    batch_shapes: str = Field(
        "1,8,32",
        pattern=r"^\s*[1-9][0-9]*\s*(,\s*[1-9][0-9]*\s*)*$",
        description="on an accelerator (or in the shared feed), the batch sizes a model runs at, each warmed; a "
        "batch runs at the smallest that holds it",
    )
    precision: Literal["fp32", "fp16"] = Field(
        "fp32", description="on an accelerator: fp16 converts each model at load, checked against fp32 first"
    )
    gpus: int = Field(0, ge=0, le=64, description="inference processes of the shared feed, one per GPU; 0: count them")
    max_cuda_processes: int = Field(
        4, ge=1, le=64, description="most server processes holding a CUDA context each (CNNSERVE_FEED=per-process)"
    )
    feed_slot_mb: int = Field(
        8, ge=2, le=1024, description="shared feed: MiB of shared memory per in-flight batch of a server process"
    )
    tensorrt: bool = Field(True, description="use TensorRT's execution provider where onnxruntime offers it")
    tensorrt_cache: Path = Field(
        Path("/tmp/cnnserve-tensorrt"), description="where TensorRT's engines are kept between starts"
    )
    prometheus_multiproc_dir: Path | None = Field(
        None,
        validation_alias="PROMETHEUS_MULTIPROC_DIR",
        description="prometheus_client's folder for metrics shared by processes; set by `cnnserve serve` when it "
        "starts several",
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    grpc_port: int = Field(
        8001, ge=0, le=65535, description="the Open Inference Protocol over gRPC (cnnserve serve); 0: no gRPC"
    )
    grpc_max_message_bytes: int = Field(
        0, ge=0, description="largest gRPC message either way (RESOURCE_EXHAUSTED above); 0: CNNSERVE_MAX_BODY_BYTES"
    )
    # Ray Serve (cnnserve ray; app/rayserve/): each model a deployment of its own
    ray_address: str = Field("", description="Ray cluster to join: auto, ray://HOST:10001; empty: start one here")
    ray_replicas: int = Field(1, ge=1, le=256, description="replicas of each model (the least, when autoscaling)")
    ray_max_replicas: int = Field(
        0, ge=0, le=256, description="above ray_replicas: autoscale each model up to this many replicas; 0: fixed"
    )
    ray_target_ongoing_requests: float = Field(
        2.0, gt=0, description="autoscaling: requests in flight per replica that Ray aims for"
    )
    ray_upscale_delay_s: float = Field(
        5.0, ge=0, description="autoscaling: load held this long before a replica is added"
    )
    ray_downscale_delay_s: float = Field(
        60.0, ge=0, description="autoscaling: load gone this long before a replica is removed"
    )
    ray_replica_cpus: float = Field(1.0, gt=0, description="CPUs Ray reserves for each model replica (its threads)")
    ray_replica_resources: dict[str, float] = Field(
        default_factory=dict, description='custom Ray resources each model replica needs, JSON: {"gpu_node": 1}'
    )
    ray_max_replicas_per_node: int = Field(
        0, ge=0, le=100, description="most replicas of one model on one Ray node (1 spreads them); 0: no limit"
    )
    ray_ingress_replicas: int = Field(1, ge=1, le=256, description="replicas of the HTTP ingress deployment")
    ray_ingress_resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources each ingress replica needs, JSON"
    )
    ray_throughput_optimized: bool = Field(
        True,
        description="Ray Serve's high-throughput mode (RAY_SERVE_THROUGHPUT_OPTIMIZED=1, RAY_SERVE_ENABLE_HA_PROXY=1) "
        "for a cluster cnnserve ray starts; set them on `ray start` for a cluster it joins",
    )
    ray_proxy_location: Literal["EveryNode", "HeadOnly"] = Field(
        "EveryNode", description="where Ray Serve runs its HTTP proxies, at host:port (HeadOnly: one machine's nodes)"
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator(
        "api_key", "jwt_secret", "keys_file", "jwt_jwks_file", "tls_cert", "tls_key", "tls_client_ca", mode="before"
    )
    @classmethod
    def _empty_key_means_none(cls, value: object) -> object:
        """``CNNSERVE_API_KEY=`` (compose's default for an unset variable) turns authentication off,
        rather than on with an empty key."""
        return None if value == "" else value

    @property
    def batch_shape_list(self) -> tuple[int, ...]:
        return tuple(sorted({int(size) for size in self.batch_shapes.split(",")}))

    @model_validator(mode="after")
    def _tls_needs_both_halves(self) -> Settings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("CNNSERVE_TLS_CERT and CNNSERVE_TLS_KEY go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("CNNSERVE_TLS_CLIENT_CA needs CNNSERVE_TLS_CERT and CNNSERVE_TLS_KEY")
        return self

    @property
    def load_model_list(self) -> list[str]:
        return [name.strip() for name in self.load_models.split(",") if name.strip()]

    @property
    def grpc_message_limit(self) -> int:
        return self.grpc_max_message_bytes or self.max_body_bytes

    @property
    def cors_origin_list(self) -> list[str]:
        return [origin.strip() for origin in self.cors_origins.split(",") if origin.strip()]
