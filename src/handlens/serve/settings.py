"""Service settings: one validated object, from the CLI or a caller."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field


class ServeSettings(BaseModel):
    workspace: Path | None = Field(None, description="workspace root (default: $HANDLENS_WORKSPACE)")
    db_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    max_upload_bytes: int = Field(20 * 2**20, gt=0, description="larger uploads get 413")
    max_pixels: int = Field(50_000_000, gt=0, description="larger images (decompression bombs) get 413; "
                            "uploads and catalog images alike")
    max_pixels_in_flight: int = Field(100_000_000, gt=0, description="pixels decoded at once over all requests "
                                      "(others wait their turn): bounds the service's memory")
    max_json_bytes: int = Field(1 * 2**20, gt=0, description="larger JSON bodies get 413 (parsed off the event "
                                "loop, nesting bounded)")
    allowed_hosts: list[str] = Field(default_factory=list, description="names (Host headers) the service is "
                                     "reached by besides IP addresses, localhost and this machine's name; "
                                     "'*' turns the check off behind a proxy that checks it")
    api_key: str | None = Field(None, description="required on mutating endpoints when not bound to loopback")
    cors_origins: list[str] = Field(default_factory=list, description="CORS is off unless origins are listed")
    batch_size: int = Field(16, ge=1, description="most predict requests served by one forward pass")
    max_wait_ms: float = Field(5.0, ge=0, description="how long a request waits for others to share its batch")
    runtime: Literal["torch", "onnx"] = Field("torch", description="what runs predictions: torch, or onnxruntime "
                                              "(each model exported to ONNX on first use, cached in the "
                                              "workspace's cache/onnx; a model that cannot be exported is served "
                                              "by torch); explanations always run on torch")
    pool_memory_mb: float = Field(2048, gt=0, description="loaded models kept warm up to this many MB (LRU)")
    explain_cache_items: int = Field(256, ge=0, description="explanations kept (overlay PNG + float16 map each)")
    explain_concurrency: int = Field(2, ge=1, description="explanations computed at once; others queue")
    explain_queue: int = Field(16, ge=0, description="explanations waiting for a slot; more get 503")
    max_forward_passes: int = Field(4096, ge=1, description="forward passes one image's explanation may take "
                                    "(occlusion windows, Score-CAM channels, IG steps...), from each method's cost")
    max_backward_passes: int = Field(128, ge=1, description="backward passes one image's explanation may take "
                                     "(Integrated Gradients steps, SmoothGrad / GradientSHAP samples)")
    max_explain_tiles: int = Field(64, ge=1, description="tiles one explanation of a patch-trained model may take "
                                   "(each tile is explained at the model's input size, within the budgets above)")
    request_timeout_s: float = Field(60.0, gt=0)
    allow_private_urls: bool = Field(False, description="import-urls jobs submitted over the API may fetch "
                                     "loopback and private addresses (off: public addresses only)")
    broker_url: str | None = Field(None, description="Celery broker for jobs (amqp:// or redis://); none: the "
                                   "local worker the serve command starts runs them")

    @property
    def loopback(self) -> bool:
        return self.host in ("127.0.0.1", "localhost", "::1")
